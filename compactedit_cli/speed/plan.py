"""How the pipeline's stages run: weight offload, VAE tiling, compile, CUDA graphs, the sync check.

:class:`SpeedPlan` sits beside an :class:`~compactedit_cli.engine.pipeline.EditPipeline` (``pipe.speed``) and is the
one place that knows these options; the pipeline only asks it for three things:

* a stage's context, :meth:`SpeedPlan.stage` (the stage's weights on the device); the VAE stages are
  :meth:`SpeedPlan.vae_encode` and :meth:`SpeedPlan.vae_decode`, which also decide tiling from the batch and size;
* the denoiser for an edit's context, :meth:`SpeedPlan.denoiser`: the DiT's forward on a context made ready once,
  or that forward replayed as a CUDA graph;
* the denoise loop's guard, :meth:`SpeedPlan.loop_guard` (the sync check).

Each option is checked against the plain path (``tests/test_optimisations.py``; the DiT itself is checked against
diffusers' Sana in ``tests/test_own_sana.py``):

* ``torch.compile`` of the repeated transformer blocks (:meth:`SpeedPlan.compile`);
* CUDA graphs (:meth:`SpeedPlan.use_graphs`): each denoising step replayed as one captured graph (CUDA only; not
  with offload);
* weight offload (:meth:`SpeedPlan.set_offload`): ``"model"`` or ``"sequential"``, see :mod:`.offload`;
* VAE tiling (:meth:`SpeedPlan.set_vae_tiling`, :mod:`.tiling`): automatic when the device is short of memory.
  Tiling changes pixels (the DC-AE's attention sees one tile), so it is never turned on where the whole image fits;
* fused Triton kernels (:meth:`SpeedPlan.set_kernels`) for the linear attention and gated depthwise convolution of
  the DiT and the DC-AE, and the DiT blocks' norms with their modulation and residual adds, see :mod:`.kernels`
  (``tests/test_kernels.py``, ``tests/test_vae_kernels.py``);
* FP8 linear layers in the DiT's blocks (:meth:`SpeedPlan.quantize`), see :mod:`.quantize`
  (``tests/test_quantize.py``). It changes the numbers, so it is refused, not skipped, where it cannot run.

A requested option that cannot apply here (no compiler, no CUDA) leaves a line in :attr:`SpeedPlan.notes` and the
pipeline runs without it.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from .. import options
from ..errors import UsageError
from ..models import dcae
from ..models.attention import linear_attention, use_linear_attention
from ..models.feedforward import depthwise_glu, use_depthwise_glu
from ..models.transformer import Context, gated_residual, norm_modulate, use_norm_modulate
from . import aot
from .compiling import CompileChoice, compile_blocks, compile_unavailable, model_fingerprint, use_compile_cache
from .graphs import GraphedStep
from .kernels import interpreted, kernels_unavailable
from .offload import WeightOffloader, stage_offloader
from .quantize import fp8_unsupported, quantize_linears
from .tiling import free_device_bytes, tiled_decode, tiled_encode, vae_activation_bytes

if TYPE_CHECKING:
    from ..loading.checkpoint import Components

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model input, timestep) -> noise prediction
Kernel = TypeVar("Kernel", bound=Callable)


def _as_is(kernel: Kernel) -> Kernel:
    """The kernel itself: where dynamo can trace its launch (CUDA), a compiled block keeps it in the graph."""
    return kernel


@dataclass(frozen=True)
class SpeedRequest:
    """The speed options a pipeline is loaded with, checked before any weight is read."""

    offload: str = "none"
    compile: str | bool = options.DEFAULT_COMPILE
    cuda_graphs: bool = False
    sync_check: bool = False
    kernels: str = options.DEFAULT_KERNELS
    quantize: str = "none"
    long_run: bool = False  # many edits on this pipeline (a batch, a server): what compile "auto" weighs

    def __post_init__(self) -> None:
        object.__setattr__(self, "offload", options.offload(self.offload, "offload"))
        object.__setattr__(self, "compile", options.compile_mode(self.compile))
        object.__setattr__(self, "kernels", options.kernels(self.kernels, "kernels"))
        object.__setattr__(self, "quantize", options.quantize(self.quantize, "quantize"))
        options.speed_options(self.offload, self.cuda_graphs, self.quantize)

    def load_device(self, device: torch.device) -> torch.device:
        """Where the weights load: CPU memory when they are offloaded, so a model larger than the device loads.

        Refuses (:class:`~compactedit_cli.errors.UsageError`) what ``device`` cannot run, before a weight is read.
        """
        reason = fp8_unsupported(device) if self.quantize == "fp8" else None
        if reason is not None:
            raise UsageError(reason)
        return device if self.offload == "none" else torch.device("cpu")


class SpeedPlan:
    """The speed and memory state of one pipeline's components on ``device``."""

    def __init__(self, components: Components, device: torch.device) -> None:
        self._components = components
        self._device = device
        self._offload = "none"
        self._offloader: WeightOffloader | None = None
        self._vae_tiling: bool | None = None
        self._vae_tile = (options.DEFAULT_VAE_TILE, options.DEFAULT_VAE_TILE_STRIDE)
        self._vae_tiled = False
        self._compiled = False
        self._compile_choice: CompileChoice | None = None
        self._deferred_compile: tuple[str, bool] = ("inductor", False)  # auto's backend and warn, for its first size
        self._aot: aot.AotPackages | None = None
        self._graphs: GraphedStep | None = None
        self._sync_check = False
        self._kernels = options.DEFAULT_KERNELS
        self._kernels_active = False
        self._quantized = "none"
        self.notes: list[str] = []
        # The DC-AE's convolutions run channels-last: the same sums, in faster kernels with smaller temporaries.
        components.vae.to(memory_format=torch.channels_last)
        self._install_kernels()

    # ---- facts --------------------------------------------------------------------------------------------------

    @property
    def offload(self) -> str:
        return self._offload

    @property
    def compiled(self) -> bool:
        """Whether the blocks are compiled (:attr:`compile_mode` says which shapes run their compiled code)."""
        return self._compiled

    @property
    def compile_mode(self) -> str:
        """``off``, ``on``, ``auto`` or ``aot`` (:data:`~compactedit_cli.options.COMPILE_MODES`)."""
        if self._aot is not None:
            return "aot"
        return self._compile_choice.mode if self._compile_choice is not None else "off"

    @property
    def aot_packages(self) -> aot.AotPackages | None:
        """The ahead-of-time packages in use (``compile = "aot"``), else ``None``."""
        return self._aot

    @property
    def graphs(self) -> GraphedStep | None:
        """The graphed denoising step while CUDA graphs are on (its ``captures`` and ``failure`` say what ran)."""
        return self._graphs

    @property
    def vae_tiling(self) -> bool | None:
        """``True`` or ``False`` as set; ``None``: decided per call from free memory (:meth:`uses_vae_tiling`)."""
        return self._vae_tiling

    @property
    def vae_tile(self) -> tuple[int, int]:
        """A VAE tile's side and the stride between tiles, in pixels (diffusers' 512 and 448 unless set)."""
        return self._vae_tile

    @property
    def vae_tiled(self) -> bool:
        """Whether the latest VAE encode or decode ran in tiles."""
        return self._vae_tiled

    @property
    def sync_check(self) -> bool:
        return self._sync_check

    @property
    def kernels(self) -> str:
        """The kernels asked for (:data:`~compactedit_cli.options.KERNEL_MODES`); :attr:`kernels_active`: in use."""
        return self._kernels

    @property
    def kernels_active(self) -> bool:
        return self._kernels_active

    @property
    def quantized(self) -> str:
        """``"fp8"`` once :meth:`quantize` has run, else ``"none"``."""
        return self._quantized

    # ---- switches -----------------------------------------------------------------------------------------------

    def apply(self, request: SpeedRequest) -> None:
        """Switch to ``request``'s options; one that cannot apply here is noted in :attr:`notes`, not warned."""
        self.set_offload(request.offload)
        self.check_syncs(request.sync_check)
        if request.quantize != "none":
            self.quantize(request.quantize)
        self.set_kernels(request.kernels, warn=False)
        if request.compile != "off":
            self.set_compile(request.compile, long_run=request.long_run, warn=False)
        if request.cuda_graphs:
            self.use_graphs(warn=False)

    def set_kernels(self, mode: str, *, warn: bool = True) -> str:
        """The linear attention and gated depthwise convolution of the DiT and of the DC-AE (encode and decode, with
        the DC-AE's norm plus residual), and the DiT blocks' norms with their modulation and residual adds, as fused
        Triton kernels (``"triton"``) or plain torch ops (``"off"``). Where Triton cannot run here (not installed,
        not CUDA) it notes why (and warns, with ``warn``) and keeps the plain ops. Returns a one-line account.
        """
        self._kernels = options.kernels(mode, "kernels")
        reason = kernels_unavailable(self._device) if self._kernels == "triton" else None
        if reason is not None:
            self._kernels = "off"
        self._install_kernels()
        if reason is not None:
            return self._skipped(f"Triton kernels skipped: {reason}", warn)
        if self._kernels == "off":
            return "Triton kernels off"
        return (
            "linear attention and gated depthwise convolution (DiT and VAE), and modulated norms with residual adds, "
            "run as fused Triton kernels"
        )

    def _install_kernels(self) -> None:
        transformer = self._components.transformer
        self._kernels_active = self._kernels == "triton"
        if self._kernels_active:  # imported only now: Triton is optional, and a heavy import
            from .kernels.depthwise_glu import depthwise_glu as fused_depthwise_glu
            from .kernels.linear_attention import linear_attention as fused_linear_attention
            from .kernels.norm_modulate import gated_residual as fused_gated_residual
            from .kernels.norm_modulate import norm_modulate as fused_norm_modulate

            # Dynamo traces a Triton kernel launch on CUDA, but would trace into the interpreter's own Python (and
            # fail) on the CPU: there a compiled block calls the kernels eagerly, between compiled graphs.
            launch = torch.compiler.disable if interpreted() else _as_is
            use_linear_attention(transformer, launch(fused_linear_attention))
            use_depthwise_glu(transformer, launch(fused_depthwise_glu))
            use_norm_modulate(transformer, launch(fused_norm_modulate), launch(fused_gated_residual))
        else:
            use_linear_attention(transformer, linear_attention)
            use_depthwise_glu(transformer, depthwise_glu)
            use_norm_modulate(transformer, norm_modulate, gated_residual)
        self._install_vae_kernels()

    def _install_vae_kernels(self) -> None:
        """The DC-AE's linear attention, gated depthwise convolution and closing norm plus residual of its blocks
        (encode and decode, whole or tiled)."""
        vae = self._components.vae
        if self._kernels_active:
            from .kernels.depthwise_glu import depthwise_glu as fused_depthwise_glu
            from .kernels.linear_attention import multiscale_linear_attention
            from .kernels.norm_residual import rms_norm_residual

            dcae.use_linear_attention(vae, multiscale_linear_attention)
            dcae.use_depthwise_glu(vae, fused_depthwise_glu)
            dcae.use_norm_residual(vae, rms_norm_residual)
        else:
            dcae.use_linear_attention(vae, dcae.linear_attention)
            dcae.use_depthwise_glu(vae, depthwise_glu)
            dcae.use_norm_residual(vae, dcae.norm_residual)

    def quantize(self, mode: str) -> str:
        """Run the DiT blocks' linear layers in FP8 (``"fp8"``), in place and for good: the bf16 weights are
        replaced. Refused with a :class:`~compactedit_cli.errors.UsageError` where FP8 cannot run (it changes the
        numbers, so it is never silently dropped). Returns a one-line account."""
        mode = options.quantize(mode, "quantize")
        if mode == "none" or mode == self._quantized:
            return f"linear layers: {self._quantized}"
        options.speed_options(self._offload, self._graphs is not None, mode)
        reason = fp8_unsupported(self._device)
        if reason is not None:
            raise UsageError(reason)
        count = quantize_linears(self._components.transformer.transformer_blocks)
        self._quantized = mode
        return f"{count} matrix products of the transformer blocks run in FP8 (e4m3, row-wise scales)"

    def set_offload(self, mode: str) -> None:
        """Keep weights in CPU memory, moving them to the device per stage: ``"model"``, ``"sequential"``, ``"none"``.

        ``"model"``: the text encoder (with the edit head) is on the device only to encode the prompt, the DiT only
        to denoise and the VAE only to encode and decode, so the peak holds about one component. ``"sequential"``
        also streams each stage's repeated blocks one at a time (for very small GPUs; slower, since the DiT's
        weights are uploaded at every step). VAE tiling still follows free memory. ``"none"`` puts everything back
        on the device.
        """
        mode = options.offload(mode, "offload")
        options.speed_options(mode, self._graphs is not None, self._quantized)
        if self._offloader is not None:
            self._offloader.restore()
            self._offloader = None
        if mode != "none":
            self._offloader = stage_offloader(self._components, self._device, sequential=mode == "sequential")
        self._offload = mode

    def set_vae_tiling(self, enabled: bool | None, *, tile: int | None = None, stride: int | None = None) -> None:
        """Tile the VAE always (``True``), never (``False``), or only when the device is short of memory (``None``);
        ``tile`` and ``stride`` (pixels) change the tiles' side and spacing, kept until changed again."""
        if enabled not in (True, False, None):
            raise UsageError(f"vae_tiling must be True, False or None (got {enabled!r})")
        factor = self._components.vae.spatial_compression_ratio
        self._vae_tile = options.vae_tile(
            self._vae_tile[0] if tile is None else tile, self._vae_tile[1] if stride is None else stride, factor
        )
        self._vae_tiling = enabled

    def check_syncs(self, enabled: bool = True) -> None:
        """On CUDA, make any host-device sync inside the denoise loop raise instead of silently stalling it."""
        self._sync_check = bool(enabled)

    def compile(self, *, backend: str = "inductor", mode: str | None = None, warn: bool = True) -> str:
        """``torch.compile`` the transformer's repeated blocks, in place.

        Regional compilation: one block shape is compiled and shared by all blocks, so compiling takes seconds, not
        minutes. Compiling happens lazily, at the first edit of each new size. With inductor the compiled graphs
        persist in :func:`~compactedit_cli.options.compile_cache_dir`, so a new process of a size compiled before
        skips code generation (:func:`~.compiling.use_compile_cache`). Where torch.compile cannot run here
        (no Triton on CUDA, no C++ compiler on the CPU) it notes why (and warns, with ``warn``) and leaves the
        pipeline as it was. Returns a one-line account of what happened. The VAE decoder stays eager: compiling it
        took long and gained nothing (BENCHMARKS.md).
        """
        account = self._compile_blocks(backend, mode, warn)
        if self._compiled:
            if self._graphs is not None:
                self._graphs.release()  # it holds the eager kernels; the next step captures the compiled ones
            self._compile_choice = self._choice("on", long_run=True)
        return account

    def _compile_blocks(self, backend: str, mode: str | None, warn: bool) -> str:
        reason = compile_unavailable(backend, self._device)
        if reason is not None:
            return self._skipped(f"torch.compile skipped: {reason}", warn)
        cache = f", cache {use_compile_cache()}" if backend == "inductor" else ""
        transformer = self._components.transformer
        if not self._compiled:
            compile_blocks(transformer.transformer_blocks, backend=backend, mode=mode)
        self._compiled = True
        blocks = len(transformer.transformer_blocks)
        mode_name = mode or "default"
        return f"compiled {blocks} transformer blocks with torch.compile (backend {backend}, mode {mode_name}{cache})"

    def set_compile(
        self, mode: str | bool, *, long_run: bool = False, backend: str = "inductor", warn: bool = True
    ) -> str:
        """``--compile``: ``"on"`` (:meth:`compile`), ``"off"`` (blocks compiled before then run their eager code),
        or ``"auto"``: an edit runs the blocks compiled where compiling pays
        (:func:`~compactedit_cli.options.runs_compiled`: on CUDA, a ``long_run`` or a size compiled on this machine
        before), else eagerly. A long run compiles now; a single edit compiles at the first size that is to run
        compiled, so one of a cold size imports no compiler at all. ``"aot"``: :meth:`compile_ahead`. Returns a
        one-line account."""
        mode = options.compile_mode(mode)
        if mode == "aot":
            return self.compile_ahead(warn=warn)
        if self._aot is not None:
            aot.uninstall(self._components.transformer.transformer_blocks)
            self._aot = None
        if mode == "on":
            return self.compile(backend=backend, warn=warn)
        if mode == "off":
            self._compile_choice = self._choice("off", long_run=long_run) if self._compiled else None
            return "torch.compile off"
        if self._device.type == "cuda" and long_run:
            account = self.compile(backend=backend, warn=warn)
            if not self._compiled:  # the compiler cannot run here (noted): eager
                self._compile_choice = None
                return account
            self._compile_choice = self._choice("auto", long_run=True)
            return f"{account}; auto: compiled code runs for every edit (a long run)"
        self._compile_choice = self._choice("auto", long_run=long_run)
        self._deferred_compile = (backend, warn)
        if self._device.type != "cuda":
            return f"torch.compile auto: eager on {self._device.type}"
        return "torch.compile auto: sizes compiled on this machine before run compiled, others eagerly"

    def compile_ahead(self, *, warn: bool = True) -> str:
        """``compile = "aot"``: the blocks of each size compiled ahead of time, once per machine, into a package that
        any later process loads in milliseconds and runs without a compiler (:mod:`~compactedit_cli.speed.aot`).
        A size that cannot be compiled here runs the plain blocks, noted. Returns a one-line account."""
        if self._device.type not in ("cpu", "cuda"):
            return self._skipped(
                f"ahead-of-time compile skipped: it compiles for cpu and cuda, not {self._device.type}", warn
            )
        if self._compiled:
            return self._skipped("ahead-of-time compile skipped: the blocks run torch.compile in this process", warn)
        if self._aot is None:
            # a size that fails compiles at an edit, after the load's notes were read: so it always warns
            self._aot = aot.AotPackages(self._fingerprint(), note=lambda note: self._skipped(note, True))
            aot.install(self._components.transformer.transformer_blocks, self._aot)
        self._compile_choice = None
        return f"transformer blocks compiled ahead of time, once per size (packages in {self._aot.folder})"

    def _fingerprint(self) -> str:
        transformer = self._components.transformer
        device = torch.cuda.get_device_name(self._device) if self._device.type == "cuda" else self._device.type
        return model_fingerprint(
            device, transformer.dtype, sorted(transformer.config.to_dict().items()), self._kernels, self._quantized
        )

    def _choice(self, mode: str, *, long_run: bool) -> CompileChoice:
        return CompileChoice(mode, self._device, self._fingerprint(), long_run=long_run)

    def use_graphs(self, enabled: bool = True, *, warn: bool = True) -> str:
        """Replay each denoising step as a CUDA graph (see :mod:`~compactedit_cli.speed.graphs`), or stop (``False``).

        The graph is captured at the first step of each new size, whose answer comes from one eager warm-up run,
        and replaces the transformer call. The weights must stay put, so it
        refuses weight offload. It needs CUDA: elsewhere it notes why (and warns, with ``warn``) and leaves the
        pipeline eager. Returns a one-line account.
        """
        self._graphs = None  # a graph held before goes with its memory pool
        if not enabled:
            return "CUDA graphs off"
        options.speed_options(self._offload, True)
        if self._device.type != "cuda":
            note = f"CUDA graphs skipped: they need a CUDA device, and this pipeline runs on {self._device.type}"
            return self._skipped(note, warn)
        self._graphs = GraphedStep(self._forward)
        return "denoising steps replay as a CUDA graph, captured at the first step of each size"

    def _skipped(self, note: str, warn: bool) -> str:
        if note not in self.notes:
            self.notes.append(note)
        if warn:
            warnings.warn(note, RuntimeWarning, stacklevel=3)
        return note

    def release_memory(self) -> None:
        """Give back what a failed edit held: the CUDA graph's memory pool (the next step captures again), the
        garbage, and the device's cached memory."""
        if self._graphs is not None:
            self._graphs.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()

    # ---- what the pipeline asks for -----------------------------------------------------------------------------

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Stage ``name``'s weights on the device for the duration of the block (a no-op without offload)."""
        return self._offloader.stage(name) if self._offloader is not None else nullcontext()

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ``"image"`` stage: unscaled latents of (B, 3, H, W) pixels, in tiles if need be (larger than one)."""
        vae = self._components.vae
        batch, _, height, width = pixels.shape
        size, stride = self._vae_tile
        self._vae_tiled = self.uses_vae_tiling(batch, height, width) and max(height, width) > size
        with self.stage("image"):
            if self._vae_tiled:
                return tiled_encode(vae.encoder, pixels, vae.spatial_compression_ratio, size, stride)
            return vae.encode(pixels)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The ``"decode"`` stage: pixels of unscaled latents, in tiles if need be (larger than one)."""
        vae = self._components.vae
        factor = vae.spatial_compression_ratio
        batch, _, height, width = latents.shape
        size, stride = self._vae_tile
        self._vae_tiled = self.uses_vae_tiling(batch, height * factor, width * factor) and (
            max(height, width) > size // factor
        )
        with self.stage("decode"):
            if self._vae_tiled:
                return tiled_decode(vae.decoder, latents, factor, size, stride)
            return vae.decode(latents)

    def uses_vae_tiling(self, batch: int, height: int, width: int) -> bool:
        """:attr:`vae_tiling` if set; else tile only when the device has less free memory than the VAE needs."""
        if self._vae_tiling is not None:
            return self._vae_tiling
        vae = self._components.vae
        free = free_device_bytes(self._device)
        return free is not None and free < vae_activation_bytes(vae.config, batch, height, width, vae.dtype)

    def denoiser(self, context: torch.Tensor) -> Denoiser:
        """The transformer as the denoise loop calls it, with the context made ready here, once per edit."""
        transformer = self._components.transformer
        ready = transformer.project_context(context)
        if self._offload != "sequential":  # streamed blocks hold their weights only inside their own forward
            ready = transformer.context_keys_values(ready)
        step = self._graphs or self._forward
        return lambda x, t: step(x, ready, t)

    def _forward(self, x: torch.Tensor, ready: Context, timestep: torch.Tensor) -> torch.Tensor:
        """One DiT forward, its compiled or eager code as the compile choice says for this input's shape."""
        forward = self._components.transformer.forward_projected
        choice = self._compile_choice
        if choice is None:
            return forward(x, ready, timestep)
        shape = tuple(x.shape)
        if not self._compiled:
            if not choice.compiled(shape):
                return forward(x, ready, timestep)  # nothing is compiled: no stance to set, no compiler to import
            # auto's first size to run compiled. Inside a CUDA graph's warm-up, if any: it captures what runs here.
            backend, warn = self._deferred_compile
            self._compile_blocks(backend, None, warn)
            if not self._compiled:  # the compiler cannot run here (noted): eager from now on
                self._compile_choice = None
                return forward(x, ready, timestep)
        with choice.context(shape):
            out = forward(x, ready, timestep)
        choice.ran(shape)
        return out

    def loop_guard(self) -> AbstractContextManager[None]:
        """With the sync check on CUDA, any host-device sync inside the denoise loop raises."""
        if not (self._sync_check and self._device.type == "cuda"):
            return nullcontext()
        return _cuda_sync_errors()


@contextmanager
def _cuda_sync_errors() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
