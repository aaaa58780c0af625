"""Issue 14's CPU scaling targets, measured in the steady state: local workers against one, and Ray against local.

Each run is a real ``compactedit batch --json`` process over noise photos with a random checkpoint, and the rate is
its summary's ``steady_items_per_second``: from the moment the last worker to get going finished its first item to
the moment the first to run out of work finished its last (``batch.run.Finishes``), so start-up (imports, spawning
workers or starting Ray, loading the model, the first item's warm-up), the workers' staggered starts and the tail do
not count. The start-up time and the whole process's wall time are reported beside it.

Fair comparisons on a CPU: ``local-1`` is one worker using every core (what a user gets), ``local-1-one-thread``
one worker held to one core (``OMP_NUM_THREADS=1``), the CPU's stand-in for one device, as each of two workers on
two cores gets one. Ray is compared with the local engine at the same number of workers.

The default model is a random checkpoint somewhat larger than the tests' tiny one (``--scale``), so an item is long
enough that compute, not per-item Python overhead, dominates. On a shared machine every figure is noisy: each
configuration runs ``--repeats`` times, and the report gives the minimum seconds per item (the least disturbed run)
and every run's figures.

    python scripts/scale_bench.py --json scale.json                  # local 1 and 2 workers, Ray 1 and 2 actors
    python scripts/scale_bench.py --engines local --images 48 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def build_checkpoint(folder: Path, scale: int) -> Path:
    """A random checkpoint in the published layout; ``scale`` widens and deepens the tests' tiny one."""
    from compactedit_cli.random_weights.tiny import TinySpec, build_tiny_checkpoint

    spec = TinySpec()
    if scale > 1:
        spec = dataclasses.replace(
            spec,
            vlm_hidden=spec.vlm_hidden * scale,
            dit_heads=spec.dit_heads * scale,
            dit_head_dim=spec.dit_head_dim * 2,
            dit_layers=spec.dit_layers * 2,
            caption_channels=spec.caption_channels * scale,
        )
    return build_tiny_checkpoint(folder, spec)


def make_photos(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{index:04d}.png")
    return folder


def run_once(
    checkpoint: Path, photos: Path, out: Path, engine: str, workers: int, steps: int, threads: int | None
) -> dict[str, Any]:
    """One ``compactedit batch`` process: its --json summary (steady rate, start-up) and its wall time."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "compactedit_cli", "batch", str(photos), "-i", "make it winter", "-o", str(out)]
    command += ["-m", str(checkpoint), "--steps", str(steps), "--device", "cpu", "--json", "--workers", str(workers)]
    if engine == "ray":
        command += ["--engine", "ray"]
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    begun = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - begun
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    rate = summary["steady_items_per_second"]
    return {
        "steady_seconds_per_item": 1 / rate if rate else None,
        "steady_items_per_second": rate,
        "startup_seconds": summary["startup_seconds"],
        "items_per_second_with_startup": summary["items_per_second"],
        "busy_fraction": summary["busy_fraction"],
        "process_seconds": round(wall, 3),
        "ok": summary["ok"],
    }


def least(values: Any) -> float | None:
    """The smallest of the values that were measured (None if none was)."""
    measured = [value for value in values if value is not None]
    return min(measured) if measured else None


def configurations(
    engines: list[str], workers: list[int], one_thread: bool = True
) -> list[tuple[str, str, int, int | None]]:
    """(name, engine, workers, OMP_NUM_THREADS cap): each engine at each count, and for the local engine one worker
    held to one thread too (one core: the CPU's stand-in for one device, as each of two workers gets one)."""
    chosen = []
    for engine in engines:
        for count in workers:
            chosen.append((f"{engine}-{count}", engine, count, None))
            if engine == "local" and count == 1 and one_thread:
                chosen.append(("local-1-one-thread", engine, 1, 1))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"], help="engines to run"
    )
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker (or actor) counts to run")
    parser.add_argument("--images", type=int, default=32, help="photos per run")
    parser.add_argument("--size", type=int, default=256, help="photo side in pixels")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per edit")
    parser.add_argument("--scale", type=int, default=2, help="model size: 1 is the tests' tiny checkpoint")
    parser.add_argument("--model", type=Path, help="a checkpoint folder to use instead of building one")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (the minimum is reported)")
    parser.add_argument(
        "--one-thread",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run one local worker held to one thread (the one-core baseline)",
    )
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    if "ray" in args.engines:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SystemExit("--engines ray needs Ray: pip install 'compactedit[ray]'") from None
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as scratch:
        root = Path(scratch)
        checkpoint = args.model or build_checkpoint(root / "checkpoint", args.scale)
        photos = make_photos(root / "photos", args.images, args.size)
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every configuration alike
            for name, engine, workers, threads in configurations(args.engines, args.workers, args.one_thread):
                result = run_once(checkpoint, photos, root / name, engine, workers, args.steps, threads)
                runs.setdefault(name, []).append(result)
                print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    best = {name: least(r["steady_seconds_per_item"] for r in results) for name, results in runs.items()}
    ratios: dict[str, float] = {}
    for name, engine, workers, _ in configurations(args.engines, args.workers, args.one_thread):
        if engine == "local" and workers > 1:
            for one in ("local-1", "local-1-one-thread"):
                if best.get(one) and best[name]:
                    ratios[f"{name} items/s over {one}"] = best[one] / best[name]
        if engine == "ray" and best.get(f"local-{workers}") and best[name]:
            ratios[f"{name} per-item cost over local-{workers}"] = best[name] / best[f"local-{workers}"] - 1
    report = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "model")},
            "model": str(args.model) if args.model else f"random, scale {args.scale}",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "min_steady_seconds_per_item": best,
        "ratios": ratios,
        "runs": runs,
    }
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
