"""A small client for a running server, on the standard library only (``serve status``, ``serve stop``, and the
edits of :mod:`.remote`).

Any HTTP client works over TCP; over the Unix socket this connects with ``AF_UNIX`` and speaks plain HTTP/1.1.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

from ..errors import CompactEditError, UsageError
from .address import Address, answers


class ServerError(CompactEditError):
    """The server answered with an error, or there is no server at the address."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(
    address: Address,
    method: str,
    path: str,
    *,
    api_key: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of one request to the server at ``address``; no server there is a ServerError."""
    connection = connect(address, timeout)
    try:
        response = send(connection, address, method, path, api_key=api_key, body=body, headers=headers)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServerError(f"{address.label()} stopped answering ({exc})") from None
    finally:
        connection.close()
    try:
        decoded = json.loads(data) if data else {}
    except ValueError:
        raise ServerError(f"{address.label()} did not answer with JSON: is it a compactedit server?") from None
    return response.status, decoded


def connect(address: Address, timeout: float | None) -> http.client.HTTPConnection:
    """An HTTP connection (not yet open) to the server at ``address``."""
    if address.socket_path is not None:
        return _UnixConnection(str(address.socket_path), timeout)
    assert address.host is not None
    return http.client.HTTPConnection(address.host.strip("[]"), address.port, timeout=timeout)


def send(
    connection: http.client.HTTPConnection,
    address: Address,
    method: str,
    path: str,
    *,
    api_key: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    """Send one request and return the response, its body unread; no server there is a ServerError."""
    sent = dict(headers or {})
    if api_key:
        sent["Authorization"] = f"Bearer {api_key}"
    try:
        connection.request(method, path, body=body, headers=sent)
        return connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        raise ServerError(_unanswered(address, exc, connection.timeout)) from None


def _unanswered(address: Address, exc: OSError | http.client.HTTPException, timeout: float | None) -> str:
    """The one line for a request that got no HTTP answer (never the raw bytes something else sent instead)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"no server answers on {address.label()} ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return f"the server on {address.label()} did not answer within {timeout:g} s"
    if isinstance(exc, http.client.BadStatusLine) and not isinstance(exc, ConnectionError):
        return f"the server on {address.label()} does not speak HTTP: is it a compactedit server?"
    return f"the server on {address.label()} closed the connection ({exc or type(exc).__name__})"


def error_message(status: int, body: dict[str, Any]) -> str:
    """The one line an error answer carries."""
    error = body.get("error")
    return error.get("message", f"HTTP {status}") if isinstance(error, dict) else f"HTTP {status}"


def call(address: Address, method: str, path: str, api_key: str | None = None) -> dict[str, Any]:
    """The JSON answer of a successful request; an error answer is a one-line ServerError."""
    status, body = request(address, method, path, api_key=api_key)
    if status >= 400:
        error = UsageError if status in (401, 403) else ServerError
        raise error(f"{address.label()}: {error_message(status, body)}")
    return body


def wait_stopped(address: Address, timeout: float, pid: int | None = None) -> bool:
    """Whether the server at ``address`` stopped within ``timeout`` seconds: its process ``pid`` ended (its drain
    done, its socket file removed), or without a pid, nothing answers at the address any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None:
            if not _alive(pid):
                return True
        elif address.socket_path is not None:
            if not answers(address.socket_path, timeout=0.5):
                return True
        else:
            try:
                socket.create_connection((address.host.strip("[]"), address.port), timeout=0.5).close()
            except OSError:
                return True
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (one that exited but is not yet reaped by its parent does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
