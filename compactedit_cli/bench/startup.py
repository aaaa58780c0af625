"""The fixed cost of one ``compactedit`` process before any pixel work: start, imports, a tiny load, a tiny edit.

Each probe runs in a fresh interpreter, so nothing is warm that a user's new process would not have warm either.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
