"""The trainer's settings: defaults, bounds and checks, with no torch (checked before the engine is imported).

Defaults and their sources: rank 16 and alpha = rank (the issue's memory target; alpha = rank makes the update
scale 1, as diffusers' Sana LoRA script does with ``lora_alpha=args.rank``); learning rate 1e-4 and batch size 1
(diffusers' ``train_lora.sh`` for Sana); targets the attention projections and the feed-forward's 1×1 convolutions of
every block (the issue's "attention and feed-forward projections"; diffusers' Sana script targets ``to_k to_q to_v``
alone by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import options
from ..engine.binning import BIN_CLASSES
from ..errors import UsageError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point")
DEFAULT_RANK = 16
DEFAULT_LR = 1e-4
DEFAULT_STEPS = 1000
DEFAULT_VALIDATION_STEPS = 20
VALIDATION_IMAGES = 4  # the first pairs' sources, edited at each validation
MAX_RANK = 1024
MAX_TRAIN_STEPS = 10_000_000


def target_modules(value: Any, name: str = "--target-modules") -> tuple[str, ...]:
    """Comma-separated module names (peft's suffix match: ``to_q`` is every ``….to_q``)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names or any(not all(part.isidentifier() or part.isdigit() for part in n.split(".")) for n in names):
        raise UsageError(f"{name} must be comma-separated module names such as to_q,to_v (got {value!r})")
    return names


def resolution(value: Any, name: str = "--resolution") -> int | None:
    """A bin class (512, 1024, 2048), or ``auto``/``None``: each pair's class by its area, as edits pick it."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    number = options.bounded_int(value, name, 0, max(BIN_CLASSES))
    if number not in BIN_CLASSES:
        raise UsageError(f"{name} must be auto or one of {', '.join(map(str, BIN_CLASSES))} (got {value!r})")
    return number


def checkpoint_path(adapter: Path) -> Path:
    """Where a run's resumable state goes: beside the adapter."""
    return adapter.with_name(adapter.stem + ".checkpoint.safetensors")


def validation_folder(adapter: Path, settings: TrainOptions) -> Path:
    """Where validation edits go: ``--validation-dir``, else ``ADAPTER_validation/`` beside the adapter."""
    return settings.validation_dir or adapter.with_name(adapter.stem + "_validation")


def _positive(value: Any, name: str, high: float = math.inf) -> float:
    number = options.scale(value, name)
    if number is None or not 0 < number <= high:
        limit = "" if high == math.inf else f" and at most {high:g}"
        raise UsageError(f"{name} must be a number above 0{limit} (got {value!r})")
    return number


@dataclass(frozen=True)
class TrainOptions:
    """One training run's settings, checked when made (the Python API fails as the flags do)."""

    rank: int = DEFAULT_RANK
    alpha: float | None = None  # None: the rank
    lr: float = DEFAULT_LR
    steps: int = DEFAULT_STEPS
    batch_size: int = 1
    resolution: int | None = None
    seed: int = options.DEFAULT_SEED
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    cond_dropout: float = 0.05
    gradient_checkpointing: bool = True
    validate_every: int = 0  # 0: no validation edits
    validation_dir: Path | None = None
    validation_steps: int = DEFAULT_VALIDATION_STEPS
    checkpoint_every: int = 0  # 0: a checkpoint at the end only

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "rank", options.bounded_int(self.rank, "--rank", 1, MAX_RANK))
        set_(self, "alpha", float(self.rank) if self.alpha is None else _positive(self.alpha, "--alpha"))
        set_(self, "lr", _positive(self.lr, "--lr", 1.0))
        set_(self, "steps", options.bounded_int(self.steps, "--steps", 1, MAX_TRAIN_STEPS))
        set_(self, "batch_size", options.batch_size(self.batch_size))
        set_(self, "resolution", resolution(self.resolution))
        seed = options.seed(self.seed)
        if seed is None:
            raise UsageError("--seed must be a number for training (a run is reproducible from it)")
        set_(self, "seed", seed)
        set_(self, "target_modules", target_modules(self.target_modules))
        dropout = options.scale(self.cond_dropout, "--cond-dropout")
        if dropout is None or dropout > 1 / 3:
            raise UsageError(f"--cond-dropout must be between 0 and 1/3 (got {self.cond_dropout!r})")
        set_(self, "cond_dropout", dropout)
        set_(self, "validate_every", options.bounded_int(self.validate_every, "--validate-every", 0, MAX_TRAIN_STEPS))
        set_(self, "validation_steps", options.steps(self.validation_steps, "--validation-steps"))
        every = options.bounded_int(self.checkpoint_every, "--checkpoint-every", 0, MAX_TRAIN_STEPS)
        set_(self, "checkpoint_every", every)

    def resumable(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (the rest may change: steps, validation)."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "resolution": self.resolution,
            "seed": self.seed,
            "target_modules": list(self.target_modules),
            "cond_dropout": self.cond_dropout,
        }
