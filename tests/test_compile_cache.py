"""``--compile`` keeps inductor's caches in compactedit's cache folder, so a second process reuses the graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compactedit_cli.options import compile_cache_dir
from compactedit_cli.speed.compiling import compile_unavailable


def test_the_compile_cache_folder_is_compactedits_own(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch"))
    monkeypatch.delenv("COMPACTEDIT_CACHE_DIR", raising=False)
    assert compile_cache_dir().parts[-2:] == ("compactedit", "compile")
    monkeypatch.setenv("COMPACTEDIT_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine" / "compile"


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable("inductor", torch.device("cpu")) is not None, reason="inductor cannot run")
def test_a_second_compiled_process_hits_the_cache_the_first_filled(tmp_path):
    env = {**os.environ, "COMPACTEDIT_CACHE_DIR": str(tmp_path / "cache"), "COMPACTEDIT_HOME": str(tmp_path / "home")}
    args = ["bench", "--cold", "--compile", "--random-weights", "tiny", "--device", "cpu", "--resolution", "256"]
    done = subprocess.run(
        [sys.executable, "-m", "compactedit_cli", *args, "--steps", "1", "--repeats", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    first, second = (run["compile_cache"] for run in json.loads(done.stdout)["runs"])
    assert first["fxgraph_cache_miss"] >= 1 and first["fxgraph_cache_hit"] == 0
    assert second["fxgraph_cache_hit"] >= 1 and second["fxgraph_cache_miss"] == 0
    assert any(Path(tmp_path, "cache", "compile").iterdir())
