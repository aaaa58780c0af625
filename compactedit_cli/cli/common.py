"""What every command shares: the stderr console, error reporting with exit codes, signals, progress."""

from __future__ import annotations

import functools
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import CompactEditError, ExitCode, OutOfMemoryError, internal_error, is_out_of_memory

F = TypeVar("F", bound=Callable[..., Any])

# stdout carries only results (paths, JSON, image bytes); everything for humans goes to stderr.
console = Console(stderr=True, highlight=False)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so cleanup runs exactly as for Ctrl-C."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Terminated()


class Verbosity:
    """-q / -v of the running command."""

    quiet = False
    verbose = False


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
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CompactEditError as exc:
            _report(exc, str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            fail("interrupted")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except Terminated:
            fail("terminated")
            raise typer.Exit(ExitCode.TERMINATED) from None
        except Exception as exc:
            if is_out_of_memory(exc):
                _report(exc, str(OutOfMemoryError()))
            else:
                _report(exc, internal_error(exc))
                if not Verbosity.verbose:
                    console.print("(run with -v for the traceback)", markup=False)
            raise typer.Exit(ExitCode.FAILED) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def _report(exc: BaseException, message: str) -> None:
    if Verbosity.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    fail(message)


def progress_enabled() -> bool:
    """Rich progress only for a person watching: not with -q, not when stderr is a pipe or a file."""
    return not Verbosity.quiet and console.is_terminal


def make_progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not progress_enabled(),
    )


class EditProgress:
    """Drives one Rich display through load, encode, denoise (per step) and decode."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None

    def status(self, message: str) -> None:
        self._switch(message, total=None)

    def stage(self, name: str) -> None:
        self._switch({"encode": "encoding", "denoise": "denoising", "decode": "decoding"}.get(name, name))

    def step(self, state: Any) -> None:
        if self.task is None or self.progress.tasks[-1].description != "denoising":
            self._switch("denoising", total=state.total)
        self.progress.update(self.task, total=state.total, completed=state.index + 1)

    def _switch(self, description: str, total: float | None = None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)


@contextmanager
def edit_progress() -> Iterator[EditProgress]:
    with make_progress() as progress:
        yield EditProgress(progress)


def emit_json(data: Any) -> None:
    """One JSON document on stdout (for scripts)."""
    import json

    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()
