"""What every command shares: the stderr console, error reporting with exit codes, signals, progress, and the
command group that turns Click's usage errors into compactedit's one-line errors."""

from __future__ import annotations

import functools
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from difflib import get_close_matches
from typing import IO, TYPE_CHECKING, Any, ClassVar, TypeVar

import typer
from rich.console import Console

# Typer 0.29 vendors Click: these are the classes its parser raises (pinned in pyproject.toml).
from typer._click.exceptions import (
    BadParameter,
    MissingParameter,
    NoArgsIsHelpError,
    NoSuchOption,
)
from typer._click.exceptions import UsageError as ClickUsageError
from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
from typer.core import TyperCommand, TyperGroup, _TyperParameter

from ..errors import CompactEditError, ExitCode, OutOfMemoryError, internal_error, is_out_of_memory

if TYPE_CHECKING:
    from rich.progress import Progress  # imported by make_progress, by the commands that show one

F = TypeVar("F", bound=Callable[..., Any])

# stdout carries only results (paths, JSON, image bytes); everything for humans goes to stderr.
console = Console(stderr=True, highlight=False)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so cleanup runs exactly as for Ctrl-C."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Terminated()


class Verbosity:
    """-q / -v / --json of the running command."""

    quiet = False
    verbose = False
    json = False


# Messages are never wrapped: one message, one line, whatever the terminal width (scripts grep stderr).
def info(message: str) -> None:
    if not Verbosity.quiet:
        console.print(message, markup=False, soft_wrap=True)


def warn(message: str) -> None:
    if not Verbosity.quiet:
        console.print(f"warning: {message}", markup=False, style="yellow", soft_wrap=True)


def fail(message: str) -> None:
    console.print(f"error: {message}", markup=False, style="red", soft_wrap=True)


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """A Python warning raised while a command runs (ours, such as a failed CUDA graph capture, or a library's)
    prints as one ``warning:`` line, like the command's own."""
    lines = str(message).strip().splitlines()
    warn(lines[0] if lines else category.__name__)


def handle_errors(fn: F) -> F:
    """Turn every failure into one line on stderr and a documented exit code (``-v`` adds the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        Verbosity.quiet = bool(kwargs.get("quiet", False))
        Verbosity.verbose = bool(kwargs.get("verbose", False))
        Verbosity.json = bool(kwargs.get("json_output", False))
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CompactEditError as exc:
            _report(exc, str(exc), exc.exit_code, type(exc).__name__)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            _report(exc, "interrupted", ExitCode.INTERRUPTED, "Interrupted")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except Terminated as exc:
            _report(exc, "terminated", ExitCode.TERMINATED, "Terminated")
            raise typer.Exit(ExitCode.TERMINATED) from None
        except Exception as exc:
            if is_out_of_memory(exc):
                _report(exc, str(OutOfMemoryError()), ExitCode.FAILED, OutOfMemoryError.__name__)
            else:
                _report(exc, internal_error(exc), ExitCode.FAILED, "InternalError")
                if not Verbosity.verbose:
                    console.print("(run with -v for the traceback)", markup=False)
            raise typer.Exit(ExitCode.FAILED) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def _report(exc: BaseException, message: str, code: int, kind: str) -> None:
    if Verbosity.verbose and not isinstance(exc, (KeyboardInterrupt, Terminated)):
        traceback.print_exception(exc, file=sys.stderr)
    fail(message)
    if Verbosity.json:  # with what the command had done before it failed, where it says (a batch's summary)
        emit_json({**getattr(exc, "json_summary", {}), **error_object(message, code, kind)})


def error_object(message: str, code: int, kind: str) -> dict[str, Any]:
    """What ``--json`` prints on stdout for a failure: the ``error:`` line's text, the exit code, and the kind
    (the error class: ``UsageError``, ``InputImageError``, ``CheckpointError``, ``OutputError``, …)."""
    return {"error": {"message": message, "code": code, "type": kind}}


def progress_enabled() -> bool:
    """Rich progress only for a person watching: not with -q, not when stderr is a pipe or a file."""
    return not Verbosity.quiet and console.is_terminal


def make_progress() -> Progress:
    """The progress display of a command; one nobody watches is a disabled one with Rich's default columns, not
    ours (whose spinner loads Rich's emoji table)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not progress_enabled():
        return Progress(console=console, transient=True, disable=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


class EditProgress:
    """Drives one Rich display through load, encode, denoise (per step) and decode; without one (nobody watches),
    it does nothing."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.task: Any = None

    def status(self, message: str) -> None:
        self._switch(message, total=None)

    def stage(self, name: str) -> None:
        self._switch({"encode": "encoding", "denoise": "denoising", "decode": "decoding"}.get(name, name))

    def step(self, state: Any) -> None:
        if self.progress is None:
            return
        if self.task is None or self.progress.tasks[-1].description != "denoising":
            self._switch("denoising", total=state.total)
        self.progress.update(self.task, total=state.total, completed=state.index + 1)

    def _switch(self, description: str, total: float | None = None) -> None:
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)


@contextmanager
def edit_progress() -> Iterator[EditProgress]:
    if not progress_enabled():  # nothing to draw, so not even Rich's progress module to import
        yield EditProgress(None)
        return
    with make_progress() as progress:
        yield EditProgress(progress)


def emit_json(data: Any) -> None:
    """One JSON document on stdout (for scripts)."""
    import json

    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# ---- Click's usage errors as one line -----------------------------------------------------------------------


class OneLineUsageError(ClickUsageError):
    """A usage error Click found (bad number, unknown option, missing argument…), shown as compactedit shows its
    own: one ``error:`` line on stderr, and with ``--json`` the error object on stdout. Exit 2."""

    def __init__(self, message: str, json_requested: bool) -> None:
        super().__init__(message)
        self.json_requested = json_requested

    def show(self, file: IO[Any] | None = None) -> None:
        fail(self.message)
        if self.json_requested:
            emit_json(error_object(self.message, self.exit_code, "UsageError"))


class _UnknownCommandError(ClickUsageError):
    """An unknown command name; its message is complete (it lists the close matches or the commands)."""


def _option_name(param: Any) -> str:
    """``--num-images`` for an option (its long name), ``IMAGE`` for an argument (its metavar)."""
    if param.param_type_name == "argument":
        return (param.metavar or param.name.upper()).strip("[].")
    return max(param.opts, key=lambda opt: (opt.startswith("--"), len(opt)))


def _sentence(text: str) -> str:
    """Click's message as the tail of an ``error:`` line: lower-case start, no full stop."""
    text = text.strip().rstrip(".")
    return text[:1].lower() + text[1:]


def _bad_value(exc: BadParameter) -> str:
    """A bad flag value in options.py's words (``--steps must be an integer (got 'x')``), not pydantic's."""
    name = _option_name(exc.param)
    errors = exc.__cause__.errors() if hasattr(exc.__cause__, "errors") else []
    if not errors:
        return f"{name}: {_sentence(exc.message)}"
    kind, got = errors[0]["type"], errors[0].get("input")
    if kind.startswith("int_"):
        return f"{name} must be an integer (got {got!r})"
    if kind.startswith(("float_", "finite_")):
        return f"{name} must be a number (got {got!r})"
    low, high = getattr(exc.param, "min", None), getattr(exc.param, "max", None)
    if kind in ("greater_than_equal", "less_than_equal") and low is not None and high is not None:
        return f"{name} must be between {low} and {high} (got {got})"
    if kind == "greater_than_equal" and low is not None:
        return f"{name} must be at least {low} (got {got})"
    if kind == "less_than_equal" and high is not None:
        return f"{name} must be at most {high} (got {got})"
    return f"{name}: {_sentence(exc.message)}"


def usage_message(exc: ClickUsageError) -> str:
    """One line for a usage error Click raised, with a close match or where to look."""
    see = f"; see {exc.ctx.command_path} --help" if exc.ctx is not None else ""
    if isinstance(exc, NoSuchOption):
        close = get_close_matches(exc.option_name, exc.possibilities or (), n=2, cutoff=0)
        return f"unknown option {exc.option_name}" + (f" (did you mean {' or '.join(close)}?)" if close else see)
    if isinstance(exc, MissingParameter) and exc.param is not None:
        return f"missing {exc.param.param_type_name} {_option_name(exc.param)}{see}"
    if isinstance(exc, BadParameter) and exc.param is not None:
        return _bad_value(exc)
    if isinstance(exc, _UnknownCommandError):
        return exc.message
    return _sentence(exc.format_message()) + see


class _DeferredCoercion:
    """Every parameter a command parses with (its own, and the ``--help`` and completion options Typer and Click
    add later) has its coercion :class:`_Deferred`."""

    def get_params(self, ctx: Any) -> list[Any]:
        return [_defer(param) for param in super().get_params(ctx)]  # type: ignore[misc]


class Command(_DeferredCoercion, TyperCommand):
    """compactedit's commands (see :class:`_DeferredCoercion`)."""


class Group(_DeferredCoercion, TyperGroup):
    """compactedit's command groups: an unknown command gets close matches; at the root, every usage error Click
    raises, at any depth, becomes one line (:func:`usage_message`) with exit 2, for the installed entry point and
    for ``CliRunner().invoke(app, …)`` alike (both go through :meth:`main`).

    A subclass may name commands in :attr:`lazy`, each with the function that builds it: a command is imported
    and built only when it is looked up, so ``compactedit edit`` pays for ``edit`` alone, not for every command's
    modules and parameters. ``--help`` and completion look every command up, so they show all of them, in the
    order of :attr:`lazy`."""

    lazy: ClassVar[dict[str, Callable[[], Any]]] = {}
    json_errors = False

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.commands, *(name for name in self.lazy if name not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.commands[cmd_name] = self.lazy[cmd_name]()
        return self.commands.get(cmd_name)

    def main(self, args: Any = None, *rest: Any, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        self.json_errors = "--json" in (argv[: argv.index("--")] if "--" in argv else argv)
        return super().main(args, *rest, **extra)

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        with self._one_line(root=parent is None):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with self._one_line(root=ctx.parent is None):
            return super().invoke(ctx)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and not ctx.resilient_parsing and self.get_command(ctx, name) is None:
            names = self.list_commands(ctx)
            close = get_close_matches(name, names, n=2)
            hint = f"did you mean {' or '.join(close)}?" if close else f"one of: {', '.join(names)}"
            raise _UnknownCommandError(f"unknown command {name!r} ({hint})", ctx)
        return super().resolve_command(ctx, args)

    @contextmanager
    def _one_line(self, root: bool) -> Iterator[None]:
        try:
            yield
        except (NoArgsIsHelpError, OneLineUsageError):  # the first prints the help, as asked
            raise
        except ClickUsageError as exc:
            if not root:
                raise
            raise OneLineUsageError(usage_message(exc), self.json_errors) from exc


@dataclass(frozen=True)
class _Deferred(RuntimeParam):
    """Typer's coercion of one parameter, built when a value first needs it. Typer builds a pydantic TypeAdapter
    for every parameter of the command that runs, even for one left at None (most of ``edit``'s), and imports
    pydantic to do it. A value that is None (never coerced), a plain string for a ``str`` parameter, or a
    decimal integer within a plain ``int`` parameter's bounds, comes out of that adapter unchanged or as
    ``int(value)``: those skip it, so a call that gives only such values never imports pydantic. Anything else
    goes to Typer's own coercion, with its error messages."""

    descriptor: TypeDescriptor

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        info = self.parameter_info
        if info.parser is None and self.annotation is str and type(value) is str:
            return value
        if info.parser is None and self.annotation is int and not info.clamp:
            number = value if type(value) is int else _decimal(value)
            low, high = info.min, info.max
            if number is not None and (low is None or number >= low) and (high is None or number <= high):
                return number
        param._runtime_param = built = build_runtime_param(self.descriptor)
        return built._coerce_value(value, param=param, ctx=ctx)


def _decimal(value: Any) -> int | None:
    """``value`` as an int when it is a short string of ASCII digits (which every int parser reads alike)."""
    if type(value) is str and 0 < len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


def _defer(param: Any) -> Any:
    if isinstance(param, _TyperParameter) and param._runtime_param is None:
        descriptor = param.type_descriptor
        param._runtime_param = _Deferred(descriptor.parameter_info, descriptor.annotation, descriptor)
    return param


def command_group(help: str, **settings: Any) -> typer.Typer:
    """A Typer app whose errors are one line (:class:`Group`) and whose help is plain text."""
    return typer.Typer(cls=Group, help=help, no_args_is_help=True, rich_markup_mode=None, **settings)
