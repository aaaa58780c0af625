"""``compactedit selftest``: does this install work? Offline, in seconds, before downloading ~10 GB."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from . import flags as opt
from .common import console, emit_json, handle_errors
from .flags import Device, Quiet, Verbose


def environment(device: str | None = None) -> dict[str, object]:
    """Versions and accelerator facts worth pasting into a bug report, one line each (the bench's report, flat)."""
    from ..engine.devices import resolve_device
    from ..environment import environment_report

    report = environment_report(resolve_device(device or "auto"))
    return {**report["versions"], **report["device"]}


@handle_errors
def selftest(
    device: Device = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Check the install: build a tiny random model and run a full edit through the same path as `edit`.

    Works offline. Exits non-zero if anything fails.
    """
    import numpy as np
    from PIL import Image

    from ..editor import Editor
    from ..files import metadata
    from ..random_weights.tiny import build_tiny_checkpoint

    report = environment(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compactedit-selftest-") as tmp:
        folder = Path(tmp)
        checkpoint = build_tiny_checkpoint(folder / "tiny-model")
        source = folder / "input.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(source)
        output = folder / "output.png"
        model = opt.model_options(str(checkpoint), None, device, None, True, None, False)
        [record] = Editor(model).edit(source, "make the sky blue", output, steps=2)
        with Image.open(output) as result:
            size_ok = result.size == (100, 75)
        recorded = metadata.read(output)
        checks = {
            "output written": output.is_file() and record.output == str(output),
            "output has the input size": size_ok,
            "metadata round-trips": recorded.get("instruction") == "make the sky blue" and recorded.get("seed") == 42,
        }
    report["edit_seconds"] = round(time.perf_counter() - started, 2)
    report["checks"] = checks
    report["ok"] = all(checks.values())
    if json_output:
        emit_json(report)
    elif not quiet:
        for key, value in report.items():
            if key != "checks":
                console.print(f"{key:>16}: {value}", markup=False)
        for name, passed in checks.items():
            console.print(f"{'ok' if passed else 'FAILED':>16}: {name}", markup=False)
    if not report["ok"]:
        raise typer.Exit(1)
