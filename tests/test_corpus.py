"""Every corpus input through both ``compactedit edit`` and ``compactedit batch``, with its documented outcome.

Working inputs give an output of the upright input's exact size (alpha kept where the format has it); failing
inputs give their exit code and one ``error:`` line, leave no output and never touch the input.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo
from corpus import IMAGE_CASES, Fails, ImageCase, Works, fifo, large_photo, marked, sparse_2gb, ztxt_bomb
from PIL import Image

from compactedit_cli.files import metadata as meta_io
from compactedit_cli.files.imaging import TEMP_PREFIX, open_image

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.single_thread

FAST = ["--steps", "1"]
MODES = ["edit", "batch"]
INSTRUCTION = "make it winter"


@dataclass
class Run:
    """What one CLI run left behind."""

    exit_code: int
    stderr: str
    output: Path
    record: dict | None  # batch: the item's results.jsonl line
    created: set[str]  # names of the files the run added to the output folder


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.is_dir() else set()


def finished(result, out_dir: Path, output: str, before: set[Path]) -> Run:
    records = _records(out_dir)
    created = {p.name for p in _files(out_dir) - before}
    return Run(result.exit_code, result.stderr, out_dir / output, records[0] if records else None, created)


def _digest(path: Path) -> tuple | None:
    """Size, modification time and a hash of the first 16 MiB: any write shows, and a sparse 2 GiB input costs
    no 2 GiB read. Not a regular file (a FIFO, a device): None."""
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        head = hashlib.sha256(handle.read(16 * 1024 * 1024)).hexdigest()
    info = path.stat()
    return info.st_size, info.st_mtime_ns, head


def _records(out_dir: Path) -> list[dict]:
    path = out_dir / "results.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def run(cli, mode: str, model, image: Path, instruction: str, out_dir: Path, output: str, *extra, env=None) -> Run:
    """``edit IMAGE INSTRUCTION -o OUT_DIR/output``, or ``batch`` of a one-line manifest (beside IMAGE) into OUT_DIR."""
    common = ["-m", model, *FAST, *extra]
    before = _files(out_dir)
    if mode == "edit":
        result = cli("edit", image, instruction, "-o", out_dir / output, *common, env=env)
    else:
        manifest = image.parent / "manifest.jsonl"
        line = {"image": str(image), "instruction": instruction, "output": output}
        manifest.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
        result = cli("batch", "--manifest", manifest, "-o", out_dir, *common, env=env)
    return finished(result, out_dir, output, before)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_refused(done: Run, mode: str, outcome: Fails, *, item_level: bool) -> None:
    """``edit`` exits with the outcome's code and one error line; ``batch`` too, unless the failure belongs to one
    item (a bad input image): then that item is recorded as failed, the run goes on, and the exit code is 1."""
    if mode == "batch" and item_level:
        assert done.exit_code == 1, done.stderr
        assert done.record["status"] == "failed" and outcome.message in done.record["error"]
        assert "Traceback" not in done.stderr
        assert any(outcome.message in line for line in done.stderr.splitlines()), done.stderr
    else:
        assert done.exit_code == outcome.code, done.stderr
        lines = error_lines(done.stderr)
        assert len(lines) == 1 and outcome.message in lines[0], done.stderr
    assert not done.output.exists()
    assert done.created <= {"results.jsonl"}


def assert_works(done: Run, mode: str, outcome: Works, source: Path) -> None:
    assert done.exit_code == 0, done.stderr
    with Image.open(done.output) as image:
        assert image.size == outcome.size
        has_alpha = image.mode == "RGBA"
        output_alpha = np.asarray(image.getchannel("A")) if has_alpha else None
    assert has_alpha == outcome.alpha
    if outcome.alpha:
        expected = np.asarray(open_image(source).alpha)
        assert np.abs(output_alpha.astype(int) - expected).max() <= 2  # exact for PNG, lossless-ish WebP alpha
    recorded = meta_io.read(done.output)
    if outcome.model_size is not None:
        assert tuple(recorded["model_size"]) == outcome.model_size
    if outcome.upright:  # the tiny model keeps the input's layout, so the marked quadrant shows where it went
        scores = _placement_scores(done.output)
        assert scores[0] == max(scores), scores
        with Image.open(done.output) as image:
            assert image.getexif().get(0x0112, 1) == 1  # no orientation tag to make viewers turn it again
    if outcome.warning is not None:
        assert any(line.startswith("warning:") and outcome.warning in line for line in done.stderr.splitlines())
        if mode == "batch":
            assert any(outcome.warning in warning for warning in done.record["warnings"])
    if mode == "batch":
        assert done.record["status"] == "ok" and done.record["input"] == str(source)
    assert not list(done.output.parent.glob(f"{TEMP_PREFIX}*"))


def _placement_scores(path: Path) -> list[float]:
    """|correlation| of an output with the marked layout as is, mirrored, flipped and turned half round."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64).ravel()
    layout = np.asarray(marked().convert("L"), dtype=np.float64)
    placements = [layout, layout[:, ::-1], layout[::-1], layout[::-1, ::-1]]
    return [abs(np.corrcoef(grey, placement.ravel())[0, 1]) for placement in placements]


# ---- input images -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda case: case.name)
def test_image_corpus(cli, tiny_checkpoint, tmp_path, case: ImageCase, mode):
    source = case.make(tmp_path / "inputs")
    before = _digest(source)
    outcome = case.outcome
    binning = [] if isinstance(outcome, Works) and outcome.binning else ["--no-binning"]
    done = run(cli, mode, tiny_checkpoint, source, INSTRUCTION, tmp_path / "out", case.output, *binning)
    if isinstance(outcome, Fails):
        assert_refused(done, mode, outcome, item_level=True)
    else:
        assert_works(done, mode, outcome, source)
    assert _digest(source) == before


def test_bad_images_fail_alone_in_a_batch(cli, tiny_checkpoint, tmp_path):
    """Bad inputs between good ones (a metadata bomb, a FIFO, a 2 GiB sparse file): each fails as its own item, the
    good ones around them are edited, and results.jsonl has a line for every item."""
    inputs = tmp_path / "inputs"
    sources = [
        make_photo(inputs / "first.png", (96, 64)),
        ztxt_bomb(inputs),
        fifo(inputs),
        sparse_2gb(inputs),
        make_photo(inputs / "last.png", (96, 64), seed=1),
    ]
    manifest = inputs / "manifest.jsonl"
    lines = [
        {"image": str(source), "instruction": INSTRUCTION, "output": f"{n}.png"} for n, source in enumerate(sources)
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out_dir = tmp_path / "out"
    result = cli("batch", "--manifest", manifest, "-o", out_dir, "-m", tiny_checkpoint, *FAST, "--no-binning")
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    status = {Path(r["input"]).name: r["status"] for r in _records(out_dir)}
    assert status == {"first.png": "ok", "ztxt-bomb.png": "failed", "pipe.png": "failed", "big.png": "failed",
                      "last.png": "ok"}  # fmt: skip
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["0.png", "4.png"]


# ---- instructions -------------------------------------------------------------------------------------------------

LONG = "add snow to the roofs and the trees, and make the sky grey and heavy with clouds; " * 12
INSTRUCTION_CASES = [
    ("longer-than-the-limit", LONG, Works((96, 64), warning="only the first 256 are used")),
    ("other-languages", "füge Schnee hinzu, 雪を追加して, добавь снег", Works((96, 64))),
    ("emoji", "make it look like a 🌅 sunset 🔥", Works((96, 64))),
    ("empty", "", Fails(2, "the instruction is empty")),
    ("whitespace-only", " \t\n ", Fails(2, "the instruction is empty")),
    ("invalid-utf8-bytes", "make it \udcff red", Fails(2, "not valid UTF-8")),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "instruction", "outcome"), INSTRUCTION_CASES, ids=[c[0] for c in INSTRUCTION_CASES])
def test_instruction_corpus(cli, tiny_checkpoint, tmp_path, name, instruction, outcome, mode):
    source = make_photo(tmp_path / "inputs" / "p.png", (96, 64))
    out_dir = tmp_path / "out"
    before = _files(out_dir)
    if mode == "edit":
        result = cli("edit", source, instruction, "-o", out_dir / "p.png", "-m", tiny_checkpoint, *FAST, "--no-binning")
    else:  # the folder form: -i gives every image the instruction
        result = cli("batch", source.parent, "-i", instruction, "-o", out_dir, "-m", tiny_checkpoint, *FAST)
    done = finished(result, out_dir, "p.png", before)
    if isinstance(outcome, Fails):
        assert_refused(done, mode, outcome, item_level=False)
        return
    assert_works(done, mode, outcome, source)
    recorded = meta_io.read(done.output)["instruction"]
    if outcome.warning is None:
        assert recorded == instruction
    else:  # cut on a token boundary: a prefix of what was asked, and well short of it
        assert instruction.startswith(recorded) and len(recorded) < len(instruction) // 2


# ---- outputs ------------------------------------------------------------------------------------------------------


def _regular_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


OUTPUT_CASES = {
    # name: (edit -o, batch -o, manifest output, outcome); {file} is a regular file
    "missing-folders-are-created": ("new/deeper/o.png", "new/deeper", "o.png", None),
    "folder-is-a-file": ("{file}/o.png", "{file}", "o.png", Fails(5, "is a file, not a folder")),
    "folder-under-a-file": ("{file}/sub/o.png", "{file}/sub", "o.png", Fails(5, "cannot create the output folder")),
    "unknown-extension": ("o.bmp", "out", "o.bmp", Fails(2, "unknown output extension '.bmp'")),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(OUTPUT_CASES))
def test_output_corpus(cli, tiny_checkpoint, tmp_path, name, mode):
    edit_out, batch_out, output, outcome = OUTPUT_CASES[name]
    regular = _regular_file(tmp_path)
    source = make_photo(tmp_path / "p.png", (96, 64))
    target = tmp_path / (edit_out if mode == "edit" else batch_out).format(file=regular)
    out_dir = target.parent if mode == "edit" else target
    done = run(cli, mode, tiny_checkpoint, source, INSTRUCTION, out_dir, target.name if mode == "edit" else output)
    if outcome is None:
        assert_works(done, mode, Works((96, 64)), source)
    else:
        assert_refused(done, mode, outcome, item_level=False)
    assert regular.read_text() == "not a folder"


@pytest.mark.parametrize("mode", MODES)
def test_output_equal_to_the_input_is_refused(cli, tiny_checkpoint, tmp_path, mode):
    """``edit -o IN --overwrite``, or a manifest whose output is its own input inside OUT_DIR (which a resume
    would otherwise skip, and ``--overwrite`` replace)."""
    out_dir = tmp_path / "out"
    source = make_photo(out_dir / "p.png", (96, 64))
    before = _digest(source)
    done = run(cli, mode, tiny_checkpoint, source, INSTRUCTION, out_dir, "p.png", "--overwrite")
    assert done.exit_code == 5
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "is the input" in lines[0]
    assert _digest(source) == before and done.created <= {"manifest.jsonl"}


@pytest.mark.parametrize("mode", MODES)
def test_unwritable_output_folder(cli, tiny_checkpoint, tmp_path, mode):
    """Permission bits (chmod 0o500) refuse the output folder; root bypasses them, so as root this one case skips
    (the folder-is-a-file cases above cover an unwritable folder for every user)."""
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not apply (folder-is-a-file covers unwritable folders)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        source = make_photo(tmp_path / "p.png", (96, 64))
        out_dir = locked if mode == "edit" else locked / "out"
        done = run(cli, mode, tiny_checkpoint, source, INSTRUCTION, out_dir, "o.png")
        assert done.exit_code == 5 and len(error_lines(done.stderr)) == 1
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# ---- options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "args", "message"),
    [
        ("edit", ["{src}/p.png", "x", "-o", "-", "--sidecar"], "--sidecar needs an output file"),
        ("batch", ["--manifest", "{src}/m.jsonl", "--recursive", "-o", "{src}/out"], "apply to INPUT_DIR"),
        ("batch", ["--manifest", "{src}/m.jsonl", "--glob", "*.jpg", "-o", "{src}/out"], "apply to INPUT_DIR"),
    ],
)
def test_conflicting_options(cli, tiny_checkpoint, tmp_path, mode, args, message):
    make_photo(tmp_path / "p.png")
    (tmp_path / "m.jsonl").write_text('{"image": "p.png", "instruction": "x"}\n')
    result = cli(mode, *[a.replace("{src}", str(tmp_path)) for a in args], "-m", tiny_checkpoint)
    assert result.exit_code == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "p.png"]


# ---- the pixel limit and very large photos ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_pixel_limit_follows_the_environment(cli, tiny_checkpoint, tmp_path, mode):
    """A 400x300 photo (120,000 pixels) is refused under a 100,000-pixel limit and edited under 200,000."""
    source = make_photo(tmp_path / "inputs" / "p.png", (400, 300))
    low = run(cli, mode, tiny_checkpoint, source, INSTRUCTION, tmp_path / "low", "o.png", "--no-binning",
              env={"COMPACTEDIT_MAX_PIXELS": "100000"})  # fmt: skip
    assert_refused(low, mode, Fails(3, "over the limit of 100,000"), item_level=True)
    high = run(cli, mode, tiny_checkpoint, source, INSTRUCTION, tmp_path / "high", "o.png", "--no-binning",
               env={"COMPACTEDIT_MAX_PIXELS": "200000"})  # fmt: skip
    assert_works(high, mode, Works((400, 300)), source)


# Peak resident memory (VmHWM: per process image, unlike ru_maxrss, which a child inherits from pytest across
# fork and exec) of a CLI run in a fresh interpreter, beyond what importing the CLI and the engine took.
_MEASURE = """
import sys
from pathlib import Path

def peak_kb():
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])

import compactedit_cli.engine.pipeline
from compactedit_cli.cli import app

before = peak_kb()
code = 0
try:
    app(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(f"peak-growth-kb {peak_kb() - before}", file=sys.stderr)
sys.exit(code)
"""

LARGE_GROWTH_LIMIT_MB = 2048


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> Path:
    return large_photo(tmp_path_factory.mktemp("large"))


@pytest.mark.parametrize("mode", MODES)
def test_very_large_photo(tiny_checkpoint, large_jpeg, tmp_path, mode):
    """8000x6000 (48 MP, 144 MB decoded) runs in the 2048-class bin and comes back at 8000x6000.

    Measured peak RSS growth over the imported CLI and engine: about 970 MB for either command (decode, the VLM's
    resize, the VAE at 2304x1664, the resize back). The bound is about twice that: a copy too many of the full-size
    image still passes, a float32 copy of it per stage (576 MB each) does not.
    """
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak memory is read from /proc/self/status (Linux)")
    out_dir = tmp_path / "out"
    common = ["-m", str(tiny_checkpoint), *FAST]
    if mode == "edit":
        args = ["edit", str(large_jpeg), INSTRUCTION, "-o", str(out_dir / "large.jpg"), *common]
    else:
        args = ["batch", str(large_jpeg.parent), "-i", INSTRUCTION, "-o", str(out_dir), "--format", "jpg", *common]
    done = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    growth_mb = int(done.stderr.rsplit("peak-growth-kb ", 1)[1].split()[0]) / 1024
    print(f"{mode}: peak RSS growth {growth_mb:.0f} MB")
    assert growth_mb < LARGE_GROWTH_LIMIT_MB
    output = out_dir / "large.jpg"
    with Image.open(output) as image:
        assert image.size == (8000, 6000)
    assert meta_io.read(output)["model_size"] == [2304, 1664]


# ---- the model ----------------------------------------------------------------------------------------------------

SNAPSHOT = Path("models--acme--tiny-vibe") / "snapshots" / ("1" * 40)
WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


def _truncate(snapshot: Path) -> None:
    blob = (snapshot / WEIGHTS).resolve()
    blob.write_bytes(blob.read_bytes()[:-1000])


def _garble_header(snapshot: Path) -> None:
    """Random bytes over the JSON header, the file's length unchanged (a bad disk or a bad copy)."""
    blob = (snapshot / WEIGHTS).resolve()
    data = bytearray(blob.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 : 8 + header_len] = np.random.default_rng(0).integers(0, 256, header_len, dtype=np.uint8).tobytes()
    blob.write_bytes(bytes(data))


def _remove_component(snapshot: Path) -> None:
    for link in sorted((snapshot / "vae").iterdir()):
        link.unlink()
    (snapshot / "vae").rmdir()


REPAIR = "compactedit models download acme/tiny-vibe --force"
MODEL_CASES = {
    # name: (model, damage to the cached snapshot, message)
    "offline-not-cached": ("acme/absent", None, "download it with: compactedit models download acme/absent"),
    "truncated-weights": ("acme/tiny-vibe", _truncate, REPAIR),
    "corrupt-header": ("acme/tiny-vibe", _garble_header, REPAIR),
    "missing-component": ("acme/tiny-vibe", _remove_component, REPAIR),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_corpus(cli, cached_model, hf_cache, tmp_path, name, mode):
    """A cache that cannot work is found before loading (exit 4), and the error says how to repair it."""
    model, damage, message = MODEL_CASES[name]
    if damage is not None:
        damage(hf_cache / SNAPSHOT)
    source = make_photo(tmp_path / "p.png", (96, 64))
    done = run(cli, mode, model, source, INSTRUCTION, tmp_path / "out", "o.png", "--offline")
    assert_refused(done, mode, Fails(4, message), item_level=False)
