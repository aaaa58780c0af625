"""Training pairs: (source, target, instruction) from a manifest or from a folder in the LoRA trainers' layout.

* A JSONL or CSV manifest with ``source``, ``target`` and ``instruction`` columns, read as batch manifests are
  (paths relative to the manifest's folder; a bad line is a usage error naming it).
* A folder holding ``target/NAME.ext`` with the instruction in ``target/NAME.txt`` and the source in
  ``control/NAME.ext``: the layout of ai-toolkit's and musubi-tuner's edit datasets (a target folder of images with
  caption files beside them, and a control folder of same-named inputs).

Every pair is checked before anything loads: both images exist and decode, they have the same size (the model
edits in place, so a target of another size is no edit of its source), and the instruction is not empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import options
from ..batch.plan import INPUT_SUFFIXES, _manifest_records, read_text
from ..errors import InputImageError, UsageError
from ..files.imaging import SourceImage, open_image

FIELDS = ("source", "target", "instruction")


@dataclass
class TrainingPair:
    """One example: the source image, the edited target, the instruction, and where it came from (for errors)."""

    source: SourceImage
    target: SourceImage
    instruction: str
    where: str
    name: str
    files: tuple[Path, Path]  # (source, target): inputs no output may replace


def _open(path: Path, where: str, role: str) -> SourceImage:
    if not path.is_file():
        raise InputImageError(f"{where}: {role} image not found: {path}")
    return open_image(path)


def _pair(source: Path, target: Path, instruction: str, where: str) -> TrainingPair:
    text = options.instruction(instruction, f"{where}: the instruction")
    src, tgt = _open(source, where, "source"), _open(target, where, "target")
    if src.size != tgt.size:
        raise InputImageError(
            f"{where}: source {source.name} is {src.size[0]}x{src.size[1]} but target {target.name} is "
            f"{tgt.size[0]}x{tgt.size[1]}; an edit keeps the size"
        )
    return TrainingPair(src, tgt, text, where, target.stem, (source, target))


def pairs_from_manifest(manifest: Path) -> list[TrainingPair]:
    base = manifest.resolve().parent
    pairs = []
    for number, record in _manifest_records(manifest):
        where = f"{manifest}:{number}"
        unknown = sorted(set(record) - set(FIELDS))
        if unknown:
            raise UsageError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")
        for key in FIELDS:
            if not isinstance(record.get(key), str) or (key != "instruction" and not record[key].strip()):
                raise UsageError(f"{where}: missing field {key!r}")
        paths = [Path(record[key]).expanduser() for key in ("source", "target")]
        source, target = (p if p.is_absolute() else base / p for p in paths)
        pairs.append(_pair(source, target, record["instruction"], where))
    return pairs


def pairs_from_folder(root: Path) -> list[TrainingPair]:
    targets, controls = root / "target", root / "control"
    if not targets.is_dir() or not controls.is_dir():
        raise UsageError(f"{root} has no target/ and control/ folders (or give a .jsonl or .csv manifest)")
    pairs = []
    for target in sorted(p for p in targets.iterdir() if p.suffix.lower() in INPUT_SUFFIXES):
        caption = target.with_suffix(".txt")
        if not caption.is_file():
            raise UsageError(f"{target}: no instruction file {caption.name} beside it")
        sources = [p for p in controls.glob(f"{target.stem}.*") if p.suffix.lower() in INPUT_SUFFIXES]
        if not sources:
            raise InputImageError(f"{target}: no source image control/{target.stem}.* for it")
        text = read_text(caption, "instruction file")
        pairs.append(_pair(sorted(sources)[0], target, text, str(caption)))
    return pairs


def load_pairs(data: Path) -> list[TrainingPair]:
    """Every pair of a manifest (``.jsonl``, ``.csv``) or a ``target/`` + ``control/`` folder, checked."""
    if data.is_dir():
        pairs = pairs_from_folder(data)
    elif data.is_file():
        pairs = pairs_from_manifest(data)
    else:
        raise UsageError(f"training data not found: {data}")
    if not pairs:
        raise UsageError(f"{data} holds no training pairs")
    return pairs
