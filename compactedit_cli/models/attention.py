"""A leaner processor for Sana's ReLU linear self-attention, with the reference's fp32 accumulation.

Per head, with ReLU'd queries q_n and keys k_n: out_n = (q_n · Σ_m k_m v_mᵀ) / (q_n · Σ_m k_m). diffusers computes
the denominator by padding the values with a row of ones (a copy of the whole value tensor) and slicing it off
again; here the key sum is its own small product, so nothing the size of the values is allocated twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-15  # the reference's guard against an all-zero denominator


class LinearAttnProcessor:
    """Drop-in for ``SanaLinearAttnProcessor2_0`` (self-attention, no mask): same maths, fewer copies."""

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
        batch, length, _ = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, H·D) -> (B, H, N, D), in fp32 like the reference
            return x.float().view(batch, x.shape[1], attn.heads, -1).transpose(1, 2)

        query, key, value = heads(F.relu(query)), heads(F.relu(key)), heads(value)
        numerator = query @ (key.transpose(-1, -2) @ value)  # (B, H, N, D)
        denominator = query @ key.sum(dim=2).unsqueeze(-1)  # (B, H, N, 1)
        out = (numerator / (denominator + EPS)).transpose(1, 2).reshape(batch, length, -1).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out
