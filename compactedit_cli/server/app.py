"""The HTTP API: OpenAI's ``POST /v1/images/edits`` (multipart), ``GET /v1/models`` and ``/v1/models/{model}``,
``GET /health``, and the server's own ``GET /status`` and ``POST /shutdown``.

Every value a client sends goes through :mod:`compactedit_cli.options` and the image through
:func:`~compactedit_cli.files.imaging.open_image`, so a request fails exactly as the same edit on the command line
would, and with the same limits. Failures are OpenAI-shaped JSON (``{"error": {"message", "type", "code",
"param"}}``) with a 4xx status for anything the client can fix; no response ever carries a traceback. The server
reads and writes no path a client names: images travel in the request and the response.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__, options
from ..errors import CompactEditError, InputImageError, OutOfMemoryError, UsageError, internal_error, is_out_of_memory
from ..files import outputs
from ..files.imaging import SourceImage, max_bytes_limit, max_pixels_limit, open_image
from ..files.masks import Mask, open_mask
from . import remote, wire
from .address import is_loopback
from .jobs import EditCancelledError, EditQueue, Job, QueueFullError, ServerStoppedError

log = logging.getLogger("compactedit.serve")

# Room for the form's text fields and multipart framing on top of the image's own byte limit.
FORM_ALLOWANCE = 1024 * 1024
# A text field holds at most an instruction, or compactedit's own request, whose JSON escapes can triple it.
MAX_FIELD_BYTES = 4 * options.MAX_INSTRUCTION_BYTES
# How often a waiting client hears its place in the queue (which is also how a gone client is noticed).
QUEUE_NOTICE_SECONDS = 0.5
# Once the server is stopping, an upload that sends nothing for this long is dropped rather than waited for.
STALL_SECONDS = 1.0
# OpenAI fields accepted and ignored: they describe a hosted model's knobs that this one does not have.
IGNORED_FIELDS = frozenset({"user", "safety_identifier", "quality", "background", "input_fidelity", "moderation"})
# The EditOptions fields compactedit's own client sends.
EDIT_FIELDS = frozenset(
    {"steps", "guidance", "image_guidance", "seed", "num_images", "binning", "draw"}
    | {"mask_mode", "feather", "crop_to_mask", "color_match"}
)
# compactedit's own OpenAI-style fields for a masked edit (``mask`` itself is OpenAI's: transparent is editable).
MASK_FIELDS = frozenset({"mask_mode", "feather", "crop_to_mask", "color_match"})
FIELDS = frozenset(
    {"image", "mask", "prompt", "model", "n", "size", "response_format", "output_format", "output_compression"}
    | {"stream", "seed", "steps", "guidance", "image_guidance"}
    | MASK_FIELDS
)


class ApiError(Exception):
    """A failure the response reports as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.headers = status, message, code, kind, headers
        self.param = param  # the request field at fault, which OpenAI's clients hand on as ``error.param``

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=self.headers)


@dataclass
class ServerState:
    """What the endpoints share: the loaded editor, its queue and the limits."""

    editor: Any
    queue: EditQueue
    api_key: str | None = None
    verbose: bool = False
    idle_timeout: float | None = None
    started: float = 0.0
    on_stop: Callable[[], None] = lambda: None
    stopping: Callable[[], bool] = lambda: False

    def __post_init__(self) -> None:
        self.started = self.started or time.monotonic()
        self.max_pixels = max_pixels_limit()
        self.max_bytes = max_bytes_limit(self.max_pixels)
        self.identity = remote.identity(self.editor)

    @property
    def model_id(self) -> str:
        return self.editor.model_name

    def model_names(self) -> set[str]:
        """What a request's ``model`` may say: the served id, or the name the server was started with."""
        return {self.model_id, self.editor.options.model}


def build_app(state: ServerState) -> Starlette:
    """The Starlette application over ``state``; ``on_shutdown`` runs once it stops taking requests."""

    async def not_found(_request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = "no such endpoint" if status == 404 else (exc.detail if isinstance(exc, HTTPException) else "")
        headers = exc.headers if isinstance(exc, HTTPException) else None  # a 405's Allow
        code = "not_found" if status == 404 else "invalid_request"
        return ApiError(status, message, code, headers=headers).response()

    app = Starlette(
        routes=[
            Route("/health", _guarded(state, health, auth=False), methods=["GET"]),
            Route("/v1/models", _guarded(state, list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", _guarded(state, retrieve_model), methods=["GET"]),
            Route("/v1/images/edits", _guarded(state, edit_image), methods=["POST"]),
            Route(wire.EDIT_PATH, _guarded(state, compactedit_edit), methods=["POST"]),
            Route("/status", _guarded(state, status), methods=["GET"]),
            Route("/shutdown", _guarded(state, shutdown), methods=["POST"]),
        ],
        exception_handlers={HTTPException: not_found},
    )
    app.state.server = state
    return app


def _guarded(state: ServerState, endpoint: Callable[..., Any], auth: bool = True) -> Callable[..., Any]:
    """``endpoint(request, state)`` behind the API key check, with every failure an OpenAI-shaped response."""

    async def run(request: Request) -> Response:
        try:
            _refuse_other_sites(request, state.api_key)
            if auth:
                _authorize(request, state.api_key)
            return await endpoint(request, state)
        except ApiError as exc:
            log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.code)
            return exc.response()
        except Exception as exc:  # a bug: one line to the client, the traceback to the server's log with -v
            log.error("%s %s -> 500 %s", request.method, request.url.path, internal_error(exc), exc_info=state.verbose)
            return ApiError(500, internal_error(exc), "internal_error", "server_error").response()

    return run


def _refuse_other_sites(request: Request, api_key: str | None) -> None:
    """A server without a key trusts whoever reaches it, and a web page in the user's browser reaches a loopback
    port too (a form POST needs no preflight): a request a browser sends for a page of another host is refused."""
    origin = request.headers.get("origin")
    if api_key or origin is None:
        return
    host = urlsplit(origin).hostname
    if host is None or not is_loopback(host):
        raise ApiError(403, f"requests from web pages of other sites are refused (Origin {origin})", "cross_origin")


def _authorize(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key")


# ---- endpoints ---------------------------------------------------------------------------------------------


async def health(_request: Request, _state: ServerState) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def list_models(_request: Request, state: ServerState) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_entry(state)]})


async def retrieve_model(request: Request, state: ServerState) -> JSONResponse:
    """OpenAI's ``GET /v1/models/{model}``: the served model by either of its names (a hub id's slash may come
    percent-encoded, as the openai client sends it), else 404."""
    model = request.path_params["model"]
    if model not in state.model_names():
        raise _not_served(state, model)
    return JSONResponse(_model_entry(state))


def _model_entry(state: ServerState) -> dict[str, Any]:
    created = int(time.time() - (time.monotonic() - state.started))
    return {"id": state.model_id, "object": "model", "created": created, "owned_by": "compactedit"}


def _not_served(state: ServerState, model: str) -> ApiError:
    message = f"model {model!r} is not served here (this server serves {state.model_id!r})"
    return ApiError(404, message, "model_not_found", param="model")


async def status(_request: Request, state: ServerState) -> JSONResponse:
    editor = state.editor
    return JSONResponse(
        {
            "model": state.model_id,
            "revision": editor.resolved.commit,
            "device": str(editor.device),
            "dtype": str(editor.pipe.dtype).removeprefix("torch."),
            "pid": os.getpid(),
            "version": __version__,
            "protocol": wire.PROTOCOL,
            "serves": state.identity,
            "uptime_seconds": round(time.monotonic() - state.started, 1),
            "queue": {
                "running": state.queue.running,
                "waiting": state.queue.waiting,
                "max": state.queue.max_queue,
                "max_batch": state.queue.max_batch,
            },
            "edits_done": state.queue.done,
            "edits_cancelled": state.queue.cancelled,
            "idle_timeout": state.idle_timeout,
            "memory": _memory(editor.device),
            "limits": {"max_bytes": state.max_bytes, "max_pixels": state.max_pixels},
        }
    )


async def shutdown(_request: Request, state: ServerState) -> JSONResponse:
    log.info("stop requested: finishing queued edits")
    state.on_stop()
    return JSONResponse({"stopping": True}, status_code=202)


async def edit_image(request: Request, state: ServerState) -> JSONResponse:
    form = await _read_form(request, state.max_bytes, state.stopping)
    try:
        asked = _edit_request(form, state)
        source = await run_in_threadpool(_open_upload, asked.upload, state)
        _check_fits(asked.format, source)
        mask = None if asked.mask is None else await run_in_threadpool(_open_mask, asked.mask, source, state)
    finally:
        await form.close()
    chosen, prompt, fmt = asked.chosen, asked.prompt, asked.format
    started = time.perf_counter()
    try:
        computed = await _unless_hung_up(request, state.queue.submit(_edit_job(state, source, prompt, chosen, mask)))
    except QueueFullError:
        raise _queue_full(state) from None
    except Exception as exc:
        raise _edit_failure(exc) from None
    pictures = await run_in_threadpool(_encoded, computed, source, fmt, asked.quality)
    width, height = source.size
    described = f" prompt={prompt!r}" if state.verbose else ""
    log.info(
        "edit %dx%d n=%d steps=%d seed=%s %s in %.2fs%s",
        width, height, chosen.num_images, chosen.steps, pictures[0][1], fmt, time.perf_counter() - started, described,
    )  # fmt: skip
    return JSONResponse(
        {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(data).decode("ascii"), "seed": seed} for data, seed in pictures],
            "output_format": fmt,
            "size": f"{width}x{height}",
        }
    )


async def _unless_hung_up(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result; a client that hangs up first (an OpenAI client's timeout) cancels it, so its edit is
    skipped if it waits or stopped at its next step if it runs, rather than keeping the queue from the others."""
    task = asyncio.ensure_future(work)
    hung_up = asyncio.ensure_future(_hang_up(request))
    try:
        done, _ = await asyncio.wait({task, hung_up}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise EditCancelledError()
    finally:
        hung_up.cancel()
        task.cancel()  # a no-op once it is done


async def _hang_up(request: Request) -> None:
    """Return once the client closes the connection (its body is read, so nothing else comes before that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def compactedit_edit(request: Request, state: ServerState) -> Response:
    """compactedit's own client: checked pixels in, events and raw pictures out (see :mod:`.wire`)."""
    _check_client(request)
    form = await _read_form(request, wire_limit(state.max_pixels), state.stopping, max_files=len(wire.PLANES))
    try:
        asked, planes = _native_request(form)
        source, mask = await run_in_threadpool(_read_planes, asked, planes, state)
    finally:
        await form.close()
    instruction = asked["instruction"]
    job = _edit_job(state, source, instruction, asked["options"], mask)
    chosen = job.key_options
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    job.on_event = events.put_nowait
    job.loop = asyncio.get_running_loop()
    job.future = job.loop.create_future()
    job.future.add_done_callback(lambda _future: events.put_nowait(None))
    try:
        state.queue.enqueue(job)
    except QueueFullError:
        raise _queue_full(state) from None
    size = f"{source.size[0]}x{source.size[1]}"
    described = f" prompt={instruction!r}" if state.verbose else ""
    log.info("edit %s n=%d steps=%d seed=%s queued%s", size, chosen.num_images, chosen.steps, chosen.seed, described)
    return StreamingResponse(_stream(job, events, state), media_type="application/x-ndjson")


def _edit_job(
    state: ServerState, source: SourceImage, instruction: str, chosen: options.EditOptions, mask: Mask | None
) -> Job:
    """The queue's job for one edit, from either endpoint: with ``--max-batch``, batched with waiting edits of its
    model size and options (never with a mask or a colour match: its retouch is its own); it stops at its next
    step once its client is gone."""
    if chosen.seed is None:  # drawn here, so a batch of requests knows each one's seed
        chosen = chosen.replace(seed=options.random_seed())
    alone = mask is not None or chosen.color_match
    return Job(
        lambda job: state.editor.compute(source, instruction, chosen, progress=JobProgress([job]), mask=mask),
        key=state.editor.group_key(source, chosen) if state.queue.max_batch > 1 and not alone else None,
        item=(source, instruction, chosen.seed),
        key_options=chosen,
    )


async def _stream(job: Job, events: asyncio.Queue, state: ServerState) -> AsyncIterator[bytes]:
    """The job's events as they come, then its result; a client that goes away cancels the job."""
    started = time.perf_counter()
    try:
        place = None
        while True:
            try:
                event = await asyncio.wait_for(events.get(), QUEUE_NOTICE_SECONDS)
            except TimeoutError:
                if (now := state.queue.position(job)) != place:
                    place = now
                    yield wire.event_line({"queued": now})
                continue
            if event is None:
                break
            yield wire.event_line(event)
        try:
            computed = job.future.result()
        except Exception as exc:
            failure = _edit_failure(exc)
            log.info("edit -> %d %s", failure.status, failure.code)
            yield wire.event_line({"error": failure.body(), "status": failure.status})
            return
        parts = [wire.picture_parts(picture) for picture in computed.pictures]
        records = [record.to_dict() for record in computed.records]
        yield wire.event_line({"result": {"records": records, "pictures": [header for header, _ in parts]}})
        for _, data in parts:
            yield data
        log.info("edit done in %.2fs", time.perf_counter() - started)
    finally:
        if not job.future.done():
            state.queue.drop(job)
            log.info("edit cancelled: the client went away")


class JobProgress:
    """The engine's progress, sent to each waiting client; between steps, the edit stops if they all left."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def stage(self, name: str) -> None:
        self._check()
        for job in self.jobs:
            job.emit({"stage": name})

    def step(self, state: Any) -> None:
        self._check()
        for job in self.jobs:
            job.emit({"step": state.index, "total": state.total})

    def _check(self) -> None:
        if all(job.cancelled.is_set() for job in self.jobs):
            raise EditCancelledError()


def run_batch(editor: Any, jobs: list[Job]) -> list[Any]:
    """Jobs that share a batch key (the model size and every option but the seed), edited as one batch."""
    log.info("edit %d waiting requests as one batch", len(jobs))
    return editor.compute_group([job.item for job in jobs], jobs[0].key_options, progress=JobProgress(jobs))


# ---- parsing ------------------------------------------------------------------------------------------------


async def _read_form(request: Request, max_bytes: int, stopping: Callable[[], bool], max_files: int = 4) -> FormData:
    """The multipart form, read as it arrives and refused (413) once it passes the byte limit, whatever the
    ``Content-Length`` says; it is never held whole in memory (file parts spool to disk)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "send the edit as multipart/form-data (fields image, prompt, …)", "invalid_content_type")
    limit = max_bytes + FORM_ALLOWANCE
    too_large = ApiError(413, f"the upload is over the limit of {max_bytes:,} bytes for an image", "payload_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large

    async def counted() -> AsyncIterator[bytes]:
        received = 0
        chunks = aiter(request.stream())
        while (chunk := await _next_chunk(chunks, stopping)) is not None:
            received += len(chunk)
            if received > limit:
                raise too_large
            yield chunk

    parser = MultiPartParser(
        request.headers,
        counted(),
        max_files=max_files,
        max_fields=len(FIELDS | IGNORED_FIELDS),
        max_part_size=MAX_FIELD_BYTES,
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        # The parser's message names no field; the part it was reading does (starlette keeps it as _current_part).
        field = getattr(getattr(parser, "_current_part", None), "field_name", None)
        if exc.message.startswith(("Part exceeded", "Field exceeded")) and field:
            message = f"{field} is over the limit of {MAX_FIELD_BYTES:,} bytes for a form field"
            raise ApiError(400, message, "invalid_value", param=field) from None
        raise ApiError(400, f"malformed multipart body: {exc.message}", "invalid_multipart") from None
    except ClientDisconnect:  # the client's doing, not the server's failure: one info line, no 500
        raise ApiError(499, "the client went away during its upload", "cancelled") from None


async def _next_chunk(chunks: AsyncIterator[bytes], stopping: Callable[[], bool]) -> bytes | None:
    """The upload's next chunk (None after the last). Once the server is stopping, an upload that stalls is refused
    (503): the drain waits for every open request, and a client that sends nothing more would hold it for ever."""
    task = asyncio.ensure_future(anext(chunks, None))
    while not (await asyncio.wait({task}, timeout=STALL_SECONDS))[0]:
        if stopping():
            task.cancel()
            raise ApiError(503, "the server is stopping", "server_stopping", "server_error")
    return task.result()


def _text(form: FormData, name: str) -> str | None:
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"{name} is given {len(values)} times", "invalid_value", param=name)
    if not isinstance(values[0], str):
        raise ApiError(400, f"{name} must be a form field, not a file", "invalid_value", param=name)
    return values[0]


def _field(form: FormData, name: str, check: Callable[[Any, str], Any], default: Any = None) -> Any:
    """Form field ``name`` (``default`` if it is absent or empty and there is one) through ``check``, an
    :mod:`~compactedit_cli.options` function or one of its kind; a bad value is a 400 naming the field."""
    value = _text(form, name)
    try:
        return check(default if not value and default is not None else value, name)
    except UsageError as exc:
        raise ApiError(400, str(exc), "invalid_value", param=name) from None


def _only(allowed: tuple[str, ...], why: str) -> Callable[[str | None, str], None]:
    """The check of an OpenAI field this server takes one value of (or none): ``why`` says why not another."""

    def check(value: str | None, name: str) -> None:
        if value is not None and value.strip().lower() not in allowed:
            raise UsageError(f"{name} must be {allowed[0]}: {why} (got {value!r})")

    return check


def _prompt(value: str | None, name: str) -> str:
    if value is None:
        raise UsageError(f"{name} is required")
    return options.instruction(value, name)


@dataclass
class EditRequest:
    """An edit request's checked values; the upload is opened after, off the event loop."""

    upload: UploadFile
    mask: UploadFile | None
    prompt: str
    chosen: options.EditOptions
    format: str
    quality: int | None


def _edit_request(form: FormData, state: ServerState) -> EditRequest:
    """The checked parameters of an edit request (the upload still unopened), or an ApiError."""
    unknown = sorted(set(form.keys()) - FIELDS - IGNORED_FIELDS - {"image[]"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", "unknown_parameter", param=unknown[0])
    uploads = form.getlist("image") + form.getlist("image[]")
    if not uploads:
        raise ApiError(400, "image is required (a file field)", "missing_image", param="image")
    if len(uploads) > 1:
        raise ApiError(400, "send one image per request", "invalid_value", param="image")
    if not isinstance(uploads[0], UploadFile):
        raise ApiError(400, "image must be a file, not a text field", "invalid_image", param="image")
    masks = form.getlist("mask")
    if len(masks) > 1 or not all(isinstance(m, UploadFile) for m in masks):
        raise ApiError(400, "mask must be one file", "invalid_value", param="mask")
    model = _text(form, "model")
    if model is not None and model not in state.model_names():
        raise _not_served(state, model)
    _field(form, "size", _only(("auto",), "the output always has the input's size"))
    _field(form, "response_format", _only(("b64_json",), "this server returns no URLs"))
    _field(form, "stream", _only(("false", "0", ""), "the response comes when the edit is done"))
    chosen = options.EditOptions(
        steps=_field(form, "steps", options.steps, options.DEFAULT_STEPS),
        guidance=_field(form, "guidance", options.scale),
        image_guidance=_field(form, "image_guidance", options.scale),
        seed=_field(form, "seed", options.seed, options.DEFAULT_SEED),
        num_images=_field(form, "n", options.num_images, options.DEFAULT_NUM_IMAGES),
        mask_mode=_field(form, "mask_mode", options.mask_mode, options.DEFAULT_MASK_MODE),
        feather=_field(form, "feather", options.feather, options.DEFAULT_FEATHER),
        crop_to_mask=_field(form, "crop_to_mask", _flag, "false"),
        color_match=_field(form, "color_match", _flag, "false"),
    )
    return EditRequest(
        upload=uploads[0],
        mask=masks[0] if masks else None,
        prompt=_field(form, "prompt", _prompt),
        chosen=chosen,
        format=_field(form, "output_format", options.output_format_name, options.DEFAULT_FORMAT),
        quality=_field(form, "output_compression", options.quality),
    )


def _flag(value: str, name: str) -> bool:
    """A true/false form field."""
    value = value.strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise UsageError(f"{name} must be true or false (got {value!r})")
    return value in ("true", "1")


def _open_mask(upload: UploadFile, source: SourceImage, state: ServerState) -> Mask:
    """The uploaded mask, read under the image's limits, at the image's size (OpenAI's: transparent is editable)."""
    if upload.size is not None and upload.size > state.max_bytes:
        raise ApiError(
            413,
            f"the mask is {upload.size:,} bytes, over the limit of {state.max_bytes:,}",
            "mask_too_large",
            param="mask",
        )
    upload.file.seek(0)
    data = upload.file.read(state.max_bytes + 1)
    try:
        return open_mask(data, source.size, max_pixels=state.max_pixels, max_bytes=state.max_bytes, label="the mask")
    except InputImageError as exc:
        raise ApiError(400, str(exc), "invalid_mask", param="mask") from None


def _open_upload(upload: UploadFile, state: ServerState) -> SourceImage:
    """The uploaded image decoded under the CLI's limits (its size checked before a byte of it is decoded)."""
    if upload.size is not None and upload.size > state.max_bytes:
        raise ApiError(
            413,
            f"the image is {upload.size:,} bytes, over the limit of {state.max_bytes:,}",
            "image_too_large",
            param="image",
        )
    upload.file.seek(0)
    try:
        return open_image(upload.file, max_pixels=state.max_pixels, max_bytes=state.max_bytes, label="the image")
    except InputImageError as exc:
        raise ApiError(400, str(exc), "invalid_image", param="image") from None


def _check_fits(fmt: str, source: SourceImage) -> None:
    """Refuse, before the edit queues, an output its format cannot store (it has the input's size)."""
    try:
        options.check_output_fits(fmt, source.size, "the output")
    except UsageError as exc:
        raise ApiError(400, f"{exc.message}: ask for png", "invalid_value", param="output_format") from None


def _encoded(computed: Any, source: SourceImage, fmt: str, quality: int | None) -> list[tuple[bytes, int | None]]:
    """Each output's file bytes (with the metadata an edit writes) and seed."""
    written = options.OutputOptions(format=fmt, quality=quality)
    return [
        (outputs.file_bytes(picture, record, fmt, written, source), record.seed)
        for picture, record in zip(computed.pictures, computed.records, strict=True)
    ]


def _queue_full(state: ServerState) -> ApiError:
    return ApiError(
        429,
        "the server is busy: too many edits are waiting",
        "queue_full",
        "rate_limit_error",
        {"Retry-After": str(state.queue.retry_after())},
    )


def _edit_failure(exc: BaseException) -> ApiError:
    """The response for an edit that raised ``exc``: the client's fault is 4xx, the server's 5xx."""
    if isinstance(exc, EditCancelledError):
        return ApiError(499, "the edit was cancelled", "cancelled")
    if isinstance(exc, ServerStoppedError):
        return ApiError(503, "the server was stopped before this edit was done", "server_stopping", "server_error")
    if isinstance(exc, OutOfMemoryError) or is_out_of_memory(exc):
        return ApiError(503, str(OutOfMemoryError()), "out_of_memory", "server_error")
    if isinstance(exc, InputImageError):  # an image the model cannot read: the client's exit 3, as in-process
        return ApiError(400, str(exc), "invalid_image")
    if isinstance(exc, UsageError):
        return ApiError(400, str(exc), "invalid_value")
    if isinstance(exc, CompactEditError):
        return ApiError(500, str(exc), "edit_failed", "server_error")
    log.error("edit failed: %s", internal_error(exc), exc_info=exc)
    return ApiError(500, internal_error(exc), "internal_error", "server_error")


def wire_limit(max_pixels: int) -> int:
    """The most bytes a compactedit client's request may carry: RGB, alpha and mask planes at the pixel limit."""
    return 5 * max_pixels


def _check_client(request: Request) -> None:
    """A compactedit client of another wire protocol is told so, rather than misread."""
    theirs = request.headers.get(wire.PROTOCOL_HEADER)
    if theirs != str(wire.PROTOCOL):
        version = request.headers.get(wire.VERSION_HEADER, "unknown")
        raise ApiError(
            409,
            f"this server runs compactedit {__version__} (protocol {wire.PROTOCOL}); the client is {version} "
            f"(protocol {theirs or 'unknown'}): use the same version on both sides",
            "version_mismatch",
        )


def _native_request(form: FormData) -> tuple[dict[str, Any], dict[str, bytes | UploadFile]]:
    """The checked request of compactedit's own client, and its pixel planes (still unread)."""
    raw = _text(form, "request")
    if raw is None:
        raise ApiError(400, "request is required (a JSON form field)", "invalid_value")
    try:
        asked = json.loads(raw)
        if not isinstance(asked, dict):
            raise ValueError("not an object")
        given = asked.get("options") or {}
        if not isinstance(given, dict) or set(given) - EDIT_FIELDS:
            raise UsageError(f"options may hold only {', '.join(sorted(EDIT_FIELDS))}")
        asked["options"] = options.EditOptions(**given)
        asked["instruction"] = options.instruction(asked.get("instruction"))
    except ValueError as exc:
        raise ApiError(400, f"request is not valid JSON: {exc}", "invalid_value") from None
    except UsageError as exc:
        raise ApiError(400, str(exc), "invalid_value") from None
    planes = {name: form[name] for name in wire.PLANES if name in form}
    if not all(isinstance(plane, UploadFile) for plane in planes.values()):
        raise ApiError(400, "rgb, alpha and mask must be file fields", "invalid_value")
    return asked, planes


def _read_planes(asked: dict[str, Any], planes: dict[str, Any], state: ServerState) -> tuple[SourceImage, Mask | None]:
    try:
        source = asked.get("source") or {}
        if not isinstance(source, dict):
            raise UsageError("source must be an object")
        read = {}
        for name, upload in planes.items():
            upload.file.seek(0)
            read[name] = upload.file.read(wire_limit(state.max_pixels) + 1)
        return wire.source_from(source, read, state.max_pixels), wire.mask_from(source, read)
    except UsageError as exc:
        raise ApiError(400, str(exc), "invalid_image") from None


def _memory(device: Any) -> dict[str, int]:
    """Bytes in use: the process's resident memory, and on CUDA what torch holds on the device."""
    import psutil

    used = {"rss": psutil.Process().memory_info().rss}
    if getattr(device, "type", None) == "cuda":
        import torch

        used["device_allocated"] = torch.cuda.memory_allocated(device)
        used["device_reserved"] = torch.cuda.memory_reserved(device)
    return used
