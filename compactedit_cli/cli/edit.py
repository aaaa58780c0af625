"""``compactedit edit IMAGE INSTRUCTION -o OUT``."""

from __future__ import annotations

import sys
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

  compactedit edit big.jpg "add a kite" --mask sky.png --crop-to-mask -o kite.png
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
            help="Output file (.png, .jpg, .webp), or - for stdout (not a terminal). "
            "Default: IMAGE_edited.EXT beside the input (EXT: see --format).",
            show_default=False,
        ),
    ] = None,
    steps: opt.Steps = None,
    guidance: opt.Guidance = None,
    image_guidance: opt.ImageGuidance = None,
    seed: opt.Seed = None,
    num_images: opt.NumImages = 1,
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
    mask: opt.MaskFile = None,
    invert_mask: opt.InvertMask = False,
    feather: opt.Feather = None,
    mask_mode: opt.MaskMode = None,
    crop_to_mask: opt.CropToMask = False,
    color_match: opt.ColorMatch = False,
    fmt: opt.EditFormat = None,
    quality: opt.Quality = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object describing the result to stdout.")
    ] = False,
    overwrite: opt.Overwrite = False,
    exif: opt.Exif = None,
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
    server: opt.Server = None,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Edit one image with a plain-language instruction.

    The output has exactly the input's size and lines up with it pixel for pixel.
    """
    from .. import options
    from ..errors import UsageError
    from ..files.imaging import open_image
    from ..files.outputs import check_outputs, default_output, numbered, written_files

    # An explicit --model replaces the recorded model and its revision, which are then not read at all.
    recorded = _replayed(replay, model is not None) if replay is not None else {}
    if model is None:
        model, revision = recorded.get("model"), revision or recorded.get("revision")
    instruction = instruction if instruction is not None else recorded.get("instruction")
    if instruction is None:
        raise UsageError("missing INSTRUCTION")
    instruction = options.instruction(instruction)
    if mask is None and (crop_to_mask or feather is not None or mask_mode is not None or invert_mask):
        raise UsageError("--crop-to-mask, --feather, --mask-mode and --invert-mask need --mask")
    chosen = opt.edit_options(
        steps if steps is not None else recorded.get("steps"),
        guidance if guidance is not None else recorded.get("guidance_scale"),
        image_guidance if image_guidance is not None else recorded.get("image_guidance_scale"),
        seed if seed is not None else recorded.get("seed"),
        num_images,
        no_binning or not recorded.get("resolution_binning", True),
        mask_mode if mask_mode is not None else recorded.get("mask_mode"),
        feather if feather is not None else recorded.get("feather"),
        crop_to_mask or recorded.get("crop") is not None,
        color_match or recorded.get("color_match", False),
    )
    if recorded.get("num_images", 1) > 1 and chosen.num_images == 1 and chosen.seed is not None:
        # out-2 of "-n 2": the second output of that seed's draw, not the first
        chosen = chosen.replace(draw=(recorded.get("index", 0), recorded["num_images"]))
    loras = lora or recorded.get("loras")
    model_options = opt.model_options(
        model, revision, device, dtype, offline, offload, compile_, cuda_graphs, loras, kernels, quantize
    )
    server_choice = opt.server(server)
    if image == "-" and output is None:
        raise UsageError("reading from stdin needs -o (a file, or - for stdout)")
    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty():  # as curl does: image bytes would garble the terminal
        raise UsageError("-o - writes image bytes, and stdout is a terminal: redirect it (> out.png) or name a file")
    if to_stdout and chosen.num_images > 1:
        raise UsageError("-o - writes one image; use a file name with --num-images")
    if to_stdout and json_output:
        raise UsageError("--json and -o - both use stdout; write the image to a file")
    if to_stdout and sidecar:
        raise UsageError("--sidecar needs an output file, not stdout")
    if to_stdout or output is None:
        out_fmt = opt.default_format(fmt)
        out_path = None if to_stdout else default_output(Path(image), out_fmt)
    else:
        out_path = Path(output)
        out_fmt = options.output_format(out_path, fmt)
    written = options.OutputOptions(
        format=out_fmt,
        quality=quality,
        metadata=not no_metadata,
        sidecar=sidecar,
        overwrite=overwrite,
        exif=opt.exif_policy(exif),
    )

    # Everything the user can get wrong is checked before the engine is imported.
    source = open_image(sys.stdin.buffer if image == "-" else Path(image))
    options.check_output_fits(out_fmt, source.size, "stdout" if out_path is None else str(out_path))
    opened = None
    if mask is not None:
        from ..files.masks import open_mask  # numpy: only an edit with a mask pays for it this early

        opened = open_mask(Path(mask), source.size, invert=invert_mask or recorded.get("invert_mask", False))
        _check_replayed_mask(recorded, opened.sha256, mask)
    elif recorded.get("mask") is not None:
        warn(f"--replay: the recorded edit used a mask ({recorded['mask'] or 'unnamed'}); give it with --mask to "
             "reproduce it (this edit changes the whole image)")  # fmt: skip
    paths = [] if out_path is None else numbered(out_path, chosen.num_images)
    inputs = [] if image == "-" else [Path(image)]
    read = inputs + ([Path(mask)] if mask is not None else [])
    check_outputs(written_files(paths, written), inputs=read, overwrite=overwrite)

    from ..server.remote import open_editor

    with edit_progress() as progress:
        editor = open_editor(model_options, server_choice, status=progress.status, model_given=model is not None)
        for note in editor.notes:
            warn(note)
        records = editor.edit(
            source,
            instruction,
            sys.stdout.buffer if to_stdout else out_path,
            edit_options=chosen,
            output_options=written,
            source_name=None if image == "-" else Path(image).name,
            progress=progress,
            mask=opened,
        )
    first = records[0]
    if chosen.seed is None:
        info(f"seed: {first.seed}")
    for message in first.warnings:
        warn(message)
    if json_output:
        emit_json({"outputs": [r.output for r in records], **first.to_dict()})
    elif not to_stdout:
        for record in records:
            print(record.output)
    info(f"done in {first.seconds:.1f}s" if not to_stdout else f"wrote {out_fmt} to stdout in {first.seconds:.1f}s")


def _check_replayed_mask(recorded: dict, sha256: str | None, given: str) -> None:
    """A replay given another mask than the recorded one says so: the output will not be the recorded one."""
    if recorded.get("mask_sha256") is not None and recorded["mask_sha256"] != sha256:
        named = f" {recorded['mask']}" if recorded.get("mask") else ""
        warn(f"--replay: {given} is not the recorded mask{named} (its sha256 differs), so the output will differ")


def _replayed(path: Path, model_given: bool) -> dict:
    """The parameters recorded in ``path`` that are safe to reuse; each ignored value gets a warning."""
    from ..files import metadata

    given = frozenset({"model", "revision"} if model_given else ())
    recorded, ignored = metadata.replayable(metadata.read(path), given)
    for message in ignored:
        warn(f"--replay: {message}")
    return recorded
