"""Batch outputs under aliasing and concurrency: real-path identity, one run per folder, no writes through links,
and instructions that only look non-empty."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_photo
from PIL import Image

from compactedit_cli.batch.lock import LOCK_NAME, output_folder_lock
from compactedit_cli.files import metadata

FAST = ["--steps", "1"]


def results(out_dir):
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def _manifest(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_two_lines_writing_one_file_through_a_symlinked_folder_collide(cli, tiny_checkpoint, tmp_path, overwrite):
    make_photo(tmp_path / "p.png")
    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "alias").symlink_to(out / "real")  # inside OUT_DIR, so it is not an escape: just a second name
    manifest = _manifest(
        tmp_path / "m.jsonl",
        [
            {"image": "p.png", "instruction": "a", "output": "real/x.png"},
            {"image": "p.png", "instruction": "b", "output": "alias/x.png"},
        ],
    )
    result = cli("batch", "--manifest", manifest, "-o", out, "-m", tiny_checkpoint, *FAST, *overwrite)
    assert result.exit_code == 2, result.stderr
    assert "line 1 and line 2 both write" in result.stderr and str(out / "real" / "x.png") in result.stderr
    assert not (out / "real" / "x.png").exists()


def test_results_log_never_writes_through_a_symlink(cli, tiny_checkpoint, tmp_path):
    make_photo(tmp_path / "src" / "p.png")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").symlink_to(outside)
    result = cli("batch", tmp_path / "src", "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    assert outside.read_text() == "keep me\n"
    assert not (out / "results.jsonl").is_symlink()
    assert [r["status"] for r in results(out)] == ["ok"]


def test_a_second_batch_into_a_busy_folder_refuses_naming_the_holder(cli, tiny_checkpoint, tmp_path):
    make_photo(tmp_path / "src" / "p.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"output": "keep", "status": "ok"}\n')
    with output_folder_lock(out):
        result = cli("batch", tmp_path / "src", "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 5
    assert result.stderr.splitlines() == [
        f"error: the output folder {out} is in use by another compactedit batch (pid {os.getpid()}) "
        "(wait for it to finish, or use another output folder)"
    ]
    assert (out / "results.jsonl").read_text() == '{"output": "keep", "status": "ok"}\n'  # the holder's log
    assert not (out / "p.png").exists()
    assert not (out / LOCK_NAME).exists()  # the holder removed it when done


def test_a_lock_left_by_a_killed_batch_does_not_block_the_next(cli, tiny_checkpoint, tmp_path):
    make_photo(tmp_path / "src" / "p.png")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from compactedit_cli.batch.lock import output_folder_lock\n"
            "with output_folder_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = cli("batch", tmp_path / "src", "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
        assert busy.exit_code == 5 and f"pid {holder.pid}" in busy.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / LOCK_NAME).exists()  # kill -9 left the file, but not the lock
    deadline = time.monotonic() + 10
    while True:
        result = cli("batch", tmp_path / "src", "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
        if result.exit_code != 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.exit_code == 0, result.stderr
    assert [r["status"] for r in results(out)] == ["ok"]


def test_results_lines_holding_other_line_breaks_survive_the_report(cli, tiny_checkpoint, tmp_path):
    """results.jsonl keeps U+2028 and NEL raw (ensure_ascii=False), as a file name may hold them: its readers end
    lines only at LF, so ``batch report`` keeps such an item instead of dropping it from the merged file."""
    src = tmp_path / "src"
    make_photo(src / "a\u2028b\x85c.png")
    make_photo(src / "plain.png", seed=1)
    out = tmp_path / "out"
    assert cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST).exit_code == 0
    report = cli("batch", "report", out, "--json")
    assert report.exit_code == 0, report.stderr
    assert json.loads(report.stdout)["items"] == 2
    lines = (out / "results.jsonl").read_text().split("\n")[:-1]
    assert sorted(json.loads(line)["source"] for line in lines) == ["a\u2028b\x85c.png", "plain.png"]


@pytest.mark.parametrize(
    "instruction",
    ["\x01\x02\x7f", "\u200b\u200c\u200d\ufeff", "\u2060 \t", "\x00"],
    ids=["control", "zero-width", "word-joiner-and-space", "nul"],
)
def test_instructions_of_invisible_characters_are_empty(cli, tiny_checkpoint, tmp_path, instruction):
    photo = make_photo(tmp_path / "p.png")
    if "\x00" not in instruction:  # argv cannot carry a NUL; a manifest can
        edit = cli("edit", photo, instruction, "-o", tmp_path / "o.png", "-m", tiny_checkpoint, *FAST)
        assert edit.exit_code == 2 and edit.stderr.splitlines() == ["error: the instruction is empty"]
    manifest = _manifest(tmp_path / "m.jsonl", [{"image": "p.png", "instruction": instruction}])
    batch = cli("batch", "--manifest", manifest, "-o", tmp_path / "out", "-m", tiny_checkpoint, *FAST)
    assert batch.exit_code == 2
    assert batch.stderr.splitlines() == [f"error: {manifest}:1: the instruction is empty"]


def test_invisible_characters_are_removed_from_an_instruction(cli, tiny_checkpoint, tmp_path):
    photo = make_photo(tmp_path / "p.png")
    manifest = _manifest(tmp_path / "m.jsonl", [{"image": "p.png", "instruction": "add\u200b a\x00 hat\n", "seed": 3}])
    out = tmp_path / "out"
    assert cli("batch", "--manifest", manifest, "-o", out, "-m", tiny_checkpoint, *FAST).exit_code == 0
    assert metadata.read(out / "p.png")["instruction"] == "add a hat"
    edit = cli("edit", photo, "add\u200b a hat", "-o", tmp_path / "e.png", "--seed", "3", "-m", tiny_checkpoint, *FAST)
    assert edit.exit_code == 0, edit.stderr
    with Image.open(tmp_path / "e.png") as left, Image.open(out / "p.png") as right:
        assert left.tobytes() == right.tobytes()  # the same instruction once cleaned: the same edit
