"""Sana's GLUMBConv feed-forward with its two 1×1 convolutions run as matrix products over tokens.

Sana's block hands its feed-forward the tokens (B, H·W, C) as a (B, C, H, W) view, which is channels-last in memory,
and the 1×1 convolutions then go through cuDNN's convolution kernels. As plain matrix products over the same memory
they are the same sums over the same weights, in faster kernels (BENCHMARKS.md). The 3×3 depthwise convolution stays
a convolution, in the channels-last layout it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.transformers.sana_transformer import GLUMBConv
from torch import nn

from .swap import swap_classes


class TokenGLUMBConv(GLUMBConv):
    """``GLUMBConv`` for Sana's blocks (no norm, no residual): same weights, same maths, fewer layout changes."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.norm_type is not None or self.residual_connection:
            return super().forward(hidden_states)
        tokens = hidden_states.permute(0, 2, 3, 1)  # (B, H, W, C): contiguous when the block hands its usual view
        hidden = self.nonlinearity(F.linear(tokens, self.conv_inverted.weight.flatten(1), self.conv_inverted.bias))
        hidden = self.conv_depth(hidden.permute(0, 3, 1, 2))
        hidden, gate = hidden.chunk(2, dim=1)
        hidden = (hidden * self.nonlinearity(gate)).permute(0, 2, 3, 1)
        out = F.linear(hidden, self.conv_point.weight.flatten(1))
        return out.permute(0, 3, 1, 2)  # (B, C, H, W) over channels-last memory: the block flattens it for free


def use_token_feed_forward(module: nn.Module, enabled: bool = True) -> None:
    """Switch every ``GLUMBConv`` in ``module`` to :class:`TokenGLUMBConv` (or back); weights are untouched."""
    swap_classes(module, GLUMBConv, TokenGLUMBConv, enabled)
