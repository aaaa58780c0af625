"""Scaling a batch out: several worker processes (a real kill -9, a real Ctrl-C), shards and their report, the
pipelined one-device run's --json summary, and the option rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import make_photo, single_thread
from PIL import Image

from compactedit_cli import options
from compactedit_cli.errors import UsageError

FAST = ["--steps", "1", "--device", "cpu"]
COUNT = 6


def photos(root: Path, count: int = COUNT) -> Path:
    for index in range(count):
        make_photo(root / f"p{index}.png", (48 + 16 * (index % 2), 48), seed=index)
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def start(*args: object) -> subprocess.Popen:
    command = [sys.executable, "-m", "compactedit_cli", "batch", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def wait_for_lines(process: subprocess.Popen, log: Path, count: int) -> None:
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_bytes().count(b"\n") >= count):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the batch never got going"
        time.sleep(0.02)


def worker_pids(process: subprocess.Popen) -> list[int]:
    children = psutil.Process(process.pid).children()
    return [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """Photos and a plain one-worker run over them: the pixels every other engine must reproduce."""
    from conftest import Invoke

    root = tmp_path_factory.mktemp("scale")
    src, out = photos(root / "src"), root / "reference"
    with single_thread():
        result = Invoke()("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] == COUNT and summary["workers"] == 1
    assert 0 < summary["busy_fraction"] <= 1 and summary["items_per_second"] > 0
    assert summary["steady_items_per_second"] > 0 and summary["startup_seconds"] > 0  # the model load counts
    return src, out


def same_pixels(out: Path, reference: Path) -> None:
    for made in sorted(reference.glob("*.png")):
        assert np.abs(pixels(out / made.name) - pixels(made)).max() <= 1, made.name


def test_a_worker_killed_mid_item_has_its_items_retried_and_the_run_goes_on(tiny_checkpoint, reference, tmp_path):
    src, ref = reference
    out = tmp_path / "out"
    process = start(src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST, "--workers", "2", "--json")
    wait_for_lines(process, out / "results.jsonl", 1)
    victims = worker_pids(process)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    assert "killed by SIGKILL" in stderr
    records = lines(out / "results.jsonl")
    assert sorted(r["output"] for r in records) == sorted(str(out / p.name) for p in ref.glob("*.png"))
    assert {r["status"] for r in records} <= {"ok", "skipped"}
    summary = json.loads(stdout)
    assert summary["workers"] == 2 and summary["startup_seconds"] > 0
    same_pixels(out, ref)


def test_ctrl_c_stops_every_worker_and_a_rerun_resumes(cli, tiny_checkpoint, reference, tmp_path):
    _, ref = reference
    count = 4 * COUNT  # the reference's photos and more: a loaded machine must not finish before the signal lands
    src, out = photos(tmp_path / "src", count), tmp_path / "out"
    process = start(src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST, "--devices", "cpu,cpu")
    wait_for_lines(process, out / "results.jsonl", 1)
    workers = worker_pids(process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    finished = [r for r in lines(out / "results.jsonl") if r["status"] == "ok"]
    assert finished and len(finished) < count
    for record in finished:
        Image.open(record["output"]).verify()  # whole files only
    with single_thread():
        result = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    again = {r["output"]: r["status"] for r in lines(out / "results.jsonl")}
    assert len(again) == count and all(again[r["output"]] == "skipped" for r in finished)
    same_pixels(out, ref)


def test_two_shards_interrupted_and_resumed_cover_every_item_once(cli, tiny_checkpoint, reference, tmp_path):
    src, ref = reference
    out = tmp_path / "out"
    shards = [start(src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST, "--shard", f"{k}/2") for k in (1, 2)]
    for k, process in enumerate(shards, start=1):  # the two run side by side: each shard has its own lock
        wait_for_lines(process, out / f"results-shard-{k}-of-2.jsonl", 1)
    for process in shards:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)
    before = {p.name: p.stat().st_ino for p in out.glob("*.png")}
    assert before
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1"}
    with single_thread():
        first = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST, "--shard", "auto", env=env)
        second = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST, "--shard", "2/2")
    assert first.exit_code == 0 and second.exit_code == 0, first.stderr + second.stderr
    assert {p.name: p.stat().st_ino for p in out.glob("*.png") if p.name in before} == before  # none redone
    one = {r["output"] for r in lines(out / "results-shard-1-of-2.jsonl")}
    two = {r["output"] for r in lines(out / "results-shard-2-of-2.jsonl")}
    assert not one & two and one | two == {str(out / p.name) for p in ref.glob("*.png")}
    report = cli("batch", "report", out, "--json")
    assert report.exit_code == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["items"] == COUNT and summary["failed"] == 0 and summary["done_twice"] == 0
    assert summary["ok"] + summary["skipped"] == COUNT
    assert {r["output"] for r in lines(out / "results.jsonl")} == one | two
    same_pixels(out, ref)


def test_the_shard_partition_is_stable_and_complete(tmp_path):
    from compactedit_cli.batch.plan import BatchItem
    from compactedit_cli.batch.shard import select

    out = tmp_path / "out"
    items = [BatchItem(source=tmp_path / f"{i}.png", instruction="x", output=out / f"{i}.png") for i in range(200)]
    parts = [select(items, out, (k, 4)) for k in range(1, 5)]
    assert sorted(i.key for part in parts for i in part) == sorted(i.key for i in items)
    assert all(30 < len(part) < 70 for part in parts)  # spread, not all on one shard
    reordered = [select(list(reversed(items)), out, (k, 4)) for k in range(1, 5)]
    assert [{i.key for i in p} for p in reordered] == [{i.key for i in p} for p in parts]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0"}, (1, 8)),
        ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (8, 8)),
        ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "4"}, (4, 4)),
    ],
)
def test_shard_auto_reads_slurm_and_its_index_base(environ, expected):
    assert options.shard("auto", environ) == expected


@pytest.mark.parametrize("value", ["0/2", "3/2", "1", "a/b", "auto"])
def test_bad_shards_are_usage_errors(value):
    with pytest.raises(UsageError):
        options.shard(value, {})


def test_devices_spelling():
    assert options.devices("0,1,3") == ["cuda:0", "cuda:1", "cuda:3"]
    assert options.devices("cpu,cpu") == ["cpu", "cpu"]
    assert options.devices("ALL") == "all"
    for bad in ("0,0", "tpu", "auto", ""):
        with pytest.raises(UsageError):
            options.devices(bad)


def test_conflicting_scale_flags_are_one_line_errors(cli, tmp_path):
    src = photos(tmp_path / "src", 1)
    for flags in (["--devices", "cpu", "--workers", "2"], ["--engine", "ray", "--devices", "cpu"], ["--shard", "9/2"]):
        result = cli("batch", src, "-i", "x", "-o", tmp_path / "out", *flags)
        assert result.exit_code == 2, (flags, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_steady_rate_leaves_out_start_up_a_late_worker_and_the_tail():
    from compactedit_cli.batch.run import BatchSummary, Finishes

    finishes = Finishes(begun=100.0)
    for when in (101, 102, 103, 104, 105, 106):  # up first: one item a second, done last
        finishes.add("early", when)
    for when in (103.5, 104.5, 105.5):  # loaded late; it runs out of work first
        finishes.add("late", when)
    summary = BatchSummary()
    finishes.measure(summary)
    # From 103.5 (the late worker's first item) to 105.5 (its last): 104, 105, 104.5 and 105.5, in 2 s.
    assert summary.steady_items_per_second == 2.0 and summary.startup_seconds == 3.5
    alone = Finishes(begun=0.0)
    alone.add("only", 2.0)
    summary = BatchSummary()
    alone.measure(summary)
    assert summary.steady_items_per_second is None and summary.startup_seconds == 2.0


def test_cpu_workers_share_the_cores_within_omp_num_threads(monkeypatch):
    from compactedit_cli.batch.workers import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert (cpu_threads(1, cores=8), cpu_threads(3, cores=8), cpu_threads(4, cores=2)) == (8, 2, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert (cpu_threads(1, cores=8), cpu_threads(8, cores=8)) == (2, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: ignored, as torch ignores it
    assert cpu_threads(1, cores=8) == 8


def test_cpu_workers_threads_sleep_while_waiting_unless_the_user_says_otherwise(monkeypatch):
    from compactedit_cli.batch.workers import cpu_worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cpu_worker_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cpu_worker_env() == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_scale_bench_reports_steady_rates_as_json(tiny_checkpoint, tmp_path):
    """One run of one worker, so it stays cheap; the rates are the run's own summary."""
    report = tmp_path / "scale.json"
    command = [sys.executable, "scripts/scale_bench.py", "--engines", "local", "--workers", "1", "--no-one-thread"]
    command += ["--images", "3", "--size", "32", "--steps", "1", "--model", str(tiny_checkpoint), "--repeats", "1"]
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([*command, "--json", str(report)], capture_output=True, text=True, cwd=root, env=env)
    assert done.returncode == 0, done.stderr
    written = json.loads(report.read_text())
    assert json.loads(done.stdout) == written
    (run,) = written["runs"]["local-1"]
    assert run["ok"] == 3 and run["steady_items_per_second"] > 0 and run["startup_seconds"] > 0
    assert written["min_steady_seconds_per_item"] == {"local-1": 1 / run["steady_items_per_second"]}
    assert written["ratios"] == {}  # nothing to compare it with
