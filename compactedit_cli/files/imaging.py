"""Images in and out: decode and normalise the source, map it to model pixels, and map the result back.

The geometry contract: the model runs at a binned size reached by a plain (non-uniform) resize of the whole image,
and its output is resized straight back to the input's exact size. Stretch and inverse stretch cancel, so content
stays aligned with the input, with no letterbox offset or zoom.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from PIL import Image, ImageFile, ImageOps, PngImagePlugin

from ..errors import DiskFullError, InputImageError, OutputError, UsageError
from ..options import DEFAULT_QUALITY
from . import colour, exif
from .exif import CameraMetadata

# Decoded-pixel limit: larger headers are refused before any pixel is decoded. Change with COMPACTEDIT_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 120_000_000

# The byte limit (COMPACTEDIT_MAX_BYTES) follows the pixel limit: an image at the pixel limit stored without any
# compression at 8-bit RGBA or CMYK (BMP, TIFF, PPM, PNG's stored blocks) takes 4 bytes a pixel, and compressed
# formats take fewer, so only an uncompressed high-bit-depth file needs the variable. The allowance is the most text
# metadata Pillow reads from one PNG (MAX_TEXT_MEMORY), so the byte limit never refuses what Pillow would accept.
BYTES_PER_PIXEL = 4
METADATA_ALLOWANCE = PngImagePlugin.MAX_TEXT_MEMORY

STDIN = "<stdin>"  # what errors call a stream input, and bytes input "<bytes>", unless the caller names it
_CHUNK = 64 * 1024  # stdin is read this much at a time, only as far as Pillow asks
_SPOOL_IN_MEMORY = 8 * 1024 * 1024  # stdin kept past this goes to a temporary file, so memory stays bounded
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
_BYTES_HINT = "raise it with COMPACTEDIT_MAX_BYTES if the file is trusted"

ImageFile.LOAD_TRUNCATED_IMAGES = False
T = TypeVar("T")


def _env_limit(variable: str, default: int) -> int:
    """A positive integer from the environment; anything else is a usage error (exit 2), not a silent default."""
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        raise UsageError(f"{variable} must be an integer, got {value!r}") from None
    if limit <= 0:
        raise UsageError(f"{variable} must be positive, got {limit}")
    return limit


def max_pixels_limit() -> int:
    """The decompression-bomb limit in pixels (env ``COMPACTEDIT_MAX_PIXELS`` overrides the default)."""
    return _env_limit("COMPACTEDIT_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def max_bytes_limit(max_pixels: int | None = None) -> int:
    """The most bytes an input file or stdin may hold (env ``COMPACTEDIT_MAX_BYTES``; else from the pixel limit)."""
    pixels = max_pixels or max_pixels_limit()
    return _env_limit("COMPACTEDIT_MAX_BYTES", pixels * BYTES_PER_PIXEL + METADATA_ALLOWANCE)


@dataclass
class SourceImage:
    """An input image made ready for the model: upright sRGB, with any alpha kept aside.

    ``colour_managed`` says an embedded ICC profile was honoured (the pixels were converted to sRGB, and outputs
    are tagged sRGB); ``camera`` is the input's EXIF and XMP, which outputs keep as the EXIF policy says.
    """

    rgb: Image.Image
    alpha: Image.Image | None = None
    warnings: list[str] = field(default_factory=list)
    colour_managed: bool = False
    camera: CameraMetadata | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the upright image: the size the output will have."""
        return self.rgb.size


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
HIGH_BIT_MODES = (*SIXTEEN_BIT_MODES, "I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth greyscale ("I;16", "I", "F") scaled to 8 bits; Pillow's own convert would clip at 255.

    A 16-bit mode's levels are out of 65535 however dark the picture; "I" and "F" have no range of their own (an
    8-bit picture converted to them keeps levels up to 255), so theirs is told by the values: a float picture
    whose values stay within 0..1 (as numpy and OpenCV write masks and linear images) is out of 1.
    """
    import numpy as np  # here, not at the top: a call that fails on its arguments never pays numpy's import

    values = np.asarray(image, dtype=np.float64)
    top = values.max(initial=0)
    if image.mode in SIXTEEN_BIT_MODES or top > 255:
        peak = 65535.0
    else:
        peak = 1.0 if image.mode == "F" and top <= 1.0 else 255.0
    return Image.fromarray(np.clip(np.rint(values * 255.0 / peak), 0, 255).astype(np.uint8), mode="L")


def normalise(image: Image.Image, name: str = "the image") -> SourceImage:
    """EXIF orientation applied; the colour profile honoured (to sRGB); greyscale, palette, CMYK and 16-bit made
    RGB; alpha split off; first frame only. The EXIF and XMP are read before the orientation is applied."""
    notes = []
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        notes.append(f"animated image with {image.n_frames} frames: only the first frame is edited")
    icc = image.info.get("icc_profile")
    camera = exif.read(image)
    image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_BIT_MODES:
        image = to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    alpha = None
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("LA" if image.mode == "LA" else "RGBA")
        alpha = image.getchannel("A")
        image = image.convert("L" if image.mode == "LA" else "RGB")
        alpha = alpha if alpha.getextrema() != (255, 255) else None
    elif image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")
    rgb, managed = colour.to_srgb(image, icc, name, notes)
    return SourceImage(rgb, alpha, notes, colour_managed=managed, camera=camera)


def open_image(
    source: str | Path | bytes | BinaryIO,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    *,
    label: str | None = None,
) -> SourceImage:
    """Decode a file, bytes or a one-way stream (stdin) into a :class:`SourceImage`.

    Nothing is read whole before its header is checked: a file is refused by its size (and a FIFO, device, socket
    or folder by its kind) before it is read, and a stream is read only as far as Pillow asks, up to the byte
    limit. Every failure, whatever Pillow or the system raised, is a one-line InputImageError naming the input.
    """
    caught: list[warnings.WarningMessage] = []
    image, name = decode_input(source, normalise, max_pixels, max_bytes, caught, label=label)
    notes = (str(w.message).strip().splitlines() for w in caught)
    image.warnings.extend(dict.fromkeys(f"{name}: {lines[0]}" for lines in notes if lines))
    return image


def decode_input(
    source: str | Path | bytes | BinaryIO,
    finish: Callable[[Image.Image, str], T],
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    caught: list[warnings.WarningMessage] | None = None,
    *,
    label: str | None = None,
) -> tuple[T, str]:
    """``finish(decoded image, name)`` under :func:`open_image`'s bounded-read rules (masks share them), and the
    name errors give the input (a path, else ``label``); Pillow's warnings go to ``caught``."""
    pixels = max_pixels or max_pixels_limit()
    limit = max_bytes or max_bytes_limit(pixels)
    # Pillow's own warnings ("Corrupt EXIF data") become one-line notes on the image instead of stderr noise.
    with _opened(source, limit, label) as (handle, name), warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        result = _decode(handle, name, pixels, finish)
    if caught is not None:
        caught.extend(recorded)
    return result, name


@contextlib.contextmanager
def _opened(source: str | Path | bytes | BinaryIO, limit: int, label: str | None) -> Iterator[tuple[BinaryIO, str]]:
    """A seekable handle on ``source`` for Pillow, and the name errors give it."""
    if isinstance(source, bytes):
        name = label or "<bytes>"
        _check_size(len(source), limit, name)
        yield io.BytesIO(source), name
    elif isinstance(source, (str, Path)):
        with _open_file(Path(source), limit) as handle:
            yield handle, str(source)
    else:
        name = label or STDIN
        with _Spool(source, limit, name) as handle:
            try:
                empty = not handle.read(1)
            except OSError as exc:  # a read error on the stream itself (EIO, a closed terminal)
                raise _failure(exc, name, "cannot be read") from None
            if empty:
                raise InputImageError(f"{name} is empty")
            handle.seek(0)
            yield handle, name  # type: ignore[misc]


def _kind(mode: int) -> str | None:
    """What a file that is not a regular file is (None for a regular file)."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _check_kind(mode: int, name: str) -> None:
    kind = _kind(mode)
    if kind is not None:
        raise InputImageError(f"{name} is {kind}, not an image file")


def _check_size(size: int, limit: int, name: str) -> None:
    if size == 0:
        raise InputImageError(f"{name} is empty")
    if size > limit:
        raise InputImageError(f"{name} is {size:,} bytes, over the limit of {limit:,} bytes", hint=_BYTES_HINT)


def _open_file(path: Path, limit: int) -> BinaryIO:
    """``path`` opened for reading once its kind and size are known to be an image's; its bytes are not read yet.

    The kind is checked before opening (opening a socket fails oddly) and again on the open file, which a
    non-blocking open makes safe even if a FIFO replaced the file meanwhile.
    """
    name = str(path)
    try:
        _check_kind(path.stat().st_mode, name)
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise InputImageError(f"no such file: {name}") from None
    except OSError as exc:
        raise InputImageError(f"cannot open {name}: {exc.strerror or exc}") from None
    handle = os.fdopen(fd, "rb")  # O_NONBLOCK does not change reads of a regular file
    try:
        info = os.fstat(fd)
        _check_kind(info.st_mode, name)
        _check_size(info.st_size, limit, name)
    except BaseException:
        handle.close()
        raise
    return handle


class _Spool(io.RawIOBase):
    """A one-way stream (stdin) made seekable for Pillow, read only as far as Pillow asks.

    So the header is checked before the body is read, and a stream that is not an image is refused after a few
    kilobytes. What was read is kept (in memory, then in a temporary file) up to ``limit`` bytes; reading past it
    raises the byte-limit error at once.
    """

    def __init__(self, stream: BinaryIO, limit: int, name: str) -> None:
        super().__init__()
        self._stream = stream
        self._limit = limit
        self._name = name
        self._kept = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115 (closed by close)
        self._size = 0  # bytes read from the stream so far (all kept)
        self._ended = False
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._fill(None)
            offset += self._size
        elif whence == io.SEEK_CUR:
            offset += self._position
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        self._position = offset
        return offset

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self._fill(self._position + len(buffer))
        self._kept.seek(self._position)
        count = self._kept.readinto(buffer)
        self._position += count
        return count

    def _fill(self, end: int | None) -> None:
        """Read the stream until ``end`` bytes are kept or it ends (``None``: until it ends)."""
        while not self._ended and (end is None or self._size < end):
            data = self._stream.read(min(_CHUNK, self._limit + 1 - self._size))
            if not data:
                self._ended = True
                return
            self._kept.seek(self._size)
            self._kept.write(data)
            self._size += len(data)
            if self._size > self._limit:
                raise InputImageError(f"{self._name} is over the limit of {self._limit:,} bytes", hint=_BYTES_HINT)

    def close(self) -> None:
        self._kept.close()
        super().close()


def _failure(exc: Exception, name: str, what: str) -> InputImageError:
    """The one-line error for anything ``exc`` raised while reading ``name``; ``what`` says which stage failed."""
    if isinstance(exc, InputImageError):  # already ours (the stream's byte limit)
        return exc
    detail = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    # Pillow names its PNG text limits (MAX_TEXT_CHUNK, MAX_TEXT_MEMORY) in these errors. The pixels may be fine,
    # but the file is refused rather than read without its text: Pillow skips such text only under
    # LOAD_TRUNCATED_IMAGES, which would also let truncated pixels through, and text that inflates a thousandfold is
    # an attack more often than a photo (README, "Errors and exit codes").
    if isinstance(exc, OSError) and exc.errno is not None:  # the system failed to read (Pillow's own have none)
        return InputImageError(f"{name} cannot be read ({detail})")
    if isinstance(exc, MemoryError):
        return InputImageError(f"{name} is too large to decode in the memory available")
    if isinstance(exc, ValueError) and "MAX_TEXT" in detail:
        return InputImageError(f"{name} has text metadata (zTXt, iTXt or XMP) over Pillow's size limits ({detail})")
    return InputImageError(f"{name} {what} ({detail})")


# ISO-BMFF brands of HEIF files (HEIC from iPhones, and other HEIF codecs) and of AVIF files.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"heif"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
HEIF_HINT = "install the heif extra: pip install 'compactedit[heif]'"


@functools.cache
def heif_support() -> bool:
    """Whether HEIC/HEIF can be read: the optional ``pillow-heif`` (``compactedit[heif]``), registered with Pillow
    once. AVIF is Pillow's own where the installed Pillow has it."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _unrecognised(handle: BinaryIO, name: str) -> InputImageError:
    """Why Pillow could not identify the file: a HEIF or AVIF without the support to read it, or not an image."""
    handle.seek(0)
    head = handle.read(12)
    brand = head[8:12] if head[4:8] == b"ftyp" else b""
    if brand in _HEIF_BRANDS:
        return InputImageError(f"{name} is a HEIC/HEIF image, which needs pillow-heif", hint=HEIF_HINT)
    if brand in _AVIF_BRANDS:
        return InputImageError(f"{name} is an AVIF image, and this Pillow cannot read AVIF", hint="upgrade Pillow")
    return InputImageError(f"{name} is not a recognised image file")


def _identify(handle: BinaryIO) -> Image.Image:
    """Pillow's (lazy) image of ``handle``. A file that none of Pillow's own plugins identifies (a HEIC/HEIF) is
    tried again with pillow-heif registered, so only such a file pays for importing pillow-heif."""
    try:
        return Image.open(handle)
    except Image.UnidentifiedImageError:
        handle.seek(0)
        if not heif_support():
            raise
        return Image.open(handle)


def _decode(handle: BinaryIO, name: str, limit: int, finish: Callable[[Image.Image, str], T]) -> T:
    """Header, pixel limit, then pixels: anything but an interrupt becomes an InputImageError."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit, checked before decoding
    try:
        try:
            image = _identify(handle)
        except Image.UnidentifiedImageError:
            raise _unrecognised(handle, name) from None
        except Exception as exc:
            raise _failure(exc, name, "cannot be read") from None
        width, height = image.size
        if width * height > limit:
            raise InputImageError(
                f"{name} is {width}x{height} ({width * height:,} pixels), over the limit of {limit:,}",
                hint="raise it with COMPACTEDIT_MAX_PIXELS if the file is trusted",
            )
        try:
            image.load()
            return finish(image, name)
        except Exception as exc:
            raise _failure(exc, name, "is truncated or corrupt") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def as_source(image: Image.Image | SourceImage | str | Path) -> SourceImage:
    """Accept what the Python API accepts: a path, a PIL image, or an already normalised image."""
    if isinstance(image, SourceImage):
        return image
    if isinstance(image, Image.Image):
        try:
            return normalise(image)
        except Exception as exc:
            raise _failure(exc, "the image", "cannot be normalised") from None
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
