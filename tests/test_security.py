"""Nothing a file says is trusted: output symlinks, replayed metadata, permissions."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
from conftest import make_photo
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from compactedit_cli.files import metadata as meta_io

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.single_thread

FAST = ["--steps", "1", "--no-binning"]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside every output folder, which no run may touch."""
    path = tmp_path / "outside" / "precious.png"
    path.parent.mkdir()
    path.write_bytes(b"precious")
    return path


@pytest.mark.parametrize("form", ["manifest", "manifest-default", "folder"])
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_batch_refuses_an_output_that_is_a_symlink_out(cli, tiny_checkpoint, tmp_path, outside, form, dangling):
    src, out = tmp_path / "src", tmp_path / "out"
    make_photo(src / "p.png")
    out.mkdir()
    target = outside.with_name("new.png") if dangling else outside
    (out / "p.png").symlink_to(target)
    if form.startswith("manifest"):
        line = {"image": "p.png", "instruction": "x"} | ({} if form == "manifest-default" else {"output": "p.png"})
        (src / "m.jsonl").write_text(json.dumps(line) + "\n")  # the default output is OUT_DIR/p.png
        result = cli("batch", "--manifest", src / "m.jsonl", "-o", out, "--overwrite", "-m", tiny_checkpoint, *FAST)
    else:
        result = cli("batch", src, "-i", "x", "-o", out, "--overwrite", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 2
    assert "escapes the output folder" in result.stderr and len(result.stderr.splitlines()) == 1
    assert outside.read_bytes() == b"precious" and not target.with_name("new.png").exists()
    assert (out / "p.png").is_symlink()


def test_edit_replaces_an_output_symlink_without_following_it(cli, tiny_checkpoint, tmp_path, outside):
    source = make_photo(tmp_path / "p.png")
    link = tmp_path / "o.png"
    link.symlink_to(outside)
    refused = cli("edit", source, "x", "-o", link, "-m", tiny_checkpoint, *FAST)
    assert refused.exit_code == 5 and "already exists" in refused.stderr
    replaced = cli("edit", source, "x", "-o", link, "--overwrite", "-m", tiny_checkpoint, *FAST)
    assert replaced.exit_code == 0, replaced.stderr
    assert not link.is_symlink() and Image.open(link).size == (100, 75)
    assert outside.read_bytes() == b"precious"


# ---- --replay -----------------------------------------------------------------------------------------------------


def _with_record(path: Path, record: dict) -> Path:
    """A PNG carrying ``record`` as its compactedit metadata (what a stranger's file could say)."""
    info = PngInfo()
    info.add_itxt("compactedit", json.dumps(record))
    make_photo(path)
    Image.open(path).save(path, pnginfo=info)
    return path


HOSTILE = {
    "model": "/etc",
    "seed": "7",
    "steps": 10**9,
    "guidance_scale": math.nan,
    "image_guidance_scale": -1,
    "resolution_binning": "yes",
    "revision": "main",
}


@pytest.mark.parametrize(("field", "value"), [*HOSTILE.items(), ("model", "../x"), ("seed", -5), ("steps", 1.5)])
def test_replay_ignores_untrusted_values_with_a_warning(cli, tiny_checkpoint, tmp_path, field, value):
    """A bad recorded value is dropped (with a warning naming it) and the default or the configured value runs
    instead: here the configured model, so a recorded path would fail the run if it were used."""
    assert cli("config", "set", "model", str(tiny_checkpoint)).exit_code == 0
    recorded = _with_record(tmp_path / "stranger.png", {"instruction": "add snow", "steps": 1, field: value})
    source = make_photo(tmp_path / "p.png")
    out = tmp_path / "o.png"
    result = cli("edit", source, "--replay", recorded, "-o", out, "--no-binning")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: --replay:")]
    if field == "revision":  # a valid revision, but of no usable recorded model
        assert warnings == ["warning: --replay: ignoring the recorded revision 'main': it belongs to no usable model"]
    else:
        assert len(warnings) == 1 and f"ignoring the recorded {field} " in warnings[0]
    used = meta_io.read(out)
    assert used["instruction"] == "add snow" and used["model"] == tiny_checkpoint.name  # a folder: its name only
    assert (used["seed"], used["resolution_binning"]) == (42, False)
    assert (used["guidance_scale"], used["image_guidance_scale"]) == (4.5, 1.2)
    assert used["steps"] == (20 if field == "steps" else 1)


def test_replay_of_a_record_without_an_instruction_needs_one(cli, tiny_checkpoint, tmp_path):
    recorded = _with_record(tmp_path / "stranger.png", {"instruction": 12, "seed": 3})
    result = cli("edit", make_photo(tmp_path / "p.png"), "--replay", recorded, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == "error: missing INSTRUCTION"


def test_replayed_model_is_a_hub_id_with_its_revision(cli, cached_model, tmp_path):
    """A recorded hub model is reused with its recorded revision (here a commit that is not cached, offline)."""
    recorded = _with_record(tmp_path / "r.png", {"instruction": "x", "model": cached_model, "revision": "2" * 40})
    result = cli("edit", make_photo(tmp_path / "p.png"), "--replay", recorded, "-o", tmp_path / "o.png", "--offline")
    assert result.exit_code == 4 and f"models download {cached_model} --revision {'2' * 40}" in result.stderr


# ---- permissions --------------------------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


@pytest.mark.parametrize("mode", ["edit", "batch"])
def test_outputs_follow_the_umask(cli, tiny_checkpoint, tmp_path, umask_027, mode):
    source = make_photo(tmp_path / "src" / "p.png")
    out = tmp_path / "out"
    if mode == "edit":
        result = cli("edit", source, "x", "-o", out / "p.png", "--sidecar", "-m", tiny_checkpoint, *FAST)
    else:
        result = cli("batch", source.parent, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    written = list(out.iterdir())
    assert len(written) == 2  # the image, and the sidecar or results.jsonl
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o640}


@pytest.mark.parametrize("mode", ["edit", "batch"])
def test_a_read_only_input_is_edited_and_never_modified(cli, tiny_checkpoint, tmp_path, mode):
    source = make_photo(tmp_path / "src" / "p.png")
    source.chmod(0o444)
    before = (source.read_bytes(), source.stat().st_mtime_ns)
    out = tmp_path / "out"
    if mode == "edit":
        result = cli("edit", source, "x", "-o", out / "p.png", "-m", tiny_checkpoint, *FAST)
    else:
        result = cli("batch", source.parent, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    assert (out / "p.png").is_file()
    assert (source.read_bytes(), source.stat().st_mtime_ns) == before
    assert stat.S_IMODE(source.stat().st_mode) == 0o444
