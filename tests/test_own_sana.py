"""Our Sana DiT and schedulers against diffusers' (the independent reference), on the same tiny weights and configs.

The reference transformer is diffusers' ``SanaTransformer2DModel`` plus the VIBE additions
(:mod:`compactedit_cli.random_weights.reference`), the class the tiny checkpoints are written by.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compactedit_cli.errors import CheckpointError
from compactedit_cli.loading.checkpoint import build_transformer, load_scheduler, load_weights
from compactedit_cli.random_weights import tiny

HEAD_HIDDEN = 32


def write_transformer(folder: Path, seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
    """A random reference transformer of the tiny config with ``overrides``, saved as a checkpoint component."""
    config = {**tiny.transformer_config(tiny.TinySpec()), **overrides}
    reference = tiny.build_transformer(config, HEAD_HIDDEN, torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # the random init leaves norm weights at one: move them so they count
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    state = {k: v.detach().contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder, reference.eval()


def load_ours(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model, files = build_transformer(folder)
    return load_weights(model, files, torch.device("cpu"), dtype)


def inputs(config: dict, seed: int = 1, size: tuple[int, int] = (6, 4)) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, config["in_channels"], *size, generator=generator)
    context = torch.randn(3, 5, config["caption_channels"], generator=generator)
    return x, context, torch.tensor([999.0, 421.0, 3.0])


def reference_forward(reference, x, context, t) -> torch.Tensor:
    return reference(hidden_states=x, encoder_hidden_states=context, timestep=t, return_dict=False)[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


VARIANTS = {
    "tiny": {},
    "rms-across-heads, biases, affine norms, patch 2, 4 cross heads": {
        "qk_norm": "rms_norm_across_heads",
        "attention_bias": True,
        "norm_elementwise_affine": True,
        "patch_size": 2,
        "num_cross_attention_heads": 4,
        "cross_attention_head_dim": 4,
        "mlp_ratio": 2.0,
        "norm_eps": 1e-5,
    },
    "layer-norm across heads, 4 heads": {
        "qk_norm": "layer_norm_across_heads",
        "num_attention_heads": 4,
        "attention_head_dim": 4,
        "num_cross_attention_heads": 1,
        "cross_attention_head_dim": 16,
    },
    "l2, other caption width, 3 layers": {"qk_norm": "l2", "caption_channels": 24, "num_layers": 3},
    "per-head rms norm, one head": {
        "qk_norm": "rms_norm",
        "num_attention_heads": 1,
        "attention_head_dim": 16,
        "num_cross_attention_heads": 1,
        "cross_attention_head_dim": 16,
    },
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_float32_forward_matches_diffusers_sana(tmp_path, overrides):
    folder, reference = write_transformer(tmp_path / "transformer", **overrides)
    ours = load_ours(folder)
    x, context, t = inputs(reference.config)
    with torch.no_grad():
        expected = reference_forward(reference, x, context, t)
        whole = ours(x, context, t)
        keys, values = ours.context_keys_values(ours.project_context(context))
        ready = ours.forward_projected(x, (keys, values), t)
    config = reference.config
    assert keys.shape[:4] == values.shape[:4] == (config.num_layers, 3, config.num_cross_attention_heads, 5)
    assert whole.shape == expected.shape == (3, reference.config.out_channels, 6, 4)
    assert relative(whole, expected) < 1e-5
    assert relative(ready, expected) < 1e-5


def test_bfloat16_agrees_as_closely_as_diffusers_with_itself(tmp_path):
    folder, reference = write_transformer(tmp_path / "transformer")
    x, context, t = inputs(reference.config, size=(8, 8))
    with torch.no_grad():
        exact = reference_forward(reference, x, context, t)
        library = reference_forward(reference.to(torch.bfloat16), x.bfloat16(), context.bfloat16(), t)
        ours = load_ours(folder, torch.bfloat16)(x.bfloat16(), context.bfloat16(), t)
    assert ours.dtype == torch.bfloat16
    assert relative(ours, exact) <= 1.5 * relative(library, exact) + 1e-3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"interpolation_scale": 1.0}, "interpolation_scale"),
        ({"qk_norm": "fp32_layer_norm"}, "qk_norm"),
        ({"cross_attention_dim": 8, "cross_attention_head_dim": 4}, "cross_attention_dim"),
    ],
)
def test_unimplemented_config_values_are_refused_naming_file_and_field(tmp_path, overrides, field):
    folder, _ = write_transformer(tmp_path / "transformer", **overrides)
    with pytest.raises(CheckpointError, match=field) as error:
        build_transformer(folder)
    assert str(folder / "config.json") in str(error.value) and "\n" not in str(error.value)


def test_an_adapter_fused_into_ours_matches_diffusers_running_it(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from compactedit_cli.loading.lora import PREFIX, adapter_metadata, fuse, read_adapter

    folder, reference = write_transformer(tmp_path / "transformer")
    ours = load_ours(folder)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"]
    reference.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, exclude_modules=r"edit_head\..*"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    tensors = {PREFIX + k: v.contiguous() for k, v in get_peft_model_state_dict(reference).items()}
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, str(path), metadata=adapter_metadata(4, 8, targets, {}))
    x, context, t = inputs(reference.config)
    with torch.no_grad():
        before = ours(x, context, t)
        fuse(ours, [(read_adapter(path), 1.0)])
        expected = reference_forward(reference, x, context, t)
        after = ours(x, context, t)
    assert relative(after, before) > 1e-2  # the adapter does something
    assert relative(after, expected) < 1e-5


def test_a_lora_training_step_with_checkpointing_matches_diffusers(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    folder, reference = write_transformer(tmp_path / "transformer")
    ours = load_ours(folder)
    config = dict(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "to_out.0", "conv_inverted", "conv_point"])
    reference.add_adapter(LoraConfig(**config, exclude_modules=r"edit_head\..*"))
    inject_adapter_in_model(LoraConfig(**config, exclude_modules=r"edit_head\..*"), ours)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    set_peft_model_state_dict(ours, get_peft_model_state_dict(reference))
    x, context, t = inputs(reference.config)
    target = torch.randn(3, reference.config.out_channels, 6, 4, generator=generator)
    reference.enable_gradient_checkpointing()
    ours.enable_gradient_checkpointing()
    grads = []
    for model, run in ((reference, reference_forward), (ours, lambda m, *a: m(*a))):
        model.train()
        loss = torch.nn.functional.mse_loss(run(model, x, context, t), target)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and any("conv_point" in n for n in grads[1])
    assert not any(p.grad is not None for n, p in ours.named_parameters() if "lora_" not in n)
    for name, grad in grads[0].items():
        assert relative(grads[1][name], grad) < 1e-4, name


DPM = json.loads((Path(tiny.__file__).parent / "configs" / "sana_scheduler.json").read_text())["config"]


@pytest.mark.parametrize(
    ("class_name", "config"),
    [
        ("DPMSolverMultistepScheduler", DPM),
        ("DPMSolverMultistepScheduler", {**DPM, "solver_type": "heun", "flow_shift": 1.5}),
        ("DPMSolverMultistepScheduler", {**DPM, "solver_order": 1}),
        ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
        ("FlowMatchEulerDiscreteScheduler", {"shift": 1.0, "num_train_timesteps": 500}),
    ],
    ids=["sana-dpm", "dpm-heun", "dpm-order-1", "euler-shift-3", "euler-no-shift"],
)
def test_schedules_and_steps_match_diffusers(tmp_path, class_name, config):
    import diffusers

    (tmp_path / "scheduler_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = load_scheduler(tmp_path, class_name)
    assert type(ours).__name__ == class_name
    reference = getattr(diffusers, class_name).from_config(config)
    for steps in (1, 2, 5, 20):
        reference.set_timesteps(steps)
        reference.set_begin_index(0)
        ours.set_timesteps(steps)
        assert torch.equal(ours.timesteps, reference.timesteps) and ours.timesteps.dtype == reference.timesteps.dtype
        assert torch.equal(ours.sigmas, reference.sigmas)
        generator = torch.Generator().manual_seed(steps)
        expected = torch.randn(2, 4, 5, 3, generator=generator)
        sample = expected.clone()
        for t in reference.timesteps:
            velocity = torch.randn(expected.shape, generator=generator)
            expected = reference.step(velocity, t, expected, return_dict=False)[0]
            sample = ours.step(velocity, sample)
        assert torch.equal(sample, expected)


@pytest.mark.parametrize(
    ("class_name", "config", "field"),
    [
        ("DPMSolverMultistepScheduler", {**DPM, "prediction_type": "epsilon", "use_flow_sigmas": False}, "prediction"),
        ("DPMSolverMultistepScheduler", {**DPM, "use_karras_sigmas": True}, "use_karras_sigmas"),
        ("DPMSolverMultistepScheduler", {**DPM, "solver_order": 3}, "solver_order"),
        ("DPMSolverMultistepScheduler", {**DPM, "final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, "stochastic_sampling"),
        ("EulerDiscreteScheduler", {}, "EulerDiscreteScheduler"),
    ],
)
def test_unimplemented_scheduler_settings_are_refused(tmp_path, class_name, config, field):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=field) as error:
        load_scheduler(tmp_path, class_name)
    assert str(tmp_path / "scheduler_config.json") in str(error.value)


def test_the_dit_and_scheduler_load_and_run_without_diffusers(tiny_checkpoint):
    script = f"""
import json, sys, torch
from pathlib import Path
from compactedit_cli.loading.checkpoint import build_transformer, load_scheduler, load_weights
root = Path({str(tiny_checkpoint)!r})
model, files = build_transformer(root / "transformer")
model = load_weights(model, files, torch.device("cpu"), torch.float32)
scheduler = load_scheduler(root / "scheduler", "DPMSolverMultistepScheduler")
scheduler.set_timesteps(2)
x = torch.randn(1, model.config.latent_channels_out, 4, 4)
context = model.project_context(torch.randn(1, 3, model.config.caption_channels))
for t in scheduler.timesteps:
    out = model.forward_projected(torch.cat([x, x], dim=1), context, t.expand(1).float())
    x = scheduler.step(out, x)
assert torch.isfinite(x).all()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "diffusers")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
