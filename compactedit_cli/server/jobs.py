"""Edits one at a time on one worker thread, behind a bounded queue.

The model is one set of weights on one device: two edits at once would only fight over it. Requests wait in order;
when ``max_queue`` are already waiting, a new one is refused at once (the caller answers 429) rather than held for
minutes. Results go back to the event loop that asked, so no request handler ever blocks it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(Exception):
    """``max_queue`` edits are already waiting."""


@dataclass
class _Job:
    work: Callable[[], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.monotonic)


class EditQueue:
    """Runs submitted callables in order on one thread; :meth:`submit` awaits one's result."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._waiting: deque[_Job] = deque()
        self._lock = threading.Condition()
        self._running = False
        self._closed = False
        self._last_seconds: float | None = None
        self.done = 0
        self.last_activity = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="compactedit-editor", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running or bool(self._waiting)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one edit's time (the last one's), at least 1."""
        return max(1, round(self._last_seconds or 1))

    async def submit(self, work: Callable[[], Any]) -> Any:
        """``work()``'s result (or exception), once every earlier job is done. Raises :class:`QueueFullError`."""
        loop = asyncio.get_running_loop()
        job = _Job(work, loop.create_future(), loop)
        with self._lock:
            if self._closed:
                raise QueueFullError()
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError()
            self._waiting.append(job)
            self.last_activity = time.monotonic()
            self._lock.notify()
        return await job.future

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = True
            started = time.monotonic()
            try:
                result, error = job.work(), None
            except BaseException as exc:  # handed to the request, which reports it
                result, error = None, exc
            with self._lock:
                self._running = False
                self._last_seconds = time.monotonic() - started
                self.done += 1
                self.last_activity = time.monotonic()
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():  # the client went away; its edit still ran, in order
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
