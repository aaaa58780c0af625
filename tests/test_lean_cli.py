"""A command pays for itself only: commands are built when looked up, and Typer's pydantic coercion runs only for
values that need it, with the same results and errors as Typer's own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from conftest import make_photo
from typer._click.exceptions import BadParameter
from typer._coercion import build_runtime_param

from compactedit_cli.cli import app

OTHER_COMMANDS = [f"compactedit_cli.cli.{name}" for name in ("batch", "bench", "train", "selftest", "models", "serve")]
PROBE = (
    "import sys, atexit\n"
    f"unwanted = {(*OTHER_COMMANDS, 'pydantic', 'numpy', 'pillow_heif', 'torch')!r}\n"
    "atexit.register(lambda: print(sorted(m for m in unwanted if m in sys.modules)))\n"
    "sys.argv = ['compactedit', *sys.argv[1:]]\n"
    "from compactedit_cli.cli import main\n"
    "main()\n"
)


@pytest.mark.parametrize("case", ["missing input", "existing output"])
def test_a_failing_edit_loads_only_its_own_command(tmp_path, case):
    photo = make_photo(tmp_path / "in.png")
    existing = make_photo(tmp_path / "out.png")
    missing = case == "missing input"
    target = [tmp_path / "nope.png", "x", "-o", tmp_path / "o.png"] if missing else [photo, "x", "-o", existing]
    run = subprocess.run(
        [sys.executable, "-c", PROBE, "edit", *map(str, target), "--steps", "4", "-n", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == (3 if missing else 5), run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_every_command_completes_by_name():
    env = {**os.environ, "COMP_WORDS": "compactedit ", "COMP_CWORD": "1", "_COMPACTEDIT_COMPLETE": "complete_bash"}
    done = subprocess.run([sys.executable, "-m", "compactedit_cli"], env=env, capture_output=True, text=True)
    names = ["edit", "batch", "selftest", "bench", "train", "models", "config", "serve"]
    assert [word for word in done.stdout.split() if not word.startswith("-")] == names
    env.update(COMP_WORDS="compactedit serve st", COMP_CWORD="2")
    done = subprocess.run([sys.executable, "-m", "compactedit_cli"], env=env, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == ["status", "stop"]


def _edit_params():
    group = typer.main.get_command(app)
    ctx = group.make_context("compactedit", ["edit", "--help"], resilient_parsing=True)
    command = group.get_command(ctx, "edit")
    sub = command.make_context("edit", [], parent=ctx, resilient_parsing=True)
    return sub, [p for p in command.get_params(sub) if p.type_descriptor.annotation in (str, int)]


def _outcome(runtime, param, ctx, value):
    try:
        result = runtime.coerce(value, param=param, ctx=ctx)
    except BadParameter as exc:
        return ("error", exc.message)
    return (type(result), result)


VALUES = ["5", "05", "0", "+5", " 5", "-1", "1_000", "x", "", "\u0663", "9" * 40, "a b", 5, 0, True, None]


def test_deferred_coercion_is_typers_own():
    """Each value goes to a freshly built command, whose coercion has not yet been replaced by Typer's."""
    for value in VALUES:
        ctx, params = _edit_params()
        assert {p.name for p in params} >= {"image", "instruction", "output", "steps", "num_images", "seed"}
        for param in params:
            deferred = param._runtime_param
            ours = _outcome(deferred, param, ctx, value)
            assert ours == _outcome(build_runtime_param(param.type_descriptor), param, ctx, value), (param.name, value)
            if value in ("5", None):  # plain: no adapter was built for it
                assert param._runtime_param is deferred, param.name
