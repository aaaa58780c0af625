"""The DC-AE (deep compression autoencoder) in plain torch, with diffusers' ``AutoencoderDC`` state-dict layout.

Importing diffusers for its ``AutoencoderDC`` costs an edit's cold start more than the VAE's own work on a small
image (it pulls every UNet, transformer and ``torch._dynamo``), so the edit path builds the VAE from these modules.
Every number comes from the checkpoint's ``config.json`` (:meth:`DCAEConfig.from_dict`), every parameter keeps the
published checkpoint's key and shape, and each op runs in the dtype diffusers runs it in (its float32 upcasts in
the linear attention and the norms included), so the outputs agree with diffusers' to float rounding
(``tests/test_own_dcae.py``). The norms are :class:`~.norm.RMSNorm`, which bounds the float32 temporaries of the
large feature maps that set an edit's memory peak.

Tiling is not here: it is a memory strategy of the speed plan (:mod:`compactedit_cli.speed.tiling`). Nor are the
fused kernels: the blocks hold their linear attention, gated depthwise convolution and closing norm plus residual
as plain-torch callables, which ``--kernels triton`` swaps (:func:`use_linear_attention`, :func:`use_depthwise_glu`,
:func:`use_norm_residual`; :mod:`compactedit_cli.speed.kernels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .feedforward import DepthwiseGLU, depthwise_glu
from .norm import RMSNorm

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")  # diffusers also accepts layer_norm, which no DC-AE config uses
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "Conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}
NORM_EPS = 1e-5  # every norm of the DC-AE
ATTENTION_EPS = 1e-15  # the linear attention's guard against an all-zero denominator
GLU_EXPAND = 4  # the EfficientViT block's GLUMBConv widening

# (norm, y, x) -> norm(y) + x of (B, C, H, W) maps: a residual branch's closing norm (over channels) and its add
NormResidual = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# (qkv (B, heads·3D, H, W) map of (q, k, v) heads, before the ReLU; head size D) -> (B, H, W, heads·D) tokens in
# the map's dtype
MultiscaleAttention = Callable[[torch.Tensor, int], torch.Tensor]


class DCAEConfigError(ValueError):
    """A config field this DC-AE does not implement (or cannot be right); the loader names the file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# ---- the config ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DCAEConfig(Mapping[str, Any]):
    """``AutoencoderDC``'s config fields, with diffusers' defaults, one value per stage where a stage can differ.

    Readable as attributes and as a mapping (like diffusers' ``FrozenDict``), so code that reads a VAE config
    takes either this or the ``config.json`` mapping.
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] | str = "ResBlock"
    decoder_block_types: tuple[str, ...] | str = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple[str, ...] | str = "rms_norm"
    decoder_act_fns: tuple[str | None, ...] | str | None = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DCAEConfig:
        """The config of a ``config.json`` mapping, checked; fields diffusers does not know (``_class_name``) are
        ignored as diffusers ignores them. Raises :class:`DCAEConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            built = cls(**{k: v for k, v in config.items() if k in names})
            return built._normalised()
        except (TypeError, ValueError) as exc:
            if isinstance(exc, DCAEConfigError):
                raise
            raise DCAEConfigError("config", str(exc)) from exc

    def _normalised(self) -> DCAEConfig:
        enc_stages = len(_ints(self.encoder_block_out_channels, "encoder_block_out_channels"))
        dec_stages = len(_ints(self.decoder_block_out_channels, "decoder_block_out_channels"))
        values: dict[str, Any] = {
            "in_channels": _positive(self.in_channels, "in_channels"),
            "latent_channels": _positive(self.latent_channels, "latent_channels"),
            "attention_head_dim": _positive(self.attention_head_dim, "attention_head_dim"),
            "encoder_block_out_channels": _ints(self.encoder_block_out_channels, "encoder_block_out_channels"),
            "decoder_block_out_channels": _ints(self.decoder_block_out_channels, "decoder_block_out_channels"),
            "encoder_block_types": _per_stage(self.encoder_block_types, enc_stages, "encoder_block_types", BLOCK_TYPES),
            "decoder_block_types": _per_stage(self.decoder_block_types, dec_stages, "decoder_block_types", BLOCK_TYPES),
            "decoder_norm_types": _per_stage(self.decoder_norm_types, dec_stages, "decoder_norm_types", NORM_TYPES),
            "decoder_act_fns": tuple(
                None if act is None else _activation_name(act, "decoder_act_fns")
                for act in _stages(self.decoder_act_fns, dec_stages, "decoder_act_fns")
            ),
            "downsample_block_type": _choice(self.downsample_block_type, "downsample_block_type", DOWNSAMPLE_TYPES),
            "upsample_block_type": _choice(self.upsample_block_type, "upsample_block_type", UPSAMPLE_TYPES),
            "decoder_conv_act_fn": _activation_name(self.decoder_conv_act_fn, "decoder_conv_act_fn"),
            "encoder_out_shortcut": _flag(self.encoder_out_shortcut, "encoder_out_shortcut"),
            "decoder_in_shortcut": _flag(self.decoder_in_shortcut, "decoder_in_shortcut"),
            "scaling_factor": _number(self.scaling_factor, "scaling_factor"),
        }
        for side, stages in (("encoder", enc_stages), ("decoder", dec_stages)):
            layers = _ints(getattr(self, f"{side}_layers_per_block"), f"{side}_layers_per_block", minimum=0)
            values[f"{side}_layers_per_block"] = _per_stage(layers, stages, f"{side}_layers_per_block")
            scales = _stages(getattr(self, f"{side}_qkv_multiscales"), stages, f"{side}_qkv_multiscales")
            values[f"{side}_qkv_multiscales"] = tuple(_ints(s, f"{side}_qkv_multiscales") for s in scales)
        config = dataclasses.replace(self, **values)
        config._check_widths()
        return config

    def _check_widths(self) -> None:
        """The shortcuts average or repeat channel groups, so the widths they join must divide each other."""
        enc, dec = self.encoder_block_out_channels, self.decoder_block_out_channels
        if self.encoder_out_shortcut and enc[-1] % self.latent_channels:
            raise DCAEConfigError("encoder_out_shortcut", f"{enc[-1]} channels do not average to the latent's")
        if self.decoder_in_shortcut and dec[-1] % self.latent_channels:
            raise DCAEConfigError("decoder_in_shortcut", f"the latent does not repeat to {dec[-1]} channels")
        for i in range(len(enc) - 1):
            if self.encoder_layers_per_block[i] and (4 * enc[i]) % enc[i + 1]:
                raise DCAEConfigError("encoder_block_out_channels", f"{enc[i]} -> {enc[i + 1]} has no shortcut")
            if self.downsample_block_type == "pixel_unshuffle" and enc[i + 1] % 4:
                raise DCAEConfigError("encoder_block_out_channels", f"{enc[i + 1]} is not a multiple of 4")
        for i in range(len(dec) - 1):
            if self.decoder_layers_per_block[i] and (4 * dec[i]) % dec[i + 1]:
                raise DCAEConfigError("decoder_block_out_channels", f"{dec[i + 1]} -> {dec[i]} has no shortcut")
        for side, widths, types in (
            ("encoder", enc, self.encoder_block_types),
            ("decoder", dec, self.decoder_block_types),
        ):
            for width, kind in zip(widths, types, strict=True):
                if kind == "EfficientViTBlock" and width < self.attention_head_dim:
                    raise DCAEConfigError(
                        "attention_head_dim", f"{side} stage of {width} channels has no {self.attention_head_dim}"
                    )

    @property
    def spatial_compression_ratio(self) -> int:
        """Pixels per latent along each side: every encoder stage after the first halves the resolution."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELD_NAMES)

    def __len__(self) -> int:
        return len(_FIELD_NAMES)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(DCAEConfig))


def _choice(value: Any, field: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise DCAEConfigError(field, f"{value!r} is not implemented (one of {', '.join(choices)})")
    return value


def _activation_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
        raise DCAEConfigError(field, f"{value!r} is not implemented (one of {', '.join(ACTIVATIONS)})")
    return value.lower()


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise DCAEConfigError(field, f"must be true or false, got {value!r}")
    return value


def _positive(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DCAEConfigError(field, f"must be a positive integer, got {value!r}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise DCAEConfigError(field, f"must be a positive number, got {value!r}")
    return float(value)


def _ints(values: Any, field: str, minimum: int = 1) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise DCAEConfigError(field, f"must be a list of integers, got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise DCAEConfigError(field, f"must be integers of at least {minimum}, got {list(values)!r}")
    return tuple(values)


def _stages(value: Any, stages: int, field: str) -> tuple[Any, ...]:
    """One value per stage: a single string (or None) repeats, as diffusers repeats it; a list must fit."""
    if value is None or isinstance(value, str):
        return (value,) * stages
    if not isinstance(value, Sequence) or len(value) != stages:
        raise DCAEConfigError(field, f"needs one entry per stage ({stages}), got {value!r}")
    return tuple(value)


def _per_stage(value: Any, stages: int, field: str, choices: Sequence[str] | None = None) -> tuple[Any, ...]:
    values = _stages(value, stages, field)
    if choices is not None:
        for item in values:
            _choice(item, field, choices)
    return values


# ---- building blocks ----------------------------------------------------------------------------------------------


def _activation(name: str | None) -> nn.Module:
    return nn.Identity() if name is None else ACTIVATIONS[name]()


def _norm(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "rms_norm":
        return RMSNorm(channels, NORM_EPS, elementwise_affine=True, bias=True)
    return nn.BatchNorm2d(channels, eps=NORM_EPS)


def _channel_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An RMS norm runs over channels (moved last); a batch norm takes the (B, C, H, W) map as it is."""
    if isinstance(norm, RMSNorm):
        return norm(x.movedim(1, -1)).movedim(-1, 1)
    return norm(x)


def norm_residual(norm: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``norm(y) + x``, the plain path of every residual branch's end (a fused kernel: :func:`use_norm_residual`)."""
    return _channel_norm(norm, y) + x


class ResBlock(nn.Module):
    """3×3 conv, activation, 3×3 conv (no bias), norm, plus the input."""

    def __init__(self, channels: int, norm_type: str, act_fn: str | None) -> None:
        super().__init__()
        self.norm_residual: NormResidual = norm_residual
        self.nonlinearity = _activation(act_fn)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = _norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_residual(self.norm, self.conv2(self.nonlinearity(self.conv1(x))), x)


class MultiscaleProjection(nn.Module):
    """One extra scale of queries, keys and values: a depthwise k×k conv, then a grouped 1×1 conv per head."""

    def __init__(self, channels: int, groups: int, kernel_size: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention over a (B, C, H, W) map, with its norm and residual.

    The projections are concatenated as (q, k, v) channel blocks and each scale's channels are read as heads of
    ``3·head_dim`` channels, exactly as diffusers' processor reads them. Maps with no more pixels than ``head_dim``
    use the quadratic (softmax-free, normalised ReLU) form instead, as diffusers does. ``core`` computes the linear
    form: :func:`linear_attention`, or a fused kernel that :func:`use_linear_attention` installs.
    """

    def __init__(self, channels: int, head_dim: int, kernel_sizes: Sequence[int], norm_type: str) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.core: MultiscaleAttention = linear_attention
        self.norm_residual: NormResidual = norm_residual
        heads = channels // head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * inner, 3 * heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = _norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        tokens = x.movedim(1, -1)
        qkv = torch.cat([self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)], dim=3).movedim(-1, 1)
        qkv = torch.cat([qkv, *(scale(qkv) for scale in self.to_qkv_multiscale)], dim=1)
        if height * width > self.head_dim:
            out = self.core(qkv, self.head_dim)
        else:
            query, key, value = qkv.reshape(batch, -1, 3 * self.head_dim, height * width).chunk(3, dim=2)
            out = _quadratic_attention(F.relu(query), F.relu(key), value)
            out = out.reshape(batch, -1, height, width).movedim(1, -1)
        out = self.to_out(out).movedim(-1, 1)
        return self.norm_residual(self.norm_out, out, x)


def linear_attention(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The plain path of :class:`MultiscaleLinearAttention`'s linear form: in float32 like diffusers, as
    (v·kᵀ)·q over (Σ k)·q per head. diffusers pads v with a row of ones for the denominator (a copy of the values);
    the key sum is the same row, as its own small product."""
    batch, _, height, width = qkv.shape
    query, key, value = qkv.float().reshape(batch, -1, 3 * head_dim, height * width).chunk(3, dim=2)
    query, key = F.relu(query), F.relu(key)
    numerator = (value @ key.transpose(-1, -2)) @ query
    denominator = key.sum(dim=-1).unsqueeze(-2) @ query
    out = (numerator / (denominator + ATTENTION_EPS)).to(qkv.dtype)
    return out.reshape(batch, -1, height, width).movedim(1, -1)


def _quadratic_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Tiny maps: the N×N scores kᵀ·q normalised over keys in float32, applied to v in its dtype."""
    scores = (key.transpose(-1, -2) @ query).float()
    scores = scores / (scores.sum(dim=2, keepdim=True) + ATTENTION_EPS)
    return value @ scores.to(value.dtype)


class GLUMBConv(nn.Module):
    """The EfficientViT block's gated feed-forward: 1×1 widening, SiLU, gated 3×3 depthwise, 1×1, norm, residual.

    The gated depthwise convolution is the DiT's op (:func:`~.feedforward.depthwise_glu`) on the channels-last view
    of the map (a view, not a copy, when the map is channels-last), or a fused kernel that :func:`use_depthwise_glu`
    installs as ``gated_depthwise``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = GLU_EXPAND * channels
        self.gated_depthwise: DepthwiseGLU = depthwise_glu
        self.norm_residual: NormResidual = norm_residual
        self.nonlinearity = nn.SiLU()
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1, 1, 0)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, 1, 0, bias=False)
        self.norm = RMSNorm(channels, NORM_EPS, elementwise_affine=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.nonlinearity(self.conv_inverted(x)).permute(0, 2, 3, 1)
        hidden = self.gated_depthwise(hidden, self.conv_depth.weight, self.conv_depth.bias).permute(0, 3, 1, 2)
        return self.norm_residual(self.norm, self.conv_point(hidden), x)


class EfficientViTBlock(nn.Module):
    """Multi-scale linear attention, then the gated convolutional feed-forward."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: Sequence[int], norm_type: str) -> None:
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm_type)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


def _block(kind: str, channels: int, head_dim: int, kernel_sizes: Sequence[int], norm: str, act: str | None):
    if kind == "ResBlock":
        return ResBlock(channels, norm, act)
    return EfficientViTBlock(channels, head_dim, kernel_sizes, norm)


class DownBlock(nn.Module):
    """Halve the resolution: a stride-2 conv, or a conv then pixel-unshuffle; plus the unshuffled input averaged
    over channel groups (the shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, unshuffle: bool, shortcut: bool) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.group_size = in_channels * 4 // out_channels if shortcut else 0
        conv_out = out_channels // 4 if unshuffle else out_channels
        self.conv = nn.Conv2d(in_channels, conv_out, 3, 1 if unshuffle else 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.unshuffle:
            out = F.pixel_unshuffle(out, 2)
        if not self.group_size:
            return out
        return out + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group_size)).mean(dim=2)


class UpBlock(nn.Module):
    """Double the resolution: nearest upsampling then a conv, or a conv then pixel-shuffle; plus the input's
    channels repeated and shuffled (the shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool) -> None:
        super().__init__()
        self.interpolate = interpolate
        self.repeats = out_channels * 4 // in_channels if shortcut else 0
        self.conv = nn.Conv2d(in_channels, out_channels if interpolate else 4 * out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            out = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        else:
            out = F.pixel_shuffle(self.conv(x), 2)
        if not self.repeats:
            return out
        repeated = x.repeat_interleave(self.repeats, dim=1, output_size=x.shape[1] * self.repeats)
        return out + F.pixel_shuffle(repeated, 2)


# ---- encoder, decoder, autoencoder --------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Pixels (B, in, H, W) → latents (B, latent, H/f, W/f)."""

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        widths, layers = config.encoder_block_out_channels, config.encoder_layers_per_block
        unshuffle = config.downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            self.conv_in: nn.Module = nn.Conv2d(config.in_channels, widths[0], 3, 1, 1)
        else:  # no full-resolution stage: the input conv already halves the resolution
            self.conv_in = DownBlock(config.in_channels, widths[1], unshuffle, shortcut=False)
        stages = []
        for i, (width, count) in enumerate(zip(widths, layers, strict=True)):
            kind, scales = config.encoder_block_types[i], config.encoder_qkv_multiscales[i]
            stage = [_block(kind, width, config.attention_head_dim, scales, "rms_norm", "silu") for _ in range(count)]
            if i < len(widths) - 1 and count > 0:
                stage.append(DownBlock(width, widths[i + 1], unshuffle, shortcut=True))
            stages.append(nn.Sequential(*stage))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, 1, 1)
        self.out_group_size = widths[-1] // config.latent_channels if config.encoder_out_shortcut else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        out = self.conv_out(x)
        if not self.out_group_size:
            return out
        return out + x.unflatten(1, (-1, self.out_group_size)).mean(dim=2)


class Decoder(nn.Module):
    """Latents (B, latent, h, w) → pixels (B, in, h·f, w·f)."""

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        widths, layers = config.decoder_block_out_channels, config.decoder_layers_per_block
        interpolate = config.upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, 1, 1)
        self.in_repeats = widths[-1] // config.latent_channels if config.decoder_in_shortcut else 0
        stages = []
        for i, (width, count) in enumerate(zip(widths, layers, strict=True)):
            stage: list[nn.Module] = []
            if i < len(widths) - 1 and count > 0:
                stage.append(UpBlock(widths[i + 1], width, interpolate, shortcut=True))
            kind, scales = config.decoder_block_types[i], config.decoder_qkv_multiscales[i]
            norm, act = config.decoder_norm_types[i], config.decoder_act_fns[i]
            stage += [_block(kind, width, config.attention_head_dim, scales, norm, act) for _ in range(count)]
            stages.append(nn.Sequential(*stage))
        self.up_blocks = nn.ModuleList(stages)  # indexed by stage, run from the deepest
        channels = widths[0] if layers[0] > 0 else widths[1]
        self.norm_out = RMSNorm(channels, NORM_EPS, elementwise_affine=True, bias=True)
        self.conv_act = ACTIVATIONS[config.decoder_conv_act_fn]()
        if layers[0] > 0:
            self.conv_out: nn.Module = nn.Conv2d(channels, config.in_channels, 3, 1, 1)
        else:  # no full-resolution stage: the output conv doubles the resolution itself
            self.conv_out = UpBlock(channels, config.in_channels, interpolate, shortcut=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        if self.in_repeats:
            x = x + z.repeat_interleave(self.in_repeats, dim=1, output_size=z.shape[1] * self.in_repeats)
        for stage in reversed(self.up_blocks):
            x = stage(x)
        return self.conv_out(self.conv_act(_channel_norm(self.norm_out, x)))


class DCAE(nn.Module):
    """The autoencoder: :attr:`encoder` and :attr:`decoder`, under diffusers' ``AutoencoderDC`` key names.

    :meth:`encode` and :meth:`decode` run the whole image at once; tiled runs are
    :func:`compactedit_cli.speed.tiling.tiled_encode` / ``tiled_decode`` over the same encoder and decoder.
    """

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.spatial_compression_ratio

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, in, H, W), H and W multiples of the compression ratio → unscaled latents."""
        return self.encoder(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents → pixels in about [-1, 1]."""
        return self.decoder(latents)


# ---- kernels ------------------------------------------------------------------------------------------------------


def use_linear_attention(module: nn.Module, core: MultiscaleAttention = linear_attention) -> None:
    """Every :class:`MultiscaleLinearAttention` in ``module`` computes its linear form with ``core`` from now on."""
    for child in module.modules():
        if isinstance(child, MultiscaleLinearAttention):
            child.core = core


def use_depthwise_glu(module: nn.Module, core: DepthwiseGLU = depthwise_glu) -> None:
    """Every :class:`GLUMBConv` in ``module`` runs its gated depthwise convolution with ``core`` from now on."""
    for child in module.modules():
        if isinstance(child, GLUMBConv):
            child.gated_depthwise = core


def use_norm_residual(module: nn.Module, core: NormResidual = norm_residual) -> None:
    """Every residual block in ``module`` (:class:`ResBlock`, the attention, :class:`GLUMBConv`) ends with ``core``."""
    for child in module.modules():
        if isinstance(child, (ResBlock, MultiscaleLinearAttention, GLUMBConv)):
            child.norm_residual = core
