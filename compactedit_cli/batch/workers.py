"""Several devices on one machine: one worker process per device, each loading the model once.

The parent keeps the queue and hands each worker a few items at a time as it finishes others, so mixed sizes
balance, and it alone writes ``results.jsonl``. It always knows which items a worker holds, so when a worker dies
(``kill -9``, the kernel's out-of-memory killer) those items are retried once on another worker, or recorded as
failed, and the run goes on. Workers ignore Ctrl-C: the parent, which the terminal interrupts with them, stops
them all and keeps every line written so far. Each worker runs the one-device pipeline (decode ahead, write behind)
on the Editor, built in the worker from :class:`~compactedit_cli.options.ModelOptions`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from ..editor import JobOutcome
from ..errors import CompactEditError, UsageError, internal_error
from ..options import ALL_DEVICES, ModelOptions, OutputOptions
from .pipelined import BusyClock, edit_pipelined, mean_busy
from .plan import BatchItem
from .results import ResultsLog
from .run import BatchSummary, Finishes, begin, in_order, is_done, result_line, skipped_line

RETRIES = 1  # a dead worker's items are tried once more elsewhere


def resolve_devices(devices: list[str] | str | None, workers: int | None, device: str) -> list[str]:
    """One device name per worker: ``--devices`` as given (``all``: every CUDA device), or ``--workers`` copies of
    ``--device``."""
    if devices == ALL_DEVICES:
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError("--devices all found no CUDA device; name them (cpu,cpu) or use --workers")
        return [f"cuda:{index}" for index in range(count)]
    if isinstance(devices, list):
        return devices
    return [device] * (workers or 1)


def cpu_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads for each of ``workers`` CPU workers on ``cores`` (default: this machine's): an even share,
    since each would otherwise start one thread per core and threads that outnumber the cores spin against each
    other; within ``OMP_NUM_THREADS`` where the user set it."""
    share = max(1, (cores or os.cpu_count() or 1) // max(1, workers))
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(asked)) if asked.isdigit() and int(asked) > 0 else share


def cpu_worker_env() -> dict[str, str]:
    """The environment a CPU worker's OpenMP starts with: idle threads sleep rather than spin (``OMP_WAIT_POLICY``,
    unless the user set it), since on cores that other processes also want, a thread spinning while it waits for
    its peers takes the core one of them needs, and an edit can run many times slower (BENCHMARKS.md, S.2)."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _threads(devices: list[str]) -> int | None:
    cpu = sum(1 for name in devices if name == "cpu")
    return cpu_threads(cpu) if cpu else None


def _worker(conn: Connection, model: ModelOptions, batch_size: int, out: OutputOptions, threads: int | None) -> None:
    """A worker process: load once, then edit what the parent sends until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads is not None and model.device == "cpu":
        os.environ.update(cpu_worker_env())  # before torch loads its OpenMP, which reads it once
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)  # the edit never forks inter-op work; its pool would only take cores
    from ..editor import Editor

    try:
        editor = Editor(model)
    except CompactEditError as exc:
        conn.send(("error", exc))
        return
    except Exception as exc:
        conn.send(("error", CompactEditError(internal_error(exc))))
        return
    conn.send(("ready", editor.notes))

    def jobs():
        while (item := conn.recv()) is not None:
            yield item

    def finished(outcome: JobOutcome) -> None:  # on the writer thread, the only one that sends from now on
        conn.send(("done", result_line(outcome.job, outcome.status, outcome), outcome.fatal))

    clock = BusyClock()
    edit_pipelined(editor, jobs(), finished, batch_size=batch_size, output_options=out, clock=clock)
    conn.send(("clock", clock.to_dict()))


@dataclasses.dataclass
class _Worker:
    device: str
    process: Any
    conn: Connection
    held: list[BatchItem] = dataclasses.field(default_factory=list)
    ready: bool = False
    stopping: bool = False
    clock: dict[str, Any] | None = None


def _death(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exited with status {code}"


def run_workers(
    model: ModelOptions,
    devices: list[str],
    items: list[BatchItem],
    log: ResultsLog,
    *,
    overwrite: bool,
    batch_size: int = 1,
    output_options: OutputOptions | None = None,
    on_item: Callable[[dict[str, Any]], None] = lambda _line: None,
    status: Callable[[str], None] = lambda _message: None,
    warn: Callable[[str], None] = lambda _message: None,
) -> BatchSummary:
    """Edit ``items`` on one worker process per entry of ``devices``; lines come back in the items' order."""
    from ..loading.hub import is_offline, parse_model, resolve

    out = output_options or OutputOptions()
    finishes = Finishes()
    summary, finish, todo = begin(items, log, model, overwrite=overwrite, on_item=on_item, workers=len(devices))
    if not todo:
        summary.records = in_order(summary.records, items)
        return summary
    status(f"resolving {model.model}")
    resolve(parse_model(model.model, model.revision), offline=is_offline(model.offline))  # downloads once, here
    context = multiprocessing.get_context("spawn")
    threads = _threads(devices)
    workers: list[_Worker] = []
    for device in devices:
        mine, theirs = context.Pipe()
        process = context.Process(
            target=_worker,
            args=(theirs, dataclasses.replace(model, device=device), batch_size, out, threads),
            daemon=True,
        )
        process.start()
        theirs.close()
        workers.append(_Worker(device, process, mine))
    status(f"loading the model on {len(workers)} workers")
    queue = deque(todo)
    tries: dict[str, int] = {}
    depth = 2 * batch_size + 1
    started: float | None = None

    def lost(worker: _Worker, reason: str) -> None:
        """A worker died: retry what it held once elsewhere, or record it failed."""
        worker.stopping = True
        live = [w for w in workers if w.process.is_alive() and not w.stopping]
        if summary.stopped is None:
            warn(f"the worker on {worker.device} {reason}; {len(worker.held)} item(s) it held go to the others")
        for item in reversed(worker.held):
            if summary.stopped is not None:
                break  # left for a resume
            if is_done(item, overwrite):  # written, but the worker died before saying so
                finish(skipped_line(item, log, model))
            elif tries.get(item.key, 0) < RETRIES and live:
                tries[item.key] = tries.get(item.key, 0) + 1
                queue.appendleft(item)
            else:
                retried = " (retried once)" if tries.get(item.key) else ""
                finish(result_line(item, "failed", error=f"the worker editing it {reason}{retried}"))
        worker.held.clear()
        if not live and summary.stopped is None:
            while queue:
                finish(result_line(queue.popleft(), "failed", error=f"every worker died (the last {reason})"))

    def receive(worker: _Worker) -> bool:
        """Handle one message; False once the worker's end of the pipe is gone."""
        nonlocal started
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return False
        started = _handle(message, worker, summary, finish, started, finishes)
        return True

    try:
        while any(not w.conn.closed for w in workers):
            finished = summary.stopped is not None or (not queue and not any(w.held for w in workers))
            for worker in workers:
                if not worker.ready or worker.stopping:
                    continue
                if finished:
                    worker.conn.send(None)
                    worker.stopping = True
                    continue
                while queue and len(worker.held) < depth:
                    item = queue.popleft()
                    worker.held.append(item)
                    worker.conn.send(item)
            watched: dict[Any, _Worker] = {}
            for worker in workers:
                if not worker.conn.closed:
                    watched[worker.conn] = worker
                    watched[worker.process.sentinel] = worker
            for ready in wait(list(watched)):
                worker = watched[ready]
                if worker.conn.closed or (ready is worker.conn and receive(worker)):
                    continue
                while worker.conn.poll() and receive(worker):  # its last messages, before it ended
                    pass
                worker.process.join(timeout=5)
                if worker.clock is None:  # it ended without finishing its work
                    lost(worker, _death(worker.process))
                worker.conn.close()
    finally:
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
    summary.seconds = time.perf_counter() - started if started is not None else 0.0
    summary.busy_fraction = mean_busy(w.clock for w in workers if w.clock)
    finishes.measure(summary)
    summary.records = in_order(summary.records, items)
    return summary


def _handle(
    message: tuple[Any, ...],
    worker: _Worker,
    summary: BatchSummary,
    finish: Callable[[dict[str, Any]], None],
    started: float | None,
    finishes: Finishes,
) -> float | None:
    """One message from a worker; returns when editing started (the first worker ready)."""
    kind = message[0]
    if kind == "ready":
        worker.ready = True
        return started if started is not None else time.perf_counter()
    if kind == "error":  # the model would not load: every worker would meet it, so the run stops
        summary.stopped = summary.stopped or message[1]
        worker.stopping = True
    elif kind == "done":
        line, fatal = message[1], message[2]
        worker.held = [item for item in worker.held if item.key != line["output"]]
        finish(line)
        finishes.add(id(worker))
        if fatal is not None:
            summary.stopped = summary.stopped or fatal
    elif kind == "clock":
        worker.clock = message[1]
    return started
