"""``--help`` of every command, kept stable by snapshots; and a CLI that starts fast.

Regenerate the snapshots after an intended change with ``UPDATE_SNAPSHOTS=1 python -m pytest tests/test_help.py``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SNAPSHOTS = Path(__file__).parent / "snapshots"
COMMANDS = [
    [],
    ["edit"],
    ["batch"],
    ["models"],
    ["models", "download"],
    ["models", "list"],
    ["models", "info"],
    ["models", "remove"],
    ["selftest"],
    ["bench"],
    ["config"],
    ["config", "set"],
    ["config", "get"],
    ["serve"],
    ["serve", "status"],
    ["serve", "stop"],
    ["train"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c) or "root")
def test_help_snapshot(cli, command):
    result = cli(*command, "--help", env={"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"})
    assert result.exit_code == 0
    path = SNAPSHOTS / f"help-{'-'.join(command) or 'root'}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.write_text(result.stdout)
    assert result.stdout == path.read_text(), f"--help changed; if intended, rerun with UPDATE_SNAPSHOTS=1 ({path})"


def test_short_help_alias(cli):
    assert cli("edit", "-h").stdout == cli("edit", "--help").stdout


def test_help_does_not_import_torch():
    heavy = "('torch', 'diffusers', 'transformers')"
    code = f"import sys, compactedit_cli.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_version_and_help_in_a_real_process():
    done = subprocess.run([sys.executable, "-m", "compactedit_cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("compactedit ")
    done = subprocess.run([sys.executable, "-m", "compactedit_cli"], capture_output=True, text=True)
    assert "edit" in done.stdout + done.stderr  # no arguments: help


def test_completion_scripts_are_up_to_date():
    script = Path(__file__).resolve().parents[1] / "scripts" / "generate_completions.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_install_completion(tmp_path):
    """Typer finds the shell among the process's ancestors (shellingham), so the command runs under a real bash."""
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = f"{shlex.quote(sys.executable)} -m compactedit_cli --install-completion; exit $?"  # bash stays the parent
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "compactedit" in (tmp_path / ".bash_completions" / "compactedit.sh").read_text()


def test_value_completion():
    env = {
        **os.environ,
        "COMP_WORDS": "compactedit edit x --offload m",
        "COMP_CWORD": "4",
        "_COMPACTEDIT_COMPLETE": "complete_bash",
    }
    done = subprocess.run([sys.executable, "-m", "compactedit_cli"], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["model"]
