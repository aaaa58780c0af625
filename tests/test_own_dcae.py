"""Our DC-AE (compactedit_cli.models.dcae) against diffusers' AutoencoderDC loaded from the same safetensors.

diffusers stays a test dependency: ``random_weights.tiny`` builds the checkpoints with it, and its module is the
independent reference for every config branch (block types, down/upsampling kinds, norms, activations, shortcuts,
a stage without layers), whole and tiled, in float32 (tight) and bf16 (as close as diffusers is to itself).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC
from safetensors.torch import load_file

from compactedit_cli.errors import CheckpointError
from compactedit_cli.loading.checkpoint import build_vae, load_weights
from compactedit_cli.models.norm import RMSNorm
from compactedit_cli.random_weights.tiny import TinySpec, save_safetensors, vae_config
from compactedit_cli.random_weights.tiny import build_vae as build_reference
from compactedit_cli.speed.tiling import tiled_decode, tiled_encode

CPU = torch.device("cpu")


def _unshuffled(stages: int = 6) -> dict:
    """pixel_unshuffle / pixel_shuffle, no full-resolution stage (the in/out convs resample), two scales."""
    config = vae_config(TinySpec(vae_stages=stages))
    config.update(
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        encoder_block_out_channels=[8, 8] + [16] * (stages - 2),
        encoder_layers_per_block=[0] + [1] * (stages - 1),
        decoder_layers_per_block=[0, 2] + [1] * (stages - 2),
        encoder_qkv_multiscales=[[]] * 3 + [[3, 5]] * (stages - 3),
    )
    return config


def _batch_norms() -> dict:
    """Per-stage decoder norms and activations (batch norm, ReLU, none), no shortcuts, attention without scales."""
    config = vae_config(TinySpec(vae_stages=5))
    config.update(
        decoder_norm_types=["batch_norm", "rms_norm", "batch_norm", "batch_norm", "rms_norm"],
        decoder_act_fns=["relu", None, "gelu", "silu", "silu"],
        decoder_conv_act_fn="silu",
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
        decoder_qkv_multiscales=[[], [], [], [], [5]],
        encoder_block_types=["ResBlock", "EfficientViTBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        encoder_block_out_channels=[8, 8, 16, 16, 32],
        decoder_block_out_channels=[8, 16, 16, 16, 32],
        encoder_qkv_multiscales=[[], [5], [], [5], []],
    )
    return config


CONFIGS = {"tiny": vae_config(TinySpec()), "unshuffled": _unshuffled(), "batch_norms": _batch_norms()}


def _write(config: dict, folder: Path) -> AutoencoderDC:
    """A random diffusers DC-AE saved as a checkpoint's ``vae/`` folder; returns it (float32)."""
    reference = build_reference(config, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    for module in reference.modules():  # the builder leaves buffers as allocated: give the norms real statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.zero_()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_safetensors(reference, folder / "diffusion_pytorch_model.safetensors")
    return reference


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (folder, diffusers' module loaded from the folder's safetensors), built once per config."""
    built: dict[str, tuple[Path, AutoencoderDC]] = {}

    def get(name: str) -> tuple[Path, AutoencoderDC]:
        if name not in built:
            folder = tmp_path_factory.mktemp(name) / "vae"
            _write(CONFIGS[name], folder)
            reference = AutoencoderDC.from_config(CONFIGS[name])
            reference.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
            built[name] = folder, reference.eval()
        return built[name]

    return get


@pytest.fixture(params=list(CONFIGS))
def pair(request, pairs):
    return pairs(request.param)


def _ours(folder: Path, dtype: torch.dtype):
    vae, files = build_vae(folder)
    return load_weights(vae, files, CPU, dtype)


def _inputs(reference: AutoencoderDC, height: int, width: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    factor = reference.spatial_compression_ratio
    generator = torch.Generator().manual_seed(5)
    pixels = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
    shape = (batch, reference.config.latent_channels, height // factor, width // factor)
    latents = torch.randn(shape, generator=generator)
    return pixels, latents


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@torch.no_grad()
def test_float32_matches_diffusers(pair):
    folder, reference = pair
    ours = _ours(folder, torch.float32)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    pixels, latents = _inputs(reference, 96, 64)  # the deepest stage is small enough for the quadratic attention
    for got, expected in ((ours.encode(pixels), reference.encode(pixels).latent),
                          (ours.decode(latents), reference.decode(latents).sample)):  # fmt: skip
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@torch.no_grad()
def test_bfloat16_is_as_close_as_diffusers_is_to_itself(pair):
    folder, reference = pair
    ours = _ours(folder, torch.bfloat16)
    low = AutoencoderDC.from_config(reference.config).to(torch.bfloat16)
    low.load_state_dict(reference.state_dict())
    pixels, latents = _inputs(reference, 64, 64)
    for run_ours, run_low, run_ref, x in (
        (ours.encode, lambda x: low.encode(x).latent, lambda x: reference.encode(x).latent, pixels),
        (ours.decode, lambda x: low.decode(x).sample, lambda x: reference.decode(x).sample, latents),
    ):
        exact = run_ref(x)
        got, theirs = run_ours(x.bfloat16()), run_low(x.bfloat16())
        assert got.dtype == torch.bfloat16
        assert _relative(got, exact) <= 1.5 * _relative(theirs, exact) + 1e-3


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiling_cuts_blends_and_rounds_as_diffusers(dtype):
    """The same network under both tilings: the tiles, ramps, rounding and crops must agree exactly (8x VAE, tiles
    not a multiple of the factor, so encode pads them)."""
    config = vae_config(TinySpec(vae_stages=4))
    reference = build_reference(config, torch.Generator().manual_seed(3)).to(dtype)
    reference.enable_tiling(36, 36, 20, 20)
    generator = torch.Generator().manual_seed(6)
    pixels = (torch.rand(1, 3, 56, 48, generator=generator) * 2 - 1).to(dtype)
    latents = torch.randn(1, config["latent_channels"], 7, 6, generator=generator).to(dtype)
    encoded = tiled_encode(reference.encoder, pixels, 8, 36, 20)
    assert torch.equal(encoded, reference.encode(pixels).latent)
    assert torch.equal(tiled_decode(reference.decoder, latents, 8, 36, 20), reference.decode(latents).sample)


@torch.no_grad()
def test_tiled_float32_matches_diffusers_tiled(pairs):
    """Tiles of the tiny VAE (the tiling itself is checked exactly above; each config's network untiled)."""
    folder, reference = pairs("tiny")
    ours = _ours(folder, torch.float32)
    factor = reference.spatial_compression_ratio
    size, stride = 3 * factor, 2 * factor
    reference = copy.deepcopy(reference)  # the fixture's module stays untiled
    reference.enable_tiling(size, size, stride, stride)
    pixels, latents = _inputs(reference, 5 * factor, 3 * factor, batch=1)
    expected = reference.encode(pixels).latent
    got = tiled_encode(ours.encoder, pixels, factor, size, stride)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    expected = reference.decode(latents).sample
    got = tiled_decode(ours.decoder, latents, factor, size, stride)
    assert got.shape == expected.shape == (1, 3, 5 * factor, 3 * factor)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@torch.no_grad()
def test_channels_last_and_sliced_norms_change_nothing(pair, monkeypatch):
    """The layout the speed plan gives the VAE, and norms run in slices (as on a 2K feature map)."""
    folder, reference = pair
    ours = _ours(folder, torch.float32)
    pixels, latents = _inputs(reference, 64, 64)
    encoded, decoded = reference.encode(pixels).latent, reference.decode(latents).sample
    ours.to(memory_format=torch.channels_last)
    monkeypatch.setattr(RMSNorm, "slice_elements", 64)
    for got, expected in ((ours.encode(pixels), encoded), (ours.decode(latents), decoded)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("decoder_norm_types", "layer_norm", "'layer_norm' is not implemented"),
        ("encoder_block_types", "ConvNeXtBlock", "'ConvNeXtBlock' is not implemented"),
        ("decoder_act_fns", "tanh", "'tanh' is not implemented"),
        ("upsample_block_type", "bilinear", "'bilinear' is not implemented"),
        ("decoder_layers_per_block", [1, 1], "needs one entry per stage (6)"),
        ("latent_channels", 3, "do not average to the latent's"),
        ("scaling_factor", "0.4", "must be a positive number"),
    ],
)
def test_unimplemented_config_is_refused_naming_file_and_field(tmp_path, field, value, words):
    config = vae_config(TinySpec())
    folder = tmp_path / "vae"
    _write(config, folder)
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError) as caught:
        build_vae(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'config.json'}: cannot build the VAE: ")
    assert words in message and (field in message or "shortcut" in message)


def test_running_the_vae_imports_no_diffusers(tmp_path):
    """Build, load and run (whole and tiled) the VAE from a checkpoint folder in a fresh process."""
    folder = tmp_path / "vae"
    _write(vae_config(TinySpec()), folder)
    script = f"""
import json, sys, torch
from safetensors.torch import load_file
from compactedit_cli.models.dcae import DCAE, DCAEConfig
from compactedit_cli.speed.tiling import tiled_decode
folder = {str(folder)!r}
with torch.device("meta"):
    vae = DCAE(DCAEConfig.from_dict(json.load(open(folder + "/config.json"))))
vae.load_state_dict(load_file(folder + "/diffusion_pytorch_model.safetensors"), strict=True, assign=True)
with torch.no_grad():
    z = vae.encode(torch.zeros(1, 3, 128, 96))
    assert vae.decode(z).shape == (1, 3, 128, 96)
    assert tiled_decode(vae.decoder, z, 32, 64, 32).shape == (1, 3, 128, 96)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "peft"))))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
