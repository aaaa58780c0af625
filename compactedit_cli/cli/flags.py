"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError


def _choices(*values: str):
    """A shell-completion callback offering ``values`` that start with what was typed."""

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    return complete


GEN = "Generation"
MODEL = "Model"
PERF = "Performance"
OUT = "Output"

Steps = Annotated[
    int | None,
    typer.Option(
        "--steps", min=1, max=1000, help="Denoising steps. [default: 20]", rich_help_panel=GEN, show_default=False
    ),
]
Guidance = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        min=0.0,
        help="Text guidance scale. [default: 4.5; 0 for a CFG-distilled model]",
        rich_help_panel=GEN,
        show_default=False,
    ),
]
ImageGuidance = Annotated[
    float | None,
    typer.Option(
        "--image-guidance",
        min=0.0,
        help="Image guidance scale. [default: 1.2; 0 for a CFG-distilled model]",
        rich_help_panel=GEN,
        show_default=False,
    ),
]
Seed = Annotated[
    str | None,
    typer.Option(
        "--seed", help="Integer seed, or 'random' (printed). [default: 42]", rich_help_panel=GEN, show_default=False
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
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        autocompletion=_choices("vibe", "vibe-distilled"),
        help="Alias (vibe, vibe-distilled), hub id, or local folder. [default: vibe]",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
Revision = Annotated[
    str | None,
    typer.Option("--revision", help="Hub branch, tag or commit.", rich_help_panel=MODEL, show_default=False),
]
Offline = Annotated[
    bool,
    typer.Option("--offline", help="Never touch the network (as HF_HUB_OFFLINE=1).", rich_help_panel=MODEL),
]
Device = Annotated[
    str | None,
    typer.Option(
        "--device",
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
        autocompletion=_choices("none", "model", "sequential"),
        help="none, model (for GPUs under 24 GB) or sequential (slowest, least memory). [default: none]",
        rich_help_panel=PERF,
        show_default=False,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the transformer: ~30% faster guided steps after a slow first edit per size (for batches).",
        rich_help_panel=PERF,
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
OutputFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        autocompletion=_choices("png", "jpg", "webp"),
        help="png, jpg or webp. [default: from the output's extension; png for batch]",
        rich_help_panel=OUT,
        show_default=False,
    ),
]
Quality = Annotated[
    int | None,
    typer.Option(
        "--quality", min=1, max=100, help="JPEG/WebP quality. [default: 95]", rich_help_panel=OUT, show_default=False
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing outputs (never an input).", rich_help_panel=OUT)
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors (and results on stdout).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More detail; tracebacks on errors.")]


def parse_seed(value: str) -> int:
    """An integer seed in the reference's range, or 'random' for a fresh one."""
    from ..engine.pipeline import MAX_SEED, random_seed

    text = value.strip().lower()
    if text == "random":
        return random_seed()
    try:
        seed = int(text)
    except ValueError:
        raise UsageError(f"--seed must be an integer or 'random', got {value!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def model_options(
    model: str | None,
    revision: str | None,
    device: str | None,
    dtype: str | None,
    offline: bool,
    offload: str | None,
    compile_: bool,
    cuda_graphs: bool = False,
):
    """Flags first, then the config file, then built-in defaults."""
    from .. import config_file as settings
    from ..runner_tmp import ModelOptions

    saved = settings.load()
    return ModelOptions(
        model=model or saved.get("model"),
        revision=revision,
        device=device or saved.get("device", "auto"),
        dtype=dtype or saved.get("dtype", "auto"),
        offline=offline,
        offload=offload or saved.get("offload", "none"),
        compile=compile_,
        cuda_graphs=cuda_graphs,
    )
