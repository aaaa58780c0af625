"""The Qwen3-VL processor: tokenizer, chat template and image patches, from a checkpoint's ``tokenizer/`` folder.

Plain ``tokenizers``, ``jinja2`` and torch, so the edit path never imports transformers. The inputs it builds are
those of transformers' ``Qwen3VLProcessor`` (``Qwen2Tokenizer`` plus the Qwen2-VL image processor);
``tests/test_own_processor.py`` holds transformers to that. Facts carried over:

* Tokenizer: ``tokenizer.json`` is used as saved (the published one carries Qwen2's NFC normaliser and split);
  the older ``vocab.json`` + ``merges.txt`` layout gets the split that ``Qwen2Tokenizer`` builds. The added tokens
  of ``tokenizer_config.json`` keep their ids, and rows are right-padded with the pad token, because the meta
  queries go right after each row's valid tokens.
* Chat template: rendered in jinja2's immutable sandbox with the settings and helpers transformers gives its own
  (trimmed and lstripped blocks, ``raise_exception``, a ``tojson`` that does not escape HTML), so the text is
  identical. Nothing from the checkpoint runs outside that sandbox.
* Image: the checkpoint was made with transformers 4.57's torchvision ("fast") image processor, which resizes the
  uint8 image with torch's bicubic, antialiased uint8 kernel. A PIL resize differs by a grey level on some pixels,
  which moves the conditioning by ~1e-4, so the resize here is that same torch kernel. Rescale (in float64, then
  float32) and normalise (float32) follow the library's order, so the pixel values are bit-identical.

There is no video processor: ``video_preprocessor_config.json`` is ignored. Both the 4.57 layout
(``preprocessor_config.json``) and the 5.x layout (``processor_config.json``) load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import CheckpointError, InputImageError

# The Qwen2 pre-tokenizer split (what ``Qwen2Tokenizer`` builds for the vocab.json + merges.txt layout).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"

# mm_token_type_ids: 0 for text, 1 for image tokens (transformers' numbering; there is no video here).
IMAGE_TYPE = 1

# The named special tokens a chat template may read (transformers passes its ``special_tokens_map``).
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

# smart_resize refuses thinner images (a Qwen2-VL limit).
MAX_ASPECT_RATIO = 200

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL's resampling code, the only resize implemented


# ---- files -------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return document


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with ``content``."""
    return value.get("content") if isinstance(value, dict) else value


# ---- tokenizer ---------------------------------------------------------------------------------------------------


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the pad token and the named special tokens of ``tokenizer_config.json``."""

    def __init__(self, backend: Tokenizer, pad_token: str, special_tokens: Mapping[str, str]) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.pad_token_id = self.token_id(pad_token)

    def token_id(self, token: str) -> int:
        """The id of one token of the vocabulary; a missing one is a CheckpointError."""
        index = self.backend.token_to_id(token)
        if index is None:
            raise CheckpointError(f"the tokenizer has no {token} token")
        return index

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the tokens of ``text`` (no special tokens added)."""
        return self.backend.encode(text, add_special_tokens=False).offsets

    def pad_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (int64), right-padded with the pad token to the longest row."""
        rows = [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=True)]
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, : len(row)] = 1
        return ids, mask


def _qwen2_backend(vocab: Path, merges: Path) -> Tokenizer:
    """The byte-level BPE that ``Qwen2Tokenizer`` builds from vocab.json + merges.txt."""
    try:
        backend = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:  # the Rust side raises plain Exceptions
        raise CheckpointError(f"cannot load the tokenizer from {vocab} and {merges}: {exc}") from exc
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_tokens(backend: Tokenizer, config: Mapping[str, Any], config_path: Path) -> None:
    """The added tokens of tokenizer_config.json at their saved ids, then any named special token still missing."""
    try:
        entries = sorted((int(index), entry) for index, entry in (config.get("added_tokens_decoder") or {}).items())
        tokens = [
            AddedToken(
                entry["content"],
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", not entry.get("special", False))),
                special=bool(entry.get("special", False)),
            )
            for _, entry in entries
        ]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: added_tokens_decoder is malformed ({exc!r})") from exc
    for (index, _), token in zip(entries, tokens, strict=True):
        backend.add_tokens([token])
        if backend.token_to_id(token.content) != index:
            raise CheckpointError(
                f"{config_path}: added token {token.content!r} should have id {index} but the vocabulary gives it"
                f" {backend.token_to_id(token.content)}"
            )
    named = [_token_text(config.get(name)) for name in _NAMED_SPECIAL]
    extra = [_token_text(token) for token in config.get("additional_special_tokens") or []]
    missing = [token for token in (*named, *extra) if token and backend.token_to_id(token) is None]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])


def load_tokenizer(folder: Path, config: Mapping[str, Any]) -> TextTokenizer:
    """The tokenizer of a ``tokenizer/`` folder (tokenizer.json, or vocab.json + merges.txt) and its config."""
    config_path = folder / "tokenizer_config.json"
    for flag in ("add_prefix_space", "split_special_tokens"):  # Qwen's tokenizer sets neither
        if config.get(flag):
            raise CheckpointError(f"{config_path}: {flag}=true is not supported")
    if (folder / "tokenizer.json").is_file():
        try:
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise CheckpointError(f"cannot load the tokenizer {folder / 'tokenizer.json'}: {exc}") from exc
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _qwen2_backend(folder / "vocab.json", folder / "merges.txt")
    else:
        raise CheckpointError(f"{folder} has no tokenizer.json (or vocab.json with merges.txt)")
    _add_tokens(backend, config, config_path)
    # Qwen2Tokenizer's defaults where the config leaves a token out.
    special = {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    special |= {name: _token_text(config[name]) for name in _NAMED_SPECIAL if name in config}
    special = {name: token for name, token in special.items() if token}
    return TextTokenizer(backend, special["pad_token"], special)


# ---- chat template -----------------------------------------------------------------------------------------------


def _compile_template(source: str, origin: Path | str) -> Any:
    """The template in jinja2's immutable sandbox, set up as transformers sets up its own."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}`` marks assistant text for training masks; rendering just outputs the body."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise CheckpointError(f"{origin}: the chat template does not compile ({exc})") from exc


def _template_source(folder: Path, tokenizer_config: Mapping[str, Any]) -> tuple[str, Path]:
    """The chat template text and the file it came from (the 5.x file, the 4.57 file, then tokenizer_config)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), jinja
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {jinja}: {exc}") from exc
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        template = _read_json(legacy).get("chat_template")
        if isinstance(template, str):
            return template, legacy
        raise CheckpointError(f"{legacy} has no chat_template text")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one renders chats
        named = (entry for entry in template if isinstance(entry, dict) and entry.get("name") == "default")
        template = next((entry.get("template") for entry in named), None)
    if isinstance(template, str):
        return template, folder / "tokenizer_config.json"
    raise CheckpointError(f"{folder} has no chat template (chat_template.jinja or chat_template.json)")


# ---- images ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The Qwen2-VL image-processor fields that change the patches (defaults are the library class's)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = _CLIP_MEAN
    image_std: tuple[float, ...] = _CLIP_STD
    rescale_factor: float = 1 / 255
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged patch."""
        return self.patch_size * self.merge_size


# Flags the processor always applies: a saved ``false`` would change the maths, so it is refused.
_ALWAYS_ON = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")


def image_config(fields: Mapping[str, Any], origin: Path | str) -> ImageConfig:
    """An :class:`ImageConfig` from a saved image-processor config; a value not implemented is a CheckpointError."""
    for flag in _ALWAYS_ON:
        if fields.get(flag) is False:
            raise CheckpointError(f"{origin}: {flag}=false is not supported (the processor always applies it)")
    if fields.get("resample", _BICUBIC) not in (None, _BICUBIC):
        raise CheckpointError(f"{origin}: resample={fields['resample']} is not supported (only 3, bicubic)")
    size = fields.get("size") or {}
    kwargs: dict[str, Any] = {}
    try:
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if fields.get(name) is not None:
                kwargs[name] = int(fields[name])
        for name in ("image_mean", "image_std"):
            if fields.get(name) is not None:
                value = fields[name]
                kwargs[name] = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
        if fields.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(fields["rescale_factor"])
        # ``min_pixels``/``max_pixels`` override ``size``, as the library's constructor does.
        for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = fields.get(name) if fields.get(name) is not None else size.get(key)
            if value is not None:
                kwargs[name] = int(value)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{origin}: a malformed image-processor field ({exc})") from exc
    config = ImageConfig(**kwargs)
    if len(config.image_mean) != 3 or len(config.image_std) != 3:
        raise CheckpointError(f"{origin}: image_mean and image_std need 3 values (one per RGB channel)")
    if min(config.patch_size, config.temporal_patch_size, config.merge_size) < 1:
        raise CheckpointError(f"{origin}: patch_size, temporal_patch_size and merge_size must be positive")
    return config


def _image_config_file(folder: Path) -> ImageConfig:
    legacy = folder / "preprocessor_config.json"
    if legacy.is_file():
        return image_config(_read_json(legacy), legacy)
    current = folder / "processor_config.json"
    if current.is_file():
        fields = _read_json(current).get("image_processor")
        if isinstance(fields, dict):
            return image_config(fields, current)
    raise CheckpointError(
        f"{folder} has no preprocessor_config.json (or processor_config.json with an image processor)"
    )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: sides in multiples of ``factor``, area within the budget, aspect kept closely."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputImageError(
            f"the image is {width}x{height}: the VLM reads images up to {MAX_ASPECT_RATIO}:1 in aspect ratio"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (the library's conversion)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_patches(
    image: Image.Image, config: ImageConfig, min_pixels: int, max_pixels: int
) -> tuple[torch.Tensor, int, int]:
    """One image as Qwen2-VL's flattened patches, (grid_h * grid_w, C * T * patch * patch) float32, and its grid.

    Patches are ordered merge window by merge window (each ``merge_size``² neighbours together), and the single
    frame is repeated ``temporal_patch_size`` times, as the vision tower expects.
    """
    rgb = _rgb(image)
    width, height = rgb.size
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)
    target = smart_resize(height, width, config.factor, min_pixels, max_pixels)
    if target != (height, width):
        pixels = torch.nn.functional.interpolate(
            pixels[None].contiguous(), size=target, mode="bicubic", align_corners=False, antialias=True
        )[0]
    values = (pixels.to(torch.float64) * config.rescale_factor).to(torch.float32)
    mean = torch.tensor(config.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(config.image_std, dtype=torch.float32)[:, None, None]
    values = (values - mean) / std

    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = target[0] // p, target[1] // p
    patches = values.view(3, grid_h // m, m, p, grid_w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    patches = patches[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, t, -1, -1)
    return patches.reshape(grid_h * grid_w, 3 * t * p * p), grid_h, grid_w


def _interleave(parts: list[str], fillers: Iterator[str]) -> Iterator[str]:
    """``parts[0] filler parts[1] filler ...``: each split-out placeholder replaced by the next filler."""
    yield parts[0]
    for part in parts[1:]:
        yield next(fillers)
        yield part


# ---- processor ---------------------------------------------------------------------------------------------------


class ImageTextProcessor:
    """Chat texts and images -> the VLM's inputs: token ids, mask, token types, patches and patch grids."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        image: ImageConfig,
        chat_template: str,
        template_origin: Path | str = "the chat template",
    ) -> None:
        self.tokenizer = tokenizer
        self.image = image
        self.template = _compile_template(chat_template, template_origin)
        self.template_origin = template_origin
        self.image_token_id = tokenizer.token_id(IMAGE_TOKEN)
        self.vision_start_token_id = tokenizer.token_id(VISION_START_TOKEN)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """One conversation rendered with the checkpoint's chat template (special tokens as template variables)."""
        import jinja2

        try:
            return self.template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.tokenizer.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise CheckpointError(f"{self.template_origin}: the chat template failed ({exc})") from exc

    def __call__(
        self,
        texts: Sequence[str],
        images: Sequence[Image.Image],
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The VLM inputs for B texts whose ``<|image_pad|>`` placeholders take ``images`` in order.

        Each placeholder becomes grid_t·grid_h·grid_w / merge_size² image tokens (one per merged patch).
        """
        if sum(text.count(IMAGE_TOKEN) for text in texts) != len(images) or any(VIDEO_TOKEN in t for t in texts):
            raise ValueError(f"the texts need one {IMAGE_TOKEN} per image ({len(images)}) and no {VIDEO_TOKEN}")
        low = self.image.min_pixels if min_pixels is None else min_pixels
        high = self.image.max_pixels if max_pixels is None else max_pixels
        patches, grids = [], []
        for image in images:
            values, grid_h, grid_w = image_patches(image, self.image, low, high)
            patches.append(values)
            grids.append([1, grid_h, grid_w])
        tokens = iter(IMAGE_TOKEN * (t * h * w // self.image.merge_size**2) for t, h, w in grids)
        expanded = ["".join(_interleave(text.split(IMAGE_TOKEN), tokens)) for text in texts]
        input_ids, attention_mask = self.tokenizer.pad_batch(expanded)
        token_types = torch.zeros_like(input_ids)
        token_types[input_ids == self.image_token_id] = IMAGE_TYPE
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": token_types,
            "pixel_values": torch.cat(patches),
            "image_grid_thw": torch.tensor(grids, dtype=torch.int64),
        }


def load_processor(folder: Path) -> ImageTextProcessor:
    """Build the processor from a checkpoint's ``tokenizer/`` folder; never runs code from the checkpoint."""
    config = _read_json(folder / "tokenizer_config.json")
    tokenizer = load_tokenizer(folder, config)
    template, origin = _template_source(folder, config)
    return ImageTextProcessor(tokenizer, _image_config_file(folder), template, origin)
