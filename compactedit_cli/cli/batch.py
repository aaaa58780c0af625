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

  Each manifest line: {"image": "a.jpg", "instruction": "add a hat", "output"?: "a_hat.png", "seed"?: 1,
  "steps"?: 20, "guidance"?: 4.5, "image_guidance"?: 1.2}. CSV with the same columns works too.

Exit status: 0 all items succeeded (or were already done), 1 some failed, 2 usage error.
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
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=64, help="Same-size images edited together on the GPU.")
    ] = 1,
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
    no_binning: opt.Binning = False,
    fmt: opt.OutputFormat = None,
    quality: opt.Quality = None,
    overwrite: opt.Overwrite = False,
    no_metadata: Annotated[bool, typer.Option("--no-metadata", help="Write no parameters into outputs.")] = False,
    offline: opt.Offline = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Edit a folder of images, or every line of a manifest, with one model load.

    Existing outputs are skipped, so re-running resumes; OUT_DIR/results.jsonl records every item.
    """
    from .. import config_file as settings
    from ..batch.run import (
        DEFAULT_GLOB,
        Defaults,
        ResultsLog,
        Runner,
        items_from_folder,
        items_from_manifest,
        resolve_format,
    )
    from ..errors import ExitCode, UsageError
    from ..files.imaging import output_format, remove_stale_temporaries
    from ..runner_tmp import OutputOptions, ensure_folder, free_memory, load_pipeline, record_for, save_outputs

    if (input_dir is None) == (manifest is None):
        raise UsageError("give either INPUT_DIR (with -i) or --manifest")
    if manifest is not None and instruction is not None:
        raise UsageError("-i/--instruction applies to INPUT_DIR; put instructions in the manifest")
    if manifest is not None and (recursive or glob != DEFAULT_GLOB):
        raise UsageError("--glob and --recursive apply to INPUT_DIR, not to --manifest")
    if input_dir is not None and instruction is None:
        raise UsageError("INPUT_DIR needs -i/--instruction")
    default_fmt = resolve_format(fmt, settings.load().get("output_format"))
    if input_dir is not None:
        items = items_from_folder(input_dir, instruction, output_dir, default_fmt, glob=glob, recursive=recursive)
    else:
        items = items_from_manifest(manifest, output_dir, default_fmt)
    if not items:
        raise UsageError(f"no images to edit in {input_dir} (glob {glob!r}{', recursive' if recursive else ''})")
    seed_value = None if seed is not None and seed.strip().lower() == "random" else opt.parse_seed(seed or "42")

    ensure_folder(output_dir)
    removed = remove_stale_temporaries(output_dir)
    if removed:
        info(f"removed {removed} temporary file(s) left by an interrupted run")
    for folder in sorted({item.output.parent for item in items}):
        ensure_folder(folder)

    with make_progress() as progress:
        task = progress.add_task("loading model", total=None)
        loaded = load_pipeline(
            opt.model_options(model, revision, device, dtype, offline, offload, compile_, cuda_graphs),
            status=lambda message: progress.update(task, description=message),
            warn=warn,
        )
        progress.update(task, description="editing", total=len(items), completed=0)

        def save(item, image, parameters) -> None:
            options = OutputOptions(
                fmt=output_format(item.output), quality=quality, metadata=not no_metadata, overwrite=overwrite
            )
            record = record_for(parameters, 0, loaded, item.image.name)
            save_outputs([image], [record], [item.output], options)

        def on_item(record) -> None:
            progress.advance(task)
            messages = {"failed": [record["error"]], "ok": record["warnings"]}.get(record["status"], [])
            for message in messages:
                warn(message if record["input"] in message else f"{record['input']}: {message}")

        runner = Runner(
            pipe=loaded.pipe,
            save=save,
            defaults=Defaults(seed=seed_value, steps=steps or 20, guidance=guidance, image_guidance=image_guidance),
            batch_size=batch_size,
            binning=not no_binning,
            on_item=on_item,
            free_memory=lambda: free_memory(loaded.pipe),
        )
        log = ResultsLog(output_dir)
        try:
            summary = runner.run(items, log, overwrite=overwrite)
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
