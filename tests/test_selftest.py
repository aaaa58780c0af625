"""``compactedit selftest`` runs offline and reports the environment, which ``compactedit_cli.environment`` makes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest


def test_selftest_passes_offline(cli):
    result = cli("selftest", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and all(report["checks"].values())
    assert {"compactedit", "torch", "diffusers", "transformers", "cuda_available", "mps_available"} <= set(report)
    assert {"cpu_name", "cpu_count", "host_memory_bytes", "platform"} <= set(report)  # the bench's host facts too


def test_selftest_human_output(cli):
    result = cli("selftest")
    assert result.exit_code == 0
    assert "output has the input size" in result.stderr and "torch" in result.stderr


def test_environment_report_describes_this_cpu_machine():
    import diffusers
    import torch
    import transformers

    import compactedit_cli
    from compactedit_cli.environment import environment_report

    report = environment_report("cpu")
    assert set(report) == {"versions", "device"}
    assert report["versions"] == {
        "compactedit": compactedit_cli.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    device = report["device"]
    assert device["type"] == "cpu" and device["name"] == device["cpu_name"] and device["name"]
    assert device["total_memory_bytes"] is None and device["capability"] is None  # facts of a CUDA device only
    assert device["cuda_available"] is torch.cuda.is_available()
    assert isinstance(device["mps_available"], bool) and isinstance(device["bf16_supported"], bool)
    assert device["cpu_count"] == os.cpu_count() and device["torch_threads"] >= 1
    assert device["platform"] == platform.platform()
    assert len(device["load_average"]) == 3 and all(load >= 0 for load in device["load_average"])
    assert json.loads(json.dumps(report)) == report


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads Linux's own account of the memory")
def test_environment_report_host_memory_and_cpu_name_agree_with_linux():
    from compactedit_cli.environment import environment_report

    device = environment_report("cpu")["device"]
    kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    assert device["host_memory_bytes"] == kib * 1024
    models = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    if models:  # x86 names its CPU; other architectures fall back to platform's word for it
        assert device["cpu_name"] == models[0].split(":", 1)[1].strip()
    assert device["cpu_name"]


def test_environment_report_defaults_to_the_device_an_edit_picks():
    import torch

    from compactedit_cli.environment import environment_report

    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert environment_report()["device"]["type"] == expected


def test_importing_the_environment_module_imports_no_heavy_library():
    code = (
        "import sys, compactedit_cli.environment; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'psutil') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
