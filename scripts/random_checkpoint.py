"""Write a random-weights checkpoint folder in the published layout, for ``edit -m``, ``serve -m`` and ``bench --cold``.

``full`` is the real architecture (Qwen3-VL-2B, the 1.6 B VIBE DiT, DC-AE f32c32: about 8.6 GB in bf16), ``mid`` the
CPU-sized one (``scaled_configs()``). The weights are built on ``--device`` (a GPU builds the full model in seconds)
and saved in ``--dtype`` (bf16 by default, as the published weights are); the tokenizer is the tiny one. Prints the
folder and the seconds it took.

    python scripts/random_checkpoint.py /tmp/vibe-random --weights full --device cuda
    python scripts/random_checkpoint.py /tmp/vibe-mid --weights mid --device cpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="the checkpoint folder to write (created)")
    parser.add_argument("--weights", choices=("full", "mid"), default="full")
    parser.add_argument("--device", default="cuda", help="where the weights are built")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="the dtype on disk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    begun = time.perf_counter()

    import torch

    from compactedit_cli.options import torch_dtype_name
    from compactedit_cli.random_weights.full import real_configs, scaled_configs, write_random_checkpoint

    configs = real_configs() if args.weights == "full" else scaled_configs()
    dtype = getattr(torch, torch_dtype_name(args.dtype))
    folder = write_random_checkpoint(args.out_dir, configs, device=args.device, dtype=dtype, seed=args.seed)
    print(f"{folder} ({args.weights}, {args.dtype}, built on {args.device}) in {time.perf_counter() - begun:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
