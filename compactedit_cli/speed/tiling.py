"""The automatic VAE-tiling rule: the DC-AE's activations against the memory the device has free.

On large images the VAE, not the DiT, sets the peak of an edit. A DC-AE's activation peak comes from its stage with
the most values per output pixel: stage ``i`` runs ``block_out_channels[i]`` channels at ``1/2**i`` of the image's
side, so ``channels / 4**i`` values per pixel, and the encoder and decoder each hold a few such feature maps at once.
The estimate is that stage's size times a constant number of live copies, in the VAE's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Live copies of the widest stage at the peak, calibrated so the real DC-AE f32c32 (128 channels at full resolution)
# gives its measured 3,200 bytes per output pixel in fp32 (BENCHMARKS.md, section 5: CPU peak RSS + 25%).
VAE_LIVE_COPIES = 6.25


def vae_activation_bytes(vae_config: Mapping[str, Any], batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated peak activation memory of a DC-AE encode or decode of ``batch`` images of ``height`` x ``width``.

    ``vae_config`` is the VAE's diffusers config (its FrozenDict or the ``config.json`` mapping).
    """
    values_per_pixel = max(
        channels / 4**stage
        for key in ("encoder_block_out_channels", "decoder_block_out_channels")
        for stage, channels in enumerate(vae_config[key])
    )
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(batch * height * width * values_per_pixel * itemsize * VAE_LIVE_COPIES)


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a CUDA device can still hand out (free plus cached-but-unused); ``None`` where it is not known."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
