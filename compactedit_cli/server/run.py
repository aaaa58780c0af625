"""Serve a loaded Editor in the foreground until SIGTERM, Ctrl-C, ``serve stop`` or the idle timeout.

Stopping drains: the listening socket closes first, then every accepted request (queued edits included) finishes
and is answered, then the worker thread ends and a Unix socket file is removed. A second Ctrl-C drops the edits
instead (the running one at its next step; each is answered 503), and the drain goes on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn

from .address import Address, bind
from .app import ServerState, build_app, run_batch
from .jobs import EditQueue

log = logging.getLogger("compactedit.serve")


def serve(
    editor: Any,
    address: Address,
    *,
    api_key: str | None = None,
    max_queue: int = 16,
    max_batch: int = 1,
    idle_timeout: float | None = None,
    verbose: bool = False,
    quiet: bool = False,
) -> None:
    """Listen on ``address`` and answer requests with ``editor`` until told to stop."""
    _configure_logging(verbose, quiet)
    server: _Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    queue = EditQueue(max_queue, max_batch, run_batch=functools.partial(run_batch, editor))
    state = ServerState(
        editor,
        queue,
        api_key=api_key,
        verbose=verbose,
        idle_timeout=idle_timeout,
        on_stop=stop,
        stopping=lambda: server is not None and server.should_exit,
    )
    app = build_app(state)
    try:
        sock = bind(address)
    except BaseException:
        queue.close()
        raise

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        watcher = asyncio.create_task(_watch_idle(state, stop)) if idle_timeout else None
        log.info("serving %s on %s", state.model_id, address.label())
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(queue.close)

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(
        app,
        log_level="warning" if quiet else "info",
        access_log=not quiet,
        timeout_graceful_shutdown=None,
        lifespan="on",
    )
    server = _Server(config, give_up_edits=queue.abandon)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if address.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                address.socket_path.unlink()
        log.info("stopped after %d edits", queue.done)


class _Server(uvicorn.Server):
    """uvicorn's server, but a Ctrl-C once it is stopping (after a Ctrl-C, SIGTERM or ``serve stop``) gives up
    the edits rather than uvicorn's force-quit, which cancels every request's task mid-await (a traceback each,
    and a bare 500) and leaves the edit running; one more Ctrl-C is uvicorn's force-quit."""

    def __init__(self, config: uvicorn.Config, give_up_edits: Callable[[], int]) -> None:
        super().__init__(config)
        self.give_up_edits = give_up_edits
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gave_up = False

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and self.should_exit and not self.gave_up and self.loop is not None:
            self.gave_up = True
            # A signal handler may interrupt the loop's thread holding the queue's lock: run it on the loop.
            self.loop.call_soon_threadsafe(self._give_up)
            return
        super().handle_exit(sig, frame)

    def _give_up(self) -> None:
        dropped = self.give_up_edits()
        plural = "" if dropped == 1 else "s"
        log.info("interrupted again: %d edit%s dropped (Ctrl-C once more quits at once)", dropped, plural)


async def _watch_idle(state: ServerState, stop: Any) -> None:
    """Stop the server once no edit has run or waited for ``idle_timeout`` seconds."""
    assert state.idle_timeout
    while True:
        await asyncio.sleep(min(1.0, state.idle_timeout / 4))
        if not state.queue.busy and time.monotonic() - state.queue.last_activity >= state.idle_timeout:
            log.info("idle for %gs: stopping", state.idle_timeout)
            stop()
            return


def _configure_logging(verbose: bool, quiet: bool) -> None:
    """compactedit's own lines on stderr beside uvicorn's; request lines name no image and no prompt unless -v."""
    logger = logging.getLogger("compactedit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
