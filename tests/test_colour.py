"""Colour management on real files: embedded profiles honoured, outputs tagged sRGB, unusable profiles warned about.

The profiles are real ICC files written by tests/icc.py (Display P3, Adobe RGB compatible, grey, CMYK). Expected
colours come from two independent sources: LittleCMS applied by the test itself, and the colour spaces' own
matrices (ΔE in CIELAB, computed here with numpy).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import icc
import numpy as np
import pytest
from PIL import Image, ImageCms

from compactedit_cli.files import outputs
from compactedit_cli.files.imaging import open_image
from compactedit_cli.options import OutputOptions

SRGB = ImageCms.createProfile("sRGB")
PROFILES = {"display-p3": icc.display_p3, "adobe-rgb": icc.adobe_rgb}
PRIMARIES = {
    "display-p3": ([(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)], "srgb"),
    "adobe-rgb": ([(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)], 563 / 256),
}
SRGB_PRIMARIES = [(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)]


def _profile(data: bytes) -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(io.BytesIO(data))


def _scene(size=(64, 48), seed=0) -> Image.Image:
    """An sRGB scene: ramps of every hue with a little grain (a photo's, not noise a lossy encoder cannot keep)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=-1)
    noisy = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def _in_space(scene: Image.Image, icc_bytes: bytes) -> Image.Image:
    """The scene's colours written in another colour space (in gamut, as a camera would encode them)."""
    return ImageCms.profileToProfile(scene, SRGB, _profile(icc_bytes), outputMode="RGB")


def _viewed(path: Path) -> np.ndarray:
    """What a colour-managed viewer shows on an sRGB screen: the file's pixels through its embedded profile."""
    with Image.open(path) as image:
        embedded = image.info.get("icc_profile")
        image = image.convert("RGB")
        if embedded:
            image = ImageCms.profileToProfile(image, _profile(embedded), SRGB, outputMode="RGB")
        return np.asarray(image, dtype=np.float64)


def _lab(pixels: np.ndarray, primaries, curve) -> np.ndarray:
    """CIELAB (D50) of RGB pixels in a colour space, from its primaries and curve (no LittleCMS)."""
    v = pixels / 255.0
    srgb = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    linear = srgb if curve == "srgb" else v**curve
    xyz = linear @ icc._to_d50(primaries, icc.D65).T / icc.D50
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _write(source, path: Path, fmt: str) -> Path:
    """What compactedit writes for an edit that left every pixel as the model saw it (the unedited parts)."""
    options = OutputOptions(metadata=False, quality=100)
    path.write_bytes(outputs.file_bytes(source.rgb, None, fmt, options, source))  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("space", sorted(PROFILES))
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_wide_gamut_input_looks_the_same_after_the_round_trip(tmp_path, space, fmt):
    scene = _scene()
    encoded = _in_space(scene, PROFILES[space]())
    photo = tmp_path / "photo.png"
    encoded.save(photo, icc_profile=PROFILES[space]())

    source = open_image(photo)
    assert source.colour_managed and source.warnings == []
    # The model sees sRGB: what LittleCMS, applied here, makes of the input ...
    expected = np.asarray(ImageCms.profileToProfile(encoded, _profile(PROFILES[space]()), SRGB, outputMode="RGB"))
    assert np.abs(np.asarray(source.rgb, dtype=int) - expected).max() <= 1
    # ... which is not the input's numbers relabelled as sRGB.
    assert np.abs(np.asarray(encoded, dtype=int) - expected).mean() > 3

    out = _write(source, tmp_path / f"out.{fmt}", fmt)
    with Image.open(out) as image:
        assert "sRGB" in ImageCms.getProfileDescription(_profile(image.info["icc_profile"]))
    shown = _viewed(out)
    error = np.abs(shown - expected)
    if fmt == "png":
        assert error.max() <= 2
    assert error.mean() <= 2  # lossy formats: within the encoder's own error
    primaries, curve = PRIMARIES[space]
    delta_e = np.linalg.norm(
        _lab(shown, SRGB_PRIMARIES, "srgb") - _lab(np.asarray(encoded, float), primaries, curve), axis=-1
    )
    assert delta_e.mean() < (1.0 if fmt == "png" else 2.0)


def test_an_input_without_a_profile_is_srgb_and_stays_untagged(tmp_path):
    scene = _scene()
    photo = tmp_path / "plain.png"
    scene.save(photo)
    source = open_image(photo)
    assert not source.colour_managed
    assert np.array_equal(np.asarray(source.rgb), np.asarray(scene))
    with Image.open(_write(source, tmp_path / "out.png", "png")) as image:
        assert "icc_profile" not in image.info


def test_cmyk_jpeg_with_a_profile_is_converted_through_it(tmp_path):
    rng = np.random.default_rng(1)
    cmyk = Image.fromarray(rng.integers(0, 256, (32, 40, 4), dtype=np.uint8), mode="CMYK")
    photo = tmp_path / "print.jpg"
    cmyk.save(photo, quality=100, icc_profile=icc.cmyk_press())
    with Image.open(photo) as decoded:
        decoded = decoded.copy()  # the JPEG's own CMYK values, as any reader decodes them
    # Relative colorimetric with black-point compensation, as the README says (for print, BPC matters).
    expected = np.asarray(
        ImageCms.profileToProfile(
            decoded,
            _profile(icc.cmyk_press()),
            SRGB,
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode="RGB",
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
    )

    source = open_image(photo)
    assert source.colour_managed
    assert np.abs(np.asarray(source.rgb, dtype=int) - expected).max() <= 1
    assert np.abs(np.asarray(decoded.convert("RGB"), dtype=int) - expected).mean() > 5  # not the naive formula
    assert np.abs(_viewed(_write(source, tmp_path / "out.png", "png")) - expected).max() <= 1


def _png16(path: Path, pixels: np.ndarray, profile: bytes) -> Path:
    """A 16-bit RGB PNG with an iCCP chunk, written chunk by chunk (Pillow cannot write 48-bit RGB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"iCCP", b"P3\0\0" + zlib.compress(profile))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def test_16_bit_rgb_with_a_profile(tmp_path):
    encoded = np.asarray(_in_space(_scene(), icc.display_p3()), dtype=np.uint16)
    deep = encoded * 257 + np.random.default_rng(2).integers(0, 200, encoded.shape).astype(np.uint16)
    photo = _png16(tmp_path / "deep.png", deep, icc.display_p3())
    source = open_image(photo)
    assert source.colour_managed
    eight = Image.fromarray((deep >> 8).astype(np.uint8))
    expected = np.asarray(ImageCms.profileToProfile(eight, _profile(icc.display_p3()), SRGB, outputMode="RGB"))
    assert np.abs(np.asarray(source.rgb, dtype=int) - expected).max() <= 1


def test_16_bit_grey_with_a_grey_profile(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    photo = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(photo, icc_profile=icc.grey_gamma())
    source = open_image(photo)
    assert source.colour_managed and source.rgb.mode == "RGB"
    values = ramp / 65535.0
    expected = 255 * np.where(values**1.8 <= 0.0031308, 12.92 * values**1.8, 1.055 * values ** (1.8 / 2.4) - 0.055)
    got = np.asarray(source.rgb, dtype=float)
    assert np.abs(got[..., 0] - expected).max() <= 2  # gamma 1.8 grey shown on an sRGB screen
    assert np.array_equal(got[..., 0], got[..., 2])  # and still grey


@pytest.mark.parametrize("bad", [b"not an icc profile at all", icc.display_p3()[:200]])
def test_an_unparseable_profile_gives_one_warning_and_srgb(tmp_path, bad):
    scene = _scene()
    photo = tmp_path / "bad.png"
    scene.save(photo, icc_profile=bad)
    source = open_image(photo)
    assert not source.colour_managed
    assert len(source.warnings) == 1 and "colour profile" in source.warnings[0] and "sRGB" in source.warnings[0]
    assert np.array_equal(np.asarray(source.rgb), np.asarray(scene))


def test_a_profile_for_other_pixels_gives_one_warning(tmp_path):
    photo = tmp_path / "mismatch.png"
    _scene().save(photo, icc_profile=icc.cmyk_press())
    source = open_image(photo)
    assert not source.colour_managed and len(source.warnings) == 1 and "CMYK" in source.warnings[0]


def test_the_cli_tags_the_output_of_a_wide_gamut_photo(cli, tiny_checkpoint, tmp_path):
    photo = tmp_path / "iphone.jpg"
    _in_space(_scene(), icc.display_p3()).save(photo, quality=95, icc_profile=icc.display_p3())
    out = tmp_path / "out.jpg"
    result = cli("edit", photo, "warmer", "-o", out, "-m", tiny_checkpoint, "--steps", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["warnings"] == []
    with Image.open(out) as image:
        assert "sRGB" in ImageCms.getProfileDescription(_profile(image.info["icc_profile"]))
