"""Whether ``torch.compile`` can run on this machine: a missing piece is reported instead of failing mid-edit."""

from __future__ import annotations

import os
import shutil

import torch


def compile_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``torch.compile(backend=backend)`` cannot run on ``device`` here, or ``None`` when it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python or platform"
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs Triton for CUDA, and it is not installed"
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(name and shutil.which(name) for name in compilers):
        return f"inductor needs a C++ compiler for {device.type}, and none was found (set CXX)"
    return None
