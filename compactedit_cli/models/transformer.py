"""The VIBE editing transformer: Sana's DiT plus the learned meta queries and the edit head.

The published class (``VIBESanaEditingModel``) is a ``SanaTransformer2DModel`` subclass whose DiT part has Sana's
exact key names; in its ``channel_cat`` mode the forward pass is Sana's with the source latents concatenated on
channels. So the DiT here *is* diffusers' Sana model, and only the two VIBE additions are new.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from torch import nn

from .attention import LinearAttnProcessor
from .connector import MetaConnector


@dataclass(frozen=True)
class EditHeadSpec:
    """Sizes of the VIBE additions, from the config plus the one width that only the weights record."""

    num_meta_queries: int
    meta_queries_dim: int
    input_dim: int
    hidden_dim: int
    depth: int


class VibeEditingTransformer(SanaTransformer2DModel):
    """Sana DiT with ``meta_queries`` (N, D) and ``edit_head`` (MetaConnector) registered beside it."""

    # For diffusers' regional compilation (``compile_repeated_blocks``): compile one block shape, not the model.
    _repeated_blocks = ("SanaTransformerBlock",)

    def __init__(self, sana_config: dict[str, Any], head: EditHeadSpec, *, cfg_distilled: bool = False) -> None:
        super().__init__(**sana_config)
        self.head_spec = head
        self.cfg_distilled = cfg_distilled
        self.meta_queries = nn.Parameter(torch.empty(head.num_meta_queries, head.meta_queries_dim))
        self.edit_head = MetaConnector(
            input_dim=head.input_dim,
            hidden_dim=head.hidden_dim,
            output_dim=sana_config["caption_channels"],
            depth=head.depth,
        )

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

    def use_lean_attention(self, enabled: bool = True) -> None:
        """Self-attention through :class:`LinearAttnProcessor` (``True``) or diffusers' reference processor."""
        for block in self.transformer_blocks:
            block.attn1.set_processor(LinearAttnProcessor() if enabled else SanaLinearAttnProcessor2_0())

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """The blocks' view of a context (caption projection, then RMSNorm), which Sana's forward recomputes per call.

        It is the same at every denoising step, so the pipeline computes it once per edit.
        """
        return self.caption_norm(self.caption_projection(context))

    def forward_projected(
        self, hidden_states: torch.Tensor, projected_context: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """Sana's forward for what VIBE uses (no masks, guidance embedding or control), on a projected context."""
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size
        rows, cols = height // p, width // p
        x = self.patch_embed(hidden_states).contiguous()  # every block then sees one layout: one compiled graph
        modulation, embedded_timestep = self.time_embed(timestep, batch_size=batch, hidden_dtype=x.dtype)
        for block in self.transformer_blocks:
            x = block(x, None, projected_context, None, modulation, rows, cols)
        x = self.proj_out(self.norm_out(x, embedded_timestep, self.scale_shift_table))
        x = x.reshape(batch, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, -1, rows * p, cols * p)
