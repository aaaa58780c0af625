"""One device kept busy: decode ahead on a reader thread, compute on the caller's thread, save behind on a writer.

The queues between the three are bounded, so memory stays flat however long the batch. The stages are the
Editor's own (:meth:`~compactedit_cli.editor.Editor.prepare`, ``compute_many``, ``save``): there is one edit path.
Outcomes are reported by the writer as it finishes them (the order the device computed them); a full disk stops
the run after the outcome that met it, and what was computed but not yet written is left for a resume.

The busy fraction is the share of the steady state (from the end of the first group, so model warm-up and any
compile are left out, to the end of the last) that the device spends inside an edit. On CUDA each edit is timed
by CUDA events, the device's own clock; elsewhere by the wall clock. Time inside an edit counts as busy even where
the host, not the device, is working (the VLM's tokeniser), so it is an upper bound on true device use.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..editor import ComputedJob, EditJob, Editor, JobOutcome, Prepared
from ..options import OutputOptions

_END = object()


@dataclass
class BusyClock:
    """Seconds the device spent computing, and the steady-state window they fall in."""

    busy: float = 0.0
    window_start: float | None = None
    window_end: float | None = None
    first_done: bool = False

    def fraction(self) -> float | None:
        """Busy seconds over the steady-state window; None before two groups have run."""
        if self.window_start is None or self.window_end is None or self.window_end <= self.window_start:
            return None
        return min(1.0, self.busy / (self.window_end - self.window_start))

    def to_dict(self) -> dict[str, Any]:
        """Plain values a worker process sends back: busy seconds and the window's length."""
        window = None
        if self.window_start is not None and self.window_end is not None:
            window = self.window_end - self.window_start
        return {"busy": self.busy, "window": window}


def mean_busy(clocks: Iterable[dict[str, Any]]) -> float | None:
    """Several devices' busy fraction together: their busy seconds over their windows (None if none measured)."""
    measured = [c for c in clocks if c.get("window")]
    if not measured:
        return None
    return min(1.0, sum(c["busy"] for c in measured) / sum(c["window"] for c in measured))


class _DeviceTimer:
    """Times one compute call: CUDA events on a CUDA device (the device clock), else the wall clock."""

    def __init__(self, device: Any) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def start(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, begun: Any) -> float:
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return begun.elapsed_time(end) / 1000.0
        return time.perf_counter() - begun


def edit_pipelined(
    editor: Editor,
    jobs: Iterable[EditJob],
    on_outcome: Callable[[JobOutcome], None],
    *,
    batch_size: int = 1,
    output_options: OutputOptions | None = None,
    clock: BusyClock | None = None,
) -> None:
    """Edit ``jobs`` as :meth:`Editor.edit_many` does, decoding and writing overlapping the device's work.

    ``on_outcome`` gets each job's outcome, on the writer thread, once its output is written (or has failed); it
    is called from that one thread only. It returns when every job is done, or after the outcome with a fatal
    error; an error raised by ``on_outcome`` (the results log's disk) stops the run and is raised here.
    """
    out = output_options or OutputOptions()
    clock = clock if clock is not None else BusyClock()
    depth = 2 * batch_size + 1
    ahead: queue.Queue[Any] = queue.Queue(maxsize=depth)
    behind: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failures: list[BaseException] = []

    def read() -> None:
        try:
            for job in jobs:
                if stop.is_set():
                    break
                _put(ahead, editor.prepare(job), stop)
        except BaseException as exc:  # surfaced on the caller's thread
            failures.append(exc)
        finally:
            _put(ahead, _END, stop)

    def write() -> None:
        try:
            while (done := behind.get()) is not _END and not stop.is_set():
                outcome = editor.save(done, out) if isinstance(done, ComputedJob) else done
                on_outcome(outcome)
                if outcome.fatal is not None:
                    break
        except BaseException as exc:
            failures.append(exc)
        finally:
            stop.set()

    def feed() -> Iterator[Prepared | JobOutcome]:
        while (item := ahead.get()) is not _END and not stop.is_set():
            yield item

    reader = threading.Thread(target=read, daemon=True)
    writer = threading.Thread(target=write, daemon=True)
    reader.start()
    writer.start()
    timer = _DeviceTimer(editor.device)
    computing = editor.compute_many(feed(), batch_size=batch_size, ready=lambda: not ahead.empty())
    try:
        while not stop.is_set():
            begun = timer.start()
            started = time.perf_counter()
            done = next(computing, _END)
            if done is _END:
                break
            if isinstance(done, ComputedJob):
                _tick(clock, timer.seconds(begun), started)
            _put(behind, done, stop)
        _put(behind, _END, stop)
        writer.join()
    finally:
        stop.set()  # after Ctrl-C: the writer finishes the write under way (atomic either way) and stops
        _drain(ahead)
        _drain(behind)
        behind.put(_END)
        writer.join()
        reader.join(timeout=1)  # a reader blocked on its source is a daemon: it dies with the process
    if failures:
        raise failures[0]


def _tick(clock: BusyClock, seconds: float, started: float) -> None:
    """Count one computed group; the steady-state window opens when the first one ends (warm-up left out)."""
    now = time.perf_counter()
    if not clock.first_done:
        clock.first_done = True
        clock.window_start = now
        return
    clock.busy += min(seconds, now - started)
    clock.window_end = now


def _put(target: queue.Queue[Any], value: Any, stop: threading.Event) -> None:
    """Put, giving up once the run stops (so no thread waits forever on a queue nobody reads)."""
    while True:
        try:
            target.put(value, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                return


def _drain(target: queue.Queue[Any]) -> None:
    while True:
        try:
            target.get_nowait()
        except queue.Empty:
            return
