"""``--compile auto``: which edits run the compiled blocks (CUDA only; a long run, or a size this machine compiled
before), the markers that remember compiled sizes across processes, and the flags and config key that choose."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_photo

from compactedit_cli import options
from compactedit_cli.errors import UsageError
from compactedit_cli.speed.compiling import CompileChoice


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "compile" / "compiled-shapes"


@pytest.mark.parametrize(
    ("mode", "device", "long_run", "warm", "expected"),
    [
        ("off", "cuda", True, True, False),
        ("on", "cpu", False, False, True),
        ("on", "cuda", False, False, True),
        ("auto", "cuda", False, False, False),  # one edit of a new size: compiling would cost more than it saves
        ("auto", "cuda", True, False, True),  # a batch or a server spreads the compile over many edits
        ("auto", "cuda", False, True, True),  # the size's graphs are in the cache already
        ("auto", "cpu", True, True, False),  # the compiled step pays on CUDA only
        ("auto", "mps", True, True, False),
    ],
)
def test_when_an_edit_runs_compiled(mode, device, long_run, warm, expected):
    assert options.runs_compiled(mode, device, long_run=long_run, warm=warm) is expected


@pytest.mark.parametrize(("value", "mode"), [(True, "on"), (False, "off"), ("AUTO", "auto"), (" on ", "on")])
def test_compile_modes_are_spelled_once(value, mode):
    assert options.compile_mode(value) == mode
    assert options.ModelOptions(compile=value).compile == mode


def test_a_bad_compile_mode_is_a_usage_error():
    with pytest.raises(UsageError, match=r"compile must be one of off, on, auto, aot \(got 'maybe'\)"):
        options.ModelOptions(compile="maybe")


def _calls_of_a_compiled_function():
    """A compiled function whose backend counts the graphs it is asked to compile (nothing is generated)."""
    compiled: list[int] = []

    def backend(graph, inputs):
        compiled.append(len(inputs))
        return graph.forward

    return torch.compile(lambda x: x * 2 + 1, backend=backend, dynamic=False), compiled


def test_auto_runs_a_cold_size_eagerly_and_a_size_compiled_before_compiled(cache):
    cuda = torch.device("cuda")  # only its type matters to the choice; the function runs on CPU tensors
    function, compiled = _calls_of_a_compiled_function()
    one = CompileChoice("auto", cuda, "model-a", long_run=False)
    x = torch.ones(2, 3)
    with one.context(tuple(x.shape)):
        assert torch.equal(function(x), x * 2 + 1)
    one.ran(tuple(x.shape))
    assert compiled == [] and not cache.exists()  # eager, and nothing remembered
    long = CompileChoice("auto", cuda, "model-a", long_run=True)  # a batch in another process
    with long.context(tuple(x.shape)):
        function(x)
    long.ran(tuple(x.shape))
    assert len(compiled) == 1 and len(list(cache.iterdir())) == 1
    later = CompileChoice("auto", cuda, "model-a", long_run=False)  # a single edit after that batch
    assert later.compiled((2, 3))
    assert not later.compiled((4, 3))  # another size is still cold
    assert not CompileChoice("auto", cuda, "model-b", long_run=False).compiled((2, 3))  # another model
    assert not CompileChoice("auto", torch.device("cpu"), "model-a", long_run=False).compiled((2, 3))


def test_a_size_compiled_with_compile_on_counts_as_warm_for_auto(cache):
    cuda = torch.device("cuda")
    on = CompileChoice("on", cuda, "model-a", long_run=False)
    assert on.compiled((1, 8))
    on.ran((1, 8))
    assert CompileChoice("auto", cuda, "model-a", long_run=False).compiled((1, 8))


def test_a_read_only_cache_only_forgets(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("not a folder")  # where the markers go is unusable
    choice = CompileChoice("on", torch.device("cuda"), "model-a", long_run=True)
    choice.ran((1, 2))  # no error: the edit is done, only the memory of its size is lost
    assert not CompileChoice("auto", torch.device("cuda"), "model-a", long_run=False).compiled((1, 2))


def test_the_pipeline_runs_compiled_blocks_eagerly_unless_the_choice_says_compiled(tiny_checkpoint, cache):
    """On the CPU: ``auto`` stays eager and compiles nothing; ``off`` after ``on`` runs the compiled blocks' eager
    code; ``on`` compiles and remembers the size."""
    from PIL import Image
    from torch._dynamo.utils import counters

    from compactedit_cli.engine.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)
    source = Image.open(make_photo(cache.parent / "p.png", (64, 64)))
    eager = pipe(source, "x", num_inference_steps=1, seed=1).images[0]
    assert pipe.speed.set_compile("auto") == "torch.compile auto: eager on cpu"
    assert not pipe.speed.compiled
    pipe.speed.compile(backend="eager")
    graphs = counters["stats"]["unique_graphs"]
    assert pipe.speed.set_compile("off") == "torch.compile off"
    off = pipe(source, "x", num_inference_steps=1, seed=1).images[0]
    assert counters["stats"]["unique_graphs"] == graphs and not cache.exists()
    pipe.speed.compile(backend="eager")  # on again: set_compile("on") with the eager backend
    on = pipe(source, "x", num_inference_steps=1, seed=1).images[0]
    assert counters["stats"]["unique_graphs"] > graphs and len(list(cache.iterdir())) == 1
    assert pipe.speed.compile_mode == "on"
    for other in (off, on):
        assert list(other.getdata()) == list(eager.getdata())


@pytest.fixture
def as_on_cuda(monkeypatch):
    """The compile rule as it reads on CUDA, for a pipeline on the CPU: the rule is the one place that asks."""
    real = options.runs_compiled
    monkeypatch.setattr(options, "runs_compiled", lambda mode, device_type, **kw: real(mode, "cuda", **kw))


def test_auto_compiles_at_the_first_size_that_runs_compiled_and_not_before(tiny_checkpoint, cache, as_on_cuda):
    from PIL import Image
    from torch._dynamo.utils import counters

    from compactedit_cli.engine.pipeline import EditPipeline

    def pipeline() -> EditPipeline:
        return EditPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)

    source = Image.open(make_photo(cache.parent / "p.png", (64, 64)))
    pipe = pipeline()
    eager = pipe(source, "x", num_inference_steps=1, seed=1).images[0]
    pipe.speed.set_compile("auto", backend="eager")
    torch._dynamo.reset()  # nothing compiled in memory by an earlier test
    graphs = counters["stats"]["unique_graphs"]
    cold = pipe(source, "x", num_inference_steps=1, seed=1).images[0]  # a single edit of a cold size
    assert not pipe.speed.compiled and counters["stats"]["unique_graphs"] == graphs and not cache.exists()
    pipe.speed.set_compile("auto", long_run=True, backend="eager")  # a batch
    long = pipe(source, "x", num_inference_steps=1, seed=1).images[0]
    assert pipe.speed.compiled and counters["stats"]["unique_graphs"] > graphs and len(list(cache.iterdir())) == 1
    later = pipeline()  # as a later process would be: a single edit of that size, now warm
    later.speed.set_compile("auto", backend="eager")
    assert not later.speed.compiled
    warm = later(source, "x", num_inference_steps=1, seed=1).images[0]
    assert later.speed.compiled and later.speed.compile_mode == "auto"
    for other in (cold, long, warm):
        assert list(other.getdata()) == list(eager.getdata())


def test_a_single_edit_of_a_cold_size_under_auto_imports_no_compiler(tiny_checkpoint, tmp_path):
    """In a fresh process, with the rule read as on CUDA: loading and a whole edit leave torch._dynamo unimported."""
    script = f"""
import json, sys
import torch
from PIL import Image
from compactedit_cli import options
from compactedit_cli.engine.pipeline import EditPipeline
real = options.runs_compiled
options.runs_compiled = lambda mode, device_type, **kw: real(mode, "cuda", **kw)
pipe = EditPipeline.from_pretrained({str(tiny_checkpoint)!r}, device="cpu", dtype=torch.float32, compile="auto")
pipe(Image.new("RGB", (64, 48)), "x", num_inference_steps=1)
print(json.dumps({{"compiler": "torch._dynamo" in sys.modules, "mode": pipe.speed.compile_mode}}))
"""
    env = {**os.environ, "COMPACTEDIT_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"compiler": False, "mode": "auto"}


def test_flags_win_over_the_saved_compile_mode(cli, monkeypatch, tmp_path):
    from compactedit_cli.cli.flags import model_options

    monkeypatch.setenv("COMPACTEDIT_HOME", str(tmp_path / "home"))
    assert model_options(None, None, None, None, False, None, None).compile == options.DEFAULT_COMPILE
    assert cli("config", "set", "compile", "Auto").exit_code == 0
    saved = model_options(None, None, None, None, False, None, None)
    assert (saved.compile, saved.long_run) == ("auto", False)
    assert model_options(None, None, None, None, False, None, True).compile == "on"  # --compile
    assert model_options(None, None, None, None, False, None, False).compile == "off"  # --no-compile


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by scripts/gpu_bench.sh)")
def test_on_cuda_auto_compiles_a_long_run_and_then_counts_its_size_as_warm(tiny_checkpoint, cache, tmp_path):
    from PIL import Image
    from torch._dynamo.utils import counters

    from compactedit_cli.engine.pipeline import EditPipeline

    source = Image.open(make_photo(tmp_path / "p.png", (64, 64)))

    def graphs_after_an_edit(long_run: bool) -> int:
        pipe = EditPipeline.from_pretrained(
            tiny_checkpoint, device="cuda", dtype=torch.bfloat16, compile="auto", long_run=long_run
        )
        assert pipe.speed.compiled is long_run and pipe.speed.compile_mode == "auto", pipe.speed.notes
        before = counters["stats"]["unique_graphs"]
        pipe(source, "x", num_inference_steps=1, seed=1)
        return counters["stats"]["unique_graphs"] - before

    assert graphs_after_an_edit(long_run=False) == 0 and not cache.exists()  # a cold single edit stays eager
    assert graphs_after_an_edit(long_run=True) > 0 and len(list(cache.iterdir())) == 1  # a batch compiles
    torch._dynamo.reset()  # as a new process would: nothing compiled in memory, only the caches on disk
    assert graphs_after_an_edit(long_run=False) > 0  # the size is warm now: a single edit runs compiled
