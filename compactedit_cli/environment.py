"""What this machine is, for bug reports (``compactedit selftest``) and benchmark reports (``compactedit bench``).

One report, so a selftest pasted into an issue and a benchmark JSON describe a machine with the same fields.
torch and the model libraries are imported when a report is made, never at import: ``--help`` stays cheap.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def cpu_name() -> str:
    """The CPU's marketing name where Linux says it, else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment_report(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions, and the facts of ``device`` (default: the one an edit would pick) and of its host.

    Returns ``{"versions": {...}, "device": {...}}``, every value JSON-serialisable. ``device`` holds the device's
    ``type``, ``name``, ``total_memory_bytes`` and ``capability`` (CUDA only; otherwise the CPU's name and None),
    which accelerators the host has, and the host's CPU, memory, platform and load average (other work skews CPU
    timings, so a benchmark reads it before its runs).
    """
    import diffusers
    import psutil
    import torch
    import transformers

    from . import __version__
    from .engine.pipeline import default_device

    device = torch.device(device) if device is not None else default_device()
    cuda, cpu = torch.cuda.is_available(), cpu_name()
    about: dict[str, Any] = {"type": device.type, "name": cpu, "total_memory_bytes": None, "capability": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        about.update(name=props.name, total_memory_bytes=props.total_memory, capability=[props.major, props.minor])
    about.update(
        cuda_available=cuda,
        mps_available=torch.backends.mps.is_available(),
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        cpu_name=cpu,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        host_memory_bytes=psutil.virtual_memory().total,
        platform=platform.platform(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    versions = {
        "compactedit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    return {"versions": versions, "device": about}
