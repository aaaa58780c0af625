"""Issue 13's GPU figures, through the real commands on a random-weights checkpoint folder (no download).

It writes the checkpoint (``scripts/random_checkpoint.py``, in its own process, so its memory is freed) to a
scratch folder, then times, each in fresh processes of the real CLI:

* ``cold_edit``: one ``compactedit edit`` of a ``--resolution``² photo, wall clock of the whole process (the
  checkpoint's files are in the page cache, having just been written), and ``bench --cold --repeats 2`` on the same
  folder for the per-stage split;
* ``server``: ``compactedit serve --detach`` on a private socket in a scratch runtime folder (its start, model load
  included), ``--calls`` edits through it one after another (client wall time per call; the first pays the
  server's first-edit set-up), then a loop of ``--loop`` edits of different photos through it;
* then stops the server (``serve stop``), so that ``batch`` has the device to itself;
* ``batch``: one ``compactedit batch --server never`` of the same photos (the local engine: its wall time includes
  the model load; its own ``--json`` summary gives the steady rate), whose outputs are compared with the loop's;

and writes ``OUT/server.json``. A SIGTERM (the caller's time limit) still stops the server; it also exits by itself
after two idle minutes.

    python scripts/server_bench.py --out OUT_DIR                  # on the GPU: full weights, 1024², 20 steps
    python scripts/server_bench.py --device cpu --weights mid --resolution 64 --steps 2 --loop 4 --out /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "compactedit_cli"]
INSTRUCTION = "make it winter"


def _run(command: list[str], env: dict[str, str], timeout: float = 900) -> tuple[float, str]:
    """Wall seconds and stdout of a command that must succeed (its stderr is passed through)."""
    begun = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    seconds = round(time.perf_counter() - begun, 3)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode} after {seconds} s: {' '.join(command)}")
    return seconds, done.stdout


def _summary(times: list[float]) -> dict[str, Any]:
    return {"seconds": times, "median": round(statistics.median(times), 3), "total": round(sum(times), 3)}


def _same_pixels(left: Path, right: Path) -> bool:
    from PIL import Image

    with Image.open(left) as a, Image.open(right) as b:
        return a.size == b.size and a.tobytes() == b.tobytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", choices=("full", "mid"), default="full", help="mid: a CPU-sized dry run")
    parser.add_argument("--resolution", type=int, default=1024, help="photo side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5, help="edits of one photo through the server")
    parser.add_argument("--loop", type=int, default=20, help="photos edited through the server, then by batch")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for server.json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # so `finally` stops the server

    import numpy as np
    from PIL import Image

    from compactedit_cli.environment import environment_report

    scratch = Path(tempfile.mkdtemp(prefix="srv-"))  # short: a Unix socket's path is at most 107 bytes
    runtime, photos, checkpoint = scratch / "run", scratch / "photos", scratch / "checkpoint"
    runtime.mkdir(mode=0o700)
    for folder in ("photos", "calls", "loop"):
        (scratch / folder).mkdir()
    socket = runtime / "serve.sock"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "COMPACTEDIT_SERVER": "never", "HF_HUB_OFFLINE": "1"}
    common = ["-m", str(checkpoint), "--steps", str(args.steps), "--offline"]
    device = ["--device", args.device]
    report: dict[str, Any] = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "instruction": INSTRUCTION},
        "environment": environment_report(args.device),
    }
    server_pid = None
    try:
        report["checkpoint_write_seconds"], _ = _run(
            [
                sys.executable,
                str(ROOT / "scripts" / "random_checkpoint.py"),
                str(checkpoint),
                "--weights",
                args.weights,
                *device,
            ],
            env,
        )
        side = args.resolution
        names = [f"p{index:04d}.png" for index in range(max(args.loop, 1))]
        for index, name in enumerate(names):
            pixels = np.random.default_rng(index).integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(photos / name, compress_level=1)
        photo = photos / names[0]

        cold = [*CLI, "edit", str(photo), INSTRUCTION, "-o", str(scratch / "cold.png"), *common]
        seconds, _ = _run([*cold, *device, "--server", "never"], env)
        _, stages = _run(
            [
                *CLI,
                "bench",
                "--cold",
                "--model",
                str(checkpoint),
                "--resolution",
                str(side),
                "--repeats",
                "2",
                "--steps",
                str(args.steps),
                *device,
                "--offline",
                "--json",
            ],
            env,
        )
        report["cold_edit"] = {"process_seconds": seconds, "bench_cold": json.loads(stages)}

        start, _ = _run(
            [
                *CLI,
                "serve",
                "-m",
                str(checkpoint),
                *device,
                "--socket",
                str(socket),
                "--detach",
                "--idle-timeout",
                "120",
                "--offline",
            ],
            env,
        )
        _, status = _run([*CLI, "serve", "status", "--socket", str(socket), "--json"], env)
        server_pid = json.loads(status)["pid"]
        through = ["--server", str(socket), *common]
        calls = [
            _run([*CLI, "edit", str(photo), INSTRUCTION, "-o", str(scratch / "calls" / f"{i}.png"), *through], env)[0]
            for i in range(args.calls)
        ]
        loop_dir = scratch / "loop"
        loop = [
            _run([*CLI, "edit", str(photos / name), INSTRUCTION, "-o", str(loop_dir / name), *through], env)[0]
            for name in names
        ]
        _, status = _run([*CLI, "serve", "status", "--socket", str(socket), "--json"], env)
        stop, _ = _run([*CLI, "serve", "stop", "--socket", str(socket)], env)
        server_pid = None  # stopped: the batch has the device to itself
        report["server"] = {
            "start_seconds": start,
            "calls": _summary(calls),
            "warm_call_median": round(statistics.median(calls[1:] or calls), 3),
            "loop": _summary(loop),
            "stop_seconds": stop,
            "status_after": json.loads(status),
        }

        batch_dir = scratch / "batch"
        seconds, summary = _run(
            [
                *CLI,
                "batch",
                str(photos),
                "-i",
                INSTRUCTION,
                "-o",
                str(batch_dir),
                *common,
                *device,
                "--server",
                "never",
                "--json",
            ],
            env,
        )
        report["batch"] = {"process_seconds": seconds, "summary": json.loads(summary)}
        steady = report["batch"]["summary"].get("steady_items_per_second")
        same = sum(_same_pixels(loop_dir / name, batch_dir / name) for name in names)
        report["loop_vs_batch"] = {
            # The target's ratio: the loop's client wall time over the batch process's (model load included).
            "loop_over_batch_process": round(report["server"]["loop"]["total"] / seconds, 3),
            # Per item, steady state against steady state (the batch's load and first item left out).
            "loop_median_over_batch_steady": round(report["server"]["loop"]["median"] * steady, 3) if steady else None,
            "same_pixels": f"{same}/{len(names)}",
        }
    finally:
        if server_pid is not None:
            stopped = subprocess.run([*CLI, "serve", "stop", "--socket", str(socket)], env=env, check=False)
            if stopped.returncode != 0:
                os.kill(server_pid, signal.SIGTERM)
        shutil.rmtree(scratch, ignore_errors=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "server.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({key: report[key] for key in ("cold_edit", "server", "batch", "loop_vs_batch")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
