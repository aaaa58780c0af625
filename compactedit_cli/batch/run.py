"""The batch run: skip what is done, edit the rest through the Editor, and log every item as it finishes.

Existing outputs made with the same parameters are skipped, so a re-run resumes; one made with other parameters is
kept too, with a warning naming the differences (``overwrite`` redoes them). One failing item is recorded and the
run goes on; a fault every later item would meet too (a full disk) stops it, keeping what was finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..editor import Editor, JobOutcome
from ..errors import CompactEditError
from ..files.metadata import compare_existing
from ..options import OutputOptions
from .plan import BatchItem
from .results import ResultsLog


@dataclass
class BatchSummary:
    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: CompactEditError | None = None  # a fault that ended the run early (disk full)

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
    """Edit ``items`` (skipping finished ones unless ``overwrite``); lines come back in the items' order."""
    summary = BatchSummary()

    def finish(line: dict[str, Any]) -> None:
        summary.records.append(line)
        log.append(line)
        on_item(line)

    todo = []
    for item in items:
        if item.output.exists() and not overwrite:  # the line describes the file as it is, not the request
            made, changed = compare_existing(item, log.previous.get(item.key), editor.recorded_model)
            redo = f"{item.output} was made with other parameters ({'; '.join(changed)}): kept; redo with --overwrite"
            finish(result_line(item, "skipped", **made, warnings=[redo] if changed else []))
        else:
            todo.append(item)
    for outcome in editor.edit_many(todo, batch_size=batch_size, output_options=output_options):
        finish(result_line(outcome.job, outcome.status, outcome))
        if outcome.fatal is not None:
            summary.stopped = outcome.fatal
            break
    order = {item.key: index for index, item in enumerate(items)}
    summary.records.sort(key=lambda line: order.get(line["output"], len(order)))
    return summary
