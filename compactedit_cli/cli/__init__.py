"""The ``compactedit`` command line: thin Typer commands over the engine (heavy imports happen inside them)."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import config, models
from .batch import EXAMPLES as BATCH_EXAMPLES
from .batch import batch
from .bench import EXAMPLES as BENCH_EXAMPLES
from .bench import bench
from .edit import EXAMPLES as EDIT_EXAMPLES
from .edit import edit
from .selftest import selftest

app = typer.Typer(
    name="compactedit",
    help="Instruction-based image editing on the VIBE weights (Qwen3-VL-2B + Sana1.5-1.6B).",
    epilog="Docs and exit codes: see README.md. Weights live in the Hugging Face cache (HF_HOME).",
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


app.command(epilog=EDIT_EXAMPLES)(edit)
app.command(epilog=BATCH_EXAMPLES)(batch)
app.add_typer(models.app, name="models")
app.command()(selftest)
app.command(epilog=BENCH_EXAMPLES)(bench)
app.add_typer(config.app, name="config")


def main() -> None:
    app(prog_name="compactedit")  # also under ``python -m compactedit_cli`` (usage text, completion variable)
