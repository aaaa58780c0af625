"""Tiny random checkpoints in the published layout, for tests, ``selftest`` and ``bench --random-weights tiny``.

``build_tiny_checkpoint(folder)`` writes ``model_index.json`` and the five component folders exactly as the
published VIBE repos lay them out, with random weights small enough to run an edit in well under a second on a CPU.
The same seed writes byte-identical files. Options cover the variants the real checkpoints come in: the
transformers-4.57 processor files, a legacy boolean ``qk_norm`` (with norms across heads or per head), and the
CFG-distilled flag; the VAE's depth and the DiT's patch size vary too, to test the loader's geometry checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .configs import load_config

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip

# The Qwen2 pre-tokenizer split (a fact of the Qwen tokenizer family).
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen-style chat template: one user turn renders as <|im_start|>user\n<image><text><|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "what will this image be like if make the sky blue",
    "add a red hat to the person and remove the car from the street",
    "replace the background with a snowy mountain landscape at dusk",
    "turn it into a watercolor painting, change the season to winter",
)

# Sana's flow-matching DPM-Solver++ schedule (the Sana family's scheduler_config.json).
SANA_SCHEDULER_CONFIG: dict[str, Any] = load_config("sana_scheduler")["config"]

MODEL_INDEX: dict[str, Any] = {
    "_class_name": "VIBESanaEditingPipeline",
    "_diffusers_version": "0.33.1",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen3VLProcessor"],
    "transformer": ["vibe.transformer.vibe_sana_editing", "VIBESanaEditingModel"],
    "vae": ["diffusers", "AutoencoderDC"],
}


@dataclass(frozen=True)
class TinySpec:
    """Sizes and format choices of a tiny checkpoint. The defaults mirror the parity fixtures' checkpoint."""

    seed: int = 0
    vocab_size: int = 300  # learned tokens; the 7 specials follow
    vlm_hidden: int = 64
    vlm_layers: int = 2
    vision_hidden: int = 32
    vision_patch: int = 8
    latent_channels: int = 4
    dit_heads: int = 2
    dit_head_dim: int = 8
    dit_layers: int = 2
    caption_channels: int = 32
    num_meta_queries: int = 8
    edit_head_hidden: int = 32
    edit_head_depth: int = 1
    qk_norm: str | bool | None = None
    qk_norm_width: str = "all"  # the norms a legacy qk_norm=True writes: "all" heads (Sana's form) or one "head"
    vae_stages: int = 6  # a DC-AE with n stages downsamples 2**(n-1) times (six: the published 32x)
    dit_patch_size: int = 1
    cfg_distilled: bool = False
    legacy_processor: bool = True  # the transformers-4.57 files the published checkpoint ships


@contextmanager
def on_meta(dtype: torch.dtype) -> Iterator[None]:
    """Build modules without allocating (meta device), with parameters created in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(previous)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def random_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Deterministic random weights that keep activations in range: 1/sqrt(fan_in) matrices, unit norms."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            # Drawn where the generator lives, so a full-size model initialises on the GPU in seconds.
            on = {"generator": generator, "device": generator.device}
            if param.ndim >= 2 and leaf != "meta_queries":
                fan_in = param[0].numel()
                values = torch.randn(param.shape, **on) / fan_in**0.5
            elif "norm" in name and leaf == "weight":
                values = torch.ones(param.shape, device=generator.device)
            else:
                values = torch.randn(param.shape, **on) * (0.02 if leaf == "bias" else 1.0)
                if leaf in ("meta_queries", "scale_shift_table"):
                    values = values / param.shape[-1] ** 0.5
            param.copy_(values.to(param.device, param.dtype))
    return module


# ---- configs ---------------------------------------------------------------------------------------------------


def text_encoder_config(spec: TinySpec) -> dict[str, Any]:
    """A tiny Qwen3-VL config in the transformers-4.57 form (``rope_scaling`` + ``rope_theta``)."""
    first_special = spec.vocab_size
    ids = {token: first_special + i for i, token in enumerate(SPECIAL_TOKENS)}
    head_dim = 16
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "dtype": "float32",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": first_special + 20,
            "hidden_size": spec.vlm_hidden,
            "intermediate_size": 2 * spec.vlm_hidden,
            "num_hidden_layers": spec.vlm_layers,
            "num_attention_heads": spec.vlm_hidden // head_dim,
            "num_key_value_heads": max(1, spec.vlm_hidden // head_dim // 2),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            "rope_theta": 5000000.0,
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": 2,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": 2 * spec.vision_hidden,
            "num_heads": 2,
            "patch_size": spec.vision_patch,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "out_hidden_size": spec.vlm_hidden,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
            "hidden_act": "gelu_pytorch_tanh",
        },
        "transformers_version": "4.57.1",
    }


def transformer_config(spec: TinySpec) -> dict[str, Any]:
    """The reference's ``VIBESanaEditingModel`` config fields at tiny size."""
    inner = spec.dit_heads * spec.dit_head_dim
    config = {
        "_class_name": "VIBESanaEditingModel",
        "_diffusers_version": "0.33.1",
        "attention_bias": False,
        "attention_head_dim": spec.dit_head_dim,
        "caption_channels": spec.caption_channels,
        "cross_attention_dim": inner,
        "cross_attention_head_dim": spec.dit_head_dim,
        "dropout": 0.0,
        "edit_head_input_dim": spec.vlm_hidden,
        "edit_head_stacks_num": spec.edit_head_depth,
        "guidance_embeds": False,
        "in_channels": 2 * spec.latent_channels,
        "input_condition_type": "channel_cat",
        "interpolation_scale": None,
        "meta_queries_dim": spec.vlm_hidden,
        "mlp_ratio": 2.5,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-06,
        "num_attention_heads": spec.dit_heads,
        "num_cross_attention_heads": spec.dit_heads,
        "num_layers": spec.dit_layers,
        "num_meta_queries": spec.num_meta_queries,
        "out_channels": spec.latent_channels,
        "patch_size": spec.dit_patch_size,
        "qk_norm": spec.qk_norm,
        "sample_size": 8,
        "timestep_scale": 1.0,
    }
    if spec.cfg_distilled:
        config["cfg_distilled"] = True
    return config


def vae_config(spec: TinySpec) -> dict[str, Any]:
    """A DC-AE at tiny width: three ResBlock stages, then EfficientViT ones (six stages in all: the published 32x)."""
    stages = spec.vae_stages
    if stages < 4:
        raise ValueError(f"a tiny DC-AE needs at least 4 stages, got {stages}")
    blocks = ["ResBlock"] * 3 + ["EfficientViTBlock"] * (stages - 3)
    channels = [8, 8] + [16] * (stages - 2)
    multiscales = [[]] * 3 + [[5]] * (stages - 3)
    return {
        "_class_name": "AutoencoderDC",
        "_diffusers_version": "0.33.1",
        "attention_head_dim": 4,
        "in_channels": 3,
        "latent_channels": spec.latent_channels,
        "scaling_factor": 0.41407,
        "encoder_block_types": blocks,
        "decoder_block_types": blocks,
        "encoder_block_out_channels": channels,
        "decoder_block_out_channels": channels,
        "encoder_layers_per_block": [1] * stages,
        "decoder_layers_per_block": [1] * stages,
        "encoder_qkv_multiscales": multiscales,
        "decoder_qkv_multiscales": multiscales,
        "downsample_block_type": "Conv",
        "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
    }


def image_processor_config(patch_size: int, min_pixels: int = 256, max_pixels: int = 65536) -> dict[str, Any]:
    """``preprocessor_config.json`` as transformers 4.57 saves it for the fast Qwen2-VL image processor."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "merge_size": 2,
        "patch_size": patch_size,
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "temporal_patch_size": 2,
    }


# ---- components ------------------------------------------------------------------------------------------------


def train_tokenizer(vocab_size: int, corpus: Iterable[str] = _CORPUS):
    """A byte-level BPE tokenizer with the Qwen split, then the 7 Qwen special tokens (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(list(corpus) * 4, trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def tokenizer_config(first_special: int) -> dict[str, Any]:
    """``tokenizer_config.json`` as transformers 4.57 writes it for Qwen2Tokenizer."""
    decoder = {
        str(first_special + i): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "processor_class": "Qwen3VLProcessor",
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(folder: Path, spec: TinySpec, image_fields: dict[str, Any] | None = None) -> None:
    """The ``tokenizer/`` folder: tokenizer, chat template and image-processor config.

    ``image_fields`` override the image processor's tiny values (a real-size random checkpoint keeps the real
    patch geometry and pixel budget with the tiny tokenizer).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec.vocab_size)
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", tokenizer_config(spec.vocab_size))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    image_config = {**image_processor_config(spec.vision_patch), **(image_fields or {})}
    if spec.legacy_processor:
        tokenizer.model.save(str(folder))  # vocab.json + merges.txt, as 4.57 ships them
        write_json(folder / "preprocessor_config.json", image_config)
        video = {**image_config, "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2}
        video.pop("image_processor_type")
        write_json(folder / "video_preprocessor_config.json", video)
    else:
        image_config["image_processor_type"] = "Qwen2VLImageProcessor"
        image_config.pop("processor_class")
        write_json(
            folder / "processor_config.json", {"image_processor": image_config, "processor_class": "Qwen3VLProcessor"}
        )


def materialise(model: nn.Module, generator: torch.Generator, device: str | torch.device) -> nn.Module:
    """Allocate a meta-built model on ``device`` with random weights; ``device="meta"`` keeps it unallocated."""
    if torch.device(device).type != "meta":
        model = random_init_(model.to_empty(device=device), generator)
    return model.eval()


def build_text_encoder(
    config: dict[str, Any],
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A random Qwen3-VL from a config dict (built on the meta device, then materialised)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig.from_dict(config)
    with on_meta(dtype):
        model = Qwen3VLForConditionalGeneration(cfg)
    model = materialise(model, generator, device)
    model.tie_weights()
    _reset_buffers(model, device)
    return model.eval()


def _reset_buffers(model: nn.Module, device: str | torch.device) -> None:
    """Recompute the rotary tables (non-persistent buffers) that ``to_empty`` left uninitialised.

    Each rotary module is rebuilt from its config on the CPU and its buffers copied over, so this follows whatever
    the installed transformers computes.
    """
    for module in model.modules():
        if getattr(module, "inv_freq", None) is None or not hasattr(module, "config"):
            continue
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for name, buffer in fresh.named_buffers(recurse=False):
            getattr(module, name).copy_(buffer.to(device))


def build_transformer(
    config: dict[str, Any],
    head_hidden: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    qk_norm_width: str = "all",
) -> nn.Module:
    """A random VIBE editing transformer from its config dict, built by diffusers (the checkpoint's layout).

    A legacy ``qk_norm: true`` gets norms over ``"all"`` heads or one ``"head"``, named by the loader's mapping.
    """
    from ..loading.checkpoint import SANA_FIELDS, legacy_qk_norm
    from ..models.transformer import EditHeadSpec
    from .reference import ReferenceVibeTransformer

    sana = {k: v for k, v in config.items() if k in SANA_FIELDS}
    if sana.get("qk_norm") is False:
        sana["qk_norm"] = None
    elif sana.get("qk_norm") is True:
        if qk_norm_width not in ("all", "head"):
            raise ValueError(f"qk_norm_width must be 'all' or 'head', not {qk_norm_width!r}")
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        sana["qk_norm"] = legacy_qk_norm(head_dim * (heads if qk_norm_width == "all" else 1), heads, head_dim)
    head = EditHeadSpec(
        num_meta_queries=config["num_meta_queries"],
        meta_queries_dim=config["meta_queries_dim"],
        input_dim=config["edit_head_input_dim"],
        hidden_dim=head_hidden,
        depth=config["edit_head_stacks_num"],
    )
    with on_meta(dtype):
        model = ReferenceVibeTransformer(sana, head)
    return materialise(model, generator, device)


def build_vae(
    config: dict[str, Any],
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A random DC-AE from its config dict."""
    from diffusers import AutoencoderDC

    with on_meta(dtype):
        vae = AutoencoderDC.from_config(config)
    return materialise(vae, generator, device)


def save_safetensors(model: nn.Module, path: Path, skip: Iterable[str] = ()) -> None:
    """A model's state dict as one safetensors file, copied to the host tensor by tensor (in its own dtype)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in set(skip)}
    save_file(state, str(path), metadata={"format": "pt"})


def write_pipeline_files(
    root: Path, spec: TinySpec, scheduler_config: dict[str, Any], image_fields: dict[str, Any] | None = None
) -> None:
    """Everything of the published layout but the weighted components: model_index.json, scheduler/, tokenizer/."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "model_index.json", MODEL_INDEX)
    write_json(root / "scheduler" / "scheduler_config.json", {**scheduler_config, "_diffusers_version": "0.33.1"})
    write_tokenizer(root / "tokenizer", spec, image_fields)


def write_component(root: Path, name: str, config: dict[str, Any], model: nn.Module, skip: Iterable[str] = ()) -> None:
    """One weighted component's folder as the loader reads it: its config.json and one safetensors file."""
    from ..loading.checkpoint import CONFIG_FILES, WEIGHT_FILES

    write_json(root / name / CONFIG_FILES[name], config)
    save_safetensors(model, root / name / WEIGHT_FILES[name][0], skip)


def build_tiny_checkpoint(root: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny random checkpoint in the published layout to ``root``; returns the folder."""
    spec = spec or TinySpec()
    root = Path(root)
    write_pipeline_files(root, spec, SANA_SCHEDULER_CONFIG)

    te_config = text_encoder_config(spec)
    text_encoder = build_text_encoder(te_config, torch.Generator().manual_seed(spec.seed))
    write_component(root, "text_encoder", te_config, text_encoder, skip=("lm_head.weight",))

    tr_config = transformer_config(spec)
    transformer = build_transformer(
        tr_config, spec.edit_head_hidden, torch.Generator().manual_seed(spec.seed + 1), qk_norm_width=spec.qk_norm_width
    )
    write_component(root, "transformer", tr_config, transformer)

    v_config = vae_config(spec)
    write_component(root, "vae", v_config, build_vae(v_config, torch.Generator().manual_seed(spec.seed + 2)))
    return root


def install_in_hf_cache(checkpoint: str | Path, cache_dir: str | Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """Lay a checkpoint folder out as the Hugging Face cache does (blobs, a snapshot of links, refs/main).

    Lets tests and demos exercise cache lookup, listing, verification and removal without any download.
    """
    import hashlib
    import os
    import shutil

    checkpoint = Path(checkpoint)
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for source in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = snapshot / source.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot
