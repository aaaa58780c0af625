"""Sana's GLUMBConv feed-forward with its two 1×1 convolutions run as matrix products over tokens.

Sana's block hands its feed-forward the tokens (B, H·W, C) as a (B, C, H, W) view, which is channels-last in memory,
and the 1×1 convolutions then go through cuDNN's convolution kernels. As plain matrix products over the same memory
they are the same sums over the same weights, in faster kernels (BENCHMARKS.md). The 3×3 depthwise convolution stays
a convolution, in the channels-last layout it is given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.transformers.sana_transformer import GLUMBConv
from torch import nn

from .swap import swap_classes

# (activations (B, H, W, 2C) channels-last, depthwise weight (2C, 1, 3, 3), bias (2C,) or None) -> (B, H, W, C)
DepthwiseGLU = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def depthwise_glu(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3×3 depthwise convolution, then the first half of the channels gated by SiLU of the second half."""
    hidden = F.conv2d(hidden.permute(0, 3, 1, 2), weight, bias, padding=1, groups=weight.shape[0])
    hidden, gate = hidden.chunk(2, dim=1)
    return (hidden * F.silu(gate)).permute(0, 2, 3, 1)


def pointwise(conv: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution of channels-last ``tokens`` (…, C_in) as a matrix product; a module standing in for one
    (:class:`~compactedit_cli.speed.quantize.Fp8Linear`) is called on the tokens."""
    if isinstance(conv, nn.Conv2d):
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)
    return conv(tokens)


class TokenGLUMBConv(GLUMBConv):
    """``GLUMBConv`` for Sana's blocks (no norm, no residual): same weights, same maths, fewer layout changes.

    ``gated_depthwise`` is :func:`depthwise_glu`, or a fused kernel that
    :meth:`~compactedit_cli.speed.plan.SpeedPlan.set_kernels` installs with :func:`use_depthwise_glu`.
    """

    gated_depthwise: DepthwiseGLU = staticmethod(depthwise_glu)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.norm_type is not None or self.residual_connection:
            return super().forward(hidden_states)
        tokens = hidden_states.permute(0, 2, 3, 1)  # (B, H, W, C): contiguous when the block hands its usual view
        hidden = self.nonlinearity(pointwise(self.conv_inverted, tokens))
        hidden = self.gated_depthwise(hidden, self.conv_depth.weight, self.conv_depth.bias)
        out = pointwise(self.conv_point, hidden)
        return out.permute(0, 3, 1, 2)  # (B, C, H, W) over channels-last memory: the block flattens it for free


def use_token_feed_forward(module: nn.Module, enabled: bool = True) -> None:
    """Switch every ``GLUMBConv`` in ``module`` to :class:`TokenGLUMBConv` (or back); weights are untouched."""
    swap_classes(module, GLUMBConv, TokenGLUMBConv, enabled)


def use_depthwise_glu(module: nn.Module, core: DepthwiseGLU = depthwise_glu) -> None:
    """Every :class:`TokenGLUMBConv` in ``module`` runs its gated depthwise convolution with ``core`` from now on."""
    for child in module.modules():
        if isinstance(child, TokenGLUMBConv):
            child.gated_depthwise = core
