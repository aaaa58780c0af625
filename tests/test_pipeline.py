"""The Python API on a tiny checkpoint: sizes, seeds, batches, guidance and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from compactedit_cli.engine.guidance import Guidance
from compactedit_cli.engine.pipeline import EditPipeline, EditRequest
from compactedit_cli.errors import UsageError


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_output_has_the_input_size(tiny_pipe):
    for size in ((97, 61), (61, 97), (300, 37)):
        result = tiny_pipe(_photo(*size), "make the sky blue", num_inference_steps=2)
        assert [im.size for im in result.images] == [size]
        p = result.parameters
        assert tuple(p.size) == size
        assert tuple(p.model_size) != size  # the model ran at a bin, not the odd input size


def test_seed_reproducibility(tiny_pipe):
    image = _photo(64, 48)
    small = {"num_inference_steps": 2, "resolution_binning": False}
    a = tiny_pipe(image, "add a red hat", seed=7, **small)
    b = tiny_pipe(image, "add a red hat", seed=7, **small)
    c = tiny_pipe(image, "add a red hat", seed=8, **small)
    assert _same(a.images[0], b.images[0])
    assert not _same(a.images[0], c.images[0])


def test_random_seed_is_reported_and_replays(tiny_pipe):
    image = _photo(64, 48)
    small = {"num_inference_steps": 2, "resolution_binning": False}
    first = tiny_pipe(image, "add a red hat", seed=None, **small)
    assert isinstance(first.parameters.seed, int)
    again = tiny_pipe(image, "add a red hat", seed=first.parameters.seed, **small)
    assert _same(first.images[0], again.images[0])


def test_injected_latents_replace_the_noise(tiny_pipe):
    image = _photo(64, 64)
    noise = tiny_pipe.initial_noise(1, 64, 64, 5)
    small = {"num_inference_steps": 2, "resolution_binning": False, "output_type": "latent"}
    a = tiny_pipe(image, "x y", latents=noise, **small)
    b = tiny_pipe(image, "x y", seed=5, **small)
    assert a.parameters.seed is None and b.parameters.seed == 5
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(UsageError, match="shape"):
        tiny_pipe(image, "x y", num_inference_steps=2, resolution_binning=False, latents=noise[:, :2])


def test_list_of_instructions_and_several_images(tiny_pipe):
    image = _photo(80, 80)
    result = tiny_pipe(image, ["add a hat", "remove the car"], num_images_per_prompt=2, num_inference_steps=2)
    assert len(result.images) == 4
    assert [(r.instruction, r.index) for r in result.records] == [
        ("add a hat", 0),
        ("add a hat", 1),
        ("remove the car", 0),
        ("remove the car", 1),
    ]
    assert not _same(result.images[0], result.images[1])  # different noise per output


def test_batch_of_requests_matches_single_edits(tiny_pipe):
    a, b = _photo(90, 60, 1), _photo(96, 64, 2)
    assert tiny_pipe.model_size(a.size) == tiny_pipe.model_size(b.size)
    batched = tiny_pipe.edit_batch(
        [EditRequest(a, "add a hat", seed=1), EditRequest(b, "remove the car", seed=2)],
        num_inference_steps=2,
        output_type="latent",
    )
    alone = tiny_pipe(a, "add a hat", seed=1, num_inference_steps=2, output_type="latent")
    assert torch.allclose(batched[0].latents, alone.latents, atol=1e-5)
    alone_b = tiny_pipe(b, "remove the car", seed=2, num_inference_steps=2, output_type="latent")
    assert torch.allclose(batched[1].latents, alone_b.latents, atol=1e-5)
    assert [r.parameters.seed for r in batched] == [1, 2]


def test_batch_refuses_mixed_bins(tiny_pipe):
    with pytest.raises(UsageError, match="share a model size"):
        tiny_pipe.edit_batch([EditRequest(_photo(64, 64), "a"), EditRequest(_photo(200, 50), "b")])


def test_no_binning_rounds_to_the_vae_factor(tiny_pipe):
    result = tiny_pipe(_photo(100, 70), "x", num_inference_steps=1, resolution_binning=False)
    assert result.parameters.model_size == [96, 64]
    assert result.images[0].size == (100, 70)
    with pytest.raises(UsageError, match="multiples of 32"):
        tiny_pipe(_photo(100, 70), "x", resolution_binning=False, height=70, width=100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1001}, "num_inference_steps must be between 1 and 1000"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"image_guidance_scale": float("nan")}, "image_guidance_scale"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"num_images_per_prompt": 65}, "num_images_per_prompt must be between 1 and 64"),
        ({"guidance_scale": "lots"}, "guidance_scale must be a number"),
        ({"output_type": "np"}, "output_type"),
        ({"height": 64}, "both height and width"),
    ],
)
def test_bad_arguments_are_usage_errors(tiny_pipe, kwargs, message):
    with pytest.raises(UsageError, match=message):
        tiny_pipe(_photo(32, 32), "x", **kwargs)


def test_the_model_name_is_given_when_loading_and_recorded(tiny_checkpoint, tiny_pipe):
    assert tiny_pipe.model_name == str(tiny_checkpoint)  # the default: the path
    named = EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", name="vibe@abc123")
    assert named(_photo(32, 32), "x", num_inference_steps=1).parameters.model == "vibe@abc123"
    with pytest.raises(AttributeError):
        named.model_name = "other"


@pytest.mark.parametrize("instruction", ["", "   ", [], ["ok", " "]])
def test_empty_instruction_is_refused(tiny_pipe, instruction):
    with pytest.raises(UsageError):
        tiny_pipe(_photo(32, 32), instruction)


def test_guidance_rule():
    assert Guidance(4.5, 1.2).branches == 3
    assert Guidance(4.5, 1.0).branches == 3
    assert Guidance(4.5, 0.5).branches == 2
    assert Guidance(1.0, 1.2).branches == 1
    assert Guidance(0.0, 0.0).branches == 1
    pred = torch.stack([torch.full((1, 2), v) for v in (3.0, 2.0, 1.0)]).squeeze(1)
    # eps_t = 3, eps_i = 2, eps_u = 1
    assert torch.allclose(Guidance(4.5, 1.2).combine(pred), torch.full((1, 2), 1.0 + 4.5 * 1.0 + 1.2 * 1.0))
    assert torch.allclose(Guidance(4.5, 0.5).combine(pred[:2]), torch.full((1, 2), 2.0 + 4.5 * 1.0))
    cond, null = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    assert Guidance(4.5, 0.5).context(cond, null).shape == (2, 2, 3)
    latents = torch.ones(1, 4, 2, 2)
    three = Guidance(4.5, 1.2).image_latents(latents)
    assert three.shape == (3, 4, 2, 2) and three[2].abs().sum() == 0 and three[1].abs().sum() > 0
