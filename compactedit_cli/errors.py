"""Errors that reach the user as one line and a documented exit code.

Every failure the user can cause or fix (a bad file, a bad flag, a missing model, a full disk) is raised as a
subclass of :class:`CompactEditError`. The CLI prints ``error: <message>`` and exits with the class's code; only
``-v`` adds a traceback. Anything else is a bug and is reported as such.
"""

from __future__ import annotations


class ExitCode:
    """The process exit codes, documented in README's "Errors and exit codes"."""

    OK = 0
    FAILED = 1  # a runtime failure, or a batch in which some items failed
    USAGE = 2  # bad flags, bad instruction, bad manifest
    INPUT = 3  # the input image cannot be used
    MODEL = 4  # the model is missing, incomplete, corrupt or not an editing model
    OUTPUT = 5  # the output cannot be written
    INTERRUPTED = 130  # SIGINT (128 + 2)
    TERMINATED = 143  # SIGTERM (128 + 15)


class CompactEditError(Exception):
    """Base class: a message meant for the user, and the exit code that goes with it."""

    exit_code = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(CompactEditError):
    """Bad flags, conflicting options, an empty instruction, a malformed manifest line."""

    exit_code = ExitCode.USAGE


class InputImageError(CompactEditError):
    """The input image is missing, unreadable, truncated, not an image, or too large."""

    exit_code = ExitCode.INPUT


class CheckpointError(CompactEditError):
    """The checkpoint folder is missing files, has wrong tensors, or is not a VIBE editing model."""

    exit_code = ExitCode.MODEL


class OutputError(CompactEditError):
    """The output cannot be written: bad path, exists, no permission, disk full."""

    exit_code = ExitCode.OUTPUT


class DiskFullError(OutputError):
    """The disk (or quota) filled up while writing; a batch stops, since every later item would fail the same way."""


class OutOfMemoryError(CompactEditError):
    """The device ran out of memory for this item; the hint says how to fit it."""

    exit_code = ExitCode.FAILED

    def __init__(self) -> None:
        super().__init__(
            "out of memory",
            hint="try --offload model, a smaller --batch-size or fewer --num-images, "
            "or a smaller input (it then runs in a smaller resolution bin)",
        )


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or another backend's "out of memory" RuntimeError (MPS)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def internal_error(exc: BaseException) -> str:
    """One line naming an exception nobody anticipated (a bug, or a library failing)."""
    return f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
