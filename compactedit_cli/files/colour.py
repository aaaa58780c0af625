"""Colour management: an input's embedded ICC profile is honoured, the model sees sRGB, and outputs say so.

The rule (README, "What happens to your photo's colours and metadata"): pixels of an input with a profile are
converted to sRGB with LittleCMS (Pillow's ImageCms, relative colorimetric intent with black-point compensation),
and every output of it is written in sRGB *tagged* with an sRGB profile. So a colour-managed viewer shows the
unedited parts as in the input (within the sRGB gamut, which is all the model can produce), and a viewer that
ignores profiles shows the right colours too, which converting back to a wide-gamut profile would not give.

An input without a profile is sRGB and its outputs stay untagged. A profile that cannot be parsed, or that does not
fit the pixels (a CMYK profile on RGB pixels), gives one warning and the image is treated as sRGB.
"""

from __future__ import annotations

import io
from functools import cache

from PIL import Image, ImageCms

# The colour spaces a profile may describe, each with the Pillow mode its pixels must be in for the transform.
_PROFILE_MODES = {"RGB": "RGB", "CMYK": "CMYK", "GRAY": "L"}


@cache
def srgb_profile() -> ImageCms.ImageCmsProfile:
    """LittleCMS's built-in sRGB profile: what the model sees and what tagged outputs carry."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@cache
def srgb_icc() -> bytes:
    """The bytes of :func:`srgb_profile`, embedded in outputs of inputs that had a profile."""
    return srgb_profile().tobytes()


def _parse(icc: bytes) -> ImageCms.ImageCmsProfile | None:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
        return None


def profile_description(icc: bytes) -> str:
    """The profile's own description (``Display P3``), or ``""`` when it has none or cannot be parsed."""
    profile = _parse(icc)
    if profile is None:
        return ""
    try:
        return ImageCms.getProfileDescription(profile).strip()
    except ImageCms.PyCMSError:
        return ""


def to_srgb(image: Image.Image, icc: bytes | None, name: str, notes: list[str]) -> tuple[Image.Image, bool]:
    """``image`` (mode L, RGB or CMYK, no alpha) as sRGB RGB, and whether a profile was honoured.

    ``notes`` receives the one warning for a profile that cannot be used; ``name`` names the input in it.
    """
    if not icc:
        return image.convert("RGB"), False
    profile = _parse(icc)
    space = profile.profile.xcolor_space.strip() if profile is not None else ""
    mode = _PROFILE_MODES.get(space)
    if profile is None or mode is None:
        notes.append(f"{name}: its embedded colour profile cannot be read; treating the image as sRGB")
        return image.convert("RGB"), False
    if image.mode == "L" and mode == "RGB":  # greyscale pixels with an RGB profile: grey in that space
        image = image.convert("RGB")
    if image.mode != mode:
        notes.append(f"{name}: its colour profile is for {space}, not {image.mode} pixels; treating them as sRGB")
        return image.convert("RGB"), False
    try:
        converted = ImageCms.profileToProfile(
            image,
            profile,
            srgb_profile(),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode="RGB",
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
    except (ImageCms.PyCMSError, ValueError, OSError):
        notes.append(f"{name}: its embedded colour profile cannot be applied; treating the image as sRGB")
        return image.convert("RGB"), False
    return converted, True
