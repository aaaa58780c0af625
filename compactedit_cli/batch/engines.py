"""Which engine runs a planned batch, once per set of LoRA adapters its items ask for.

One device in this process (or through a running server), worker processes on several devices, or a Ray cluster:
each takes the same items, results log and output options, and returns a
:class:`~compactedit_cli.batch.run.BatchSummary`. Items whose manifest line names other adapters than the run's
form a group of their own, edited by a model with those adapters fused (one load per group).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..options import ModelOptions, OutputOptions
from .plan import BatchItem
from .results import ResultsLog
from .run import BatchSummary, in_order, run_batch


@dataclass(frozen=True)
class EngineChoice:
    """Where the edits run: ``local`` on one device (``server`` as ``--server`` says) or on ``devices`` /
    ``workers`` worker processes, or ``ray`` at ``ray_address``."""

    engine: str = "local"
    devices: list[str] | str | None = None
    workers: int | None = None
    server: str = "never"
    model_given: bool = True
    ray_address: str | None = None


def by_adapters(
    items: list[BatchItem], default: tuple[tuple[str, float], ...]
) -> list[tuple[tuple[tuple[str, float], ...], list[BatchItem]]]:
    """The items grouped by the adapters they are edited with, in the order the groups first appear."""
    groups: dict[tuple[tuple[str, float], ...], list[BatchItem]] = {}
    for item in items:
        groups.setdefault(default if item.loras is None else item.loras, []).append(item)
    return list(groups.items())


def run_engine(
    model: ModelOptions,
    choice: EngineChoice,
    items: list[BatchItem],
    log: ResultsLog,
    *,
    overwrite: bool,
    batch_size: int,
    output_options: OutputOptions,
    on_item: Callable[[dict[str, Any]], None],
    status: Callable[[str], None],
    warn: Callable[[str], None],
) -> BatchSummary:
    """Edit ``items`` with the chosen engine, one adapter group after another; a fault that stops one group (a
    full disk) stops the run."""
    common = {"overwrite": overwrite, "batch_size": batch_size, "output_options": output_options, "on_item": on_item}
    total = BatchSummary()
    fractions = []
    largest = 0
    for index, (loras, group) in enumerate(by_adapters(items, model.loras)):
        grouped = dataclasses.replace(model, loras=loras)
        summary = _run_group(grouped, choice, group, log, common, status, warn)
        total.records += summary.records
        total.seconds += summary.seconds
        total.workers = summary.workers
        if index == 0:
            total.startup_seconds = summary.startup_seconds
        if len(group) > largest:  # the steady rate of the longest group says the most
            largest, total.steady_items_per_second = len(group), summary.steady_items_per_second
        if summary.busy_fraction is not None:
            fractions.append((summary.busy_fraction, len(group)))
        if summary.stopped is not None:
            total.stopped = summary.stopped
            break
    if fractions:
        total.busy_fraction = sum(f * n for f, n in fractions) / sum(n for _, n in fractions)
    total.records = in_order(total.records, items)
    return total


def _run_group(
    model: ModelOptions,
    choice: EngineChoice,
    items: list[BatchItem],
    log: ResultsLog,
    common: dict[str, Any],
    status: Callable[[str], None],
    warn: Callable[[str], None],
) -> BatchSummary:
    if choice.engine == "ray":
        from .ray_engine import run_ray

        return run_ray(model, items, log, address=choice.ray_address, workers=choice.workers, status=status, **common)
    if choice.devices is not None or choice.workers is not None:
        from .workers import resolve_devices, run_workers

        names = resolve_devices(choice.devices, choice.workers, model.device)
        return run_workers(model, names, items, log, status=status, warn=warn, **common)
    from ..server.remote import open_editor

    begun = time.perf_counter()
    editor = open_editor(model, choice.server, status=status, model_given=choice.model_given)
    for note in editor.notes:
        warn(note)
    status("editing")
    return run_batch(editor, items, log, begun=begun, **common)
