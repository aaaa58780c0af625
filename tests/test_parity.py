"""The engine against the official reference pipeline's golden tensors (``../shared/parity``).

Every case is run through the public pipeline on the fixture checkpoint, loaded by the same code that loads the
real checkpoint. Embeddings, image latents, every step's prediction and latents, and the final latents must match
within 1e-5: a looser check on final latents alone lets real bugs through (see the parity README).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from compactedit_cli.engine.pipeline import EditPipeline
from compactedit_cli.engine.pixels import to_model_pixels, to_pil
from compactedit_cli.files.imaging import open_image

ATOL = 1e-5
DECODED_ATOL = 5e-5  # the decode of 1e-6-close latents; the PNGs are compared to ±1 grey level


def case_ids() -> list[str]:
    from conftest import PARITY

    if not (PARITY / "manifest.json").is_file():
        return ["fixtures-missing"]
    return [case["id"] for case in json.loads((PARITY / "manifest.json").read_text())["cases"]]


@pytest.fixture(scope="module")
def parity_pipe(parity_dir: Path) -> EditPipeline:
    build = json.loads((parity_dir / "manifest.json").read_text())["build"]
    return EditPipeline.from_pretrained(
        parity_dir / "checkpoint",
        device="cpu",
        dtype=torch.float32,
        vlm_min_pixels=build["processor_call_min_pixels"],
        vlm_max_pixels=build["processor_call_max_pixels"],
    )


class Case:
    def __init__(self, parity_dir: Path, case_id: str) -> None:
        folder = parity_dir / f"case_{case_id}"
        self.folder = folder
        self.m = json.loads((folder / "manifest.json").read_text())["case"]
        self.inputs = load_file(folder / "inputs.safetensors")
        self.expected = load_file(folder / "expected.safetensors")
        self.image_path = folder / self.m["image"]
        raw = self.m["instructions"]
        self.instructions = raw if isinstance(raw, list) else [raw]

    def run(self, pipe: EditPipeline, **overrides):
        steps = []
        kwargs = dict(
            num_inference_steps=self.m["num_inference_steps"],
            guidance_scale=self.m["guidance_scale"],
            image_guidance_scale=self.m["image_guidance_scale"],
            latents=self.inputs["initial_latents"],
            resolution_binning=self.m["use_resolution_binning"],
            height=self.m["height"],
            width=self.m["width"],
            output_type="latent",
            callback=steps.append,
        )
        kwargs.update(overrides)
        result = pipe(self.image_path, self.m["instructions"], **kwargs)
        return result, steps


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, what: str = "") -> None:
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    diff = (actual.detach().float().cpu() - expected.float()).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol:g}"


@pytest.mark.parametrize("case_id", case_ids())
def test_conditioning_matches_reference(parity_dir, parity_pipe, case_id):
    case = Case(parity_dir, case_id)
    source = open_image(case.image_path)
    conditioning = parity_pipe.encode_prompt([source.rgb] * len(case.instructions), case.instructions)
    meta = conditioning.meta_inputs
    mask = case.expected["vlm_attention_mask_with_meta"]
    assert torch.equal(meta.attention_mask.cpu(), mask)
    # Padded slots hold filler that differs across transformers versions: compare the valid ones.
    assert torch.equal(meta.position_ids.cpu()[:, mask], case.expected["vlm_position_ids"][:, mask])
    assert_close(conditioning.meta_states, case.expected["meta_hidden_states"], what="meta_hidden_states")
    assert_close(conditioning.cond, case.expected["prompt_embeds_cond"], what="prompt_embeds_cond")
    assert_close(conditioning.null, case.expected["prompt_embeds_null"], what="prompt_embeds_null")


@pytest.mark.parametrize("case_id", case_ids())
def test_vlm_inputs_match_reference(parity_dir, parity_pipe, case_id):
    case = Case(parity_dir, case_id)
    source = open_image(case.image_path)
    batch = parity_pipe.conditioner.prepare([source.rgb] * len(case.instructions), case.instructions)
    assert torch.equal(batch.input_ids, case.inputs["vlm_input_ids"])
    assert torch.equal(batch.attention_mask, case.inputs["vlm_attention_mask"])
    assert torch.equal(batch.image_grid_thw, case.inputs["vlm_image_grid_thw"])
    # The reference resized with torch's uint8 bicubic kernel; PIL's resize would be off by 7.8e-3 here.
    assert_close(batch.pixel_values, case.inputs["vlm_pixel_values"], atol=1e-6, what="vlm_pixel_values")


@pytest.mark.parametrize("case_id", case_ids())
def test_image_latents_match_reference(parity_dir, parity_pipe, case_id):
    case = Case(parity_dir, case_id)
    source = open_image(case.image_path)
    h, w = case.m["height"], case.m["width"]
    assert_close(to_model_pixels(source.rgb, h, w), case.expected["vae_input_pixels"], atol=0, what="vae_input_pixels")
    latents = parity_pipe.encode_image([source.rgb], h, w).expand(len(case.instructions), -1, -1, -1)
    assert_close(latents, case.expected["image_latents"], what="image_latents")


@pytest.mark.parametrize("case_id", case_ids())
def test_denoising_matches_reference(parity_dir, parity_pipe, case_id):
    case = Case(parity_dir, case_id)
    result, steps = case.run(parity_pipe)
    exp = case.expected
    assert result.parameters.guidance_branches == {"1-branch": 1, "2-branch": 2, "3-branch": 3}[case.m["cfg_mode"]]
    assert [int(s.timestep) for s in steps] == case.m["timesteps"]
    first = steps[0]
    assert_close(first.model_input, exp["transformer_hidden_states_step0"], what="transformer input step 0")
    assert_close(first.context, exp["transformer_encoder_hidden_states_step0"], what="context step 0")
    assert_close(first.model_timestep, exp["transformer_timestep_step0"], atol=0, what="timestep step 0")
    assert_close(first.noise_pred_raw, exp["noise_pred_raw_step0"], what="raw prediction step 0")
    assert_close(first.noise_pred, exp["noise_pred_guided_step0"], what="guided prediction step 0")
    guided = torch.stack([s.noise_pred for s in steps])
    assert_close(guided, exp["noise_pred_guided_all_steps"], what="guided predictions")
    latents = torch.stack([s.latents for s in steps])
    assert_close(latents, exp["latents_after_each_step"], what="latents after each step")
    assert_close(result.latents, exp["final_latents"], what="final latents")


@pytest.mark.parametrize("case_id", case_ids())
def test_decode_matches_reference(parity_dir, parity_pipe, case_id):
    case = Case(parity_dir, case_id)
    decoded = parity_pipe.decode(case.expected["final_latents"])
    assert_close(decoded, case.expected["decoded"], atol=DECODED_ATOL, what="decoded")
    for index, image in enumerate(to_pil(decoded)):
        golden = np.asarray(Image.open(case.folder / f"decoded_{index}.png").convert("RGB"), dtype=np.int16)
        assert np.abs(np.asarray(image, dtype=np.int16) - golden).max() <= 1


@pytest.mark.parametrize("case_id", case_ids())
def test_seed_reproduces_reference_noise(parity_dir, parity_pipe, case_id):
    """The fixtures drew their noise from a CPU generator; the same seed must give the same edit."""
    case = Case(parity_dir, case_id)
    seed = case.m["initial_latents_seed"]
    noise = parity_pipe.initial_noise(len(case.instructions), case.m["height"], case.m["width"], seed)
    assert torch.equal(noise, case.inputs["initial_latents"])
    result, _ = case.run(parity_pipe, latents=None, seed=seed)
    assert result.parameters.seed == seed
    assert_close(result.latents, case.expected["final_latents"], what="final latents from the seed")
