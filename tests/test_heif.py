"""HEIC/HEIF input through the optional pillow-heif (``compactedit[heif]``), and a clear exit 3 without it."""

from __future__ import annotations

import io
import subprocess
import sys

import icc
import numpy as np
import pytest
from PIL import Image, ImageCms

from compactedit_cli.files import outputs
from compactedit_cli.files.imaging import open_image
from compactedit_cli.options import OutputOptions

pillow_heif = pytest.importorskip("pillow_heif")


def iphone_photo(path):
    """A HEIC as a phone writes it: Display P3, EXIF with GPS, taken sideways (orientation 6)."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Apple", "iPhone 15", 6
    exif.get_ifd(0x8769)[0x9003] = "2024:07:14 09:30:00"
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 30.0)})
    pixels = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    pillow_heif.from_pillow(image).save(path, quality=90, exif=exif.tobytes(), icc_profile=icc.display_p3())
    return path


def test_heic_gets_the_same_treatment_as_jpeg(tmp_path):
    source = open_image(iphone_photo(tmp_path / "IMG_0001.HEIC"))
    assert source.size == (40, 64)  # upright
    assert source.colour_managed and source.warnings == []
    out = tmp_path / "out.jpg"
    out.write_bytes(outputs.file_bytes(source.rgb, None, "jpeg", OutputOptions(metadata=False), source))  # type: ignore[arg-type]
    with Image.open(out) as image:
        exif = image.getexif()
        profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        assert image.size == (40, 64) and "sRGB" in ImageCms.getProfileDescription(profile)
        assert exif[0x010F] == "Apple" and exif.get_ifd(0x8769)[0x9003] == "2024:07:14 09:30:00"
        assert 0x0112 not in exif and exif.get_ifd(0x8825) == {}


def test_heic_without_the_extra_is_exit_3_naming_it(tmp_path, tiny_checkpoint):
    photo = iphone_photo(tmp_path / "IMG_0002.heic")
    blocker = "import sys; sys.modules['pillow_heif'] = None; from compactedit_cli.cli import main; main()"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            blocker,
            "edit",
            str(photo),
            "x",
            "-o",
            str(tmp_path / "o.png"),
            "-m",
            str(tiny_checkpoint),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "HEIC" in lines[0] and "compactedit[heif]" in lines[0]
    assert not (tmp_path / "o.png").exists()
