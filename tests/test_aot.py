"""``compile = "aot"``: each size's block compiled ahead of time once, into a package in the compile cache, that
later pipelines and fresh processes load and run without Dynamo or inductor; a package that cannot load is one
warning and an eager edit; training keeps the blocks' own code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_photo
from PIL import Image

from compactedit_cli import options
from compactedit_cli.speed import aot
from compactedit_cli.speed.compiling import compile_unavailable

pytestmark = pytest.mark.skipif(
    compile_unavailable("inductor", torch.device("cpu")) is not None, reason="AOTInductor needs a C++ compiler"
)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def edit(checkpoint: Path, source: Path, compile: str = "off"):
    from compactedit_cli.engine.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(checkpoint, device="cpu", dtype=torch.float32, compile=compile)
    image = pipe(Image.open(source), "x", num_inference_steps=2, seed=3).images[0]
    return pipe, image


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    """One package built by a first aot edit (the expensive part, once per module), with the eager edit's pixels."""
    root = tmp_path_factory.mktemp("aot")
    source = make_photo(root / "p.png", (64, 48), seed=5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPACTEDIT_CACHE_DIR", str(root / "cache"))
        _, eager = edit(tiny_checkpoint, source)
        pipe, first = edit(tiny_checkpoint, source, "aot")
    return {"root": root, "source": source, "eager": eager, "first": first, "pipe": pipe}


def test_the_first_edit_of_a_size_builds_one_package_that_a_later_pipeline_only_loads(
    built, tiny_checkpoint, monkeypatch
):
    monkeypatch.setenv("COMPACTEDIT_CACHE_DIR", str(built["root"] / "cache"))
    assert built["pipe"].speed.compile_mode == "aot" and not built["pipe"].speed.notes
    assert built["pipe"].speed.aot_packages.built == 1  # one size, one package for all blocks
    packages = list((built["root"] / "cache" / "compile" / "aot").glob("*.pt2"))
    assert len(packages) == 1 and not packages[0].name.startswith("partial-")
    assert np.abs(pixels(built["first"]) - pixels(built["eager"])).max() <= 1
    later, again = edit(tiny_checkpoint, built["source"], "aot")
    assert later.speed.aot_packages.built == 0 and not later.speed.notes
    assert np.abs(pixels(again) - pixels(built["eager"])).max() <= 1


def test_a_fresh_process_runs_a_warm_size_without_the_compiler(built, tiny_checkpoint, tmp_path):
    script = f"""
import json, sys
import numpy as np, torch
from PIL import Image
from compactedit_cli.engine.pipeline import EditPipeline
pipe = EditPipeline.from_pretrained({str(tiny_checkpoint)!r}, device="cpu", dtype=torch.float32, compile="aot")
image = pipe(Image.open({str(built["source"])!r}), "x", num_inference_steps=2, seed=3).images[0]
image.save({str(tmp_path / "out.png")!r})
print(json.dumps({{"dynamo": "torch._dynamo" in sys.modules, "inductor": "torch._inductor" in sys.modules,
                  "built": pipe.speed.aot_packages.built, "notes": pipe.speed.notes}}))
"""
    env = {**os.environ, "COMPACTEDIT_CACHE_DIR": str(built["root"] / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"dynamo": False, "inductor": False, "built": 0, "notes": []}
    assert np.abs(pixels(Image.open(tmp_path / "out.png")) - pixels(built["eager"])).max() <= 1


def test_the_config_key_sends_an_edit_through_the_packages(built, tiny_checkpoint, tmp_path):
    env = {
        **os.environ,
        "COMPACTEDIT_CACHE_DIR": str(built["root"] / "cache"),
        "COMPACTEDIT_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "compactedit_cli"]
    setting = subprocess.run([*command, "config", "set", "compile", "AOT"], env=env, capture_output=True, text=True)
    assert setting.returncode == 0, setting.stderr
    out = tmp_path / "out.png"
    args = ["edit", built["source"], "x", "-o", out, "-m", tiny_checkpoint, "--device", "cpu", "--steps", "2"]
    done = subprocess.run(
        [*command, *map(str, args), "--seed", "3", "--server", "never"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert np.abs(pixels(Image.open(out)) - pixels(built["eager"])).max() <= 1


def test_a_batch_runs_through_the_packages_too(built, tiny_checkpoint, tmp_path):
    """The config key reaches batch as it reaches edit: the size's package loads (a spoilt one is said), nothing is
    built."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(built["source"], src / "p.png")
    env = {
        **os.environ,
        "COMPACTEDIT_CACHE_DIR": str(built["root"] / "cache"),
        "COMPACTEDIT_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "compactedit_cli"]
    assert subprocess.run([*command, "config", "set", "compile", "aot"], env=env, capture_output=True).returncode == 0
    before = sorted((built["root"] / "cache" / "compile" / "aot").iterdir())

    def batch(out: Path) -> subprocess.CompletedProcess:
        args = ["batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, "--device", "cpu", "--steps", "2"]
        args += ["--seed", "3", "--server", "never", "--json"]
        return subprocess.run([*command, *map(str, args)], env=env, capture_output=True, text=True)

    done = batch(tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] == 1 and "warning" not in done.stderr
    assert sorted((built["root"] / "cache" / "compile" / "aot").iterdir()) == before
    assert np.abs(pixels(Image.open(tmp_path / "out" / "p.png")) - pixels(built["eager"])).max() <= 1
    shutil.copytree(built["root"] / "cache", tmp_path / "cache")  # the same, with the package spoilt: it is read
    for package in (tmp_path / "cache" / "compile" / "aot").glob("*.pt2"):
        package.write_bytes(b"not a package")
    env["COMPACTEDIT_CACHE_DIR"] = str(tmp_path / "cache")
    spoilt = batch(tmp_path / "again")
    assert spoilt.returncode == 0, spoilt.stderr
    assert "ahead-of-time load of" in spoilt.stderr and json.loads(spoilt.stdout)["ok"] == 1


def test_bench_cold_says_which_process_built_the_package_and_which_only_loaded_it(tmp_path):
    env = {**os.environ, "COMPACTEDIT_CACHE_DIR": str(tmp_path / "cache"), "COMPACTEDIT_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "compactedit_cli"]
    assert subprocess.run([*command, "config", "set", "compile", "aot"], env=env, capture_output=True).returncode == 0
    args = ["bench", "--cold", "--random-weights", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "1"]
    done = subprocess.run(
        [*command, *args, "--repeats", "2", "--json"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["options"]["compile"] == "aot"
    assert [run["compile_cache"] for run in report["runs"]] == [{"aot_packages_built": 1}, {"aot_packages_built": 0}]
    assert not any(run["dynamo_imported"] for run in report["runs"][1:])


def test_a_package_that_cannot_load_is_one_warning_and_an_eager_edit(built, tiny_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(built["root"] / "cache", cache)
    [package] = (cache / "compile" / "aot").glob("*.pt2")
    package.write_bytes(b"not a package")
    monkeypatch.setenv("COMPACTEDIT_CACHE_DIR", str(cache))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe, image = edit(tiny_checkpoint, built["source"], "aot")
    said = [str(w.message) for w in caught if "ahead-of-time" in str(w.message)]
    assert len(said) == 1 and str(package) in said[0] and "delete it to build it again" in said[0], said
    assert pipe.speed.notes == said
    assert np.abs(pixels(image) - pixels(built["eager"])).max() <= 1


def test_an_unwritable_cache_is_one_warning_and_an_eager_edit(built, tiny_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "compile").write_text("a file where the compile cache's folder should be")
    monkeypatch.setenv("COMPACTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe, image = edit(tiny_checkpoint, built["source"], "aot")
    said = [str(w.message) for w in caught if "ahead-of-time" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("ahead-of-time compile failed, so this size runs eagerly"), said
    assert pipe.speed.aot_packages.built == 0
    assert np.abs(pixels(image) - pixels(built["eager"])).max() <= 1


def test_training_runs_the_blocks_own_code(built):
    """With gradients on, a block answers with its own forward (a package holds no backward)."""
    transformer = built["pipe"].transformer
    block = transformer.transformer_blocks[0]
    assert isinstance(block.forward, aot.AotBlock)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    x = torch.randn(1, 6, width, requires_grad=True)
    context = torch.randn(1, 4, width)
    modulation = torch.randn(1, 6 * width)
    with torch.enable_grad():
        out = block(x, context, modulation, 2, 3)
    assert out.requires_grad and out.grad_fn is not None


def test_a_package_is_named_by_the_code_it_froze(monkeypatch):
    key = (((1, 2), "torch.float32", "cpu"), 3)
    before = aot.AotPackages("model-a", note=print).path(key)
    monkeypatch.setattr(aot, "code_digest", lambda: "another-checkout")
    assert aot.AotPackages("model-a", note=print).path(key) != before
    assert aot.AotPackages("model-b", note=print).path(key) != before


def test_aot_is_one_of_the_compile_modes():
    assert options.compile_mode(" AOT ") == "aot"
    assert options.ModelOptions(compile="aot").compile == "aot"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by scripts/gpu_bench.sh)")
def test_on_cuda_a_package_matches_the_eager_blocks_and_loads_in_a_new_pipeline(tiny_checkpoint, tmp_path, monkeypatch):
    from compactedit_cli.engine.pipeline import EditPipeline

    monkeypatch.setenv("COMPACTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    source = Image.open(make_photo(tmp_path / "p.png", (64, 48), seed=5))

    def run(compile: str):
        pipe = EditPipeline.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.bfloat16, compile=compile)
        return pipe, pipe(source, "x", num_inference_steps=2, seed=3, output_type="latent").latents

    _, eager = run("off")
    built, first = run("aot")
    loaded, again = run("aot")
    assert built.speed.aot_packages.built == 1 and loaded.speed.aot_packages.built == 0
    assert not built.speed.notes and not loaded.speed.notes
    for latents in (first, again):
        assert (latents.float() - eager.float()).abs().max() <= 0.05 * eager.float().abs().max()
