"""``compactedit models download|list|remove|info``: weights in the standard Hugging Face cache."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import command_group, console, emit_json, handle_errors, info
from .flags import Offline, Quiet, Revision, Verbose

app = command_group(
    "Download, list, inspect and remove models (kept in the Hugging Face cache: HF_HOME / HF_HUB_CACHE)."
)

HubModel = Annotated[str, typer.Argument(help="Alias (vibe, vibe-distilled) or hub id (owner/name).", metavar="MODEL")]
AnyModel = Annotated[
    str,
    typer.Argument(help="Alias (vibe, vibe-distilled), hub id (owner/name) or local folder.", metavar="MODEL"),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


@app.command()
@handle_errors
def download(
    model: Annotated[
        str, typer.Argument(help="Alias (vibe, vibe-distilled) or hub id (owner/name).", metavar="MODEL")
    ] = "vibe",
    revision: Revision = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if cached (repairs a cache).")] = False,
    offline: Offline = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Download a model into the Hugging Face cache (resumes an interrupted download) and verify it.

    With --offline (or HF_HUB_OFFLINE=1) nothing is downloaded: the cached copy is verified.
    """
    import os

    from ..loading.hub import download as fetch
    from ..loading.hub import is_offline, parse_model

    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    ref = parse_model(model, revision)
    offline = is_offline(offline)
    if ref.repo_id is not None:  # a local folder is refused by the download, with no line before its error
        action = "verifying the cached" if offline else "downloading"
        info(f"{action} {ref.repo_id}" + (f" at {revision}" if revision else ""))
    resolved = fetch(ref, force=force, offline=offline)
    info(f"verified {resolved.label()}")
    print(resolved.path)


@app.command("list")
@handle_errors
def list_models(json_output: Json = False, quiet: Quiet = False, verbose: Verbose = False) -> None:
    """List cached editing models with their size and revision."""
    from rich.table import Table

    from ..loading.hub import list_cached

    models = list_cached()
    if json_output:
        emit_json([m.to_dict() for m in models])
        return
    if not models:
        info("no editing models in the Hugging Face cache (download one with: compactedit models download vibe)")
        return
    table = Table("model", "revision", "refs", "size", "status", box=None)
    for m in models:
        table.add_row(
            m.repo_id, m.commit[:12], ",".join(m.refs) or "-", _size(m.size_bytes), "ok" if m.complete else "INCOMPLETE"
        )
    console.print(table)


@app.command()
@handle_errors
def remove(
    model: HubModel,
    revision: Revision = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Remove a model's cached files (all revisions, or one with --revision), after asking (unless -y)."""
    import sys

    from ..errors import ExitCode, UsageError
    from ..loading.hub import parse_model, removal

    plan = removal(parse_model(model, revision))
    what = f"{plan.ref.repo_id} ({len(plan.commits)} revision(s), {_size(plan.size_bytes)})"
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"removing {what} needs confirming: pass -y (stdin is not a terminal to ask on)")
        try:
            confirmed = typer.confirm(f"remove {what}?", default=False, err=True)
        except typer.Abort:  # end of input or Ctrl-C at the prompt: a no
            confirmed = False
        if not confirmed:
            info("nothing removed")
            raise typer.Exit(ExitCode.FAILED)
    freed = plan.execute()
    info(f"removed {model}, freed {_size(freed)}")


@app.command("info")
@handle_errors
def model_info(
    model: AnyModel,
    revision: Revision = None,
    json_output: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Components, config summary, parameter counts and dtypes of a cached model or local folder."""
    from rich.table import Table

    from ..loading.hub import describe, parse_model, resolve

    resolved = resolve(parse_model(model, revision), download=False)
    summary = {"model": resolved.label(), **describe(resolved.path)}
    if json_output:
        emit_json(summary)
        return
    console.print(f"{summary['model']}  ({summary['path']})", markup=False)
    table = Table("component", "class", "parameters", "dtype", "size", box=None)
    for name, entry in summary["components"].items():
        params = entry.get("parameters")
        table.add_row(
            name,
            entry["class"].rsplit(".", 1)[-1],
            _count(params) if params is not None else "-",
            ",".join(entry.get("dtypes", [])) or "-",
            _size(entry["size_bytes"]) if "size_bytes" in entry else "-",
        )
    console.print(table)
    for name, entry in summary["components"].items():
        if entry.get("config"):
            console.print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in entry["config"].items()), markup=False)
