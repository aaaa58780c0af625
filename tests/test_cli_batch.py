"""``compactedit batch``: folders and manifests, resume, failures, confinement, results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_photo
from PIL import Image

FAST = ["--steps", "1"]


def results(out_dir):
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    make_photo(root / "a.jpg", (90, 60), seed=1)
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # corrupt, in the middle
    make_photo(root / "c.png", (96, 64), seed=2)
    make_photo(root / "sub" / "d.webp", (64, 96), seed=3)
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_batch_continues_past_a_bad_image(cli, tiny_checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    result = cli("batch", folder, "-i", "make it winter", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 1, result.stderr
    records = {r["input"]: r for r in results(out)}
    assert records[str(folder / "a.jpg")]["status"] == "ok"
    assert records[str(folder / "c.png")]["status"] == "ok"
    bad = records[str(folder / "b.png")]
    assert bad["status"] == "failed" and "b.png" in bad["error"]
    assert str(folder / "sub" / "d.webp") not in records  # not recursive
    assert str(folder / "notes.txt") not in records
    assert Image.open(out / "a.png").size == (90, 60)
    assert not (out / "b.png").exists()
    assert "failed" in result.stderr


def test_recursive_keeps_layout_and_rerun_resumes(cli, tiny_checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    first = cli("batch", folder, "-i", "x", "-o", out, "-r", "--glob", "*.*", "-m", tiny_checkpoint, *FAST)
    assert first.exit_code == 1
    assert (out / "sub" / "d.png").is_file()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    second = cli("batch", folder, "-i", "x", "-o", out, "-r", "--glob", "*.*", "-m", tiny_checkpoint, *FAST)
    assert second.exit_code == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before  # nothing redone
    statuses = sorted(r["status"] for r in results(out))
    assert statuses == ["failed", "skipped", "skipped", "skipped"]  # one line per item after a complete run
    third = cli(
        "batch", folder, "-i", "x", "-o", out, "-r", "--glob", "*.*", "--overwrite", "-m", tiny_checkpoint, *FAST
    )
    assert third.exit_code == 1
    assert sorted(r["status"] for r in results(out)) == ["failed", "ok", "ok", "ok"]


def test_all_ok_exits_zero_and_batches_same_bins(cli, tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        make_photo(src / f"p{i}.png", (100 + i, 70), seed=i)
    out = tmp_path / "out"
    result = cli("batch", src, "-i", "x", "-o", out, "--batch-size", "2", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    assert [r["status"] for r in results(out)] == ["ok", "ok", "ok"]
    single = tmp_path / "single"
    assert cli("batch", src, "-i", "x", "-o", single, "-m", tiny_checkpoint, *FAST).exit_code == 0
    for i in range(3):  # batching changes nothing but speed
        a = np.asarray(Image.open(out / f"p{i}.png"), dtype=np.int16)
        b = np.asarray(Image.open(single / f"p{i}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def test_manifest_jsonl(cli, tiny_checkpoint, tmp_path):
    make_photo(tmp_path / "imgs" / "p.png", (80, 80))
    manifest = tmp_path / "edits.jsonl"
    lines = [
        {"image": "imgs/p.png", "instruction": "add a hat", "output": "hat.webp", "seed": 5},
        {
            "image": "imgs/p.png",
            "instruction": "remove the car",
            "output": "nested/car",
            "steps": 2,
            "guidance": 3.0,
            "image_guidance": 1.0,
        },
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    result = cli("batch", "--manifest", manifest, "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    assert (out / "hat.webp").is_file() and (out / "nested" / "car.png").is_file()
    records = results(out)
    assert [r["seed"] for r in records] == [5, 42]
    from compactedit_cli.files import metadata

    second = metadata.read(out / "nested" / "car.png")
    assert (second["steps"], second["guidance_scale"], second["image_guidance_scale"]) == (2, 3.0, 1.0)


def test_manifest_csv(cli, tiny_checkpoint, tmp_path):
    make_photo(tmp_path / "p.png", (64, 64))
    manifest = tmp_path / "edits.csv"
    manifest.write_text("image,instruction,seed,output\np.png,make it red,3,red.jpg\np.png,make it blue,,\n")
    out = tmp_path / "out"
    result = cli("batch", "--manifest", manifest, "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    assert (out / "red.jpg").is_file() and (out / "p.png").is_file()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "p.png", "instruction": "x", "output": "../escape.png"}', "relative path inside"),
        ('{"image": "p.png", "instruction": "x", "output": "/tmp/abs.png"}', "relative path inside"),
        ('{"image": "p.png", "instruction": "x", "output": "link/out.png"}', "escapes the output folder"),
        ("not json", "not valid JSON"),
        ('{"image": "p.png"}', "missing field 'instruction'"),
        ('{"image": "p.png", "instruction": "x", "seed": "many"}', "seed must be an integer or 'random' (got 'many')"),
        ('{"image": "p.png", "instruction": "x", "seed": true}', "seed must be an integer (got True)"),
        ('{"image": "p.png", "instruction": "x", "steps": 1000000000}', "steps must be between 1 and 1000"),
        ('{"image": "p.png", "instruction": "x", "seed": 1180591620717411303424}', "seed must be between 0 and"),
        ('{"image": "p.png", "instruction": "x", "guidance": "nan"}', "guidance must be a finite number"),
        ('{"image": "p.png", "instruction": "   "}', "instruction is empty"),
        pytest.param(
            json.dumps({"image": "p.png", "instruction": "a" * 65_537}), "instruction is 65,537 bytes", id="long"
        ),
        ('{"image": "p.png", "instruction": "x", "colour": "red"}', "unknown field"),
        ('["p.png", "x"]', "JSON object"),
    ],
)
def test_bad_manifest_lines_name_the_line(cli, tiny_checkpoint, tmp_path, line, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)  # a symlink inside OUT_DIR pointing outside it
    make_photo(tmp_path / "p.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "p.png", "instruction": "fine"}\n' + line + "\n")
    result = cli("batch", "--manifest", manifest, "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 2, result.stderr
    assert "m.jsonl:2" in result.stderr and message in result.stderr
    assert not (tmp_path / "escape.png").exists() and not (out / "p.png").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_manifest_lines_end_only_at_line_breaks(cli, tiny_checkpoint, tmp_path, suffix):
    """U+2028 and NEL are text inside a JSON string or a CSV cell, not line ends (as str.splitlines has them);
    a CSV line number is the line its row starts on, past a quoted cell that spans lines."""
    make_photo(tmp_path / "p.png")
    manifest = tmp_path / f"m{suffix}"
    if suffix == ".jsonl":
        manifest.write_text(
            '{"image": "p.png", "instruction": "a\u2028b\x85c", "output": "x.png"}\r\n'
            '{"image": "p.png", "instruction": "x", "steps": 0}\n',
            newline="",
        )
    else:
        manifest.write_text(
            'image,instruction,output\np.png,a\u2028b\x85c,x.png\np.png,"two\nlines",y.png\np.png,x,,0\n',
            newline="",
        )
    result = cli("batch", "--manifest", manifest, "-o", tmp_path / "out", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 2, result.stderr
    assert f"m{suffix}:{2 if suffix == '.jsonl' else 5}:" in result.stderr
    manifest.write_text(manifest.read_text().rsplit("\n", 2)[0] + "\n", newline="")  # without the bad line
    result = cli("batch", "--manifest", manifest, "-o", tmp_path / "out", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    from compactedit_cli.files import metadata

    assert metadata.read(tmp_path / "out" / "x.png")["instruction"] == "a\u2028bc"


def test_non_utf8_manifest(cli, tiny_checkpoint, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"image": "p.png", "instruction": "caf\xe9"}\n')
    result = cli("batch", "--manifest", manifest, "-o", tmp_path / "out", "-m", tiny_checkpoint)
    assert result.exit_code == 2 and "not UTF-8" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],  # neither INPUT_DIR nor --manifest
        ["{src}"],  # INPUT_DIR without -i
        ["{src}", "-i", "x", "--manifest", "{src}/m.jsonl"],
        ["--manifest", "{src}/m.jsonl", "-i", "x"],
        ["{src}/missing", "-i", "x"],
        ["{src}", "-i", "x", "--glob", "*.nothing"],
    ],
)
def test_batch_usage_errors(cli, tiny_checkpoint, tmp_path, args):
    src = tmp_path / "src"
    make_photo(src / "p.png")
    (src / "m.jsonl").write_text('{"image": "p.png", "instruction": "x"}\n')
    args = [a.replace("{src}", str(src)) for a in args]
    result = cli("batch", *args, "-o", tmp_path / "out", "-m", tiny_checkpoint)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_output_folder_inside_input_is_not_an_input(cli, tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    make_photo(src / "p.png")
    out = src / "edited"
    assert cli("batch", src, "-i", "x", "-o", out, "-r", "-m", tiny_checkpoint, *FAST).exit_code == 0
    assert cli("batch", src, "-i", "x", "-o", out, "-r", "-m", tiny_checkpoint, *FAST).exit_code == 0
    assert [r["input"] for r in results(out)] == [str(src / "p.png")]


def test_random_seeds_are_recorded(cli, tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    make_photo(src / "p.png")
    make_photo(src / "q.png", seed=4)
    out = tmp_path / "out"
    assert cli("batch", src, "-i", "x", "-o", out, "--seed", "random", "-m", tiny_checkpoint, *FAST).exit_code == 0
    seeds = [r["seed"] for r in results(out)]
    assert all(isinstance(s, int) for s in seeds)
    from compactedit_cli.files import metadata

    assert metadata.read(out / "p.png")["seed"] == seeds[0]


def test_an_item_its_output_format_cannot_store_fails_alone(cli, tiny_checkpoint, tmp_path):
    root = tmp_path / "photos"
    make_photo(root / "a.png", (90, 60), seed=1)
    Image.new("RGB", (16_400, 82), (40, 90, 160)).save(root / "wide.png")  # past WebP's 16,383 a side
    out = tmp_path / "out"
    result = cli("batch", root, "-i", "x", "-o", out, "--format", "webp", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 1, result.stderr
    records = {r["input"]: r for r in results(out)}
    assert records[str(root / "a.png")]["status"] == "ok"
    failed = records[str(root / "wide.png")]
    assert failed["status"] == "failed" and "WEBP stores at most 16,383 pixels a side" in failed["error"]
    assert (out / "a.webp").is_file() and not (out / "wide.webp").exists()


def test_an_image_given_as_the_manifest_is_named_so(cli, tiny_checkpoint, tmp_path):
    photo = make_photo(tmp_path / "p.png")
    for args in (
        ["batch", "--manifest", photo, "-o", tmp_path / "out"],
        ["train", photo, "-o", tmp_path / "a.safetensors"],
    ):
        result = cli(*args, "-m", tiny_checkpoint)
        assert result.exit_code == 2, result.stderr
        assert result.stderr.strip() == f"error: {photo} is an image, not a manifest (a .jsonl or .csv file)"


def test_an_output_folder_that_is_a_file_is_named_so(cli, tiny_checkpoint, tmp_path):
    """Even the input folder's only image (planning leaves the output folder out of the inputs, so it found no
    images to edit)."""
    root = tmp_path / "photos"
    first = make_photo(root / "a.png")
    before = first.read_bytes()
    result = cli("batch", root, "-i", "x", "-o", first, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 5, result.stderr
    assert result.stderr.strip() == f"error: the output folder {first} is a file, not a folder"
    assert first.read_bytes() == before
