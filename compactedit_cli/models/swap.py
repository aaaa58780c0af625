"""Switching modules to a lean subclass in place: the weights, hooks and state dict stay as they are."""

from __future__ import annotations

from torch import nn


def swap_classes(module: nn.Module, base: type[nn.Module], lean: type[nn.Module], enabled: bool = True) -> None:
    """Every ``base`` in ``module`` becomes a ``lean`` (``enabled``) or a ``base`` again; ``lean`` adds no state."""
    for child in module.modules():
        if isinstance(child, base):
            child.__class__ = lean if enabled else base
