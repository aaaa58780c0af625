"""``compactedit serve`` as a real process, driven by the official ``openai`` client over a Unix socket and TCP."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT, make_photo, single_thread
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

START_TIMEOUT = 90.0
MAX_BYTES = 100_000  # the servers' COMPACTEDIT_MAX_BYTES: the 100x75 test photo (about 22 KB) fits


class Server:
    """One ``compactedit serve`` process; stopped (SIGTERM, then SIGKILL) by :meth:`close`."""

    def __init__(
        self,
        checkpoint: Path,
        *args: str,
        env: dict[str, str] | None = None,
        default_socket: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ce-", dir="/tmp"))  # short: a socket path has ~100 bytes
        self.socket = self.folder / "serve.sock"
        self.args = list(args)
        self.port = None
        env = dict(env or {})
        if "--port" in self.args:
            self.port = int(self.args[self.args.index("--port") + 1])
        elif default_socket:  # in the runtime folder, which XDG_RUNTIME_DIR names
            env["XDG_RUNTIME_DIR"] = str(self.folder)
            self.socket = self.folder / "compactedit" / "serve.sock"
        elif "--socket" not in self.args:
            self.args += ["--socket", str(self.socket)]
        else:
            self.socket = Path(self.args[self.args.index("--socket") + 1])
        self.log = self.folder / "server.log"
        full_env = {
            **os.environ,
            "PYTHONPATH": str(PROJECT),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "COMPACTEDIT_MAX_BYTES": str(MAX_BYTES),
            **env,
        }
        command = [sys.executable, "-m", "compactedit_cli", "serve", "--model", str(checkpoint), "--device", "cpu"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, *self.args], env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
            )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1" if self.port else "http://localhost/v1"

    def http(self, timeout: float = 60.0) -> httpx.Client:
        transport = None if self.port else httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(transport=transport, timeout=timeout)

    def client(self, api_key: str = "unused", timeout: float = 60.0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=api_key, http_client=self.http(timeout), max_retries=0, timeout=timeout
        )

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.output()}")
            try:
                with self.http(timeout=2) as http:
                    if http.get(self.base_url.removesuffix("/v1") + "/health").status_code == 200:
                        return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {START_TIMEOUT}s:\n{self.output()}")

    def status(self) -> dict:
        with self.http(timeout=10) as http:
            return http.get(self.base_url.removesuffix("/v1") + "/status").json()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def decode(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    return make_photo(tmp_path_factory.mktemp("photo") / "street.png", size=(100, 75), seed=5)


@pytest.fixture(scope="module")
def editor(tiny_checkpoint):
    from compactedit_cli.editor import Editor

    return Editor(str(tiny_checkpoint), device="cpu", offline=True)


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Iterator[Server]:
    """A server on a Unix socket, shared by the tests that only send requests."""
    running = Server(tiny_checkpoint).wait_ready()
    yield running
    running.close()


def in_process(editor, photo: Path, folder: Path, prompt: str, **parameters) -> list[np.ndarray]:
    """The same edit through the library, on one thread as the server runs (thread counts change rounding)."""
    folder.mkdir(parents=True, exist_ok=True)
    with single_thread():
        records = editor.edit(photo, prompt, folder / "out.png", **parameters)
    return [pixels(Image.open(r.output)) for r in records]


# ---- the openai client ---------------------------------------------------------------------------------------


def test_unix_socket_is_private_and_edits_match_the_library(server, editor, photo, tmp_path):
    assert stat.S_IMODE(server.socket.stat().st_mode) == 0o600
    client = server.client()
    [model] = client.models.list().data
    with photo.open("rb") as image:
        answer = client.images.edit(
            model=model.id, image=image, prompt="make it winter", n=2, extra_body={"seed": 3, "steps": 2}
        )
    assert [decode(item).size for item in answer.data] == [(100, 75), (100, 75)]
    expected = in_process(editor, photo, tmp_path, "make it winter", seed=3, steps=2, num_images=2)
    for item, want in zip(answer.data, expected, strict=True):
        assert np.array_equal(pixels(decode(item)), want)
    assert not np.array_equal(pixels(decode(answer.data[0])), pixels(decode(answer.data[1])))


def test_models_retrieve_finds_the_served_model_by_either_name(server, tiny_checkpoint):
    """The served id here is a path: its slashes come percent-encoded from the openai client."""
    client = server.client()
    [listed] = client.models.list().data
    for name in {listed.id, str(tiny_checkpoint)}:
        found = client.models.retrieve(name)
        assert (found.id, found.object, found.owned_by, found.created) == (
            listed.id, "model", "compactedit", listed.created
        )  # fmt: skip
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-2")
    assert caught.value.body["code"] == "model_not_found" and caught.value.param == "model"
    assert "'dall-e-2' is not served here" in caught.value.body["message"]


def test_output_format_and_guidance_extras(server, editor, photo, tmp_path):
    with photo.open("rb") as image:
        answer = server.client().images.edit(
            image=image,
            prompt="add a red hat",
            output_format="webp",
            extra_body={"seed": 11, "steps": 1, "guidance": 2.0, "image_guidance": 0.5},
        )
    picture = decode(answer.data[0])
    assert picture.format == "WEBP" and picture.size == (100, 75)
    assert answer.output_format == "webp"
    with single_thread():
        [record] = editor.edit(
            photo, "add a red hat", tmp_path / "out.webp", seed=11, steps=1, guidance=2.0, image_guidance=0.5
        )
    assert np.array_equal(pixels(picture), pixels(Image.open(record.output)))


def test_eight_concurrent_clients_each_get_their_own_edit(server, editor, photo, tmp_path):
    results: dict[int, np.ndarray] = {}
    failures: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            with photo.open("rb") as image:
                answer = server.client().images.edit(
                    image=image, prompt=f"variant {seed}", extra_body={"seed": seed, "steps": 1}
                )
            results[seed] = pixels(decode(answer.data[0]))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures and sorted(results) == list(range(8))
    for seed, got in results.items():
        [want] = in_process(editor, photo, tmp_path / str(seed), f"variant {seed}", seed=seed, steps=1)
        assert np.array_equal(got, want), seed


# ---- errors ---------------------------------------------------------------------------------------------------


def pixel_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG whose header claims 3.6 billion pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("changes", "status", "code", "words"),
    [
        ({"image": ("a.png", b"this is not an image", "image/png")}, 400, "invalid_image", "not a recognised image"),
        ({"image": ("a.png", b"\x89PNG" + bytes(MAX_BYTES), "image/png")}, 413, "image_too_large", "over the limit"),
        ({"image": ("a.png", bytes(3 * 2**20), "image/png")}, 413, "payload_too_large", "over the limit"),
        ({"image": ("bomb.png", pixel_bomb(), "image/png")}, 400, "invalid_image", "over the limit of"),
        ({"image": ("sliver.png", png(402, 2), "image/png")}, 400, "invalid_image", "up to 200:1"),
        ({"n": 65}, 400, "invalid_value", "n must be between 1 and 64"),
        ({"extra_body": {"steps": 1001}}, 400, "invalid_value", "steps must be between 1 and 1000"),
        ({"extra_body": {"seed": "soon"}}, 400, "invalid_value", "seed must be an integer"),
        ({"model": "dall-e-2"}, 404, "model_not_found", "not served here"),
        ({"prompt": " \u200b "}, 400, "invalid_value", "prompt is empty"),
        ({"prompt": "a" * 70_000}, 400, "invalid_value", "prompt is 70,000 bytes long, over the limit of 65,536"),
        ({"prompt": "a" * 300_000}, 400, "invalid_value", "prompt is over the limit of 262,144 bytes for a form"),
        ({"size": "512x512"}, 400, "invalid_value", "size must be auto"),
        ({"response_format": "url"}, 400, "invalid_value", "b64_json"),
        ({"output_format": "gif"}, 400, "invalid_value", "output_format must be png, jpg or webp"),
        (
            {"image": ("wide.png", png(16_400, 82), "image/png"), "output_format": "webp"},
            400,
            "invalid_value",
            "the output would be 16400x82, and WEBP stores at most 16,383 pixels a side: ask for png",
        ),
        ({"mask": ("mask.png", b"\x89PNG", "image/png")}, 400, "invalid_mask", "the mask is not a recognised image"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_requests_get_openai_shaped_4xx(server, photo, changes, status, code, words):
    request = {"image": ("street.png", photo.read_bytes(), "image/png"), "prompt": "make it winter", **changes}
    with pytest.raises(openai.APIStatusError) as caught:
        server.client().images.edit(**request)
    error = caught.value
    assert error.status_code == status
    assert set(error.body) >= {"message", "type", "code"} and error.body["code"] == code
    assert words in error.body["message"] and "Traceback" not in error.body["message"]


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"n": 0}, "n"),
        ({"extra_body": {"steps": "many"}}, "steps"),
        ({"extra_body": {"guidance": -1}}, "guidance"),
        ({"size": "512x512"}, "size"),
        ({"model": "dall-e-2"}, "model"),
        ({"prompt": " "}, "prompt"),
        ({"prompt": "a" * 70_000}, "prompt"),
        ({"prompt": "a" * 300_000}, "prompt"),
        ({"output_compression": 0}, "output_compression"),
        ({"extra_body": {"crop_to_mask": "maybe"}}, "crop_to_mask"),
        ({"extra_body": {"nonsense": 1}}, "nonsense"),
        ({"image": ("a.png", b"not an image", "image/png")}, "image"),
        ({"mask": ("m.png", b"not a mask", "image/png")}, "mask"),
        ({"image": ("wide.png", png(16_400, 82), "image/png"), "output_format": "webp"}, "output_format"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_an_error_names_its_field_as_param(server, photo, changes, param):
    """OpenAI's error object names the offending field in ``param``; the SDK hands it on as ``error.param``."""
    request = {"image": ("street.png", photo.read_bytes(), "image/png"), "prompt": "make it winter", **changes}
    with pytest.raises(openai.APIStatusError) as caught:
        server.client().images.edit(**request)
    assert caught.value.param == param, caught.value.body


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nunterminated',
            "multipart/form-data; boundary=b",
        ),
        (b"whatever", "multipart/form-data"),
        (b'{"prompt": "x"}', "application/json"),
    ],
)
def test_malformed_bodies_are_400(server, body, content_type):
    with server.http() as http:
        answer = http.post(f"{server.base_url}/images/edits", content=body, headers={"content-type": content_type})
    assert answer.status_code == 400
    assert set(answer.json()["error"]) >= {"message", "type", "code"}


def test_a_chunked_upload_is_cut_off_at_the_limit(server):
    sent = []

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(64 * 16):  # 64 MiB, far past the limit
            sent.append(1)
            yield bytes(65536)
        yield b"\r\n--b--\r\n"

    with server.http() as http:
        answer = http.post(
            f"{server.base_url}/images/edits",
            content=body(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("origin", "status"),
    [("https://evil.example", 403), ("null", 403), ("http://127.0.0.1.nip.io", 403), ("http://localhost:3000", 200)],
)
def test_a_web_page_of_another_site_cannot_use_a_keyless_server(server, photo, origin, status):
    """Any page in the user's browser can POST a form to a loopback port (no preflight for multipart): a keyless
    server refuses what a browser sends for another site's page (its Origin), and takes a local one's."""
    with server.http() as http, photo.open("rb") as image:
        answer = http.post(
            f"{server.base_url}/images/edits",
            files={"image": image},
            data={"prompt": "x", "steps": "1"},
            headers={"Origin": origin},
        )
    assert answer.status_code == status, answer.text[:300]
    if status == 403:
        assert answer.json()["error"]["code"] == "cross_origin"


def test_unknown_paths_and_methods_are_json(server):
    with server.http() as http:
        missing = http.get("http://localhost/v2/nothing")
        wrong = http.get(f"{server.base_url}/images/edits")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert wrong.headers["allow"] == "POST"  # a 405 must say what is allowed (RFC 9110)


def test_logs_name_no_prompt_without_verbose(server, photo):
    with photo.open("rb") as image:
        server.client().images.edit(image=image, prompt="secret words here", extra_body={"steps": 1})
    assert "edit 100x75" in server.output()
    assert "secret words here" not in server.output()


def test_serve_status_command(server):
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    done = subprocess.run(
        [sys.executable, "-m", "compactedit_cli", "serve", "status", "--socket", str(server.socket)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "device:   cpu" in done.stdout and "queue:" in done.stdout and "memory:" in done.stdout
