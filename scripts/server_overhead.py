"""What an ``edit`` through a running server costs beyond the edit's own compute (BENCHMARKS.md section 6).

Builds a tiny checkpoint (or takes ``--model``), starts ``compactedit serve`` on a private socket, and times fresh
``compactedit edit --server SOCKET`` processes end to end; the edit's own compute is the same edit in a warm
in-process Editor. Prints one JSON object: the medians, and the overhead (client wall minus compute).

    python scripts/server_overhead.py --runs 7 --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="512x384")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in the server and in-process alike")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="ce-bench-", dir="/tmp") as folder:
        root = Path(folder)
        model = args.model
        if model is None:
            from compactedit_cli.random_weights.tiny import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(root / "tiny"))
        photo = root / "in.png"
        noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(noise).save(photo)
        sock = root / "s.sock"
        command = [sys.executable, "-m", "compactedit_cli"]
        server = subprocess.Popen(
            [*command, "serve", "-m", model, "--device", args.device, "--socket", str(sock), "-q"], env=env
        )
        try:
            while not sock.exists():
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
            edit = [*command, "edit", str(photo), "make it winter", "-m", model, "--device", args.device]
            edit += ["--steps", str(args.steps), "--server", str(sock), "--overwrite", "-q", "-o"]
            walls = []
            for run in range(args.runs + 1):
                started = time.perf_counter()
                subprocess.run([*edit, str(root / "out.png")], env=env, check=True)
                if run:  # the first also warms the server's first-edit set-up
                    walls.append(time.perf_counter() - started)
        finally:
            server.terminate()
            server.wait(60)
        import torch

        from compactedit_cli.editor import Editor

        torch.set_num_threads(args.threads)

        editor = Editor(model, device=args.device, offline=True)
        computes = []
        for run in range(args.runs + 1):
            started = time.perf_counter()
            editor.edit(photo, "make it winter", root / "local.png", steps=args.steps, output_options=None)
            (root / "local.png").unlink()
            if run:
                computes.append(time.perf_counter() - started)
    wall, compute = statistics.median(walls), statistics.median(computes)
    print(
        json.dumps(
            {
                "runs": args.runs,
                "steps": args.steps,
                "size": args.size,
                "threads": args.threads,
                "client_wall_s": round(wall, 3),
                "in_process_edit_s": round(compute, 3),
                "overhead_s": round(wall - compute, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
