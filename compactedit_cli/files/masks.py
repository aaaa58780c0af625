"""Masks: which pixels of the photo an edit may change.

Two conventions, told apart by the file itself: a mask with transparency is read as OpenAI's (transparent is
editable); any other mask (an alpha channel that is opaque everywhere included) is greyscale (white is editable,
from grey level ``MASK_THRESHOLD`` up; colour masks are read as their luminance). ``invert`` swaps editable and
kept. The mask file is read under the same bounded-read rules as an input image, and is turned upright by its EXIF
orientation, as the image is; its upright size must then equal the image's. No torch here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from ..errors import InputImageError
from ..options import MASK_THRESHOLD
from .imaging import HIGH_BIT_MODES, decode_input, to_8bit

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where a mask is read or made, not here: an edit without a mask (the client of a server
# included) never pays for it.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class Mask:
    """An upright mask plane (``editable[y, x]`` True where the edit may change the photo) and what records name it
    by: its file name (never a path) and the sha256 of its file's bytes."""

    editable: np.ndarray
    name: str | None = None
    sha256: str | None = None
    inverted: bool = False

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as images give it."""
        return self.editable.shape[1], self.editable.shape[0]

    def check_size(self, size: tuple[int, int], name: str = "the mask") -> None:
        """A mask must cover the photo pixel for pixel: a mismatch is a one-line error naming both sizes."""
        if self.size != tuple(size):
            (mw, mh), (w, h) = self.size, size
            raise InputImageError(
                f"{name} is {mw}x{mh} but the image is {w}x{h} (both after EXIF orientation): "
                "a mask must have the image's size"
            )

    def plane(self) -> Image.Image:
        """The mask as an 8-bit greyscale picture, white editable (what the server wire carries)."""
        import numpy as np

        return Image.fromarray(np.where(self.editable, 255, 0).astype(np.uint8), mode="L")


def editable_pixels(image: Image.Image) -> np.ndarray:
    """Which pixels of a decoded mask picture are editable, by the convention its mode says (module docstring)."""
    import numpy as np

    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "L")
    if image.mode in _ALPHA_MODES:
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min(initial=255) < 255:
            return alpha < MASK_THRESHOLD
        image = image.convert("L")  # an alpha channel with no transparency says nothing: read the grey levels
    if image.mode in HIGH_BIT_MODES:
        image = to_8bit(image)
    return np.asarray(image.convert("L")) >= MASK_THRESHOLD


def from_plane(plane: Image.Image, *, name: str | None = None, sha256: str | None = None) -> Mask:
    """A mask from a plane already in compactedit's form (greyscale, white editable): the server wire's."""
    import numpy as np

    return Mask(np.asarray(plane.convert("L")) >= MASK_THRESHOLD, name, sha256)


def open_mask(
    source: str | Path | bytes,
    size: tuple[int, int] | None = None,
    *,
    invert: bool = False,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    label: str | None = None,
) -> Mask:
    """Read a mask file (or its bytes, which errors call ``label``) and, given the photo's upright ``size``, check
    it matches."""
    editable, label = decode_input(
        source, lambda image, _name: editable_pixels(image), max_pixels, max_bytes, label=label
    )
    # Hashed once decoded: the kind and size checks have run, so a FIFO or a huge file is never read here.
    digest = file_sha256(Path(source)) if isinstance(source, (str, Path)) else hashlib.sha256(source).hexdigest()
    if invert:
        editable = ~editable
    name = Path(source).name if isinstance(source, (str, Path)) else None
    mask = Mask(editable, name, digest, invert)
    if size is not None:
        mask.check_size(size, f"the mask {label}" if name else "the mask")
    return mask


def file_sha256(path: Path) -> str:
    """The sha256 of a mask file's bytes, as records name the mask by."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise InputImageError(f"no such file: {path}") from None
    except OSError as exc:
        raise InputImageError(f"cannot open {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()
