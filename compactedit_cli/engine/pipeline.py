"""The editing pipeline: binning, conditioning, image latents, the guided denoise loop, and decoding.

Usable from Python without the CLI::

    pipe = EditPipeline.from_pretrained("path/to/VIBE-Image-Edit")
    result = pipe(Image.open("street.jpg"), "remove the car")
    result.images[0].save("out.png")

Each stage is a public method (``encode_prompt``, ``encode_image``, ``initial_noise``, ``denoise``, ``decode``),
so benchmarks can time them one by one and tests can check them against the reference's tensors.

Speed and memory options (offload, VAE tiling, the fast path, compile, CUDA graphs, the sync check) live on
``pipe.speed``, a :class:`~compactedit_cli.speed.plan.SpeedPlan`: the stages ask it for their context and the loop
for its denoiser, so this module reads as the edit alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import options
from ..errors import UsageError
from ..files.compositing import NOTHING_EDITABLE, Retouch
from ..files.imaging import SourceImage, as_source, restore_geometry
from ..loading.checkpoint import Components, load_components
from ..options import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, random_seed
from ..record import EditRecord
from ..speed.plan import SpeedPlan, SpeedRequest
from .binning import closest_bin
from .conditioning import VLM_MAX_PIXELS, VLM_MIN_PIXELS, Conditioning, VLMConditioner
from .devices import default_device, default_dtype
from .guidance import Guidance
from .masking import LatentBlend
from .pixels import to_model_pixels, to_pil


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
class SharedParameters:
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


class EditPipeline:
    """VIBE instruction-based editing on one device and dtype."""

    def __init__(
        self,
        components: Components,
        *,
        device: torch.device,
        dtype: torch.dtype,
        name: str = "",
        vlm_min_pixels: int = VLM_MIN_PIXELS,
        vlm_max_pixels: int = VLM_MAX_PIXELS,
    ) -> None:
        self.components = components
        self.device = device
        self.dtype = dtype
        self._name = name
        self.conditioner = VLMConditioner(
            components.processor, components.text_encoder, components.transformer, vlm_min_pixels, vlm_max_pixels
        )
        vae_config = components.vae.config
        self.vae_scale_factor = components.vae_scale_factor
        self.latent_channels = vae_config.latent_channels
        self.scaling_factor = vae_config.scaling_factor
        self.speed = SpeedPlan(components, device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        vlm_min_pixels: int = VLM_MIN_PIXELS,
        vlm_max_pixels: int = VLM_MAX_PIXELS,
        *,
        name: str = "",
        offload: str = "none",
        compile: str | bool = options.DEFAULT_COMPILE,
        long_run: bool = False,
        cuda_graphs: bool = False,
        sync_check: bool = False,
        kernels: str = options.DEFAULT_KERNELS,
        quantize: str = "none",
    ) -> EditPipeline:
        """Load a checkpoint folder in the published layout (see :mod:`compactedit_cli.loading.checkpoint`).

        ``name`` is what results record as the model (default: ``path``). The speed options are
        :class:`~compactedit_cli.speed.plan.SpeedPlan`'s, checked before loading: with ``offload`` the weights load
        into CPU memory; ``quantize="fp8"`` where FP8 cannot run is refused before loading. One that cannot apply
        here (``compile`` without a compiler, ``cuda_graphs`` off CUDA, ``kernels="triton"`` without Triton) is not
        warned about but noted in ``pipe.speed.notes``, and the pipeline runs without it. ``long_run`` says the
        pipeline will serve many edits, which is when ``compile="auto"`` compiles from the first.
        """
        request = SpeedRequest(
            offload=offload,
            compile=compile,
            long_run=long_run,
            cuda_graphs=cuda_graphs,
            sync_check=sync_check,
            kernels=kernels,
            quantize=quantize,
        )
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        components = load_components(Path(path), request.load_device(device), dtype)
        pipe = cls(
            components,
            device=device,
            dtype=dtype,
            name=name or str(path),
            vlm_min_pixels=vlm_min_pixels,
            vlm_max_pixels=vlm_max_pixels,
        )
        pipe.speed.apply(request)
        return pipe

    @property
    def model_name(self) -> str:
        """The model as results record it."""
        return self._name

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

    def encode_prompt(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> Conditioning:
        """The (cond, null) contexts for B (image, instruction) rows: one VLM pass, shared by all guidance branches."""
        with self.speed.stage("prompt"):
            return self.conditioner.encode(images, instructions)

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """Scaled source latents (K, C, height/f, width/f) of the images resized to the model size."""
        pixels = torch.cat([to_model_pixels(rgb, height, width) for rgb in images])
        return self.speed.vae_encode(pixels.to(self.device, self.vae.dtype)) * self.scaling_factor

    def initial_noise(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """float32 noise from a CPU generator, so one seed gives the same start on every device."""
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

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
        blend: LatentBlend | None = None,
    ) -> torch.Tensor:
        """The guided denoise loop; the branches run as one batch, and nothing in it waits on the device.

        ``blend`` (a masked edit's) pulls the latents outside the mask back to the source's after each step."""
        with self.speed.stage("denoise"):
            dtype = self.transformer.dtype
            scheduler = self.scheduler
            scheduler.set_timesteps(num_inference_steps, device=self.device)
            context = guidance.context(cond, null).to(dtype)
            predict = self.speed.denoiser(context)
            image_in = guidance.image_latents(image_latents).to(dtype)
            latents = latents.to(self.device)
            timestep_scale = self.transformer.config.timestep_scale
            timesteps = scheduler.timesteps
            total = len(timesteps)
            with self.speed.loop_guard():
                for index, t in enumerate(timesteps):
                    model_input = torch.cat([torch.cat([latents] * guidance.branches).to(dtype), image_in], dim=1)
                    model_timestep = t.expand(model_input.shape[0]) * timestep_scale
                    raw = predict(model_input, model_timestep).float()
                    guided = guidance.combine(raw)
                    latents = scheduler.step(guided, latents)
                    if blend is not None:
                        latents = blend(scheduler, index, latents)
                    if callback is not None:
                        callback(StepState(index, total, t, model_input, context, model_timestep, raw, guided, latents))
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of final latents: (B, 3, H, W) in [-1, 1]."""
        return self.speed.vae_decode(latents.to(self.device, self.vae.dtype) / self.scaling_factor)

    # ---- the whole edit -----------------------------------------------------------------------------------------

    def _resolve_guidance(self, guidance_scale: float | None, image_guidance_scale: float | None) -> Guidance:
        defaults = self.default_guidance()
        text = defaults.text_scale if guidance_scale is None else guidance_scale
        image = defaults.image_scale if image_guidance_scale is None else image_guidance_scale
        return Guidance(options.scale(text, "guidance_scale"), options.scale(image, "image_guidance_scale"))

    def _run(
        self,
        rows: list[tuple[SourceImage, str]],
        noise: torch.Tensor,
        size: tuple[int, int],
        shared: SharedParameters,
        callback: Callable[[StepState], None] | None,
        on_stage: Callable[[str], None] | None,
        editable: np.ndarray | None = None,
    ) -> tuple[torch.Tensor | None, list[Image.Image]]:
        """One batched edit of B (image, instruction) rows, ``n`` outputs each; returns latents or images.

        ``editable`` (pixels of the rows' image) turns on latent blending outside it."""
        stage = on_stage or (lambda _name: None)
        n = shared.num_images_per_prompt
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
        blend = None if editable is None else LatentBlend.make(editable, image_latents, noise)
        final = self.denoise(
            noise, image_latents, cond, null, shared.guidance, shared.num_inference_steps, callback, blend
        )
        if shared.output_type == "latent":
            return final, []
        stage("decode")
        row_sources = [source for source, _ in rows for _ in range(n)]
        return None, [
            restore_geometry(img, src) for img, src in zip(to_pil(self.decode(final)), row_sources, strict=True)
        ]

    def _shared(
        self,
        num_inference_steps: int,
        guidance_scale: float | None,
        image_guidance_scale: float | None,
        num_images_per_prompt: int,
        output_type: str,
    ) -> SharedParameters:
        if output_type not in ("pil", "latent"):
            raise UsageError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        return SharedParameters(
            options.steps(num_inference_steps, "num_inference_steps"),
            self._resolve_guidance(guidance_scale, image_guidance_scale),
            options.num_images(num_images_per_prompt, "num_images_per_prompt"),
            output_type,
        )

    def _records(
        self,
        instructions: list[str],
        seed: int | None,
        shared: SharedParameters,
        size: tuple[int, int],
        source: SourceImage,
        binning: bool,
        notes: list[str],
    ) -> list[EditRecord]:
        """One record per output row, in the order the rows come out (instruction-major)."""
        n = shared.num_images_per_prompt
        return [
            EditRecord(
                instruction=text,
                steps=shared.num_inference_steps,
                guidance_scale=shared.guidance.text_scale,
                image_guidance_scale=shared.guidance.image_scale,
                guidance_branches=shared.guidance.branches,
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
        retouch: Retouch | None = None,
    ) -> EditResult:
        """Edit one image with one or more instructions (``n`` outputs each, in instruction-major order).

        ``guidance_scale`` and ``image_guidance_scale`` default to 4.5 and 1.2, or to 0 for a CFG-distilled
        checkpoint. The noise for all outputs is one draw from a CPU generator seeded with ``seed``; ``seed=None``
        draws a fresh seed (reported in the result), and ``latents`` replaces the noise altogether.
        ``output_type="latent"`` skips decoding and returns the final latents. ``retouch``
        (:meth:`Retouch.plan <compactedit_cli.files.compositing.Retouch.plan>`) edits under a mask (the crop it
        names, blended if asked, pasted back) and matches colours; a mask with nothing editable returns the input
        itself without running the model.
        """
        source = as_source(image)
        work = retouch.work(source) if retouch is not None else source
        instructions, notes = self._instructions(instruction)
        shared = self._shared(
            num_inference_steps, guidance_scale, image_guidance_scale, num_images_per_prompt, output_type
        )
        size = self.model_size(work.size, binning=resolution_binning, height=height, width=width)
        batch = len(instructions) * num_images_per_prompt
        if latents is None:
            seed = random_seed() if seed is None else seed
            latents = self.initial_noise(batch, *size, seed)
        else:
            seed = None
            self._check_latents(latents, batch, size)
        records = self._records(instructions, seed, shared, size, source, resolution_binning, notes)
        editable = None
        if retouch is not None:
            records = [r.but(**retouch.record_fields()) for r in records]
            if retouch.untouched:
                records = [r.but(warnings=[*r.warnings, NOTHING_EDITABLE]) for r in records]
                return EditResult([retouch.unchanged(source) for _ in records], None, records)
            editable = retouch.editable_in_work()
        rows = [(work, text) for text in instructions]
        final, images = self._run(rows, latents, size, shared, callback, on_stage, editable)
        if retouch is not None:
            images = [retouch.finish(picture, source) for picture in images]
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
        shared = self._shared(
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
            list(zip(sources, instructions, strict=True)), noise, size, shared, callback, on_stage
        )
        n = num_images_per_prompt
        return [
            EditResult(
                images=images[i * n : (i + 1) * n],
                latents=None if final is None else final[i * n : (i + 1) * n],
                records=self._records([text], seed, shared, size, source, resolution_binning, notes),
            )
            for i, (source, text, (_, notes), seed) in enumerate(zip(sources, instructions, fitted, seeds, strict=True))
        ]

    def _check_latents(self, latents: torch.Tensor, batch: int, size: tuple[int, int]) -> None:
        f = self.vae_scale_factor
        expected = (batch, self.latent_channels, size[0] // f, size[1] // f)
        if tuple(latents.shape) != expected:
            raise UsageError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
