"""``--engine ray`` on a local Ray cluster (2 CPUs, no dashboard), in a real CLI process: the same outputs (±1),
results and resume as the local engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo, single_thread
from PIL import Image

pytest.importorskip("ray")

FAST = ["--steps", "1", "--device", "cpu"]
_MAIN = (
    "import ray, runpy; ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False); "
    "runpy.run_module('compactedit_cli', run_name='__main__')"
)


def test_ray_engine_matches_the_local_engine_and_resumes(cli, tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    for index in range(3):
        make_photo(src / f"p{index}.png", (48 + 16 * index, 48), seed=index)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    local = tmp_path / "local"
    with single_thread():
        assert cli("batch", src, "-i", "x", "-o", local, "-m", tiny_checkpoint, *FAST).exit_code == 1
    out = tmp_path / "ray"
    make_photo(out / "p0.png", (48, 48), seed=0)  # done already: skipped, as locally
    # A 2-CPU local cluster started in the CLI's process (ray.init first); the engine runs on it.
    command = [sys.executable, "-c", _MAIN, "batch", str(src), "-i", "x", "-o", str(out), "-m", str(tiny_checkpoint)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([*command, *FAST, "--engine", "ray", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stderr  # the broken image fails alone
    summary = json.loads(done.stdout)
    assert (summary["engine"], summary["ok"], summary["skipped"], summary["failed"]) == ("ray", 2, 1, 1)
    ours = {r["output"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    theirs = {r["output"]: r for r in map(json.loads, (local / "results.jsonl").read_text().splitlines())}
    assert ours[str(out / "p0.png")]["status"] == "skipped"
    for name in ("p1.png", "p2.png"):
        mine, reference = ours[str(out / name)], theirs[str(local / name)]
        assert {k: v for k, v in mine.items() if k not in ("output", "seconds")} == {
            k: v for k, v in reference.items() if k not in ("output", "seconds")
        }
        a = np.asarray(Image.open(out / name).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(local / name).convert("RGB"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name
        assert Image.open(out / name).text == Image.open(local / name).text  # the same metadata
    assert ours[str(out / "broken.png")]["status"] == "failed"


def test_a_ray_actor_killed_mid_item_is_retried_or_recorded(tiny_checkpoint, tmp_path):
    """kill -9 of the editing actor's process: Ray restarts it and retries its batch, or the item is failed; the
    run finishes with one results line per item and no partial file."""
    import time

    import psutil

    src = tmp_path / "src"
    for index in range(2):
        make_photo(src / f"p{index}.png", (48, 48), seed=index)
    out = tmp_path / "out"
    # The plain CLI: the engine starts a local cluster for the run and shuts it down before printing its summary,
    # so whatever Ray reports of the dead actor (its retry, on the driver) goes to stderr, never after the JSON.
    command = [sys.executable, "-m", "compactedit_cli", "batch", str(src), "-i", "x", "-o", str(out)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.Popen(
        [*command, "-m", str(tiny_checkpoint), "--steps", "1000", "--device", "cpu", "--engine", "ray", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    killed = None
    seen: dict[str, float] = {}  # each actor-like process title and its age when last seen, for the failure message
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and run.poll() is None:
        for process in psutil.Process(run.pid).children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if "ray::" in title:
                seen[title[:80]] = round(time.time() - process.create_time(), 1)
            if "MapWorker" in title or "_EditActor" in title:
                if time.time() - process.create_time() > 8:  # loaded and editing
                    process.kill()
                    killed = title
                break
        time.sleep(0.2)
    stdout, stderr = run.communicate(timeout=300)
    assert killed is not None, f"no editing actor was found to kill (Ray processes seen: {seen}):\n{stderr}"
    assert run.returncode in (0, 1), stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(line["output"] for line in lines) == [str(out / "p0.png"), str(out / "p1.png")]
    for line in lines:
        assert line["status"] in ("ok", "failed"), line
        if line["status"] == "ok":
            assert Image.open(line["output"]).size == (48, 48)
        else:
            assert not Path(line["output"]).exists()
    from compactedit_cli.files.imaging import TEMP_SUFFIX

    assert [p.name for p in out.iterdir() if p.name.endswith(TEMP_SUFFIX)] == []  # no partial file left
    summary = json.loads(stdout)  # one JSON document: nothing of Ray's on stdout
    assert summary["engine"] == "ray", stdout
