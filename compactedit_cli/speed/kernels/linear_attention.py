"""Sana's ReLU linear attention as two Triton kernels.

Per batch and head, with ReLU'd queries q_n and keys k_n: out_n = (q_n · Σ_m k_m v_mᵀ) / (q_n · Σ_m k_m + ε). The
first kernel reduces the keys and values of a slice of tokens to a float32 D×D state and key sum (bf16 products on
tensor cores, float32 sums; float32 inputs multiply in full float32, not TF32; the slices' partial states are added
atomically); the second applies the state to each
query tile and writes the output in the input's dtype and (B, N, heads·D) layout. Atomic float32 adds land in any
order, so on a GPU the last bits of an output can differ between two runs of the same edit. The plain path makes float32
copies of the three projections, transposes them per head and runs the products on non-tensor-core kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...models.attention import EPS

BLOCK_N = 64  # tokens per tile
MIN_DIM = 16  # tl.dot's smallest operand side; smaller head sizes are padded (masked) up to it


@triton.jit
def _state_kernel(
    k_ptr, v_ptr, kv_ptr, ksum_ptr, length, heads, dim, stride_b, stride_n, tokens_per_program,
    block_n: tl.constexpr, block_d: tl.constexpr, precision: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    part = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    d = tl.arange(0, block_d)
    base = batch * stride_b + head * dim
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
    q_ptr, kv_ptr, ksum_ptr, out_ptr, length, heads, dim, stride_b, stride_n, eps,
    block_n: tl.constexpr, block_d: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    batch, head = bh // heads, bh % heads
    n = tl.program_id(1) * block_n + tl.arange(0, block_n)
    d = tl.arange(0, block_d)
    mask = (n[:, None] < length) & (d[None, :] < dim)
    index = batch * stride_b + head * dim + n[:, None] * stride_n + d[None, :]
    q = tl.maximum(tl.load(q_ptr + index, mask=mask, other=0.0).to(tl.float32), 0.0)
    kv = tl.load(kv_ptr + bh * block_d * block_d + d[:, None] * block_d + d[None, :])
    ksum = tl.load(ksum_ptr + bh * block_d + d)
    numerator = tl.dot(q, kv, input_precision="ieee")  # float32 throughout, like the reference
    denominator = tl.sum(q * ksum[None, :], axis=1)
    out = numerator / (denominator[:, None] + eps)
    tl.store(out_ptr + index, out.to(out_ptr.dtype.element_ty), mask=mask)


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """ReLU linear attention of (B, N, heads·D) projections; (B, N, heads·D) in their dtype, float32 inside."""
    batch, length, width = query.shape
    dim = width // heads
    block_d = max(MIN_DIM, triton.next_power_of_2(dim))
    query, key, value = (x.contiguous() for x in (query, key, value))
    kv = torch.zeros(batch * heads, block_d, block_d, device=query.device, dtype=torch.float32)
    ksum = torch.zeros(batch * heads, block_d, device=query.device, dtype=torch.float32)
    tiles = triton.cdiv(length, BLOCK_N)
    parts = min(tiles, max(1, 256 // (batch * heads)))  # enough programs to fill the device at small batch
    tokens_per_program = triton.cdiv(tiles, parts) * BLOCK_N
    parts = triton.cdiv(length, tokens_per_program)
    stride_b, stride_n = query.stride(0), query.stride(1)
    _state_kernel[(batch * heads, parts)](
        key, value, kv, ksum, length, heads, dim, stride_b, stride_n, tokens_per_program,
        block_n=BLOCK_N, block_d=block_d, precision="ieee" if query.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    out = torch.empty_like(query)
    _apply_kernel[(batch * heads, tiles)](
        query, kv, ksum, out, length, heads, dim, stride_b, stride_n, EPS, block_n=BLOCK_N, block_d=block_d
    )
    return out
