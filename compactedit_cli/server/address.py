"""Where a server listens: a Unix socket in the user's runtime folder, or a TCP port (loopback unless told).

A socket file outlives a server killed with ``kill -9``; whether anyone still answers on it is the only reliable
test of a live server, so :func:`bind_unix` connects before it replaces one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

SOCKET_NAME = "serve.sock"
LOOPBACK_NAMES = ("localhost",)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# sockaddr_un's sun_path is 108 bytes on Linux (104 on macOS), terminating NUL included.
MAX_SOCKET_PATH = 103


@dataclass(frozen=True)
class Address:
    """A Unix socket path, or a TCP host and port."""

    socket_path: Path | None = None
    host: str | None = None
    port: int | None = None
    default: bool = False  # the runtime folder's socket, whose folder must be the user's alone

    @property
    def is_unix(self) -> bool:
        return self.socket_path is not None

    def label(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def default_socket() -> Path:
    """``serve.sock`` in the user's runtime folder (``$XDG_RUNTIME_DIR/compactedit`` on Linux; without that
    variable, platformdirs' fallback under /tmp, which :func:`bind_unix` checks is the user's own)."""
    import platformdirs

    with warnings.catch_warnings():  # "XDG_RUNTIME_DIR is not set": the fallback is checked instead
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir("compactedit", ensure_exists=False)) / SOCKET_NAME


def resolve(socket_path: str | None, host: str | None, port: int | None) -> Address:
    """The address the flags ask for: TCP when ``--host`` or ``--port`` is given, else a Unix socket."""
    if socket_path is not None and (host is not None or port is not None):
        raise UsageError("--socket and --host/--port do not mix: a server listens on one or the other")
    if host is not None or port is not None:
        if port is not None and not 0 < port < 65536:
            raise UsageError(f"--port must be between 1 and 65535 (got {port})")
        return Address(host=(host or DEFAULT_HOST).strip(), port=port or DEFAULT_PORT)
    path = Path(socket_path).expanduser() if socket_path is not None else default_socket()
    if len(os.fsencode(path.absolute())) > MAX_SOCKET_PATH:
        raise UsageError(f"--socket path is too long for a Unix socket (at most {MAX_SOCKET_PATH} bytes): {path}")
    return Address(socket_path=path.absolute(), default=socket_path is None)


def parse(value: str) -> Address:
    """A server named on the command line: ``http://HOST:PORT``, ``unix:PATH`` or a socket's path."""
    from urllib.parse import urlsplit

    value = value.strip()
    if value.startswith(("http://", "https://")):
        parts = urlsplit(value)
        if parts.scheme == "https":
            raise UsageError("--server: https is not supported; put a TLS proxy in front and use its http address")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise UsageError(f"--server: bad port in {value!r}") from None
        if not parts.hostname or parts.path not in ("", "/"):
            raise UsageError(f"--server: expected http://HOST:PORT, got {value!r}")
        return Address(host=parts.hostname, port=port)
    return resolve(value.removeprefix("unix:"), None, None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (``localhost``, 127.0.0.0/8, ``::1``); a name is not trusted."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(address: Address, api_key: str | None) -> None:
    """A server reachable from other machines must ask for a key."""
    if address.host is not None and not is_loopback(address.host) and not api_key:
        raise UsageError(
            f"--host {address.host} is reachable from other machines: give --api-key (or COMPACTEDIT_API_KEY)"
        )


def answers(path: Path, timeout: float = 1.0) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def check_free(address: Address) -> None:
    """Fail with one line if a server already listens at ``address`` or the path holds something else (a port in
    use, or a host this machine does not have, by binding it for a moment): before a model takes minutes to load."""
    path = address.socket_path
    if path is None:
        assert address.host is not None and address.port is not None
        bind_tcp(address.host, address.port).close()
        return
    if address.default and path.parent.exists():
        _check_private(path.parent)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket; remove it or choose another --socket")
    if answers(path):
        raise UsageError(
            f"a server is already running on {path} (stop it with: compactedit serve stop --socket {path})"
        )


def _check_private(folder: Path) -> None:
    """The runtime folder must be the user's own and writable by nobody else (under /tmp, anyone could make it)."""
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise UsageError(f"{folder} is not private to you (owner or mode): choose a socket with --socket PATH")


def bind_unix(path: Path, private_folder: bool = False) -> socket.socket:
    """A listening socket at ``path``, mode 0600 from the start (bound under a umask, so no moment is it open).

    Its folder is made private (0700) if it has to be made; ``private_folder`` also checks an existing one. A stale
    socket (nobody answers) is replaced.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_free(Address(socket_path=path, default=private_folder))
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale: check_free found nobody answering
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(previous)
    path.chmod(0o600)
    sock.listen(128)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a port in use is a one-line error."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def bind(address: Address) -> socket.socket:
    if address.socket_path is not None:
        return bind_unix(address.socket_path, private_folder=address.default)
    assert address.host is not None and address.port is not None
    return bind_tcp(address.host, address.port)
