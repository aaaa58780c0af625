"""Loading checkpoint folders: the tiny builder's round trip, the format variants, and clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compactedit_cli.engine.pipeline import EditPipeline
from compactedit_cli.errors import CheckpointError
from compactedit_cli.loading.checkpoint import load_components, read_header, resolve_qk_norm, verify_folder
from compactedit_cli.random_weights.tiny import TinySpec, build_tiny_checkpoint

CPU = torch.device("cpu")


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_builder_is_deterministic_and_round_trips(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", TinySpec(seed=3))
    b = build_tiny_checkpoint(tmp_path / "b", TinySpec(seed=3))
    c = build_tiny_checkpoint(tmp_path / "c", TinySpec(seed=4))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    expected_layout = {"model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
    assert {p.name for p in a.iterdir()} == expected_layout
    components = load_components(a, CPU, torch.float32)
    saved = load_file(a / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = components.transformer.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert components.transformer.head_spec.hidden_dim == TinySpec().edit_head_hidden


def test_published_layout_facts_are_read_from_configs(tmp_path):
    spec = TinySpec(num_meta_queries=5, edit_head_depth=2, edit_head_hidden=48, caption_channels=24)
    root = build_tiny_checkpoint(tmp_path / "ck", spec)
    components = load_components(root, CPU, torch.float32)
    transformer = components.transformer
    assert transformer.meta_queries.shape == (5, spec.vlm_hidden)
    assert len(transformer.edit_head.attn_blocks) == 2
    assert transformer.edit_head.input_proj.out_features == 48  # from the weights' shape
    assert transformer.edit_head.attn_blocks[0].attn.num_heads == 16  # constant of the architecture
    assert transformer.config.caption_channels == 24


@pytest.mark.parametrize(
    ("qk_norm", "resolved"),
    [(None, None), (False, None), (True, "rms_norm_across_heads"), ("rms_norm_across_heads", "rms_norm_across_heads")],
)
def test_qk_norm_forms(tmp_path, qk_norm, resolved):
    root = build_tiny_checkpoint(tmp_path / "ck", TinySpec(qk_norm=qk_norm))
    assert json.loads((root / "transformer" / "config.json").read_text())["qk_norm"] == qk_norm
    components = load_components(root, CPU, torch.float32)
    assert components.transformer.config.qk_norm == resolved
    has_norm = any(k.endswith("attn1.norm_q.weight") for k in components.transformer.state_dict())
    assert has_norm == (resolved is not None)


def _norm_q_widths(root: Path) -> set[int]:
    shapes = read_header(root / "transformer" / "diffusion_pytorch_model.safetensors")
    return {shape[0] for name, shape in shapes.items() if name.endswith("attn1.norm_q.weight")}


def test_legacy_qk_norm_across_heads_loads_and_edits(tmp_path):
    from PIL import Image

    spec = TinySpec(qk_norm=True, qk_norm_width="all")
    root = build_tiny_checkpoint(tmp_path / "ck", spec)
    assert _norm_q_widths(root) == {spec.dit_heads * spec.dit_head_dim}
    pipe = EditPipeline.from_pretrained(root, device="cpu")
    assert pipe.transformer.config.qk_norm == "rms_norm_across_heads"
    result = pipe(Image.new("RGB", (64, 64), (200, 40, 40)), "make it blue", num_inference_steps=2)
    assert result.images[0].size == (64, 64)


def test_legacy_qk_norm_per_head_is_refused_at_load(tmp_path):
    """diffusers names a one-head-wide norm ``rms_norm``, which Sana's attention cannot run with several heads."""
    spec = TinySpec(qk_norm=True, qk_norm_width="head")
    root = build_tiny_checkpoint(tmp_path / "ck", spec)
    assert _norm_q_widths(root) == {spec.dit_head_dim}
    with pytest.raises(CheckpointError) as info:
        EditPipeline.from_pretrained(root, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "qk_norm true (read as 'rms_norm')" in message and "cannot run" in message


def test_qk_norm_is_read_from_any_block(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "ck", TinySpec(qk_norm=True))
    shapes = read_header(root / "transformer" / "diffusion_pytorch_model.safetensors")
    later = {k: v for k, v in shapes.items() if not k.startswith("transformer_blocks.0.")}
    spec = TinySpec()
    assert resolve_qk_norm(True, later, spec.dit_heads, spec.dit_head_dim, root) == "rms_norm_across_heads"
    without_norms = {k: v for k, v in shapes.items() if ".norm_" not in k}
    with pytest.raises(CheckpointError, match="no block has attn1"):
        resolve_qk_norm(True, without_norms, spec.dit_heads, spec.dit_head_dim, root)


def test_qk_norm_widths_must_agree_across_blocks(tmp_path):
    spec = TinySpec(qk_norm=True)
    root = build_tiny_checkpoint(tmp_path / "ck", spec)

    def change(state):
        state["transformer_blocks.1.attn1.norm_q.weight"] = torch.ones(spec.dit_head_dim)

    _edit_transformer_weights(root, change)
    message = _load_error(root)
    assert "disagree" in message and f"[{spec.dit_head_dim}, {spec.dit_heads * spec.dit_head_dim}]" in message


# ---- geometry the checkpoint implies ----------------------------------------------------------------------------


def test_a_16x_vae_fits_the_bins_and_edits(tmp_path):
    from PIL import Image

    root = build_tiny_checkpoint(tmp_path / "ck", TinySpec(vae_stages=5))
    pipe = EditPipeline.from_pretrained(root, device="cpu")
    assert pipe.vae_scale_factor == 16
    image = Image.new("RGB", (96, 64), (30, 160, 60))
    binned = pipe(image, "make it red", num_inference_steps=2)
    assert binned.parameters.model_size == [608, 416]  # [width, height]: the 512-class bin of 2:3
    assert binned.images[0].size == (96, 64)
    unbinned = pipe(image, "make it red", num_inference_steps=2, resolution_binning=False, height=48, width=80)
    assert unbinned.parameters.model_size == [80, 48]  # 16x: multiples of 16 are enough


@pytest.mark.parametrize(
    ("spec", "factor", "patch"), [(TinySpec(vae_stages=7), 64, 1), (TinySpec(dit_patch_size=2), 32, 2)]
)
def test_vae_factor_the_bins_do_not_fit_is_refused(tmp_path, spec, factor, patch):
    root = build_tiny_checkpoint(tmp_path / "ck", spec)
    message = _load_error(root)
    assert message.startswith(f"{root / 'vae' / 'config.json'}: a {factor}x VAE")
    assert f"patch_size {patch} needs sizes in multiples of {factor * patch}" in message
    assert "binning tables are in multiples of 32" in message


def test_processor_layouts_give_identical_inputs(tmp_path):
    from PIL import Image

    legacy = build_tiny_checkpoint(tmp_path / "legacy", TinySpec(legacy_processor=True))
    current = build_tiny_checkpoint(tmp_path / "current", TinySpec(legacy_processor=False))
    assert (legacy / "tokenizer" / "preprocessor_config.json").is_file()
    assert (current / "tokenizer" / "processor_config.json").is_file()
    image = Image.new("RGB", (90, 60), (20, 120, 220))
    batches = []
    for root in (legacy, current):
        pipe = EditPipeline.from_pretrained(root, device="cpu", vlm_min_pixels=1024, vlm_max_pixels=4096)
        batches.append(pipe.conditioner.prepare([image], ["add a red hat"]))
    assert torch.equal(batches[0].input_ids, batches[1].input_ids)
    assert torch.equal(batches[0].pixel_values, batches[1].pixel_values)


def test_distilled_flag_defaults_guidance_off(tmp_path):
    from PIL import Image

    root = build_tiny_checkpoint(tmp_path / "ck", TinySpec(cfg_distilled=True))
    pipe = EditPipeline.from_pretrained(root, device="cpu")
    result = pipe(Image.new("RGB", (64, 64)), "make it red", num_inference_steps=2, resolution_binning=False)
    assert (result.parameters.guidance_scale, result.parameters.image_guidance_scale) == (0.0, 0.0)
    assert result.parameters.guidance_branches == 1
    explicit = pipe(
        Image.new("RGB", (64, 64)),
        "make it red",
        num_inference_steps=2,
        resolution_binning=False,
        guidance_scale=4.5,
        image_guidance_scale=1.2,
    )
    assert explicit.parameters.guidance_branches == 3


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))


def _load_error(root: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_components(root, CPU, torch.float32)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    assert "not found" in _load_error(tmp_path / "nothing")


def test_missing_weight_file(checkpoint_copy):
    (checkpoint_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert "vae/diffusion_pytorch_model.safetensors" in _load_error(checkpoint_copy)


def test_missing_config_file(checkpoint_copy):
    (checkpoint_copy / "transformer" / "config.json").unlink()
    assert "transformer/config.json" in _load_error(checkpoint_copy)


def _edit_transformer_weights(root: Path, change) -> None:
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, str(path))


def test_wrong_shape_names_the_tensor(checkpoint_copy):
    def change(state):
        state["proj_out.weight"] = torch.zeros(5, state["proj_out.weight"].shape[1])

    _edit_transformer_weights(checkpoint_copy, change)
    message = _load_error(checkpoint_copy)
    assert "wrong shape" in message and "proj_out.weight" in message


def test_missing_and_unexpected_tensors_are_named(checkpoint_copy):
    def change(state):
        del state["caption_norm.weight"]
        state["extra.bias"] = torch.zeros(3)

    _edit_transformer_weights(checkpoint_copy, change)
    message = _load_error(checkpoint_copy)
    assert "missing tensor(s) caption_norm.weight" in message and "unexpected tensor(s) extra.bias" in message


def test_missing_text_encoder_tensor(checkpoint_copy):
    path = checkpoint_copy / "text_encoder" / "model.safetensors"
    state = load_file(path)
    del state["model.language_model.norm.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    assert "model.language_model.norm.weight" in _load_error(checkpoint_copy)


def test_unknown_component_class(checkpoint_copy):
    index = json.loads((checkpoint_copy / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (checkpoint_copy / "model_index.json").write_text(json.dumps(index))
    message = _load_error(checkpoint_copy)
    assert "AutoencoderKL" in message and "AutoencoderDC" in message


def test_text_to_image_sana_is_not_an_editing_model(checkpoint_copy):
    index = {
        "_class_name": "SanaPipeline",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "GemmaTokenizerFast"],
        "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"],
    }
    (checkpoint_copy / "model_index.json").write_text(json.dumps(index))
    assert "not a VIBE editing checkpoint" in _load_error(checkpoint_copy)


def test_transformer_without_edit_head_is_not_an_editing_model(checkpoint_copy):
    _edit_transformer_weights(
        checkpoint_copy, lambda s: [s.pop(k) for k in list(s) if k.startswith(("edit_head.", "meta_queries"))]
    )
    assert "not a VIBE editing transformer" in _load_error(checkpoint_copy)


def test_pickle_weights_are_refused(checkpoint_copy):
    path = checkpoint_copy / "vae" / "diffusion_pytorch_model.safetensors"
    path.rename(path.with_suffix(".bin"))
    assert "safetensors only" in _load_error(checkpoint_copy)


def test_truncated_safetensors_is_detected_before_loading(checkpoint_copy):
    path = checkpoint_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_folder(checkpoint_copy)


def test_verify_accepts_a_complete_folder(tiny_checkpoint):
    files = verify_folder(tiny_checkpoint)
    assert tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors" in files
    assert "meta_queries" in read_header(tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")


def test_channel_mismatch_between_vae_and_transformer(checkpoint_copy, tmp_path):
    """A VAE with 8 latent channels beside a transformer built for 4: each loads, together they cannot run."""
    other = build_tiny_checkpoint(tmp_path / "wide", TinySpec(latent_channels=8))
    shutil.rmtree(checkpoint_copy / "vae")
    shutil.copytree(other / "vae", checkpoint_copy / "vae")
    message = _load_error(checkpoint_copy)
    assert "8 VAE latent channels" in message
