"""Where outputs go and how they are written: names, checks before any work, and atomic saves with metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from ..errors import OutputError
from ..options import FORMAT_EXTENSIONS, OutputOptions, output_format
from ..record import EditRecord
from . import colour, metadata
from .imaging import SourceImage, encode, write_atomic


def numbered(path: Path, count: int) -> list[Path]:
    """``out.png`` for one output; ``out-1.png``, ``out-2.png``, … for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count + 1)]


def sidecar_path(path: Path) -> Path:
    """``out.png.json``: where ``--sidecar`` writes the record of ``out.png``."""
    return path.with_name(path.name + ".json")


def written_files(paths: list[Path], options: OutputOptions) -> list[Path]:
    """Every file writing the outputs ``paths`` makes (their sidecars too), for :func:`check_outputs`."""
    return [*paths, *map(sidecar_path, paths)] if options.sidecar else list(paths)


def default_output(image: Path, fmt: str) -> Path:
    """``photo_edited.png`` beside ``photo.jpg`` when no output is given."""
    return image.with_name(f"{image.stem}_edited{FORMAT_EXTENSIONS[fmt]}")


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_outputs(paths: list[Path], *, inputs: list[Path], overwrite: bool) -> None:
    """Check output paths before any work: never an input, no clobbering, a writable folder (created if missing)."""
    for path in paths:
        for source in inputs:
            if same_file(path, source):
                raise OutputError(f"output {path} is the input image; refusing to overwrite an input")
        if path.is_dir():
            raise OutputError(f"output {path} is a directory")
        if path.exists() and not overwrite:
            raise OutputError(f"{path} already exists", hint="use --overwrite to replace it")
        ensure_folder(path.parent)


def check_folder(folder: Path) -> None:
    """Refuse an output folder that is a file, before any work (:func:`ensure_folder` creates it later)."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the output folder {folder} is a file, not a folder")


def ensure_folder(folder: Path) -> None:
    """An output folder that exists (created if missing) and can be written, else a one-line OutputError."""
    check_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output folder {folder}: permission denied")


def file_bytes(
    image: Image.Image, record: EditRecord, fmt: str, options: OutputOptions, source: SourceImage | None = None
) -> bytes:
    """The output file's bytes in ``fmt``: the record embedded unless metadata is turned off, the ``source``'s
    EXIF and XMP as the EXIF policy keeps them, and an sRGB profile when the source's profile was honoured."""
    camera = source.camera if source is not None else None
    extra = metadata.save_options(fmt, record.metadata() if options.metadata else None, camera, options.exif)
    if source is not None and source.colour_managed:
        extra["icc_profile"] = colour.srgb_icc()
    return encode(image, fmt, options.quality, **extra)


def save(
    image: Image.Image, record: EditRecord, path: Path, options: OutputOptions, source: SourceImage | None = None
) -> None:
    """Write one output (and its sidecar) atomically; the format follows ``options`` or the extension."""
    fmt = output_format(path, options.format)
    write_atomic(path, file_bytes(image, record, fmt, options, source), overwrite=options.overwrite)
    if options.sidecar:
        body = json.dumps(record.metadata(), indent=2, ensure_ascii=False) + "\n"
        write_atomic(sidecar_path(path), body.encode("utf-8"), overwrite=options.overwrite)


def source_label(name: str | Path | None) -> str | None:
    """What to record as the edit's source: the file name only, never a full path (privacy)."""
    return Path(name).name if name and str(name) != "-" else None
