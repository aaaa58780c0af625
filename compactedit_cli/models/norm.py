"""An RMS norm with diffusers' RMSNorm rounding in fewer passes, and bounded temporaries on large inputs.

The reference norm upcasts its whole input to float32, squares it, reduces, multiplies and casts back: about eight
passes over memory, and on a large DC-AE feature map in bf16 its float32 temporaries briefly need several times the
map's own size, which sets the peak of the whole edit. Here the normalisation is ``F.rms_norm`` (one fused kernel on
CUDA, float32 inside), rounded to the reference's dtype before the weight and bias are applied exactly as the
reference applies them. Large inputs run over slices of a leading dimension: the norm is per row of the last
dimension, so slicing changes no number, and temporaries stay the size of one slice whichever kernel PyTorch picks.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

SLICE_ELEMENTS = 2**25  # elements per slice: float32 temporaries of at most 128 MiB
_HALF = (torch.float16, torch.bfloat16)


class RMSNorm(nn.Module):
    """RMS norm with diffusers' ``RMSNorm`` parameters, dtypes, rounding points and output strides, in fewer passes.

    Plain torch, so model code that needs the norm does not import diffusers.
    """

    slice_elements = SLICE_ELEMENTS

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.dim = (dim,)
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine and bias else None

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.rms_norm(x, self.dim, eps=self.eps)  # float32 inside, the input's dtype out
        half_weight = self.weight.dtype in _HALF
        # The reference rounds x·rsqrt(mean(x²) + eps) to a half-precision weight's dtype before scaling, and keeps
        # float32 otherwise.
        x = F.rms_norm(x if half_weight else x.float(), self.dim, eps=self.eps).to(self.weight.dtype)
        x = x * self.weight
        return x if self.bias is None else x + self.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if x.numel() <= self.slice_elements or x.dim() < 2:
            out = self._normalise(x)
            return out if out.stride() == x.stride() else torch.empty_like(x, dtype=out.dtype).copy_(out)
        dim = max(range(x.dim() - 1), key=lambda d: x.shape[d])
        size = max(1, self.slice_elements * x.shape[dim] // x.numel())
        results = map(self._normalise, x.split(size, dim=dim))
        first = next(results)
        out = torch.empty_like(x, dtype=first.dtype)  # the input's strides, as the reference keeps them
        start = 0
        for values in itertools.chain([first], results):  # narrow, not split: autograd allows writes into it
            out.narrow(dim, start, values.shape[dim]).copy_(values)
            start += values.shape[dim]
        return out
