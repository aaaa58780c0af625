"""``compactedit serve``: load the model once and answer OpenAI-style image edit requests; ``serve status`` and
``serve stop`` talk to a running server."""

from __future__ import annotations

from typing import Annotated

import typer

from . import flags as opt
from .common import Group, emit_json, handle_errors, info, warn

EXAMPLES = """
Examples:

  compactedit serve

  compactedit serve --port 8000

  compactedit serve --host 0.0.0.0 --port 8000 --api-key "$KEY"

  compactedit serve status

  compactedit serve stop
"""


def _socket(help: str) -> object:
    return Annotated[str | None, typer.Option("--socket", metavar="PATH", help=help, show_default=False)]


def _host(help: str) -> object:
    return Annotated[str | None, typer.Option("--host", metavar="HOST", help=help, show_default=False)]


def _port(help: str) -> object:
    return Annotated[int | None, typer.Option("--port", metavar="PORT", help=help, show_default=False)]


def _api_key(help: str) -> object:
    option = typer.Option(
        "--api-key", metavar="KEY", envvar="COMPACTEDIT_API_KEY", help=help, show_default=False, show_envvar=False
    )
    return Annotated[str | None, option]


_RUNTIME = "serve.sock in the user's runtime folder"
ServeSocket = _socket(f"Listen on this Unix socket (mode 0600). [default: {_RUNTIME}]")
ServeHost = _host("Listen on TCP at HOST instead of a Unix socket. [default with --port: 127.0.0.1]")
ServePort = _port("Listen on TCP port PORT. [default with --host: 8000]")
ServeApiKey = _api_key(
    "Require Authorization: Bearer KEY; required for a host other than loopback. [env: COMPACTEDIT_API_KEY]"
)
Socket = _socket(f"The server's Unix socket. [default: {_RUNTIME}]")
Host = _host("The server's TCP host (with --port). [default: 127.0.0.1]")
Port = _port("The server's TCP port. [default with --host: 8000]")
ApiKey = _api_key("The server's API key. [env: COMPACTEDIT_API_KEY]")

app = typer.Typer(
    cls=Group,
    help="Serve edits over HTTP from one loaded model (OpenAI-compatible /v1/images/edits).",
    epilog=EXAMPLES,
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
)


@app.callback()
@handle_errors
def serve(
    ctx: typer.Context,
    model: opt.Model = None,
    revision: opt.Revision = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    offload: opt.Offload = None,
    compile_: opt.Compile = None,
    kernels: opt.Kernels = None,
    quantize: opt.Quantize = None,
    lora: opt.Lora = None,
    socket: ServeSocket = None,
    host: ServeHost = None,
    port: ServePort = None,
    api_key: ServeApiKey = None,
    idle_timeout: Annotated[
        float,
        typer.Option("--idle-timeout", metavar="SECONDS", help="Stop after this long without an edit (0: never)."),
    ] = 0,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", metavar="N", help="Edits that may wait; one more gets HTTP 429 with Retry-After."),
    ] = 16,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            metavar="N",
            help="Run up to N waiting edits of the same size and parameters as one batch (outputs may differ "
            "from unbatched ones by a level).",
        ),
    ] = 1,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="Start in the background and return once it is ready (log: --log-file)."),
    ] = False,
    log_file: Annotated[
        str | None,
        typer.Option(
            "--log-file",
            metavar="PATH",
            help="With --detach, where the server's log goes. [default: SOCKET.log beside the socket; for TCP, "
            "serve.log in the runtime folder]",
            show_default=False,
        ),
    ] = None,
    offline: opt.Offline = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Load the model once and serve edits in the foreground until SIGTERM, Ctrl-C or 'compactedit serve stop'.

    Requests name no file on this machine: images travel in the request and the response.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .. import options
    from ..files.imaging import max_bytes_limit
    from ..server import address as where

    max_bytes_limit()  # a bad COMPACTEDIT_MAX_BYTES or COMPACTEDIT_MAX_PIXELS fails before the model loads
    address = where.resolve(socket, host, port)
    where.check_exposure(address, api_key)
    where.check_free(address)
    queue, batch = options.max_queue(max_queue), options.max_batch(max_batch)
    idle = options.idle_timeout(idle_timeout)
    model_options = opt.model_options(
        model, revision, device, dtype, offline, offload, compile_, False, lora, kernels, quantize, long_run=True
    )
    if detach:
        from ..server.detach import start_detached

        pid, log = start_detached(address, _child_arguments(ctx), log_file, api_key)
        info(f"serving on {address.label()} (pid {pid}, log {log})")
        return

    from ..editor import Editor
    from ..server.run import serve as run_server

    editor = Editor(model_options, status=info)
    for note in editor.notes:
        warn(note)
    run_server(
        editor,
        address,
        api_key=api_key,
        max_queue=queue,
        max_batch=batch,
        idle_timeout=idle,
        verbose=verbose,
        quiet=quiet,
    )


def _child_arguments(ctx: typer.Context) -> list[str]:
    """This command's own options, as the detached server is started with them (all but --detach, --log-file
    and the key, which travels in the environment)."""
    skipped = {"detach", "log_file", "api_key"}
    arguments = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in skipped or value in (None, False, (), []) or value == param.default:
            continue
        flag = max(param.opts, key=len)
        if value is True:
            arguments.append(flag)
        else:
            for each in value if isinstance(value, (list, tuple)) else [value]:
                arguments += [flag, str(each)]
    return arguments


@app.command()
@handle_errors
def status(
    socket: Socket = None,
    host: Host = None,
    port: Port = None,
    api_key: ApiKey = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the status as one JSON object.")] = False,
) -> None:
    """Show the running server's model, device, uptime, queue and memory."""
    from ..server import address as where
    from ..server.client import call

    address = where.resolve(socket, host, port)
    answer = call(address, "GET", "/status", api_key)
    if json_output:
        emit_json(answer)
        return
    queue, memory = answer["queue"], answer["memory"]
    print(f"address:  {address.label()}")
    print(f"model:    {answer['model']}" + (f" @ {answer['revision']}" if answer.get("revision") else ""))
    print(f"device:   {answer['device']} ({answer['dtype']})")
    print(f"uptime:   {answer['uptime_seconds']:.0f}s, {answer['edits_done']} edits, pid {answer['pid']}")
    print(f"queue:    {queue['running']} running, {queue['waiting']} waiting (at most {queue['max']})")
    print(f"version:  compactedit {answer['version']}")
    print("memory:   " + ", ".join(f"{key} {value / 2**20:,.0f} MiB" for key, value in memory.items()))


@app.command()
@handle_errors
def stop(
    socket: Socket = None,
    host: Host = None,
    port: Port = None,
    api_key: ApiKey = None,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="SECONDS", help="How long to wait for queued edits to finish.")
    ] = 600,
) -> None:
    """Stop the running server once its queued edits are done."""
    from ..server import address as where
    from ..server.client import ServerError, call, wait_stopped

    address = where.resolve(socket, host, port)
    # A server on this machine's socket is waited for by its process: it stops answering before its drain is done.
    pid = call(address, "GET", "/status", api_key).get("pid") if address.is_unix else None
    call(address, "POST", "/shutdown", api_key)
    if not wait_stopped(address, timeout, pid):
        raise ServerError(f"the server on {address.label()} is still finishing edits after {timeout:g}s")
    info(f"stopped the server on {address.label()}")
