"""Checks run before the engine: a bad call fails without importing torch, diffusers or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_photo

PROBE = (
    "import sys, atexit\n"
    "atexit.register(lambda: print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)))\n"
    "sys.argv = ['compactedit', *sys.argv[1:]]\n"
    "from compactedit_cli.cli import main\n"
    "main()\n"
)


@pytest.mark.parametrize(
    ("case", "code"),
    [("missing input", 3), ("existing output", 5), ("empty instruction", 2), ("bad flag", 2), ("bad manifest", 2)],
)
def test_a_failing_call_never_imports_the_engine(tmp_path, case, code):
    photo = make_photo(tmp_path / "in.png")
    existing = make_photo(tmp_path / "out.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "in.png", "instruction": "x", "steps": 0}\n')
    args = {
        "missing input": ["edit", tmp_path / "nope.png", "x", "-o", tmp_path / "o.png"],
        "existing output": ["edit", photo, "x", "-o", existing],
        "empty instruction": ["edit", photo, " \u200b ", "-o", tmp_path / "o.png"],
        "bad flag": ["edit", photo, "x", "--steps", "0"],
        "bad manifest": ["batch", "--manifest", manifest, "-o", tmp_path / "out"],
    }[case]
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args), "-m", str(tmp_path / "no-model")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == code, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("error: ")
