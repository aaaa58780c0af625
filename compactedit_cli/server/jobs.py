"""Edits in order on one worker thread, behind a bounded queue.

The model is one set of weights on one device: two edits at once would only fight over it. Requests wait in order;
when ``max_queue`` are already waiting, a new one is refused at once (the caller answers 429) rather than held for
minutes. Waiting jobs that share a batch key run as one batch of up to ``max_batch``. A job whose client went away
is cancelled: skipped if it has not started, stopped at its next denoising step if it has. Results and progress
events go back to the event loop that asked, so no request handler ever blocks it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(Exception):
    """``max_queue`` edits are already waiting."""


class EditCancelledError(Exception):
    """The client that asked for this edit is gone."""


class ServerStoppedError(Exception):
    """The server was made to stop (a second Ctrl-C) before this edit was done."""


@dataclass(eq=False)
class Job:
    """One request's work. ``run(job)`` does it alone; jobs with the same ``key`` may instead be handed together to
    the queue's batch runner, which reads each one's ``item`` and the options they share, ``key_options``."""

    run: Callable[[Job], Any]
    key: Hashable | None = None
    item: Any = None
    key_options: Any = None
    on_event: Callable[[dict[str, Any]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    queued: float = field(default_factory=time.monotonic)

    def emit(self, event: dict[str, Any]) -> None:
        """Send ``event`` to the requester (from the worker thread)."""
        if self.on_event is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.on_event, event)

    def check(self) -> None:
        """Raise :class:`EditCancelledError` once the requester is gone (called between denoising steps)."""
        if self.cancelled.is_set():
            raise EditCancelledError()


BatchRunner = Callable[[list[Job]], list[Any]]


class EditQueue:
    """Runs submitted jobs in order on one thread; :meth:`submit` awaits one's result."""

    def __init__(self, max_queue: int, max_batch: int = 1, run_batch: BatchRunner | None = None) -> None:
        self.max_queue = max_queue
        self.max_batch = max_batch
        self._run_batch = run_batch
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self._running = 0
        self._current: list[Job] = []  # the group the worker runs
        self._closed = False
        self._last_seconds: float | None = None
        self.done = 0
        self.cancelled = 0
        self.last_activity = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="compactedit-editor", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._running or self._waiting)

    def position(self, job: Job) -> int:
        """How many jobs run or wait before ``job`` (0 once it runs)."""
        with self._lock:
            try:
                return self._waiting.index(job) + self._running
            except ValueError:
                return 0

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one edit's time (the last one's), at least 1."""
        return max(1, round(self._last_seconds or 1))

    async def submit(self, job: Job) -> Any:
        """``job``'s result (or exception), once every earlier job is done. Raises :class:`QueueFullError`.
        If the awaiting task is cancelled (its client went away), the job is cancelled too."""
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self.enqueue(job)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self.drop(job)
            raise

    def drop(self, job: Job) -> None:
        """``job``'s client is gone (call on its event loop): a waiting job leaves the queue at once, so it holds no
        place there until the worker reaches it; a running one stops at its next step."""
        job.cancelled.set()
        job.future.add_done_callback(lambda done: done.cancelled() or done.exception())  # nobody will ask
        with self._lock:
            if job not in self._waiting:
                return
            self._waiting.remove(job)
            self.cancelled += 1
        _settle(job.future, EditCancelledError())

    def abandon(self) -> int:
        """Give up every edit (call on the event loop): waiting ones leave the queue, running ones stop at their
        next step, and each request gets :class:`ServerStoppedError` now. How many there were."""
        with self._lock:
            waiting, running = list(self._waiting), list(self._current)
            self._waiting.clear()
            self.cancelled += len(waiting)  # the running ones are counted as they stop
        for job in (*waiting, *running):
            job.cancelled.set()
            _settle(job.future, ServerStoppedError())
        return len(waiting) + len(running)

    def enqueue(self, job: Job) -> None:
        """Queue ``job`` (whose ``future`` and ``loop`` are set), or raise :class:`QueueFullError`."""
        with self._lock:
            if self._closed or len(self._waiting) >= self.max_queue:
                raise QueueFullError()
            self._waiting.append(job)
            self.last_activity = time.monotonic()
            self._lock.notify()

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _take(self) -> list[Job] | None:
        """The next job, with the waiting jobs that can share its batch; None once closed and empty."""
        with self._lock:
            while not self._waiting and not self._closed:
                self._lock.wait()
            if not self._waiting:
                return None
            first = self._waiting.popleft()
            group = [first]
            if first.key is not None and self._run_batch is not None:
                for job in list(self._waiting):
                    if len(group) >= self.max_batch:
                        break
                    if job.key == first.key and not job.cancelled.is_set():
                        self._waiting.remove(job)
                        group.append(job)
            self._running = len(group)
            self._current = group
            return group

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            live = [job for job in group if not job.cancelled.is_set()]
            started = time.monotonic()
            outcomes = self._work(live) if live else []
            with self._lock:
                self._running = 0
                self._current = []
                if live:
                    self._last_seconds = (time.monotonic() - started) / len(live)
                self.done += sum(not isinstance(o, EditCancelledError) for o in outcomes)
                self.cancelled += len(group) - len(live) + sum(isinstance(o, EditCancelledError) for o in outcomes)
                self.last_activity = time.monotonic()
            for job, outcome in zip(live, outcomes, strict=True):
                job.loop.call_soon_threadsafe(_settle, job.future, outcome)
            for job in group:
                if job not in live:
                    job.loop.call_soon_threadsafe(_settle, job.future, EditCancelledError())

    def _work(self, jobs: list[Job]) -> list[Any]:
        """Each job's result, or the exception it raised (handed to its request, which reports it)."""
        try:
            if len(jobs) == 1:
                return [jobs[0].run(jobs[0])]
            assert self._run_batch is not None
            return self._run_batch(jobs)
        except BaseException as exc:
            return [exc] * len(jobs)


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if future.done():  # the request was cancelled; its outcome has no one to go to
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
