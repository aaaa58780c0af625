"""``--quantize fp8``: the DiT blocks' matrix products in float8 (e4m3) with row-wise scales, via ``torch._scaled_mm``.

The products are the attentions' linear layers and the feed-forwards' two 1×1 convolutions (which run as matrix
products over tokens, :func:`~compactedit_cli.models.feedforward.pointwise`).

Each weight row (output channel) is scaled so its largest magnitude is float8's largest (448) and stored as
``float8_e4m3fn``; each activation row is scaled the same way at every call. ``torch._scaled_mm`` multiplies the
two on the tensor cores with float32 accumulation, applies both scales and the bias, and writes bf16. Row-wise
scales rather than one per tensor: one outlier row or token then costs only its own precision. ``torch._scaled_mm``
rather than torchao: no new dependency, and the one call is all the model needs. The VLM, the VAE, the context
projection and the final layer stay in their dtype.

FP8 matrix products need compute capability 8.9 (Ada, Hopper and newer); :func:`fp8_unsupported` says why not
elsewhere and the option is refused, never silently dropped. :func:`fake_quantized_linear` is the same arithmetic
in float32 (quantise, dequantise, multiply): an :class:`Fp8Linear` runs it off CUDA, which is how the numerics are
tested, and measured through whole edits, without such a device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.feedforward import GLUMBConv

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale


def fp8_unsupported(device: torch.device) -> str | None:
    """Why FP8 matrix products cannot run on ``device``, or ``None`` when they can."""
    if device.type != "cuda":
        return f"--quantize fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada, Hopper or newer), not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"--quantize fp8 needs compute capability 8.9 or newer (Ada, Hopper); {name} has {major}.{minor}"
    return None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (…, K) as float8 and its float32 row scales (…, 1), so that ``x ≈ q.float() * scale``."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fake_quantized_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What :class:`Fp8Linear` computes, in float32: both operands rounded through float8, then multiplied."""
    q, scale = quantize_rows(x)
    out = F.linear(q.float() * scale, weight.float() * weight_scale)
    return (out if bias is None else out + bias.float()).to(x.dtype)


class Fp8Linear(nn.Module):
    """A ``nn.Linear`` (or a 1×1 ``nn.Conv2d`` applied to tokens) with float8 weights and row-wise scales;
    activations quantised per row at each call. Off CUDA it runs :func:`fake_quantized_linear`."""

    takes_tokens = True  # in a feed-forward it stands for a 1×1 convolution and takes the tokens (B, H, W, C)

    def __init__(self, layer: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        weight = layer.weight.detach().flatten(1)  # a 1×1 convolution's (out, in, 1, 1) is a linear's (out, in)
        self.out_features, self.in_features = weight.shape
        weight, scale = quantize_rows(weight)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # (1, N), as torch._scaled_mm takes it
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())
        self.out_dtype = layer.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return fake_quantized_linear(x, self.weight, self.weight_scale.reshape(-1, 1), self.bias)
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows)
        out = torch._scaled_mm(
            q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, row-wise scales"


def quantize_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module``, and the 1×1 convolutions of its feed-forwards
    (:class:`~compactedit_cli.models.feedforward.GLUMBConv`), with :class:`Fp8Linear` layers, in place; returns
    how many."""
    count = 0
    for parent in list(module.modules()):
        names = [name for name, child in parent.named_children() if isinstance(child, nn.Linear)]
        if isinstance(parent, GLUMBConv):
            names += ["conv_inverted", "conv_point"]
        for name in names:
            setattr(parent, name, Fp8Linear(getattr(parent, name)))
            count += 1
    return count
