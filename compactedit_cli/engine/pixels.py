"""Pixels to and from the model's tensors: the one place where images meet torch."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_model_pixels(rgb: Image.Image, height: int, width: int) -> torch.Tensor:
    """(1, 3, height, width) float32 in [-1, 1]: LANCZOS resize to the bin, as the reference's preprocessing."""
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_pil(decoded: torch.Tensor) -> list[Image.Image]:
    """VAE output (B, 3, H, W) in [-1, 1] -> 8-bit RGB images, rounded as the reference rounds (half to even).

    The rounding runs where the tensor is, so only the 8-bit pixels, a quarter of the float32 bytes, leave the device.
    """
    levels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in levels.permute(0, 2, 3, 1).cpu().numpy()]
