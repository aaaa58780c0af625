"""A fresh edit process, stage by stage (``bench --cold``), and the loader's direct-to-device path."""

from __future__ import annotations

import json

import pytest
import torch

from compactedit_cli.bench.startup import COLD_STAGES


def test_bench_cold_times_one_fresh_process_by_stage(cli, tmp_path):
    from rich.console import Console

    from compactedit_cli.bench.report import cold_table

    saved = tmp_path / "cold.json"
    args = ("bench", "--cold", "--random-weights", "tiny", "--device", "cpu", "--resolution", "256", "--steps", "2")
    result = cli(*args, "--repeats", "1", "--json", "--save", saved)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(saved.read_text())
    assert tuple(report["stages"]) == COLD_STAGES
    assert all(seconds > 0 for seconds in report["stages"].values())
    assert report["total"] == pytest.approx(sum(report["stages"].values()))
    assert report["process"] > report["total"]  # the child's own clock starts after the interpreter does
    assert report["options"]["steps"] == 2 and report["options"]["compile"] == "off"
    assert report["compile_cache"] is None and len(report["runs"]) == 1
    console = Console(record=True, width=120)
    console.print(cold_table(report))
    text = console.export_text()
    assert all(name in text for name in (*COLD_STAGES, "total", "process"))


def test_bench_cold_refuses_what_it_cannot_time(cli, tmp_path):
    for args, needle in (
        (("--random-weights", "full"), "--random-weights tiny"),
        (("--startup",), "alternatives"),
        (("--resolution", "256", "512"), "one --resolution"),
    ):
        result = cli("bench", "--cold", *args)
        assert result.exit_code == 2 and needle in result.stderr, result.stderr


def test_bench_cold_reports_the_edit_processes_own_error_and_exit_code(cli, tmp_path):
    result = cli("bench", "--cold", "--model", tmp_path / "absent", "--device", "cpu", "--repeats", "1")
    assert result.exit_code == 4, result.stderr
    assert "cold-start process failed" in result.stderr and "absent" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_vlm_and_safetensors_load_straight_onto_the_device(tiny_checkpoint, monkeypatch):
    """No model-wide ``.to(device)`` after loading, and every tensor read names the target device."""
    from compactedit_cli.loading import checkpoint

    opened: list[str] = []
    real_open = checkpoint.safe_open

    def spy_open(path, framework, device):
        opened.append(device)
        return real_open(path, framework=framework, device=device)

    moved: list[str] = []
    real_to = torch.nn.Module.to

    def spy_to(module, *args, **kwargs):
        if (args and isinstance(args[0], (str, torch.device))) or "device" in kwargs:
            moved.append(type(module).__name__)
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", spy_open)
    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    components = checkpoint.load_components(tiny_checkpoint, torch.device("cpu"), torch.float32)
    assert opened == ["cpu", "cpu", "cpu"]  # the text encoder's, transformer's and VAE's files, onto the device
    assert moved == []
    assert {p.device.type for p in components.text_encoder.parameters()} == {"cpu"}


EAGER_PROBE = (
    "import sys, atexit\n"
    "heavy = ('diffusers', 'transformers', 'peft', 'torch._dynamo')\n"
    "atexit.register(lambda: print('loaded:', sorted(m for m in heavy if m in sys.modules), file=sys.stderr))\n"
    "sys.argv = ['compactedit', *sys.argv[1:]]\n"
    "from compactedit_cli.cli import main\n"
    "main()\n"
)


def test_an_eager_edit_imports_neither_diffusers_nor_transformers_nor_dynamo(tiny_checkpoint, tmp_path):
    """The lean cold start: the edit path's models are compactedit's own, and nothing compiles without --compile."""
    import subprocess
    import sys

    from conftest import make_photo

    photo, out = make_photo(tmp_path / "in.png"), tmp_path / "out.png"
    args = ["edit", photo, "add a hat", "-o", out, "-m", tiny_checkpoint, "--device", "cpu", "--steps", "2"]
    run = subprocess.run(
        [sys.executable, "-c", EAGER_PROBE, *map(str, args), "--server", "never"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert out.is_file()
    assert "loaded: []" in run.stderr, run.stderr
