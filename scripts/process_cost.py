"""Fresh ``compactedit`` processes of two source trees, interleaved: the wall time and the process's own CPU time
(user + sys, as ``/usr/bin/time`` gives them) of each (BENCHMARKS.md section 4d.1).

On a shared machine the wall time follows the load; the CPU time of a short process much less, and interleaving
the trees gives both the same load. Each ``--case`` is a ``compactedit`` command line, run in ``--cwd``.

    python scripts/process_cost.py --runs 8 --tree base=/tmp/base --tree new=. \\
        --case "edit nope.png x -o o.png" --case "edit in.png x -o existing.png"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_once(tree: str, args: list[str], cwd: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit code) of one fresh process on ``tree``'s code."""
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a fresh process would otherwise compile every module
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compactedit_cli", *args], env=env, cwd=cwd, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeat)")
    parser.add_argument("--case", action="append", required=True, help="a compactedit command line (repeat)")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--cwd", default=".")
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.tree)
    samples: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for _ in range(args.runs):
        for case in args.case:
            for name, path in trees.items():
                samples.setdefault((case, name), []).append(run_once(path, shlex.split(case), args.cwd))
    for (case, name), runs in samples.items():
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        row = {"case": case, "tree": name, "exit": sorted({r[2] for r in runs})}
        row |= {"wall_min_s": round(min(walls), 3), "wall_median_s": round(statistics.median(walls), 3)}
        row |= {"cpu_min_s": round(min(cpus), 3), "cpu_median_s": round(statistics.median(cpus), 3)}
        print(json.dumps(row))


if __name__ == "__main__":
    main()
