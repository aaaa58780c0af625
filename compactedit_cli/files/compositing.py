"""Putting an edit back into the photo: the crop the model edits, the feathered paste, and colour matching.

The guarantee (README, "Editing only part of a photo"): outside the mask, past the feather band, the output's pixels
are the normalised input's own, bit for bit, whatever the model did; inside the mask they are the model's; in the
band they fade from one to the other. Everything here works on the photo's full-resolution pixels after decoding,
so it holds for alpha, 16-bit and colour-managed inputs alike (their normalised pixels are what the band fades to).
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..options import CROP_CONTEXT, DEFAULT_FEATHER, MIN_CROP_MARGIN, feather
from .imaging import SourceImage
from .masks import Mask

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right and bottom exclusive, as PIL crops


def bounding_box(editable: np.ndarray) -> Box | None:
    """The smallest box holding every editable pixel, or None for a mask with none."""
    rows, cols = np.flatnonzero(editable.any(axis=1)), np.flatnonzero(editable.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def grow(box: Box, margin: int, size: tuple[int, int]) -> Box:
    """``box`` widened by ``margin`` on every side, within an image of ``size``."""
    left, top, right, bottom = box
    width, height = size
    return max(0, left - margin), max(0, top - margin), min(width, right + margin), min(height, bottom + margin)


def crop_box(editable: np.ndarray, band: int) -> Box | None:
    """The part of the photo ``--crop-to-mask`` edits: the mask's box with context around it (``CROP_CONTEXT`` of
    its longer side, and always the feather band plus ``MIN_CROP_MARGIN``, so the band lies inside the crop)."""
    box = bounding_box(editable)
    if box is None:
        return None
    longer = max(box[2] - box[0], box[3] - box[1])
    margin = max(round(CROP_CONTEXT * longer), band + MIN_CROP_MARGIN)
    return grow(box, margin, (editable.shape[1], editable.shape[0]))


def _spread(reached: np.ndarray, square: bool) -> np.ndarray:
    """``reached`` grown by one pixel: to the 8 neighbours (``square``) or the 4."""
    rows = reached.copy()
    rows[1:] |= reached[:-1]
    rows[:-1] |= reached[1:]
    across = rows if square else reached
    out = rows.copy()
    out[:, 1:] |= across[:, :-1]
    out[:, :-1] |= across[:, 1:]
    return out


def feather_weights(editable: np.ndarray, band: int) -> np.ndarray:
    """How much of the edit each pixel takes (float32, H x W): 1 in the mask, falling linearly to 0 over ``band``
    pixels outside it, and exactly 0 from ``band`` pixels away. Distance is counted in steps that alternate the 8
    and the 4 neighbours, so the band follows the mask's edge as an octagon rather than a square."""
    weights = editable.astype(np.float32)
    box = bounding_box(editable)
    if band <= 1 or box is None:
        return weights
    window = grow(box, band, (editable.shape[1], editable.shape[0]))
    left, top, right, bottom = window
    reached = editable[top:bottom, left:right].copy()
    local = weights[top:bottom, left:right]
    for step in range(1, band):
        grown = _spread(reached, square=step % 2 == 1)
        local[grown & ~reached] = 1.0 - step / band
        reached = grown
    return weights


def composite(edited: Image.Image, original: Image.Image, weights: np.ndarray) -> Image.Image:
    """``edited`` faded into ``original`` (both RGB, same size) by ``weights``: where a weight is 0 the pixel is
    ``original``'s exactly, where it is 1 ``edited``'s exactly. Only the box of nonzero weights is computed."""
    out = np.array(original.convert("RGB"))
    box = bounding_box(weights > 0)
    if box is None:
        return Image.fromarray(out, mode="RGB")
    left, top, right, bottom = box
    window = (slice(top, bottom), slice(left, right))
    new = np.asarray(edited.convert("RGB"))[window]
    old = out[window]
    w = weights[window][..., None]
    mixed = np.rint(old + w * (new.astype(np.float32) - old)).clip(0, 255).astype(np.uint8)
    out[window] = np.where(w == 0, old, np.where(w == 1, new, mixed))
    return Image.fromarray(out, mode="RGB")


# ---- colour matching in CIELAB (sRGB, D65) -------------------------------------------------------------------------

_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=np.float32,
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ.astype(np.float64)).astype(np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
_EPSILON, _KAPPA = 216 / 24389, 24389 / 27
_DECODE = np.array([c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in np.arange(256) / 255.0])
# Statistics are measured on at most this many pixels, evenly strided: plenty for a mean and a spread.
STATISTICS_SAMPLE = 1_000_000


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """8-bit sRGB (..., 3) as CIELAB (..., 3) in float32, D65 white."""
    linear = _DECODE.astype(np.float32)[rgb]
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), (_KAPPA * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def from_lab(lab: np.ndarray) -> np.ndarray:
    """CIELAB (..., 3) back to 8-bit sRGB, out-of-gamut colours clipped."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f**3 > _EPSILON, f**3, (116 * f - 16) / _KAPPA) * _WHITE
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0, 1)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.rint(c * 255).astype(np.uint8)


def lab_statistics(rgb: np.ndarray, where: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation in Lab of the pixels ``where`` says (all of them for None)."""
    pixels = (rgb if where is None else rgb[where]).reshape(-1, 3)
    pixels = pixels[:: max(1, len(pixels) // STATISTICS_SAMPLE)]
    lab = to_lab(pixels).astype(np.float64)
    return lab.mean(axis=0), lab.std(axis=0)


def color_match(
    edited: Image.Image, original: Image.Image, where: np.ndarray | None = None, only: np.ndarray | None = None
) -> Image.Image:
    """``edited`` with its Lab mean and standard deviation per channel moved to ``original``'s, both measured over
    the pixels ``where`` says (outside the mask; the whole image for None): the model's drift in brightness,
    contrast and tint is undone while the edit's own colours move with the rest. ``only`` limits the pixels
    changed (those the composite keeps); the others are left as they are."""
    new, old = np.asarray(edited.convert("RGB")), np.asarray(original.convert("RGB"))
    if where is not None and not where.any():
        where = None
    new_mean, new_std = lab_statistics(new, where)
    old_mean, old_std = lab_statistics(old, where)
    scale = np.where(new_std > 1e-6, old_std / np.maximum(new_std, 1e-6), 1.0)
    matched = np.array(new)
    chosen = (slice(None),) if only is None else only
    matched[chosen] = from_lab((to_lab(new[chosen]) - new_mean) * scale + old_mean)
    return Image.fromarray(matched, mode="RGB")


# ---- one edit's plan -----------------------------------------------------------------------------------------------


NOTHING_EDITABLE = "the mask marks nothing editable: the output is the input, unchanged"


@dataclass(frozen=True)
class Retouch:
    """What an edit does around the model: which part of the photo it edits (``box``, the whole photo unless
    cropped), how it is pasted back (``weights``, None: unmasked) and whether its colours are matched.

    Made with :meth:`plan` from the photo, the mask and the options; the pipeline edits :meth:`work` and hands each
    decoded picture to :meth:`finish`.
    """

    size: tuple[int, int]
    box: Box
    mask: Mask | None = None
    weights: np.ndarray | None = None
    band: int = DEFAULT_FEATHER
    mode: str = "composite"
    color: bool = False
    cropped: bool = False

    @classmethod
    def plan(
        cls,
        source: SourceImage,
        mask: Mask | None,
        *,
        band: int = DEFAULT_FEATHER,
        mode: str = "composite",
        crop_to_mask: bool = False,
        color_match: bool = False,
    ) -> Retouch | None:
        """The plan for editing ``source`` under ``mask``; None when there is nothing to do around the model."""
        if mask is None and not color_match:
            return None
        whole = (0, 0, *source.size)
        if mask is None:
            return cls(source.size, whole, color=True)
        mask.check_size(source.size)
        band = feather(band, "feather")
        box = crop_box(mask.editable, band) if crop_to_mask else None
        cropped = box is not None and box != whole
        weights = feather_weights(mask.editable, band)
        return cls(source.size, box if cropped else whole, mask, weights, band, mode, color_match, cropped)

    @property
    def untouched(self) -> bool:
        """A mask with nothing editable: the output is the input, and the model need not run."""
        return self.mask is not None and not self.mask.editable.any()

    def work(self, source: SourceImage) -> SourceImage:
        """What the model edits: the crop (upright sRGB, no alpha: it is put back on the whole photo), or the photo."""
        if not self.cropped:
            return source
        return SourceImage(source.rgb.crop(self.box), None, list(source.warnings), source.colour_managed)

    def editable_in_work(self) -> np.ndarray | None:
        """Where the model may change the part it edits (the mask and its band), for blending; None: everywhere."""
        if self.mask is None or self.mode != "blend":
            return None
        left, top, right, bottom = self.box
        near = self.weights[top:bottom, left:right] > 0
        return None if near.all() else near

    def finish(self, picture: Image.Image, source: SourceImage) -> Image.Image:
        """A decoded picture of :meth:`work` (at its size) made into the output: pasted into the photo, colour
        matched, faded into the untouched photo, with the photo's alpha put back."""
        edited = picture.convert("RGB")
        if self.cropped:
            whole = source.rgb.copy()
            whole.paste(edited, self.box[:2])
            edited = whole
        outside = None if self.weights is None else self.weights == 0
        if self.color:
            edited = color_match(edited, source.rgb, outside, None if outside is None else ~outside)
        if self.weights is not None:
            edited = composite(edited, source.rgb, self.weights)
        if source.alpha is not None:
            edited.putalpha(source.alpha)
        return edited

    def unchanged(self, source: SourceImage) -> Image.Image:
        """The output of an edit with nothing editable: the normalised input itself."""
        picture = source.rgb.copy()
        if source.alpha is not None:
            picture.putalpha(source.alpha)
        return picture

    def record_fields(self) -> dict[str, object]:
        """What a record keeps of this plan, so ``--replay`` can redo it (the mask by name and hash)."""
        fields: dict[str, object] = {"color_match": self.color}
        if self.mask is not None:
            fields.update(
                mask=self.mask.name or "",
                mask_sha256=self.mask.sha256,
                invert_mask=self.mask.inverted,
                mask_mode=self.mode,
                feather=self.band,
                crop=list(self.box) if self.cropped else None,
            )
        return fields
