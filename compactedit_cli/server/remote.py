"""Edits through a running ``compactedit serve``: the same checks, files and records as in-process, without torch.

:func:`open_editor` is how ``edit`` and ``batch`` get their Editor. With ``--server auto`` (the default) they use
the server on the default socket when it serves the model asked for (the same model, and the revision, device and
dtype when those are given), and run in-process otherwise. A :class:`RemoteEditor` is an
:class:`~compactedit_cli.editor.Editor` whose compute step happens in the server: the client still opens and
checks the image, and writes the outputs itself, atomically, with the same metadata, so the files are the same
bytes as an in-process edit's.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .. import __version__, options
from ..editor import Computed, Editor, Progress
from ..errors import InputImageError, OutOfMemoryError, UsageError
from ..files.imaging import SourceImage
from ..files.masks import Mask
from ..loading.refs import ModelRef, parse_model
from ..options import EditOptions, ModelOptions
from ..record import EditRecord
from . import address as where
from . import client, wire
from .client import ServerError

API_KEY_ENV = "COMPACTEDIT_API_KEY"
# A busy server (HTTP 429) is asked again after its Retry-After, for at most this long in all.
BUSY_PATIENCE_SECONDS = 600


def model_key(ref: ModelRef) -> str:
    """What two processes compare to know they mean the same model: the hub id, or a digest of the local folder's
    real path (so the server's answer names no path)."""
    if ref.repo_id:
        return ref.repo_id
    return "local:" + hashlib.sha256(os.fsencode(ref.path)).hexdigest()[:16]


def adapter_key(spec: str) -> str:
    """A LoRA adapter as two processes compare it: a hub file as given, a local file by a digest of its real path."""
    path = Path(spec).expanduser()
    if path.is_file():
        return "local:" + hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:16]
    return spec


def identity(editor: Editor) -> dict[str, Any]:
    """What a server serves, as clients match it."""
    ref = parse_model(editor.options.model, editor.options.revision)
    return {
        "model": model_key(ref),
        "revision": editor.options.revision,
        "commit": editor.resolved.commit,
        "device": str(editor.device),
        "dtype": str(editor.pipe.dtype).removeprefix("torch."),
        "loras": [[adapter_key(spec), scale] for spec, scale in editor.options.loras],
        "quantize": editor.options.quantize,
    }


def mismatch(served: dict[str, Any], wanted: ModelOptions, *, check_model: bool = True) -> str | None:
    """Why the server described by ``served`` (its ``/status``) cannot do ``wanted``'s edits, or None. LoRA adapters
    must be the same (the same specs and scales, in order): they change the weights."""
    if served.get("protocol") != wire.PROTOCOL or served.get("version") != __version__:
        return (
            f"the server runs compactedit {served.get('version', 'unknown')} and this is {__version__}: "
            "restart the server (compactedit serve stop) to use the same version"
        )
    serves = served.get("serves") or {}
    if check_model and model_key(parse_model(wanted.model, wanted.revision)) != serves.get("model"):
        return f"the server serves {served.get('model')}, not {wanted.model}"
    commit = serves.get("commit") or ""
    if (
        wanted.revision
        and wanted.revision not in (serves.get("revision"), commit)
        and not commit.startswith(wanted.revision)
    ):
        return f"the server serves revision {commit or serves.get('revision')}, not {wanted.revision}"
    if wanted.device != "auto" and _device(wanted.device) != _device(serves.get("device", "")):
        return f"the server runs on {serves.get('device')}, not {wanted.device}"
    dtype = options.torch_dtype_name(wanted.dtype)
    if dtype is not None and dtype != serves.get("dtype"):
        return f"the server runs in {serves.get('dtype')}, not {dtype}"
    if [[adapter_key(spec), scale] for spec, scale in wanted.loras] != serves.get("loras", []):
        return "the server's LoRA adapters are not the ones asked for"
    if wanted.quantize != serves.get("quantize", "none"):
        return f"the server runs with --quantize {serves.get('quantize', 'none')}, not {wanted.quantize}"
    return None


def _device(name: str) -> str:
    return "cuda:0" if name == "cuda" else name


def open_editor(
    model: ModelOptions,
    server: str,
    *,
    status: Callable[[str], None] = lambda _message: None,
    model_given: bool = True,
) -> Editor:
    """The Editor ``--server`` asks for: a server's (``auto`` when a matching one runs, or the one named), or an
    in-process one (``never``, or ``auto`` without a matching server). A named server that cannot do the edit is a
    one-line error; under ``auto``, a server of another version is said in the Editor's notes."""
    choice = options.server(server)
    api_key = os.environ.get(API_KEY_ENV) or None
    if choice == "never":
        return Editor(model, status=status)
    if choice != "auto":
        address = where.parse(choice)
        served = client.call(address, "GET", "/status", api_key)
        reason = mismatch(served, model, check_model=model_given)
        if reason is not None:
            raise ServerError(f"--server {address.label()}: {reason}")
        return RemoteEditor(address, model, served, api_key=api_key)
    found = _default_server(api_key)
    if found is None:
        return Editor(model, status=status)
    address, served = found
    reason = mismatch(served, model)
    if reason is None:
        status(f"using the server on {address.label()}")
        return RemoteEditor(address, model, served, api_key=api_key)
    editor = Editor(model, status=status)
    if served.get("version") != __version__:
        editor.notes.insert(0, f"not using the server on {address.label()}: {reason}")
    return editor


def _default_server(api_key: str | None) -> tuple[where.Address, dict[str, Any]] | None:
    """The server on the default socket and its status, if one answers there."""
    try:
        address = where.resolve(None, None, None)
    except UsageError:
        return None
    if address.socket_path is None or not where.answers(address.socket_path, timeout=0.5):
        return None
    try:
        status, served = client.request(address, "GET", "/status", api_key=api_key, timeout=5)
    except ServerError:
        return None
    return (address, served) if status == 200 else None


class RemoteEditor(Editor):
    """An Editor whose edits are computed by the server at ``address``; everything else happens here."""

    def __init__(
        self, address: where.Address, model: ModelOptions, served: dict[str, Any], api_key: str | None = None
    ) -> None:
        self.options = model
        self.address, self.served, self.api_key = address, served, api_key
        self.pipe = self.resolved = None
        self.notes = []

    @property
    def device(self) -> None:
        return None

    @property
    def model_name(self) -> str:
        return self.served["model"]

    def group_key(self, image: SourceImage, chosen: EditOptions) -> Hashable:
        """Nothing is batched here: the server batches what its clients send (``serve --max-batch``)."""
        return None

    def compute_group(
        self, items: list[tuple[SourceImage, str, int]], chosen: EditOptions, progress: Progress | None = None
    ) -> list[Computed]:
        return [self.compute(image, text, chosen.replace(seed=seed), progress) for image, text, seed in items]

    def compute(
        self,
        image: SourceImage,
        instruction: str,
        chosen: EditOptions,
        progress: Progress | None = None,
        mask: Mask | None = None,
    ) -> Computed:
        described, planes = wire.source_fields(image, mask)
        request = {"instruction": instruction, "options": asdict(chosen), "source": described}
        body, content_type = wire.multipart({"request": json.dumps(request)}, planes)
        headers = {
            "Content-Type": content_type,
            wire.VERSION_HEADER: __version__,
            wire.PROTOCOL_HEADER: str(wire.PROTOCOL),
        }
        waited = 0.0
        while True:
            connection = client.connect(self.address, timeout=None)
            try:  # closing the connection (Ctrl-C included) is what tells the server to cancel the edit
                response = client.send(
                    connection, self.address, "POST", wire.EDIT_PATH, api_key=self.api_key, body=body, headers=headers
                )
                if response.status == 429 and waited < BUSY_PATIENCE_SECONDS:
                    pause = min(30.0, max(1.0, float(response.getheader("Retry-After") or 1)))
                    if progress is not None:
                        progress.stage("waiting: the server is busy")
                    time.sleep(pause)
                    waited += pause
                    continue
                if response.status != 200:
                    raise self._failure(response.status, _json(response.read()))
                return self._receive(response, progress)
            except (OSError, http.client.HTTPException) as exc:
                raise ServerError(
                    f"the server on {self.address.label()} stopped before the edit was done ({_reason(exc)})"
                ) from None
            finally:
                connection.close()

    def _receive(self, response: http.client.HTTPResponse, progress: Progress | None) -> Computed:
        """Follow the server's events to its result, then read the pictures that come after it."""
        while True:
            line = response.readline()
            if not line:
                raise ServerError(f"the server on {self.address.label()} stopped before the edit was done")
            event = _json(line)
            if "result" in event:
                break
            if "error" in event:
                raise self._failure(int(event.get("status", 500)), event)
            if progress is None:
                continue
            if "step" in event:
                progress.step(SimpleNamespace(index=event["step"], total=event["total"]))
            elif "stage" in event:
                progress.stage(event["stage"])
            elif event.get("queued"):
                progress.stage(f"waiting: {event['queued']} edits ahead on the server")
        result = event["result"]
        pictures = []
        for header in result["pictures"]:
            data = response.read(header["length"])
            if len(data) != header["length"]:
                raise ServerError(f"the server on {self.address.label()} stopped while sending the result")
            pictures.append(wire.rebuild(header, data))
        return Computed(pictures, [EditRecord(**record) for record in result["records"]])

    def _failure(self, status: int, body: dict[str, Any]) -> Exception:
        """The error an in-process edit would raise for what the server answered."""
        message = client.error_message(status, body)
        code = (body.get("error") or {}).get("code")
        if code == "out_of_memory":
            return OutOfMemoryError(message)
        if code == "invalid_image":
            return InputImageError(message)
        if status in (400, 401, 403):
            return UsageError(message)
        return ServerError(f"the server on {self.address.label()}: {message}")


def _json(data: bytes) -> dict[str, Any]:
    try:
        decoded = json.loads(data)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        raise ServerError("the server's answer is not compactedit's: is it a compactedit server?")
    return decoded


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
