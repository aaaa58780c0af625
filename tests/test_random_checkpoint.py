"""A random checkpoint written to a folder loads through the real loader and edits as the in-memory build does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from compactedit_cli.engine.pipeline import EditPipeline
from compactedit_cli.loading.checkpoint import read_safetensors_header, verify_folder
from compactedit_cli.random_weights.full import random_pipeline, scaled_configs, write_random_checkpoint
from tests.conftest import make_photo

# Narrower and shallower than ``mid``: the real vocabulary, patch geometry and VAE depth, in a few seconds.
CONFIGS = scaled_configs(width_divisor=16, layers=1)
EDIT = {"num_inference_steps": 2, "resolution_binning": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("random") / "checkpoint", CONFIGS, dtype=torch.float32)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    return make_photo(tmp_path_factory.mktemp("photo") / "photo.png", size=(96, 64))


@pytest.fixture(scope="module")
def in_memory_edit(photo) -> np.ndarray:
    pipe = random_pipeline(CONFIGS, device="cpu", dtype=torch.float32)
    return np.asarray(pipe(Image.open(photo), "make the sky blue", **EDIT).images[0])


def test_the_folder_has_the_published_layout(folder):
    files = {str(path.relative_to(folder)) for path in verify_folder(folder)}
    assert "text_encoder/model.safetensors" in files and "tokenizer/preprocessor_config.json" in files
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text["text_config"]["vocab_size"] == 151936  # the real vocabulary; only the special ids move
    assert text["image_token_id"] < 1000
    image = json.loads((folder / "tokenizer" / "preprocessor_config.json").read_text())
    assert (image["patch_size"], image["merge_size"], image["temporal_patch_size"]) == (16, 2, 2)
    header = read_safetensors_header(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {entry["dtype"] for entry in header.values()} == {"F32"}


def test_weights_are_bf16_on_disk_by_default(tmp_path):
    root = write_random_checkpoint(tmp_path / "bf16", scaled_configs(width_divisor=32, layers=1))
    for path in root.rglob("*.safetensors"):
        assert {entry["dtype"] for entry in read_safetensors_header(path).values()} == {"BF16"}, path


def test_loaded_folder_edits_as_the_in_memory_build(folder, photo, in_memory_edit):
    pipe = EditPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    loaded = np.asarray(pipe(Image.open(photo), "make the sky blue", **EDIT).images[0])
    assert loaded.std() > 0
    np.testing.assert_array_equal(loaded, in_memory_edit)


def test_edit_command_runs_on_the_folder_offline(cli, folder, photo, in_memory_edit, tmp_path):
    out = tmp_path / "out.png"
    args = ["edit", photo, "make the sky blue", "-o", out, "-m", folder, "--offline", "--no-binning", "--steps", "2"]
    result = cli(*args, "--device", "cpu", "--dtype", "fp32", "--server", "never")
    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), in_memory_edit)
