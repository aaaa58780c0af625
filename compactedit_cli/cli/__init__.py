"""The ``compactedit`` command line: thin Typer commands over the engine (heavy imports happen inside them)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from importlib import import_module
from typing import Annotated, Any, ClassVar

import typer

from .. import __version__
from .common import Command, Group

EPILOG = """Run 'compactedit COMMAND --help' for a command's options and examples. Weights live in the Hugging Face
cache (HF_HOME, HF_HUB_CACHE); 'compactedit config path' shows where defaults are kept.

\b
Exit codes:
  0    success
  1    an edit failed at run time, or some batch items failed
  2    usage: bad or conflicting options, empty instruction, bad manifest or config value
  3    the input image cannot be used
  4    the model is missing, incomplete, corrupt or not an editing model
  5    the output cannot be written
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""


def _command(name: str, cls: str | None = None) -> Callable[[], Any]:
    """The builder of command ``name``: the function of that name in the module of that name, with the module's
    EXAMPLES as its epilog, built as ``app.command(cls=Command)`` would have built it."""

    def build() -> Any:
        module = import_module(f"{__name__}.{name}")
        holder = typer.Typer()
        settings = {"epilog": getattr(module, "EXAMPLES", None), "cls": getattr(module, cls) if cls else Command}
        holder.command(**settings)(getattr(module, name))
        return typer.main.get_command_from_info(
            holder.registered_commands[0],
            pretty_exceptions_short=app.pretty_exceptions_short,
            rich_markup_mode=app.rich_markup_mode,
        )

    return build


def _group(name: str) -> Callable[[], Any]:
    """The builder of the command group ``name`` (the Typer ``app`` of the module of that name), built as
    ``app.add_typer(..., name=name)`` would have built it."""

    def build() -> Any:
        holder = typer.Typer()
        holder.add_typer(import_module(f"{__name__}.{name}").app, name=name)
        return typer.main.get_group_from_info(
            holder.registered_groups[0],
            pretty_exceptions_short=app.pretty_exceptions_short,
            rich_markup_mode=app.rich_markup_mode,
            suggest_commands=app.suggest_commands,
        )

    return build


class Root(Group):
    """``compactedit``: every command is built when it is looked up (see :class:`~.common.Group`)."""

    lazy: ClassVar[dict[str, Callable[[], Any]]] = {
        "edit": _command("edit"),
        "batch": _command("batch", cls="BatchCommand"),
        "selftest": _command("selftest"),
        "bench": _command("bench"),
        "train": _command("train"),
        "models": _group("models"),
        "config": _group("config"),
        "serve": _group("serve"),
    }


app = typer.Typer(
    name="compactedit",
    cls=Root,
    help="Instruction-based image editing on the VIBE weights (Qwen3-VL-2B + Sana1.5-1.6B).",
    epilog=EPILOG,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"compactedit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Instruction-based image editing on the VIBE weights."""


def main() -> None:
    """The ``compactedit`` process: one command, then its exit (SystemExit, as Typer's standalone mode ends)."""
    try:
        app(prog_name="compactedit")  # also under ``python -m compactedit_cli`` (usage text, completion variable)
    except SystemExit:
        # The process is ending, the command's files written and closed and its errors reported: the interpreter's
        # collections at exit need not walk every object the command made (for a short command, a large part of
        # its time). Frozen objects are still freed by reference counting as the modules are torn down. Not after
        # the engine ran: native extensions it loads (Triton's, through nanobind) check at exit that every object
        # of theirs was collected, and print a warning on stderr when one was not.
        if "torch" not in sys.modules:
            gc.freeze()
        raise
