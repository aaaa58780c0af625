"""Input normalisation: EXIF orientation, colour modes, bit depth, alpha, frames."""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest
from PIL import Image

from compactedit_cli.errors import InputImageError
from compactedit_cli.files.imaging import as_source, normalise, open_image, restore_geometry


def _marked(width: int = 40, height: int = 24) -> Image.Image:
    """An image whose top-left quadrant is red, so orientation is visible."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = (255, 0, 0)
    return Image.fromarray(array)


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    """JPEG bytes of ``image`` stored so that applying EXIF ``orientation`` gives ``image`` back."""
    inverse = {
        1: lambda im: im,
        2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
        4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
        6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
        7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
        8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    inverse(image).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    source = open_image(_with_orientation(_marked(), orientation))
    assert source.size == (40, 24)
    red = np.asarray(source.rgb)[:12, :20, 0].mean()
    other = np.asarray(source.rgb)[12:, 20:, 0].mean()
    assert red > 200 and other < 50


def test_alpha_is_kept_aside_and_restored():
    rgba = Image.new("RGBA", (30, 20), (10, 200, 30, 255))
    alpha = np.full((20, 30), 255, dtype=np.uint8)
    alpha[:, :10] = 0
    alpha[5:8, 15:18] = 128
    rgba.putalpha(Image.fromarray(alpha))
    source = normalise(rgba)
    assert source.rgb.mode == "RGB" and source.alpha is not None
    edited = Image.new("RGB", (64, 64), (1, 2, 3))  # the model's output at its own size
    back = restore_geometry(edited, source)
    assert back.mode == "RGBA" and back.size == (30, 20)
    assert np.array_equal(np.asarray(back)[..., 3], alpha)


def test_opaque_alpha_is_dropped():
    assert normalise(Image.new("RGBA", (8, 8), (1, 2, 3, 255))).alpha is None


def test_palette_with_transparency_keeps_alpha():
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))
    palette.info["transparency"] = 0
    source = normalise(palette)
    assert source.alpha is not None
    assert np.asarray(source.alpha)[:, 8:].max() == 0 and np.asarray(source.alpha)[:, :8].min() == 255


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    source = open_image(buffer.getvalue())
    grey = np.asarray(source.rgb)[..., 0]
    assert source.rgb.mode == "RGB"
    assert np.array_equal(grey.reshape(-1), np.arange(256))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_dark_sixteen_bit_greyscale_stays_dark(fmt):
    """A 16-bit file's levels are out of 65535 however dark it is (a night sky, a dark frame): its values all
    under 256 must not be read as 8-bit levels, 257 times brighter."""
    values = np.array([[0, 128, 255], [129, 200, 100]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format=fmt)
    grey = np.asarray(open_image(buffer.getvalue()).rgb)[..., 0]
    assert grey.tolist() == [[0, 0, 1], [1, 1, 0]]


def test_cmyk_and_greyscale_become_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    rgb = normalise(cmyk).rgb
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0))[0] > 200
    assert normalise(Image.new("L", (8, 8), 77)).rgb.getpixel((3, 3)) == (77, 77, 77)


def test_animated_gif_uses_first_frame_with_warning():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    source = open_image(buffer.getvalue())
    assert source.rgb.getpixel((5, 5))[0] > 200
    assert any("first frame" in w for w in source.warnings)


def _jpeg_with_corrupt_exif() -> bytes:
    """A valid JPEG whose EXIF block claims more IFD entries than it holds."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (1, 2, 3)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    segment = b"Exif\x00\x00" + b"II*\x00\x08\x00\x00\x00" + b"\xff\xff" + b"\x00" * 10
    app1 = b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment
    return data[:2] + app1 + data[2:]


def test_pillow_warnings_become_one_line_notes(recwarn):
    source = open_image(_jpeg_with_corrupt_exif())
    assert source.size == (16, 12)
    assert len(source.warnings) == 1 and source.warnings[0].startswith("<bytes>: Corrupt EXIF data")
    assert not [w for w in recwarn.list if "EXIF" in str(w.message)]  # not also a Python warning


def test_temporaries_of_live_writers_are_kept(tmp_path):
    import subprocess
    import sys

    from compactedit_cli.files.imaging import TEMP_PREFIX, TEMP_SUFFIX, remove_stale_temporaries, write_atomic

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{TEMP_PREFIX}{done.stdout.strip()}-abc{TEMP_SUFFIX}"  # its writer has exited
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def{TEMP_SUFFIX}"  # another batch, still writing
    legacy = tmp_path / f"{TEMP_PREFIX}xyz{TEMP_SUFFIX}"
    for path in (dead, live, legacy):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == 2
    assert live.exists() and not dead.exists() and not legacy.exists()
    write_atomic(tmp_path / "out.bin", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out.bin"])


def _saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


FUZZED_FORMATS = {
    "PNG": {},
    "JPEG": {},
    "GIF": {},
    "WEBP": {},
    "TIFF": {},
    "TIFF-LZW": {"compression": "tiff_lzw"},
    "BMP": {},
    "ICO": {},
    "TGA": {},
    "PPM": {},
    "PCX": {},
    "SGI": {},
    "QOI": {},
    "IM": {},
}


@pytest.mark.parametrize("name", list(FUZZED_FORMATS))
def test_any_decoder_failure_is_one_input_image_error(name):
    """Damaged files of many formats (bytes changed in the header or anywhere, or cut short): each either opens or
    is one InputImageError line naming the input; Pillow's ValueError, TypeError, struct.error and the like used to
    escape as internal errors."""
    rng = np.random.default_rng(sorted(FUZZED_FORMATS).index(name))
    pixels = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    original = _saved(pixels, name.split("-")[0], **FUZZED_FORMATS[name])
    for attempt in range(100):
        data = bytearray(original)
        reach = 200 if attempt % 2 else len(data)  # half the damage in the header, where parsers trip
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, min(len(data), reach)))] = int(rng.integers(0, 256))
        if attempt % 5 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            open_image(bytes(data))
        except InputImageError as exc:
            assert str(exc).startswith("<bytes> ") and "\n" not in str(exc)


def test_an_input_without_a_path_is_named_as_the_caller_says():
    """Bytes are "<bytes>" and a stream "<stdin>" unless the caller (the server: "the image") names them."""
    from compactedit_cli.files.masks import open_mask

    for source, default in ((b"not an image", "<bytes>"), (io.BytesIO(b"not an image"), "<stdin>")):
        with pytest.raises(InputImageError, match=f"^{default} is not a recognised image file"):
            open_image(source)
    with pytest.raises(InputImageError, match=r"^the upload is not a recognised image file"):
        open_image(io.BytesIO(b"not an image"), label="the upload")
    with pytest.raises(InputImageError, match=r"^the upload is over the limit of 10 bytes"):
        open_image(io.BytesIO(b"x" * 11), max_bytes=10, label="the upload")
    with pytest.raises(InputImageError, match=r"^the sketch is not a recognised image file"):
        open_mask(b"not an image", label="the sketch")


def test_a_stream_opens_like_its_bytes():
    data = _saved(_marked(), "PNG")
    from_stream = open_image(io.BufferedReader(io.BytesIO(data)))
    assert np.array_equal(np.asarray(from_stream.rgb), np.asarray(open_image(data).rgb))
    with pytest.raises(InputImageError, match="<stdin> is empty"):
        open_image(io.BytesIO(b""))


def test_a_pil_image_that_fails_to_load_is_an_input_image_error(tmp_path):
    """``as_source`` (the Python API) given a lazily opened image whose pixels are cut short."""
    path = tmp_path / "cut.png"
    data = _saved(Image.effect_noise((64, 64), 60), "PNG")
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image, pytest.raises(InputImageError, match="the image cannot be normalised"):
        as_source(image)


@pytest.mark.parametrize("after", [0, 100_000])
def test_a_stream_that_fails_to_read_is_an_input_image_error(after):
    """stdin whose read fails (EIO) at once, or in the pixels of a PNG whose header was read: one line each, not an
    internal error."""
    data = _saved(Image.effect_noise((512, 512), 60), "PNG")
    assert len(data) > after + 100_000  # the failure comes well inside the file

    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.taken = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            if self.taken >= after:
                raise OSError(errno.EIO, "Input/output error")
            chunk = data[self.taken : min(after, self.taken + len(buffer))]
            buffer[: len(chunk)] = chunk
            self.taken += len(chunk)
            return len(chunk)

    with pytest.raises(InputImageError, match=r"^<stdin> cannot be read \(.*Input/output error\)$"):
        open_image(io.BufferedReader(Failing(), buffer_size=16))
