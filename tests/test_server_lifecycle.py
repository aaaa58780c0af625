"""A server's life: TCP with a key, a live socket refused, kill -9 mid-request, a stale socket replaced, ``serve
stop``, a full queue, draining on SIGTERM, the idle timeout."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import PROJECT, make_photo
from test_server import Server, decode, free_port, openai

LONG_STEPS = 1000  # a tiny edit that lasts seconds, so requests are still running when the test acts


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "compactedit_cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def photo(tmp_path) -> Path:
    return make_photo(tmp_path / "street.png", size=(64, 48), seed=2)


class Request(threading.Thread):
    """One edit sent from a thread: its answer or its exception."""

    def __init__(self, server: Server, photo: Path, steps: int, timeout: float = 120, n: int = 1) -> None:
        super().__init__(daemon=True)
        self.server, self.photo, self.steps, self.timeout, self.n = server, photo, steps, timeout, n
        self.answer = self.error = None
        self.start()

    def run(self) -> None:
        try:
            with self.photo.open("rb") as image:
                self.answer = self.server.client(timeout=self.timeout).images.edit(
                    image=image, prompt="make it winter", n=self.n, extra_body={"steps": self.steps}
                )
        except Exception as exc:
            self.error = exc


def test_tcp_on_loopback_with_an_api_key(tiny_checkpoint, photo):
    server = Server(tiny_checkpoint, "--host", "127.0.0.1", "--port", str(free_port()), "--api-key", "s3cret")
    try:
        server.wait_ready()
        with photo.open("rb") as image:
            answer = server.client("s3cret").images.edit(image=image, prompt="make it winter", extra_body={"steps": 1})
        assert decode(answer.data[0]).size == (64, 48)
        with pytest.raises(openai.AuthenticationError) as caught, photo.open("rb") as image:
            server.client("wrong").images.edit(image=image, prompt="make it winter")
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    finally:
        server.close()


def test_a_public_host_needs_a_key_and_is_refused_before_loading():
    done = cli("serve", "--model", "/nonexistent", "--host", "0.0.0.0", "--port", "8123")
    assert done.returncode == 2
    assert "--api-key" in done.stderr and "loading" not in done.stderr


def test_live_socket_refused_kill_9_seen_by_the_client_stale_socket_replaced_then_stopped(tiny_checkpoint, photo):
    first = Server(tiny_checkpoint)
    try:
        first.wait_ready()
        again = cli("serve", "--model", "/nonexistent", "--socket", str(first.socket))
        assert again.returncode == 2 and "already running" in again.stderr

        request = Request(first, photo, LONG_STEPS)
        wait_for(lambda: first.status()["queue"]["running"] == 1, what="the edit to start")
        first.process.send_signal(signal.SIGKILL)
        request.join(30)
        assert not request.is_alive(), "the client hangs after the server died"
        assert isinstance(request.error, openai.APIConnectionError)
        assert first.socket.is_socket()  # left behind by kill -9

        second = Server(tiny_checkpoint, "--socket", str(first.socket))
        try:
            second.wait_ready()
            with photo.open("rb") as image:
                answer = second.client().images.edit(image=image, prompt="make it winter", extra_body={"steps": 1})
            assert decode(answer.data[0]).size == (64, 48)
            stopped = cli("serve", "stop", "--socket", str(second.socket))
            assert stopped.returncode == 0, stopped.stderr
            assert second.process.wait(30) == 0 and not second.socket.exists()
            gone = cli("serve", "status", "--socket", str(second.socket))
            assert gone.returncode == 1 and "no server answers" in gone.stderr
        finally:
            second.close()
    finally:
        first.close()


def test_full_queue_is_429_and_sigterm_drains(tiny_checkpoint, photo):
    server = Server(tiny_checkpoint, "--max-queue", "1")
    try:
        server.wait_ready()
        running = Request(server, photo, LONG_STEPS)
        wait_for(lambda: server.status()["queue"]["running"] == 1, what="the first edit to start")
        waiting = Request(server, photo, 1)
        wait_for(lambda: server.status()["queue"]["waiting"] == 1, what="the second edit to queue")
        with server.http() as http, photo.open("rb") as image:
            refused = http.post(
                f"{server.base_url}/images/edits", files={"image": image}, data={"prompt": "x", "steps": "1"}
            )
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(120) == 128 + signal.SIGTERM
        running.join(10)
        waiting.join(10)
        assert running.error is None and waiting.error is None  # both answered before the server exited
        assert decode(running.answer.data[0]).size == (64, 48) and decode(waiting.answer.data[0]).size == (64, 48)
        assert not server.socket.exists()
    finally:
        server.close()


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_ctrl_c_while_draining_drops_the_edits_without_tracebacks(tiny_checkpoint, photo, first):
    """The first Ctrl-C (or SIGTERM) drains; a Ctrl-C then gives up the running edit (at its next step) and the
    waiting one, each answered 503, and the drain goes on to a clean exit with the first signal's code."""
    server = Server(tiny_checkpoint)
    try:
        server.wait_ready()
        running = Request(server, photo, LONG_STEPS, n=3)
        wait_for(lambda: server.status()["queue"]["running"] == 1, what="the first edit to start")
        waiting = Request(server, photo, LONG_STEPS)
        wait_for(lambda: server.status()["queue"]["waiting"] == 1, what="the second edit to queue")
        server.process.send_signal(first)
        wait_for(lambda: "Shutting down" in server.output(), what="the drain to start")
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 128 + first
        for request in (running, waiting):
            request.join(10)
            assert isinstance(request.error, openai.InternalServerError), request.error
            assert request.error.status_code == 503 and request.error.body["code"] == "server_stopping"
        log = server.output()
        assert "interrupted again: 2 edits dropped" in log and "stopped after 0 edits" in log
        assert "Traceback" not in log and "ERROR" not in log, log
        said = "interrupted" if first == signal.SIGINT else "terminated"
        assert log.rstrip().endswith(f"error: {said}") and not server.socket.exists()
    finally:
        server.close()


def test_a_client_that_gave_up_holds_no_place_in_the_queue(tiny_checkpoint, photo):
    server = Server(tiny_checkpoint, "--max-queue", "1")
    try:
        server.wait_ready()
        running = Request(server, photo, LONG_STEPS, n=3)
        wait_for(lambda: server.status()["queue"]["running"] == 1, what="the first edit to start")
        gave_up = Request(server, photo, 1, timeout=0.5)
        gave_up.join(30)
        assert isinstance(gave_up.error, openai.APITimeoutError)
        wait_for(lambda: server.status()["queue"]["waiting"] == 0, timeout=3, what="the gone client to leave")
        assert server.status()["queue"]["running"] == 1  # while the live edit still runs, its place is free
        after = Request(server, photo, 1)
        for request in (running, after):
            request.join(120)
            assert request.error is None
    finally:
        server.close()


def test_a_stalled_upload_does_not_hold_up_a_stop(tiny_checkpoint):
    server = Server(tiny_checkpoint)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.wait_ready()
        stalled.connect(str(server.socket))
        stalled.sendall(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n'
            + bytes(100)
        )  # ... and then nothing more
        time.sleep(1)  # the server is reading its body
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 128 + signal.SIGTERM  # not when the client gives up
        stalled.settimeout(5)
        assert stalled.recv(4096).startswith(b"HTTP/1.1 503 ")
    finally:
        stalled.close()
        server.close()


def test_default_socket_in_the_runtime_folder_and_idle_timeout(tiny_checkpoint):
    idle = Server(tiny_checkpoint, "--idle-timeout", "1", default_socket=True)
    try:
        idle.wait_ready()
        assert stat.S_IMODE(idle.socket.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(idle.socket.stat().st_mode) == 0o600
        assert idle.process.wait(60) == 0
        assert "idle for 1s" in idle.output()
        assert not idle.socket.exists()
    finally:
        idle.close()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-queue", "0"], "--max-queue must be between 1 and 10000 (got 0)"),
        (["--idle-timeout", "-1"], "--idle-timeout must be a number of seconds >= 0"),
        (["--socket", "/tmp/x.sock", "--port", "9000"], "--socket and --host/--port do not mix"),
        (["--port", "70000"], "--port must be between 1 and 65535"),
        (["--socket", "/tmp/" + "s" * 120], "too long for a Unix socket"),
    ],
)
def test_serve_flag_errors_are_one_line_before_loading(cli, args, words):
    result = cli("serve", "--model", "/nonexistent", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and words in result.stderr and "loading" not in result.stderr


def test_a_port_in_use_is_refused_before_loading(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("serve", "--model", "/nonexistent", "--port", str(taken.getsockname()[1]))
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1:" in result.stderr
    assert "loading" not in result.stderr and "resolving" not in result.stderr


def test_a_socket_path_holding_a_file_is_refused(cli, tmp_path):
    taken = tmp_path / "taken.sock"
    taken.write_text("not a socket")
    result = cli("serve", "--model", "/nonexistent", "--socket", str(taken))
    assert result.exit_code == 2 and "exists and is not a socket" in result.stderr
    assert taken.read_text() == "not a socket"


def test_a_runtime_folder_others_can_write_is_refused(cli, tmp_path):
    folder = tmp_path / "compactedit"
    folder.mkdir()
    folder.chmod(0o777)
    result = cli("serve", "--model", "/nonexistent", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "is not private to you" in result.stderr
