"""The VIBE transformer built on diffusers' ``SanaTransformer2DModel``, as the published class is.

It writes the tiny checkpoints (so their layout comes from the library, not from our model) and is the independent
reference that tests compare :class:`~compactedit_cli.models.transformer.VibeEditingTransformer` against. Imported
only there: the edit path never imports diffusers for the DiT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import SanaTransformer2DModel
from torch import nn

from ..models.connector import MetaConnector
from ..models.transformer import EditHeadSpec


class ReferenceVibeTransformer(SanaTransformer2DModel):
    """diffusers' Sana DiT with ``meta_queries`` and ``edit_head`` registered beside it (the published key names)."""

    def __init__(self, sana_config: dict[str, Any], head: EditHeadSpec) -> None:
        super().__init__(**sana_config)
        self.meta_queries = nn.Parameter(torch.empty(head.num_meta_queries, head.meta_queries_dim))
        self.edit_head = MetaConnector(
            input_dim=head.input_dim,
            hidden_dim=head.hidden_dim,
            output_dim=sana_config["caption_channels"],
            depth=head.depth,
        )


def load_reference(folder: Path) -> ReferenceVibeTransformer:
    """A checkpoint's ``transformer/`` folder loaded into the reference, with the config our loader resolves."""
    from safetensors.torch import load_file

    from ..loading.checkpoint import build_transformer

    ours, files = build_transformer(folder)
    reference = ReferenceVibeTransformer(ours.config.to_dict(), ours.head_spec)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    reference.load_state_dict(state, strict=True)
    return reference.eval().requires_grad_(False)
