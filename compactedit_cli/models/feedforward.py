"""Sana's GLUMBConv feed-forward over tokens, with the published parameter names and shapes.

The block's tokens (B, H·W, C) are viewed as (B, H, W, C): the two 1×1 convolutions run as matrix products over
that memory (the same sums over the same weights as the convolutions, in faster kernels: BENCHMARKS.md), and only
the 3×3 depthwise convolution runs as a convolution, on the channels-last view it is given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (activations (B, H, W, 2C) channels-last, depthwise weight (2C, 1, 3, 3), bias (2C,) or None) -> (B, H, W, C)
DepthwiseGLU = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def depthwise_glu(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3×3 depthwise convolution, then the first half of the channels gated by SiLU of the second half."""
    hidden = F.conv2d(hidden.permute(0, 3, 1, 2), weight, bias, padding=1, groups=weight.shape[0])
    hidden, gate = hidden.chunk(2, dim=1)
    return (hidden * F.silu(gate)).permute(0, 2, 3, 1)


def pointwise(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution of channels-last ``tokens`` (B, H, W, C_in).

    A plain convolution runs as a matrix product; a module standing in for one that takes tokens
    (:class:`~compactedit_cli.speed.quantize.Fp8Linear`, marked ``takes_tokens``) is called on them; any other
    wrapper (peft's LoRA layer in training) is called as the convolution it wraps, on the channels-first view.
    """
    if type(layer) is nn.Conv2d:
        return F.linear(tokens, layer.weight.flatten(1), layer.bias)
    if getattr(layer, "takes_tokens", False):
        return layer(tokens)
    return layer(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GLUMBConv(nn.Module):
    """conv_point(depthwise-GLU(silu(conv_inverted(x)))) on (B, H, W, C) tokens; Sana's blocks use it without norm
    or residual. ``gated_depthwise`` is :func:`depthwise_glu`, or a fused kernel that :func:`use_depthwise_glu`
    installs."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.gated_depthwise: DepthwiseGLU = depthwise_glu
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(pointwise(self.conv_inverted, tokens))
        hidden = self.gated_depthwise(hidden, self.conv_depth.weight, self.conv_depth.bias)
        return pointwise(self.conv_point, hidden)


def use_depthwise_glu(module: nn.Module, core: DepthwiseGLU = depthwise_glu) -> None:
    """Every :class:`GLUMBConv` in ``module`` runs its gated depthwise convolution with ``core`` from now on."""
    for child in module.modules():
        if isinstance(child, GLUMBConv):
            child.gated_depthwise = core
