"""Issue 14's GPU figures: a guided batch on one device through the batch engine, in images an hour.

It builds the real architecture (Qwen3-VL-2B, the 1.6 B VIBE DiT, DC-AE f32c32) with random weights on the device
(no checkpoint on disk: the published layout's weights would take longer to write and read back than the run),
holds it in the library :class:`~compactedit_cli.editor.Editor`, and runs ``batch.run.run_batch``, the engine that
``compactedit batch`` runs on one device (decode ahead, compute, encode and write behind, ``results.jsonl``), over
noise photos of ``--resolution``². It writes ``OUT_DIR/batch.json``:

* ``images_per_hour``: the steady state's rate (``batch.run.Finishes``: after the first item, model build and
  warm-up excluded), times 3600;
* ``busy_fraction``: the device's busy share of the steady state, timed by CUDA events (``batch.pipelined``);
* ``startup_seconds``: building the model on the device plus the first item;
* the plain rate over the whole batch, start-up included, beside them.

    python scripts/batch_gpu.py --out OUT_DIR                         # on the GPU: 1024², guided, 20 steps
    python scripts/batch_gpu.py --device cpu --weights mid --resolution 64 --steps 2 --images 4 --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", choices=["full", "mid"], default="full", help="mid: a CPU-sized dry run")
    parser.add_argument("--resolution", type=int, default=1024, help="photo side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=24, help="photos in the batch")
    parser.add_argument("--batch-size", type=int, default=1, help="as batch --batch-size")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for batch.json")
    args = parser.parse_args(argv)
    begun = time.perf_counter()

    import numpy as np
    import torch
    from PIL import Image

    from compactedit_cli.batch.plan import items_from_folder
    from compactedit_cli.batch.results import ResultsLog
    from compactedit_cli.batch.run import run_batch
    from compactedit_cli.editor import Editor
    from compactedit_cli.environment import environment_report
    from compactedit_cli.loading.hub import ModelRef, ResolvedModel
    from compactedit_cli.options import EditOptions, ModelOptions, OutputOptions
    from compactedit_cli.random_weights.full import random_pipeline, real_configs, scaled_configs

    configs = real_configs() if args.weights == "full" else scaled_configs()
    pipe = random_pipeline(configs, device=args.device, name=f"random:{args.weights}")
    # The library Editor around a model built in memory (Editor() itself loads a checkpoint folder).
    editor = Editor.__new__(Editor)
    editor.options = ModelOptions(model=f"random-{args.weights}", device=args.device)
    editor.pipe, editor.notes = pipe, []
    editor.resolved = ResolvedModel(ModelRef(spec=f"random-{args.weights}"), Path(f"random-{args.weights}"), None)
    built = time.perf_counter() - begun

    with tempfile.TemporaryDirectory(prefix="batch-gpu-") as scratch:
        photos, out = Path(scratch) / "photos", Path(scratch) / "out"
        photos.mkdir()
        side = args.resolution
        for index in range(args.images):
            pixels = np.random.default_rng(index).integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(photos / f"p{index:04d}.png", compress_level=1)
        defaults = EditOptions(steps=args.steps)  # guided: the default 3-way CFG
        items = items_from_folder(photos, "make it winter", out, "png", defaults)
        out.mkdir()
        log = ResultsLog(out, "results.jsonl")
        started = time.perf_counter()
        summary = run_batch(
            editor, items, log, overwrite=False, batch_size=args.batch_size, output_options=OutputOptions()
        )
        log.close(final=summary.records)
        failed = [r["error"] for r in summary.records if r["status"] != "ok"]
    steady = summary.steady_items_per_second
    report = {
        "what": "guided batch on one device through batch.run.run_batch (issue 14)",
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
        "environment": environment_report(args.device),
        "images": len(items),
        "ok": summary.count("ok"),
        "errors": failed[:3],
        "images_per_hour": None if steady is None else round(steady * 3600),
        "steady_seconds_per_image": None if steady is None else round(1 / steady, 4),
        "busy_fraction": None if summary.busy_fraction is None else round(summary.busy_fraction, 4),
        "busy_clock": "CUDA events" if torch.device(args.device).type == "cuda" else "wall clock",
        "model_build_seconds": round(built, 2),
        "startup_seconds": None if summary.startup_seconds is None else round(built + summary.startup_seconds, 2),
        "images_per_hour_with_startup": round(len(items) / (time.perf_counter() - begun) * 3600),
        "editing_seconds": round(time.perf_counter() - started, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("images_per_hour", "busy_fraction", "startup_seconds", "ok")}))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
