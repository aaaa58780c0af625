"""The editing pipeline: binning, conditioning, image latents, the guided denoise loop, and decoding.

Usable from Python without the CLI::

    pipe = EditPipeline.from_pretrained("path/to/VIBE-Image-Edit")
    result = pipe(Image.open("street.jpg"), "remove the car")
    result.images[0].save("out.png")

Each stage is a public method (``encode_prompt``, ``encode_image``, ``initial_noise``, ``denoise``, ``decode``),
so benchmarks can time them one by one and tests can check them against the reference's tensors.

Speed and memory options, each checked against the plain path (``tests/test_optimisations.py``):

* the fast path (on by default, :meth:`EditPipeline.set_fast_path`): the context projection and every block's
  cross-attention keys and values are computed once per edit instead of at every step, both attentions run through
  leaner processors, the feed-forward runs its 1×1 convolutions as matrix products over tokens, RMSNorms run fused
  and, on large inputs, in slices (the DC-AE's float32 temporaries set the peak at 2K otherwise), and the DC-AE
  runs channels-last;
* ``compile`` (:meth:`EditPipeline.compile`): ``torch.compile`` of the repeated transformer blocks;
* CUDA graphs (:meth:`EditPipeline.use_cuda_graphs`): each denoising step replayed as one captured graph (CUDA and
  the fast path only; not with offload);
* ``offload`` (:meth:`EditPipeline.enable_offload`): ``"model"`` or ``"sequential"`` weight offload to the CPU;
* VAE tiling (``pipe.vae_tiling``): automatic when the device is short of memory. Tiling changes pixels (the
  DC-AE's attention sees one tile), so it is never turned on where the whole image fits.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import UsageError
from ..files.imaging import SourceImage, as_source, restore_geometry
from ..loading.checkpoint import Components, load_components
from ..models.feedforward import use_token_feed_forward
from ..models.norm import use_lean_norms
from ..options import random_seed
from ..record import EditRecord
from ..speed.compiling import compile_unavailable
from ..speed.graphs import GraphedStep
from ..speed.offload import OFFLOAD_MODES, WeightOffloader, stage_offloader
from ..speed.tiling import free_device_bytes, vae_activation_bytes
from .binning import closest_bin
from .conditioning import VLM_MAX_PIXELS, VLM_MIN_PIXELS, Conditioning, VLMConditioner
from .devices import default_device, default_dtype
from .guidance import Guidance
from .pixels import to_model_pixels, to_pil

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5
DEFAULT_IMAGE_GUIDANCE = 1.2
DEFAULT_SEED = 42
MAX_SEED = 2**31 - 1


@dataclass
class StepState:
    """What one denoising step saw and produced; handed to the step callback (references, not copies)."""

    index: int
    total: int
    timestep: torch.Tensor
    model_input: torch.Tensor
    context: torch.Tensor
    model_timestep: torch.Tensor
    noise_pred_raw: torch.Tensor
    noise_pred: torch.Tensor
    latents: torch.Tensor


@dataclass(frozen=True)
class EditSettings:
    """The knobs shared by every row of one batched run."""

    num_inference_steps: int
    guidance: Guidance
    num_images_per_prompt: int
    output_type: str


@dataclass
class EditRequest:
    """One item of :meth:`EditPipeline.edit_batch`: an image, one instruction, and its own seed."""

    image: Image.Image | SourceImage | str | Path
    instruction: str
    seed: int | None = DEFAULT_SEED


@dataclass
class EditResult:
    """The edited images (at the source's size) or the final latents, and one record per output row."""

    images: list[Image.Image]
    latents: torch.Tensor | None
    records: list[EditRecord]

    @property
    def parameters(self) -> EditRecord:
        """The first output's record (every output of one instruction shares its parameters but ``index``)."""
        return self.records[0]


def _check_scale(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _in_stage(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a stage method with its weights on the device (a no-op without offload)."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: EditPipeline, *args: Any, **kwargs: Any) -> Any:
            with self._stage(name):
                return method(self, *args, **kwargs)

        return run

    return decorate


_GRAPHS_AND_OFFLOAD = "CUDA graphs and weight offload do not mix: a graph replays the weights where they were captured"


def _check_offload(mode: str) -> None:
    if mode not in OFFLOAD_MODES:
        raise UsageError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")


@contextmanager
def _cuda_sync_errors() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class EditPipeline:
    """VIBE instruction-based editing on one device and dtype."""

    def __init__(
        self,
        components: Components,
        *,
        device: torch.device,
        dtype: torch.dtype,
        model_name: str = "",
        vlm_min_pixels: int = VLM_MIN_PIXELS,
        vlm_max_pixels: int = VLM_MAX_PIXELS,
    ) -> None:
        self.components = components
        self.device = device
        self.dtype = dtype
        self.model_name = model_name
        self.conditioner = VLMConditioner(
            components.processor, components.text_encoder, components.transformer, vlm_min_pixels, vlm_max_pixels
        )
        vae_config = components.vae.config
        self.vae_scale_factor = components.vae_scale_factor
        self.latent_channels = vae_config.latent_channels
        self.scaling_factor = vae_config.scaling_factor
        self.offload = "none"
        self._offloader: WeightOffloader | None = None
        self.vae_tiling: bool | None = None  # None: decided per call, see _use_vae_tiling
        self.sync_check = False  # True: on CUDA, a device sync inside the denoise loop raises
        self.compiled = False
        self.cuda_graphs: GraphedStep | None = None  # set by use_cuda_graphs
        self.set_fast_path(True)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        vlm_min_pixels: int = VLM_MIN_PIXELS,
        vlm_max_pixels: int = VLM_MAX_PIXELS,
        *,
        offload: str = "none",
        compile: bool = False,
        cuda_graphs: bool = False,
    ) -> EditPipeline:
        """Load a checkpoint folder in the published layout (see :mod:`compactedit_cli.loading.checkpoint`).

        ``offload`` (``"none"``, ``"model"``, ``"sequential"``) loads the weights into CPU memory and moves each
        stage's weights to ``device`` only while it runs (see :meth:`enable_offload`). ``compile=True`` calls
        :meth:`compile`, which warns and carries on uncompiled where ``torch.compile`` cannot run; ``cuda_graphs``
        likewise calls :meth:`use_cuda_graphs`.
        """
        _check_offload(offload)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        components = load_components(Path(path), device if offload == "none" else torch.device("cpu"), dtype)
        pipe = cls(
            components,
            device=device,
            dtype=dtype,
            model_name=str(path),
            vlm_min_pixels=vlm_min_pixels,
            vlm_max_pixels=vlm_max_pixels,
        )
        pipe.enable_offload(offload)
        if compile:
            pipe.compile()
        if cuda_graphs:
            pipe.use_cuda_graphs()
        return pipe

    @property
    def transformer(self):
        return self.components.transformer

    @property
    def vae(self):
        return self.components.vae

    @property
    def scheduler(self):
        return self.components.scheduler

    @property
    def cfg_distilled(self) -> bool:
        """A CFG-distilled checkpoint runs unguided by default (both scales 0)."""
        return self.transformer.cfg_distilled

    def _instructions(self, instruction: str | Sequence[str]) -> tuple[list[str], list[str]]:
        """Checked instructions, each cut to the VLM's token limit, and a warning for each one cut."""
        items = [instruction] if isinstance(instruction, str) else list(instruction)
        if not items:
            raise UsageError("no instruction given")
        fitted = [self.conditioner.fit_instruction(item) for item in items]
        return [text for text, _ in fitted], [note for _, note in fitted if note]

    def default_guidance(self) -> Guidance:
        if self.cfg_distilled:
            return Guidance(0.0, 0.0)
        return Guidance(DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE)

    # ---- speed and memory ---------------------------------------------------------------------------------------

    def set_fast_path(self, enabled: bool = True) -> None:
        """Fast path (default): the context is projected once per edit, down to each block's cross-attention keys
        and values; both attentions use the lean processors; the feed-forwards' 1×1 convolutions run as matrix
        products over tokens; the DiT's and DC-AE's RMSNorms run as :class:`~compactedit_cli.models.norm.LeanRMSNorm`
        (fewer passes, and the VAE's peak memory at 2K cut by its float32 temporaries); and the DC-AE's convolutions
        run channels-last (a faster encode with a lower peak).

        ``False`` runs diffusers' Sana forward, processors and norms unchanged, the reference the fast path is
        tested against.
        """
        self.fast_path = enabled
        self.transformer.use_lean_attention(enabled)
        use_token_feed_forward(self.transformer, enabled)
        for module in (self.transformer, self.vae):
            use_lean_norms(module, enabled)
        self.vae.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def enable_offload(self, mode: str = "model") -> None:
        """Keep weights in CPU memory, moving them to the device per stage: ``"model"``, ``"sequential"``, ``"none"``.

        ``"model"``: the text encoder (with the edit head) is on the device only to encode the prompt, the DiT only
        to denoise and the VAE only to encode and decode, so the peak holds about one component. ``"sequential"``
        also streams each stage's repeated blocks one at a time (for very small GPUs; slower, since the DiT's
        weights are uploaded at every step). VAE tiling still follows free memory (see :meth:`_use_vae_tiling`).
        ``"none"`` puts everything back on the device.
        """
        _check_offload(mode)
        if mode != "none" and self.cuda_graphs is not None:
            raise UsageError(_GRAPHS_AND_OFFLOAD)
        if self._offloader is not None:
            self._offloader.restore()
            self._offloader = None
        if mode != "none":
            self._offloader = stage_offloader(self.components, self.device, sequential=mode == "sequential")
        self.offload = mode

    def _stage(self, name: str) -> AbstractContextManager[None]:
        return self._offloader.stage(name) if self._offloader is not None else nullcontext()

    def compile(self, *, backend: str = "inductor", mode: str | None = None) -> str:
        """``torch.compile`` the transformer's repeated blocks, in place.

        Regional compilation: one block shape is compiled and shared by all 20 blocks, so compiling takes seconds,
        not minutes. Compiling happens lazily, at the first edit of each new size. Where torch.compile cannot run
        here (no Triton on CUDA, no C++ compiler on the CPU) it warns and leaves the pipeline as it was. Returns a
        one-line account of what happened. The VAE decoder stays eager: compiled, a 2048² decode on an H100 took
        81 s to compile and then 0.208 s against 0.210 s (BENCHMARKS.md).
        """
        reason = compile_unavailable(backend, self.device)
        if reason is not None:
            message = f"torch.compile skipped: {reason}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return message
        if self.cuda_graphs is not None:
            self.cuda_graphs.release()  # it holds the eager kernels; the next step captures the compiled ones
        self.transformer.compile_repeated_blocks(backend=backend, mode=mode)
        self.compiled = True
        blocks = len(self.transformer.transformer_blocks)
        return f"compiled {blocks} transformer blocks with torch.compile (backend {backend}, mode {mode or 'default'})"

    def use_cuda_graphs(self, enabled: bool = True) -> str:
        """Replay each denoising step as a CUDA graph (see :mod:`~compactedit_cli.speed.graphs`), or stop (``False``).

        The graph is captured at the first step of each new size, whose answer comes from one eager warm-up run,
        and replaces the fast path's transformer call; the plain path stays eager. It needs CUDA, and the weights
        must stay put, so it refuses weight offload. Elsewhere it warns and leaves the pipeline eager. Returns a
        one-line account.
        """
        self.cuda_graphs = None  # a graph held before goes with its memory pool
        if not enabled:
            return "CUDA graphs off"
        if self.device.type != "cuda":
            message = f"CUDA graphs skipped: they need a CUDA device, and this pipeline runs on {self.device.type}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return message
        if self.offload != "none":
            raise UsageError(_GRAPHS_AND_OFFLOAD)
        self.cuda_graphs = GraphedStep(self.transformer.forward_projected)
        return "denoising steps replay as a CUDA graph, captured at the first step of each size"

    def _use_vae_tiling(self, batch: int, height: int, width: int) -> bool:
        """``vae_tiling`` if set; else tile only when the device has less free memory than the VAE needs."""
        if self.vae_tiling is not None:
            return self.vae_tiling
        free = free_device_bytes(self.device)
        return free is not None and free < vae_activation_bytes(self.vae.config, batch, height, width, self.vae.dtype)

    @contextmanager
    def _vae_stage(self, stage: str, batch: int, height: int, width: int) -> Iterator[None]:
        if self._use_vae_tiling(batch, height, width):
            self.vae.enable_tiling()  # keeps any tile size set before
        else:
            self.vae.disable_tiling()
        with self._stage(stage):
            yield

    # ---- stages -------------------------------------------------------------------------------------------------

    def model_size(
        self, source_size: tuple[int, int], *, binning: bool = True, height: int | None = None, width: int | None = None
    ) -> tuple[int, int]:
        """(height, width) the model runs at for a source of ``(width, height)`` ``source_size``.

        With binning, the nearest aspect-ratio bin of the requested (or the source's) size. Without, the requested
        size, which must be a multiple of the VAE factor, or the source's size rounded to the nearest multiple.
        """
        if (height is None) != (width is None):
            raise UsageError("give both height and width, or neither")
        f = self.vae_scale_factor
        if binning:
            src_w, src_h = source_size
            return closest_bin(height or src_h, width or src_w)
        if height is not None and width is not None:
            if height <= 0 or width <= 0 or height % f or width % f:
                raise UsageError(f"height and width must be positive multiples of {f}, got {width}x{height}")
            return height, width
        src_w, src_h = source_size
        return max(f, round(src_h / f) * f), max(f, round(src_w / f) * f)

    @_in_stage("prompt")
    def encode_prompt(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> Conditioning:
        """The (cond, null) contexts for B (image, instruction) rows: one VLM pass, shared by all guidance branches."""
        return self.conditioner.encode(images, instructions)

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """Scaled source latents (K, C, height/f, width/f) of the images resized to the model size."""
        pixels = torch.cat([to_model_pixels(rgb, height, width) for rgb in images])
        with self._vae_stage("image", len(images), height, width):
            return self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent * self.scaling_factor

    def initial_noise(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """float32 noise from a CPU generator, so one seed gives the same start on every device."""
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    @_in_stage("denoise")
    @torch.inference_mode()
    def denoise(
        self,
        latents: torch.Tensor,
        image_latents: torch.Tensor,
        cond: torch.Tensor,
        null: torch.Tensor,
        guidance: Guidance,
        num_inference_steps: int,
        callback: Callable[[StepState], None] | None = None,
    ) -> torch.Tensor:
        """The guided denoise loop; the branches run as one batch, and nothing in it waits on the device."""
        transformer = self.transformer
        dtype = transformer.dtype
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # else the first step looks its index up with a device sync
        context = guidance.context(cond, null).to(dtype)
        predict = self._noise_model(context)
        image_in = guidance.image_latents(image_latents).to(dtype)
        latents = latents.to(self.device)
        timestep_scale = transformer.config.timestep_scale
        timesteps = scheduler.timesteps
        with self._sync_guard():
            for index, t in enumerate(timesteps):
                model_input = torch.cat([torch.cat([latents] * guidance.branches).to(dtype), image_in], dim=1)
                model_timestep = t.expand(model_input.shape[0]) * timestep_scale
                raw = predict(model_input, model_timestep).float()
                guided = guidance.combine(raw)
                latents = scheduler.step(guided, t, latents, return_dict=False)[0]
                if callback is not None:
                    callback(
                        StepState(index, len(timesteps), t, model_input, context, model_timestep, raw, guided, latents)
                    )
        return latents

    def _noise_model(self, context: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The transformer as the loop calls it; the fast path readies the context here, once, not at every step."""
        transformer = self.transformer
        if not self.fast_path:
            return lambda x, t: transformer(
                hidden_states=x, encoder_hidden_states=context, timestep=t, return_dict=False
            )[0]
        ready = transformer.project_context(context)
        if self.offload != "sequential":  # streamed blocks hold their weights only inside their own forward
            ready = transformer.context_keys_values(ready)
        step = self.cuda_graphs or transformer.forward_projected
        return lambda x, t: step(x, ready, t)

    def _sync_guard(self) -> AbstractContextManager[None]:
        """With ``sync_check`` on CUDA, any host-device sync inside the loop raises instead of silently stalling."""
        if not (self.sync_check and self.device.type == "cuda"):
            return nullcontext()
        return _cuda_sync_errors()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of final latents: (B, 3, H, W) in [-1, 1]."""
        f = self.vae_scale_factor
        with self._vae_stage("decode", latents.shape[0], latents.shape[2] * f, latents.shape[3] * f):
            return self.vae.decode(latents.to(self.device, self.vae.dtype) / self.scaling_factor).sample

    # ---- the whole edit -----------------------------------------------------------------------------------------

    def _resolve_guidance(self, guidance_scale: float | None, image_guidance_scale: float | None) -> Guidance:
        defaults = self.default_guidance()
        text = defaults.text_scale if guidance_scale is None else guidance_scale
        image = defaults.image_scale if image_guidance_scale is None else image_guidance_scale
        return Guidance(_check_scale("guidance_scale", text), _check_scale("image_guidance_scale", image))

    def _run(
        self,
        rows: list[tuple[SourceImage, str]],
        noise: torch.Tensor,
        size: tuple[int, int],
        settings: EditSettings,
        callback: Callable[[StepState], None] | None,
        on_stage: Callable[[str], None] | None,
    ) -> tuple[torch.Tensor | None, list[Image.Image]]:
        """One batched edit of B (image, instruction) rows, ``n`` outputs each; returns latents or images."""
        stage = on_stage or (lambda _name: None)
        n = settings.num_images_per_prompt
        height, width = size
        sources: list[SourceImage] = []
        for source, _ in rows:
            if not any(source is s for s in sources):
                sources.append(source)
        stage("encode")
        conditioning = self.encode_prompt([s.rgb for s, _ in rows], [text for _, text in rows])
        cond = conditioning.cond.repeat_interleave(n, dim=0)
        null = conditioning.null.repeat_interleave(n, dim=0)
        encoded = self.encode_image([s.rgb for s in sources], height, width)
        which = torch.tensor([next(i for i, s in enumerate(sources) if s is src) for src, _ in rows])
        image_latents = encoded[which.to(encoded.device)].repeat_interleave(n, dim=0)
        stage("denoise")
        final = self.denoise(
            noise, image_latents, cond, null, settings.guidance, settings.num_inference_steps, callback
        )
        if settings.output_type == "latent":
            return final, []
        stage("decode")
        row_sources = [source for source, _ in rows for _ in range(n)]
        return None, [
            restore_geometry(img, src) for img, src in zip(to_pil(self.decode(final)), row_sources, strict=True)
        ]

    def _settings(
        self,
        num_inference_steps: int,
        guidance_scale: float | None,
        image_guidance_scale: float | None,
        num_images_per_prompt: int,
        output_type: str,
    ) -> EditSettings:
        if output_type not in ("pil", "latent"):
            raise UsageError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise UsageError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise UsageError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        return EditSettings(
            num_inference_steps,
            self._resolve_guidance(guidance_scale, image_guidance_scale),
            num_images_per_prompt,
            output_type,
        )

    def _records(
        self,
        instructions: list[str],
        seed: int | None,
        settings: EditSettings,
        size: tuple[int, int],
        source: SourceImage,
        binning: bool,
        notes: list[str],
    ) -> list[EditRecord]:
        """One record per output row, in the order the rows come out (instruction-major)."""
        n = settings.num_images_per_prompt
        return [
            EditRecord(
                instruction=text,
                steps=settings.num_inference_steps,
                guidance_scale=settings.guidance.text_scale,
                image_guidance_scale=settings.guidance.image_scale,
                guidance_branches=settings.guidance.branches,
                seed=seed,
                size=list(source.size),
                model_size=[size[1], size[0]],
                resolution_binning=binning,
                model=self.model_name,
                dtype=str(self.dtype).removeprefix("torch."),
                device=str(self.device),
                scheduler=type(self.scheduler).__name__,
                vlm_min_pixels=self.conditioner.min_pixels,
                vlm_max_pixels=self.conditioner.max_pixels,
                index=index,
                num_images=n,
                warnings=[*source.warnings, *notes],
            )
            for text in instructions
            for index in range(n)
        ]

    def __call__(
        self,
        image: Image.Image | SourceImage | str | Path,
        instruction: str | Sequence[str],
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        seed: int | None = DEFAULT_SEED,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        resolution_binning: bool = True,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback: Callable[[StepState], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> EditResult:
        """Edit one image with one or more instructions (``n`` outputs each, in instruction-major order).

        ``guidance_scale`` and ``image_guidance_scale`` default to 4.5 and 1.2, or to 0 for a CFG-distilled
        checkpoint. The noise for all outputs is one draw from a CPU generator seeded with ``seed``; ``seed=None``
        draws a fresh seed (reported in the result), and ``latents`` replaces the noise altogether.
        ``output_type="latent"`` skips decoding and returns the final latents.
        """
        source = as_source(image)
        instructions, notes = self._instructions(instruction)
        settings = self._settings(
            num_inference_steps, guidance_scale, image_guidance_scale, num_images_per_prompt, output_type
        )
        size = self.model_size(source.size, binning=resolution_binning, height=height, width=width)
        batch = len(instructions) * num_images_per_prompt
        if latents is None:
            seed = random_seed() if seed is None else seed
            latents = self.initial_noise(batch, *size, seed)
        else:
            seed = None
            self._check_latents(latents, batch, size)
        final, images = self._run(
            [(source, text) for text in instructions], latents, size, settings, callback, on_stage
        )
        records = self._records(instructions, seed, settings, size, source, resolution_binning, notes)
        return EditResult(images=images, latents=final, records=records)

    def edit_batch(
        self,
        requests: Sequence[EditRequest],
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        resolution_binning: bool = True,
        output_type: str = "pil",
        callback: Callable[[StepState], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> list[EditResult]:
        """Several (image, instruction, seed) edits that share a model size, run as one batch.

        Each request's noise comes from its own seed, so an item gives the same result batched or alone.
        Group requests with :meth:`model_size` first; mixed sizes are refused.
        """
        if not requests:
            return []
        settings = self._settings(
            num_inference_steps, guidance_scale, image_guidance_scale, num_images_per_prompt, output_type
        )
        sources = [as_source(r.image) for r in requests]
        sizes = {self.model_size(s.size, binning=resolution_binning) for s in sources}
        if len(sizes) > 1:
            raise UsageError(f"requests in one batch must share a model size, got {sorted(sizes)}")
        size = sizes.pop()
        seeds = [random_seed() if r.seed is None else r.seed for r in requests]
        noise = torch.cat([self.initial_noise(num_images_per_prompt, *size, seed) for seed in seeds])
        fitted = [self._instructions(r.instruction) for r in requests]
        instructions = [texts[0] for texts, _ in fitted]
        final, images = self._run(
            list(zip(sources, instructions, strict=True)), noise, size, settings, callback, on_stage
        )
        n = num_images_per_prompt
        return [
            EditResult(
                images=images[i * n : (i + 1) * n],
                latents=None if final is None else final[i * n : (i + 1) * n],
                records=self._records([text], seed, settings, size, source, resolution_binning, notes),
            )
            for i, (source, text, (_, notes), seed) in enumerate(zip(sources, instructions, fitted, seeds, strict=True))
        ]

    def _check_latents(self, latents: torch.Tensor, batch: int, size: tuple[int, int]) -> None:
        f = self.vae_scale_factor
        expected = (batch, self.latent_channels, size[0] // f, size[1] // f)
        if tuple(latents.shape) != expected:
            raise UsageError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
