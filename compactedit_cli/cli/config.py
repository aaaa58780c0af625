"""``compactedit config``: defaults kept in compactedit's own config file (never weights)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import emit_json, handle_errors

app = typer.Typer(
    help="Show or change default settings (model, device, dtype, offload, output format).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

Key = Annotated[str, typer.Argument(help="model, device, dtype, offload or output_format.", metavar="KEY")]


@app.command()
@handle_errors
def show() -> None:
    """Print the saved defaults as JSON."""
    from .. import config_file as settings

    emit_json({"path": str(settings.config_path()), "values": settings.load()})


@app.command("set")
@handle_errors
def set_(key: Key, value: Annotated[str, typer.Argument(metavar="VALUE")]) -> None:
    """Save a default."""
    from .. import config_file as settings

    print(settings.set_value(key, value))


@app.command()
@handle_errors
def unset(key: Key) -> None:
    """Forget a default."""
    from .. import config_file as settings

    print(settings.unset_value(key))


@app.command()
def path() -> None:
    """Print where the config file lives."""
    from .. import config_file as settings

    print(settings.config_path())
