"""The batch run: skip what is done, edit the rest through the Editor, and log every item as it finishes.

Existing outputs made with the same parameters are skipped, so a re-run resumes; one made with other parameters is
kept too, with a warning naming the differences (``overwrite`` redoes them). One failing item is recorded and the
run goes on; a fault every later item would meet too (a full disk) stops it, keeping what was finished.
Every engine (one device, several workers, Ray) shares :func:`split_done` and :func:`result_line`, so they resume and
record alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from ..editor import Editor, JobOutcome
from ..errors import CompactEditError
from ..files.metadata import compare_existing
from ..loading.refs import recorded_model
from ..options import ModelOptions, OutputOptions
from .pipelined import BusyClock, edit_pipelined
from .plan import BatchItem
from .results import ResultsLog


@dataclass
class BatchSummary:
    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: CompactEditError | None = None  # a fault that ended the run early (disk full)
    busy_fraction: float | None = None  # the devices' steady-state busy share (see batch.pipelined)
    seconds: float = 0.0  # wall time of the editing, model load excluded
    workers: int = 1
    steady_items_per_second: float | None = None  # while every worker was warm and busy (see Finishes)
    startup_seconds: float | None = None  # from the engine's start, model loads included, until then

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r["status"] == status)


@dataclass
class Finishes:
    """When each worker finished each item, for the rate of the steady state: from the moment the last worker to
    get going finished its first item (every model loaded, every first-item warm-up done) to the moment the first
    worker to run out of work finished its last (before the tail, where some workers already idle). Start-up and
    staggered starts therefore do not count, and workers are compared on equal terms."""

    begun: float = field(default_factory=time.perf_counter)
    times: dict[Hashable, list[float]] = field(default_factory=dict)

    def add(self, worker: Hashable, when: float | None = None) -> None:
        self.times.setdefault(worker, []).append(time.perf_counter() if when is None else when)

    def measure(self, summary: BatchSummary) -> None:
        """Fill in ``summary``'s steady rate and start-up time (None where too few items finished to tell)."""
        if not self.times:
            return
        start = max(times[0] for times in self.times.values())
        end = min(times[-1] for times in self.times.values())
        summary.startup_seconds = start - self.begun
        done = sum(1 for times in self.times.values() for t in times if start < t <= end)
        if end > start and done:
            summary.steady_items_per_second = done / (end - start)


def result_line(item: BatchItem, status: str, outcome: JobOutcome | None = None, **known: Any) -> dict[str, Any]:
    """One line of ``results.jsonl``: the item, its status and error, then the edit's record (its keys, always)."""
    line: dict[str, Any] = {
        "input": str(item.source.absolute()),
        "output": item.key,
        "instruction": item.instruction,
        "status": status,
        "error": outcome.error if outcome else None,
        "seed": outcome.seed if outcome else None,
        "seconds": None,
        "warnings": [],
        **known,
    }
    if outcome is not None and outcome.record is not None:
        line.update(outcome.record.to_dict(), output=item.key)
    return line


def is_done(item: BatchItem, overwrite: bool) -> bool:
    """Whether a run skips ``item``: its output exists and ``overwrite`` is off (the one resume rule)."""
    return item.output.exists() and not overwrite


def skipped_line(item: BatchItem, log: ResultsLog, model: ModelOptions) -> dict[str, Any]:
    """A skipped item's line, describing the file as it is (not the request), with a warning when it was made
    with other parameters than those asked for (``model``'s name, revision and adapters included)."""
    named = recorded_model(model.model, model.revision)
    made, changed = compare_existing(item, log.previous.get(item.key), named, model.loras)
    redo = f"{item.output} was made with other parameters ({'; '.join(changed)}): kept; redo with --overwrite"
    return result_line(item, "skipped", **made, warnings=[redo] if changed else [])


def split_done(
    items: list[BatchItem], log: ResultsLog, overwrite: bool, model: ModelOptions
) -> tuple[list[dict[str, Any]], list[BatchItem]]:
    """The lines of items already done, and the items still to edit."""
    done, todo = [], []
    for item in items:
        if is_done(item, overwrite):
            done.append(skipped_line(item, log, model))
        else:
            todo.append(item)
    return done, todo


def in_order(lines: list[dict[str, Any]], items: list[BatchItem]) -> list[dict[str, Any]]:
    """Lines sorted as the items were planned (engines finish them in any order)."""
    order = {item.key: index for index, item in enumerate(items)}
    return sorted(lines, key=lambda line: order.get(line["output"], len(order)))


def begin(
    items: list[BatchItem],
    log: ResultsLog,
    model: ModelOptions,
    *,
    overwrite: bool,
    on_item: Callable[[dict[str, Any]], None],
    workers: int = 1,
) -> tuple[BatchSummary, Callable[[dict[str, Any]], None], list[BatchItem]]:
    """How every engine starts: its summary, ``finish`` (a line into the summary, the log and ``on_item``), and
    the items still to edit, the finished ones already recorded as skipped."""
    summary = BatchSummary(workers=workers)

    def finish(line: dict[str, Any]) -> None:
        summary.records.append(line)
        log.append(line)
        on_item(line)

    done, todo = split_done(items, log, overwrite, model)
    for line in done:
        finish(line)
    return summary, finish, todo


def run_batch(
    editor: Editor,
    items: list[BatchItem],
    log: ResultsLog,
    *,
    overwrite: bool,
    batch_size: int = 1,
    output_options: OutputOptions | None = None,
    on_item: Callable[[dict[str, Any]], None] = lambda _line: None,
    begun: float | None = None,
) -> BatchSummary:
    """Edit ``items`` (skipping finished ones unless ``overwrite``) on one device, decoding ahead and writing
    behind the compute; lines come back in the items' order. ``begun`` (a ``perf_counter`` time) is when the run
    started, before the model loaded, for the start-up time; by default, now."""
    summary, finish, todo = begin(items, log, editor.options, overwrite=overwrite, on_item=on_item)
    clock = BusyClock()
    finishes = Finishes() if begun is None else Finishes(begun)
    started = time.perf_counter()

    def finished(outcome: JobOutcome) -> None:  # on the writer thread
        finish(result_line(outcome.job, outcome.status, outcome))
        finishes.add("device")
        if outcome.fatal is not None:
            summary.stopped = outcome.fatal

    edit_pipelined(editor, todo, finished, batch_size=batch_size, output_options=output_options, clock=clock)
    summary.seconds = time.perf_counter() - started
    summary.busy_fraction = clock.fraction()
    finishes.measure(summary)
    summary.records = in_order(summary.records, items)
    return summary
