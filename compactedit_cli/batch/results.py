"""``results.jsonl``: one line per item, appended and fsynced as each finishes, repaired and compacted across runs.

Lines written so far survive Ctrl-C, SIGTERM, a full disk or ``kill -9``; a re-run repairs a torn last line and, once
done, leaves exactly one line per item.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

from ..files.imaging import output_error, write_atomic

RESULTS_NAME = "results.jsonl"


def json_lines(text: str) -> list[str]:
    """The lines of JSONL text, ended only by LF, CR or CRLF (which JSON never holds raw), never by the other
    breaks ``str.splitlines`` knows: U+2028, NEL and the like stand raw in a JSON string (a file name, an
    instruction) where it is written with ``ensure_ascii=False``, as results are."""
    return io.StringIO(text, newline=None).readlines()


class ResultsLog:
    """``results.jsonl``: appended and fsynced per item, repaired and compacted across runs."""

    def __init__(self, out_dir: Path, name: str = RESULTS_NAME) -> None:
        self.path = out_dir / name
        self.previous: dict[str, dict[str, Any]] = {}
        try:
            self._repair_and_read()
            # No-follow: should a link appear at the path meanwhile, opening fails instead of writing through it.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            self._handle = os.fdopen(fd, "a", encoding="utf-8")
        except OSError as exc:
            raise output_error(exc, str(self.path)) from None

    def _repair_and_read(self) -> None:
        """Read the earlier runs' lines; a torn last line (``kill -9``) is dropped by replacing the file.

        A results.jsonl that is not a regular file (a symlink, a FIFO) is not ours: it is neither read nor written
        through, only replaced by a fresh file, so nothing outside the output folder is ever touched.
        """
        if not self.path.exists() and not self.path.is_symlink():
            return
        if self.path.is_symlink() or not self.path.is_file():
            write_atomic(self.path, b"", overwrite=True)
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            write_atomic(self.path, data, overwrite=True)
        for line in json_lines(data.decode("utf-8", "replace")):
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
