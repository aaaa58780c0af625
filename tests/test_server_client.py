"""``edit`` and ``batch`` through a running server: byte-identical files, no torch in the client, the default
socket found by ``--server auto``, Ctrl-C (or an OpenAI client's timeout) cancelling on the server, a server killed
mid-edit, a version mismatch, batching of waiting edits, ``serve --detach``, and a client that hangs up mid-upload."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT, make_photo, single_thread
from PIL import Image
from test_server import Server, openai, pixels
from test_server_lifecycle import LONG_STEPS, Request, wait_for

PROBE = (
    "import sys, atexit\n"
    "heavy = ('torch', 'diffusers', 'transformers', 'starlette', 'uvicorn', 'numpy', 'pydantic')\n"
    "atexit.register(lambda: print('loaded:', sorted(m for m in heavy if m in sys.modules), file=sys.stderr))\n"
    "sys.argv = ['compactedit', *sys.argv[1:]]\n"
    "from compactedit_cli.cli import main\n"
    "main()\n"
)


def client_env(**changes: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def compactedit(*args, env: dict[str, str] | None = None, probe: bool = False, timeout: float = 120):
    command = [sys.executable, "-c", PROBE] if probe else [sys.executable, "-m", "compactedit_cli"]
    return subprocess.run(
        [*command, *map(str, args)], env=env or client_env(), capture_output=True, text=True, timeout=timeout
    )


def start(*args, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "compactedit_cli", *map(str, args)],
        env=env or client_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    return make_photo(tmp_path_factory.mktemp("photo") / "street.png", size=(64, 48), seed=3)


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Server:
    running = Server(tiny_checkpoint).wait_ready()
    yield running
    running.close()


def test_edit_through_a_server_writes_the_same_bytes_and_imports_no_torch(server, tiny_checkpoint, photo, tmp_path):
    model = ["-m", tiny_checkpoint, "--device", "cpu", "--steps", "3", "-n", "2", "--seed", "11"]
    before = server.status()["edits_done"]
    remote = compactedit("edit", photo, "add snow", "-o", tmp_path / "remote.png", *model, "--server", server.socket,
                         probe=True)  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    assert "loaded: []" in remote.stderr  # neither torch nor the server's stack in the client
    assert server.status()["edits_done"] == before + 1
    local = compactedit("edit", photo, "add snow", "-o", tmp_path / "local.png", *model, "--server", "never")
    assert local.returncode == 0, local.stderr
    for index in (1, 2):
        assert (tmp_path / f"remote-{index}.png").read_bytes() == (tmp_path / f"local-{index}.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local-1.png", "local-2.png", "remote-1.png", "remote-2.png"]


def test_batch_through_a_server_matches_in_process(server, tiny_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed, size in enumerate([(64, 48), (48, 64), (64, 48)]):
        make_photo(inputs / f"p{seed}.png", size=size, seed=seed)
    model = ["-m", tiny_checkpoint, "--device", "cpu", "--steps", "2", "-i", "make it blue"]
    before = server.status()["edits_done"]
    remote = compactedit("batch", inputs, "-o", tmp_path / "remote", *model, "--server", server.socket)
    assert remote.returncode == 0, remote.stderr
    assert server.status()["edits_done"] == before + 3
    local = compactedit("batch", inputs, "-o", tmp_path / "local", *model, "--server", "never", "--batch-size", "2")
    assert local.returncode == 0, local.stderr
    for name in ("p0.png", "p1.png", "p2.png"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    lines = [json.loads(line) for line in (tmp_path / "remote" / "results.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["ok"] * 3


def test_an_instruction_is_taken_through_a_server_as_in_process(server, tiny_checkpoint, photo, tmp_path):
    """The longest instruction (65,536 bytes of emoji, whose JSON escapes triple it) is cut, with the same
    warning, through a server as in-process; one byte more is the same one-line refusal from both."""
    model = ["-m", tiny_checkpoint, "--device", "cpu", "--steps", "1", "--seed", "3"]
    longest = "\U0001f305" * 16_384
    for index, where in enumerate((server.socket, "never")):
        done = compactedit("edit", photo, longest, "-o", tmp_path / f"{index}.png", *model, "--server", where)
        assert done.returncode == 0, done.stderr
        assert "only the first 256 are used" in done.stderr
        refused = compactedit("edit", photo, longest + "a", "-o", tmp_path / "no.png", *model, "--server", where)
        assert refused.returncode == 2
        assert refused.stderr == "error: the instruction is 65,537 bytes long, over the limit of 65,536\n"
    assert not (tmp_path / "no.png").exists()


def test_auto_finds_a_matching_server_on_the_default_socket(tiny_checkpoint, photo, tmp_path):
    running = Server(tiny_checkpoint, default_socket=True).wait_ready()
    try:
        env = client_env(XDG_RUNTIME_DIR=str(running.folder), COMPACTEDIT_SERVER=None)
        common = ["--device", "cpu", "--steps", "2"]
        used = compactedit("edit", photo, "x", "-o", tmp_path / "a.png", "-m", tiny_checkpoint, *common, env=env)
        assert used.returncode == 0, used.stderr
        assert running.status()["edits_done"] == 1
        # Another model (a copy of the folder is another model), or --server never: in this process.
        other = tmp_path / "other"
        shutil.copytree(tiny_checkpoint, other)
        local = compactedit("edit", photo, "x", "-o", tmp_path / "b.png", "-m", other, *common, env=env)
        assert local.returncode == 0, local.stderr
        never = compactedit("edit", photo, "x", "-o", tmp_path / "c.png", "-m", tiny_checkpoint, *common,
                            "--server", "never", env=env)  # fmt: skip
        assert never.returncode == 0, never.stderr
        assert running.status()["edits_done"] == 1
        assert (tmp_path / "a.png").read_bytes() == (tmp_path / "c.png").read_bytes()
    finally:
        running.close()


def test_ctrl_c_on_the_client_cancels_the_edit_on_the_server(server, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "out.png"
    before = server.status()["edits_cancelled"]
    # three pictures of LONG_STEPS each: the edit outlasts the signal's way on a loaded machine too
    client = start("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, "--device", "cpu", "--steps", LONG_STEPS,
                   "-n", 3, "--server", server.socket)  # fmt: skip
    wait_for(lambda: server.status()["queue"]["running"] == 1, what="the edit to start")
    client.send_signal(signal.SIGINT)
    _, stderr = client.communicate(timeout=30)
    assert client.returncode == 130, stderr
    wait_for(lambda: server.status()["edits_cancelled"] == before + 1, timeout=20, what="the server to cancel")
    assert server.status()["queue"]["running"] == 0
    assert not list(tmp_path.glob("out*"))


def test_an_openai_client_that_gives_up_cancels_its_edit(server, photo):
    """A client that times out hangs up: its running edit stops at its next step, its waiting one never starts."""
    before = server.status()
    given_up = [Request(server, photo, LONG_STEPS, timeout=0.5, n=3) for _ in range(2)]
    for request in given_up:
        request.join(30)
    assert all(isinstance(request.error, openai.APITimeoutError) for request in given_up)
    wait_for(lambda: server.status()["edits_cancelled"] == before["edits_cancelled"] + 2, timeout=20,
             what="the server to cancel both edits")  # fmt: skip
    after = server.status()
    assert after["edits_done"] == before["edits_done"] and after["queue"] == before["queue"]


def test_a_server_killed_mid_edit_is_one_error_line_and_no_file(tiny_checkpoint, photo, tmp_path):
    running = Server(tiny_checkpoint).wait_ready()
    try:
        client = start("edit", photo, "x", "-o", tmp_path / "out.png", "-m", tiny_checkpoint, "--device", "cpu",
                       "--steps", LONG_STEPS, "--server", running.socket)  # fmt: skip
        wait_for(lambda: running.status()["queue"]["running"] == 1, what="the edit to start")
        running.process.kill()
        _, stderr = client.communicate(timeout=30)
    finally:
        running.close()
    assert client.returncode == 1
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert "stopped before the edit was done" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_another_version_is_said(tiny_checkpoint, photo, tmp_path):
    """A server from a copy of the package with another version: a named one is refused, auto runs in-process."""
    copy = tmp_path / "other-version"
    shutil.copytree(PROJECT / "compactedit_cli", copy / "compactedit_cli", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "compactedit_cli" / "__init__.py"
    text = init.read_text()
    init.write_text(text.replace('__version__ = "', '__version__ = "0.0.0.other+', 1))
    assert init.read_text() != text
    running = Server(tiny_checkpoint, default_socket=True, env={"PYTHONPATH": str(copy)}, cwd=copy).wait_ready()
    try:
        common = ["-m", tiny_checkpoint, "--device", "cpu", "--steps", "2"]
        named = compactedit("edit", photo, "x", "-o", tmp_path / "a.png", *common, "--server", running.socket)
        assert named.returncode == 1
        assert "the server runs compactedit 0.0.0.other+" in named.stderr and "Traceback" not in named.stderr
        env = client_env(XDG_RUNTIME_DIR=str(running.folder), COMPACTEDIT_SERVER=None)
        auto = compactedit("edit", photo, "x", "-o", tmp_path / "b.png", *common, env=env)
        assert auto.returncode == 0, auto.stderr
        assert "not using the server" in auto.stderr and "0.0.0.other+" in auto.stderr
        assert running.status()["edits_done"] == 0
    finally:
        running.close()


@pytest.mark.parametrize("client", ["compactedit", "openai"])
def test_waiting_edits_of_one_size_run_as_one_batch(tiny_checkpoint, editor_for_batch, photo, tmp_path, client):
    from compactedit_cli.options import ModelOptions
    from compactedit_cli.server.remote import open_editor

    running = Server(tiny_checkpoint, "--max-batch", "4").wait_ready()
    remote = open_editor(ModelOptions(model=str(tiny_checkpoint), device="cpu"), str(running.socket))

    def edit(prompt: str, out: Path, steps: int, seed: int = 0) -> None:
        if client == "compactedit":
            remote.edit(photo, prompt, out, steps=steps, seed=seed)
            return
        with photo.open("rb") as image:
            answer = running.client().images.edit(image=image, prompt=prompt, extra_body={"steps": steps, "seed": seed})
        out.write_bytes(base64.b64decode(answer.data[0].b64_json))

    try:
        blocker = threading.Thread(target=edit, args=("x", tmp_path / "first.png", LONG_STEPS))
        blocker.start()
        wait_for(lambda: running.status()["queue"]["running"] == 1, what="the first edit to start")
        threads = [
            threading.Thread(target=edit, args=(f"edit {seed}", tmp_path / f"{seed}.png", 2, seed)) for seed in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in [blocker, *threads]:
            thread.join(120)
        assert "edit 4 waiting requests as one batch" in running.output()
    finally:
        running.close()
    with single_thread():
        for seed in range(4):
            [record] = editor_for_batch.edit(photo, f"edit {seed}", tmp_path / f"alone-{seed}.png", steps=2, seed=seed)
            alone = pixels(Image.open(record.output)).astype(int)
            batched = pixels(Image.open(tmp_path / f"{seed}.png")).astype(int)
            assert np.abs(alone - batched).max() <= 1


@pytest.fixture(scope="module")
def editor_for_batch(tiny_checkpoint):
    from compactedit_cli.editor import Editor

    return Editor(str(tiny_checkpoint), device="cpu", offline=True)


def test_detach_returns_when_ready_and_stop_stops(tiny_checkpoint, tmp_path):
    folder = Path(os.path.realpath(tmp_path))
    path = Path("/tmp") / f"ce-detach-{os.getpid()}.sock"
    started = compactedit("serve", "--detach", "--socket", path, "-m", tiny_checkpoint, "--device", "cpu",
                          "--log-file", folder / "serve.log")  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        assert "serving on unix:" in started.stderr
        status = compactedit("serve", "status", "--socket", path, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["device"] == "cpu"
        assert (folder / "serve.log").stat().st_mode & 0o077 == 0
    finally:
        stopped = compactedit("serve", "stop", "--socket", path)
    assert stopped.returncode == 0, stopped.stderr
    assert not path.exists()


@pytest.mark.parametrize(("path", "field"), [("/v1/compactedit/edits", "rgb"), ("/v1/images/edits", "image")])
def test_a_client_that_hangs_up_mid_upload_leaves_the_server_well(server, path, field):
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(str(server.socket))
    probe.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n".encode()
        + b"Content-Length: 100000\r\nX-Compactedit-Protocol: 1\r\n\r\n--b\r\nContent-Disposition: form-data; "
        + f'name="{field}"; filename="{field}"\r\n\r\n'.encode()
        + b"\0" * 1000
    )
    probe.close()
    wait_for(lambda: f"POST {path} -> 499" in server.output(), timeout=20, what="the hang-up in the log")
    assert server.status()["queue"]["waiting"] == 0
    with server.http() as http:
        assert http.get("http://localhost/health").status_code == 200
    assert "ERROR" not in server.output() and "-> 500" not in server.output()  # the client's doing, no failure


@pytest.mark.parametrize(
    ("headers", "request_", "status", "code"),
    [
        ({"X-Compactedit-Protocol": "0"}, {}, 409, "version_mismatch"),
        ({}, {"source": {"width": 100_000, "height": 100_000}}, 400, "invalid_image"),
        ({}, {"source": {"width": 4, "height": 4}}, 400, "invalid_image"),
        ({}, {"options": {"steps": 5000}}, 400, "invalid_value"),
        ({}, {"options": {"nonsense": 1}}, 400, "invalid_value"),
        ({}, {"instruction": " "}, 400, "invalid_value"),
    ],
)
def test_bad_client_requests_are_refused(server, headers, request_, status, code):
    asked = {"instruction": "x", "options": {}, "source": {"width": 2, "height": 2}, **request_}
    sent = {"X-Compactedit-Protocol": "1", **headers}
    files = {"rgb": ("rgb", b"\0" * 12, "application/octet-stream")}
    with server.http() as http:
        answer = http.post(
            "http://localhost/v1/compactedit/edits", data={"request": json.dumps(asked)}, files=files, headers=sent
        )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("value", "code", "words"),
    [("http://127.0.0.1:notaport", 2, "bad port"), ("https://example.com", 2, "https"), ("", 2, "empty")],
)
def test_bad_server_values_are_one_line(photo, tmp_path, value, code, words):
    run = compactedit("edit", photo, "x", "-o", tmp_path / "o.png", "--server", value, probe=True)
    assert run.returncode == code, run.stderr
    assert words in run.stderr and "Traceback" not in run.stderr
    assert "loaded: []" in run.stderr


def test_an_image_the_model_cannot_read_is_exit_3_as_in_process(server, tmp_path):
    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (402, 2)).save(sliver)
    run = compactedit("edit", sliver, "x", "-o", tmp_path / "o.png", "--server", server.socket)
    assert run.returncode == 3, run.stderr  # an unusable input, as in-process; not 2, a usage error
    assert "up to 200:1" in run.stderr and not (tmp_path / "o.png").exists()


def test_a_named_server_that_is_not_there(photo, tmp_path):
    run = compactedit("edit", photo, "x", "-o", tmp_path / "o.png", "--server", tmp_path / "none.sock", probe=True)
    assert run.returncode == 1
    assert "no server answers" in run.stderr and "loaded: []" in run.stderr
    assert not (tmp_path / "o.png").exists()


class Impostor(threading.Thread):
    """A TCP port where something other than an HTTP server listens: it sends ``greeting`` to each connection
    (an SSH banner, say; nothing: a port that never answers), then holds it open for ``hold`` seconds."""

    def __init__(self, greeting: bytes, hold: float) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.greeting, self.hold = greeting, hold
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.listener.accept()
                connection.sendall(self.greeting)
                threading.Timer(self.hold, connection.close).start()


@pytest.mark.parametrize(
    ("greeting", "words"),
    [(b"SSH-2.0-OpenSSH_9.6\r\n", "does not speak HTTP"), (b"", "did not answer within 0.5 s")],
    ids=["ssh", "silent"],
)
def test_a_server_that_is_not_http_is_one_line(greeting, words):
    from compactedit_cli.server import address, client

    impostor = Impostor(greeting, hold=2)
    try:
        with pytest.raises(client.ServerError) as caught:
            client.request(address.parse(f"http://127.0.0.1:{impostor.port}"), "GET", "/status", timeout=0.5)
    finally:
        impostor.listener.close()
    message = str(caught.value)
    assert words in message and "\n" not in message and "SSH" not in message
