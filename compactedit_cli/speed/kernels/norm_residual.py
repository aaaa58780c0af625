"""The DC-AE's closing RMS norm over channels and residual add (``norm(y) + x``) as one Triton kernel.

Every ResBlock, attention and GLUMBConv of the DC-AE ends so. The plain path (:func:`~...models.dcae.norm_residual`)
runs the norm, the weight, the bias and the add as four passes over the map, each writing it out; here each pixel's
channels (contiguous in the channels-last map) are read once from ``y`` and ``x`` and written once. The sums run in
float32, and in a half-precision map the values are rounded where the plain path rounds them (after the norm, the
weight, the bias and the add), so the output differs from the plain one only by the norm's float32 reduction order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...models.dcae import norm_residual
from ...models.norm import RMSNorm

BLOCK_ELEMENTS = 4096  # pixels x channels per program


@triton.jit
def _rms_norm_residual_kernel(
    y_ptr, x_ptr, w_ptr, b_ptr, out_ptr, pixels, channels, eps,
    block_p: tl.constexpr, block_c: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0) * block_p + tl.arange(0, block_p)
    c = tl.arange(0, block_c)
    in_c = c < channels
    mask = (p[:, None] < pixels) & in_c[None, :]
    index = p[:, None] * channels + c[None, :]
    dtype = out_ptr.dtype.element_ty
    y = tl.load(y_ptr + index, mask=mask, other=0.0).to(tl.float32)
    scale = tl.rsqrt(tl.sum(y * y, axis=1) / channels + eps)
    out = (y * scale[:, None]).to(dtype).to(tl.float32)  # each .to(dtype): where the plain path rounds
    out = (out * tl.load(w_ptr + c, mask=in_c, other=0.0).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
    out = (out + tl.load(b_ptr + c, mask=in_c, other=0.0).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
    out += tl.load(x_ptr + index, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + index, out.to(dtype), mask=mask)


def rms_norm_residual(norm: torch.nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``norm(y) + x`` of channels-last (B, C, H, W) maps in one pass for an RMS norm with weight and bias in the
    maps' dtype; any other norm, layout or dtype mix runs the plain op."""
    fused = (
        isinstance(norm, RMSNorm)
        and norm.weight is not None
        and norm.bias is not None
        and y.shape == x.shape
        and y.dtype == x.dtype == norm.weight.dtype == norm.bias.dtype
        and y.is_contiguous(memory_format=torch.channels_last)
        and x.is_contiguous(memory_format=torch.channels_last)
    )
    if not fused:
        return norm_residual(norm, y, x)
    batch, channels, height, width = y.shape
    out = torch.empty_like(x)  # channels-last, like the plain path's output
    pixels = batch * height * width
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, BLOCK_ELEMENTS // block_c)
    _rms_norm_residual_kernel[(triton.cdiv(pixels, block_p),)](
        y, x, norm.weight, norm.bias, out, pixels, channels, norm.eps, block_p=block_p, block_c=block_c
    )
    return out
