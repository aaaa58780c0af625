"""The Sana block's residual adds, LayerNorms and adaLN modulation as one row-wise Triton kernel.

Per token row of the (B, N, C) residual stream, the kernel optionally adds an update (optionally gated by a (B, 1, C)
vector) to the stream, then optionally takes the row's LayerNorm (the module's eps, its weight and bias where it
has them) and modulates it, ``norm(x) * (1 + scale) + shift``; it computes in float32 and writes both results in the
stream's dtype. The norm reads the stream as written (rounded to its dtype), as the plain ops' next norm does. In the
plain path each of these steps is its own elementwise kernel that writes a whole (B, N, C) temporary and the next
one reads it back; here each row is read once and each result written once.

The block uses it three ways (:class:`~compactedit_cli.models.transformer.SanaBlock`):

* norm1 and its modulation (no update);
* ``attn2(x) + x`` then norm2 and its modulation: the cross-attention's residual folded into the norm;
* the two gated residuals ``x + gate * y`` (after the self-attention, and the block's output): the same kernel
  without the norm, not a separate elementwise kernel. Each is followed by a matrix product (the cross-attention's
  query projection, the next block's norm1 and then projections), so there is no norm to fold it into within a
  block; the fused add still reads the update once and writes the stream once where the plain ``gate * y`` writes
  and rereads a temporary, and one kernel keeps one rule for the gate's indexing and rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 8  # a whole row (the model width, 2240 at full size, padded to a power of two) per program


@triton.jit
def _norm_modulate_kernel(
    x_ptr, update_ptr, gate_ptr, scale_ptr, shift_ptr, weight_ptr, bias_ptr, stream_ptr, normed_ptr,
    tokens, width, gate_stride, scale_stride, shift_stride, eps,
    has_update: tl.constexpr, has_gate: tl.constexpr, norm: tl.constexpr, has_weight: tl.constexpr,
    has_bias: tl.constexpr, block: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    c = tl.arange(0, block)
    inside = c < width
    offsets = row.to(tl.int64) * width + c
    image = row // tokens  # the (B, 1, C) vectors' row for this token's image
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    if has_update:
        update = tl.load(update_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if has_gate:
            update = update * tl.load(gate_ptr + image * gate_stride + c, mask=inside, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + update).to(stream_ptr.dtype.element_ty)
        tl.store(stream_ptr + offsets, x, mask=inside)
    if norm:
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=0) / width
        centred = tl.where(inside, x - mean, 0.0)
        variance = tl.sum(centred * centred, axis=0) / width
        normed = centred / tl.sqrt(variance + eps)
        if has_weight:
            normed = normed * tl.load(weight_ptr + c, mask=inside, other=0.0).to(tl.float32)
        if has_bias:
            normed = normed + tl.load(bias_ptr + c, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + image * scale_stride + c, mask=inside, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + image * shift_stride + c, mask=inside, other=0.0).to(tl.float32)
        normed = normed * (1.0 + scale) + shift
        tl.store(normed_ptr + offsets, normed.to(normed_ptr.dtype.element_ty), mask=inside)


def _per_image(vector: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A (B, 1, C) or broadcastable modulation vector as (a view with unit column stride, its batch stride); a
    missing one is ``like`` itself, never read."""
    if vector is None:
        return like, 0
    vector = vector.expand(like.shape[0], 1, like.shape[-1])
    vector = vector if vector.stride(-1) == 1 else vector.contiguous()
    return vector, vector.stride(0)


def _launch(
    x: torch.Tensor,
    update: torch.Tensor | None,
    gate: torch.Tensor | None,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel over every token row of ``x``: the update (gated) when given, the modulated norm when given."""
    batch, tokens, width = x.shape
    x = x.contiguous()
    stream = x if update is None else torch.empty_like(x)
    normed = None if norm is None else torch.empty_like(x)
    scale, shift, weight, bias, eps = (None, None, None, None, 0.0) if norm is None else norm
    (gate_, gate_stride), (scale_, scale_stride), (shift_, shift_stride) = (
        _per_image(v, x) for v in (gate, scale, shift)
    )
    _norm_modulate_kernel[(batch * tokens,)](
        x, x if update is None else update.contiguous(), gate_, scale_, shift_,
        x if weight is None else weight.contiguous(), x if bias is None else bias.contiguous(),
        stream, x if normed is None else normed,
        tokens, width, gate_stride, scale_stride, shift_stride, float(eps),
        has_update=update is not None, has_gate=gate is not None, norm=norm is not None,
        has_weight=weight is not None, has_bias=bias is not None, block=triton.next_power_of_2(width),
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return stream, normed


def norm_modulate(
    x: torch.Tensor,
    update: torch.Tensor | None,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, normed): ``stream = x + gate * update`` (``x`` itself without an update; no gate: ``x + update``),
    ``normed = layer_norm(stream, weight, bias, eps) * (1 + scale) + shift``; (B, N, C), both in ``x``'s dtype."""
    stream, normed = _launch(x, update, gate, (scale, shift, weight, bias, eps))
    assert normed is not None
    return stream, normed


def gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + gate * update`` of (B, N, C) tokens and a (B, 1, C) gate (``x + update`` without one), ``x``'s dtype."""
    return _launch(x, update, gate, None)[0]
