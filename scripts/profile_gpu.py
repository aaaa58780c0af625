"""Where a full-size edit's time goes, per stage: FLOPs, achieved rate, top kernels, and what the speed options change.

A developer tool that `gpu_bench.sh` runs after the benchmarks, so that one lease of a GPU also says *why* the numbers
are what they are. For one square size (default 2048²) on random full-size weights it writes to OUT_DIR:

- ``profile.json``: per stage (VLM encode, VAE encode, one 3-way-CFG denoise step, VAE decode) the median time, the
  FLOPs counted by ``torch.utils.flop_counter`` and so the achieved TFLOP/s, and the stage's peak allocated memory;
  the denoise step and the VAE with the fast path off (diffusers' plain forward, norms, feed-forward and layout) for
  a before/after; and before/afters of the choices built in from the start (``built_in``, at a second size): the
  pipeline's dtype (bf16 on CUDA) against float32 for a denoise step, the guidance branches as one batch against
  one forward each, the VLM once against once per branch, and the 20-step loop without against with a device sync
  per step;
- ``kernels.txt``: ``torch.profiler``'s top kernels of each stage, by self device time;
- with ``--vae-compile`` instead, only ``vae-compile.json``: the VAE decode eager against a compiled decoder;
- with ``--vae-kernels`` instead, only ``vae-kernels.json``: the VAE encode and decode with the plain ops against
  ``--kernels triton`` (the DC-AE's fused linear attention, gated depthwise convolution and norm + residual).

The experiments of the first H200 lease (VAE ``channels_last``, ``cudnn.benchmark``, the feed-forward as matrix
products) are in BENCHMARKS.md; the two that paid are now part of the fast path, so its before/after includes them.

CPU dry run: ``python scripts/profile_gpu.py --device cpu --weights mid --resolution 256 --out /tmp/p``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from compactedit_cli.bench.measure import DeviceClock
from compactedit_cli.engine.guidance import Guidance
from compactedit_cli.engine.pipeline import StepState
from compactedit_cli.options import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS
from compactedit_cli.random_weights.full import random_pipeline, real_configs, scaled_configs

INSTRUCTION = "make the sky a deep sunset orange and add a red kite"


def timed(device: torch.device, work: Callable[[], Any], repeats: int) -> tuple[float, int | None, Any]:
    """Median seconds of ``repeats`` runs after one warm-up, the peak allocated bytes, and the last result."""
    out = work()
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = DeviceClock(device)
    for _ in range(repeats):
        start = clock.now()
        out = work()
        seconds.append(clock.now() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return statistics.median(seconds), peak, out


def flops(work: Callable[[], Any]) -> int | None:
    """FLOPs of one run; ``None`` where the counter cannot count an operator (it rejects grouped-query SDPA)."""
    try:
        with FlopCounterMode(display=False) as counter:
            work()
    except (AssertionError, NotImplementedError, RuntimeError):
        return None
    return counter.get_total_flops()


def kernel_table(device: torch.device, work: Callable[[], Any]) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        work()
        DeviceClock(device).now()  # drain the device inside the profiled region
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)


def stage_calls(pipe, edge: int) -> tuple[dict[str, Callable[[], Any]], Callable[..., torch.Tensor]]:
    """The four stages of an edge² edit as calls on fixed inputs, and its loop as ``denoise(steps, callback)``."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (edge, edge, 3), dtype=np.uint8))
    height, width = pipe.model_size((edge, edge))
    guidance = Guidance(DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE)
    conditioning = pipe.encode_prompt([image], [INSTRUCTION])
    image_latents = pipe.encode_image([image], height, width)
    noise = pipe.initial_noise(1, height, width, 0)

    def denoise(steps: int, callback: Callable[[StepState], None] | None = None) -> torch.Tensor:
        return pipe.denoise(noise, image_latents, conditioning.cond, conditioning.null, guidance, steps, callback)

    latents = denoise(1)
    stages = {
        "vlm_encode": lambda: pipe.encode_prompt([image], [INSTRUCTION]),
        "vae_encode": lambda: pipe.encode_image([image], height, width),
        "denoise_step": lambda: denoise(1),
        "vae_decode": lambda: pipe.decode(latents),
    }
    return stages, denoise


def built_in(pipe, device: torch.device, edge: int, repeats: int) -> dict[str, Any]:
    """Before/afters (seconds, medians) of the choices built in from the start, each as [built in, alternative]."""
    stages, denoise = stage_calls(pipe, edge)
    report: dict[str, Any] = {"size": edge}
    usual, _, _ = timed(device, stages["denoise_step"], repeats)
    pipe.transformer.to(torch.float32)  # the loop follows the transformer's dtype
    fp32, _, _ = timed(device, stages["denoise_step"], repeats)
    pipe.transformer.to(pipe.dtype)
    report[f"denoise_step_{str(pipe.dtype).removeprefix('torch.')}_vs_float32"] = [usual, fp32]

    seen: list[StepState] = []
    denoise(1, seen.append)
    x, t = seen[0].model_input, seen[0].model_timestep
    forward = pipe.transformer.forward_projected
    with torch.inference_mode():
        keys, values = pipe.transformer.context_keys_values(pipe.transformer.project_context(seen[0].context))
        batched, _, _ = timed(device, lambda: forward(x, (keys, values), t), repeats)
        rows = range(x.shape[0])
        one_each, _, _ = timed(
            device,
            lambda: [forward(x[i : i + 1], (keys[:, i : i + 1], values[:, i : i + 1]), t[i : i + 1]) for i in rows],
            repeats,
        )
    report["denoise_step_batched_vs_one_forward_per_branch"] = [batched, one_each]

    once, _, _ = timed(device, stages["vlm_encode"], repeats)
    per_branch, _, _ = timed(device, lambda: [stages["vlm_encode"]() for _ in range(x.shape[0])], repeats)
    report["vlm_once_vs_per_branch"] = [once, per_branch]

    sync = DeviceClock(device).now  # a clock read synchronises the device
    free, _, _ = timed(device, lambda: denoise(DEFAULT_STEPS), 1)
    synced, _, _ = timed(device, lambda: denoise(DEFAULT_STEPS, lambda _state: sync()), 1)
    report[f"denoise_{DEFAULT_STEPS}_steps_no_sync_vs_sync_per_step"] = [free, synced]
    for name, value in report.items():
        if isinstance(value, list):
            print(f"{edge}² {name}: {value[0] * 1e3:.1f} ms against {value[1] * 1e3:.1f} ms")
    return report


def vae_decoder_compiled(pipe, device: torch.device, edge: int, repeats: int) -> dict[str, Any]:
    """VAE decode at edge², eager against the decoder under ``torch.compile``: the measurement behind its staying eager.

    Its own run (``--vae-compile``), since compiling the DC-AE decoder takes a while; the first compiled decode's
    extra time is reported apart.
    """
    stages, _ = stage_calls(pipe, edge)
    decode = stages["vae_decode"]
    eager, eager_peak, reference = timed(device, decode, repeats)
    clock = DeviceClock(device)
    pipe.vae.decoder.compile()
    start = clock.now()
    decode()
    first = clock.now() - start
    compiled, compiled_peak, out = timed(device, decode, repeats)
    report = {
        "size": edge,
        "decode_eager_s": eager,
        "decode_compiled_s": compiled,
        "first_compiled_decode_s": first,
        "peak_allocated_gib": [None if p is None else p / 2**30 for p in (eager_peak, compiled_peak)],
        "max_abs_diff": (out.float() - reference.float()).abs().max().item(),
    }
    print(json.dumps(report, indent=2))
    return report


def vae_kernels(pipe, device: torch.device, edge: int, repeats: int) -> dict[str, Any]:
    """VAE encode and decode at edge² (medians, peaks), the plain ops against the fused Triton kernels, and the
    largest difference of each output; ``kernels`` is the speed plan's account (it says so where Triton is missing)."""
    stages, _ = stage_calls(pipe, edge)
    report: dict[str, Any] = {"size": edge}
    outputs: dict[str, list[torch.Tensor]] = {}
    for mode in ("off", "triton"):
        account = pipe.speed.set_kernels(mode, warn=False)
        if mode == "triton":
            report["kernels"] = account
        for name in ("vae_encode", "vae_decode"):
            with torch.inference_mode():
                seconds, peak, out = timed(device, stages[name], repeats)
            report[f"{name}_{mode}_s"] = seconds
            report[f"{name}_{mode}_peak_allocated_gib"] = None if peak is None else peak / 2**30
            outputs.setdefault(name, []).append(out)
    report["vae_tiled"] = pipe.speed.vae_tiled
    for name, (plain, fused) in outputs.items():
        report[f"{name}_max_abs_diff"] = (fused.float() - plain.float()).abs().max().item()
    print(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", choices=("full", "mid"), default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--built-in-resolution", type=int, default=1024, help="size of the built-in before/afters")
    parser.add_argument("--vae-compile", action="store_true", help="only time the compiled VAE decoder (its own run)")
    parser.add_argument("--vae-kernels", action="store_true", help="only time the VAE with the Triton kernels off/on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    configs = real_configs() if args.weights == "full" else scaled_configs()
    pipe = random_pipeline(configs, device=device)
    if args.vae_compile:
        report = vae_decoder_compiled(pipe, device, args.resolution, args.repeats)
        (args.out / "vae-compile.json").write_text(json.dumps(report, indent=2))
        return
    if args.vae_kernels:
        report = vae_kernels(pipe, device, args.resolution, args.repeats)
        (args.out / "vae-kernels.json").write_text(json.dumps(report, indent=2))
        return
    stages, _ = stage_calls(pipe, args.resolution)
    height, width = pipe.model_size((args.resolution, args.resolution))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "size": [height, width],
        "dtype": str(pipe.dtype),
        "weights": args.weights,
        "stages": {},
    }
    tables = []
    for name, work in stages.items():
        seconds, peak, _ = timed(device, work, args.repeats)
        count = flops(work)
        rate = None if count is None else count / seconds / 1e12
        report["stages"][name] = {
            "seconds": seconds,
            "flops": count,
            "tflops_per_s": rate,
            "peak_allocated_gib": None if peak is None else peak / 2**30,
        }
        tables.append(f"== {name} ({height}x{width})\n{kernel_table(device, work)}")
        counted = "FLOPs not countable" if rate is None else f"{count / 1e12:8.2f} TFLOP  {rate:7.1f} TFLOP/s"
        print(f"{name:13s} {seconds * 1e3:9.1f} ms  {counted}")

    (args.out / "kernels.txt").write_text("\n\n".join(tables))

    report["built_in"] = built_in(pipe, device, args.built_in_resolution, args.repeats)
    (args.out / "profile.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
