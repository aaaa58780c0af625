"""Facts of diffusers and of the real DC-AE that the loader and the tiling rule rely on, checked at their source."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderDC, SanaPipeline
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

from compactedit_cli.loading.checkpoint import legacy_qk_norm, vae_scale_factor
from compactedit_cli.random_weights.configs import load_config
from compactedit_cli.random_weights.tiny import TinySpec, vae_config
from compactedit_cli.speed.tiling import vae_activation_bytes

F32C32 = load_config("dc_ae_f32c32")["config"]
# The measured figure the tiling rule is calibrated on (BENCHMARKS.md, section 5: DC-AE activations, fp32).
F32C32_BYTES_PER_PIXEL_FP32 = 3200


@pytest.mark.parametrize("stages", [5, 6, 7])
def test_vae_scale_factor_is_diffusers_sanas(stages):
    with torch.device("meta"):
        vae = AutoencoderDC.from_config(vae_config(TinySpec(vae_stages=stages)))
    sana = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=None, scheduler=None)
    assert vae_scale_factor(vae.config) == sana.vae_scale_factor == 2 ** (stages - 1)


def test_the_published_vae_is_32x():
    assert vae_scale_factor(F32C32) == 32


@pytest.mark.parametrize("form", ["rms_norm", "rms_norm_across_heads"])
def test_legacy_qk_norm_names_the_form_diffusers_builds_at_that_width(form):
    heads, head_dim = 4, 8
    attn = Attention(query_dim=heads * head_dim, heads=heads, kv_heads=heads, dim_head=head_dim, qk_norm=form)
    assert attn.norm_q.weight.shape == attn.norm_k.weight.shape
    assert legacy_qk_norm(attn.norm_q.weight.shape[0], heads, head_dim) == form


def test_sana_attention_cannot_run_norms_one_head_wide():
    """Why the loader refuses per-head norms: Sana normalises the whole projection. If this changes, lift that."""
    kwargs = dict(
        dim=16, num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
        cross_attention_dim=16,
    )  # fmt: skip
    inputs = dict(encoder_hidden_states=torch.randn(1, 3, 16), timestep=torch.randn(1, 96), height=4, width=4)
    across = SanaTransformerBlock(**kwargs, qk_norm="rms_norm_across_heads")
    assert across(torch.randn(1, 16, 16), **inputs).shape == (1, 16, 16)
    per_head = SanaTransformerBlock(**kwargs, qk_norm="rms_norm")
    with pytest.raises(RuntimeError, match="size of tensor"):
        per_head(torch.randn(1, 16, 16), **inputs)


def test_tiling_estimate_reproduces_the_f32c32_measurement():
    assert vae_activation_bytes(F32C32, 1, 512, 512, torch.float32) == F32C32_BYTES_PER_PIXEL_FP32 * 512 * 512
    assert vae_activation_bytes(F32C32, 2, 512, 256, torch.bfloat16) == F32C32_BYTES_PER_PIXEL_FP32 * 512 * 256


def test_tiling_estimate_follows_the_vae_width():
    narrow = {
        key: [c // 2 for c in F32C32[key]] for key in ("encoder_block_out_channels", "decoder_block_out_channels")
    }
    assert 2 * vae_activation_bytes(narrow, 1, 256, 256, torch.float32) == vae_activation_bytes(
        F32C32, 1, 256, 256, torch.float32
    )
    # A VAE that widens fast peaks at its second stage (256 channels at half the side: 64 per output pixel).
    fast = {"encoder_block_out_channels": [16, 256, 512], "decoder_block_out_channels": [16, 16, 512]}
    assert vae_activation_bytes(fast, 1, 256, 256, torch.float32) * 2 == vae_activation_bytes(
        F32C32, 1, 256, 256, torch.float32
    )


def test_tiling_estimate_reads_a_loaded_vaes_config(tiny_pipe):
    """The tiny VAE's widest stage is 8 channels at full resolution, a sixteenth of the f32c32's 128."""
    assert tiny_pipe.vae.config.encoder_block_out_channels[0] == 8
    got = vae_activation_bytes(tiny_pipe.vae.config, 1, 64, 64, torch.float32)
    assert got * 16 == vae_activation_bytes(F32C32, 1, 64, 64, torch.float32)
