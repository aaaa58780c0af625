"""``serve --detach``: the same server in a new session, in the background; this returns once it answers.

The child is a plain ``compactedit serve`` with the same options, so a detached server behaves exactly as a
foreground one. Its log goes to a file; a child that fails to start (a bad checkpoint, a port in use) is reported
with the last line it logged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .address import Address, default_socket
from .client import ServerError, request

# Loading a full-size model from a cold disk can take minutes; a child that dies is noticed at once.
READY_TIMEOUT_SECONDS = 900
LOG_NAME = "serve.log"


def log_path(address: Address, given: str | None) -> Path:
    if given is not None:
        return Path(given).expanduser()
    if address.socket_path is not None:
        return address.socket_path.with_name(address.socket_path.name + ".log")
    return default_socket().with_name(LOG_NAME)


def start_detached(
    address: Address, arguments: list[str], log_file: str | None, api_key: str | None
) -> tuple[int, Path]:
    """Start ``compactedit serve ARGUMENTS`` in the background; (its pid, its log) once it answers."""
    log = log_path(address, log_file)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    environment = dict(os.environ)
    if api_key:
        environment["COMPACTEDIT_API_KEY"] = api_key
    with log.open("ab", buffering=0) as sink:
        log.chmod(0o600)
        child = subprocess.Popen(
            [sys.executable, "-m", "compactedit_cli", "serve", *arguments],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            env=environment,
            start_new_session=True,  # not the terminal's: Ctrl-C or closing it leaves the server running
        )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise ServerError(f"the server did not start: {_last_line(log) or f'exit {child.returncode}'}")
        try:
            status, _ = request(address, "GET", "/health", api_key=api_key, timeout=2)
        except ServerError:
            status = 0
        if status == 200:
            return child.pid, log
        time.sleep(0.2)
    child.terminate()
    raise ServerError(f"the server did not answer within {READY_TIMEOUT_SECONDS}s; see {log}")


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else ""
