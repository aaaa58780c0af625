"""A checkpoint folder in the published diffusers layout: what it must hold, and loading it component by component.

``model_index.json`` names five components. The transformer entry points at the reference's own module
(``vibe.transformer.vibe_sana_editing``), which is never imported: the class name is checked and the weights are
loaded into :class:`VibeEditingTransformer`. Only safetensors are read, and no code from the checkpoint runs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..engine.binning import BIN_MULTIPLE
from ..engine.processor import load_processor
from ..engine.schedulers import Scheduler, scheduler_from_config
from ..errors import CheckpointError
from ..models.dcae import DCAE, DCAEConfig, DCAEConfigError
from ..models.qwen3_vl import Qwen3VLConfig, Qwen3VLEncoder
from ..models.transformer import EditHeadSpec, SanaConfig, VibeEditingTransformer

COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")

# component -> (library, accepted class names); None accepts any library (the transformer's custom module path).
EXPECTED_CLASSES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "tokenizer": ("transformers", ("Qwen3VLProcessor",)),
    "text_encoder": ("transformers", ("Qwen3VLForConditionalGeneration",)),
    "transformer": (None, ("VIBESanaEditingModel",)),
    "vae": ("diffusers", ("AutoencoderDC",)),
    "scheduler": ("diffusers", ("DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler")),
}

# Weight files per component: (single file, sharded index).
WEIGHT_FILES = {
    "text_encoder": ("model.safetensors", "model.safetensors.index.json"),
    "transformer": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
}
CONFIG_FILES = {
    "scheduler": "scheduler_config.json",
    "text_encoder": "config.json",
    "transformer": "config.json",
    "vae": "config.json",
}

# Config fields the reference class adds to Sana's; they are read here, not passed to the DiT.
VIBE_FIELDS = frozenset(
    {"input_condition_type", "edit_head_input_dim", "edit_head_stacks_num", "num_meta_queries", "meta_queries_dim"}
)
SANA_FIELDS = frozenset(field.name for field in dataclasses.fields(SanaConfig))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, or a CheckpointError that names the file."""
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def read_model_index(root: Path) -> dict[str, Any]:
    """``model_index.json``, checked to describe a VIBE editing pipeline."""
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    index = read_json(root / "model_index.json")
    missing = [name for name in COMPONENTS if name not in index]
    if missing:
        raise CheckpointError(
            f"{root} is not a VIBE editing checkpoint: model_index.json has no {', '.join(missing)} entry"
        )
    for name, (library, classes) in EXPECTED_CLASSES.items():
        entry = index[name]
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise CheckpointError(f"model_index.json: {name} must be [library, class], got {entry!r}")
        lib, cls = entry
        if cls not in classes or (library is not None and lib != library):
            raise CheckpointError(
                f"{root} is not a VIBE editing checkpoint: {name} is {lib}.{cls}, expected {' or '.join(classes)}"
            )
    return index


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component, following a shard index when there is one."""
    single, index_name = WEIGHT_FILES[folder.name]
    if (folder / single).is_file():
        return [folder / single]
    if (folder / index_name).is_file():
        weight_map = read_json(folder / index_name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / index_name} has no weight_map")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.ckpt")):
        raise CheckpointError(f"{folder} has only pickle weights; compactedit loads safetensors only")
    raise CheckpointError(f"missing file: {folder / single}")


def tokenizer_files(folder: Path) -> list[Path]:
    """The processor files that must exist in ``tokenizer/`` (either transformers layout)."""
    image_config = folder / "preprocessor_config.json"
    if not image_config.is_file() and (folder / "processor_config.json").is_file():
        image_config = folder / "processor_config.json"
    vocab = [folder / "tokenizer.json"]
    if not vocab[0].is_file() and (folder / "vocab.json").is_file():
        vocab = [folder / "vocab.json", folder / "merges.txt"]
    return [image_config, folder / "tokenizer_config.json", *vocab]


def implied_files(root: Path) -> list[Path]:
    """Every file ``model_index.json`` implies: configs, processor files and all weight shards."""
    read_model_index(root)
    files = [root / "model_index.json"]
    files += [root / name / config for name, config in CONFIG_FILES.items()]
    files += tokenizer_files(root / "tokenizer")
    for name in WEIGHT_FILES:
        files += weight_files(root / name)
    return files


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries (dtype, shape, data_offsets) of a safetensors file, read without loading any data.

    Also checks the file is as long as its header says, which catches truncated downloads.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            if header_len <= 0 or 8 + header_len > size:
                raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc})") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt header")
    header.pop("__metadata__", None)
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path} has a corrupt header ({exc})") from exc
    if size < 8 + header_len + end:
        raise CheckpointError(f"{path} is truncated: {size} bytes, expected {8 + header_len + end}")
    return header


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file."""
    return {name: tuple(entry["shape"]) for name, entry in read_safetensors_header(path).items()}


def verify_folder(root: Path) -> list[Path]:
    """Check a checkpoint is complete before loading: every implied file exists and each header reads."""
    files = implied_files(root)
    missing = [str(f.relative_to(root)) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {root} is incomplete: missing {', '.join(missing)}")
    for path in files:
        if path.suffix == ".safetensors":
            read_safetensors_header(path)
    return files


def state_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Names and shapes over all shards of a component."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes.update(read_header(path))
    return shapes


# A self-attention's query and key norms, in any block; a legacy ``qk_norm: true`` is read from their width.
_QK_NORM_KEY = re.compile(r"transformer_blocks\.\d+\.attn1\.norm_[qk]\.weight")


def legacy_qk_norm(norm_width: int, heads: int, head_dim: int) -> str | None:
    """The diffusers form a legacy ``qk_norm: true`` stands for, by how wide its norms are (None: neither form).

    diffusers' Attention gives ``rms_norm_across_heads`` norms over the whole projection (heads x head_dim) and
    ``rms_norm`` norms over one head. With one head the two are the same module; the across-heads name is used.
    """
    if norm_width == heads * head_dim:
        return "rms_norm_across_heads"
    if norm_width == head_dim:
        return "rms_norm"
    return None


def resolve_qk_norm(
    value: Any, shapes: dict[str, tuple[int, ...]], heads: int, head_dim: int, folder: Path
) -> str | None:
    """``qk_norm`` as diffusers' Attention takes it (a string or None), checked against the weights in ``folder``.

    Sana's attention normalises the whole query and key projections before it splits them into heads, so a norm
    one head wide cannot run with more than one head: such a checkpoint is refused here, not at the first step.
    """
    if value is not None and not isinstance(value, (bool, str)):
        raise CheckpointError(f"{folder}: qk_norm must be a string, null or a boolean, got {value!r}")
    if value is None or value is False:
        return None
    widths = {shape[0] for name, shape in shapes.items() if _QK_NORM_KEY.fullmatch(name) and shape}
    if len(widths) > 1:
        raise CheckpointError(f"{folder}: the blocks' attn1 query/key norms disagree in width ({sorted(widths)})")
    width = next(iter(widths), None)
    inner = heads * head_dim
    form = value
    if value is True:
        if width is None:
            raise CheckpointError(f"{folder}: qk_norm is true but no block has attn1.norm_q / norm_k weights")
        form = legacy_qk_norm(width, heads, head_dim)
        if form is None:
            raise CheckpointError(
                f"{folder}: qk_norm is true but the attn1 norms are {width} wide, "
                f"neither one head ({head_dim}) nor all {heads} heads ({inner})"
            )
    if width is not None and width != inner:
        named = f"{form!r}" if form == value else f"true (read as {form!r})"
        raise CheckpointError(
            f"{folder}: qk_norm {named} has attn1 norms {width} wide for a {inner}-wide projection; Sana's "
            "attention normalises the whole projection before splitting heads, so this checkpoint cannot run"
        )
    return form


def _require(config: dict[str, Any], key: str, path: Path) -> Any:
    if key not in config:
        raise CheckpointError(f"{path}: missing field {key!r}")
    return config[key]


def new_transformer(
    config: dict[str, Any], head_hidden: int, qk_norm: str | None, path: Path
) -> VibeEditingTransformer:
    """A transformer for a ``transformer/config.json`` (``path``), on the current default device.

    Every Sana field is passed on; a value the model does not implement is refused, naming the file and field.
    ``head_hidden`` is the edit head's width, which only the weights record.
    """
    condition = config.get("input_condition_type", "channel_cat")
    if condition != "channel_cat":
        raise CheckpointError(f"{path}: input_condition_type {condition!r} is not supported (channel_cat only)")
    sana = {key: value for key, value in config.items() if key in SANA_FIELDS}
    sana["qk_norm"] = qk_norm
    # Sana's default out_channels is in_channels, which here would double the latent width.
    sana["out_channels"] = _require(config, "out_channels", path)
    head = EditHeadSpec(
        num_meta_queries=_require(config, "num_meta_queries", path),
        meta_queries_dim=_require(config, "meta_queries_dim", path),
        input_dim=_require(config, "edit_head_input_dim", path),
        hidden_dim=head_hidden,
        depth=_require(config, "edit_head_stacks_num", path),
    )
    try:
        return VibeEditingTransformer(SanaConfig(**sana), head, cfg_distilled=bool(config.get("cfg_distilled", False)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def build_transformer(folder: Path) -> tuple[VibeEditingTransformer, list[Path]]:
    """The transformer on the meta device, sized from its config and the one width only the weights record."""
    config_path = folder / "config.json"
    config = read_json(config_path)
    files = weight_files(folder)
    shapes = state_shapes(files)
    if "edit_head.input_proj.weight" not in shapes or "meta_queries" not in shapes:
        raise CheckpointError(f"{folder} is not a VIBE editing transformer: no edit_head / meta_queries tensors")
    heads = _require(config, "num_attention_heads", config_path)
    head_dim = _require(config, "attention_head_dim", config_path)
    qk_norm = resolve_qk_norm(config.get("qk_norm"), shapes, heads, head_dim, folder)
    with torch.device("meta"):
        model = new_transformer(config, shapes["edit_head.input_proj.weight"][0], qk_norm, config_path)
    check_state_shapes(model, shapes, folder)
    return model, files


def check_state_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Strict comparison of a model's state dict with a checkpoint's tensors; the error names what differs."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(n for n in set(expected) & set(shapes) if expected[n] != shapes[n])
    if missing:
        problems.append("missing tensor(s) " + _few(missing))
    if unexpected:
        problems.append("unexpected tensor(s) " + _few(unexpected))
    if wrong:
        problems.append(
            "wrong shape for " + _few([f"{n} (file {list(shapes[n])}, model {list(expected[n])})" for n in wrong])
        )
    if problems:
        raise CheckpointError(f"{folder}: " + "; ".join(problems))


def _few(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(
    model: nn.Module,
    files: list[Path],
    device: torch.device,
    dtype: torch.dtype,
    rename: Callable[[str], str | None] | None = None,
) -> nn.Module:
    """Materialise a meta-device model from safetensors, in ``dtype`` on ``device`` (shapes already checked).

    Each tensor is read straight onto ``device`` and cast there one at a time, so neither a second host copy of the
    weights nor a whole second device copy (for a dtype cast) ever exists. ``rename`` maps a file's tensor name to
    the model's (None: a tensor the model does not use, never read).
    """
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    name = rename(key) if rename else key
                    if name is None:
                        continue
                    tensor = handle.get_tensor(key)
                    state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {path} ({exc}); re-download the model") from exc
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along each side: every DC-AE stage after the first halves the resolution.

    Derived as diffusers' Sana pipelines derive it, from ``encoder_block_out_channels`` (a ``config.json``
    mapping or a :class:`~compactedit_cli.models.dcae.DCAEConfig`).
    """
    return 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)


def build_vae(folder: Path) -> tuple[DCAE, list[Path]]:
    """The DC-AE on the meta device, from its config (a field it does not implement is refused, naming the file
    and field); weights checked strictly like the transformer's."""
    config_path = folder / "config.json"
    raw = read_json(config_path)
    files = weight_files(folder)
    try:
        config = DCAEConfig.from_dict(raw)
    except DCAEConfigError as exc:
        raise CheckpointError(f"{config_path}: cannot build the VAE: {exc}") from exc
    with torch.device("meta"):
        vae = DCAE(config)
    check_state_shapes(vae, state_shapes(files), folder)
    return vae, files


# Older Qwen-VL layouts transformers still reads, as (pattern, replacement), applied in order: a language model
# nested one level too deep, then the pre-4.52 top-level ``visual.*`` and ``model.*`` (the language model).
_TEXT_ENCODER_RENAMES = (
    (re.compile(r"^(?:model\.language_model|language_model\.model)\.model\."), "model.language_model."),
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
)


def text_encoder_key(name: str) -> str | None:
    """The encoder's name for a Qwen3-VL checkpoint tensor; None for the LM head, which conditioning never uses."""
    if name.startswith("lm_head."):
        return None
    for pattern, replacement in _TEXT_ENCODER_RENAMES:
        name = pattern.sub(replacement, name, count=1)
    return name


def build_text_encoder(folder: Path) -> tuple[Qwen3VLEncoder, list[Path]]:
    """Qwen3-VL on the meta device from its config, its tensors (in either key layout) checked strictly."""
    config_path = folder / CONFIG_FILES["text_encoder"]
    try:
        config = Qwen3VLConfig.from_dict(read_json(config_path))
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    files = weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in state_shapes(files).items():
        key = text_encoder_key(name)
        if key is None:
            continue
        if key in shapes:
            raise CheckpointError(f"{folder}: tensor {key} is stored twice (under two key layouts)")
        shapes[key] = shape
    with torch.device("meta"):
        model = Qwen3VLEncoder(config)
    check_state_shapes(model, shapes, folder)
    return model, files


def load_text_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> Qwen3VLEncoder:
    """Qwen3-VL's towers (no LM head) read straight onto ``device`` in ``dtype``, refusing any missing or stray
    tensor."""
    model, files = build_text_encoder(folder)
    return load_weights(model, files, device, dtype, rename=text_encoder_key)


def load_scheduler(folder: Path, class_name: str) -> Scheduler:
    """The scheduler named in model_index.json, from its config (no weights, no code); a value it does not
    implement is refused, naming the file and field."""
    path = folder / CONFIG_FILES["scheduler"]
    try:
        return scheduler_from_config(class_name, read_json(path))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


@dataclass
class Components:
    """Everything a checkpoint folder holds, loaded and checked against each other."""

    processor: Any
    text_encoder: Qwen3VLEncoder
    transformer: VibeEditingTransformer
    vae: DCAE
    scheduler: Scheduler

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (see :func:`vae_scale_factor`)."""
        return vae_scale_factor(self.vae.config)


def load_components(root: Path, device: torch.device, dtype: torch.dtype) -> Components:
    """Load all five components of a checkpoint folder onto ``device`` in ``dtype``."""
    index = read_model_index(root)
    transformer, transformer_files = build_transformer(root / "transformer")
    vae, vae_files = build_vae(root / "vae")
    _check_compatible(transformer, vae, root)
    processor = load_processor(root / "tokenizer")
    text_encoder, text_encoder_files = build_text_encoder(root / "text_encoder")
    hidden = text_encoder.config.text.hidden_size
    if transformer.head_spec.meta_queries_dim != hidden or transformer.head_spec.input_dim != hidden:
        raise CheckpointError(
            f"{root}: meta queries ({transformer.head_spec.meta_queries_dim}) and edit head input "
            f"({transformer.head_spec.input_dim}) must match the VLM hidden size {hidden}"
        )
    return Components(
        processor=processor,
        text_encoder=load_weights(text_encoder, text_encoder_files, device, dtype, rename=text_encoder_key),
        transformer=load_weights(transformer, transformer_files, device, dtype),
        vae=load_weights(vae, vae_files, device, dtype),
        scheduler=load_scheduler(root / "scheduler", index["scheduler"][1]),
    )


def _check_compatible(transformer: VibeEditingTransformer, vae: DCAE, root: Path) -> None:
    """The transformer and VAE fit each other, and the resolution-binning tables fit both."""
    latent = vae.config.latent_channels
    if transformer.config.in_channels != 2 * latent or transformer.config.out_channels != latent:
        raise CheckpointError(
            f"{root}: the transformer takes {transformer.config.in_channels} channels and predicts "
            f"{transformer.config.out_channels}; with {latent} VAE latent channels it must be {2 * latent} and {latent}"
        )
    factor = vae_scale_factor(vae.config)
    patch = transformer.config.patch_size
    if BIN_MULTIPLE % (factor * patch):
        raise CheckpointError(
            f"{root / 'vae' / 'config.json'}: a {factor}x VAE ({len(vae.config.encoder_block_out_channels)} encoder "
            f"stages) under a transformer with patch_size {patch} needs sizes in multiples of {factor * patch}, "
            f"but the resolution-binning tables are in multiples of {BIN_MULTIPLE}"
        )
