"""``results.jsonl``: one line per item, appended and fsynced as each finishes, repaired and compacted across runs.

Lines written so far survive Ctrl-C, SIGTERM, a full disk or ``kill -9``; a re-run repairs a torn last line and, once
done, leaves exactly one line per item.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from ..files.imaging import output_error, write_atomic

RESULTS_NAME = "results.jsonl"


class ResultsLog:
    """``results.jsonl``: appended and fsynced per item, repaired and compacted across runs."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RESULTS_NAME
        self.previous: dict[str, dict[str, Any]] = {}
        try:
            self._repair_and_read()
            self._handle = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise output_error(exc, str(self.path)) from None

    def _repair_and_read(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # torn by kill -9: drop the partial last line
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        for line in data.decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                record = json.loads(line)
                self.previous[str(record["output"])] = record

    def append(self, record: dict[str, Any]) -> None:
        try:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            raise output_error(exc, str(self.path)) from None

    def close(self, final: list[dict[str, Any]] | None = None) -> None:
        """Close; after a complete run, rewrite the file with exactly one line per item.

        Closing an unfinished run never raises (it may be cleaning up after a full disk or Ctrl-C): a line torn
        by a failed flush is dropped by the next run.
        """
        try:
            self._handle.close()
        except OSError as exc:
            if final is not None:
                raise output_error(exc, str(self.path)) from None
        if final is not None:
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in final)
            write_atomic(self.path, body.encode("utf-8"), overwrite=True)
