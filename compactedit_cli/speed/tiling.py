"""The automatic VAE-tiling rule: the DC-AE's activations against the memory the device has free.

At 2048² the VAE, not the DiT, sets the peak: its first and last stages run 128 channels at full resolution.
``VAE_BYTES_PER_PIXEL_FP32`` is the peak extra memory of the real DC-AE f32c32 per output pixel, measured on the CPU
(fp32, batch 1): 2,435 bytes for a decode and 2,560 for an encode at 512² (peak RSS over the inputs and weights),
plus 25% for allocator fragmentation. It scales with the element size, so bf16 needs half: 1,600 bytes, and an
H200 measured about 1,550 for a bf16 encode at 2048² (``BENCHMARKS.md``, section H).
"""

from __future__ import annotations

import torch

VAE_BYTES_PER_PIXEL_FP32 = 3200


def vae_activation_bytes(batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated peak activation memory of a DC-AE encode or decode of ``batch`` images of ``height`` x ``width``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return batch * height * width * VAE_BYTES_PER_PIXEL_FP32 * itemsize // 4


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a CUDA device can still hand out (free plus cached-but-unused); ``None`` where it is not known."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
