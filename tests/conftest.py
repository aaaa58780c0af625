"""Shared fixtures: the parity fixtures beside the project, and tiny checkpoints built per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Tests never touch the network: every model comes from a local folder or a fake HF cache.
os.environ["HF_HUB_OFFLINE"] = "1"
# No test edits through a server it did not start: the ones that test --server auto unset this.
os.environ["COMPACTEDIT_SERVER"] = "never"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Without CUDA, Triton's kernels (tests/test_kernels.py) run in its interpreter, which Triton chooses when
# triton.language is first imported (diffusers' imports do that): so here, before any test module's imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPACTEDIT_SHARED", PROJECT.parent / "shared"))
PARITY = SHARED / "parity"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """``../shared/parity``; tests that need it skip, saying why, in a plain public clone."""
    if not (PARITY / "manifest.json").is_file():
        pytest.skip(f"parity fixtures not found at {PARITY} (they live beside the project, not in the repo)")
    return PARITY


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the published layout (4.57 processor files, as the real one ships)."""
    from compactedit_cli.random_weights.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint):
    """The tiny checkpoint loaded on the CPU in float32, through the same loader as a real checkpoint."""
    import torch

    from compactedit_cli.engine.pipeline import EditPipeline

    return EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache for this test (env and the already-imported hub constants)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def cached_model(hf_cache, tiny_checkpoint) -> str:
    """The tiny checkpoint installed in the test's HF cache as ``acme/tiny-vibe``."""
    from compactedit_cli.random_weights.tiny import install_in_hf_cache

    install_in_hf_cache(tiny_checkpoint, hf_cache, "acme/tiny-vibe", "1" * 40)
    return "acme/tiny-vibe"


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    """Never read or write the developer's own compactedit config."""
    monkeypatch.setenv("COMPACTEDIT_HOME", str(tmp_path / "compactedit-home"))


class Invoke:
    """Runs the real CLI in-process (Typer's CliRunner): stdout and stderr kept apart."""

    def __init__(self) -> None:
        from typer.testing import CliRunner

        self.runner = CliRunner()

    def __call__(self, *args: str, input: bytes | str | None = None, env: dict | None = None):
        from compactedit_cli.cli import app

        return self.runner.invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


@pytest.fixture
def cli() -> Invoke:
    return Invoke()


def make_photo(path: Path, size: tuple[int, int] = (100, 75), seed: int = 0, mode: str = "RGB") -> Path:
    """A noisy test photo (noise, so edits and resizes are not trivially constant)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)
    return path


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op torch thread, for the long tests: the tiny model's ops are too small to share, and on a busy
    machine two threads spin (three times slower). Results do not depend on it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield
