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
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from torch import nn

from .attention import ContextAttnProcessor, LinearAttnProcessor, context_keys_values
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
        """Both attentions through the lean processors of :mod:`.attention` (``True``) or diffusers' reference ones."""
        for block in self.transformer_blocks:
            block.attn1.set_processor(LinearAttnProcessor() if enabled else SanaLinearAttnProcessor2_0())
            block.attn2.set_processor(ContextAttnProcessor() if enabled else SanaAttnProcessor2_0())

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """The blocks' view of a context (caption projection, then RMSNorm), which Sana's forward recomputes per call.

        It is the same at every denoising step, so the fast path computes it once per edit.
        """
        return self.caption_norm(self.caption_projection(context))

    def context_keys_values(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's cross-attention keys and values of a projected context, stacked: (blocks, B, heads, S, D).

        Sana's blocks project them again at every step, though they depend on the context alone.
        """
        pairs = [context_keys_values(block.attn2, projected) for block in self.transformer_blocks]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

    def forward_projected(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        """Sana's forward for what VIBE uses (no masks, guidance embedding or control) on a context made ready once:
        projected (:meth:`project_context`), or further, as every block's keys and values
        (:meth:`context_keys_values`, which needs the lean cross-attention of :meth:`use_lean_attention`).
        """
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size
        rows, cols = height // p, width // p
        x = self.patch_embed(hidden_states).contiguous()  # every block then sees one layout: one compiled graph
        modulation, embedded_timestep = self.time_embed(timestep, batch_size=batch, hidden_dtype=x.dtype)
        for index, block in enumerate(self.transformer_blocks):
            ready = context if isinstance(context, torch.Tensor) else (context[0][index], context[1][index])
            x = block(x, None, ready, None, modulation, rows, cols)
        x = self.proj_out(self.norm_out(x, embedded_timestep, self.scale_shift_table))
        x = x.reshape(batch, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, -1, rows * p, cols * p)
