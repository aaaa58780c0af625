"""``compactedit batch``: many edits, one model load, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import flags as opt
from .common import console, handle_errors, info, make_progress, warn

EXAMPLES = """
Examples:

  compactedit batch photos/ -i "make it winter" -o winter/ --recursive

  compactedit batch --manifest edits.jsonl -o out/ --batch-size 4

  Each manifest line: {"image": "a.jpg", "instruction": "add a hat", and optionally "output": "a_hat.png",
  "seed": 1, "steps": 20, "guidance": 4.5, "image_guidance": 1.2, "exif": "none"}. CSV with the same columns works too.

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
    steps: opt.Steps = None,
    guidance: opt.Guidance = None,
    image_guidance: opt.ImageGuidance = None,
    seed: opt.Seed = None,
    model: opt.Model = None,
    revision: opt.Revision = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    offload: opt.Offload = None,
    compile_: opt.Compile = False,
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
    from ..files.outputs import ensure_folder

    if (input_dir is None) == (manifest is None):
        raise UsageError("give either INPUT_DIR (with -i) or --manifest")
    if manifest is not None and instruction is not None:
        raise UsageError("-i/--instruction applies to INPUT_DIR; put instructions in the manifest")
    if manifest is not None and (recursive or glob != DEFAULT_GLOB):
        raise UsageError("--glob and --recursive apply to INPUT_DIR, not to --manifest")
    if input_dir is not None and instruction is None:
        raise UsageError("INPUT_DIR needs -i/--instruction")
    defaults = opt.edit_options(steps, guidance, image_guidance, seed, no_binning=no_binning)
    model_options = opt.model_options(
        model, revision, device, dtype, offline, offload, compile_, cuda_graphs, lora, kernels, quantize
    )
    server_choice = opt.server(server)
    size = options.batch_size(batch_size)
    written = options.OutputOptions(
        quality=quality, metadata=not no_metadata, overwrite=overwrite, exif=opt.exif_policy(exif)
    )
    default_fmt = opt.default_format(fmt)
    max_bytes_limit()  # a bad COMPACTEDIT_MAX_PIXELS / _MAX_BYTES is a usage error now, not every item's failure
    if input_dir is not None:
        items = items_from_folder(
            input_dir, instruction, output_dir, default_fmt, defaults, glob=glob, recursive=recursive
        )
    else:
        items = items_from_manifest(manifest, output_dir, default_fmt, defaults)
    if not items:
        raise UsageError(f"no images to edit in {input_dir} (glob {glob!r}{', recursive' if recursive else ''})")

    ensure_folder(output_dir)

    from ..batch.lock import output_folder_lock
    from ..batch.results import ResultsLog
    from ..batch.run import run_batch
    from ..server.remote import open_editor

    with output_folder_lock(output_dir), make_progress() as progress:
        removed = remove_stale_temporaries(output_dir)
        if removed:
            info(f"removed {removed} temporary file(s) left by an interrupted run")
        for folder in sorted({item.output.parent for item in items}):
            ensure_folder(folder)
        task = progress.add_task("loading model", total=None)
        editor = open_editor(
            model_options,
            server_choice,
            status=lambda message: progress.update(task, description=message),
            model_given=model is not None,
        )
        for note in editor.notes:
            warn(note)
        progress.update(task, description="editing", total=len(items), completed=0)

        def on_item(line) -> None:
            progress.advance(task)
            messages = [line["error"]] if line["status"] == "failed" else line["warnings"]
            for message in messages:
                warn(message if line["input"] in message else f"{line['input']}: {message}")

        log = ResultsLog(output_dir)
        try:
            summary = run_batch(
                editor, items, log, overwrite=overwrite, batch_size=size, output_options=written, on_item=on_item
            )
        except BaseException:
            log.close()
            raise
        log.close(final=summary.records if summary.stopped is None else None)

    _print_summary(summary, log.path)
    if summary.stopped is not None:
        raise summary.stopped
    raise typer.Exit(ExitCode.FAILED if summary.count("failed") else ExitCode.OK)


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
