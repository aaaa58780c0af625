"""The edit head (MetaConnector): VLM meta-token states -> cross-attention context of the DiT.

Parameter names follow the published state dict (``edit_head.*``), so the checkpoint loads as is. The attention
keeps ``nn.MultiheadAttention``'s packed ``in_proj_weight`` layout but runs through SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A constant of the architecture, not a config field: the reference builds every MetaConnector with 16 heads.
EDIT_HEAD_NUM_HEADS = 16


class PackedSelfAttention(nn.Module):
    """Unmasked multi-head self-attention with a packed QKV projection (the MultiheadAttention layout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"edit head width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class GatedMLP(nn.Module):
    """fc2(silu(fc1(x)) * fc3(x)), four times wider inside."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.fc3 = nn.Linear(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class ConnectorBlock(nn.Module):
    """Pre-norm residual block: self-attention, then the gated MLP (LayerNorm eps is PyTorch's 1e-5)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(dim)
        self.attn = PackedSelfAttention(dim, num_heads)
        self.output_norm = nn.LayerNorm(dim)
        self.mlp = GatedMLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.output_norm(x))


class MetaConnector(nn.Module):
    """Meta-token states plus the learned queries -> ``output_dim``-wide context tokens."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, depth: int, num_heads: int = EDIT_HEAD_NUM_HEADS
    ) -> None:
        super().__init__()
        self.input_proj = nn.Linear(input_dim, hidden_dim)
        self.attn_blocks = nn.ModuleList(ConnectorBlock(hidden_dim, num_heads) for _ in range(depth))
        self.output_proj = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, output_dim))

    def forward(self, states: torch.Tensor, meta_queries: torch.Tensor) -> torch.Tensor:
        """``states`` (B, N, input_dim); the (N, input_dim) queries are added again here, as in training."""
        x = self.input_proj(states + meta_queries)
        for block in self.attn_blocks:
            x = block(x)
        return self.output_proj(x)
