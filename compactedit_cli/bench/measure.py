"""Honest clocks and memory readings for benchmarks: device-synchronised times, per-stage peaks, foreign CPU load.

Nothing heavy at module level: torch is imported by the methods that use it.
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Min, median, max and mean of repeated measurements, and the measurements themselves."""
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "runs": list(values),
    }


class DeviceClock:
    """Wall time with the device drained first; step marks are device events where the device has them."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self._events = {"cuda": getattr(torch.cuda, "Event", None), "mps": getattr(torch.mps, "Event", None)}.get(
            device.type
        )
        self._sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)

    def now(self) -> float:
        self._sync()
        return time.perf_counter()

    def mark(self) -> Any:
        """A point in the device's stream (an event) or, on the CPU, in wall time; never waits."""
        if self._events is None:
            return time.perf_counter()
        event = self._events(enable_timing=True)
        event.record()
        return event

    def seconds_between(self, marks: Sequence[Any]) -> list[float]:
        """Durations between consecutive marks; call after :meth:`now` so every event has completed."""
        if self._events is None:
            return [b - a for a, b in itertools.pairwise(marks)]
        return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]


class PeakMemory:
    """Peak memory per stage: CUDA's allocator peaks, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, dict[str, int]] = {}

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()

    def record(self, stage: str) -> None:
        import torch

        if self.device.type == "cuda":
            now = {
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        elif self.device.type == "mps":
            now = {"driver_allocated_bytes": torch.mps.driver_allocated_memory()}
        else:
            now = {"peak_rss_bytes": _peak_rss()}
        seen = self.peaks.setdefault(stage, {})
        for key, value in now.items():
            seen[key] = max(seen.get(key, 0), value)

    def summary(self) -> dict[str, Any]:
        overall: dict[str, int] = {}
        for stage_peaks in self.peaks.values():
            for key, value in stage_peaks.items():
                overall[key] = max(overall.get(key, 0), value)
        scope = "stage" if self.device.type != "cpu" or _RSS_RESETTABLE else "process"
        return {"kind": self.device.type, "scope": scope, **overall, "stages": self.peaks}


_CLEAR_REFS = Path("/proc/self/clear_refs")
_RSS_RESETTABLE = _CLEAR_REFS.exists()


def _reset_peak_rss() -> None:
    """Linux lets a process reset its RSS high-water mark; elsewhere the peak covers the whole process."""
    if _RSS_RESETTABLE:
        with suppress(OSError):
            _CLEAR_REFS.write_text("5")


def _peak_rss() -> int:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class ForeignLoad:
    """The share of the host's CPU time that other processes used meanwhile: CPU timings are only as good as this.

    Linux only (``/proc/stat``); ``share()`` is ``None`` elsewhere.
    """

    _STAT = Path("/proc/stat")

    def __init__(self) -> None:
        self._start = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        if not self._STAT.exists():
            return None
        fields = [int(x) for x in self._STAT.read_text().splitlines()[0].split()[1:8]]
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - fields[4]) / ticks  # all but idle and iowait, in CPU seconds
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        mine = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        return busy, mine, time.monotonic()

    def share(self) -> float | None:
        end = self._read()
        if self._start is None or end is None:
            return None
        busy, mine, wall = (b - a for a, b in zip(self._start, end, strict=True))
        capacity = wall * (os.cpu_count() or 1)
        return max(0.0, busy - mine) / capacity if capacity > 0 else None
