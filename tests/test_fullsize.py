"""The real-size random build: parameter counts against the VIBE reference's figures (meta device, no memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from compactedit_cli.models.connector import EDIT_HEAD_NUM_HEADS
from compactedit_cli.random_weights.full import (
    build_processor,
    count_parameters,
    meta_models,
    random_pipeline,
    real_configs,
    remap_special_tokens,
    scaled_configs,
)


@pytest.fixture(scope="module")
def real_models():
    return meta_models(real_configs())


# Figures stated in vibe-reference.md (§0.1, §1.4, §1.6, §2.1, §2.2, §4.3), not derived from this code.
def test_text_encoder_has_the_reference_parameter_count(real_models):
    vlm = real_models["text_encoder"]
    assert count_parameters(vlm) == 2_127_532_032  # the tied LM head adds nothing
    assert not any(name.startswith("lm_head") for name in vlm.state_dict())
    assert count_parameters(vlm.model.visual) == 406_957_056


def test_transformer_has_the_reference_parameter_count(real_models):
    transformer = real_models["transformer"]
    assert count_parameters(transformer) == 1_882_489_248
    assert count_parameters(transformer.edit_head) == 277_496_064
    assert transformer.meta_queries.numel() == 458_752
    dit = count_parameters(transformer) - count_parameters(transformer.edit_head) - transformer.meta_queries.numel()
    assert dit == 1_604_534_432
    assert len(transformer.state_dict()) == 459
    assert transformer.patch_embed.proj.weight.shape == (2240, 64, 1, 1)
    assert transformer.proj_out.weight.shape == (32, 2240)


def test_vae_has_the_reference_parameter_count(real_models):
    assert count_parameters(real_models["vae"]) == 312_250_275


def test_meta_build_allocates_nothing(real_models):
    assert all(p.is_meta for model in real_models.values() for p in model.parameters())


def test_edit_head_constants_match_the_model_code():
    from compactedit_cli.random_weights.configs import load_config

    document = load_config("vibe_transformer")
    assert document["edit_head_num_heads"] == EDIT_HEAD_NUM_HEADS
    assert document["edit_head_hidden_dim"] == 2048


def test_special_tokens_are_remapped_but_the_vocabulary_stays_real():
    configs = real_configs()
    processor = build_processor(configs)
    remapped = remap_special_tokens(configs.text_encoder, processor.tokenizer)
    assert remapped["text_config"]["vocab_size"] == 151936
    assert remapped["image_token_id"] == processor.image_token_id
    assert remapped["vision_start_token_id"] == processor.vision_start_token_id
    assert remapped["text_config"]["eos_token_id"] == processor.tokenizer.token_id("<|im_end|>")
    assert configs.text_encoder["image_token_id"] == 151655  # the source config is untouched


def test_processor_uses_the_real_patch_geometry():
    processor = build_processor(real_configs())
    image = Image.new("RGB", (1024, 1024))
    out = processor(["<|vision_start|><|image_pad|><|vision_end|>hi"], [image], 352 * 352, 672 * 672)
    # 1024² -> 672² (reference §3.2): 42x42 patches of 16 px, 441 tokens after the 2x2 merge.
    assert out["image_grid_thw"].tolist() == [[1, 42, 42]]
    assert (out["input_ids"] == processor.image_token_id).sum() == 441
    assert out["pixel_values"].shape == (42 * 42, 3 * 2 * 16 * 16)


def test_scaled_configs_keep_token_geometry_and_shrink_width():
    real, small = real_configs(), scaled_configs(width_divisor=8, layers=4)
    assert small.transformer["in_channels"] == 64 and small.transformer["num_meta_queries"] == 224
    assert small.text_encoder["text_config"]["vocab_size"] == 151936
    assert small.text_encoder["text_config"]["hidden_size"] == 256
    assert small.transformer["num_layers"] == 4
    assert small.image_processor == real.image_processor
    counts = {k: count_parameters(v) for k, v in meta_models(small).items()}
    assert counts["transformer"] < count_parameters(meta_models(real)["transformer"]) // 50


def test_scaled_random_pipeline_edits_on_cpu():
    pipe = random_pipeline(scaled_configs(width_divisor=16, layers=1), device="cpu", dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    result = pipe(image, "make the sky blue", num_inference_steps=2)
    assert result.images[0].size == (96, 64)
    assert np.asarray(result.images[0]).std() > 0
