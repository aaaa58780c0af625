"""Generation that knows the mask: outside it, the latents are pulled back to the source's at every step.

The usual inpainting technique: after each scheduler step, the latent cells the mask does not reach are replaced by
the source latents noised to the level of the next step, so the model generates inside the mask in the context of
an unchanged surrounding and blends the edit at its edge. A cell is editable when any photo pixel it covers is (the
mask dilated to whole latent cells). Pixel-space composite-back (:mod:`~compactedit_cli.files.compositing`) still
runs afterwards: this only changes what the model draws, not the outside-the-mask guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def latent_cells(editable: np.ndarray, height: int, width: int) -> np.ndarray:
    """``editable`` (photo pixels, H x W) mapped onto a latent grid of ``height`` x ``width`` cells: a cell is
    editable when any pixel of its footprint is (footprints as the plain resize to the model size lays them)."""
    rows, cols = editable.shape
    total = np.zeros((rows + 1, cols + 1), dtype=np.int64)
    total[1:, 1:] = editable.astype(np.int64).cumsum(0).cumsum(1)
    top = np.floor(np.arange(height) * rows / height).astype(int)
    bottom = np.maximum(np.ceil(np.arange(1, height + 1) * rows / height).astype(int), top + 1)
    left = np.floor(np.arange(width) * cols / width).astype(int)
    right = np.maximum(np.ceil(np.arange(1, width + 1) * cols / width).astype(int), left + 1)
    t, b, lo, hi = top[:, None], bottom[:, None], left[None, :], right[None, :]
    return (total[b, hi] - total[t, hi] - total[b, lo] + total[t, lo]) > 0


def _alpha_sigma(scheduler, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How a scheduler mixes signal and noise at ``sigma``: flow matching's (1 - sigma, sigma) unless it says."""
    mix = getattr(scheduler, "_sigma_to_alpha_sigma_t", None)
    if mix is not None:  # DPM-Solver's, which knows its flow sigmas
        return mix(sigma)
    return 1 - sigma, sigma


@dataclass
class LatentBlend:
    """The kept cells (True: pulled back to the source), the source latents and the starting noise of each row."""

    keep: torch.Tensor
    source: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def make(cls, editable: np.ndarray, source: torch.Tensor, noise: torch.Tensor) -> LatentBlend:
        """For rows of ``source`` latents (B, C, h, w) and their ``noise``, under one ``editable`` pixel mask."""
        cells = latent_cells(editable, source.shape[2], source.shape[3])
        keep = torch.from_numpy(~cells)[None, None].to(source.device)
        return cls(keep, source.float(), noise.to(source.device, torch.float32))

    def __call__(self, scheduler, index: int, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` after step ``index``, the kept cells replaced by the source noised to the next level."""
        sigma = scheduler.sigmas[index + 1].to(latents.device, torch.float32)
        alpha, noise_level = _alpha_sigma(scheduler, sigma)
        noised = alpha * self.source + noise_level * self.noise
        return torch.where(self.keep, noised.to(latents.dtype), latents)
