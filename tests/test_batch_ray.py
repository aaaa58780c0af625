"""``--engine ray`` on a local Ray cluster (2 CPUs, no dashboard), in a real CLI process: the same outputs (±1),
results and resume as the local engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
