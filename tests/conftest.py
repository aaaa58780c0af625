"""Shared fixtures: the parity fixtures beside the project, and tiny checkpoints built per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: every model comes from a local folder or a fake HF cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

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
    from compactedit_cli.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint):
    """The tiny checkpoint loaded on the CPU in float32, through the same loader as a real checkpoint."""
    import torch

    from compactedit_cli.pipeline import EditPipeline

    return EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)
