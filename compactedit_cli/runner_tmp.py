"""Temporary: what the bench still imports from the old CLI glue (goes with the speed interface)."""

from __future__ import annotations

import warnings
from collections.abc import Callable


def quietly(switch: Callable[[], str]) -> str:
    """Run a speed switch whose reason for not applying comes back as its message: said once, in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return switch()
