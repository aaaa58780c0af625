"""Images in and out: decode and normalise the source, map it to model pixels, and map the result back.

The geometry contract: the model runs at a binned size reached by a plain (non-uniform) resize of the whole image,
and its output is resized straight back to the input's exact size. Stretch and inverse stretch cancel, so content
stays aligned with the input, with no letterbox offset or zoom.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import DiskFullError, InputImageError, OutputError, UsageError
from ..options import DEFAULT_QUALITY

# Decoded-pixel limit: larger headers are refused before any pixel is decoded. Change with COMPACTEDIT_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 120_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False


def max_pixels_limit() -> int:
    """The decompression-bomb limit in pixels (env ``COMPACTEDIT_MAX_PIXELS`` overrides the default)."""
    value = os.environ.get("COMPACTEDIT_MAX_PIXELS")
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise UsageError(f"COMPACTEDIT_MAX_PIXELS must be an integer, got {value!r}") from None
    if limit <= 0:
        raise UsageError(f"COMPACTEDIT_MAX_PIXELS must be positive, got {limit}")
    return limit


@dataclass
class SourceImage:
    """An input image made ready for the model: upright RGB, with any alpha kept aside."""

    rgb: Image.Image
    alpha: Image.Image | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the upright image: the size the output will have."""
        return self.rgb.size


def _to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth greyscale ("I;16", "I", "F") scaled to 8 bits; Pillow's own convert would clip at 255."""
    values = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(values * 255.0 / peak), 0, 255).astype(np.uint8), mode="L")


def normalise(image: Image.Image) -> SourceImage:
    """EXIF orientation applied; greyscale, palette, CMYK and 16-bit made RGB; alpha split off; first frame only."""
    notes = []
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        notes.append(f"animated image with {image.n_frames} frames: only the first frame is edited")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        alpha = image.getchannel("A")
        return SourceImage(image.convert("RGB"), alpha if alpha.getextrema() != (255, 255) else None, notes)
    return SourceImage(image.convert("RGB") if image.mode != "RGB" else image, None, notes)


def open_image(source: str | Path | bytes, max_pixels: int | None = None) -> SourceImage:
    """Decode a file (or bytes) into a :class:`SourceImage`; every failure is a one-line InputImageError."""
    limit = max_pixels or max_pixels_limit()
    if isinstance(source, bytes):
        name, handle = "<stdin>", io.BytesIO(source)
        if not source:
            raise InputImageError("the image on stdin is empty")
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise InputImageError(f"no such file: {name}")
        if path.is_dir():
            raise InputImageError(f"{name} is a directory, not an image")
        if path.stat().st_size == 0:
            raise InputImageError(f"{name} is empty")
        handle = io.BytesIO(path.read_bytes())
    # Pillow's own warnings ("Corrupt EXIF data") become one-line notes on the image instead of stderr noise.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = _decode(handle, name, limit)
    notes = (str(w.message).strip().splitlines() for w in caught if w.category is not Image.DecompressionBombWarning)
    source.warnings.extend(dict.fromkeys(f"{name}: {lines[0]}" for lines in notes if lines))
    return source


def _decode(handle: io.BytesIO, name: str, limit: int) -> SourceImage:
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit, checked before decoding
    try:
        image = Image.open(handle)
    except Image.UnidentifiedImageError:
        raise InputImageError(f"{name} is not a recognised image file") from None
    except OSError as exc:
        raise InputImageError(f"cannot read {name}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    width, height = image.size
    if width * height > limit:
        raise InputImageError(
            f"{name} is {width}x{height} ({width * height:,} pixels), over the limit of {limit:,}",
            hint="raise it with COMPACTEDIT_MAX_PIXELS if the file is trusted",
        )
    try:
        image.load()
        return normalise(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputImageError(f"{name} is truncated or corrupt ({exc})") from None


def as_source(image: Image.Image | SourceImage | str | Path) -> SourceImage:
    """Accept what the Python API accepts: a path, a PIL image, or an already normalised image."""
    if isinstance(image, SourceImage):
        return image
    if isinstance(image, Image.Image):
        return normalise(image)
    return open_image(image)


def restore_geometry(edited: Image.Image, source: SourceImage) -> Image.Image:
    """The model's output at the source's exact size, with the source's alpha put back."""
    if edited.size != source.size:
        edited = edited.resize(source.size, resample=Image.Resampling.LANCZOS)
    if source.alpha is not None:
        edited = edited.convert("RGB")
        edited.putalpha(source.alpha)
    return edited


# ---- writing outputs -------------------------------------------------------------------------------------------

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
TEMP_PREFIX = ".compactedit-"
TEMP_SUFFIX = ".part"


def encode(image: Image.Image, fmt: str, quality: int | None = None, **save_options) -> bytes:
    """The file bytes of ``image`` in ``fmt``; JPEG has no alpha channel, so it is flattened onto white."""
    if fmt == "jpeg" and image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    options = dict(save_options)
    if fmt in ("jpeg", "webp"):
        options["quality"] = DEFAULT_QUALITY if quality is None else quality
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMATS[fmt], **options)
    return buffer.getvalue()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the open file ``fd`` and flush it to disk (where a full disk shows up), closing ``fd``."""
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def output_error(exc: OSError, what: str) -> OutputError:
    """The OutputError for an OSError while writing ``what``: a full disk or quota is a DiskFullError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full while writing {what} ({exc.strerror})")
    return OutputError(f"cannot write {what}: {exc.strerror or exc}")


def write_atomic(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` all or nothing: a temporary file in the same folder, then a rename.

    Without ``overwrite`` an existing file is never replaced, even if it appears meanwhile (hard-link publish).
    With it, a symlink at ``path`` is replaced, never followed. On any failure, including Ctrl-C, the temporary
    file is removed and ``path`` is untouched.
    """
    folder = path.parent
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise output_error(exc, f"to {folder}") from None
    temp = Path(temp_name)
    try:
        _write_all(fd, data)
        temp.chmod(0o666 & ~_umask())
        if overwrite:
            temp.replace(path)
        else:
            try:
                os.link(temp, path)
            except FileExistsError:
                raise OutputError(f"{path} already exists", hint="use --overwrite to replace it") from None
            except OSError:  # a filesystem without hard links
                if path.exists():
                    raise OutputError(f"{path} already exists", hint="use --overwrite to replace it") from None
                temp.replace(path)
    except OSError as exc:
        raise output_error(exc, str(path)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _writer_alive(temp: Path) -> bool:
    """Whether the process named in a temporary file's name (``.compactedit-<pid>-….part``) still runs."""
    pid = temp.name[len(TEMP_PREFIX) :].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but is someone else's
        return True
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files a killed run left in ``folder``: only compactedit's own, and only of dead writers.

    A second batch writing into the same folder keeps its files.
    """
    removed = 0
    for temp in folder.rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        if _writer_alive(temp):
            continue
        with contextlib.suppress(OSError):
            temp.unlink()
            removed += 1
    return removed
