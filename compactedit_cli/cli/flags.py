"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .. import options


def _choices(*values: str):
    """A shell-completion callback offering ``values`` that start with what was typed."""

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    return complete


GEN = "Generation"
MODEL = "Model"
PERF = "Performance"
OUT = "Output"
MASK = "Mask"

Steps = Annotated[
    int | None,
    typer.Option(
        "--steps",
        metavar="N",
        help=f"Denoising steps, 1 to {options.MAX_STEPS}. [default: {options.DEFAULT_STEPS}]",
        rich_help_panel=GEN,
        show_default=False,
    ),
]
Guidance = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        metavar="G",
        help=f"Text guidance scale. [default: {options.DEFAULT_GUIDANCE}; 0 for a CFG-distilled model]",
        rich_help_panel=GEN,
        show_default=False,
    ),
]
ImageGuidance = Annotated[
    float | None,
    typer.Option(
        "--image-guidance",
        metavar="G",
        help=f"Image guidance scale. [default: {options.DEFAULT_IMAGE_GUIDANCE}; 0 for a CFG-distilled model]",
        rich_help_panel=GEN,
        show_default=False,
    ),
]
Seed = Annotated[
    str | None,
    typer.Option(
        "--seed",
        metavar="N|random",
        help=f"Integer seed (0 to {options.MAX_SEED}), or 'random' (printed). [default: {options.DEFAULT_SEED}]",
        rich_help_panel=GEN,
        show_default=False,
    ),
]
Binning = Annotated[
    bool,
    typer.Option(
        "--no-binning",
        help="Run at the input's own size (rounded to 32) instead of the nearest trained aspect-ratio bin.",
        rich_help_panel=GEN,
    ),
]
MaskFile = Annotated[
    str | None,
    typer.Option(
        "--mask",
        metavar="MASK",
        help="Edit only where MASK allows: white is editable in a greyscale mask, transparent in one with alpha "
        "(OpenAI's). It must have the image's size; outside it, past --feather, the output is the input exactly.",
        rich_help_panel=MASK,
        show_default=False,
    ),
]
InvertMask = Annotated[
    bool, typer.Option("--invert-mask", help="Swap the mask's editable and kept parts.", rich_help_panel=MASK)
]
Feather = Annotated[
    int | None,
    typer.Option(
        "--feather",
        metavar="PX",
        help=f"Fade the edit into the photo over PX pixels outside the mask, 0 to {options.MAX_FEATHER}. "
        f"[default: {options.DEFAULT_FEATHER}]",
        rich_help_panel=MASK,
        show_default=False,
    ),
]
MaskMode = Annotated[
    str | None,
    typer.Option(
        "--mask-mode",
        metavar="MODE",
        help="composite: edit, then paste back inside the mask; blend: also keep the model's latents outside the "
        f"mask on the photo's while it denoises, so the edit lands inside. [default: {options.DEFAULT_MASK_MODE}]",
        rich_help_panel=MASK,
        show_default=False,
        autocompletion=_choices(*options.MASK_MODES),
    ),
]
CropToMask = Annotated[
    bool,
    typer.Option(
        "--crop-to-mask",
        help="Edit only a crop around the mask, at the crop's own bin: small edits on big photos get full detail.",
        rich_help_panel=MASK,
    ),
]
ColorMatch = Annotated[
    bool,
    typer.Option(
        "--color-match",
        help="Match the result's colour statistics (Lab mean and spread) to the input's, outside the mask or over "
        "the whole image: counters drift over repeated edits.",
        rich_help_panel=MASK,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="MODEL",
        autocompletion=_choices("vibe", "vibe-distilled"),
        help=f"Alias (vibe, vibe-distilled), hub id, or local folder. [default: {options.DEFAULT_MODEL}]",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
Revision = Annotated[
    str | None,
    typer.Option(
        "--revision", metavar="REV", help="Hub branch, tag or commit.", rich_help_panel=MODEL, show_default=False
    ),
]
Offline = Annotated[
    bool,
    typer.Option("--offline", help="Never touch the network (as HF_HUB_OFFLINE=1).", rich_help_panel=MODEL),
]
Device = Annotated[
    str | None,
    typer.Option(
        "--device",
        metavar="DEVICE",
        autocompletion=_choices("auto", "cpu", "cuda", "mps"),
        help="auto, cpu, cuda, cuda:N or mps. [default: auto]",
        rich_help_panel=PERF,
        show_default=False,
    ),
]
Dtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        autocompletion=_choices("auto", "bf16", "fp16", "fp32"),
        help="auto (bf16 on CUDA, fp32 elsewhere), bf16, fp16 or fp32. [default: auto]",
        rich_help_panel=PERF,
        show_default=False,
    ),
]
Offload = Annotated[
    str | None,
    typer.Option(
        "--offload",
        metavar="MODE",
        autocompletion=_choices("none", "model", "sequential"),
        help="none, model (for GPUs under 24 GB) or sequential (slowest, least memory). [default: none]",
        rich_help_panel=PERF,
        show_default=False,
    ),
]
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the transformer: faster steps after a slow first edit of each size (for batches). "
        "Unset, the config's compile decides: off (default), on, auto (CUDA only: compiled for batch and serve, "
        "and where this size's graphs are already in the compile cache), or aot (each size compiled ahead of time "
        "once; later processes load it in milliseconds, with no compiler).",
        rich_help_panel=PERF,
        show_default=False,
    ),
]
CudaGraphs = Annotated[
    bool,
    typer.Option(
        "--cuda-graphs",
        help="Replay each denoising step as a CUDA graph (CUDA only; not with --offload).",
        rich_help_panel=PERF,
    ),
]
Kernels = Annotated[
    str | None,
    typer.Option(
        "--kernels",
        metavar="MODE",
        autocompletion=_choices(*options.KERNEL_MODES),
        help="off, or triton: fused Triton kernels for the linear attention and gated depthwise convolution of "
        "the transformer and the VAE, and the transformer's norms with their modulation and residual adds (CUDA "
        "with Triton; elsewhere the plain ops run, with a note). Not yet measured on a GPU. "
        f"[default: {options.DEFAULT_KERNELS}]",
        rich_help_panel=PERF,
        show_default=False,
    ),
]
Quantize = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        metavar="FORMAT",
        autocompletion=_choices(*options.QUANTIZE_MODES),
        help="none, or fp8: the transformer blocks' matrix products in FP8 with row-wise scales (Ada, Hopper or "
        "newer GPUs; refused elsewhere, and with --offload). Outputs differ from bf16 (3 mantissa bits); the speed "
        "and quality cost are not yet measured on a GPU. [default: none]",
        rich_help_panel=PERF,
        show_default=False,
    ),
]
EditFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="FORMAT",
        autocompletion=_choices("png", "jpg", "webp"),
        help="png, jpg or webp. [default: OUT's extension; without -o, or with -o -, the config's output_format, "
        "else png]",
        rich_help_panel=OUT,
        show_default=False,
    ),
]
BatchFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="FORMAT",
        autocompletion=_choices("png", "jpg", "webp"),
        help="png, jpg or webp, for outputs the manifest does not name. [default: the config's output_format, "
        "else png]",
        rich_help_panel=OUT,
        show_default=False,
    ),
]
Quality = Annotated[
    int | None,
    typer.Option(
        "--quality",
        metavar="Q",
        help=f"JPEG/WebP quality, 1 to {options.MAX_QUALITY}. [default: {options.DEFAULT_QUALITY}]",
        rich_help_panel=OUT,
        show_default=False,
    ),
]
Exif = Annotated[
    str | None,
    typer.Option(
        "--exif",
        metavar="POLICY",
        autocompletion=_choices(*options.EXIF_POLICIES),
        help="What of the input's EXIF and XMP outputs keep: safe (date, camera, lens, exposure, artist, copyright; "
        "no GPS, serial numbers or owner), keep (all but what the edit makes false) or none. "
        f"[default: the config's exif, else {options.DEFAULT_EXIF}]",
        rich_help_panel=OUT,
        show_default=False,
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing outputs (never an input).", rich_help_panel=OUT)
]
Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        metavar="SERVER",
        envvar="COMPACTEDIT_SERVER",
        show_envvar=False,
        help="auto: edit through a running 'compactedit serve' that serves this model, else in this process; "
        "never: always in this process; or the server to use (http://HOST:PORT, or a Unix socket's path). "
        "[default: auto; env: COMPACTEDIT_SERVER]",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors (and results on stdout).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More detail; tracebacks on errors.")]


NumImages = Annotated[
    int,
    typer.Option(
        "--num-images",
        "-n",
        metavar="N",
        help=f"Outputs to make, 1 to {options.MAX_NUM_IMAGES}; written as OUT-1, OUT-2, …",
        rich_help_panel=GEN,
    ),
]
Lora = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        metavar="FILE[:S]",
        help="A LoRA adapter fused in at load (a .safetensors file, or owner/name/FILE on the hub), at scale S "
        "(default 1; 0 is the base model). Repeat to stack adapters.",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size",
        metavar="N",
        help=f"Same-size images edited together on the GPU, 1 to {options.MAX_BATCH_SIZE}.",
        rich_help_panel=PERF,
    ),
]


def edit_options(
    steps: int | None,
    guidance: float | None,
    image_guidance: float | None,
    seed: str | None,
    num_images: int = options.DEFAULT_NUM_IMAGES,
    no_binning: bool = False,
    mask_mode: str | None = None,
    feather: int | None = None,
    crop_to_mask: bool = False,
    color_match: bool = False,
) -> options.EditOptions:
    """The edit parameters from flags, each checked (and named) as the flag it came from."""
    return options.EditOptions(
        steps=options.steps(steps if steps is not None else options.DEFAULT_STEPS),
        guidance=options.scale(guidance, "--guidance"),
        image_guidance=options.scale(image_guidance, "--image-guidance"),
        seed=options.seed(seed if seed is not None else options.DEFAULT_SEED),
        num_images=options.num_images(num_images),
        binning=not no_binning,
        mask_mode=options.mask_mode(mask_mode if mask_mode is not None else options.DEFAULT_MASK_MODE),
        feather=options.feather(feather if feather is not None else options.DEFAULT_FEATHER),
        crop_to_mask=crop_to_mask,
        color_match=color_match,
    )


def server(flag: str | None) -> str:
    """--server, else the config file's, else auto."""
    from .. import config_file

    if flag is not None:
        return options.server(flag)
    return config_file.load().get("server", options.DEFAULT_SERVER)


def model_options(
    model: str | None,
    revision: str | None,
    device: str | None,
    dtype: str | None,
    offline: bool,
    offload: str | None,
    compile_: bool | None,
    cuda_graphs: bool = False,
    loras: list[Any] | None = None,
    kernels: str | None = None,
    quantize: str | None = None,
    *,
    long_run: bool = False,
) -> options.ModelOptions:
    """Flags first, then the config file, then built-in defaults; an error a saved value causes names its key and
    the file."""
    from .. import config_file
    from ..errors import CompactEditError

    saved = config_file.load()
    if model is None and "model" in saved:
        from ..loading.refs import parse_model

        try:
            parse_model(saved["model"])
        except CompactEditError as exc:
            raise config_file.blame("model", exc) from None
    try:
        return options.ModelOptions(
            model=model or saved.get("model", options.DEFAULT_MODEL),
            revision=revision,
            device=options.device(device) if device else saved.get("device", "auto"),
            dtype=options.dtype(dtype) if dtype else saved.get("dtype", "auto"),
            offline=offline,
            offload=options.offload(offload) if offload else saved.get("offload", "none"),
            compile=compile_ if compile_ is not None else saved.get("compile", options.DEFAULT_COMPILE),
            cuda_graphs=cuda_graphs,
            kernels=options.kernels(kernels) if kernels else saved.get("kernels", options.DEFAULT_KERNELS),
            quantize=options.quantize(quantize) if quantize else saved.get("quantize", options.DEFAULT_QUANTIZE),
            loras=tuple(loras or ()),
            long_run=long_run,
        )
    except CompactEditError as exc:
        if offload is None and saved.get("offload", "none") != "none":  # --cuda-graphs with a saved offload
            raise config_file.blame("offload", exc) from None
        if quantize is None and saved.get("quantize", "none") != "none":  # --offload with a saved fp8
            raise config_file.blame("quantize", exc) from None
        raise


def default_format(explicit: str | None) -> str:
    """The format of an output whose name does not give one (edit without -o or with -o -, batch's default
    names): ``--format``, else the config file's ``output_format``, else png."""
    from .. import config_file

    if explicit is not None:
        return options.output_format_name(explicit)
    return options.output_format_name(config_file.load().get("output_format", options.DEFAULT_FORMAT))


def exif_policy(explicit: str | None) -> str:
    """The EXIF policy: ``--exif``, else the config file's ``exif``, else the default (``safe``)."""
    from .. import config_file

    if explicit is not None:
        return options.exif_policy(explicit)
    return config_file.load().get("exif", options.DEFAULT_EXIF)
