"""Device and dtype names made into torch objects, checked against what this machine has."""

from __future__ import annotations

import torch

from .. import options
from ..errors import UsageError


def default_device() -> torch.device:
    """CUDA when present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what the weights were trained and shipped in), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(name: str) -> torch.device:
    """A device that exists on this machine; ``auto`` picks :func:`default_device`."""
    name = options.device(name)
    if name == "auto":
        return default_device()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("CUDA was requested but no CUDA GPU is available")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"{name} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("MPS was requested but is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a dtype spelling; ``auto`` is the device's default."""
    attribute = options.torch_dtype_name(name)
    return default_dtype(device) if attribute is None else getattr(torch, attribute)
