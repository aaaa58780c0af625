"""The benchmark behind ``compactedit bench``: per-stage times and peak memory of real edits, as a JSON-ready report.

Each resolution runs ``warmup`` untimed-for-the-statistics edits, then ``repeats`` timed ones, through the same
stage methods an edit uses (VLM encode, VAE encode, denoise, VAE decode), and reports min / median / max per
stage. The device is synchronised before every clock read, so asynchronous GPU work is charged to the stage that
queued it; steps are timed with device events, so timing them adds no sync inside the loop. Warm-up times are
reported too: with ``compile`` the first edit of each size pays for compiling.

Measurement only: :mod:`.report` presents a report, :mod:`.startup` times the fixed cost of a process, and
``compactedit bench`` is the command line. Nothing heavy is imported at module level; the engine is imported when a
benchmark runs.
"""

from __future__ import annotations

import gc
import itertools
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import options
from ..environment import environment_report
from ..errors import UsageError
from .measure import DeviceClock, ForeignLoad, PeakMemory, summarise

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..engine.pipeline import EditPipeline

SCHEMA = "compactedit.bench/1"
STAGES = ("vlm_encode", "vae_encode", "denoise", "denoise_step", "vae_decode", "postprocess", "end_to_end")
_SPANS = ("vlm_encode", "vae_encode", "denoise", "vae_decode", "postprocess")  # consecutive: they sum to end_to_end
RANDOM_WEIGHTS = ("full", "mid", "tiny")
INSTRUCTION = "make the sky a deep sunset orange and add a red kite"
ProgressHook = Callable[[int, int, str], None]
"""``progress(done, total, description)``: called before the first and after every edit (for a progress bar)."""


class BenchError(ValueError):
    """A benchmark option that cannot work (reported to the user, not a crash)."""


# ---- one edit, stage by stage -----------------------------------------------------------------------------------


def _source_image(edge: int) -> Image.Image:
    """A deterministic square test image (a gradient with texture; content does not change the cost)."""
    import numpy as np
    from PIL import Image

    across, down = np.meshgrid(np.linspace(0, 255, edge), np.linspace(0, 255, edge))
    pixels = np.stack([across, down, 255 - across], axis=-1)
    noise = np.random.default_rng(edge).normal(0, 24, (edge, edge, 3))
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def _timed_edit(
    pipe: EditPipeline,
    image: Image.Image,
    size: tuple[int, int],
    plan: dict[str, Any],
    clock: DeviceClock,
    mem: PeakMemory,
) -> dict[str, Any]:
    """One edit through the public stage methods; seconds per stage, and every step's duration.

    The first step's time includes the loop's setup (timesteps, the context projection), which runs once per edit.
    """
    from ..engine.pixels import to_pil

    height, width = size
    batch = plan["batch"]
    stamps = [clock.now()]

    def stage(name: str, work: Callable[[], Any]) -> Any:
        mem.reset()
        out = work()
        stamps.append(clock.now())
        mem.record(name)
        return out

    conditioning = stage("vlm_encode", lambda: pipe.encode_prompt([image] * batch, [INSTRUCTION] * batch))
    image_latents = stage("vae_encode", lambda: pipe.encode_image([image] * batch, height, width))
    marks = [clock.mark()]
    latents = stage(
        "denoise",
        lambda: pipe.denoise(
            pipe.initial_noise(batch, height, width, plan["seed"]),
            image_latents,
            conditioning.cond,
            conditioning.null,
            plan["guidance"],
            plan["steps"],
            callback=lambda _state: marks.append(clock.mark()),
        ),
    )
    pixels = stage("vae_decode", lambda: pipe.decode(latents))
    stage("postprocess", lambda: to_pil(pixels))
    spans = [b - a for a, b in itertools.pairwise(stamps)]
    times = dict(zip(_SPANS, spans, strict=True))
    times["end_to_end"] = stamps[-1] - stamps[0]
    times["steps"] = clock.seconds_between(marks)
    return times


def _bench_resolution(
    pipe: EditPipeline, edge: int, plan: dict[str, Any], clock: DeviceClock, tick: Callable[[str], None]
) -> dict[str, Any]:
    import torch

    image = _source_image(edge)
    size = pipe.model_size((edge, edge), binning=plan["binning"])
    gc.collect()
    if clock.device.type == "cuda":
        torch.cuda.empty_cache()
    mem = PeakMemory(clock.device)  # peaks of the timed runs only: a warm-up may compile or autotune
    foreign = ForeignLoad()
    runs = []
    for index in range(plan["warmup"] + plan["repeats"]):
        warming = index < plan["warmup"]
        runs.append(_timed_edit(pipe, image, size, plan, clock, PeakMemory(clock.device) if warming else mem))
        tick(f"{edge}px warm-up {index + 1}" if warming else f"{edge}px run {index - plan['warmup'] + 1}")
    warm, timed = runs[: plan["warmup"]], runs[plan["warmup"] :]
    stages = {name: summarise([r[name] for r in timed]) for name in STAGES if name != "denoise_step"}
    stages["denoise_step"] = summarise([step for r in timed for step in r["steps"]])
    median = stages["end_to_end"]["median"]
    first_overhead = (warm or timed)[0]["end_to_end"] - median
    return {
        "resolution": edge,
        "input_size": [edge, edge],
        "model_size": {"height": size[0], "width": size[1]},
        "latent_tokens": (size[0] // pipe.vae_scale_factor) * (size[1] // pipe.vae_scale_factor),
        "stages": stages,
        "warmup": [{name: r[name] for name in STAGES if name != "denoise_step"} for r in warm],
        "first_run_overhead_s": first_overhead,
        "compile_warmup_s": first_overhead if pipe.speed.compiled or pipe.speed.aot_packages else None,
        "vae_tiling": pipe.speed.vae_tiled,
        "memory": mem.summary(),
        "foreign_cpu_share": foreign.share(),
    }


# ---- loading ----------------------------------------------------------------------------------------------------


def _parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype names ``edit`` takes (its parser); None or "auto" is the device's default."""
    import torch

    from ..engine.devices import resolve_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return resolve_dtype(dtype or "auto", device)
    except UsageError as exc:
        raise BenchError(str(exc)) from None


def _load(
    model: str | Path | EditPipeline | None,
    random_weights: str | None,
    device: torch.device,
    dtype: torch.dtype,
    offload: str,
    stack: ExitStack,
    clock: DeviceClock,
) -> tuple[EditPipeline, dict[str, Any]]:
    """The pipeline to measure, and how it was made (source, seconds to load or build)."""
    from ..engine.pipeline import EditPipeline

    if isinstance(model, EditPipeline):
        if offload != model.speed.offload:
            model.speed.set_offload(offload)
        return model, {"source": model.model_name or "in-memory pipeline", "load_s": None}
    start = clock.now()
    info: dict[str, Any] = {}
    if model is not None:
        pipe = EditPipeline.from_pretrained(model, device=device, dtype=dtype, offload=offload)
        info["source"] = str(model)
    elif random_weights == "tiny":
        from ..random_weights.tiny import build_tiny_checkpoint

        folder = build_tiny_checkpoint(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tiny")
        info["build_s"] = clock.now() - start
        start = clock.now()
        pipe = EditPipeline.from_pretrained(folder, device=device, dtype=dtype, offload=offload)
        info["source"] = "random:tiny (testing.build_tiny_checkpoint, loaded with from_pretrained)"
    else:
        from ..random_weights.full import random_pipeline, real_configs, scaled_configs

        configs = real_configs() if random_weights == "full" else scaled_configs()
        pipe = random_pipeline(configs, device=device, dtype=dtype, name=f"random:{random_weights}")
        pipe.speed.set_offload(offload)
        info["source"] = {
            "full": "random:full (real-size architecture, random weights)",
            "mid": "random:mid (real configs at 1/8 width, 4 layers per stack, random weights)",
        }[random_weights]
    info["load_s"] = clock.now() - start
    return pipe, info


def _parameter_counts(pipe: EditPipeline) -> dict[str, int]:
    from ..random_weights.full import count_parameters

    c = pipe.components
    return {name: count_parameters(getattr(c, name)) for name in ("text_encoder", "transformer", "vae")}


# ---- the benchmark ----------------------------------------------------------------------------------------------


def check_options(resolutions: Sequence[int], steps: int, batch: int, warmup: int, repeats: int) -> None:
    """The benchmark's numbers, checked as ``edit`` checks its own (before any model is resolved or built)."""
    try:
        if not resolutions:
            raise UsageError("resolutions must be positive edge lengths, got []")
        for edge in resolutions:
            options.bounded_int(edge, "--resolution", 1, 2**16)
        options.steps(steps, "--steps")
        options.batch_size(batch, "--batch")
        options.bounded_int(warmup, "--warmup", 0, 1000)
        options.bounded_int(repeats, "--repeats", 1, 1000)
    except UsageError as exc:
        raise BenchError(str(exc)) from None


def _check_source(random_weights: str | None, model: Any) -> None:
    if (model is None) == (random_weights is None):
        raise BenchError("give exactly one of model (a checkpoint folder or pipeline) and random_weights")
    if random_weights is not None and random_weights not in RANDOM_WEIGHTS:
        raise BenchError(f"random_weights must be one of {', '.join(RANDOM_WEIGHTS)}, got {random_weights!r}")


def _guidance(pipe: EditPipeline, distilled: bool, text: float | None, image: float | None):
    from ..engine.guidance import Guidance

    if distilled:
        if text or image:
            raise BenchError("distilled runs unguided: leave both guidance scales unset (or 0)")
        return Guidance(0.0, 0.0)
    default = pipe.default_guidance()
    try:
        text, image = options.scale(text, "--guidance"), options.scale(image, "--image-guidance")
    except UsageError as exc:
        raise BenchError(str(exc)) from None
    return Guidance(default.text_scale if text is None else text, default.image_scale if image is None else image)


def run_bench(
    *,
    resolutions: Sequence[int] = (1024,),
    binning: bool = True,
    steps: int = 20,
    guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    distilled: bool = False,
    batch: int = 1,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    compile: str | bool = options.DEFAULT_COMPILE,
    cuda_graphs: bool = False,
    kernels: str = options.DEFAULT_KERNELS,
    quantize: str = "none",
    offload: str = "none",
    random_weights: str | None = None,
    model: str | Path | EditPipeline | None = None,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    sync_check: bool = False,
    progress: ProgressHook | None = None,
) -> dict[str, Any]:
    """Benchmark edits of square ``resolutions`` (edge lengths, binned as ``edit`` bins them) and return a report.

    ``binning=False`` runs each edge length as given (rounded to a multiple of 32), as ``edit`` does without binning:
    binning maps every square below 768² to 512².

    The model is ``model`` (a checkpoint folder, or an already loaded :class:`EditPipeline`, whose device and dtype
    are then used) or random weights: ``"full"`` (the real architecture, built in seconds on a GPU), ``"mid"``
    (1/8 width, 4 layers: CPU-sized) or ``"tiny"`` (the test checkpoint, loaded with ``from_pretrained``).
    Guidance scales default to the model's (4.5 / 1.2); ``distilled`` runs one unguided branch. ``offload``,
    ``compile``, ``cuda_graphs``, ``kernels`` and ``quantize`` are the pipeline's options (their capture or compile
    cost shows in each size's ``first_run_overhead_s``; ``quantize="fp8"`` is refused where FP8 cannot run);
    ``sync_check`` makes a host-device sync in the CUDA denoise loop raise.
    Every value in the returned dict is JSON-serialisable.
    """
    import torch

    from ..engine.pipeline import default_device
    from ..speed.graphs import CAPTURE_FAILED
    from ..speed.plan import SpeedRequest

    check_options(resolutions, steps, batch, warmup, repeats)
    _check_source(random_weights, model)
    device = torch.device(device) if device is not None else default_device()
    try:
        SpeedRequest(offload=offload, cuda_graphs=cuda_graphs, kernels=kernels, quantize=quantize).load_device(device)
    except UsageError as exc:  # a rule between the options, or refused here: before the model is built
        raise BenchError(str(exc)) from None
    dtype = _parse_dtype(dtype, device)
    total = 1 + len(resolutions) * (warmup + repeats)
    done = 0

    def tick(description: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, description)

    if progress is not None:
        progress(0, total, "loading the model")
    with ExitStack() as stack:
        clock = DeviceClock(device)
        pipe, loaded = _load(model, random_weights, device, dtype, offload, stack, clock)
        tick("loaded")
        guidance = _guidance(pipe, distilled, guidance_scale, image_guidance_scale)
        quantize_message = pipe.speed.quantize(quantize)
        kernels_message = pipe.speed.set_kernels(kernels, warn=False)
        compile = options.compile_mode(compile)
        compile_message = pipe.speed.set_compile(compile, warn=False) if compile != "off" else None
        graphs_message = pipe.speed.use_graphs(warn=False) if cuda_graphs else None
        pipe.speed.check_syncs(sync_check)
        clock = DeviceClock(pipe.device)
        plan = {
            "batch": batch,
            "seed": seed,
            "guidance": guidance,
            "steps": steps,
            "warmup": warmup,
            "repeats": repeats,
            "binning": binning,
        }
        environment = environment_report(pipe.device)  # before the runs: the load average is of other work
        about, versions = environment["device"], environment["versions"]
        with warnings.catch_warnings():  # a failed capture is said once, from the report (unapplied_options)
            warnings.filterwarnings("ignore", CAPTURE_FAILED, RuntimeWarning)
            results = [_bench_resolution(pipe, edge, plan, clock, tick) for edge in resolutions]
        return {
            "schema": SCHEMA,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": about,
            "versions": versions,
            "settings": {
                "resolutions": list(resolutions),
                "binning": binning,
                "steps": steps,
                "guidance_scale": guidance.text_scale,
                "image_guidance_scale": guidance.image_scale,
                "guidance_branches": guidance.branches,
                "distilled": distilled,
                "batch": batch,
                "dtype": str(pipe.dtype).removeprefix("torch."),
                "device": str(pipe.device),
                "compile": compile,
                "compiled": pipe.speed.compiled,
                "compile_message": compile_message,
                "cuda_graphs": cuda_graphs,
                **_graphs_outcome(pipe, graphs_message),
                "kernels": kernels,
                "kernels_active": pipe.speed.kernels_active,
                "kernels_message": kernels_message,
                "quantize": pipe.speed.quantized,
                "quantize_message": quantize_message,
                "offload": pipe.speed.offload,
                "sync_check": sync_check,
                "random_weights": random_weights,
                "warmup": warmup,
                "repeats": repeats,
                "seed": seed,
                "instruction": INSTRUCTION,
            },
            "model": {**loaded, "parameters": _parameter_counts(pipe)},
            "results": results,
        }


def _graphs_outcome(pipe: EditPipeline, message: str | None) -> dict[str, Any]:
    """Whether the runs replayed CUDA graphs, read after them: a capture can fail at the first step and go eager."""
    from ..speed.graphs import CAPTURE_FAILED

    graphed = pipe.speed.graphs
    failure = None if graphed is None else graphed.failure
    if failure is not None:
        message = f"{CAPTURE_FAILED}, ran eagerly: {failure}"
    return {
        "cuda_graphs_active": graphed is not None and failure is None,
        "cuda_graphs_message": message,
        "cuda_graph_captures": 0 if graphed is None else graphed.captures,
    }
