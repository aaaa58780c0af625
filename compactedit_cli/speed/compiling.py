"""``torch.compile`` of the DiT's repeated blocks, its preconditions (a missing piece is reported instead of failing
mid-edit), the persistent cache that lets a new process reuse the graphs an earlier one compiled, and the choice,
per input shape, between the compiled blocks and the eager ones (``--compile auto``)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .. import options
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


class CompileChoice:
    """Per input shape, whether the compiled blocks run (:func:`~compactedit_cli.options.runs_compiled`), and the
    markers that remember, across processes, which shapes this machine has compiled.

    A shape that is not to run compiled runs under torch's ``force_eager`` stance: the compiled blocks run their
    eager code and nothing compiles. A marker (an empty file named by a hash of the model's fingerprint and the
    shape) is written once a shape has run compiled, since compiling it filled the compile cache; ``auto`` then
    counts that shape as warm in a later process. A cache emptied by hand leaves markers that overstate it: that
    shape then compiles once more.
    """

    def __init__(self, mode: str, device: torch.device, fingerprint: str, *, long_run: bool) -> None:
        self.mode = mode
        self.device_type = device.type
        self.long_run = long_run
        self.fingerprint = fingerprint
        self.folder = compile_cache_dir() / "compiled-shapes"
        self._decided: dict[tuple[int, ...], bool] = {}
        self._marked: set[tuple[int, ...]] = set()

    def _marker(self, shape: tuple[int, ...]) -> Path:
        key = hashlib.sha256(f"{self.fingerprint}|{shape}".encode()).hexdigest()[:32]
        return self.folder / key

    def compiled(self, shape: tuple[int, ...]) -> bool:
        """Whether ``shape`` runs compiled (decided once per shape and process)."""
        if shape not in self._decided:
            warm = self.mode == "auto" and self._marker(shape).exists()
            self._decided[shape] = options.runs_compiled(self.mode, self.device_type, long_run=self.long_run, warm=warm)
        return self._decided[shape]

    def context(self, shape: tuple[int, ...]) -> AbstractContextManager[None]:
        """The stance one call of the blocks on ``shape`` runs under."""
        return nullcontext() if self.compiled(shape) else torch.compiler.set_stance("force_eager")

    def ran(self, shape: tuple[int, ...]) -> None:
        """After a compiled call of ``shape``: remember it as warm (best effort: a read-only cache only forgets)."""
        if shape in self._marked or not self.compiled(shape):
            return
        self._marked.add(shape)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._marker(shape).touch()
        except OSError:
            pass


def model_fingerprint(*parts: object) -> str:
    """What makes one compiled graph differ from another, beside the input shape: the versions, the device, the
    dtype, the model's config and the speed options that change the blocks' code."""
    return "|".join([torch.__version__, *(str(part) for part in parts)])
