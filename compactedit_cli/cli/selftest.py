"""``compactedit selftest``: does this install work? Offline, in seconds, before downloading ~10 GB."""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from .common import console, emit_json, handle_errors
from .flags import Device, Quiet, Verbose


def environment() -> dict[str, object]:
    """Versions and accelerator facts worth pasting into a bug report, one line each (the bench's report, flat)."""
    from ..environment import environment_report

    report = environment_report()
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

    from ..files import metadata as meta_io
    from ..random_weights.tiny import build_tiny_checkpoint
    from .common import Verbosity
    from .edit import edit

    report = environment()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compactedit-selftest-") as tmp:
        folder = Path(tmp)
        checkpoint = build_tiny_checkpoint(folder / "tiny-model")
        source = folder / "input.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(source)
        output = folder / "output.png"
        was_quiet = Verbosity.quiet
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # edit prints the output path; not ours to show
                edit(
                    image=str(source),
                    instruction="make the sky blue",
                    output=str(output),
                    steps=2,
                    model=str(checkpoint),
                    device=device,
                    offline=True,
                    quiet=True,
                )
        except typer.Exit as exc:
            if exc.exit_code:
                raise
        finally:
            Verbosity.quiet = was_quiet
        with Image.open(output) as result:
            size_ok = result.size == (100, 75)
        recorded = meta_io.read(output)
        checks = {
            "output written": output.is_file(),
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
