"""The record of one output: the single shape of an edit's parameters.

The pipeline makes one per output image, and everything that describes an edit derives from it, with the same keys:
the file's embedded metadata (:meth:`EditRecord.metadata`), ``edit --json``, the lines of ``results.jsonl`` and the
Python API's results. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import __version__

SCHEMA = "compactedit/1"

# What a file's metadata keeps: enough to re-run the edit, and nothing about the machine's files.
METADATA_FIELDS = (
    "instruction",
    "steps",
    "guidance_scale",
    "image_guidance_scale",
    "seed",
    "index",
    "num_images",
    "size",
    "model_size",
    "resolution_binning",
    "model",
    "revision",
    "dtype",
    "device",
    "source",
    "loras",
)
# Kept too when an edit used them (a mask, colour matching), and left out otherwise, so unmasked files are unchanged.
RETOUCH_FIELDS = ("mask", "mask_sha256", "invert_mask", "mask_mode", "feather", "crop", "color_match")


@dataclass
class EditRecord:
    """One output of one edit: every parameter it was made with, what was written, how long it took, what went odd.

    ``size`` and ``model_size`` are ``[width, height]``: the output's (the input's upright size) and the model's bin.
    ``index`` counts the outputs of one instruction (0 … ``num_images`` - 1), all drawn from one ``seed``: the
    three together say what reproduces this output, so a file records them all.
    """

    instruction: str
    steps: int
    guidance_scale: float
    image_guidance_scale: float
    guidance_branches: int
    seed: int | None
    size: list[int]
    model_size: list[int]
    resolution_binning: bool
    model: str
    dtype: str
    device: str
    scheduler: str
    vlm_min_pixels: int
    vlm_max_pixels: int
    index: int = 0
    num_images: int = 1
    revision: str | None = None
    source: str | None = None
    output: str | None = None
    seconds: float | None = None
    warnings: list[str] = field(default_factory=list)
    loras: list[list[Any]] = field(default_factory=list)  # [spec, scale] of each LoRA adapter fused at load
    # A masked edit's mask (its file name, "" when it had none, and the sha256 of its bytes), how it was used, and
    # the [left, top, right, bottom] box --crop-to-mask edited; color_match for any edit.
    mask: str | None = None
    mask_sha256: str | None = None
    invert_mask: bool = False
    mask_mode: str | None = None
    feather: int | None = None
    crop: list[int] | None = None
    color_match: bool = False
    software: str = f"compactedit {__version__}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metadata(self) -> dict[str, Any]:
        """What goes into the output file (PNG chunk, XMP, sidecar): the schema, the software and the parameters."""
        data = self.to_dict()
        retouch = {key: data[key] for key in RETOUCH_FIELDS if data[key] not in (None, False)}
        return {"schema": SCHEMA, "software": self.software, **{key: data[key] for key in METADATA_FIELDS}, **retouch}

    def but(self, **changes: Any) -> EditRecord:
        """A copy with ``changes`` (the caller's knowledge: the output path, the hub revision, the timing)."""
        return replace(self, **changes)
