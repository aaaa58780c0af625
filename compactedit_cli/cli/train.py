"""``compactedit train DATA -o ADAPTER.safetensors``: a LoRA adapter of the DiT from before/after pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..training import config as tc
from . import flags as opt
from .common import emit_json, handle_errors, info, make_progress

EXAMPLES = """
Examples:

  compactedit train pairs.jsonl -o style.safetensors --steps 1000    (source, target, instruction columns)

  compactedit train dataset/ -o style.safetensors --validate-every 100    (target/NAME.png + .txt, control/NAME.png)

  compactedit train pairs.jsonl -o style.safetensors --steps 2000 --resume style.checkpoint.safetensors

  compactedit edit photo.jpg "make it in the house style" --lora style.safetensors:0.8
"""


@handle_errors
def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="A .jsonl/.csv manifest (source, target, instruction) or a folder of target/ and control/.",
            metavar="DATA",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The adapter file to write (.safetensors).", show_default=False)
    ],
    rank: Annotated[int, typer.Option("--rank", metavar="R", help="LoRA rank.")] = tc.DEFAULT_RANK,
    alpha: Annotated[
        float | None,
        typer.Option("--alpha", metavar="A", help="LoRA alpha (the update is scaled alpha/rank). [default: rank]"),
    ] = None,
    lr: Annotated[float, typer.Option("--lr", metavar="LR", help="AdamW learning rate.")] = tc.DEFAULT_LR,
    steps: Annotated[int, typer.Option("--steps", metavar="N", help="Optimizer steps in all.")] = tc.DEFAULT_STEPS,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Same-bin pairs per step.")] = 1,
    resolution: Annotated[
        str,
        typer.Option(
            "--resolution",
            metavar="auto|512|1024|2048",
            help="The bin class pairs train at (auto: by each pair's area, as edit bins it).",
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="A run is reproducible from its seed.")] = 42,
    target_modules: Annotated[
        str, typer.Option("--target-modules", metavar="A,B,…", help="Module names the LoRA adapts (peft suffixes).")
    ] = ",".join(tc.DEFAULT_TARGETS),
    cond_dropout: Annotated[
        float,
        typer.Option("--cond-dropout", metavar="P", help="Drop text, both, image each with P (keeps 3-way guidance)."),
    ] = 0.05,
    no_gradient_checkpointing: Annotated[
        bool, typer.Option("--no-gradient-checkpointing", help="Faster steps, more memory.")
    ] = False,
    validate_every: Annotated[
        int, typer.Option("--validate-every", metavar="N", help="Validation edits every N steps (0: none).")
    ] = 0,
    validation_dir: Annotated[
        Path | None,
        typer.Option("--validation-dir", help="Where validation edits go. [default: ADAPTER_validation/]"),
    ] = None,
    validation_steps: Annotated[
        int, typer.Option("--validation-steps", metavar="N", help="Denoising steps of each validation edit.")
    ] = tc.DEFAULT_VALIDATION_STEPS,
    checkpoint_every: Annotated[
        int,
        typer.Option("--checkpoint-every", metavar="N", help="Also checkpoint every N steps (0: at the end)."),
    ] = 0,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue from a checkpoint; continuing -o's own (ADAPTER.checkpoint.safetensors) replaces that"
            " run's adapter and checkpoint without --overwrite.",
            dir_okay=False,
        ),
    ] = None,
    model: opt.Model = None,
    revision: opt.Revision = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    offline: opt.Offline = False,
    overwrite: opt.Overwrite = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary to stdout.")] = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Train a LoRA adapter of the DiT on your before/after pairs; apply it with --lora."""
    from ..errors import UsageError
    from ..files import outputs

    settings = tc.TrainOptions(
        rank=rank,
        alpha=alpha,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        resolution=resolution,
        seed=seed,
        target_modules=target_modules,
        cond_dropout=cond_dropout,
        gradient_checkpointing=not no_gradient_checkpointing,
        validate_every=validate_every,
        validation_dir=validation_dir,
        validation_steps=validation_steps,
        checkpoint_every=checkpoint_every,
    )
    if output.suffix.lower() != ".safetensors":
        raise UsageError(f"-o {output}: an adapter is a .safetensors file")
    if resume is not None and not resume.is_file():
        raise UsageError(f"--resume {resume}: no such checkpoint")
    model_options = opt.model_options(model, revision, device, dtype, offline, None, False)

    from ..training.data import load_pairs

    pairs = load_pairs(data)
    # Every file the run writes is checked now, not after hours of training. Resuming the adapter's own checkpoint
    # continues that run, so it replaces the run's adapter and checkpoint without --overwrite.
    checkpoint = tc.checkpoint_path(output)
    replace = overwrite or (resume is not None and outputs.same_file(resume, checkpoint))
    inputs = [data, *(path for pair in pairs for path in pair.files)]
    outputs.check_outputs([output], inputs=[*inputs, *([resume] if resume else [])], overwrite=replace)
    outputs.check_outputs([checkpoint], inputs=inputs, overwrite=replace)
    if settings.validate_every:
        outputs.ensure_folder(tc.validation_folder(output, settings))
    info(f"{len(pairs)} training pair{'' if len(pairs) == 1 else 's'}")

    from ..training.trainer import train as run_training

    with make_progress() as progress:
        task = progress.add_task("loading", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, description=f"training  loss {loss:.4f}", completed=step, total=total)

        result = run_training(
            model_options,
            pairs,
            output,
            settings,
            resume=resume,
            status=lambda message: progress.update(task, description=message),
            on_step=on_step,
        )
    if json_output:
        emit_json(result.summary())
    else:
        print(result.adapter)
    info(f"{result.steps} steps, loss {result.first_loss:.4f} -> {result.last_loss:.4f}, in {result.seconds:.1f}s")
