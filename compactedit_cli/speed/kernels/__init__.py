"""Fused Triton kernels for the memory-bound glue of the DiT and the DC-AE, switched by
:meth:`~..plan.SpeedPlan.set_kernels`.

* :func:`~.linear_attention.linear_attention`: Sana's ReLU linear attention in two kernels, reading the bf16
  projections in their (B, N, heads·D) layout and accumulating in float32 inside the kernel (no float32 copies of
  the activations, no head transposes).
* :func:`~.linear_attention.multiscale_linear_attention`: the same kernels for the DC-AE's multi-scale attention,
  reading q, k and v straight from its channels-last qkv map (no float32 copy of the map) and writing the
  channels-last tokens its output projection takes.
* :func:`~.depthwise_glu.depthwise_glu`: the 3×3 depthwise convolution with its SiLU gate of the DiT's feed-forward
  and the DC-AE's GLUMBConv, one pass over the channels-last activations.
* :func:`~.norm_modulate.norm_modulate` and :func:`~.norm_modulate.gated_residual`: the Sana block's LayerNorms
  with their adaLN modulation and its residual adds, one row-wise kernel that adds a (gated) update to the residual
  stream and normalises and modulates the result in one pass, in float32.
* :func:`~.norm_residual.rms_norm_residual`: the DC-AE's closing RMS norm over channels plus the residual add of
  every block, one pass over the channels-last maps.

This module imports no Triton: :func:`kernels_unavailable` says why the kernels cannot run here, and the kernel
modules are imported only once they can. Triton decides at import whether its interpreter runs the kernels
(``TRITON_INTERPRET=1``, how the tests run them on the CPU), so that variable must be set before the first import.
Interpreted kernels are opaque to ``torch.compile`` (dynamo would trace the interpreter itself), so
:class:`~..plan.SpeedPlan` runs them outside the compiled graphs there.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors), as ``TRITON_INTERPRET=1`` asks."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def kernels_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` here, or ``None`` when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'compactedit[kernels]')"
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return None
    return f"the Triton kernels need a CUDA device, and this pipeline runs on {device.type}"
