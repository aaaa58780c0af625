"""The feed-forward's 3×3 depthwise convolution and SiLU gate (GLUMBConv's middle) as one Triton kernel.

The input is the expanded activations in channels-last (B, H, W, 2C): channel c of the output is
conv(x)[c] · SiLU(conv(x)[c + C]), with the convolution's zero padding of one. The plain path writes the whole
convolution's output (2C channels), reads it back for the gate and writes the product: here each input tile is read
once per tap from cache and only the gated C channels are written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 32  # pixels per program
BLOCK_C = 64  # output channels per program


@triton.jit
def _depthwise_glu_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, height, width, channels, pixels,
    block_p: tl.constexpr, block_c: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0) * block_p + tl.arange(0, block_p)  # flat (batch, row, column)
    c = tl.program_id(1) * block_c + tl.arange(0, block_c)
    inside, in_c = p < pixels, c < channels
    column = p % width
    row = (p // width) % height
    image = p // (width * height)
    zero = tl.zeros((block_p, block_c), tl.float32)
    hidden = zero + tl.load(b_ptr + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
    gate = zero + tl.load(b_ptr + channels + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
    for tap in tl.static_range(9):
        y, x = row + (tap // 3 - 1), column + (tap % 3 - 1)
        valid = inside & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        source = ((image * height + y) * width + x) * (2 * channels)
        mask = valid[:, None] & in_c[None, :]
        xh = tl.load(x_ptr + source[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        xg = tl.load(x_ptr + source[:, None] + channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        wh = tl.load(w_ptr + c * 9 + tap, mask=in_c, other=0.0).to(tl.float32)
        wg = tl.load(w_ptr + (channels + c) * 9 + tap, mask=in_c, other=0.0).to(tl.float32)
        hidden += xh * wh[None, :]
        gate += xg * wg[None, :]
    out = hidden * gate * tl.sigmoid(gate)
    target = p[:, None] * channels + c[None, :]
    tl.store(out_ptr + target, out.to(out_ptr.dtype.element_ty), mask=inside[:, None] & in_c[None, :])


def depthwise_glu(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv(x)[:C] * silu(conv(x)[C:])`` of channels-last ``hidden`` (B, H, W, 2C); (B, H, W, C), its dtype."""
    batch, height, width, doubled = hidden.shape
    channels = doubled // 2
    hidden = hidden.contiguous()
    weight = weight.reshape(doubled, 9).contiguous()
    bias = bias if bias is not None else torch.zeros(doubled, device=hidden.device, dtype=hidden.dtype)
    out = torch.empty(batch, height, width, channels, device=hidden.device, dtype=hidden.dtype)
    pixels = batch * height * width
    grid = (triton.cdiv(pixels, BLOCK_P), triton.cdiv(channels, BLOCK_C))
    _depthwise_glu_kernel[grid](
        hidden, weight, bias.contiguous(), out, height, width, channels, pixels, block_p=BLOCK_P, block_c=BLOCK_C
    )
    return out
