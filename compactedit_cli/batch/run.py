"""The batch run: skip what is done, edit the rest through the Editor, and log every item as it finishes.

Existing outputs made with the same parameters are skipped, so a re-run resumes; one made with other parameters is
kept too, with a warning naming the differences (``overwrite`` redoes them). One failing item is recorded and the
run goes on; a fault every later item would meet too (a full disk) stops it, keeping what was finished.
Every engine (one device, several workers, Ray) shares :func:`split_done` and :func:`result_line`, so they resume and
record alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r["status"] == status)


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
) -> BatchSummary:
    """Edit ``items`` (skipping finished ones unless ``overwrite``) on one device, decoding ahead and writing
    behind the compute; lines come back in the items' order."""
    summary, finish, todo = begin(items, log, editor.options, overwrite=overwrite, on_item=on_item)
    clock = BusyClock()
    started = time.perf_counter()

    def finished(outcome: JobOutcome) -> None:  # on the writer thread
        finish(result_line(outcome.job, outcome.status, outcome))
        if outcome.fatal is not None:
            summary.stopped = outcome.fatal

    edit_pipelined(editor, todo, finished, batch_size=batch_size, output_options=output_options, clock=clock)
    summary.seconds = time.perf_counter() - started
    summary.busy_fraction = clock.fraction()
    summary.records = in_order(summary.records, items)
    return summary
