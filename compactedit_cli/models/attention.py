"""Leaner processors for Sana's two attentions, same maths as diffusers'.

Self-attention (ReLU linear attention, in fp32 like the reference): per head, with ReLU'd queries q_n and keys k_n,
out_n = (q_n · Σ_m k_m v_mᵀ) / (q_n · Σ_m k_m). diffusers computes the denominator by padding the values with a row
of ones (a copy of the whole value tensor) and slicing it off again; here the key sum is its own small product, so
nothing the size of the values is allocated twice.

Cross-attention (softmax, SDPA): its keys and values come from the edit's context alone, so the same at every
step; :func:`context_keys_values` computes them once per edit and the processor takes them ready-made.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-15  # the reference's guard against an all-zero denominator

# (query, key, value, heads) -> output: (B, N, heads·D) projections before the ReLU, the output in their dtype
LinearAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """ReLU linear attention of (B, N, heads·D) projections, in float32 like the reference; the plain path."""
    dtype = query.dtype
    batch, length, _ = query.shape

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, H·D) -> (B, H, N, D), in fp32 like the reference
        return x.float().view(batch, x.shape[1], heads, -1).transpose(1, 2)

    query, key, value = split(F.relu(query)), split(F.relu(key)), split(value)
    numerator = query @ (key.transpose(-1, -2) @ value)  # (B, H, N, D)
    denominator = query @ key.sum(dim=2).unsqueeze(-1)  # (B, H, N, 1)
    return (numerator / (denominator + EPS)).transpose(1, 2).reshape(batch, length, -1).to(dtype)


class LinearAttnProcessor:
    """Drop-in for ``SanaLinearAttnProcessor2_0`` (self-attention, no mask): same maths, fewer copies.

    ``core`` computes the attention from the projections: :func:`linear_attention`, or a fused kernel that
    :meth:`~compactedit_cli.speed.plan.SpeedPlan.set_kernels` installs with :func:`use_linear_attention`.
    """

    def __init__(self, core: LinearAttention = linear_attention) -> None:
        self.core = core

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = attn.to_out[1](attn.to_out[0](self.core(query, key, value, attn.heads)))
        if dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


def context_keys_values(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention's keys and values for ``context`` (B, S, C): each (B, heads, S, head_dim), for SDPA."""
    key, value = attn.to_k(context), attn.to_v(context)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    batch = context.shape[0]
    return (
        key.view(batch, -1, attn.heads, key.shape[-1] // attn.heads).transpose(1, 2),
        value.view(batch, -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2),
    )


class ContextAttnProcessor:
    """Drop-in for ``SanaAttnProcessor2_0`` (no mask) that also takes the context as precomputed (keys, values)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("ContextAttnProcessor takes no attention mask (VIBE's context has none)")
        if isinstance(encoder_hidden_states, torch.Tensor):
            encoder_hidden_states = context_keys_values(attn, encoder_hidden_states)
        key, value = encoder_hidden_states
        query = attn.to_q(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        batch, length, _ = query.shape
        query = query.view(batch, length, attn.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, length, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor


def use_linear_attention(module: nn.Module, core: LinearAttention = linear_attention) -> None:
    """Every :class:`LinearAttnProcessor` in ``module`` computes its attention with ``core`` from now on."""
    for child in module.modules():
        processor = getattr(child, "processor", None)
        if isinstance(processor, LinearAttnProcessor):
            processor.core = core
