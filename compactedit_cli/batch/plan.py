"""Batch planning: the jobs of a folder or a manifest, their outputs confined to the output folder.

* Inputs come from a folder (``--glob``, ``--recursive``; the relative layout is kept under the output folder) or a
  JSONL/CSV manifest whose relative paths resolve against the manifest's folder.
* Outputs never leave the output folder: absolute paths, ``..`` and symlinks that point outside are refused.
* A manifest's values go through the same checks as the flags (:mod:`compactedit_cli.options`); a bad line is a
  usage error that names it, before anything runs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import options
from ..editor import EditJob
from ..errors import OutputError, UsageError
from ..options import FORMAT_EXTENSIONS, OUTPUT_EXTENSIONS, EditOptions
from .results import json_lines

DEFAULT_GLOB = "*"
INPUT_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".hif", ".avif"}
)

# Manifest columns that set an edit parameter: column -> (EditOptions field, check). The check is the flag's own.
PARAMETERS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "seed": ("seed", options.seed),
    "steps": ("steps", options.steps),
    "guidance": ("guidance", options.scale),
    "image_guidance": ("image_guidance", options.scale),
    "feather": ("feather", options.feather),
    "mask_mode": ("mask_mode", options.mask_mode),
}
TEXT_FIELDS = ("image", "instruction", "output", "exif", "mask")  # a mask's path resolves as the image's does
LORA_FIELD = "lora"
FIELD_ALIASES = {"guidance_scale": "guidance", "image_guidance_scale": "image_guidance", "num_inference_steps": "steps"}


@dataclass
class BatchItem(EditJob):
    """One planned edit, and the manifest line it came from (for error messages)."""

    line: int | None = None
    loras: tuple[tuple[str, float], ...] | None = None  # a manifest's ``lora`` column; None: the run's --lora

    @property
    def key(self) -> str:
        """Items are identified by their output's absolute path (what resuming checks, and results.jsonl says)."""
        return str(self.output.absolute())


def confined(out_dir: Path, relative: str | Path, where: str, suffix: str | None = None) -> Path:
    """``out_dir / relative`` (its extension replaced by ``suffix`` when given), refused unless the file written
    stays inside ``out_dir`` (after resolving symlinks)."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or str(relative).strip() in ("", "."):
        raise UsageError(f"{where}: output {str(relative)!r} must be a relative path inside the output folder")
    target = out_dir / (rel.with_suffix(suffix) if suffix else rel)
    root = out_dir.resolve()
    if not target.resolve().is_relative_to(root):
        raise UsageError(f"{where}: output {str(relative)!r} escapes the output folder (through a symlink)")
    return target


def _dedupe(items: list[BatchItem]) -> list[BatchItem]:
    """Outputs are told apart by their real path: two items that would write one file are an error that names both.

    In folder mode, two inputs with one stem (``a.jpg`` and ``a.png``) first keep their source extension in the name.
    """
    seen: dict[Path, BatchItem] = {}
    for item in items:
        if item.line is None and item.output.resolve() in seen:
            suffix = item.source.suffix.lstrip(".")
            item.output = item.output.with_name(f"{item.output.stem}_{suffix}{item.output.suffix}")
        real = item.output.resolve()
        if real in seen:
            other = seen[real]
            first, second = (
                (f"manifest line {other.line}", f"line {item.line}")
                if item.line is not None
                else (str(other.source), str(item.source))
            )
            raise UsageError(f"{first} and {second} both write {real}; give distinct outputs")
        seen[real] = item
    return items


def items_from_folder(
    input_dir: Path,
    instruction: str,
    out_dir: Path,
    fmt: str,
    defaults: EditOptions,
    *,
    glob: str = DEFAULT_GLOB,
    recursive: bool = False,
) -> list[BatchItem]:
    """Every image under ``input_dir`` matching ``glob``; the output folder itself is never an input."""
    if not input_dir.is_dir():
        raise UsageError(f"input folder not found: {input_dir}")
    instruction = options.instruction(instruction)
    out_root = out_dir.resolve()
    pattern = f"**/{glob}" if recursive else glob
    items = []
    for path in sorted(input_dir.glob(pattern)):
        rel = path.relative_to(input_dir)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() not in INPUT_SUFFIXES or path.resolve().is_relative_to(out_root):
            continue
        output = confined(out_dir, rel, str(path), FORMAT_EXTENSIONS[fmt])
        items.append(BatchItem(source=path, instruction=instruction, output=output, options=defaults))
    return _dedupe(items)


def _coerce(record: dict[str, Any], where: str, defaults: EditOptions) -> tuple[dict[str, str], EditOptions]:
    """A manifest line's text fields, and its edit parameters over the run's defaults, every value checked."""
    text: dict[str, str] = {}
    changes: dict[str, Any] = {}
    for raw_key, value in record.items():
        key = FIELD_ALIASES.get(raw_key, raw_key)
        if key == LORA_FIELD:
            continue
        if key not in TEXT_FIELDS and key not in PARAMETERS:
            known = ", ".join([*TEXT_FIELDS, *PARAMETERS, LORA_FIELD])
            raise UsageError(f"{where}: unknown field {raw_key!r} (known: {known})")
        if value is None or value == "":
            continue
        if key in PARAMETERS:
            field, check = PARAMETERS[key]
            changes[field] = check(value, f"{where}: {raw_key}")
        elif not isinstance(value, str):
            raise UsageError(f"{where}: {raw_key} must be text (got {type(value).__name__})")
        else:
            text[key] = value
    for required in ("image", "instruction"):
        if required not in text:
            raise UsageError(f"{where}: missing field {required!r}")
    text["instruction"] = options.instruction(text["instruction"], f"{where}: the instruction")
    if "exif" in text:
        text["exif"] = options.exif_policy(text["exif"], f"{where}: exif")
    return text, dataclasses.replace(defaults, **changes)


def _adapters(value: Any, base: Path, where: str) -> tuple[tuple[str, float], ...] | None:
    """A manifest line's ``lora``: ``PATH[:SCALE]`` (several joined by ``;``, or a JSON list), a local path taken
    relative to the manifest as images are; empty means the run's ``--lora``, ``none`` means no adapter."""
    if value is None or value == "":
        return None
    entries = value if isinstance(value, list) else str(value).split(";") if isinstance(value, str) else None
    if entries is None or not all(isinstance(entry, str) for entry in entries):
        raise UsageError(f"{where}: lora must be text (PATH[:SCALE], several joined by ;) or a list of them")
    if [entry.strip().lower() for entry in entries] == ["none"]:
        return ()
    adapters = []
    for entry in entries:
        spec, scale = options.lora(entry.strip(), f"{where}: lora")
        local = Path(spec).expanduser()
        if not local.is_absolute() and (base / local).exists():
            spec = str(base / local)
        adapters.append((spec, scale))
    return tuple(adapters)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file the user gave (a BOM is dropped); unreadable or not text is a usage error naming it."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def _manifest_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A manifest's records and the line each starts on: lines end only at LF, CR or CRLF, never at the other
    breaks ``str.splitlines`` knows (U+2028, NEL, form feed), which may stand in a JSON string or a CSV cell."""
    if path.suffix.lower() in INPUT_SUFFIXES:  # an image given where its manifest belongs
        raise UsageError(f"{path} is an image, not a manifest (a .jsonl or .csv file)")
    text = read_text(path, "manifest")
    if path.suffix.lower() == ".csv":
        yield from _csv_records(path, text)
        return
    for number, line in enumerate(json_lines(text), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{number}: each line must be a JSON object")
        yield number, record


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """A CSV manifest's rows under its header row, numbered by the line a row starts on (a quoted cell may span
    lines); blank rows are skipped."""
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if not header:
        raise UsageError(f"manifest {path} has no header row")
    start = rows.line_num + 1
    for row in rows:
        number, start = start, rows.line_num + 1
        if not row:
            continue
        if len(row) > len(header):
            raise UsageError(f"{path}:{number}: more cells than header columns")
        yield number, dict(zip(header, row, strict=False))  # a short row leaves its last fields unset


def items_from_manifest(manifest: Path, out_dir: Path, fmt: str, defaults: EditOptions) -> list[BatchItem]:
    """Items of a JSONL (or ``.csv``) manifest; every malformed line is an error that names it."""
    if not manifest.is_file():
        raise UsageError(f"manifest not found: {manifest}")
    base = manifest.resolve().parent
    items = []
    for number, record in _manifest_records(manifest):
        where = f"{manifest}:{number}"
        clean, chosen = _coerce(record, where, defaults)
        image = Path(clean["image"]).expanduser()
        image = image if image.is_absolute() else base / image
        mask = Path(clean["mask"]).expanduser() if "mask" in clean else None
        mask = mask if mask is None or mask.is_absolute() else base / mask
        if "output" in clean:
            suffix = Path(clean["output"]).suffix.lower()
            if suffix and suffix not in OUTPUT_EXTENSIONS:
                raise UsageError(f"{where}: unknown output extension {suffix!r} (use .png, .jpg or .webp)")
            output = confined(out_dir, clean["output"], where, None if suffix else FORMAT_EXTENSIONS[fmt])
        elif image.name in ("", ".."):
            raise UsageError(f"{where}: image {clean['image']!r} names no file")
        else:
            output = confined(out_dir, image.name, where, FORMAT_EXTENSIONS[fmt])
        if output.resolve() == image.resolve():
            raise OutputError(f"{where}: the output {output} is the input image; refusing to overwrite an input")
        items.append(
            BatchItem(
                source=image,
                instruction=clean["instruction"],
                output=output,
                options=chosen,
                exif=clean.get("exif"),
                mask=mask,
                line=number,
                loras=_adapters(record.get(LORA_FIELD), base, where),
            )
        )
    if not items:
        raise UsageError(f"manifest {manifest} has no items")
    return _dedupe(items)
