"""Sana's two attentions as plain torch modules, with the published parameter names (``to_q``, ``to_out.0``, ...).

Self-attention is ReLU linear attention, in float32 like diffusers' Sana processor: per head, with ReLU'd queries q_n
and keys k_n, out_n = (q_n · Σ_m k_m v_mᵀ) / (q_n · Σ_m k_m). diffusers computes the denominator by padding the
values with a row of ones (a copy of the whole value tensor); here the key sum is its own small product, so nothing
the size of the values is allocated twice.

Cross-attention is softmax attention (SDPA) over the edit's context. Its keys and values depend on the context alone,
so they are the same at every denoising step: :meth:`CrossAttention.keys_values` computes them once per edit and the
forward takes them ready-made.

Both normalise the whole query and key projections before splitting heads (``qk_norm``), as Sana's processors do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm

EPS = 1e-15  # the reference's guard against an all-zero denominator
QK_NORM_EPS = 1e-5  # diffusers' Attention default, which Sana's blocks keep

# The qk_norm forms implemented: across all heads, or one head wide (which runs only with one head).
QK_NORM_FORMS = ("rms_norm_across_heads", "rms_norm", "layer_norm_across_heads", "layer_norm", "l2")

# (query, key, value, heads) -> output: (B, N, heads·D) projections before the ReLU, the output in their dtype
LinearAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class L2Norm(nn.Module):
    """``qk_norm: l2``: each row scaled to unit length (no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1, eps=QK_NORM_EPS)


def qk_norm(form: str | None, heads: int, head_dim: int) -> nn.Module | None:
    """The query or key norm of a ``heads`` x ``head_dim`` projection for a diffusers ``qk_norm`` value.

    A per-head form is one head wide but applied to the whole projection, so it only runs with one head; anything
    else raises ValueError (the loader turns it into a one-line error naming the file).
    """
    if form is None:
        return None
    if form not in QK_NORM_FORMS:
        raise ValueError(f"qk_norm {form!r} is not supported (one of {', '.join(QK_NORM_FORMS)}, or null)")
    if form == "l2":
        return L2Norm()
    if not form.endswith("_across_heads") and heads != 1:
        raise ValueError(
            f"qk_norm {form!r} normalises one head ({head_dim}) but Sana's attention normalises the whole "
            f"{heads}-head projection before splitting it; this model cannot run"
        )
    width = heads * head_dim
    if form.startswith("rms_norm"):
        return RMSNorm(width, eps=QK_NORM_EPS, elementwise_affine=True)
    return nn.LayerNorm(width, eps=QK_NORM_EPS)


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


class LinearSelfAttention(nn.Module):
    """Sana's self-attention (``attn1``). ``core`` computes the attention from the projections:
    :func:`linear_attention`, or a fused kernel that :func:`use_linear_attention` installs."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, *, bias: bool, qk_norm_form: str | None, dropout: float
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.core: LinearAttention = linear_attention
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.norm_q = qk_norm(qk_norm_form, heads, head_dim)
        self.norm_k = qk_norm(qk_norm_form, heads, head_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.norm_q is not None:
            query = self.norm_q(query)
        if self.norm_k is not None:
            key = self.norm_k(key)
        out = self.to_out[1](self.to_out[0](self.core(query, key, value, self.heads)))
        if x.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class CrossAttention(nn.Module):
    """Sana's cross-attention (``attn2``) over the context, which it takes as tokens or as its ready keys and
    values (:meth:`keys_values`)."""

    def __init__(
        self, dim: int, context_dim: int, heads: int, head_dim: int, *, qk_norm_form: str | None, dropout: float
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.norm_q = qk_norm(qk_norm_form, heads, head_dim)
        self.norm_k = qk_norm(qk_norm_form, heads, head_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values for ``context`` (B, S, C): each (B, heads, S, head_dim), as SDPA takes them."""
        key, value = self.to_k(context), self.to_v(context)
        if self.norm_k is not None:
            key = self.norm_k(key)
        batch = context.shape[0]
        return (
            key.view(batch, -1, self.heads, key.shape[-1] // self.heads).transpose(1, 2),
            value.view(batch, -1, self.heads, value.shape[-1] // self.heads).transpose(1, 2),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        key, value = self.keys_values(context) if isinstance(context, torch.Tensor) else context
        query = self.to_q(x)
        if self.norm_q is not None:
            query = self.norm_q(query)
        batch, length, _ = query.shape
        query = query.view(batch, length, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, length, -1).to(query.dtype)
        return self.to_out[1](self.to_out[0](out))


def use_linear_attention(module: nn.Module, core: LinearAttention = linear_attention) -> None:
    """Every :class:`LinearSelfAttention` in ``module`` computes its attention with ``core`` from now on."""
    for child in module.modules():
        if isinstance(child, LinearSelfAttention):
            child.core = core
