"""Output geometry: binning as the reference bins, and content that lands where it was in the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from compactedit_cli.engine.binning import (
    BIN_CLASSES,
    BIN_MULTIPLE,
    aspect_ratio_table,
    bin_class_for_area,
    closest_bin,
)
from compactedit_cli.engine.pixels import to_model_pixels, to_pil
from compactedit_cli.files.imaging import normalise, restore_geometry

# (input h, w) -> bin (h, w): worked examples computed with the official functions (vibe-reference §3.1).
REFERENCE_BINS = [
    ((750, 1000), (832, 1152)),
    ((1080, 1920), (768, 1344)),
    ((1024, 1024), (1024, 1024)),
    ((512, 768), (416, 608)),
    ((600, 600), (512, 512)),
    ((3000, 4000), (1664, 2304)),
    ((2160, 3840), (1536, 2688)),
]


@pytest.mark.parametrize(("size", "expected"), REFERENCE_BINS)
def test_bins_match_reference_examples(size, expected):
    assert closest_bin(*size) == expected


def test_area_thresholds():
    assert bin_class_for_area(768, 768) == 512  # 589,824 = 2·512² + 256², inclusive
    assert bin_class_for_area(768, 769) == 1024
    assert bin_class_for_area(1536, 1536) == 1024  # 2,359,296 = 2·1024² + 512², inclusive
    assert bin_class_for_area(1536, 1537) == 2048


def test_tables_agree_with_pixart_bins():
    """Where diffusers' PixArt tables have the same ratio key, the size is the same (an independent source)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    for bin_class, pixart in (
        (512, ASPECT_RATIO_512_BIN),
        (1024, ASPECT_RATIO_1024_BIN),
        (2048, ASPECT_RATIO_2048_BIN),
    ):
        table = aspect_ratio_table(bin_class)
        assert len(table) == 40
        shared = set(table) & set(pixart)
        assert len(shared) >= 33
        for key in shared:
            assert table[key] == tuple(int(v) for v in pixart[key]), (bin_class, key)
        step = {512: 32, 1024: 64, 2048: 128}[bin_class]
        assert all(h % step == 0 and w % step == 0 for h, w in table.values())


def test_bin_multiple_is_the_finest_step_of_all_tables():
    """The loader checks the VAE factor (times the DiT patch) against it: 32, the 512 class's step."""
    sides = [side for c in BIN_CLASSES for bin_hw in aspect_ratio_table(c).values() for side in bin_hw]
    assert BIN_MULTIPLE == 32
    assert all(side % BIN_MULTIPLE == 0 for side in sides)
    assert aspect_ratio_table(512)["0.32"] == (288, 896)  # 9 x 32: no 64x VAE can run this bin


def test_extreme_ratios_use_the_end_bins():
    assert closest_bin(800, 100) == (1024, 256)  # 8:1 tall -> ratio 4.0 bin
    assert closest_bin(100, 800) == (256, 1024)


def _dot_image(width: int, height: int, x: int, y: int) -> Image.Image:
    """A grey image with one bright 3x3 square centred at (x, y)."""
    array = np.full((height, width, 3), 60, dtype=np.uint8)
    array[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = 250
    return Image.fromarray(array)


def _bright_centre(image: Image.Image) -> tuple[float, float]:
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    weights = np.clip(grey - 150, 0, None)
    ys, xs = np.indices(grey.shape)
    return float((xs * weights).sum() / weights.sum()), float((ys * weights).sum() / weights.sum())


@pytest.mark.parametrize(
    ("width", "height"),
    [(640, 640), (480, 720), (1000, 750), (1920, 1080), (200, 1600), (1600, 200), (333, 517)],
)
def test_geometry_path_keeps_content_aligned(width, height):
    """Normalise, bin, resize to the bin, resize back: a feature stays within one pixel of where it was."""
    for fx, fy in ((0.25, 0.3), (0.7, 0.8), (0.5, 0.5)):
        x, y = int(width * fx), int(height * fy)
        source = normalise(_dot_image(width, height, x, y))
        bin_h, bin_w = closest_bin(height, width)
        as_model_output = to_pil(to_model_pixels(source.rgb, bin_h, bin_w))[0]
        assert as_model_output.size == (bin_w, bin_h)
        back = restore_geometry(as_model_output, source)
        assert back.size == (width, height)
        cx, cy = _bright_centre(back)
        assert abs(cx - x) <= 1 and abs(cy - y) <= 1, (cx, cy, x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_pil_rounds_as_the_reference_does(dtype):
    """The reference's conversion, in numpy on the host: (x / 2 + 0.5) clamped, times 255, rounded half to even."""
    generator = torch.Generator().manual_seed(0)
    decoded = (torch.rand(2, 3, 17, 11, generator=generator) * 2.4 - 1.2).to(dtype)
    decoded[0, 0, 0, :6] = torch.tensor([(2 * k + 1) / 255 - 1 for k in range(6)])  # exact half levels
    expected = np.round((decoded.float() / 2 + 0.5).clamp(0, 1).numpy() * 255).astype(np.uint8)
    images = to_pil(decoded)
    assert [image.mode for image in images] == ["RGB", "RGB"]
    np.testing.assert_array_equal(np.stack([np.asarray(i) for i in images]), expected.transpose(0, 2, 3, 1))
