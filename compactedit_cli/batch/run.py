"""Batch edits over folders or manifests: planning, resuming, per-item results, and the run loop.

The contract a shell script can rely on:

* Inputs come from a folder (``--glob``, ``--recursive``; the relative layout is kept under the output folder) or a
  JSONL/CSV manifest whose relative paths resolve against the manifest's folder.
* Outputs never leave the output folder: absolute paths, ``..`` and symlinks that point outside are refused.
* Existing outputs are skipped, so a re-run resumes; ``--overwrite`` redoes them.
* ``results.jsonl`` gets one line per item as it finishes (flushed and fsynced), so results written so far survive
  Ctrl-C, SIGTERM, a full disk or ``kill -9``; a re-run repairs a torn last line and, once done, leaves exactly one
  line per item.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.conditioning import check_instruction
from ..errors import (
    CompactEditError,
    DiskFullError,
    InputImageError,
    OutOfMemoryError,
    OutputError,
    UsageError,
    internal_error,
    is_out_of_memory,
)
from ..files.imaging import (
    FORMAT_EXTENSIONS,
    OUTPUT_EXTENSIONS,
    SourceImage,
    open_image,
    output_error,
    output_format,
    write_atomic,
)

RESULTS_NAME = "results.jsonl"
DEFAULT_GLOB = "*"
INPUT_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

# Manifest columns and their types; "guidance_scale"-style names are accepted too.
FIELDS: dict[str, type | tuple[type, ...]] = {
    "image": str,
    "instruction": str,
    "output": str,
    "seed": int,
    "steps": int,
    "guidance": (int, float),
    "image_guidance": (int, float),
}
FIELD_ALIASES = {"guidance_scale": "guidance", "image_guidance_scale": "image_guidance", "num_inference_steps": "steps"}


@dataclass
class BatchItem:
    """One planned edit."""

    image: Path
    instruction: str
    output: Path
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    image_guidance: float | None = None
    line: int | None = None  # manifest line, for error messages

    @property
    def key(self) -> str:
        """Items are identified by their output (what resuming checks)."""
        return str(self.output)


@dataclass
class Defaults:
    """Run-wide settings an item falls back to."""

    seed: int | None = 42  # None: a fresh random seed per item
    steps: int = 20
    guidance: float | None = None
    image_guidance: float | None = None


# ---- planning ---------------------------------------------------------------------------------------------------


def confined(out_dir: Path, relative: str | Path, where: str) -> Path:
    """``out_dir / relative``, refused unless it stays inside ``out_dir`` (after resolving symlinks)."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or str(relative).strip() in ("", "."):
        raise UsageError(f"{where}: output {str(relative)!r} must be a relative path inside the output folder")
    target = out_dir / rel
    root = out_dir.resolve()
    if not target.resolve().is_relative_to(root):
        raise UsageError(f"{where}: output {str(relative)!r} escapes the output folder (through a symlink)")
    return target


def _output_name(relative: Path, fmt: str) -> Path:
    return relative.with_suffix(FORMAT_EXTENSIONS[fmt])


def _dedupe(items: list[BatchItem]) -> list[BatchItem]:
    """Two inputs mapping to one output (``a.jpg`` and ``a.png``) keep their source extension in the name."""
    seen: dict[Path, BatchItem] = {}
    for item in items:
        if item.output in seen:
            other = seen[item.output]
            if item.line is not None:
                raise UsageError(
                    f"manifest lines {other.line} and {item.line} both write {item.output}; give distinct outputs"
                )
            suffix = item.image.suffix.lstrip(".")
            item.output = item.output.with_name(f"{item.output.stem}_{suffix}{item.output.suffix}")
        seen[item.output] = item
    return items


def items_from_folder(
    input_dir: Path, instruction: str, out_dir: Path, fmt: str, *, glob: str = DEFAULT_GLOB, recursive: bool = False
) -> list[BatchItem]:
    """Every image under ``input_dir`` matching ``glob``; the output folder itself is never an input."""
    if not input_dir.is_dir():
        raise UsageError(f"input folder not found: {input_dir}")
    check_instruction(instruction)
    out_root = out_dir.resolve()
    pattern = f"**/{glob}" if recursive else glob
    items = []
    for path in sorted(input_dir.glob(pattern)):
        rel = path.relative_to(input_dir)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() not in INPUT_SUFFIXES or path.resolve().is_relative_to(out_root):
            continue
        output = confined(out_dir, _output_name(rel, fmt), str(path))
        items.append(BatchItem(image=path, instruction=instruction, output=output))
    return _dedupe(items)


def _coerce(record: dict[str, Any], where: str) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for raw_key, value in record.items():
        key = FIELD_ALIASES.get(raw_key, raw_key)
        if key not in FIELDS:
            raise UsageError(f"{where}: unknown field {raw_key!r} (known: {', '.join(FIELDS)})")
        if value is None or value == "":
            continue
        kind = FIELDS[key]
        if isinstance(value, str) and kind is not str:
            try:
                value = int(value) if kind is int else float(value)
            except ValueError:
                raise UsageError(f"{where}: {raw_key} must be a number, got {value!r}") from None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(f"{where}: {raw_key} has the wrong type ({type(value).__name__})")
        clean[key] = value
    for required in ("image", "instruction"):
        if required not in clean:
            raise UsageError(f"{where}: missing field {required!r}")
    check_instruction(clean["instruction"], where)
    if "steps" in clean and clean["steps"] < 1:
        raise UsageError(f"{where}: steps must be at least 1")
    for key in ("guidance", "image_guidance"):
        if key in clean and clean[key] < 0:
            raise UsageError(f"{where}: {key} must be >= 0")
    return clean


def _manifest_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"manifest {path} is not UTF-8 text (byte {exc.start})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise UsageError(f"manifest {path} has no header row")
        for number, row in enumerate(reader, start=2):
            if None in row:
                raise UsageError(f"{path}:{number}: more cells than header columns")
            yield number, dict(row)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{number}: each line must be a JSON object")
        yield number, record


def items_from_manifest(manifest: Path, out_dir: Path, fmt: str) -> list[BatchItem]:
    """Items of a JSONL (or ``.csv``) manifest; every malformed line is an error that names it."""
    if not manifest.is_file():
        raise UsageError(f"manifest not found: {manifest}")
    base = manifest.resolve().parent
    items = []
    for number, record in _manifest_records(manifest):
        where = f"{manifest}:{number}"
        clean = _coerce(record, where)
        image = Path(clean["image"]).expanduser()
        image = image if image.is_absolute() else base / image
        if "output" in clean:
            output = confined(out_dir, clean["output"], where)
            suffix = Path(clean["output"]).suffix.lower()
            if suffix and suffix not in OUTPUT_EXTENSIONS:
                raise UsageError(f"{where}: unknown output extension {suffix!r} (use .png, .jpg or .webp)")
            if not suffix:
                output = output.with_suffix(FORMAT_EXTENSIONS[fmt])
        else:
            output = out_dir / _output_name(Path(image.name), fmt)
        if output.resolve() == image.resolve():
            raise OutputError(f"{where}: the output {output} is the input image; refusing to overwrite an input")
        items.append(
            BatchItem(
                image=image,
                instruction=clean["instruction"],
                output=output,
                seed=clean.get("seed"),
                steps=clean.get("steps"),
                guidance=clean.get("guidance"),
                image_guidance=clean.get("image_guidance"),
                line=number,
            )
        )
    if not items:
        raise UsageError(f"manifest {manifest} has no items")
    return _dedupe(items)


# ---- results log ------------------------------------------------------------------------------------------------


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


# ---- running ----------------------------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: CompactEditError | None = None  # a fault that ended the run early (disk full)

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r["status"] == status)


def _record(
    item: BatchItem,
    status: str,
    *,
    error: str | None = None,
    seed: int | None = None,
    seconds: float | None = None,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "input": str(item.image),
        "output": str(item.output),
        "instruction": item.instruction,
        "status": status,
        "error": error,
        "seed": seed,
        "seconds": None if seconds is None else round(seconds, 3),
        "warnings": warnings or [],
    }


@dataclass
class Runner:
    """Edits items through a loaded pipeline, ``batch_size`` same-bin items at a time."""

    pipe: Any
    save: Callable[[BatchItem, Any, Any], None]  # (item, image, result parameters) -> writes the output
    defaults: Defaults
    batch_size: int = 1
    binning: bool = True
    on_item: Callable[[dict[str, Any]], None] = lambda _record: None
    is_oom: Callable[[BaseException], bool] = is_out_of_memory
    free_memory: Callable[[], None] = lambda: None

    def _settings(self, item: BatchItem) -> tuple[int, float | None, float | None]:
        d = self.defaults
        return (
            item.steps or d.steps,
            item.guidance if item.guidance is not None else d.guidance,
            item.image_guidance if item.image_guidance is not None else d.image_guidance,
        )

    def _seed(self, item: BatchItem) -> int:
        from ..engine.pipeline import random_seed

        if item.seed is not None:
            return item.seed
        return random_seed() if self.defaults.seed is None else self.defaults.seed

    def run(self, items: list[BatchItem], log: ResultsLog, *, overwrite: bool) -> BatchSummary:
        summary = BatchSummary()
        pending: list[tuple[BatchItem, SourceImage]] = []
        pending_key: Any = None

        def finish(record: dict[str, Any]) -> None:
            summary.records.append(record)
            log.append(record)
            self.on_item(record)

        def flush() -> None:
            nonlocal pending, pending_key
            chunk, pending, pending_key = pending, [], None
            if chunk:
                self._edit_chunk(chunk, finish, summary)

        for item in items:
            if summary.stopped is not None:
                break
            if item.output.exists() and not overwrite:
                earlier = log.previous.get(item.key) or {}
                finish(_record(item, "skipped", seed=earlier.get("seed"), warnings=earlier.get("warnings")))
                continue
            try:
                source = open_image(item.image)
                key = (self.pipe.model_size(source.size, binning=self.binning), *self._settings(item))
            except CompactEditError as exc:
                finish(_record(item, "failed", error=str(exc)))
                continue
            if pending and (key != pending_key or len(pending) >= self.batch_size):
                flush()
            pending.append((item, source))
            pending_key = key
        if summary.stopped is None:
            flush()
        order = {item.key: index for index, item in enumerate(items)}
        summary.records.sort(key=lambda record: order.get(record["output"], len(order)))
        return summary

    def _edit_chunk(self, chunk: list[tuple[BatchItem, SourceImage]], finish: Callable, summary: BatchSummary) -> None:
        """Edit one same-bin chunk; if it fails, retry its items one by one, so only the culprit fails."""
        from ..engine.pipeline import EditRequest

        steps, guidance, image_guidance = self._settings(chunk[0][0])
        seeds = [self._seed(item) for item, _ in chunk]
        started = time.perf_counter()
        error = None
        try:
            results = self.pipe.edit_batch(
                [
                    EditRequest(source, item.instruction, seed)
                    for (item, source), seed in zip(chunk, seeds, strict=True)
                ],
                num_inference_steps=steps,
                guidance_scale=guidance,
                image_guidance_scale=image_guidance,
                resolution_binning=self.binning,
            )
        except Exception as exc:  # out of memory, or anything else one item can cause: the batch goes on
            error = self._describe(exc)
        if error is not None:
            # Outside the except block, so the failed attempt's frames (and the tensors they hold) are gone.
            self.free_memory()
            if len(chunk) > 1:
                for one in chunk:
                    self._edit_chunk([one], finish, summary)
            else:
                finish(_record(chunk[0][0], "failed", error=error))
            return
        per_item = (time.perf_counter() - started) / len(chunk)
        for (item, _), result in zip(chunk, results, strict=True):
            if summary.stopped is not None:
                break
            try:
                self.save(item, result.images[0], result.parameters)
            except OutputError as exc:
                finish(_record(item, "failed", error=str(exc), seed=result.parameters.seed))
                if isinstance(exc, DiskFullError):
                    summary.stopped = exc
                continue
            except InputImageError as exc:
                finish(_record(item, "failed", error=str(exc)))
                continue
            parameters = result.parameters
            finish(_record(item, "ok", seed=parameters.seed, seconds=per_item, warnings=parameters.warnings))

    def _describe(self, exc: Exception) -> str:
        """The one-line error recorded for an item whose edit raised ``exc``."""
        if self.is_oom(exc):
            return str(OutOfMemoryError())
        if isinstance(exc, CompactEditError):
            return str(exc)
        return internal_error(exc)


def resolve_format(explicit: str | None, configured: str | None) -> str:
    """The batch output format: ``--format``, else the config file's, else PNG."""
    return output_format(None, explicit or configured or "png")
