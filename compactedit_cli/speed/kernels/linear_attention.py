"""ReLU linear attention as two Triton kernels: Sana's (the DiT's) and the DC-AE's, one kernel pair for both.

Per batch and head, with ReLU'd queries q_n and keys k_n: out_n = (q_n · Σ_m k_m v_mᵀ) / (q_n · Σ_m k_m + ε); the
DC-AE writes the same sums as (v kᵀ) q / ((Σ k) · q + ε), transposed. The first kernel reduces the keys and values
of a slice of tokens to a float32 D×D state and key sum (bf16 products on tensor cores, float32 sums; float32 inputs
multiply in full float32, not TF32; the slices' partial states are added atomically); the second applies the state
to each query tile and writes the output in the input's dtype as (B, N, heads·D) tokens. Atomic float32 adds land in
any order, so on a GPU the last bits of an output can differ between two runs of the same edit.

The kernels read each head at an explicit stride, so one pair serves both layouts: the DiT's three (B, N, heads·D)
projections (:func:`linear_attention`), and the DC-AE's one channels-last map of heads of 3·D channels, q, k and v
at offsets 0, D and 2D (:func:`multiscale_linear_attention`). The plain paths make float32 copies of the
projections (the DC-AE's of its whole qkv map), transpose them per head and run the products on non-tensor-core
kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...models.attention import EPS
from ...models.dcae import ATTENTION_EPS

BLOCK_N = 64  # tokens per tile
MIN_DIM = 16  # tl.dot's smallest operand side; smaller head sizes are padded (masked) up to it


@triton.jit
def _state_kernel(
    k_ptr, v_ptr, kv_ptr, ksum_ptr, length, heads, dim, stride_b, stride_n, stride_h, tokens_per_program,
    block_n: tl.constexpr, block_d: tl.constexpr, precision: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    part = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    d = tl.arange(0, block_d)
    base = batch * stride_b + head * stride_h
    kv = tl.zeros((block_d, block_d), dtype=tl.float32)
    ksum = tl.zeros((block_d,), dtype=tl.float32)
    start = part * tokens_per_program
    for offset in range(0, tokens_per_program, block_n):
        n = start + offset + tl.arange(0, block_n)
        mask = (n[:, None] < length) & (d[None, :] < dim)
        index = base + n[:, None] * stride_n + d[None, :]
        k = tl.load(k_ptr + index, mask=mask, other=0.0)
        v = tl.load(v_ptr + index, mask=mask, other=0.0)
        k_relu = tl.maximum(k.to(tl.float32), 0.0)
        kv += tl.dot(tl.trans(k_relu.to(k.dtype)), v, input_precision=precision)  # exact: ReLU keeps bf16 values
        ksum += tl.sum(k_relu, axis=0)
    state = bh * block_d * block_d + d[:, None] * block_d + d[None, :]
    tl.atomic_add(kv_ptr + state, kv)
    tl.atomic_add(ksum_ptr + bh * block_d + d, ksum)


@triton.jit
def _apply_kernel(
    q_ptr, kv_ptr, ksum_ptr, out_ptr, length, heads, dim, stride_b, stride_n, stride_h,
    out_stride_b, out_stride_n, out_stride_h, eps,
    block_n: tl.constexpr, block_d: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    batch, head = bh // heads, bh % heads
    n = tl.program_id(1) * block_n + tl.arange(0, block_n)
    d = tl.arange(0, block_d)
    mask = (n[:, None] < length) & (d[None, :] < dim)
    index = batch * stride_b + head * stride_h + n[:, None] * stride_n + d[None, :]
    q = tl.maximum(tl.load(q_ptr + index, mask=mask, other=0.0).to(tl.float32), 0.0)
    kv = tl.load(kv_ptr + bh * block_d * block_d + d[:, None] * block_d + d[None, :])
    ksum = tl.load(ksum_ptr + bh * block_d + d)
    numerator = tl.dot(q, kv, input_precision="ieee")  # float32 throughout, like the reference
    denominator = tl.sum(q * ksum[None, :], axis=1)
    out = numerator / (denominator[:, None] + eps)
    target = batch * out_stride_b + head * out_stride_h + n[:, None] * out_stride_n + d[None, :]
    tl.store(out_ptr + target, out.to(out_ptr.dtype.element_ty), mask=mask)


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, dim: int, head_stride: int, eps: float
) -> torch.Tensor:
    """The attention of ``heads`` heads of ``dim`` channels, head h's channel d at ``h·head_stride + d`` of the last
    dimension of (B, N, ·) views that share their strides (they may be offsets into one tensor); (B, N, heads·D)."""
    batch, length = query.shape[:2]
    block_d = max(MIN_DIM, triton.next_power_of_2(dim))
    kv = torch.zeros(batch * heads, block_d, block_d, device=query.device, dtype=torch.float32)
    ksum = torch.zeros(batch * heads, block_d, device=query.device, dtype=torch.float32)
    tiles = triton.cdiv(length, BLOCK_N)
    parts = min(tiles, max(1, 256 // (batch * heads)))  # enough programs to fill the device at small batch
    tokens_per_program = triton.cdiv(tiles, parts) * BLOCK_N
    parts = triton.cdiv(length, tokens_per_program)
    strides = (query.stride(0), query.stride(1), head_stride)
    _state_kernel[(batch * heads, parts)](
        key, value, kv, ksum, length, heads, dim, *strides, tokens_per_program,
        block_n=BLOCK_N, block_d=block_d, precision="ieee" if query.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    out = torch.empty(batch, length, heads * dim, device=query.device, dtype=query.dtype)
    _apply_kernel[(batch * heads, tiles)](
        query, kv, ksum, out, length, heads, dim, *strides, out.stride(0), out.stride(1), dim, eps,
        block_n=BLOCK_N, block_d=block_d,
    )  # fmt: skip
    return out


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """ReLU linear attention of (B, N, heads·D) projections; (B, N, heads·D) in their dtype, float32 inside."""
    dim = query.shape[2] // heads
    query, key, value = (x.contiguous() for x in (query, key, value))
    return _attend(query, key, value, heads, dim, dim, EPS)


def multiscale_linear_attention(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The DC-AE's ReLU linear attention of a (B, heads·3D, H, W) map of (q, k, v) heads (channels q at 0, k at D,
    v at 2D of each head's 3D), read where it lies (channels-last: no copy); (B, H, W, heads·D) tokens, its dtype.
    """
    batch, channels, height, width = qkv.shape
    tokens = qkv.permute(0, 2, 3, 1).contiguous().view(batch, height * width, channels)  # a view when channels-last
    query, key, value = (tokens[:, :, i * head_dim :] for i in range(3))
    heads = channels // (3 * head_dim)
    out = _attend(query, key, value, heads, head_dim, 3 * head_dim, ATTENTION_EPS)
    return out.view(batch, height, width, heads * head_dim)
