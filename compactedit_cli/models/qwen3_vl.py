"""Qwen3-VL as VIBE runs it: the vision tower and the language model, plain torch, no generation.

The edit path needs the VLM only as a text encoder: one image per row, one causal pass, the final-norm states.
transformers' class brings its whole modelling stack (and ``torch._dynamo``) into every edit; this module is the
same network in a few hundred lines, with the published checkpoint's state-dict keys (``model.visual.*``,
``model.language_model.*``; no ``lm_head``, which conditioning never uses) and every size read from the
checkpoint's ``text_encoder/config.json``.

Numerics follow transformers' SDPA path op for op: RMS norms in float32 rounded back before the weight, the text
rotary tables rounded to the activations' dtype and applied there, the vision rotary applied in float32, the
learned vision position table resampled with float32 bilinear weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

TEXT_ROPE_TYPES = ("default",)  # what the published checkpoint uses; scaled variants are refused
DEFAULT_MROPE_SECTION = (24, 20, 20)  # transformers' default when the config names none


def uninitialised_embedding(count: int, width: int) -> nn.Embedding:
    """An embedding table left as allocated: loading fills it, and ``nn.Embedding``'s own ``normal_`` initialisation
    goes through a torch function that imports ``torch._dynamo``, which an eager edit should never load."""
    return nn.Embedding(count, width, _weight=torch.empty(count, width))


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's sizes (``vision_config``)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        """Side of the square learned position grid."""
        return math.isqrt(self.num_position_embeddings)


@dataclass(frozen=True)
class TextConfig:
    """The language model's sizes (``text_config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    attention_bias: bool


@dataclass(frozen=True)
class Qwen3VLConfig:
    """What the encoder needs from a Qwen3-VL ``config.json``; :meth:`from_dict` checks it."""

    vision: VisionConfig
    text: TextConfig
    image_token_id: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Qwen3VLConfig:
        """Parse a config in either transformers layout (4.x ``rope_scaling`` + ``rope_theta``, 5.x
        ``rope_parameters``); a value this module does not implement raises ``ValueError`` naming the field."""
        text = _section(data, "text_config")
        vision = _section(data, "vision_config")
        return cls(vision=_vision_config(vision), text=_text_config(text), image_token_id=_int(data, "image_token_id"))


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be an object")
    return value


def _int(data: Mapping[str, Any], key: str, default: int | None = None, where: str = "") -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}{key} must be a non-negative integer, got {value!r}")
    return value


def _positive(data: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = _int(data, key, default, where)
    if value == 0:
        raise ValueError(f"{where}{key} must be positive")
    return value


def _activation(data: Mapping[str, Any], where: str) -> str:
    value = data.get("hidden_act")
    if value not in ACTIVATIONS:
        raise ValueError(f"{where}hidden_act {value!r} is not supported ({', '.join(ACTIVATIONS)})")
    return value


def _single_size(data: Mapping[str, Any], key: str, where: str, default: int) -> int:
    """Patch sizes may be written ``[n, n]``; a non-square patch is refused."""
    value = data.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{where}{key} {list(value)!r}: only square patches are supported")
        value = value[0]
    return _positive({key: value}, key, where)


def _rope(data: Mapping[str, Any], where: str, default_theta: float, default_type: str) -> dict[str, Any]:
    """The rope settings, merged from ``rope_parameters`` / ``rope_scaling`` and a top-level ``rope_theta``.

    The type may be written ``type`` (older configs), and ``mrope`` is transformers' old name for the default.
    """
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}rope_parameters must be an object")
    merged = {"rope_theta": data.get("rope_theta", default_theta), **params}
    rope_type = merged.get("rope_type", merged.get("type", default_type))
    merged["rope_type"] = "default" if rope_type == "mrope" else rope_type
    theta = merged["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"{where}rope_theta must be a positive number, got {theta!r}")
    return merged


def _vision_config(data: Mapping[str, Any]) -> VisionConfig:
    where = "vision_config."
    rope = _rope(data, where, 10000.0, "axial")
    if rope["rope_type"] != "axial":
        raise ValueError(f"{where}rope_type {rope['rope_type']!r} is not supported (Qwen3-VL's vision rope is axial)")
    hidden, heads = _positive(data, "hidden_size", where), _positive(data, "num_heads", where)
    if hidden % heads or (hidden // heads) % 4:
        raise ValueError(f"{where}hidden_size {hidden} must split into {heads} heads of a multiple of 4")
    positions = _positive(data, "num_position_embeddings", where)
    if math.isqrt(positions) ** 2 != positions:
        raise ValueError(f"{where}num_position_embeddings {positions} is not a square grid")
    depth = _positive(data, "depth", where)
    indexes = data.get("deepstack_visual_indexes", (8, 16, 24))
    # One merger per entry; a block listed twice feeds only the first of its mergers, as in transformers.
    if not isinstance(indexes, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in indexes):
        raise ValueError(f"{where}deepstack_visual_indexes {indexes!r} must be a list of block indexes")
    return VisionConfig(
        depth=depth,
        hidden_size=hidden,
        intermediate_size=_positive(data, "intermediate_size", where),
        num_heads=heads,
        hidden_act=_activation(data, where),
        in_channels=_positive(data, "in_channels", where, 3),
        patch_size=_single_size(data, "patch_size", where, 16),
        temporal_patch_size=_single_size(data, "temporal_patch_size", where, 2),
        spatial_merge_size=_positive(data, "spatial_merge_size", where, 2),
        out_hidden_size=_positive(data, "out_hidden_size", where),
        num_position_embeddings=positions,
        deepstack_visual_indexes=tuple(indexes),
        rope_theta=float(rope["rope_theta"]),
    )


def _text_config(data: Mapping[str, Any]) -> TextConfig:
    where = "text_config."
    rope = _rope(data, where, 500000.0, "default")
    if rope["rope_type"] not in TEXT_ROPE_TYPES:
        raise ValueError(f"{where}rope_type {rope['rope_type']!r} is not supported ({', '.join(TEXT_ROPE_TYPES)})")
    if rope.get("mrope_interleaved", True) is not True:
        raise ValueError(f"{where}mrope_interleaved must be true: Qwen3-VL interleaves its M-RoPE sections")
    heads = _positive(data, "num_attention_heads", where)
    kv_heads = data.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _positive(data, "num_key_value_heads", where)
    if heads % kv_heads:
        raise ValueError(f"{where}num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = _positive(data, "head_dim", where, 128)
    section = tuple(rope.get("mrope_section", DEFAULT_MROPE_SECTION))
    if len(section) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in section):
        raise ValueError(f"{where}mrope_section {list(section)!r} must be 3 non-negative sizes")
    if data.get("attention_dropout", 0.0):
        raise ValueError(f"{where}attention_dropout must be 0 (the encoder only runs inference)")
    eps = data.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"{where}rms_norm_eps must be a positive number, got {eps!r}")
    return TextConfig(
        vocab_size=_positive(data, "vocab_size", where),
        hidden_size=_positive(data, "hidden_size", where),
        intermediate_size=_positive(data, "intermediate_size", where),
        num_hidden_layers=_positive(data, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=_activation(data, where),
        rms_norm_eps=float(eps),
        rope_theta=float(rope["rope_theta"]),
        mrope_section=section,  # type: ignore[arg-type]
        attention_bias=bool(data.get("attention_bias", False)),
    )


# ---- shared pieces ---------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) over the two halves of the last dimension: the rotary pairing Qwen uses."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def inverse_frequencies(dim: int, theta: float, device: torch.device | None) -> torch.Tensor:
    """Rotary inverse frequencies for a ``dim``-wide rotation, in float32 (computed, never stored: a meta-built
    model has no tables to fill in)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    return 1.0 / (theta**exponents)


class RMSNorm(nn.Module):
    """Qwen's RMS norm: normalised in float32, rounded to the input's dtype, then scaled by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---- vision tower ----------------------------------------------------------------------------------------------


def vision_grid_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, (total, 2), in the order the patches arrive: merge block by merge block.

    The processor emits each ``merge x merge`` block's patches together so the merger can concatenate them; the
    rotary angles and the position-table lookup both follow that order.
    """
    device = grid_thw.device
    rows = []
    for t, h, w in grid_thw.tolist():
        row, col = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        pairs = torch.stack(
            [row.reshape(shape).transpose(1, 2).flatten(), col.reshape(shape).transpose(1, 2).flatten()]
        )
        rows.append(pairs.T.repeat(t, 1))
    return torch.cat(rows)


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align-corners) taps into a ``side``-long table for positions ``index`` on axes ``size`` long."""
    source = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(source)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (source[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class VisionPatchEmbed(nn.Module):
    """A 3-D convolution whose stride is its kernel: one token per (temporal x spatial) patch."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        c = self.config
        pixels = pixels.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return self.proj(pixels.to(self.proj.weight.dtype)).view(-1, c.hidden_size)


class VisionAttention(nn.Module):
    """Full attention within each image, 2-D rotary applied in float32."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, lengths: list[int], rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        length = x.shape[0]
        q, k, v = self.qkv(x).reshape(length, 3, self.heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = (t.unsqueeze(-2) for t in rotary)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, total, head_dim)
        outputs = [
            F.scaled_dot_product_attention(qi, ki, vi).transpose(1, 2)
            for qi, ki, vi in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
        ]
        return self.proj(torch.cat(outputs, dim=1).reshape(length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, lengths: list[int], rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), lengths, rotary)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each ``merge x merge`` block into one LLM token; DeepStack's mergers norm after concatenating."""

    def __init__(self, config: VisionConfig, norm_after_concat: bool) -> None:
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size**2
        self.norm_after_concat = norm_after_concat
        self.norm = nn.LayerNorm(self.merged if norm_after_concat else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.merged)) if self.norm_after_concat else self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    """Patches -> merged image tokens, plus one DeepStack feature set per tapped block."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = VisionPatchEmbed(config)
        self.pos_embed = uninitialised_embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, norm_after_concat=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, norm_after_concat=True) for _ in config.deepstack_visual_indexes
        )

    def position_embeddings(self, positions: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The learned square position table resampled bilinearly (corners aligned) to each image's patch grid."""
        counts = grid_thw.prod(-1)
        heights = torch.repeat_interleave(grid_thw[:, 1], counts)
        widths = torch.repeat_interleave(grid_thw[:, 2], counts)
        side = self.config.grid_side
        row_taps, row_weights = _axis_taps(positions[:, 0], heights, side)
        col_taps, col_weights = _axis_taps(positions[:, 1], widths, side)
        indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).flatten(1)
        weights = (row_weights[:, :, None] * col_weights[:, None, :]).flatten(1)
        return (self.pos_embed(indices) * weights[:, :, None]).sum(1)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (total, head_dim), float32: rows and columns each rotate a quarter of the head, repeated."""
        inv_freq = inverse_frequencies(self.config.head_dim // 2, self.config.rope_theta, positions.device)
        angles = (positions[..., None].float() * inv_freq).flatten(1)  # (total, 2 * head_dim / 4): rows then cols
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(image tokens (total / merge², out), DeepStack features in block order), all images packed."""
        positions = vision_grid_positions(grid_thw, self.config.spatial_merge_size)
        x = self.patch_embed(pixels)
        x = x + self.position_embeddings(positions, grid_thw).to(x.dtype)
        rotary = self.rotary(positions)
        lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        taps = self.config.deepstack_visual_indexes
        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, lengths, rotary)
            if index in taps:
                deepstack.append(self.deepstack_merger_list[taps.index(index)](x))
        return self.merger(x), deepstack


# ---- language model --------------------------------------------------------------------------------------------


def text_rotary(
    config: TextConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved M-RoPE tables (B, L, head_dim) in ``dtype`` from (3, B, L) temporal/height/width positions.

    Frequency slot i takes its angle from the height positions when i % 3 == 1 and from the width positions when
    i % 3 == 2 (within the first 3 x section slots), from the temporal ones otherwise.
    """
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # (3, B, L, head_dim / 2)
    mixed = angles[0].clone()
    for axis, offset in ((1, 1), (2, 2)):
        slots = slice(offset, config.mrope_section[axis] * 3, 3)
        mixed[..., slots] = angles[axis, ..., slots]
    mixed = torch.cat([mixed, mixed], dim=-1)
    return mixed.cos().to(dtype), mixed.sin().to(dtype)


class TextAttention(nn.Module):
    """Grouped-query causal attention with per-head q/k RMS norms before the rotary."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        shape = (batch, length, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rotary)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        if mask is None:  # every row full: the causal kernel, keys and values shared across query groups
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        else:
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class TextMLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.self_attn = TextAttention(config)
        self.mlp = TextMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, L, L) bool: causal, and no query attends to a padded key; None when no row has padding."""
    valid = attention_mask.bool()
    if bool(valid.all()):
        return None
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return causal[None, None] & valid[:, None, None, :]


class TextModel(nn.Module):
    """The decoder stack, with DeepStack features added at the visual positions after its first layers."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = uninitialised_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_embeds: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Final-norm hidden states (B, L, hidden) of one causal pass over right-padded rows."""
        x = inputs_embeds
        rotary = text_rotary(self.config, position_ids, x.dtype)
        mask = causal_padding_mask(attention_mask)
        for index, layer in enumerate(self.layers):
            x = layer(x, rotary, mask)
            if index < len(deepstack_embeds):
                x = x.clone()
                x[visual_pos_masks] = x[visual_pos_masks] + deepstack_embeds[index].to(x.device, x.dtype)
        return self.norm(x)


# ---- the encoder -----------------------------------------------------------------------------------------------


class Qwen3VLModel(nn.Module):
    """The two towers under the names the checkpoint's keys use (``model.visual``, ``model.language_model``)."""

    def __init__(self, config: Qwen3VLConfig) -> None:
        super().__init__()
        self.visual = VisionModel(config.vision)
        self.language_model = TextModel(config.text)


class Qwen3VLEncoder(nn.Module):
    """Qwen3-VL without its LM head: image features, the 3-D rope index, and the language model's final states."""

    def __init__(self, config: Qwen3VLConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3VLModel(config)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    @property
    def device(self) -> torch.device:
        """Where the token embeddings are, which is where the inputs go (also while other weights are offloaded)."""
        return self.embed_tokens.weight.device

    def image_features(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image tokens and DeepStack features for all images, packed in order."""
        return self.model.visual(pixel_values.to(self.model.visual.patch_embed.proj.weight.dtype), grid_thw)

    def rope_index(
        self, token_types: torch.Tensor, grid_thw: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(3, B, L) temporal/height/width positions; padded slots get 0.

        Over each row's valid tokens: a text run counts up on all three axes; an image run (token type 1) takes its
        grid's (t, h, w) offsets from the current position, and the next run starts max(h, w) / merge further on.
        Images are taken from ``grid_thw`` in order across the whole batch.
        """
        merge = self.config.vision.spatial_merge_size
        device = token_types.device
        positions = torch.zeros(3, *token_types.shape, dtype=torch.long, device=device)
        grids = iter(grid_thw.tolist())
        for row, (types, valid) in enumerate(zip(token_types, attention_mask.bool(), strict=True)):
            kinds = types[valid].tolist()
            pieces, start, current = [], 0, 0
            while start < len(kinds):
                end = start
                while end < len(kinds) and kinds[end] == kinds[start]:
                    end += 1
                if kinds[start] == 0:
                    pieces.append(torch.arange(end - start, device=device).expand(3, -1) + current)
                    current += end - start
                else:
                    if kinds[start] != 1:
                        raise ValueError(f"token type {kinds[start]} (video) is not supported: one image per row")
                    t, h, w = next(grids)
                    grid = torch.meshgrid(
                        torch.arange(t, device=device),
                        torch.arange(h // merge, device=device),
                        torch.arange(w // merge, device=device),
                        indexing="ij",
                    )
                    pieces.append(torch.stack(grid).reshape(3, -1) + current)
                    current += max(h, w) // merge
                start = end
            if pieces:
                positions[:, row, valid] = torch.cat(pieces, dim=1)
        return positions

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_embeds: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The language model's final-norm states (see :meth:`TextModel.forward`)."""
        return self.model.language_model(
            inputs_embeds, attention_mask, position_ids, visual_pos_masks, deepstack_embeds
        )
