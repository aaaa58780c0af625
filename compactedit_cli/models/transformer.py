"""The VIBE editing transformer: Sana's DiT plus the learned meta queries and the edit head, in plain torch.

The published class (``VIBESanaEditingModel``) is a diffusers ``SanaTransformer2DModel`` subclass; in its
``channel_cat`` mode the forward pass is Sana's with the source latents concatenated on channels. This module computes
that forward with the same parameter names and shapes, so the published state dict loads as is, without importing
diffusers. The context is made ready once per edit (:meth:`VibeEditingTransformer.project_context`, then every
block's cross-attention keys and values, :meth:`VibeEditingTransformer.context_keys_values`), since it is the same at
every denoising step; :meth:`VibeEditingTransformer.forward` does all of it per call (training, tests).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttention, LinearSelfAttention
from .connector import MetaConnector
from .feedforward import GLUMBConv
from .norm import RMSNorm

TIMESTEP_CHANNELS = 256  # the sinusoidal timestep embedding's width (PixArt / Sana)
CAPTION_NORM_EPS = 1e-5
OUTPUT_NORM_EPS = 1e-6

# Context: either projected tokens (B, S, D) or every block's stacked cross-attention (keys, values).
Context = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
# (stream, update or None, gate or None, scale, shift, norm weight, norm bias, eps) -> (new stream, modulated norm)
NormModulate = Callable[
    [
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor | None,
        float,
    ],
    tuple[torch.Tensor, torch.Tensor],
]
# (stream, update, gate or None) -> the new stream
GatedResidual = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class SanaConfig:
    """``SanaTransformer2DModel``'s config fields, with its defaults. :meth:`check` refuses what is not implemented."""

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 32  # only sizes the position embedding, which needs interpolation_scale
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1  # read only with guidance_embeds
    qk_norm: str | None = None
    timestep_scale: float = 1.0  # the caller scales timesteps by it; the model itself never reads it

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels_out(self) -> int:
        return self.out_channels or self.in_channels

    def check(self) -> None:
        """ValueError naming the first field whose value this module does not implement."""
        if self.interpolation_scale is not None:
            raise ValueError(
                f"interpolation_scale {self.interpolation_scale!r}: Sana's sin-cos position embedding is not "
                "implemented (VIBE uses none: null)"
            )
        if self.guidance_embeds:
            raise ValueError("guidance_embeds true: the guidance embedding is not supported by the VIBE pipeline")
        if None in (self.cross_attention_dim, self.num_cross_attention_heads, self.cross_attention_head_dim):
            raise ValueError("a Sana block without cross-attention (cross_attention_dim null) is not supported")
        if self.cross_attention_dim != self.inner_dim:
            raise ValueError(
                f"cross_attention_dim {self.cross_attention_dim} differs from the model width {self.inner_dim} "
                "(num_attention_heads x attention_head_dim): Sana's cross-attention reads the caption projected to "
                "that width, so this model cannot run"
            )
        if self.patch_size < 1 or self.num_layers < 0 or self.inner_dim < 1:
            raise ValueError("patch_size, num_attention_heads and attention_head_dim must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def timestep_embedding(timestep: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps in float32, cosines first (diffusers' ``flip_sin_to_cos``)."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedding(nn.Module):
    """linear_2(act(linear_1(x))): the timestep embedder (SiLU) and the caption projection (tanh GELU)."""

    def __init__(self, in_dim: int, dim: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class _TimestepEmbedder(nn.Module):
    """Holds ``timestep_embedder`` under the published name ``time_embed.emb``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedding(TIMESTEP_CHANNELS, dim, nn.SiLU())


class TimeEmbedding(nn.Module):
    """PixArt's adaLN-single: the timestep embedding, and from it the six modulation vectors of every block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.emb = _TimestepEmbedder(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(modulation (B, 6·D), embedded timestep (B, D)); the sinusoids are cast to ``dtype`` first."""
        embedded = self.emb.timestep_embedder(timestep_embedding(timestep).to(dtype))
        return self.linear(F.silu(embedded)), embedded


class PatchEmbed(nn.Module):
    """p x p patches to tokens with one strided convolution (no position embedding: ``interpolation_scale`` null)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + gate * update`` (``x + update`` without a gate): the block's residual adds; the plain path."""
    return x + (update if gate is None else gate * update)


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
    """(stream, modulated norm): the update (if any) added to the stream by :func:`gated_residual`, then adaLN's
    ``layer_norm(stream) * (1 + scale) + shift``; the plain path. A fused kernel (installed by
    :func:`use_norm_modulate`) writes both in the stream's dtype, as these ops do when the modulation shares it."""
    if update is not None:
        x = gated_residual(x, update, gate)
    return x, F.layer_norm(x, x.shape[-1:], weight, bias, eps) * (1 + scale) + shift


class SanaBlock(nn.Module):
    """Sana's transformer block: modulated linear self-attention, cross-attention, modulated GLUMBConv.

    ``norm_modulate`` and ``gated_residual`` compute the norms with their modulation and the residual adds:
    :func:`norm_modulate` and :func:`gated_residual`, or a fused kernel that :func:`use_norm_modulate` installs
    (the cross-attention's residual is folded into norm2)."""

    def __init__(self, config: SanaConfig) -> None:
        super().__init__()
        dim = config.inner_dim
        self.norm_modulate: NormModulate = norm_modulate
        self.gated_residual: GatedResidual = gated_residual
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.attn1 = LinearSelfAttention(
            dim,
            config.num_attention_heads,
            config.attention_head_dim,
            bias=config.attention_bias,
            qk_norm_form=config.qk_norm,
            dropout=config.dropout,
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=config.norm_elementwise_affine, eps=config.norm_eps)
        self.attn2 = CrossAttention(
            dim,
            config.cross_attention_dim,
            config.num_cross_attention_heads,
            config.cross_attention_head_dim,
            qk_norm_form=config.qk_norm,
            dropout=config.dropout,
        )
        self.ff = GLUMBConv(dim, config.mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))

    def forward(
        self, x: torch.Tensor, context: Context, modulation: torch.Tensor, rows: int, cols: int
    ) -> torch.Tensor:
        batch = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + modulation.reshape(batch, 6, -1)
        ).chunk(6, dim=1)
        norm1, norm2 = self.norm1, self.norm2
        _, normed = self.norm_modulate(x, None, None, scale_msa, shift_msa, norm1.weight, norm1.bias, norm1.eps)
        x = self.gated_residual(x, self.attn1(normed.to(x.dtype)), gate_msa)
        x, normed = self.norm_modulate(
            x, self.attn2(x, context), None, scale_mlp, shift_mlp, norm2.weight, norm2.bias, norm2.eps
        )
        out = self.ff(normed.unflatten(1, (rows, cols)))
        return self.gated_residual(x, out.flatten(1, 2), gate_mlp)


def use_norm_modulate(
    module: nn.Module, core: NormModulate = norm_modulate, residual: GatedResidual = gated_residual
) -> None:
    """Every :class:`SanaBlock` in ``module`` computes its modulated norms with ``core`` and its gated residual adds
    with ``residual`` from now on."""
    for child in module.modules():
        if isinstance(child, SanaBlock):
            child.norm_modulate = core
            child.gated_residual = residual


@dataclass(frozen=True)
class EditHeadSpec:
    """Sizes of the VIBE additions, from the config plus the one width that only the weights record."""

    num_meta_queries: int
    meta_queries_dim: int
    input_dim: int
    hidden_dim: int
    depth: int


class VibeEditingTransformer(nn.Module):
    """Sana's DiT (``config``) with ``meta_queries`` (N, D) and ``edit_head`` (a MetaConnector) beside it."""

    def __init__(self, config: SanaConfig, head: EditHeadSpec, *, cfg_distilled: bool = False) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.head_spec = head
        self.cfg_distilled = cfg_distilled
        self.gradient_checkpointing = False
        dim, p = config.inner_dim, config.patch_size
        self.patch_embed = PatchEmbed(config.in_channels, dim, p)
        self.time_embed = TimeEmbedding(dim)
        self.caption_projection = MLPEmbedding(config.caption_channels, dim, nn.GELU(approximate="tanh"))
        self.caption_norm = RMSNorm(dim, eps=CAPTION_NORM_EPS, elementwise_affine=True)
        self.transformer_blocks = nn.ModuleList(SanaBlock(config) for _ in range(config.num_layers))
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim))
        self.proj_out = nn.Linear(dim, p * p * config.latent_channels_out)
        self.meta_queries = nn.Parameter(torch.empty(head.num_meta_queries, head.meta_queries_dim))
        self.edit_head = MetaConnector(
            input_dim=head.input_dim, hidden_dim=head.hidden_dim, output_dim=config.caption_channels, depth=head.depth
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (training)."""
        self.gradient_checkpointing = enabled

    def edit_context(self, meta_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, null) context for VLM meta-token states (B, N, D).

        The null context is the edit head applied to all-zero states (plus the queries), not an empty-prompt VLM pass.
        It does not depend on the input, so it is computed once and broadcast over the batch.
        """
        param = self.meta_queries
        states = meta_states.to(device=param.device, dtype=param.dtype)
        cond = self.edit_head(states, param)
        null = self.edit_head(torch.zeros_like(states[:1]), param)
        return cond, null.expand_as(cond)

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """The blocks' view of a context (caption projection, then RMSNorm); the same at every denoising step."""
        return self.caption_norm(self.caption_projection(context))

    def context_keys_values(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's cross-attention keys and values of a projected context, stacked: (blocks, B, heads, S, D)."""
        pairs = [block.attn2.keys_values(projected) for block in self.transformer_blocks]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor):
        """Sana's forward (no masks, guidance embedding or control): latents (B, C, H, W), context (B, S,
        caption_channels) and (B,) timesteps to the (B, out_channels, H, W) prediction."""
        return self.forward_projected(hidden_states, self.project_context(encoder_hidden_states), timestep)

    def forward_projected(self, hidden_states: torch.Tensor, context: Context, timestep: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on a context made ready once: projected (:meth:`project_context`), or further, as every
        block's keys and values (:meth:`context_keys_values`)."""
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size
        rows, cols = height // p, width // p
        x = self.patch_embed(hidden_states).contiguous()  # every block then sees one layout: one compiled graph
        modulation, embedded = self.time_embed(timestep, x.dtype)
        stepwise = self.gradient_checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.transformer_blocks):
            ready = context if isinstance(context, torch.Tensor) else (context[0][index], context[1][index])
            if stepwise:
                x = checkpoint(block, x, ready, modulation, rows, cols, use_reentrant=False)
            else:
                x = block(x, ready, modulation, rows, cols)
        shift, scale = (self.scale_shift_table[None] + embedded[:, None].to(self.scale_shift_table.device)).chunk(
            2, dim=1
        )
        x = F.layer_norm(x, (x.shape[-1],), eps=OUTPUT_NORM_EPS) * (1 + scale) + shift
        x = self.proj_out(x)
        x = x.reshape(batch, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, -1, rows * p, cols * p)
