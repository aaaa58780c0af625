"""LoRA training of the DiT on (source, target, instruction) pairs, with peft.

The run, top to bottom:

1. Every pair is checked (:mod:`.data`), then the model loads as an edit loads it (same resolution, verification).
2. Each pair is binned as an edit would bin it (:func:`~compactedit_cli.engine.binning.closest_bin`), and its VLM
   context, source latents and target latents are computed once and kept in CPU memory; the VLM then leaves the
   GPU. Only the DiT's LoRA weights train.
3. Each step draws its batch (same-bin pairs), noise, timesteps and dropout from a generator seeded by (seed, step)
   alone, so a run is deterministic for a seed on the CPU and a resumed run draws exactly what the uninterrupted
   run would have drawn; a checkpoint holds the LoRA weights, the optimizer state and the step (safetensors, no
   pickle).
4. On CUDA the frozen weights are bf16 and the step runs under bf16 autocast, with the LoRA weights and optimizer
   in float32; gradient checkpointing recomputes each block in the backward pass.

The objective is :mod:`.objective`'s; the adapter format is :mod:`compactedit_cli.loading.lora`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import __version__
from ..engine.binning import closest_bin
from ..errors import CheckpointError, UsageError
from ..loading.lora import PREFIX, adapter_metadata
from ..options import ModelOptions
from .config import VALIDATION_IMAGES, TrainOptions, checkpoint_path, validation_folder
from .data import TrainingPair
from .objective import FlowObjective

CHECKPOINT_KEY = "compactedit.checkpoint"
MAX_GRAD_NORM = 1.0  # diffusers' Sana LoRA script's --max_grad_norm
WEIGHT_DECAY = 1e-4  # and its --adam_weight_decay


@dataclass
class Example:
    """One pair made ready: its bin's latents and its context, float32 on the CPU."""

    pair: TrainingPair
    size: tuple[int, int]
    source: torch.Tensor
    target: torch.Tensor
    cond: torch.Tensor


@dataclass
class TrainResult:
    steps: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    adapter: str
    checkpoint: str
    losses: list[float]

    def summary(self) -> dict[str, Any]:
        """What ``train --json`` prints."""
        keys = ("steps", "first_loss", "last_loss", "seconds", "adapter", "checkpoint")
        return {key: getattr(self, key) for key in keys}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Through the outputs' atomic writer: a folder that cannot be written is its one-line OutputError, and a
    failure or Ctrl-C leaves no partial file."""
    from safetensors.torch import save

    from ..files.imaging import write_atomic
    from ..files.outputs import ensure_folder

    ensure_folder(path.parent)  # a library caller's folder is created, as it was before the atomic writer
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_atomic(path, data, overwrite=True)  # the CLI refused an existing adapter before training began


class Trainer:
    """One loaded model, its cached examples and a peft LoRA on its DiT."""

    def __init__(
        self,
        model: ModelOptions,
        pairs: list[TrainingPair],
        settings: TrainOptions,
        status: Callable[[str], None] = lambda _message: None,
    ) -> None:
        from ..engine.devices import resolve_device, resolve_dtype
        from ..engine.pipeline import EditPipeline
        from ..loading.hub import is_offline, parse_model, resolve

        self.settings = settings
        self.device = resolve_device(model.device)
        dtype = resolve_dtype(model.dtype, self.device)
        ref = parse_model(model.model, model.revision)
        status(f"resolving {ref.spec}")
        self.resolved = resolve(ref, offline=is_offline(model.offline))
        status(f"loading {self.resolved.label()}")
        self.pipe = EditPipeline.from_pretrained(self.resolved.path, device=self.device, dtype=dtype)
        self.transformer = self.pipe.transformer
        self.base_model = ref.repo_id or Path(self.resolved.path).name
        self.objective = FlowObjective.from_scheduler(
            self.pipe.scheduler.config, self.transformer.config.timestep_scale, settings.cond_dropout
        )
        status(f"encoding {len(pairs)} training pairs")
        self.examples, self.null = self._cache(pairs)
        if self.device.type == "cuda":  # the VLM's work is done: free its GPU memory for training
            self.pipe.components.text_encoder.to("cpu")
            torch.cuda.empty_cache()
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(self.examples):
            self.groups.setdefault(example.size, []).append(index)
        self.params = self._add_lora()
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=WEIGHT_DECAY)
        self.step = 0

    # ---- setup ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _cache(self, pairs: list[TrainingPair]) -> tuple[list[Example], torch.Tensor]:
        examples, null = [], None
        for pair in pairs:
            width, height = pair.source.size
            size = closest_bin(height, width, self.settings.resolution)
            conditioning = self.pipe.encode_prompt([pair.source.rgb], [pair.instruction])
            latents = self.pipe.encode_image([pair.source.rgb, pair.target.rgb], *size)
            # clone(): tensors made under inference mode cannot take part in autograd
            cpu = [t.clone().float().cpu() for t in (latents[0], latents[1], conditioning.cond[0])]
            null = conditioning.null[0].clone().float().cpu()
            examples.append(Example(pair, size, *cpu))
        return examples, null

    def _add_lora(self) -> list[torch.nn.Parameter]:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise UsageError("compactedit train needs peft: pip install 'compactedit[train]'") from None

        settings = self.settings
        self.transformer.requires_grad_(False)
        torch.manual_seed(settings.seed)  # peft's initialisation draws from the global generator
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            target_modules=list(settings.target_modules),
            exclude_modules=r"edit_head\..*",  # the VLM side stays as it is: only the DiT adapts
        )
        try:
            inject_adapter_in_model(config, self.transformer)
        except ValueError as exc:
            raise UsageError(f"--target-modules: {exc}".splitlines()[0]) from None
        params = [p for _, p in self.transformer.named_parameters() if p.requires_grad]
        for param in params:
            param.data = param.data.float()
        if settings.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        return params

    # ---- one step ---------------------------------------------------------------------------------------------

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator("cpu").manual_seed((self.settings.seed << 32) | step)

    def _batch(self, generator: torch.Generator) -> list[Example]:
        """A random pair and same-bin companions, up to the batch size."""
        first = int(torch.randint(len(self.examples), (1,), generator=generator))
        group = self.groups[self.examples[first].size]
        order = [group[int(i)] for i in torch.randperm(len(group), generator=generator)]
        chosen = [first, *[i for i in order if i != first][: self.settings.batch_size - 1]]
        return [self.examples[i] for i in chosen]

    def train_step(self) -> float:
        generator = self._generator(self.step)
        batch = self._batch(generator)
        stack = [torch.stack([getattr(e, key) for e in batch]) for key in ("target", "source", "cond")]
        inputs = self.objective.inputs(*stack, self.null.expand_as(stack[2]), generator)
        dtype = self.transformer.dtype
        model_input, context, timestep = (t.to(self.device, dtype) for t in inputs[:3])
        target = inputs[3].to(self.device)
        self.transformer.train()
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            pred = self.transformer(model_input, context, timestep)
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss.detach())

    # ---- validation -------------------------------------------------------------------------------------------

    def validate(self, folder: Path) -> list[Path]:
        """Edit the first pairs' sources with the adapter as it is now: ``folder/step-NNNNNN/NAME.png``."""
        from ..engine.pixels import to_pil
        from ..files.imaging import encode, restore_geometry, write_atomic
        from ..files.outputs import ensure_folder

        self.transformer.eval()
        out = folder / f"step-{self.step:06d}"
        ensure_folder(out)
        written = []
        for example in self.examples[:VALIDATION_IMAGES]:
            height, width = example.size
            noise = self.pipe.initial_noise(1, height, width, self.settings.seed)
            final = self.pipe.denoise(
                noise,
                example.source[None].to(self.device),
                example.cond[None].to(self.device),
                self.null[None].to(self.device),
                self.pipe.default_guidance(),
                self.settings.validation_steps,
            )
            image = restore_geometry(to_pil(self.pipe.decode(final))[0], example.pair.source)
            path = out / f"{example.pair.name}.png"
            write_atomic(path, encode(image, "png"), overwrite=True)  # a step's edits replace a rerun's
            written.append(path)
        return written

    # ---- files ------------------------------------------------------------------------------------------------

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA weights under the names diffusers' Sana loader reads (``transformer.<module>.lora_A.weight``)."""
        from peft.utils import get_peft_model_state_dict

        return {PREFIX + k: v.float() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def _info(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "base_revision": self.resolved.commit,
            "steps": self.step,
            "training": self.settings.resumable(),
            "software": f"compactedit {__version__}",
        }

    def save_adapter(self, path: Path) -> None:
        settings = self.settings
        meta = adapter_metadata(settings.rank, settings.alpha, settings.target_modules, self._info())
        _save_atomic(self.adapter_tensors(), path, meta)

    def save_checkpoint(self, path: Path) -> None:
        """LoRA weights, AdamW's moments and step counts, and the step: all a resumed run needs."""
        tensors = self.adapter_tensors()
        state = self.optimizer.state_dict()
        for index, entry in state["state"].items():
            for key, value in entry.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
        record = {"step": self.step, "settings": self.settings.resumable(), "base_model": self.base_model}
        settings = self.settings
        meta = adapter_metadata(settings.rank, settings.alpha, settings.target_modules, self._info())
        _save_atomic(tensors, path, {**meta, CHECKPOINT_KEY: json.dumps(record, sort_keys=True)})

    def resume(self, path: Path, step: int) -> None:
        """Continue from a checkpoint at ``step``, which :func:`checkpoint_step` has checked."""
        from peft.utils import set_peft_model_state_dict
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint {path} ({exc})") from exc
        weights = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        try:
            result = set_peft_model_state_dict(self.transformer, weights)
        except RuntimeError as exc:  # a shape that does not fit
            raise CheckpointError(f"checkpoint {path} does not fit this model ({str(exc).splitlines()[0]})") from exc
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"checkpoint {path} does not fit this model: {result.unexpected_keys[0]}")
        for param in self.params:
            param.data = param.data.float()
        state = self.optimizer.state_dict()
        state["state"] = {}
        for name, tensor in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state["state"].setdefault(int(index), {})[key] = tensor.to(self.device) if key != "step" else tensor
        self.optimizer.load_state_dict(state)
        self.step = step


def checkpoint_step(path: Path, settings: TrainOptions) -> int:
    """The step a checkpoint is at, read from its header alone and its settings checked against this run's, so a
    wrong ``--resume`` is refused before the model loads and the pairs are encoded."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            record = json.loads((handle.metadata() or {}).get(CHECKPOINT_KEY, "null"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({exc})") from exc
    step = record.get("step") if isinstance(record, dict) else None
    trained = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(trained, dict) or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} is not a compactedit training checkpoint")
    for key, value in settings.resumable().items():
        if trained.get(key) != value:
            raise UsageError(f"--resume {path}: it was trained with {key} {trained.get(key)!r}, not {value!r}")
    if step >= settings.steps:
        raise UsageError(f"--resume {path}: it is at step {step} already; ask for more --steps")
    return step


def train(
    model: ModelOptions,
    pairs: list[TrainingPair],
    output: Path,
    settings: TrainOptions,
    *,
    resume: Path | None = None,
    status: Callable[[str], None] = lambda _message: None,
    on_step: Callable[[int, int, float], None] = lambda _step, _total, _loss: None,
) -> TrainResult:
    """Train an adapter to ``output`` (and its checkpoint beside it); validation edits as the settings ask."""
    started = time.perf_counter()
    start = checkpoint_step(resume, settings) if resume is not None else 0
    trainer = Trainer(model, pairs, settings, status)
    if resume is not None:
        trainer.resume(resume, start)
    checkpoint = checkpoint_path(output)
    validation = validation_folder(output, settings)
    losses = []
    while trainer.step < settings.steps:
        loss = trainer.train_step()
        losses.append(loss)
        on_step(trainer.step, settings.steps, loss)
        if settings.validate_every and trainer.step % settings.validate_every == 0:
            status(f"validation edits at step {trainer.step}")
            trainer.validate(validation)
        if settings.checkpoint_every and trainer.step % settings.checkpoint_every == 0:
            trainer.save_checkpoint(checkpoint)
    trainer.save_checkpoint(checkpoint)
    trainer.save_adapter(output)
    return TrainResult(
        steps=trainer.step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        seconds=round(time.perf_counter() - started, 3),
        adapter=str(output),
        checkpoint=str(checkpoint),
        losses=losses,
    )
