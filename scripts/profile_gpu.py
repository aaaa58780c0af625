"""Where a full-size edit's time goes, per stage: FLOPs, achieved rate, top kernels, and what the speed options change.

A developer tool that `gpu_bench.sh` runs after the benchmarks, so that one lease of a GPU also says *why* the numbers
are what they are. For one square size (default 2048²) on random full-size weights it writes to OUT_DIR:

- ``profile.json``: per stage (VLM encode, VAE encode, one 3-way-CFG denoise step, VAE decode) the median time, the
  FLOPs counted by ``torch.utils.flop_counter`` and so the achieved TFLOP/s, and the stage's peak allocated memory;
  the denoise step and the VAE with the fast path off (diffusers' plain forward and norms) for a before/after; the
  VAE in ``channels_last`` for a before/after (time, peak, largest difference from the default layout); the stages again
  with ``torch.backends.cudnn.benchmark`` on; one block's GLUMBConv feed-forward as cuDNN 1×1 convolutions (as
  diffusers runs it) against the same weights as token-layout matrix products;
- ``kernels.txt``: ``torch.profiler``'s top kernels of each stage, by self device time.

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
import torch.nn.functional as F
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from compactedit_cli.fullsize import random_pipeline, real_configs, scaled_configs
from compactedit_cli.guidance import Guidance
from compactedit_cli.measure import DeviceClock
from compactedit_cli.pipeline import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE

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


def feed_forward_as_linear(ff: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GLUMBConv with its 1×1 convolutions as matrix products over (B, H·W, C) tokens; same weights, same maths."""
    batch, _, height, width = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
    hidden = F.silu(F.linear(tokens, ff.conv_inverted.weight.flatten(1), ff.conv_inverted.bias))
    hidden = ff.conv_depth(hidden.view(batch, height, width, -1).permute(0, 3, 1, 2))
    hidden, gate = hidden.chunk(2, dim=1)
    hidden = (hidden * F.silu(gate)).permute(0, 2, 3, 1).reshape(batch, height * width, -1)
    out = F.linear(hidden, ff.conv_point.weight.flatten(1))
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", choices=("full", "mid"), default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    configs = real_configs() if args.weights == "full" else scaled_configs()
    pipe = random_pipeline(configs, device=device)
    edge = args.resolution
    pixels = np.random.default_rng(0).integers(0, 256, (edge, edge, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    height, width = pipe.model_size((edge, edge))
    guidance = Guidance(DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE)
    conditioning = pipe.encode_prompt([image], [INSTRUCTION])
    image_latents = pipe.encode_image([image], height, width)
    noise = pipe.initial_noise(1, height, width, 0)

    def step() -> torch.Tensor:
        return pipe.denoise(noise, image_latents, conditioning.cond, conditioning.null, guidance, 1)

    latents = step()
    stages: dict[str, Callable[[], Any]] = {
        "vlm_encode": lambda: pipe.encode_prompt([image], [INSTRUCTION]),
        "vae_encode": lambda: pipe.encode_image([image], height, width),
        "denoise_step": step,
        "vae_decode": lambda: pipe.decode(latents),
    }
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
    pipe.set_fast_path(False)
    report["plain_path"] = {}
    for name in ("denoise_step", "vae_encode", "vae_decode"):
        seconds, peak, _ = timed(device, stages[name], args.repeats)
        report["plain_path"][name] = {"seconds": seconds, "peak_allocated_gib": None if peak is None else peak / 2**30}
        print(f"{name}, fast path off: {seconds * 1e3:.1f} ms, peak {report['plain_path'][name]['peak_allocated_gib']}")
    pipe.set_fast_path(True)

    reference = pipe.decode(latents).float()
    pipe.vae.to(memory_format=torch.channels_last)
    layout = {}
    for name in ("vae_encode", "vae_decode"):
        seconds, peak, _ = timed(device, stages[name], args.repeats)
        layout[name] = {"seconds": seconds, "peak_allocated_gib": None if peak is None else peak / 2**30}
        print(f"{name} channels_last: {seconds * 1e3:.1f} ms")
    layout["decode_max_abs_diff"] = (pipe.decode(latents).float() - reference).abs().max().item()
    report["vae_channels_last"] = layout
    torch.backends.cudnn.benchmark = True
    pipe.vae.to(memory_format=torch.contiguous_format)
    report["cudnn_benchmark_seconds"] = {}
    for name, work in stages.items():
        seconds, _, _ = timed(device, work, args.repeats)
        report["cudnn_benchmark_seconds"][name] = seconds
        print(f"{name} with cudnn.benchmark: {seconds * 1e3:.1f} ms")
    torch.backends.cudnn.benchmark = False

    ff = pipe.transformer.transformer_blocks[0].ff
    channels = ff.conv_inverted.in_channels
    rows, cols = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    tokens = torch.randn(3, rows * cols, channels, device=device, dtype=pipe.dtype)
    x = tokens.unflatten(1, (rows, cols)).permute(0, 3, 1, 2)  # the layout Sana's block hands its feed-forward
    with torch.inference_mode():
        conv_s, _, conv_out = timed(device, lambda: ff(x), args.repeats * 10)
        linear_s, _, linear_out = timed(device, lambda: feed_forward_as_linear(ff, x), args.repeats * 10)
    report["feed_forward_block"] = {
        "conv_seconds": conv_s,
        "linear_seconds": linear_s,
        "max_abs_diff": (conv_out.float() - linear_out.float()).abs().max().item(),
    }
    print(f"one feed-forward: conv {conv_s * 1e3:.2f} ms, linear {linear_s * 1e3:.2f} ms")
    (args.out / "profile.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
