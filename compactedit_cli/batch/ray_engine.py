"""``--engine ray``: the same batch as a Ray Data job, for a whole cluster (the optional extra ``compactedit[ray]``).

The planned items become a dataset; CPU tasks decode them; an actor pool of the Editor edits them (one actor per
GPU, ``num_gpus=1``, or CPU actors with ``num_cpus=1``); CPU tasks encode and write the outputs, through the same
``Editor.save`` as the local engine. The driver appends each finished line to the results file as it streams back,
so resume, failures, collisions, metadata and ``results.jsonl`` are the local engine's. OUT_DIR (and the inputs)
must be on a filesystem every node shares. A dead actor is restarted and its batch retried by Ray; an item whose
task still fails is recorded as failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from ..editor import ComputedJob, Editor, JobOutcome
from ..errors import CompactEditError, DiskFullError, UsageError
from ..options import ModelOptions, OutputOptions
from .plan import BatchItem
from .results import ResultsLog
from .run import BatchSummary, Finishes, begin, in_order, result_line
from .workers import cpu_threads, cpu_worker_env

ACTOR_RESTARTS = 2  # a dead actor (kill -9, out of memory) comes back this often
TASK_RETRIES = 1  # and the batch it held is tried again once


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    """A CPU task: open one item's image (a bad one travels on as the item's failure)."""
    from ..files.imaging import open_image

    item: BatchItem = pickle.loads(row["payload"])
    try:
        opened: Any = open_image(item.source)
    except CompactEditError as exc:
        opened = JobOutcome(item, "failed", error=str(exc))
    return {"payload": pickle.dumps((item, opened))}


class _EditActor:
    """One model per actor, loaded once; edits a batch of decoded items."""

    def __init__(self, model: ModelOptions, batch_size: int, threads: int | None) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)  # a CPU actor's share of the node, as a local CPU worker's
        self.editor = Editor(model)
        self.batch_size = batch_size
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # which actor edited a row, for the steady rate

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        prepared = []
        for payload in batch["payload"]:
            item, opened = pickle.loads(payload)
            prepared.append(opened if isinstance(opened, JobOutcome) else self.editor.prepare(item, opened))
        done = list(self.editor.compute_many(prepared, batch_size=self.batch_size))
        return {"payload": [pickle.dumps(one) for one in done], "worker": [self.name] * len(done)}


def _write(row: dict[str, Any], output_options: OutputOptions) -> dict[str, Any]:
    """A CPU task: encode and write one edit (or pass its failure on) and give back its results line."""
    done: ComputedJob | JobOutcome = pickle.loads(row["payload"])
    outcome = done if isinstance(done, JobOutcome) else Editor.save(done, output_options)
    fatal = str(outcome.fatal) if outcome.fatal is not None else ""
    line = pickle.dumps(result_line(outcome.job, outcome.status, outcome))
    return {"line": line, "fatal": fatal, "worker": row["worker"]}


def _actors(ray: Any, model: ModelOptions, workers: int | None) -> tuple[int, dict[str, Any], int | None]:
    """How many edit actors, what each asks of the cluster (a GPU each where there are GPUs, else an even share of
    the CPUs, and a local CPU worker's environment), and a CPU actor's torch threads (as many as the CPUs it
    holds, as for a local CPU worker)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if model.device != "cpu" and gpus:
        return workers or gpus, {"num_gpus": 1}, None
    if model.device not in ("cpu", "auto"):
        raise UsageError(f"--device {model.device}: the Ray cluster has no GPU")
    count = workers or 1
    threads = cpu_threads(count, int(ray.cluster_resources().get("CPU", 1)))
    return count, {"num_cpus": threads, "runtime_env": {"env_vars": cpu_worker_env()}}, threads


def run_ray(
    model: ModelOptions,
    items: list[BatchItem],
    log: ResultsLog,
    *,
    address: str | None,
    overwrite: bool,
    workers: int | None = None,
    batch_size: int = 1,
    output_options: OutputOptions | None = None,
    on_item: Callable[[dict[str, Any]], None] = lambda _line: None,
    status: Callable[[str], None] = lambda _message: None,
) -> BatchSummary:
    """Edit ``items`` as a Ray Data job on the cluster at ``address`` (None: a local cluster for the run)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'compactedit[ray]'") from None
    out = output_options or OutputOptions()
    finishes = Finishes()  # start-up counts Ray's own: a local cluster's start, the actors' imports and loads
    summary, finish, todo = begin(items, log, model, overwrite=overwrite, on_item=on_item)
    if not todo:
        summary.records = in_order(summary.records, items)
        return summary
    status(f"connecting to Ray at {address}" if address else "starting a local Ray cluster")
    joined = ray.is_initialized()  # a host program's own Ray session is used as it is, and left running
    # Ray's driver prints its cluster's messages ("(raylet) A worker died …") to sys.stdout; stdout is ours (--json,
    # paths). Our own session is shut down inside the redirect, which flushes them all; a joined host session
    # keeps printing them, later, where its host's Ray prints.
    with contextlib.redirect_stdout(sys.stderr):
        if not joined:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray's own chatter is not our interface
            context.max_errored_blocks = -1  # an item whose task fails for good is recorded failed, the rest go on
            count, resources, threads = _actors(ray, model, workers)
            # CPU actors may hold every core; the light decode and write tasks then must not wait for one (a
            # deadlock), and without a CPU to wait for, only a cap keeps many of them from crowding the actors.
            light = {"num_cpus": 0, "concurrency": count} if threads is not None else {"num_cpus": 0.25}
            summary.workers = count
            rows = [{"payload": pickle.dumps(item)} for item in todo]
            dataset = (
                ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * count))
                .map(_decode, **light)
                .map_batches(
                    _EditActor,
                    fn_constructor_kwargs={"model": model, "batch_size": batch_size, "threads": threads},
                    batch_size=batch_size,
                    compute=ray.data.ActorPoolStrategy(size=count),
                    max_restarts=ACTOR_RESTARTS,
                    max_task_retries=TASK_RETRIES,
                    **resources,
                )
                .map(_write, fn_kwargs={"output_options": out}, **light)
            )
            status(f"editing on {count} Ray actor(s)")
            started = time.perf_counter()
            for row in dataset.iter_rows():
                finish(pickle.loads(row["line"]))
                finishes.add(row["worker"])
                if row["fatal"]:
                    summary.stopped = DiskFullError(row["fatal"])  # the one fatal fault
                    break
            summary.seconds = time.perf_counter() - started
            finishes.measure(summary)
        finally:
            if not joined:
                ray.shutdown()
    if summary.stopped is None:
        seen = {line["output"] for line in summary.records}
        for item in todo:
            if item.key not in seen:
                finish(result_line(item, "failed", error="its Ray task failed, retries included"))
    summary.records = in_order(summary.records, items)
    return summary
