"""``compactedit bench``: what does this machine do? Per-stage times and peak memory of real edits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from . import flags as opt
from .common import console, emit_json, handle_errors, info, make_progress, progress_enabled, warn

EXAMPLES = """
Examples:

  compactedit bench --random-weights full --resolution 1024 2048    (real-size random weights, no download)

  compactedit bench --model vibe-distilled --resolution 1024 --distilled

  compactedit bench --random-weights tiny --device cpu --json > bench.json

  compactedit bench --startup --repeats 5    (the fixed cost of a process: start, imports, a tiny load and edit)

  compactedit bench --cold --resolution 1024 --json    (one fresh edit process, timed by stage)
"""


@handle_errors
def bench(
    more_resolutions: Annotated[
        list[int] | None,
        typer.Argument(
            help="More edge lengths (so --resolution 1024 2048 works).", metavar="RESOLUTION", show_default=False
        ),
    ] = None,
    resolution: Annotated[
        list[int] | None,
        typer.Option(
            "--resolution",
            help="Square edge lengths, binned as edit bins them. [default: 1024]",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", metavar="N", help="Denoising steps, 1 to 1000.")] = 20,
    guidance: opt.Guidance = None,
    image_guidance: opt.ImageGuidance = None,
    distilled: Annotated[bool, typer.Option("--distilled", help="One unguided branch (both scales 0).")] = False,
    batch: Annotated[int, typer.Option("--batch", metavar="N", help="Images per edit, 1 to 64.")] = 1,
    no_binning: opt.Binning = False,
    random_weights: Annotated[
        str | None,
        typer.Option(
            "--random-weights",
            help="full (real architecture, random weights: no download), mid (CPU-sized) or tiny.",
            autocompletion=opt._choices("full", "mid", "tiny"),
            show_default=False,
        ),
    ] = None,
    model: opt.Model = None,
    revision: opt.Revision = None,
    startup: Annotated[
        bool,
        typer.Option(
            "--startup",
            help="Instead of edits, time fresh processes that start Python, import the CLI, torch and the pipeline, "
            "load the tiny model and edit with it (on the CPU; uses only --repeats, --json and --save).",
        ),
    ] = False,
    cold: Annotated[
        bool,
        typer.Option(
            "--cold",
            help="Instead of warm edits, time fresh processes that each import, resolve and verify, load, warm up, "
            "edit once and save, stage by stage (uses the first --resolution; --repeats processes; --random-weights "
            "tiny only).",
        ),
    ] = False,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    offload: opt.Offload = None,
    compile_: opt.Compile = None,
    cuda_graphs: opt.CudaGraphs = False,
    kernels: opt.Kernels = None,
    quantize: opt.Quantize = None,
    sync_check: Annotated[
        bool,
        typer.Option(
            "--sync-check",
            help="Raise on any host-device sync inside the CUDA denoising loop (each one stalls a step).",
        ),
    ] = False,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", help="Untimed runs per resolution.")] = 1,
    repeats: Annotated[
        int, typer.Option("--repeats", metavar="N", help="Timed runs per resolution (per probe with --startup).")
    ] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print the full report as JSON on stdout.")] = False,
    save: Annotated[
        Path | None, typer.Option("--save", help="Also write the JSON report to this file.", show_default=False)
    ] = None,
    offline: opt.Offline = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Time each stage of an edit (load, VLM encode, VAE encode, denoise, VAE decode) and report peak memory.

    Warm-up runs, then repeats with min / median / max; the device is synchronised before every clock read.
    """
    from ..errors import UsageError

    if random_weights is not None and model is not None:
        raise UsageError("--random-weights and --model are alternatives; give one")
    if startup and cold:
        raise UsageError("--startup and --cold are alternatives; give one")
    if startup:
        if random_weights is not None or model is not None:
            raise UsageError("--startup times its own tiny model: give neither --model nor --random-weights")
        from ..bench.report import startup_table
        from ..bench.startup import startup_overhead

        _show(startup_overhead(repeats), startup_table, json_output, save)
        return

    if cold:
        models = opt.model_options(model, revision, device, dtype, offline, offload, compile_, cuda_graphs)
        resolutions = [*(resolution or []), *(more_resolutions or [])] or [1024]
        _cold(models, resolutions, steps, repeats, random_weights, json_output, save)
        return

    from ..bench.report import report_table, unapplied_options
    from ..bench.run import BenchError, check_options, run_bench
    from ..engine.devices import resolve_device, resolve_dtype
    from ..loading.hub import is_offline, parse_model, resolve

    resolutions = [*(resolution or []), *(more_resolutions or [])] or [1024]
    try:
        check_options(resolutions, steps, batch, warmup, repeats)
    except BenchError as exc:
        raise UsageError(str(exc)) from None
    model_options = opt.model_options(
        model, revision, device, dtype, offline, offload, compile_, cuda_graphs, kernels=kernels, quantize=quantize
    )
    source = None
    if random_weights is None:
        ref = parse_model(model_options.model or "vibe", model_options.revision)
        source = resolve(ref, offline=is_offline(model_options.offline)).path
    with make_progress() as progress:
        task = progress.add_task("benchmark", total=None)

        def advance(done: int, total: int, description: str) -> None:
            progress.update(task, completed=done, total=total, description=description)
            if not progress_enabled():  # a log (a pipe, a file) gets a line per edit instead of a bar
                info(f"[{done}/{total}] {description}")

        try:
            report = run_bench(
                resolutions=resolutions,
                binning=not no_binning,
                steps=steps,
                guidance_scale=guidance,
                image_guidance_scale=image_guidance,
                distilled=distilled,
                batch=batch,
                dtype=resolve_dtype(model_options.dtype, resolve_device(model_options.device)),
                device=resolve_device(model_options.device),
                compile=model_options.compile,
                cuda_graphs=model_options.cuda_graphs,
                kernels=model_options.kernels,
                quantize=model_options.quantize,
                offload=model_options.offload,
                random_weights=random_weights,
                model=source,
                warmup=warmup,
                repeats=repeats,
                sync_check=sync_check,
                progress=advance,
            )
        except BenchError as exc:
            raise UsageError(str(exc)) from None
    for message in unapplied_options(report):
        warn(message)
    _show(report, report_table, json_output, save)


def _cold(
    models: Any,
    resolutions: list[int],
    steps: int,
    repeats: int,
    random_weights: str | None,
    json_output: bool,
    save: Path | None,
) -> None:
    """``bench --cold``: fresh edit processes timed by stage (see :func:`~..bench.startup.cold_start`)."""
    import tempfile

    from ..bench.report import cold_table
    from ..bench.run import BenchError, check_options
    from ..bench.startup import cold_start
    from ..errors import UsageError

    if random_weights not in (None, "tiny"):
        raise UsageError("--cold loads a checkpoint folder: give --model, or --random-weights tiny")
    if len(resolutions) > 1:
        raise UsageError("--cold times one edit: give one --resolution")
    try:
        check_options(resolutions, steps, 1, 0, repeats)
    except BenchError as exc:
        raise UsageError(str(exc)) from None
    with tempfile.TemporaryDirectory() as tmp:
        folder = models.model
        if random_weights == "tiny":
            from ..random_weights.tiny import build_tiny_checkpoint

            folder = str(build_tiny_checkpoint(Path(tmp) / "tiny"))
        info(f"timing {repeats} fresh edit process(es) of {folder}")
        report = cold_start(
            folder,
            revision=models.revision,
            device=models.device,
            dtype=models.dtype,
            offline=models.offline,
            offload=models.offload,
            compile=models.compile,
            cuda_graphs=models.cuda_graphs,
            resolution=resolutions[0],
            steps=steps,
            repeats=repeats,
        )
    _show(report, cold_table, json_output, save)


def _show(report: dict[str, Any], table: Callable[[dict[str, Any]], Any], json_output: bool, save: Path | None) -> None:
    """Save the JSON report if asked; then print it as JSON on stdout, or as a table on stderr."""
    import json

    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if json_output:
        emit_json(report)
    else:
        console.print(table(report))
