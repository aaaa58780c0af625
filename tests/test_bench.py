"""The benchmark runner on the tiny model: a complete, well-formed, JSON-ready report (no timing assertions)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest
from rich.console import Console

from compactedit_cli import options
from compactedit_cli.bench.report import report_table, startup_table, unapplied_options
from compactedit_cli.bench.run import STAGES, BenchError, _graphs_outcome, run_bench

SPANS = ("vlm_encode", "vae_encode", "denoise", "vae_decode", "postprocess")


@pytest.fixture(scope="module")
def progress_calls() -> list[tuple[int, int, str]]:
    return []


@pytest.fixture(scope="module")
def report(progress_calls):
    return run_bench(
        random_weights="tiny",
        resolutions=[64, 128],
        steps=2,
        warmup=1,
        repeats=2,
        device="cpu",
        progress=lambda *args: progress_calls.append(args),
    )


def test_report_has_every_stage_with_statistics(report):
    assert report["schema"] == "compactedit.bench/1"
    assert [r["resolution"] for r in report["results"]] == [64, 128]
    for row in report["results"]:
        assert set(row["stages"]) == set(STAGES)
        for name, stats in row["stages"].items():
            assert set(stats) == {"min", "median", "max", "mean", "runs"}, name
            assert stats["min"] <= stats["median"] <= stats["max"], name
            assert all(value >= 0 for value in stats["runs"]), name
            expected_runs = 2 * 2 if name == "denoise_step" else 2  # every step of every timed run
            assert len(stats["runs"]) == expected_runs, name
        for run in range(2):  # the consecutive stages account for the whole edit
            spans = sum(row["stages"][name]["runs"][run] for name in SPANS)
            assert spans == pytest.approx(row["stages"]["end_to_end"]["runs"][run])
        assert len(row["warmup"]) == 1 and set(row["warmup"][0]) == set(STAGES) - {"denoise_step"}
        assert row["compile_warmup_s"] is None  # not compiled
        assert isinstance(row["first_run_overhead_s"], float)


def test_resolutions_are_binned_as_edit_bins_them(report):
    from compactedit_cli.engine.binning import closest_bin

    for row in report["results"]:
        edge = row["resolution"]
        assert row["input_size"] == [edge, edge]
        size = row["model_size"]
        assert (size["height"], size["width"]) == closest_bin(edge, edge)
        assert row["latent_tokens"] == (size["height"] // 32) * (size["width"] // 32)


def test_report_carries_memory_settings_versions_and_device(report):
    for row in report["results"]:
        memory = row["memory"]
        assert memory["kind"] == "cpu" and memory["peak_rss_bytes"] > 0
        assert set(memory["stages"]) == set(SPANS)
        assert row["vae_tiling"] is False
        assert 0 <= row["foreign_cpu_share"] <= 1
    settings = report["settings"]
    for key in ("resolutions", "steps", "guidance_scale", "image_guidance_scale", "distilled", "batch", "dtype",
                "device", "compile", "cuda_graphs", "offload", "random_weights", "warmup", "repeats"):  # fmt: skip
        assert key in settings, key
    assert settings["guidance_branches"] == 3 and settings["dtype"] == "float32" and settings["offload"] == "none"
    assert set(report["versions"]) >= {"python", "torch", "diffusers", "transformers", "compactedit"}
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["model"]["load_s"] > 0 and report["model"]["build_s"] > 0
    assert set(report["model"]["parameters"]) == {"text_encoder", "transformer", "vae"}


def test_report_round_trips_through_json(report):
    assert json.loads(json.dumps(report)) == report


def test_progress_hook_counts_up_to_the_total(report, progress_calls):
    total = 1 + 2 * (1 + 2)
    assert progress_calls[0][:2] == (0, total)
    assert [done for done, _, _ in progress_calls] == list(range(total + 1))
    assert all(t == total for _, t, _ in progress_calls)
    said = [what for _, _, what in progress_calls]
    assert said[1:5] == ["loaded", "64px warm-up 1", "64px run 1", "64px run 2"] and said[-1] == "128px run 2"


def test_table_renders_one_row_per_resolution(report):
    console = Console(record=True, width=200)
    console.print(report_table(report))
    text = console.export_text()
    assert text.count("512×512") == 2
    assert "RSS" in text and "3 branch(es)" in text


def test_loaded_pipeline_distilled_and_offload(tiny_pipe):
    report = run_bench(model=tiny_pipe, resolutions=[96], steps=1, warmup=0, repeats=1, distilled=True, binning=False)
    assert report["model"]["load_s"] is None
    assert report["results"][0]["model_size"] == {"height": 96, "width": 96}
    assert report["settings"]["guidance_branches"] == 1
    assert report["settings"]["device"] == "cpu"
    assert len(report["results"][0]["stages"]["denoise_step"]["runs"]) == 1
    try:  # tiny_pipe is shared by the session: put it back even when an assertion fails
        offloaded = run_bench(model=tiny_pipe, resolutions=[96], steps=1, warmup=0, repeats=1, offload="model")
        assert offloaded["settings"]["offload"] == "model"
        assert offloaded["results"][0]["vae_tiling"] is False  # the report says whether it tiled; memory was not short
        tiny_pipe.speed.set_vae_tiling(True, tile=64, stride=32)  # tiles smaller than the image: it runs in tiles
        forced = run_bench(model=tiny_pipe, resolutions=[96], steps=1, warmup=0, repeats=1, offload="model")
        assert forced["results"][0]["vae_tiling"] is True
    finally:
        tiny_pipe.speed.set_vae_tiling(None, tile=options.DEFAULT_VAE_TILE, stride=options.DEFAULT_VAE_TILE_STRIDE)
        tiny_pipe.speed.set_offload("none")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"random_weights": "tiny", "model": "x"}, "exactly one"),
        ({"random_weights": "huge"}, "random_weights"),
        ({"random_weights": "tiny", "resolutions": []}, "resolutions"),
        ({"random_weights": "tiny", "steps": 0}, "steps"),
        ({"random_weights": "tiny", "repeats": 0}, "repeats"),
        ({"random_weights": "tiny", "dtype": "int8"}, "dtype"),
        ({"random_weights": "tiny", "cuda_graphs": True, "offload": "model"}, "do not mix"),
    ],
)
def test_bad_options_are_refused_before_any_work(kwargs, message):
    with pytest.raises(BenchError, match=message):
        run_bench(device="cpu", **kwargs)


def test_distilled_with_guidance_is_refused(tiny_pipe):
    with pytest.raises(BenchError, match="distilled"):
        run_bench(model=tiny_pipe, distilled=True, guidance_scale=4.5, resolutions=[64], steps=1, repeats=1)


def test_command_saves_json_and_logs_progress_off_a_terminal(cli, tmp_path):
    """What scripts/gpu_bench.sh relies on: --save writes the report, and a log gets one line per edit."""
    out = tmp_path / "reports" / "bench.json"
    quick = ["bench", "--random-weights", "tiny", "--resolution", "64", "--steps", "1", "--warmup", "0",
             "--repeats", "1", "--device", "cpu"]  # fmt: skip
    result = cli(*quick, "--save", out, "--sync-check")
    assert result.exit_code == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved["settings"]["steps"] == 1 and saved["settings"]["sync_check"] is True
    assert "[0/2] loading the model" in result.stderr and "[2/2] 64px run 1" in result.stderr
    assert "random:tiny" in result.stderr  # then the table
    quiet = cli(*quick, "--quiet", "--json")
    assert quiet.exit_code == 0 and "[2/2]" not in quiet.stderr
    assert json.loads(quiet.stdout)["settings"]["sync_check"] is False


def test_importing_the_bench_modules_imports_no_heavy_library():
    code = (
        "import sys, compactedit_cli.bench.run, compactedit_cli.bench.report, compactedit_cli.bench.startup; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'rich') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_checkpoint_folder_is_loaded_and_timed(tiny_checkpoint):
    report = run_bench(model=tiny_checkpoint, resolutions=[64], steps=1, warmup=0, repeats=1, device="cpu")
    assert report["model"]["source"] == str(tiny_checkpoint) and report["model"]["load_s"] > 0


def test_startup_probes_run_in_fresh_interpreters(monkeypatch, cli, tmp_path):
    from compactedit_cli.bench import startup

    probes = {"interpreter": "pass", "sees_the_tiny_model": "import pathlib; assert pathlib.Path({folder!r}).is_dir()"}
    monkeypatch.setattr(startup, "STARTUP_PROBES", probes)
    report = startup.startup_overhead(repeats=2)
    assert set(report["probes"]) == set(probes) and report["repeats"] == 2
    assert all(len(stats["runs"]) == 2 for stats in report["probes"].values())
    assert report["device"]["type"] == "cpu" and report["versions"]["python"] == platform.python_version()
    assert json.loads(json.dumps(report)) == report
    console = Console(record=True, width=200)
    console.print(startup_table(report))
    assert "sees_the_tiny_model" in console.export_text()

    out = tmp_path / "startup.json"
    result = cli("bench", "--startup", "--repeats", "1", "--save", out)
    assert result.exit_code == 0, result.stderr
    assert "sees_the_tiny_model" in result.stderr  # the table
    assert [len(s["runs"]) for s in json.loads(out.read_text())["probes"].values()] == [1, 1]
    refused = cli("bench", "--startup", "--random-weights", "tiny")
    assert refused.exit_code == 2 and "--startup" in refused.stderr


def test_startup_probes_are_valid_python():
    """The real probes compile (running them all is the command's job, and takes tens of seconds)."""
    from compactedit_cli.bench.startup import STARTUP_PROBES

    for name, code in STARTUP_PROBES.items():
        compile(code.format(folder="/tmp/x"), name, "exec")


def test_bench_command_json(cli):
    """``compactedit bench`` on the tiny model: a complete report on stdout, usage errors as exit 2."""
    import json

    quick = [
        "bench",
        "--random-weights",
        "tiny",
        "--device",
        "cpu",
        "--no-binning",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "1",
    ]
    result = cli(*quick, "--resolution", "64", "96", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["model_size"]["width"] for r in report["results"]] == [64, 96]
    assert report["settings"]["steps"] == 1 and report["settings"]["random_weights"] == "tiny"
    for row in report["results"]:
        assert {"vlm_encode", "vae_encode", "denoise", "denoise_step", "vae_decode", "end_to_end"} <= set(row["stages"])
    bad = cli("bench", "--random-weights", "tiny", "--model", "vibe")
    assert bad.exit_code == 2 and "alternatives" in bad.stderr
    table = cli(*quick, "--resolution", "64")
    assert table.exit_code == 0 and "VAE dec" in table.stderr
    graphed = cli(*quick, "--resolution", "64", "--cuda-graphs", "--json")
    assert graphed.exit_code == 0 and graphed.stderr.count("CUDA graphs skipped") == 1
    settings = json.loads(graphed.stdout)["settings"]
    assert settings["cuda_graphs"] and not settings["cuda_graphs_active"]
    assert "CUDA graphs skipped" in settings["cuda_graphs_message"] and settings["cuda_graph_captures"] == 0


def test_a_failed_capture_is_reported_as_eager():
    """The report says what ran: a graph that failed to capture at the first step means eager steps."""
    from compactedit_cli.speed.graphs import GraphedStep

    graphed = GraphedStep(lambda x: x)
    graphed.captures, graphed.failure = 1, "operation not permitted when stream is capturing"
    outcome = _graphs_outcome(
        SimpleNamespace(speed=SimpleNamespace(graphs=graphed)), "denoising steps replay as a CUDA graph"
    )
    assert not outcome["cuda_graphs_active"] and outcome["cuda_graph_captures"] == 1
    assert "ran eagerly: operation not permitted" in outcome["cuda_graphs_message"]
    settings = {"compile": False, "compiled": False, "cuda_graphs": True, **outcome}
    assert unapplied_options({"settings": settings}) == [outcome["cuda_graphs_message"]]
    graphed.failure = None
    assert _graphs_outcome(SimpleNamespace(speed=SimpleNamespace(graphs=graphed)), "replaying")["cuda_graphs_active"]


def test_a_capture_failing_during_the_runs_is_said_by_the_report_not_mid_run(tiny_checkpoint):
    """A GPU capture fails inside the first step; here a step that fails the same way stands in for the capture."""
    import warnings

    from compactedit_cli.engine.pipeline import EditPipeline
    from compactedit_cli.speed.graphs import GraphedStep

    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device="cpu")
    graphed = GraphedStep(pipe.transformer.forward_projected)

    def failing_capture(*args):
        graphed.failure = "operation not permitted when stream is capturing"
        warnings.warn(f"CUDA graph capture failed, running eagerly: {graphed.failure}", RuntimeWarning, 2)
        return pipe.transformer.forward_projected(*args)

    graphed.step = failing_capture
    pipe.speed._graphs = graphed  # off CUDA, use_graphs() would not install one
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "CUDA graph capture failed")
        report = run_bench(model=pipe, resolutions=[96], steps=1, warmup=0, repeats=1, binning=False)
    settings = report["settings"]
    assert (
        not settings["cuda_graphs_active"] and "ran eagerly: operation not permitted" in settings["cuda_graphs_message"]
    )
