"""Classifier-free guidance over text and image: how many branches run, and how they combine.

Branch order follows the reference, each block holding all B rows:
  3 branches (g > 1, g_img >= 1): [cond + image, null + image, null + zero image]
      eps = eps_u + g (eps_t - eps_i) + g_img (eps_i - eps_u)
  2 branches (g > 1, g_img < 1):  [cond + image, null + image]
      eps = eps_n + g (eps_t - eps_n)
  1 branch   (g <= 1):            [cond + image], eps = eps_t
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    """The guidance scales and the branch count they imply."""

    text_scale: float
    image_scale: float

    @property
    def branches(self) -> int:
        if self.text_scale <= 1:
            return 1
        return 3 if self.image_scale >= 1 else 2

    def context(self, cond: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """Cross-attention context for all branches: [cond, null, null][:branches]."""
        return torch.cat([cond, null, null][: self.branches])

    def image_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Source-image latents for all branches: [image, image, zeros][:branches]."""
        return torch.cat([latents, latents, torch.zeros_like(latents)][: self.branches])

    def combine(self, pred: torch.Tensor) -> torch.Tensor:
        """One guided prediction from the stacked branch predictions."""
        if self.branches == 1:
            return pred
        if self.branches == 2:
            text, null = pred.chunk(2)
            return null + self.text_scale * (text - null)
        text, image, uncond = pred.chunk(3)
        return uncond + self.text_scale * (text - image) + self.image_scale * (image - uncond)
