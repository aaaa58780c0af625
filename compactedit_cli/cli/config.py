"""``compactedit config``: defaults kept in compactedit's own config file (never weights)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config_file import KEYS
from .common import command_group, emit_json, handle_errors, info

app = command_group(f"Show or change default settings ({', '.join(KEYS)}); flags always win.")

Key = Annotated[str, typer.Argument(help=f"One of {', '.join(KEYS)}.", metavar="KEY")]
Value = Annotated[
    str,
    typer.Argument(
        help="; ".join(f"{key}: {what}" for key, what in KEYS.items()) + ". Checked as the flag is.",
        metavar="VALUE",
    ),
]


@app.command()
@handle_errors
def show() -> None:
    """Print the config file's path and saved defaults as JSON."""
    from .. import config_file

    emit_json({"path": str(config_file.config_path()), "values": config_file.load()})


@app.command()
@handle_errors
def get(key: Key) -> None:
    """Print the value in effect for KEY: the saved one, else the built-in default (said on stderr)."""
    from .. import config_file

    value, saved = config_file.get(key)
    print(value)
    if not saved:
        info(f"({key} is not set: the built-in default)")


@app.command("set")
@handle_errors
def set_(key: Key, value: Value) -> None:
    """Save a default (checked now, as the flag would be); prints the config file's path."""
    from .. import config_file

    print(config_file.set_value(key, value))


@app.command()
@handle_errors
def unset(key: Key) -> None:
    """Forget a default; prints the config file's path."""
    from .. import config_file

    print(config_file.unset_value(key))


@app.command()
def path() -> None:
    """Print where the config file lives (it may not exist yet)."""
    from .. import config_file

    print(config_file.config_path())
