"""``torch.compile`` of the DiT's repeated blocks, its preconditions (a missing piece is reported instead of failing
mid-edit), and the persistent cache that lets a new process reuse the graphs an earlier one compiled."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

import torch
from torch import nn

from ..options import compile_cache_dir


def compile_blocks(blocks: Iterable[nn.Module], backend: str = "inductor", mode: str | None = None) -> None:
    """Regional compilation: each block compiled in place (``nn.Module.compile``). The blocks share one code
    object, so dynamo compiles one block shape once and every block reuses it: seconds, not minutes."""
    for block in blocks:
        block.compile(backend=backend, mode=mode)


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


def use_compile_cache() -> str:
    """Point inductor's FX-graph and AOT-autograd caches at :func:`~compactedit_cli.options.compile_cache_dir`.

    Must run before the first compile: inductor reads ``TORCHINDUCTOR_CACHE_DIR`` when it first looks a graph up.
    A second process of the same size then loads the compiled kernels instead of generating and building them; only
    dynamo's tracing runs again. Returns the folder.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return str(folder)
