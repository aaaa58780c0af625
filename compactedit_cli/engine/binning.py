"""Resolution binning: the (height, width) the model runs at for an input of a given size.

VIBE trains on three aspect-ratio tables (512, 1024 and 2048 px classes) of 40 ratios each. The table is picked by
the input's area, and inside it the entry whose height/width ratio is nearest to the input's. The 512 and 2048
tables are the 1024 table scaled by 1/2 and 2, so one table of (ratio, h/64, w/64) carries all three.
"""

from __future__ import annotations

import math

# (ratio key, height / 64, width / 64) of the 1024-px class, in the reference's key order (ties go to the first).
_BASE_1024: tuple[tuple[str, int, int], ...] = (
    ("0.25", 8, 32), ("0.26", 8, 31), ("0.27", 8, 30), ("0.28", 8, 29), ("0.32", 9, 28),
    ("0.33", 9, 27), ("0.35", 9, 26), ("0.4", 10, 25), ("0.42", 10, 24), ("0.48", 11, 23),
    ("0.5", 11, 22), ("0.52", 11, 21), ("0.57", 12, 21), ("0.6", 12, 20), ("0.68", 13, 19),
    ("0.72", 13, 18), ("0.78", 14, 18), ("0.82", 14, 17), ("0.88", 15, 17), ("0.94", 15, 16),
    ("1.0", 16, 16), ("1.07", 16, 15), ("1.13", 17, 15), ("1.21", 17, 14), ("1.29", 18, 14),
    ("1.38", 18, 13), ("1.46", 19, 13), ("1.67", 20, 12), ("1.75", 21, 12), ("2.0", 22, 11),
    ("2.09", 23, 11), ("2.4", 24, 10), ("2.5", 25, 10), ("2.89", 26, 9), ("3.0", 27, 9),
    ("3.11", 28, 9), ("3.62", 29, 8), ("3.75", 30, 8), ("3.88", 31, 8), ("4.0", 32, 8),
)  # fmt: skip

# Area thresholds of the reference: 2·512² + 256² and 2·1024² + 512².
AREA_LIMIT_512 = 2 * 512**2 + 256**2
AREA_LIMIT_1024 = 2 * 1024**2 + 512**2

BIN_CLASSES = (512, 1024, 2048)


def aspect_ratio_table(bin_class: int) -> dict[str, tuple[int, int]]:
    """The reference's ratio table for one class (512, 1024 or 2048): ratio key -> (height, width)."""
    if bin_class not in BIN_CLASSES:
        raise ValueError(f"bin class must be one of {BIN_CLASSES}, not {bin_class}")
    unit = 64 * bin_class // 1024
    return {key: (h * unit, w * unit) for key, h, w in _BASE_1024}


# The largest size every bin of every class is a multiple of: the VAE factor times the DiT's patch must divide it.
BIN_MULTIPLE = math.gcd(*(side for c in BIN_CLASSES for bin_hw in aspect_ratio_table(c).values() for side in bin_hw))


def bin_class_for_area(height: int, width: int) -> int:
    """The table an input of this size uses, by the reference's area thresholds."""
    area = height * width
    if area <= AREA_LIMIT_512:
        return 512
    if area <= AREA_LIMIT_1024:
        return 1024
    return 2048


def closest_bin(height: int, width: int, bin_class: int | None = None) -> tuple[int, int]:
    """The (height, width) bin for an input of this size; ``bin_class`` forces a table."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    table = aspect_ratio_table(bin_class or bin_class_for_area(height, width))
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]
