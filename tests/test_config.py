"""``compactedit config``: values checked when set and when read, faults named with the key and the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_photo


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("COMPACTEDIT_HOME", str(path))
    return path


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("device", "tpu", "device must be one of auto, cpu, cuda, cuda:N, mps (got 'tpu')"),
        ("dtype", "fp8", "dtype must be one of auto, bf16, fp16, fp32 (got 'fp8')"),
        ("offload", "disk", "offload must be one of none, model, sequential (got 'disk')"),
        ("output_format", "gif", "output_format must be png, jpg or webp (got 'gif')"),
        ("model", " ", "model must be an alias, a hub id (owner/name) or a folder (got ' ')"),
        ("kernels", "cuda", "kernels must be one of off, triton (got 'cuda')"),
        ("quantize", "int4", "quantize must be one of none, fp8 (got 'int4')"),
        ("compile", "sometimes", "compile must be one of off, on, auto, aot (got 'sometimes')"),
        (
            "colour",
            "blue",
            "unknown config key 'colour' (one of: model, device, dtype, offload, output_format, server, exif, kernels, "
            "quantize, compile)",
        ),
    ],
)
def test_bad_values_are_refused_when_set(cli, home, key, value, message):
    result = cli("config", "set", key, value)
    assert (result.exit_code, result.stderr) == (2, f"error: {message}\n")
    assert not (home / "config.toml").exists()


def test_set_get_unset_round_trip(cli, home):
    assert cli("config", "get", "device").stdout == "auto\n"  # the built-in default…
    assert "not set" in cli("config", "get", "device").stderr  # …said to be one
    assert cli("config", "set", "device", "CUDA:1").stdout == f"{home / 'config.toml'}\n"
    assert cli("config", "set", "output_format", "jpg").exit_code == 0
    got = cli("config", "get", "device")
    assert (got.exit_code, got.stdout, got.stderr) == (0, "cuda:1\n", "")
    shown = json.loads(cli("config", "show").stdout)
    assert shown == {"path": str(home / "config.toml"), "values": {"device": "cuda:1", "output_format": "jpeg"}}
    assert cli("config", "unset", "device").exit_code == 0
    assert cli("config", "get", "device").stdout == "auto\n"
    assert cli("config", "get", "colour").exit_code == 2


def test_a_hand_edited_bad_value_names_key_and_file_and_can_be_repaired(cli, home, tmp_path):
    home.mkdir()
    config = home / "config.toml"
    config.write_text('device = "tpu"\ndtype = "bf16"\n')
    photo = make_photo(tmp_path / "p.png")
    for args in (["edit", photo, "x", "-o", tmp_path / "o.png"], ["config", "show"], ["config", "get", "dtype"]):
        result = cli(*args)
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: config file {config}: device must be one of")
        assert "compactedit config set device" in result.stderr and result.stderr.count("\n") == 1
    assert cli("config", "unset", "device").exit_code == 0  # set and unset work on a file with a bad value
    assert cli("config", "get", "dtype").stdout == "bf16\n"


def test_a_bad_saved_model_is_named_when_it_is_used(cli, home, tmp_path):
    photo = make_photo(tmp_path / "p.png")
    assert cli("config", "set", "model", "nobody").exit_code == 0  # only its shape is checked when set
    result = cli("edit", photo, "x", "-o", tmp_path / "o.png")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: config file {home / 'config.toml'}: unknown model 'nobody'")
    assert "compactedit config set model" in result.stderr


def test_a_saved_offload_with_cuda_graphs_names_the_key(cli, home, tmp_path):
    photo = make_photo(tmp_path / "p.png")
    assert cli("config", "set", "offload", "model").exit_code == 0
    result = cli("edit", photo, "x", "-o", tmp_path / "o.png", "--cuda-graphs")
    assert result.exit_code == 2 and "config file" in result.stderr and "config set offload" in result.stderr


def test_saved_kernels_and_quantize_are_the_defaults_and_flags_win(cli, home, tmp_path):
    from compactedit_cli.cli.flags import model_options

    assert cli("config", "set", "kernels", "Triton").exit_code == 0
    assert cli("config", "set", "quantize", "fp8").exit_code == 0
    saved = model_options(None, None, None, None, False, None, False)
    assert (saved.kernels, saved.quantize) == ("triton", "fp8")
    flagged = model_options(None, None, None, None, False, None, False, kernels="off", quantize="none")
    assert (flagged.kernels, flagged.quantize) == ("off", "none")
    photo = make_photo(tmp_path / "p.png")
    result = cli("edit", photo, "x", "-o", tmp_path / "o.png", "--offload", "model")
    assert result.exit_code == 2 and "config file" in result.stderr and "config set quantize" in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_config_folder_under_a_file(cli, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("COMPACTEDIT_HOME", str(blocker / "sub"))
    written = cli("config", "set", "device", "cpu")
    assert written.exit_code == 5
    assert written.stderr == f"error: config folder {blocker / 'sub'} is unusable: it is, or lies under, a file\n"
    read = cli("config", "show")
    assert read.exit_code == 2 and str(blocker / "sub") in read.stderr and read.stderr.count("\n") == 1
    edit = cli("edit", make_photo(tmp_path / "p.png"), "x", "-o", tmp_path / "o.png")
    assert edit.exit_code == 2 and str(blocker / "sub") in edit.stderr


def test_config_home_is_a_file_in_a_real_process(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "compactedit_cli", "config", "set", "device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "COMPACTEDIT_HOME": str(blocker)},
    )
    unusable = f"error: config folder {blocker} is unusable: it is, or lies under, a file\n"
    assert (done.returncode, done.stderr) == (5, unusable)


def test_config_file_that_is_a_folder(cli, home):
    (home / "config.toml").mkdir(parents=True)
    assert cli("config", "show").exit_code == 2
    result = cli("config", "set", "device", "cpu")
    assert result.exit_code == 5 and f"{home / 'config.toml'} is a folder" in result.stderr


def test_output_format_names_the_default_output(home):
    """``flags.default_format``: --format, else the saved output_format, else png (edit's IMAGE_edited.EXT and
    batch's names)."""
    from compactedit_cli import config_file
    from compactedit_cli.cli.flags import default_format

    assert default_format(None) == "png"
    config_file.set_value("output_format", "webp")
    assert default_format(None) == "webp"
    assert default_format("jpg") == "jpeg"


def test_batch_uses_the_saved_output_format(cli, home, tiny_checkpoint, tmp_path):
    make_photo(tmp_path / "in" / "a.png")
    assert cli("config", "set", "output_format", "webp").exit_code == 0
    result = cli("batch", tmp_path / "in", "-i", "x", "-o", tmp_path / "out", "-m", tiny_checkpoint, "--steps", "1")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "a.webp").is_file()
