"""``compactedit batch report OUT_DIR``: the shards' results files merged into one ``results.jsonl`` and a summary.

Lines are keyed by output. A later file's line replaces an earlier one's, except that a ``skipped`` line (a resume
that found the output) never hides the ``ok`` line that made it. An output edited (``ok``) in two different files
is counted as done twice: with a stable partition that never happens, and the report says so if it did.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files.imaging import write_atomic
from .results import RESULTS_NAME, json_lines
from .shard import SHARD_RESULTS_GLOB


@dataclass
class Report:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)
    done_twice: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for line in self.lines if line.get("status") == status)

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": str(self.out_dir / RESULTS_NAME),
            "files": [str(path) for path in self.files],
            "items": len(self.lines),
            "ok": self.count("ok"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "done_twice": len(self.done_twice),
        }


def _read(path: Path) -> list[dict[str, Any]]:
    """A results file's whole lines (a torn last line, from a killed shard, is left out)."""
    lines = []
    for text in json_lines(path.read_text(encoding="utf-8", errors="replace")):
        with contextlib.suppress(ValueError):
            line = json.loads(text)
            if isinstance(line, dict) and "output" in line:
                lines.append(line)
    return lines


def merge(out_dir: Path) -> Report:
    """Merge ``results.jsonl`` and every shard's file in ``out_dir`` into ``results.jsonl`` (written atomically)."""
    if not out_dir.is_dir():
        raise UsageError(f"output folder not found: {out_dir}")
    report = Report(out_dir)
    report.files = [p for p in [out_dir / RESULTS_NAME, *sorted(out_dir.glob(SHARD_RESULTS_GLOB))] if p.is_file()]
    if not report.files:
        raise UsageError(f"no results files in {out_dir} (results.jsonl or {SHARD_RESULTS_GLOB})")
    merged: dict[str, dict[str, Any]] = {}
    edited_in: dict[str, set[Path]] = {}
    for path in report.files:
        for line in _read(path):
            key = str(line["output"])
            if line.get("status") == "ok" and path.name != RESULTS_NAME:
                edited_in.setdefault(key, set()).add(path)
            earlier = merged.get(key)
            if earlier is not None and earlier.get("status") == "ok" and line.get("status") == "skipped":
                continue
            merged[key] = line
    report.lines = list(merged.values())
    report.done_twice = sorted(key for key, files in edited_in.items() if len(files) > 1)
    body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in report.lines)
    write_atomic(out_dir / RESULTS_NAME, body.encode("utf-8"), overwrite=True)
    return report
