"""The Qwen3-VL processor, without torchvision, loading the processor files of the published checkpoint.

Two things differ from ``Qwen3VLProcessor.from_pretrained``:

* The stock processor insists on a video processor, which needs torchvision; ours has only the image processor
  and the tokenizer. ``video_preprocessor_config.json`` is ignored.
* The checkpoint was made with transformers 4.57's torchvision ("fast") image processor. It resizes the uint8
  image with torch's bicubic, antialiased uint8 kernel. The PIL backend differs by a grey level on some pixels,
  which moves the conditioning by ~1e-4, so the resize here calls that same torch kernel.

Both the 4.57 layout (``preprocessor_config.json``) and the 5.x layout (``processor_config.json``) load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3VLProcessor
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.processing_utils import ProcessorMixin

from ..errors import CheckpointError

# Image-processor fields taken from the saved config; everything else keeps the class defaults.
_IMAGE_PROCESSOR_FIELDS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size")


class TorchResizeImageProcessor(Qwen2VLImageProcessorPil):
    """Qwen2-VL image processor whose resize is torch's uint8 bicubic antialias kernel (the 4.57 fast path)."""

    def resize(self, image: np.ndarray, size: SizeDict, resample: Any, factor: int, **kwargs: Any) -> np.ndarray:
        height, width = image.shape[-2:]
        target = smart_resize(height, width, factor=factor, min_pixels=size.shortest_edge, max_pixels=size.longest_edge)
        if target == (height, width):
            return image
        pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8))[None]
        resized = torch.nn.functional.interpolate(
            pixels, size=target, mode="bicubic", align_corners=False, antialias=True
        )
        return resized[0].numpy()


class ImageTextProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with an image processor and a tokenizer only (no video processor, so no torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _image_processor_config(folder: Path) -> dict[str, Any]:
    legacy = folder / "preprocessor_config.json"
    if legacy.is_file():
        return _read_json(legacy)
    current = folder / "processor_config.json"
    if current.is_file():
        config = _read_json(current).get("image_processor")
        if isinstance(config, dict):
            return config
    raise CheckpointError(
        f"{folder} has no preprocessor_config.json (or processor_config.json with an image processor)"
    )


def _chat_template(folder: Path, tokenizer: Any) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        return _read_json(legacy)["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise CheckpointError(f"{folder} has no chat template (chat_template.jinja or chat_template.json)")


def load_processor(folder: Path) -> ImageTextProcessor:
    """Build the processor from a checkpoint's ``tokenizer/`` folder; never runs code from the checkpoint."""
    config = _image_processor_config(folder)
    image_processor = TorchResizeImageProcessor(**{k: config[k] for k in _IMAGE_PROCESSOR_FIELDS if k in config})
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {exc}") from exc
    # Meta queries are inserted after each row's valid tokens, which assumes right padding.
    tokenizer.padding_side = "right"
    return ImageTextProcessor(image_processor, tokenizer, chat_template=_chat_template(folder, tokenizer))
