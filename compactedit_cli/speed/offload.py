"""Weight offload: weights live in CPU memory and each stage's weights sit on the device only while it runs.

Modes (:data:`compactedit_cli.options.OFFLOAD_MODES`, which checks them):

``none``
    Everything stays on the device (fastest; needs room for all ~4.3 B parameters).
``model``
    A stage's weights move in whole before it runs and out after: text encoder + edit head for the prompt, the VAE
    encoder for the source image, the DiT for denoising, the VAE decoder for decoding. The peak holds one stage.
``sequential``
    As ``model``, except that the repeated blocks of a stage (the layers of each top-level ``ModuleList``) move in
    one at a time, right before they run. The peak holds one block plus a stage's small remainder, for very small
    GPUs; the price is uploading the DiT's weights at every step.

The CPU copy stays the master and is never written back: offloading just drops the device copy. On CUDA the
masters are pinned, so uploads do not block the host. Buffers (rotary tables) are small and stay on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..loading.checkpoint import Components


def top_level_blocks(module: nn.Module, skip: tuple[str, ...] = ()) -> list[nn.Module]:
    """The elements of the outermost ``ModuleList``s inside ``module`` (names under ``skip`` left out)."""
    blocks: list[nn.Module] = []
    lists: list[str] = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or name.startswith(skip):
            continue
        if any(name.startswith(outer + ".") for outer in lists):
            continue
        lists.append(name)
        blocks.extend(child)
    return blocks


class WeightOffloader:
    """Moves named groups of parameters between their CPU masters and the execution device."""

    def __init__(
        self,
        stages: dict[str, list[nn.Parameter]],
        device: torch.device,
        *,
        buffers: Iterable[torch.Tensor] = (),
        streamed: dict[str, list[nn.Module]] | None = None,
    ) -> None:
        self.device = device
        self._masters: dict[nn.Parameter, torch.Tensor] = {}
        for params in stages.values():
            for param in params:
                if param not in self._masters:
                    self._masters[param] = self._master_copy(param.data)
        for buffer in buffers:
            buffer.data = buffer.data.to(device)
        self._hooks = []
        block_params: set[nn.Parameter] = set()
        for blocks in (streamed or {}).values():
            for block in blocks:
                params = list(block.parameters())
                block_params.update(params)
                self._hooks.append(block.register_forward_pre_hook(lambda _m, _a, p=params: self._onload(p)))
                self._hooks.append(block.register_forward_hook(lambda _m, _a, _o, p=params: self._offload(p)))
        # A stage onloads what its streamed blocks do not bring in themselves.
        self.stages = {name: [p for p in params if p not in block_params] for name, params in stages.items()}
        self._offload(self._masters)

    def _master_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        master = tensor.to("cpu")
        if self.device.type == "cuda":
            master = master.pin_memory()
        return master

    def _onload(self, params: Iterable[nn.Parameter]) -> None:
        for param in params:
            param.data = self._masters[param].to(self.device, non_blocking=True)

    def _offload(self, params: Iterable[nn.Parameter]) -> None:
        for param in params:
            param.data = self._masters[param]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Hold stage ``name``'s weights on the device for the duration of the block."""
        params = self.stages[name]
        self._onload(params)
        try:
            yield
        finally:
            self._offload(params)

    def restore(self) -> None:
        """Put every weight back on the device for good and remove the hooks (offload ``none``)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._onload(self._masters)
        self._masters.clear()


def stage_offloader(components: Components, device: torch.device, *, sequential: bool) -> WeightOffloader:
    """The pipeline's four stages: prompt (text encoder, edit head, meta queries), image, denoise, decode."""
    text_encoder, transformer, vae = components.text_encoder, components.transformer, components.vae
    head = ("edit_head.", "meta_queries")
    stages = {
        "prompt": [*text_encoder.parameters(), *transformer.edit_head.parameters(), transformer.meta_queries],
        "image": list(vae.encoder.parameters()),
        "denoise": [p for n, p in transformer.named_parameters() if not n.startswith(head)],
        "decode": list(vae.decoder.parameters()),
    }
    streamed = None
    if sequential:
        streamed = {
            "prompt": top_level_blocks(text_encoder) + top_level_blocks(transformer.edit_head),
            "image": top_level_blocks(vae.encoder),
            "denoise": top_level_blocks(transformer, skip=("edit_head",)),
            "decode": top_level_blocks(vae.decoder),
        }
    buffers = [b for module in (text_encoder, transformer, vae) for b in module.buffers()]
    return WeightOffloader(stages, device, buffers=buffers, streamed=streamed)
