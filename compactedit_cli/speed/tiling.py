"""VAE tiling: tiled encode and decode, and the automatic rule (the DC-AE's activations against free memory).

Tiles are cut, run, cross-faded and cropped as diffusers' ``AutoencoderDC.tiled_encode`` / ``tiled_decode`` do
(same tile sizes, strides, blend ramps and rounding, blends applied in place in the same order), so a tiled
result equals diffusers' tiled result (``tests/test_own_dcae.py``).

On large images the VAE, not the DiT, sets the peak of an edit. A DC-AE's activation peak comes from its stage with
the most values per output pixel: stage ``i`` runs ``block_out_channels[i]`` channels at ``1/2**i`` of the image's
side, so ``channels / 4**i`` values per pixel, and the encoder and decoder each hold a few such feature maps at once.
The estimate is that stage's size times a constant number of live copies, in the VAE's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

# Live copies of the widest stage at the peak, calibrated so the real DC-AE f32c32 (128 channels at full resolution)
# gives its measured 3,200 bytes per output pixel in fp32 (BENCHMARKS.md, section 5: CPU peak RSS + 25%).
VAE_LIVE_COPIES = 6.25


def vae_activation_bytes(vae_config: Mapping[str, Any], batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated peak activation memory of a DC-AE encode or decode of ``batch`` images of ``height`` x ``width``.

    ``vae_config`` is the VAE's config (:class:`~compactedit_cli.models.dcae.DCAEConfig` or ``config.json``).
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


Network = Callable[[torch.Tensor], torch.Tensor]


def tiled_encode(encoder: Network, pixels: torch.Tensor, factor: int, size: int, stride: int) -> torch.Tensor:
    """``encoder`` over ``size``² pixel tiles every ``stride`` pixels, blended over the overlap in latents.

    Edge tiles are zero-padded up to a multiple of ``factor``; the result is cropped to the image's latent size.
    Used only when the image is larger than one tile (as diffusers uses it).
    """
    height, width = pixels.shape[-2:]
    rows = []
    for top in range(0, height, stride):
        row = []
        for left in range(0, width, stride):
            tile = pixels[:, :, top : top + size, left : left + size]
            pad_h, pad_w = (-tile.shape[2]) % factor, (-tile.shape[3]) % factor
            row.append(encoder(F.pad(tile, (0, pad_w, 0, pad_h)) if pad_h or pad_w else tile))
        rows.append(row)
    latent_size, latent_stride = size // factor, stride // factor
    merged = _blend_tiles(rows, latent_size - latent_stride, latent_stride)
    return merged[:, :, : height // factor, : width // factor]


def tiled_decode(decoder: Network, latents: torch.Tensor, factor: int, size: int, stride: int) -> torch.Tensor:
    """``decoder`` over (``size``/``factor``)² latent tiles every ``stride``/``factor`` latents, blended in pixels."""
    height, width = latents.shape[-2:]
    latent_size, latent_stride = size // factor, stride // factor
    rows = [
        [
            decoder(latents[:, :, top : top + latent_size, left : left + latent_size])
            for left in range(0, width, latent_stride)
        ]
        for top in range(0, height, latent_stride)
    ]
    return _blend_tiles(rows, size - stride, stride)


def _blend_tiles(rows: list[list[torch.Tensor]], overlap: int, keep: int) -> torch.Tensor:
    """Cross-fade each tile into the one above and the one to its left (in place, row by row, so a tile blends
    with neighbours already blended), keep each tile's first ``keep`` rows and columns, and join them."""
    joined = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, overlap, dim=2)
            if j > 0:
                _blend(row[j - 1], tile, overlap, dim=3)
        joined.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
    return torch.cat(joined, dim=2)


def _blend(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Ramp ``tile``'s first ``extent`` lines along ``dim`` from ``before``'s last ones, in place.

    Line ``y`` becomes ``before·(1 - y/extent) + tile·(y/extent)``: each product rounded to the tiles' dtype
    before the sum, as diffusers' line-by-line loop (a tensor times a Python float) rounds it.
    """
    extent = min(before.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1] * tile.dim()
    shape[dim] = extent
    weight = ramp.to(torch.float32).view(shape).to(tile.device)
    rest = (1 - ramp).to(torch.float32).view(shape).to(tile.device)
    head = tile.narrow(dim, 0, extent)
    tail = before.narrow(dim, before.shape[dim] - extent, extent)
    head.copy_((tail.float() * rest).to(tile.dtype) + (head.float() * weight).to(tile.dtype))
