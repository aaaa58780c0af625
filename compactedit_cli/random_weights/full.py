"""The published model's architecture at real size (or scaled down) with random weights, built without a download.

Benchmarks need the real shapes, not the real weights: compute and memory depend only on the architecture. The
configs come from ``configs/*.json`` (the VIBE reference's values). Each model is built on the meta device and then
allocated on the target device and filled in place, so a full-size build takes seconds on a GPU.

There are no tokenizer files either: the processor uses the tiny BPE tokenizer of
:mod:`compactedit_cli.random_weights.tiny`, and the text encoder's special-token ids are remapped to it while its
vocabulary stays 151,936 wide, so the embedding table and every matrix keep their real size. The image processor
keeps the real patch 16, merge 2 and temporal patch 2, so the VLM sees as many image tokens as it would with the
published checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.pipeline import EditPipeline, default_device, default_dtype
from ..engine.processor import ImageTextProcessor, TextTokenizer, image_config
from ..engine.schedulers import DPMSolverMultistepScheduler
from ..loading.checkpoint import Components, new_transformer
from ..models.dcae import DCAE, DCAEConfig
from ..models.qwen3_vl import Qwen3VLConfig, Qwen3VLEncoder
from .configs import load_config
from .tiny import (
    CHAT_TEMPLATE,
    TinySpec,
    materialise,
    on_meta,
    train_tokenizer,
    write_component,
    write_pipeline_files,
)

# Which special token each token-id field of the Qwen3-VL config names (Qwen's tokenizer conventions).
_TOP_LEVEL_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
_TEXT_TOKENS = {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|endoftext|>"}


@dataclass(frozen=True)
class ModelConfigs:
    """Everything a random build needs: each component's config plus the edit head's width (not a config field)."""

    text_encoder: dict[str, Any]
    image_processor: dict[str, Any]
    transformer: dict[str, Any]
    edit_head_hidden_dim: int
    vae: dict[str, Any]
    scheduler: dict[str, Any]


def real_configs() -> ModelConfigs:
    """The published model's configs (Qwen3-VL-2B, the 1.6B VIBE transformer, DC-AE f32c32, Sana's scheduler)."""
    qwen = load_config("qwen3_vl_2b")
    transformer = load_config("vibe_transformer")
    return ModelConfigs(
        text_encoder=qwen["config"],
        image_processor=qwen["image_processor"],
        transformer=transformer["config"],
        edit_head_hidden_dim=transformer["edit_head_hidden_dim"],
        vae=load_config("dc_ae_f32c32")["config"],
        scheduler=load_config("sana_scheduler")["config"],
    )


def _heads(real: int, divisor: int) -> int:
    return max(1, round(real / divisor))


def scaled_configs(width_divisor: int = 8, layers: int = 4) -> ModelConfigs:
    """The real configs at about 1/``width_divisor`` width with ``layers`` layers per stack: a CPU-sized model.

    Head widths, the vocabulary, patch sizes, the meta-query count, latent channels and the VAE's depth stay real,
    so token counts, and how cost grows with resolution, match the real model; only the constants shrink.
    """
    if width_divisor < 1 or layers < 1:
        raise ValueError("width_divisor and layers must be >= 1")
    real = real_configs()
    te = copy.deepcopy(real.text_encoder)
    text, vision = te["text_config"], te["vision_config"]
    text["num_attention_heads"] = _heads(text["num_attention_heads"], width_divisor)
    text["num_key_value_heads"] = _heads(text["num_key_value_heads"], width_divisor)
    text["hidden_size"] = text["num_attention_heads"] * text["head_dim"]
    text["intermediate_size"] //= width_divisor
    text["num_hidden_layers"] = min(layers, text["num_hidden_layers"])
    vision_head_dim = vision["hidden_size"] // vision["num_heads"]
    vision["num_heads"] = _heads(vision["num_heads"], width_divisor)
    vision["hidden_size"] = vision["num_heads"] * vision_head_dim
    vision["intermediate_size"] //= width_divisor
    # DeepStack taps keep their relative depth (real: after ViT blocks 5, 11, 17 of 24).
    vision["deepstack_visual_indexes"] = [i * layers // vision["depth"] for i in vision["deepstack_visual_indexes"]]
    vision["depth"] = layers
    vision["out_hidden_size"] = text["hidden_size"]

    tr = dict(real.transformer)
    tr["num_attention_heads"] = _heads(tr["num_attention_heads"], width_divisor)
    tr["num_cross_attention_heads"] = _heads(tr["num_cross_attention_heads"], width_divisor)
    tr["cross_attention_dim"] = tr["num_attention_heads"] * tr["attention_head_dim"]
    tr["caption_channels"] //= width_divisor
    tr["num_layers"] = min(layers, tr["num_layers"])
    tr["edit_head_stacks_num"] = min(layers, tr["edit_head_stacks_num"])
    tr["edit_head_input_dim"] = tr["meta_queries_dim"] = text["hidden_size"]

    vae = dict(real.vae)
    for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
        vae[key] = [max(vae["attention_head_dim"], c // width_divisor) for c in vae[key]]
    return ModelConfigs(
        text_encoder=te,
        image_processor=real.image_processor,
        transformer=tr,
        edit_head_hidden_dim=real.edit_head_hidden_dim // width_divisor,
        vae=vae,
        scheduler=real.scheduler,
    )


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once), also for a model on the meta device."""
    return sum(p.numel() for p in module.parameters())


def build_processor(configs: ModelConfigs) -> ImageTextProcessor:
    """The tiny tokenizer (in memory) with the configured image processor: no tokenizer files needed."""
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    tokenizer = TextTokenizer(train_tokenizer(TinySpec().vocab_size), special["pad_token"], special)
    image = image_config(configs.image_processor, "the qwen3_vl_2b config's image_processor")
    return ImageTextProcessor(tokenizer, image, CHAT_TEMPLATE)


def remap_special_tokens(text_encoder_config: dict[str, Any], tokenizer: TextTokenizer) -> dict[str, Any]:
    """A copy of a Qwen3-VL config whose special-token ids point at ``tokenizer``'s; the vocabulary size is kept."""
    config = copy.deepcopy(text_encoder_config)
    for fields, target in ((_TOP_LEVEL_TOKENS, config), (_TEXT_TOKENS, config["text_config"])):
        for field, token in fields.items():
            target[field] = tokenizer.token_id(token)
    return config


def build_text_encoder(
    config: dict[str, Any], generator: torch.Generator, device: str | torch.device, dtype: torch.dtype
) -> Qwen3VLEncoder:
    """The edit path's own Qwen3-VL encoder, random, from a config dict (tiny checkpoints use transformers')."""
    with on_meta(dtype):
        model = Qwen3VLEncoder(Qwen3VLConfig.from_dict(config))
    return materialise(model, generator, device)


def meta_models(configs: ModelConfigs, dtype: torch.dtype = torch.bfloat16) -> dict[str, nn.Module]:
    """The three networks on the meta device (no memory, no init): for parameter counts and shape checks."""
    return _networks(configs, "meta", dtype, seed=0)


def _networks(configs: ModelConfigs, device: str | torch.device, dtype: torch.dtype, seed: int) -> dict[str, nn.Module]:
    device = torch.device(device)
    gen_device = "cpu" if device.type == "meta" else device

    def generator(offset: int) -> torch.Generator:
        return torch.Generator(gen_device).manual_seed(seed + offset)

    return {
        "text_encoder": build_text_encoder(configs.text_encoder, generator(0), device, dtype),
        "transformer": build_transformer(configs, generator(1), device, dtype),
        "vae": build_vae(configs.vae, generator(2), device, dtype),
    }


def build_vae(config: dict[str, Any], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> DCAE:
    """A random DC-AE as the edit path runs it (this package's module, not diffusers')."""
    with on_meta(dtype):
        vae = DCAE(DCAEConfig.from_dict(config))
    return materialise(vae, generator, device)


def build_transformer(
    configs: ModelConfigs, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Our transformer (the one edits run) for the configs, built as the loader builds it, with random weights."""
    config = configs.transformer
    with on_meta(dtype):
        model = new_transformer(
            config, configs.edit_head_hidden_dim, config.get("qk_norm"), Path("random_weights/transformer.json")
        )
    return materialise(model, generator, device)


def _with_tiny_tokenizer(configs: ModelConfigs) -> tuple[ImageTextProcessor, ModelConfigs]:
    """The in-memory processor, and the configs with the text encoder's special-token ids remapped to it."""
    processor = build_processor(configs)
    text_config = remap_special_tokens(configs.text_encoder, processor.tokenizer)
    return processor, replace(configs, text_encoder=text_config)


def random_components(
    configs: ModelConfigs, device: str | torch.device, dtype: torch.dtype, seed: int = 0
) -> Components:
    """All five components with random weights, allocated on ``device`` in ``dtype``."""
    processor, configs = _with_tiny_tokenizer(configs)
    networks = _networks(configs, device, dtype, seed)
    for module in networks.values():
        module.requires_grad_(False)
    return Components(
        processor=processor,
        text_encoder=networks["text_encoder"],
        transformer=networks["transformer"],
        vae=networks["vae"],
        scheduler=DPMSolverMultistepScheduler(configs.scheduler),
    )


def random_pipeline(
    configs: ModelConfigs | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    name: str = "random:full",
) -> EditPipeline:
    """An :class:`EditPipeline` over random weights (the real size unless ``configs`` says otherwise)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    components = random_components(configs or real_configs(), device, dtype, seed)
    return EditPipeline(components, device=device, dtype=dtype, name=name)


def write_random_checkpoint(
    root: str | Path,
    configs: ModelConfigs | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write random weights for ``configs`` (the real size by default) as a checkpoint folder in the published layout.

    ``edit -m``, ``serve`` and ``bench --cold`` need a folder, not an in-memory model. The weights are the ones
    :func:`random_pipeline` builds with the same configs, device, dtype and seed (built on ``device``, so a GPU
    writes the full model without a slow CPU initialisation), saved in ``dtype`` (bf16, as the published weights
    are); the tokenizer is the tiny one, with the configured image processor. Returns the folder.
    """
    root = Path(root)
    _, configs = _with_tiny_tokenizer(configs or real_configs())
    write_pipeline_files(root, TinySpec(), configs.scheduler, configs.image_processor)
    networks = _networks(configs, device, dtype, seed)
    text_config = {**configs.text_encoder, "dtype": str(dtype).removeprefix("torch.")}
    write_component(root, "text_encoder", text_config, networks.pop("text_encoder"))
    write_component(root, "transformer", configs.transformer, networks.pop("transformer"))
    write_component(root, "vae", configs.vae, networks.pop("vae"))
    return root
