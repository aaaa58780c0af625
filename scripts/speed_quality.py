"""What the round-2 speed paths cost in numbers: one edit's final latents and decoded image against the plain bf16 run.

For each path that can run here (``--kernels triton``; ``--quantize fp8``; both), on random full-size weights (or
``mid`` for a CPU dry run), it runs the same edit (same photo, seed and steps) and writes ``speed_quality.json`` to
OUT_DIR: per path the relative error of the final latents (‖a − b‖ / ‖b‖) and the PSNR of the decoded image against
the plain run's, in dB over [-1, 1] pixels. A path that cannot run here records why; where FP8 cannot run,
``fp8-emulated`` is the same rounding in float32 (:func:`~compactedit_cli.speed.quantize.fake_quantized_linear`).
Random weights make the absolute errors a stress test, not a quality verdict: with trained weights they need
measuring again.

GPU: ``python scripts/speed_quality.py --out $OUT`` (gpu_bench.sh runs it).
CPU dry run: ``TRITON_INTERPRET=1 python scripts/speed_quality.py --device cpu --weights mid --resolution 64
--steps 2 --out /tmp/q``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from compactedit_cli.errors import UsageError
from compactedit_cli.random_weights.full import random_pipeline, real_configs, scaled_configs
from compactedit_cli.speed.quantize import quantize_linears

PROMPT = "make the sky blue"


def _edit(pipe, photo: Image.Image, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    latents = pipe(photo, PROMPT, num_inference_steps=steps, seed=0, output_type="latent").latents
    with torch.no_grad():
        return latents.float(), pipe.decode(latents).float()


def _compare(run: tuple[torch.Tensor, torch.Tensor], plain: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    (latents, pixels), (plain_latents, plain_pixels) = run, plain
    mse = torch.mean((pixels.clamp(-1, 1) - plain_pixels.clamp(-1, 1)) ** 2).item()
    return {
        "latents_relative_error": ((latents - plain_latents).norm() / plain_latents.norm()).item(),
        "image_psnr_db": math.inf if mse == 0 else 10 * math.log10(4.0 / mse),  # peak-to-peak 2 over [-1, 1]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", choices=("full", "mid"), default="full")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = real_configs() if args.weights == "full" else scaled_configs()
    pipe = random_pipeline(configs, device=device, dtype=dtype, name=f"random:{args.weights}")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8))

    plain = _edit(pipe, photo, args.steps)
    paths: dict[str, Any] = {}

    def measure(name: str, kernels: bool) -> None:
        if kernels and not pipe.speed.kernels_active:
            paths[name] = {"skipped": pipe.speed.notes[-1]}
            return
        paths[name] = _compare(_edit(pipe, photo, args.steps), plain)
        print(name, paths[name], flush=True)

    pipe.speed.set_kernels("triton", warn=False)
    measure("kernels", True)
    pipe.speed.set_kernels("off")
    try:
        pipe.speed.quantize("fp8")  # for good: the runs after this one are FP8 too
    except UsageError as exc:
        paths["fp8"] = paths["fp8+kernels"] = {"skipped": str(exc)}
        quantize_linears(pipe.transformer.transformer_blocks)  # off CUDA each layer runs the float32 emulation
        measure("fp8-emulated", False)
    else:
        measure("fp8", False)
        pipe.speed.set_kernels("triton", warn=False)
        measure("fp8+kernels", True)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": args.weights,
        "resolution": args.resolution,
        "steps": args.steps,
        "against": "the plain path (kernels off, no quantisation), same photo, seed and steps",
        "paths": paths,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed_quality.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
