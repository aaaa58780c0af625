"""``compactedit edit IMAGE INSTRUCTION -o OUT``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from . import flags as opt
from .common import edit_progress, emit_json, handle_errors, info, warn

EXAMPLES = """
Examples:

  compactedit edit street.jpg "remove the car" -o out.png

  compactedit edit photo.jpg "make it winter" -n 4 --seed random -o winter.webp

  cat in.png | compactedit edit - "add a red hat" -o - > out.png

  compactedit edit street.jpg --replay out.png -o again.png
"""


@handle_errors
def edit(
    image: Annotated[
        str, typer.Argument(help="Input image file, or - to read it from stdin.", metavar="IMAGE", show_default=False)
    ],
    instruction: Annotated[
        str | None,
        typer.Argument(
            help="What to change, in plain words. Optional with --replay.", metavar="INSTRUCTION", show_default=False
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            help="Output file (.png, .jpg, .webp), or - for stdout. Default: IMAGE_edited.png beside the input.",
            show_default=False,
        ),
    ] = None,
    steps: opt.Steps = None,
    guidance: opt.Guidance = None,
    image_guidance: opt.ImageGuidance = None,
    seed: opt.Seed = None,
    num_images: Annotated[
        int, typer.Option("--num-images", "-n", min=1, max=64, help="Outputs to make; written as OUT-1, OUT-2, …")
    ] = 1,
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
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object describing the result to stdout.")
    ] = False,
    overwrite: opt.Overwrite = False,
    sidecar: Annotated[bool, typer.Option("--sidecar", help="Also write the parameters to OUT.json.")] = False,
    no_metadata: Annotated[
        bool, typer.Option("--no-metadata", help="Write no parameters into the output file.")
    ] = False,
    replay: Annotated[
        Path | None,
        typer.Option(
            "--replay",
            help="Re-run the edit recorded in a compactedit output's metadata (flags given here win).",
            show_default=False,
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    offline: opt.Offline = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Edit one image with a plain-language instruction.

    The output has exactly the input's size and lines up with it pixel for pixel.
    """
    from ..engine.conditioning import check_instruction
    from ..errors import UsageError
    from ..files.imaging import open_image, output_format
    from ..runner_tmp import (
        OutputOptions,
        default_output,
        load_pipeline,
        numbered,
        prepare_outputs,
        record_for,
        save_outputs,
        source_label,
    )

    settings = _replayed(replay) if replay is not None else {}
    if model is None:  # an explicit --model replaces the recorded model and its revision
        model, revision = settings.get("model"), revision or settings.get("revision")
    instruction = instruction if instruction is not None else settings.get("instruction")
    if instruction is None:
        raise UsageError("missing INSTRUCTION")
    check_instruction(instruction)
    if image == "-" and output is None:
        raise UsageError("reading from stdin needs -o (a file, or - for stdout)")
    to_stdout = output == "-"
    if to_stdout and num_images > 1:
        raise UsageError("-o - writes one image; use a file name with --num-images")
    if to_stdout and json_output:
        raise UsageError("--json and -o - both use stdout; write the image to a file")
    if to_stdout and sidecar:
        raise UsageError("--sidecar needs an output file, not stdout")

    out_path = None if to_stdout or output is None else Path(output)
    if to_stdout:
        out_fmt = output_format(None, fmt or "png")
    elif out_path is None:
        out_fmt = output_format(None, fmt or "png")
        out_path = default_output(Path(image), out_fmt)
    else:
        out_fmt = output_format(out_path, fmt)
    paths = [] if to_stdout else numbered(out_path, num_images)
    options = OutputOptions(
        fmt=out_fmt, quality=quality, metadata=not no_metadata, sidecar=sidecar, overwrite=overwrite
    )
    inputs = [] if image == "-" else [Path(image)]

    # Everything the user can get wrong is checked before the model loads.
    source = open_image(sys.stdin.buffer.read() if image == "-" else Path(image))
    prepare_outputs(paths, inputs=inputs, overwrite=overwrite)
    seed_value = opt.parse_seed(seed) if seed is not None else settings.get("seed", 42)
    if seed is not None and seed.strip().lower() == "random":
        info(f"seed: {seed_value}")

    started = time.perf_counter()
    with edit_progress() as progress:
        loaded = load_pipeline(
            opt.model_options(model, revision, device, dtype, offline, offload, compile_, cuda_graphs),
            status=progress.status,
            warn=warn,
        )
        result = loaded.pipe(
            source,
            instruction,
            num_inference_steps=steps or settings.get("steps", 20),
            guidance_scale=guidance if guidance is not None else settings.get("guidance_scale"),
            image_guidance_scale=image_guidance if image_guidance is not None else settings.get("image_guidance_scale"),
            seed=seed_value,
            num_images_per_prompt=num_images,
            resolution_binning=not no_binning and settings.get("resolution_binning", True),
            callback=progress.step,
            on_stage=progress.stage,
        )
    for message in result.parameters.warnings:
        warn(message)
    records = [record_for(result.parameters, i, loaded, source_label(image)) for i in range(len(result.images))]
    if to_stdout:
        from ..runner_tmp import encode_output

        sys.stdout.buffer.write(encode_output(result.images[0], records[0], options))
        sys.stdout.buffer.flush()
    else:
        save_outputs(result.images, records, paths, options)
    seconds = round(time.perf_counter() - started, 3)
    if json_output:
        emit_json(
            {
                "outputs": [str(p) for p in paths],
                "seconds": seconds,
                "model": loaded.resolved.label(),
                **{k: v for k, v in records[0].items() if k not in ("schema", "software", "source")},
                "seed": result.parameters.seed,
                "warnings": result.parameters.warnings,
            }
        )
    elif not to_stdout:
        for path in paths:
            print(path)
    info(f"done in {seconds:.1f}s" if not to_stdout else f"wrote {out_fmt} to stdout in {seconds:.1f}s")


def _replayed(path: Path) -> dict:
    """The parameters recorded in ``path`` that are safe to reuse; each ignored value gets a warning."""
    from ..files import metadata as meta_io

    settings, ignored = meta_io.replayable(meta_io.read(path))
    for message in ignored:
        warn(f"--replay: {message}")
    return settings
