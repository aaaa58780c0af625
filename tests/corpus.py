"""A corpus of bad and unusual inputs, generated on the fly (no binary blobs in the repository).

Each generator writes one input under a folder and returns its path. ``IMAGE_CASES`` pairs them with the documented
outcome, which ``test_corpus.py`` checks through both ``compactedit edit`` and ``compactedit batch``; README's
"Errors and exit codes" lists the same cases.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

Generator = Callable[[Path], Path]

# (width, height): multiples of 32, so --no-binning runs at exactly this size, and large enough (10x6 latents) for
# the tiny random model's output to keep the marked layout clearly (smaller sizes drown it in noise).
MARKED_SIZE = (320, 192)


def marked(size: tuple[int, int] = MARKED_SIZE) -> Image.Image:
    """Black with a white top-left quadrant: the tiny model's output keeps that layout, so orientation shows."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = 255
    return Image.fromarray(array)


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    width, height = size
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def _save(folder: Path, name: str, image: Image.Image, **options) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    image.save(path, **options)
    return path


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


# The transposition that EXIF orientation N undoes: storing transpose(image) with tag N displays ``image``.
_STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_rotated(orientation: int) -> Generator:
    """A JPEG stored sideways/mirrored whose EXIF orientation tag makes it display as :func:`marked`."""

    def make(folder: Path) -> Path:
        upright = marked()
        method = _STORED[orientation]
        stored = upright if method is None else upright.transpose(method)
        exif = Image.Exif()
        exif[0x0112] = orientation
        return _save(folder, f"exif{orientation}.jpg", stored, quality=95, exif=exif)

    return make


def cmyk_jpeg(folder: Path) -> Path:
    return _save(folder, "cmyk.jpg", noise((96, 64), "CMYK"), quality=90)


def sixteen_bit_png(folder: Path) -> Path:
    ramp = (np.arange(96 * 64, dtype=np.uint32) * 10 % 65536).astype(np.uint16).reshape(64, 96)
    return _save(folder, "sixteen.png", Image.fromarray(ramp))


def greyscale_jpeg(folder: Path) -> Path:
    return _save(folder, "grey.jpg", noise((96, 64), "L"))


def palette_png(folder: Path) -> Path:
    """A palette PNG whose colour 0 is transparent: the left half."""
    image = noise((96, 64)).quantize(16)
    image.paste(0, (0, 0, 48, 64))
    return _save(folder, "palette.png", image, transparency=0)


def rgba_png(folder: Path) -> Path:
    image = noise((96, 64)).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((96, 64)))
    return _save(folder, "rgba.png", image)


def _frames(size: tuple[int, int]) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for colour in ((250, 20, 20), (20, 20, 250), (20, 250, 20))]


def animated_gif(folder: Path) -> Path:
    first, *rest = _frames((96, 64))
    return _save(folder, "animated.gif", first, save_all=True, append_images=rest, duration=100)


def animated_webp(folder: Path) -> Path:
    first, *rest = _frames((96, 64))
    return _save(folder, "animated.webp", first, save_all=True, append_images=rest, duration=100, lossless=True)


def progressive_jpeg(folder: Path) -> Path:
    return _save(folder, "progressive.jpg", noise((96, 64)), progressive=True, quality=90)


def tiny_8x8(folder: Path) -> Path:
    return _save(folder, "tiny.png", noise((8, 8)))


def tall_1x8(folder: Path) -> Path:
    return _save(folder, "tall.png", noise((48, 384)))


def wide_8x1(folder: Path) -> Path:
    return _save(folder, "wide.png", noise((384, 48)))


def non_ascii_name(folder: Path) -> Path:
    return _save(folder, "фото été 日本 🌅.png", noise((96, 64)))


def large_photo(folder: Path, size: tuple[int, int] = (8000, 6000)) -> Path:
    """A smooth gradient photo (compresses to under a megabyte, decodes to size[0]·size[1]·3 bytes)."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    array = np.empty((height, width, 3), dtype=np.uint8)
    array[..., 0] = x
    array[..., 1] = y
    array[..., 2] = (x + y) / 2
    return _save(folder, "large.jpg", Image.fromarray(array), quality=80)


# ---- inputs that must fail cleanly -------------------------------------------------------------------------------


def missing_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "missing.png"


def directory(folder: Path) -> Path:
    path = folder / "a-folder.png"
    path.mkdir(parents=True)
    return path


def empty_file(folder: Path) -> Path:
    return _write(folder, "empty.jpg", b"")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_png(folder: Path) -> Path:
    data = encoded(noise((96, 64)), "PNG")
    return _write(folder, "truncated.png", data[: len(data) // 2])


def truncated_jpeg(folder: Path) -> Path:
    data = encoded(noise((96, 64)), "JPEG")
    return _write(folder, "truncated.jpg", data[: len(data) // 2])


def text_named_png(folder: Path) -> Path:
    return _write(folder, "notes.png", b"shopping list: eggs, milk\n")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_head(size: tuple[int, int], bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG's signature and IHDR chunk: all Pillow needs to know the format and the size."""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", *size, bit_depth, colour_type, 0, 0, 0))


def bomb_png(folder: Path, size: tuple[int, int] = (50_000, 50_000)) -> Path:
    """A valid PNG header claiming ``size`` pixels over a few bytes of data: decoding it would take 7.5 GB."""
    data = png_head(size) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + png_chunk(b"IEND", b"")
    return _write(folder, "bomb.png", data)


def _with_chunks(before_idat: bytes = b"", after_idat: bytes = b"") -> bytes:
    """A small valid PNG with extra chunks spliced in before its first IDAT and before IEND."""
    data = encoded(noise((96, 64)), "PNG")
    idat, iend = data.index(b"IDAT") - 4, data.index(b"IEND") - 4
    return data[:idat] + before_idat + data[idat:iend] + after_idat + data[iend:]


# Text that inflates past Pillow's one-chunk limit (PngImagePlugin.MAX_TEXT_CHUNK, 1 MiB) from about 2 KB.
_INFLATING = zlib.compress(b"\0" * 4_000_000, 9)


def ztxt_bomb(folder: Path) -> Path:
    """A zTXt comment before the pixels (read with the header) that inflates to 4 MB."""
    return _write(folder, "ztxt-bomb.png", _with_chunks(png_chunk(b"zTXt", b"Comment\0\0" + _INFLATING)))


def xmp_itxt_bomb(folder: Path) -> Path:
    """Compressed XMP in an iTXt chunk after the pixels (read when the pixels are decoded)."""
    xmp = png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + _INFLATING)
    return _write(folder, "xmp-bomb.png", _with_chunks(after_idat=xmp))


def text_over_budget(folder: Path) -> Path:
    """70 zTXt chunks of 1 MB each: every one within Pillow's chunk limit, together over its 64 MiB text budget."""
    one = zlib.compress(b"a" * 1_000_000, 9)
    chunks = b"".join(png_chunk(b"zTXt", b"note%d\0\0" % n + one) for n in range(70))
    return _write(folder, "text-budget.png", _with_chunks(chunks))


def sparse_2gb(folder: Path) -> Path:
    """``truncate -s 2G big.png``: 2 GiB of zeros that take no disk space, over the default byte limit."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "big.png"
    with path.open("wb") as handle:
        handle.truncate(2 * 1024**3)
    return path


def fifo(folder: Path) -> Path:
    """A named pipe with no writer: opening it for reading the usual way would wait for ever."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this platform")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipe.png"
    os.mkfifo(path)
    return path


def device(folder: Path) -> Path:
    """A link to /dev/zero, an endless character device."""
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero on this platform")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "zero.png"
    path.symlink_to("/dev/zero")
    return path


def unix_socket(folder: Path) -> Path:
    """A Unix socket file (left behind by a closed socket)."""
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no Unix sockets on this platform")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sock.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
    return path


# ---- the documented outcomes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Works:
    """The edit succeeds: an output of ``size`` (the upright input's), alpha kept if ``alpha``, an optional warning."""

    size: tuple[int, int]
    alpha: bool = False
    warning: str | None = None
    binning: bool = False  # run with resolution binning (the cases about bins); else --no-binning, faster
    model_size: tuple[int, int] | None = None  # the (width, height) the model ran at, when the case is about it
    upright: bool = False  # the input displays as marked(): its white quadrant must come out top left


@dataclass(frozen=True)
class Fails:
    """The edit is refused: exit ``code`` (``edit``), one ``error:`` line containing ``message``, no output."""

    code: int
    message: str


@dataclass(frozen=True)
class ImageCase:
    name: str
    make: Generator
    outcome: Works | Fails
    output: str = "out.png"


IMAGE_CASES = [
    *(
        ImageCase(f"exif-orientation-{n}", exif_rotated(n), Works(MARKED_SIZE, upright=True), output="out.jpg")
        for n in range(1, 9)
    ),
    ImageCase("cmyk-jpeg", cmyk_jpeg, Works((96, 64))),
    ImageCase("16-bit-png", sixteen_bit_png, Works((96, 64))),
    ImageCase("greyscale-jpeg", greyscale_jpeg, Works((96, 64))),
    ImageCase("palette-png-transparency", palette_png, Works((96, 64), alpha=True)),
    ImageCase("rgba-to-png", rgba_png, Works((96, 64), alpha=True)),
    ImageCase("rgba-to-webp", rgba_png, Works((96, 64), alpha=True), output="out.webp"),
    ImageCase("rgba-to-jpeg-flattened", rgba_png, Works((96, 64)), output="out.jpg"),
    ImageCase("animated-gif", animated_gif, Works((96, 64), warning="only the first frame")),
    ImageCase("animated-webp", animated_webp, Works((96, 64), warning="only the first frame")),
    ImageCase("progressive-jpeg", progressive_jpeg, Works((96, 64))),
    ImageCase("tiny-8x8", tiny_8x8, Works((8, 8))),
    ImageCase("aspect-1-to-8", tall_1x8, Works((48, 384), binning=True, model_size=(256, 1024))),
    ImageCase("aspect-8-to-1", wide_8x1, Works((384, 48), binning=True, model_size=(1024, 256))),
    ImageCase("non-ascii-name", non_ascii_name, Works((96, 64))),
    ImageCase("missing-file", missing_file, Fails(3, "no such file")),
    ImageCase("directory", directory, Fails(3, "is a directory, not an image file")),
    ImageCase("empty-file", empty_file, Fails(3, "is empty")),
    ImageCase("truncated-png", truncated_png, Fails(3, "truncated or corrupt")),
    ImageCase("truncated-jpeg", truncated_jpeg, Fails(3, "truncated or corrupt")),
    ImageCase("text-named-png", text_named_png, Fails(3, "not a recognised image")),
    ImageCase("decompression-bomb", bomb_png, Fails(3, "50000x50000 (2,500,000,000 pixels), over the limit")),
    ImageCase("ztxt-metadata-bomb", ztxt_bomb, Fails(3, "text metadata (zTXt, iTXt or XMP) over Pillow's")),
    ImageCase("xmp-itxt-metadata-bomb", xmp_itxt_bomb, Fails(3, "text metadata (zTXt, iTXt or XMP) over Pillow's")),
    ImageCase("text-chunks-over-budget", text_over_budget, Fails(3, "text metadata (zTXt, iTXt or XMP) over")),
    ImageCase("sparse-2gb-file", sparse_2gb, Fails(3, "big.png is 2,147,483,648 bytes, over the limit of")),
    ImageCase("fifo", fifo, Fails(3, "is a FIFO (named pipe), not an image file")),
    ImageCase("character-device", device, Fails(3, "is a character device, not an image file")),
    ImageCase("unix-socket", unix_socket, Fails(3, "is a socket, not an image file")),
]
