"""The glue between the command line and the engine: model loading, output planning, saving with metadata.

``edit``, ``batch`` and ``selftest`` all go through these functions, so a selftest exercises exactly the path a
real edit takes. Nothing here knows about Typer.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError, UsageError
from .files import metadata as meta_io
from .files.imaging import FORMAT_EXTENSIONS, encode, write_atomic
from .loading.hub import DEFAULT_MODEL, ResolvedModel, is_offline, parse_model, resolve

OFFLOAD_MODES = ("none", "model", "sequential")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_DTYPES = {
    "auto": None,
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


@dataclass
class ModelOptions:
    """How to find and place the model (flags, else the config file, else defaults)."""

    model: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    offload: str = "none"
    compile: bool = False
    cuda_graphs: bool = False


def parse_device(name: str) -> Any:
    """``auto`` -> None (the pipeline's default), else a torch.device that exists on this machine."""
    import torch

    name = name.strip().lower()
    if not _DEVICE.match(name):
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    if name == "auto":
        return None
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("CUDA was requested but no CUDA GPU is available")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"{name} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("MPS was requested but is not available")
    return torch.device(name)


def parse_dtype(name: str) -> Any:
    """``auto`` -> None (bf16 on CUDA, fp32 elsewhere), else the torch dtype."""
    import torch

    key = _DTYPES.get(name.strip().lower(), "?")
    if key == "?":
        raise UsageError(f"unknown dtype {name!r} (use auto, bf16, fp16 or fp32)")
    return None if key is None else getattr(torch, key)


@dataclass
class LoadedModel:
    pipe: Any  # EditPipeline
    resolved: ResolvedModel


def load_pipeline(
    options: ModelOptions,
    status: Callable[[str], None] = lambda _msg: None,
    warn: Callable[[str], None] = lambda _msg: None,
) -> LoadedModel:
    """Resolve (and if needed download) the model, verify it, and load it onto the chosen device.

    With offload the weights load into CPU memory, so a model larger than the GPU still loads.
    """
    if options.offload not in OFFLOAD_MODES:
        raise UsageError(f"unknown offload mode {options.offload!r} (use {', '.join(OFFLOAD_MODES)})")
    if options.cuda_graphs and options.offload != "none":
        raise UsageError("--cuda-graphs and --offload do not mix: a graph replays the weights where it captured them")
    device, dtype = parse_device(options.device), parse_dtype(options.dtype)
    ref = parse_model(options.model or DEFAULT_MODEL, options.revision)
    status(f"resolving {ref.spec}")
    resolved = resolve(ref, offline=is_offline(options.offline))
    status(f"loading {resolved.label()}")
    from .engine.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(resolved.path, device=device, dtype=dtype, offload=options.offload)
    pipe.model_name = resolved.label()
    if options.compile:
        message = quietly(pipe.compile)
        if not pipe.compiled:
            warn(message)
    if options.cuda_graphs:
        message = quietly(pipe.use_cuda_graphs)
        if pipe.cuda_graphs is None:
            warn(message)
    return LoadedModel(pipe, resolved)


def quietly(switch: Callable[[], str]) -> str:
    """Run a speed switch whose reason for not applying comes back as its message: said once, in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return switch()


# ---- outputs ---------------------------------------------------------------------------------------------------


@dataclass
class OutputOptions:
    fmt: str
    quality: int | None = None
    metadata: bool = True
    sidecar: bool = False
    overwrite: bool = False


def numbered(path: Path, count: int) -> list[Path]:
    """``out.png`` for one output; ``out-1.png``, ``out-2.png``, … for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count + 1)]


def default_output(image: Path, fmt: str) -> Path:
    """``photo_edited.png`` beside ``photo.jpg`` when no ``-o`` is given."""
    return image.with_name(f"{image.stem}_edited{FORMAT_EXTENSIONS[fmt]}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def prepare_outputs(paths: list[Path], *, inputs: list[Path], overwrite: bool) -> None:
    """Check output paths before any work: never an input, no clobbering, a writable folder (created if missing)."""
    for path in paths:
        for source in inputs:
            if _same_file(path, source):
                raise OutputError(f"output {path} is the input image; refusing to overwrite an input")
        if path.is_dir():
            raise OutputError(f"output {path} is a directory")
        if path.exists() and not overwrite:
            raise OutputError(f"{path} already exists", hint="use --overwrite to replace it")
        ensure_folder(path.parent)


def ensure_folder(folder: Path) -> None:
    """An output folder that exists (created if missing) and can be written, else a one-line OutputError."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the output folder {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output folder {folder}: permission denied")


def free_memory(pipe: Any = None) -> None:
    """Give back what a failed edit held: collect its garbage, drop ``pipe``'s CUDA graph (its memory pool; the next
    step captures again), then return cached device memory to the driver."""
    import gc

    import torch

    if pipe is not None and pipe.cuda_graphs is not None:
        pipe.cuda_graphs.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


def record_for(result_parameters: Any, index: int, loaded: LoadedModel, source_name: str | None) -> dict[str, Any]:
    """The metadata record of output ``index`` of one edit."""
    p = result_parameters
    instruction = p.instructions[index // p.num_images_per_prompt]
    resolved = loaded.resolved
    return meta_io.build(
        instruction=instruction,
        steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        image_guidance_scale=p.image_guidance_scale,
        seed=p.seed,
        width=p.output_width,
        height=p.output_height,
        model_width=p.width,
        model_height=p.height,
        resolution_binning=p.resolution_binning,
        model=resolved.ref.repo_id or str(resolved.path),
        revision=resolved.commit,
        dtype=p.dtype,
        device=p.device,
        source=source_name,
    )


def encode_output(image: Any, record: dict[str, Any], options: OutputOptions) -> bytes:
    """The output file's bytes, with metadata unless turned off."""
    extra = meta_io.save_options(options.fmt, record if options.metadata else None)
    return encode(image, options.fmt, options.quality, **extra)


def save_outputs(images: list[Any], records: list[dict[str, Any]], paths: list[Path], options: OutputOptions) -> None:
    """Write each image (and its sidecar) atomically."""
    for image, record, path in zip(images, records, paths, strict=True):
        write_atomic(path, encode_output(image, record, options), overwrite=options.overwrite)
        if options.sidecar:
            sidecar = path.with_name(path.name + ".json")
            body = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
            write_atomic(sidecar, body.encode("utf-8"), overwrite=True)


def source_label(name: str | None) -> str | None:
    """What to record as the edit's source: the file name only, never a full path (privacy)."""
    return Path(name).name if name and name != "-" else None
