"""``compactedit batch``: many edits, one model load, resumable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from . import flags as opt
from .common import Command, console, emit_json, handle_errors, info, make_progress, warn

EXAMPLES = """
Examples:

  compactedit batch photos/ -i "make it winter" -o winter/ --recursive

  compactedit batch --manifest edits.jsonl -o out/ --batch-size 4

  compactedit batch photos/ -i "make it winter" -o winter/ --devices all

  compactedit batch photos/ -i "make it winter" -o winter/ --shard auto    (in a Slurm array job)

  compactedit batch report winter/    (merge the shards' results)

  compactedit batch photos/ -i "make it winter" -o winter/ --engine ray --ray-address auto

  Each manifest line: {"image": "a.jpg", "instruction": "add a hat", and optionally "output": "a_hat.png",
  "seed": 1, "steps": 20, "guidance": 4.5, "image_guidance": 1.2, "exif": "none", "lora": "style.safetensors:0.8",
  "mask": "a_mask.png" (beside the manifest, as images are), "feather": 16, "mask_mode": "blend"}. CSV with the same
  columns works too.

Exit status: 0 every item succeeded (or was already done), 1 some failed, otherwise as 'compactedit --help' lists.
"""


@handle_errors
def batch(
    input_dir: Annotated[
        Path | None,
        typer.Argument(help="Folder of images (or use --manifest).", metavar="INPUT_DIR", show_default=False),
    ] = None,
    output_dir: Annotated[
        Path, typer.Option("--output", "-o", help="Output folder (created if missing).", metavar="OUT_DIR")
    ] = ...,
    instruction: Annotated[
        str | None, typer.Option("--instruction", "-i", help="Instruction for every image of INPUT_DIR.")
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="JSONL or CSV file of per-item edits.", show_default=False),
    ] = None,
    glob: Annotated[str, typer.Option("--glob", help="Which files of INPUT_DIR to edit.")] = "*",
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    batch_size: opt.BatchSize = 1,
    devices: Annotated[
        str | None,
        typer.Option(
            "--devices",
            metavar="LIST",
            help="all, GPU indices (0,1,3) or cpu,cpu: one worker process per device. [default: one, --device]",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            metavar="N",
            help="N worker processes on --device (with --engine ray: N edit actors).",
            show_default=False,
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="K/N|auto",
            help="Edit only shard K of N (auto: the Slurm array task); merge with 'batch report'.",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", metavar="local|ray", help="ray: run as a Ray Data job (compactedit[ray]).")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDRESS",
            envvar="RAY_ADDRESS",
            show_envvar=False,
            help="The Ray cluster. [default: RAY_ADDRESS, else a local cluster for the run]",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run's summary as JSON on stdout.")] = False,
    steps: opt.Steps = None,
    guidance: opt.Guidance = None,
    image_guidance: opt.ImageGuidance = None,
    seed: opt.Seed = None,
    model: opt.Model = None,
    revision: opt.Revision = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    offload: opt.Offload = None,
    compile_: opt.Compile = None,
    cuda_graphs: opt.CudaGraphs = False,
    kernels: opt.Kernels = None,
    quantize: opt.Quantize = None,
    lora: opt.Lora = None,
    no_binning: opt.Binning = False,
    fmt: opt.BatchFormat = None,
    quality: opt.Quality = None,
    overwrite: opt.Overwrite = False,
    exif: opt.Exif = None,
    no_metadata: Annotated[bool, typer.Option("--no-metadata", help="Write no parameters into outputs.")] = False,
    offline: opt.Offline = False,
    server: opt.Server = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Edit a folder of images, or every line of a manifest, with one model load.

    Existing outputs are skipped, so re-running resumes; OUT_DIR/results.jsonl records every item.
    """
    from .. import options
    from ..batch.plan import DEFAULT_GLOB, items_from_folder, items_from_manifest
    from ..errors import ExitCode, UsageError
    from ..files.imaging import max_bytes_limit, remove_stale_temporaries
    from ..files.outputs import check_folder, ensure_folder

    if (input_dir is None) == (manifest is None):
        raise UsageError("give either INPUT_DIR (with -i) or --manifest")
    if manifest is not None and instruction is not None:
        raise UsageError("-i/--instruction applies to INPUT_DIR; put instructions in the manifest")
    if manifest is not None and (recursive or glob != DEFAULT_GLOB):
        raise UsageError("--glob and --recursive apply to INPUT_DIR, not to --manifest")
    if input_dir is not None and instruction is None:
        raise UsageError("INPUT_DIR needs -i/--instruction")
    chosen_engine = options.engine(engine)
    spread = options.devices(devices) if devices is not None else None
    count = options.workers(workers) if workers is not None else None
    part = options.shard(shard, os.environ) if shard is not None else None
    if spread is not None and count is not None:
        raise UsageError("give --devices or --workers, not both")
    if chosen_engine == "ray" and spread is not None:
        raise UsageError("--devices is for the local engine; Ray places one actor per GPU (--workers: how many)")
    if ray_address is not None and chosen_engine != "ray":
        ray_address = None  # RAY_ADDRESS in the environment matters only to --engine ray
    defaults = opt.edit_options(steps, guidance, image_guidance, seed, no_binning=no_binning)
    model_options = opt.model_options(
        model, revision, device, dtype, offline, offload, compile_, cuda_graphs, lora, kernels, quantize, long_run=True
    )
    server_choice = opt.server(server)
    if server_choice not in options.SERVER_CHOICES and (chosen_engine == "ray" or spread or count):
        raise UsageError("--server edits through one server; --devices, --workers and --engine ray load their own")
    size = options.batch_size(batch_size)
    written = options.OutputOptions(
        quality=quality, metadata=not no_metadata, overwrite=overwrite, exif=opt.exif_policy(exif)
    )
    default_fmt = opt.default_format(fmt)
    max_bytes_limit()  # a bad COMPACTEDIT_MAX_PIXELS / _MAX_BYTES is a usage error now, not every item's failure
    check_folder(output_dir)  # before planning, which never takes the output folder for an input
    if input_dir is not None:
        items = items_from_folder(
            input_dir, instruction, output_dir, default_fmt, defaults, glob=glob, recursive=recursive
        )
    else:
        items = items_from_manifest(manifest, output_dir, default_fmt, defaults)
    if not items:
        raise UsageError(f"no images to edit in {input_dir} (glob {glob!r}{', recursive' if recursive else ''})")

    ensure_folder(output_dir)

    from ..batch import shard as shards
    from ..batch.engines import EngineChoice, run_engine
    from ..batch.lock import LOCK_NAME, output_folder_lock
    from ..batch.results import RESULTS_NAME, ResultsLog

    if part is not None:
        items = shards.select(items, output_dir, part)
    lock, results = (shards.lock_name(part), shards.results_name(part)) if part else (LOCK_NAME, RESULTS_NAME)
    with output_folder_lock(output_dir, lock), make_progress() as progress:
        removed = remove_stale_temporaries(output_dir)
        if removed:
            info(f"removed {removed} temporary file(s) left by an interrupted run")
        for folder in sorted({item.output.parent for item in items}):
            ensure_folder(folder)
        task = progress.add_task("loading model", total=len(items), completed=0)

        def status(message: str) -> None:
            progress.update(task, description=message)

        def on_item(line) -> None:
            progress.advance(task)
            messages = [line["error"]] if line["status"] == "failed" else line["warnings"]
            for message in messages:
                warn(message if line["input"] in message else f"{line['input']}: {message}")

        log = ResultsLog(output_dir, results)
        choice = EngineChoice(chosen_engine, spread, count, server_choice, model is not None, ray_address)
        try:
            summary = run_engine(
                model_options,
                choice,
                items,
                log,
                overwrite=overwrite,
                batch_size=size,
                output_options=written,
                on_item=on_item,
                status=status,
                warn=warn,
            )
        except BaseException:
            log.close()
            raise
        log.close(final=summary.records if summary.stopped is None else None)

    described = _summary_object(summary, log.path, chosen_engine, part)
    if summary.stopped is not None:
        if summary.records:
            _print_summary(summary, log.path)
        summary.stopped.json_summary = described  # --json: one document, the summary with the error
        raise summary.stopped
    if json_output:
        emit_json(described)
    else:
        _print_summary(summary, log.path)
    raise typer.Exit(ExitCode.FAILED if summary.count("failed") else ExitCode.OK)


def _summary_object(summary, results_path: Path, engine: str, part: tuple[int, int] | None) -> dict:
    """The --json summary: counts, where the results are, and how fast and busy the run was."""
    edited = summary.count("ok") + summary.count("failed")
    return {
        "ok": summary.count("ok"),
        "skipped": summary.count("skipped"),
        "failed": summary.count("failed"),
        "items": len(summary.records),
        "results": str(results_path),
        "engine": engine,
        "workers": summary.workers,
        "shard": f"{part[0]}/{part[1]}" if part else None,
        "seconds": round(summary.seconds, 3),
        "items_per_second": round(edited / summary.seconds, 3) if summary.seconds and edited else None,
        "busy_fraction": None if summary.busy_fraction is None else round(summary.busy_fraction, 4),
        "steady_items_per_second": _rounded(summary.steady_items_per_second),
        "startup_seconds": _rounded(summary.startup_seconds),
        "stopped": str(summary.stopped) if summary.stopped is not None else None,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _print_summary(summary, results_path: Path) -> None:
    from rich.table import Table

    from .common import Verbosity

    if Verbosity.quiet:
        return
    table = Table("ok", "skipped", "failed", "results", box=None)
    table.add_row(
        str(summary.count("ok")), str(summary.count("skipped")), str(summary.count("failed")), str(results_path)
    )
    console.print(table)
    failed = [r for r in summary.records if r["status"] == "failed"]
    for record in failed[:10]:
        console.print(f"  failed: {record['input']}: {record['error']}", markup=False, soft_wrap=True)
    if len(failed) > 10:
        console.print(f"  … and {len(failed) - 10} more (see {results_path})", markup=False, soft_wrap=True)


@handle_errors
def report(
    output_dir: Annotated[Path, typer.Argument(help="The batch's output folder.", metavar="OUT_DIR")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Merge the shards' results files in OUT_DIR into one results.jsonl, and summarise the whole batch."""
    from ..batch.report import merge
    from ..errors import ExitCode

    merged = merge(output_dir)
    summary = merged.to_dict()
    if json_output:
        emit_json(summary)
    elif not quiet:
        from rich.table import Table

        table = Table("items", "ok", "skipped", "failed", "files", "results", box=None)
        counts = [str(summary[key]) for key in ("items", "ok", "skipped", "failed")]
        table.add_row(*counts, str(len(merged.files)), summary["results"])
        console.print(table)
    for output in merged.done_twice[:10]:
        warn(f"{output} was edited by more than one shard")
    raise typer.Exit(ExitCode.FAILED if summary["failed"] else ExitCode.OK)


def _report_command() -> click.Command:
    app = typer.Typer(rich_markup_mode=None)
    app.command(epilog="Example:\n\n  compactedit batch report winter/\n")(report)
    return typer.main.get_command(app)


class BatchCommand(Command):
    """``batch``, whose first argument is a folder, with one sub-command: ``batch report OUT_DIR`` (a folder named
    ``report`` is still reachable as ``./report``)."""

    def make_context(self, info_name: Any, args: list[str], parent: Any = None, **extra: Any) -> Any:
        if args and args[0] == "report":
            return _report_command().make_context(f"{info_name} report", args[1:], parent=parent, **extra)
        return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        return super().invoke(ctx) if ctx.command is self else ctx.command.invoke(ctx)
