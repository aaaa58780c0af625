"""Provenance that is true for every file: per-output seed and index, --replay of out-2, no leaked local paths,
batch resume that compares parameters, and results.jsonl paths by one rule."""

from __future__ import annotations

import json

import numpy as np
from conftest import make_photo
from PIL import Image

from compactedit_cli.files import metadata

FAST = ("--steps", "2")


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=int)


def test_replay_of_the_second_output_reproduces_it(cli, tiny_checkpoint, tmp_path):
    photo = make_photo(tmp_path / "in.png", size=(64, 48))
    out = tmp_path / "many.png"
    result = cli("edit", photo, "add snow", "-o", out, "-n", "2", "--seed", "99", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    first, second = (metadata.read(tmp_path / f"many-{i}.png") for i in (1, 2))
    assert (first["seed"], first["index"], first["num_images"]) == (99, 0, 2)
    assert (second["seed"], second["index"], second["num_images"]) == (99, 1, 2)

    again = tmp_path / "again.png"
    result = cli("edit", photo, "--replay", tmp_path / "many-2.png", "-o", again, "-m", tiny_checkpoint)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("--replay") == 0  # -m given: the recorded local model is not even read
    assert np.abs(_pixels(again) - _pixels(tmp_path / "many-2.png")).max() <= 1
    assert np.abs(_pixels(again) - _pixels(tmp_path / "many-1.png")).max() > 1
    replayed = metadata.read(again)
    assert (replayed["seed"], replayed["index"], replayed["num_images"]) == (99, 1, 2)  # and replays again


def test_replay_says_local_paths_are_not_trusted_and_names_m(cli, tiny_checkpoint, tmp_path):
    photo = make_photo(tmp_path / "in.png", size=(32, 32))
    out = tmp_path / "out.png"
    assert cli("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, "--steps", "1").exit_code == 0
    result = cli("edit", photo, "--replay", out, "-o", tmp_path / "again.png", "--offline")
    warning = [line for line in result.stderr.splitlines() if "--replay" in line]
    assert len(warning) == 1
    assert "local paths are not trusted from metadata" in warning[0] and "-m" in warning[0]
    assert "not a valid model" not in result.stderr


def test_no_local_path_is_recorded(cli, tiny_checkpoint, tmp_path):
    nested = make_photo(tmp_path / "private" / "holiday" / "beach.png", size=(32, 32))
    for ext in ("png", "jpg", "webp"):
        out = tmp_path / f"out.{ext}"
        result = cli("edit", nested, "x", "-o", out, "-m", tiny_checkpoint, "--steps", "1", "--sidecar")
        assert result.exit_code == 0, result.stderr
        record = metadata.read(out)
        assert record["source"] == "beach.png" and record["model"] == "checkpoint"
        assert json.loads((tmp_path / f"out.{ext}.json").read_text()) == record  # the sidecar: the same record
        written = out.read_bytes() + (tmp_path / f"out.{ext}.json").read_bytes()
        for private in (str(tmp_path), str(tiny_checkpoint)):
            assert private.encode() not in written
            assert private.encode("utf-16-be") not in written


def _lines(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_resume_skips_equal_warns_on_changed_and_overwrite_redoes(cli, tiny_checkpoint, tmp_path):
    photos = tmp_path / "photos"
    for name in ("a", "b"):
        make_photo(photos / f"{name}.png", size=(32, 32), seed=ord(name))
    out = tmp_path / "out"
    run = ("batch", photos, "-o", out, "-m", tiny_checkpoint, "--steps", "1", "--seed", "5")
    assert cli(*run, "-i", "make it winter").exit_code == 0
    made = {line["output"]: line for line in _lines(out)}
    # results.jsonl paths: absolute, one rule for folder mode (here) and manifest mode (tests/test_exif.py)
    assert sorted(made) == [str(out / "a.png"), str(out / "b.png")]
    assert sorted(line["input"] for line in made.values()) == [str(photos / "a.png"), str(photos / "b.png")]

    same = cli(*run, "-i", "make it winter")  # equal: skipped, quietly
    assert same.exit_code == 0 and "other parameters" not in same.stderr
    assert [line["status"] for line in _lines(out)] == ["skipped", "skipped"]

    changed = cli(*run, "-i", "make it summer")  # different: kept, one warning per item
    assert changed.exit_code == 0
    warnings = [line for line in changed.stderr.splitlines() if "other parameters" in line]
    assert len(warnings) == 2 and all("instruction 'make it winter', now 'make it summer'" in w for w in warnings)
    assert all("--overwrite" in w for w in warnings)
    for line in _lines(out):  # each line still describes the file beside it, not the request
        assert line["status"] == "skipped" and line["instruction"] == "make it winter"
        assert line["seed"] == made[line["output"]]["seed"] == metadata.read(line["output"])["seed"]

    reseeded = cli(
        "batch", photos, "-o", out, "-m", tiny_checkpoint, "--steps", "1", "--seed", "6", "-i", "make it winter"
    )
    assert sum("seed 5, now 6" in line for line in reseeded.stderr.splitlines()) == 2

    redo = cli(*run, "-i", "make it summer", "--overwrite")
    assert redo.exit_code == 0
    for line in _lines(out):
        assert line["status"] == "ok" and metadata.read(line["output"])["instruction"] == "make it summer"
