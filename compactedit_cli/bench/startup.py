"""The fixed cost of one ``compactedit`` process before any pixel work: start, imports, a tiny load, a tiny edit.

Each probe runs in a fresh interpreter, so nothing is warm that a user's new process would not have warm either.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import CompactEditError
from .measure import summarise

_LOAD_TINY = (
    "from compactedit_cli.engine.pipeline import EditPipeline; pipe = EditPipeline.from_pretrained({folder!r}, 'cpu')"
)
STARTUP_PROBES = {
    "interpreter": "pass",
    "import_cli": "import compactedit_cli.cli",
    "import_torch": "import torch",
    "import_pipeline": "import compactedit_cli.engine.pipeline",
    "load_tiny": _LOAD_TINY,
    "tiny_edit": _LOAD_TINY + "; from PIL import Image; pipe(Image.new('RGB', (64, 64)), 'x', num_inference_steps=1)",
}
"""Probe name -> the Python code it runs; ``{folder}`` is the tiny checkpoint's folder."""


def startup_overhead(repeats: int = 5) -> dict[str, Any]:
    """Wall seconds of fresh processes that start, import, load the tiny model and edit: the fixed cost per edit.

    Each probe runs ``repeats`` times in a new interpreter (``sys.executable``, offline); min / median / max per probe.
    The machine is described as a benchmark describes it (``versions``, ``device``: the CPU), read before the probes.
    """
    from ..environment import environment_report
    from ..random_weights.tiny import build_tiny_checkpoint

    environment = environment_report("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(build_tiny_checkpoint(Path(tmp) / "tiny"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        probes = {}
        for name, code in STARTUP_PROBES.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", code.format(folder=folder)], check=True, env=env)
                times.append(time.perf_counter() - start)
            probes[name] = summarise(times)
    return {"python": sys.executable, "repeats": repeats, **environment, "probes": probes}


# ---- bench --cold: one fresh process, timed by stage ------------------------------------------------------------

COLD_SCHEMA = "compactedit.bench.cold/1"
COLD_STAGES = ("imports", "resolve", "load", "setup", "edit", "save")
"""What a fresh ``compactedit edit`` process spends its time on, in order (the ``--json`` report's ``stages``)."""


def cold_start(
    model: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    offload: str = "none",
    compile: str | bool = "off",
    cuda_graphs: bool = False,
    resolution: int = 1024,
    steps: int = 20,
    repeats: int = 1,
) -> dict[str, Any]:
    """Time ``repeats`` fresh processes that each resolve, load, edit once and save, stage by stage.

    Stages (seconds, median over the processes): ``imports`` (torch and the engine), ``resolve`` (find the
    checkpoint and verify its files), ``load``, ``setup`` (a one-step warm-up edit of the same size: the first-edit
    set-up a cold process pays, such as kernel selection, allocator growth and, with ``compile``, compiling), the
    ``edit`` itself and the ``save`` (an atomic PNG with metadata). ``total`` is their sum; ``process`` is the
    wall time of the whole child process as seen from outside (it adds interpreter start and exit). With
    ``compile``, ``compile_cache`` counts inductor's graph-cache hits and misses in the last process.
    """
    import json

    from ..environment import environment_report

    spec = {
        "model": model,
        "revision": revision,
        "device": device,
        "dtype": dtype,
        "offline": offline,
        "offload": offload,
        "compile": compile,
        "cuda_graphs": cuda_graphs,
        "resolution": resolution,
        "steps": steps,
    }
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(repeats):
            report = Path(tmp) / f"cold-{index}.json"
            start = time.perf_counter()
            child = subprocess.run(
                [sys.executable, "-m", "compactedit_cli.bench.startup", json.dumps(spec), str(report)],
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - start
            if child.returncode != 0 or not report.is_file():
                raise _child_error(child.stderr, child.returncode)
            runs.append({**json.loads(report.read_text(encoding="utf-8")), "process": wall})
    last = runs[-1]
    stages = {name: statistics.median(run["stages"][name] for run in runs) for name in COLD_STAGES}
    return {
        "schema": COLD_SCHEMA,
        "options": spec,
        "model": last["model"],
        "model_size": last["model_size"],
        "repeats": repeats,
        "stages": stages,
        "total": sum(stages.values()),
        "process": statistics.median(run["process"] for run in runs),
        "compile_cache": last["compile_cache"],
        "notes": last["notes"],
        "runs": runs,
        **environment_report(last["device"]),
    }


def _child_error(stderr: str, code: int) -> CompactEditError:
    """The child's own one-line error (its last line) with the child's exit code, so bench exits as edit would."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1].removeprefix("error: ") if lines else f"exit code {code}"
    error = CompactEditError(f"the cold-start process failed: {last}")
    error.exit_code = code
    return error


def _cold_child(spec: dict[str, Any], report: Path) -> None:
    """The measured process: everything below runs once, in the order a fresh ``compactedit edit`` runs it."""
    import json

    clock = time.perf_counter
    stages: dict[str, float] = {}
    start = clock()
    import torch

    from ..engine.devices import resolve_device, resolve_dtype
    from ..engine.pipeline import EditPipeline
    from ..files.outputs import save
    from ..loading.hub import is_offline, parse_model, resolve
    from ..options import OutputOptions
    from .run import INSTRUCTION, _source_image

    stages["imports"] = clock() - start
    image = _source_image(spec["resolution"])
    device = resolve_device(spec["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def mark(name: str, began: float) -> float:
        sync()
        now = clock()
        stages[name] = now - began
        return now

    began = clock()
    resolved = resolve(parse_model(spec["model"], spec["revision"]), offline=is_offline(spec["offline"]))
    began = mark("resolve", began)
    pipe = EditPipeline.from_pretrained(
        resolved.path,
        device=device,
        dtype=resolve_dtype(spec["dtype"], device),
        name=resolved.label(),
        offload=spec["offload"],
        compile=spec["compile"],
        cuda_graphs=spec["cuda_graphs"],
    )
    began = mark("load", began)
    pipe(image, INSTRUCTION, num_inference_steps=1)
    began = mark("setup", began)
    result = pipe(image, INSTRUCTION, num_inference_steps=spec["steps"])
    began = mark("edit", began)
    save(result.images[0], result.parameters, report.with_suffix(".png"), OutputOptions(overwrite=True))
    mark("save", began)
    cache = None
    if pipe.speed.compiled:
        from torch._dynamo.utils import counters

        found = {**counters["inductor"], **counters["aot_autograd"]}
        keys = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss")
        cache = {key: int(found.get(key, 0)) for key in keys}
    elif pipe.speed.aot_packages is not None:  # compile = "aot": packages this process built, not loaded
        cache = {"aot_packages_built": pipe.speed.aot_packages.built}
    height, width = pipe.model_size(image.size)
    body = {
        "stages": stages,
        "model": resolved.label(),
        "model_size": {"width": width, "height": height},
        "device": str(device),
        "compile_cache": cache,
        "notes": list(pipe.speed.notes),
        "dynamo_imported": "torch._dynamo" in sys.modules,
    }
    report.write_text(json.dumps(body), encoding="utf-8")


if __name__ == "__main__":
    import json

    try:
        _cold_child(json.loads(sys.argv[1]), Path(sys.argv[2]))
    except CompactEditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
