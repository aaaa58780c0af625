"""The ``compactedit`` command line: thin Typer commands over the engine (heavy imports happen inside them)."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import config, models, serve
from .batch import EXAMPLES as BATCH_EXAMPLES
from .batch import BatchCommand, batch
from .bench import EXAMPLES as BENCH_EXAMPLES
from .bench import bench
from .common import Group
from .edit import EXAMPLES as EDIT_EXAMPLES
from .edit import edit
from .selftest import selftest
from .train import EXAMPLES as TRAIN_EXAMPLES
from .train import train

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

app = typer.Typer(
    name="compactedit",
    cls=Group,
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


app.command(epilog=EDIT_EXAMPLES)(edit)
app.command(cls=BatchCommand, epilog=BATCH_EXAMPLES)(batch)
app.add_typer(models.app, name="models")
app.command()(selftest)
app.command(epilog=BENCH_EXAMPLES)(bench)
app.add_typer(config.app, name="config")
app.add_typer(serve.app, name="serve")
app.command(epilog=TRAIN_EXAMPLES)(train)


def main() -> None:
    app(prog_name="compactedit")  # also under ``python -m compactedit_cli`` (usage text, completion variable)
