"""The DiT's blocks compiled ahead of time (``compile = "aot"``): a new process runs them with no compiler at all.

The first edit of a size exports one block at that size (``torch.export``) and compiles it with AOTInductor into a
package in the compile cache. Every later edit of that size, in this process or any other, loads the package with
torch's C++ loader in milliseconds and runs it: no Dynamo tracing, no inductor import, no cache lookups. A package
holds code, not weights (``package_constants_in_so`` off): every block runs the one package with its own weights,
handed over by pointer, so LoRA-fused, quantised or offloaded weights need no new package.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..options import compile_cache_dir
from .compiling import compile_unavailable

Key = tuple[Any, ...]


def _signature(args: Sequence[Any]) -> Key:
    """What a package is specialised to: each tensor's shape, dtype and device, and the plain values (rows, cols)."""
    leaves = pytree.tree_leaves(args)
    return tuple((tuple(a.shape), str(a.dtype), str(a.device)) if torch.is_tensor(a) else a for a in leaves)


class _Plain(nn.Module):
    """A block's own forward (its instance carries the packaged one): what is exported, and what runs where no
    package does."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> torch.Tensor:
        return type(self.block).forward(self.block, *args)


def code_digest() -> str:
    """A digest of compactedit's own code: a package is the block's code frozen, so any change to it (a new
    version, an edited checkout) must build new packages. The package's name carries this."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class AotPackages:
    """The packages of one model (``fingerprint``: versions, device, dtype, config, speed options), one per input
    signature, on disk."""

    def __init__(self, fingerprint: str, note: Callable[[str], None]) -> None:
        self.fingerprint = f"{fingerprint}|{code_digest()}"
        self.folder = compile_cache_dir() / "aot"
        self.note = note
        self.built = 0  # packages this process built (the rest it loaded)
        self._failed: set[Key] = set()

    def path(self, key: Key) -> Path:
        return self.folder / f"{hashlib.sha256(f'{self.fingerprint}|{key}'.encode()).hexdigest()[:32]}.pt2"

    def fail(self, key: Key, why: str) -> None:
        """``key`` runs the plain blocks from now on, said once for all of them."""
        self._failed.add(key)
        self.note(why)

    def loader(self, key: Key, block: _Plain, args: Sequence[Any]) -> Any | None:
        """A fresh loader of ``key``'s package, built first where none is on disk; ``None`` (noted once) where it
        cannot be built here, so that size runs the plain blocks."""
        if key in self._failed:
            return None
        path = self.path(key)
        step = "compile"
        device = next(t for t in pytree.tree_leaves(args) if torch.is_tensor(t)).device
        try:
            if not path.exists():
                self._build(path, block, args, device)
            step = f"load of {path} (delete it to build it again)"
            index = -1 if device.type == "cpu" else (device.index if device.index is not None else 0)
            return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
        except Exception as error:  # export and AOTInductor fail in many ways; each means: this size runs eagerly
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.fail(key, f"ahead-of-time {step} failed, so this size runs eagerly: {first[:200]}")
            return None

    def _build(self, path: Path, block: _Plain, args: Sequence[Any], device: torch.device) -> None:
        import torch._inductor

        reason = compile_unavailable("inductor", device)  # the same needs as inductor's: Triton, a C++ compiler
        if reason is not None:
            raise RuntimeError(reason)
        self.folder.mkdir(parents=True, exist_ok=True)  # an unwritable cache fails here, before seconds of compiling
        handle, name = tempfile.mkstemp(dir=self.folder, prefix="partial-", suffix=".pt2")
        os.close(handle)
        temporary = Path(name)
        try:
            with torch.no_grad():
                program = torch.export.export(block, tuple(args), strict=False)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(temporary), inductor_configs={"aot_inductor.package_constants_in_so": False}
            )
            temporary.replace(path)  # whole packages only: another process may be loading this size
        finally:
            temporary.unlink(missing_ok=True)
        self.built += 1


class AotBlock:
    """Stands in for one block's ``forward``: its size's package where there is one, the block's own code where not
    (training, a size that could not be compiled)."""

    def __init__(self, block: nn.Module, packages: AotPackages) -> None:
        self.plain = _Plain(block)
        self.packages = packages
        self._loaded: dict[Key, tuple[Any, dict[str, torch.Tensor]] | None] = {}
        self._pointers: dict[Key, tuple[int, ...]] = {}

    def __call__(self, *args: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.plain(*args)
        key = _signature(args)
        if key not in self._loaded:
            self._loaded[key] = self._load(key, args)
        entry = self._loaded[key]
        if entry is None:
            return self.plain(*args)
        loader, weights = entry
        pointers = tuple(t.data_ptr() for t in weights.values())
        if self._pointers.get(key) != pointers:  # first call, or the weights moved (offload): hand them over again
            loader.load_constants({name: t.detach() for name, t in weights.items()}, False, True, True)
            self._pointers[key] = pointers
        return loader.boxed_run([a for a in pytree.tree_leaves(args) if torch.is_tensor(a)])[0]

    def _load(self, key: Key, args: Sequence[Any]) -> tuple[Any, dict[str, torch.Tensor]] | None:
        """The loader and, by the package's names, the block's parameters and buffers (the objects themselves, so
        an offloader's moves show in their data pointers)."""
        loader = self.packages.loader(key, self.plain, args)
        if loader is None:
            return None
        mine = self.plain.state_dict(keep_vars=True)  # named as the package names them: "block.…"
        names = loader.get_constant_fqns()
        missing = [name for name in names if name not in mine]
        if missing:
            self.packages.fail(key, f"ahead-of-time package wants constants the block lacks ({missing[0]}); eager")
            return None
        return loader, {name: mine[name] for name in names}


def install(blocks: Sequence[nn.Module], packages: AotPackages) -> None:
    """Each block's calls go through its :class:`AotBlock` (an instance ``forward``, ahead of the class's)."""
    for block in blocks:
        block.forward = AotBlock(block, packages)


def uninstall(blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        if isinstance(block.__dict__.get("forward"), AotBlock):
            del block.forward
