"""Faults during a run: a full disk, out of memory, Ctrl-C, SIGTERM and ``kill -9``.

Nothing is lost: outputs are complete or absent, ``results.jsonl`` always parses, and a re-run finishes the rest
with the same pixels an uninterrupted run gives.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Invoke, make_photo, single_thread
from PIL import Image

from compactedit_cli.engine.pipeline import EditPipeline
from compactedit_cli.files import imaging
from compactedit_cli.files.imaging import TEMP_PREFIX
from compactedit_cli.speed.plan import SpeedPlan

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.single_thread

FAST = ["--steps", "1", "--no-binning"]
COUNT = 20  # items in the interrupted batches: far more than finish between two polls


def results(out_dir: Path) -> list[dict]:
    """Every line of results.jsonl, each of which must parse."""
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def temporaries(out_dir: Path) -> list[Path]:
    return list(out_dir.rglob(f"{TEMP_PREFIX}*"))


def assert_complete_images(paths) -> None:
    for path in paths:
        with Image.open(path) as image:
            image.load()  # a half-written file fails here


def photos(folder: Path, count: int) -> Path:
    for index in range(count):
        make_photo(folder / f"p{index:02d}.png", (64, 64), seed=index)
    return folder


# ---- disk full ----------------------------------------------------------------------------------------------------


@pytest.fixture
def disk_fills_after(monkeypatch):
    """Fault injection at one point, ``imaging._write_all``: after ``n`` files the disk is full (ENOSPC)."""

    real = imaging._write_all

    def install(n: int) -> None:
        written = []

        def write_all(fd: int, data: bytes) -> None:
            if len(written) >= n:
                os.close(fd)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd, data)
            written.append(len(data))

        monkeypatch.setattr(imaging, "_write_all", write_all)

    return install


def test_disk_full_stops_the_batch_cleanly_and_a_rerun_finishes(cli, tiny_checkpoint, tmp_path, disk_fills_after):
    src, out = photos(tmp_path / "src", 5), tmp_path / "out"
    disk_fills_after(2)
    full = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert full.exit_code == 5
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: disk full while writing {out / 'p02.png'} (No space left on device)"]
    assert "Traceback" not in full.stderr
    assert [r["status"] for r in results(out)] == ["ok", "ok", "failed"]  # stopped: the rest never started
    assert sorted(p.name for p in out.iterdir()) == ["p00.png", "p01.png", "results.jsonl"]
    assert_complete_images([out / "p00.png", out / "p01.png"])

    disk_fills_after(1000)  # space again
    again = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert again.exit_code == 0, again.stderr
    assert [r["status"] for r in results(out)] == ["skipped", "skipped", "ok", "ok", "ok"]
    assert not temporaries(out)


def test_a_stopped_batch_with_json_prints_one_document(cli, tiny_checkpoint, tmp_path, disk_fills_after):
    """The summary so far and the error that stopped the run, together: a script reads one JSON document."""
    src, out = photos(tmp_path / "src", 3), tmp_path / "out"
    disk_fills_after(1)
    full = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST, "--json")
    assert full.exit_code == 5
    document = json.loads(full.stdout)  # one document, or this raises
    assert (document["ok"], document["failed"], document["items"]) == (1, 1, 2)
    assert document["error"]["code"] == 5 and document["error"]["type"] == "DiskFullError"
    assert document["stopped"] == document["error"]["message"] and "disk full while writing" in document["stopped"]


def test_disk_full_in_edit(cli, tiny_checkpoint, tmp_path, disk_fills_after):
    source = make_photo(tmp_path / "p.png", (64, 64))
    disk_fills_after(0)
    result = cli("edit", source, "x", "-o", tmp_path / "out" / "o.png", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 5
    assert result.stderr.startswith("error: disk full while writing") and len(result.stderr.splitlines()) == 1
    assert list((tmp_path / "out").iterdir()) == []


# ---- out of memory ------------------------------------------------------------------------------------------------

MARK = (255, 0, 255)  # the top-left pixel of the image whose edit runs out of memory


@pytest.fixture
def oom_on_marked_image(monkeypatch):
    """Fault injection at one point, ``EditPipeline.encode_image``: a CPU cannot run out of memory the way a GPU
    does, so an edit whose batch holds the marked image raises ``torch.OutOfMemoryError``, as CUDA would, after
    allocating a tensor that must be freed before the next item. Returns the weak references to those tensors."""
    held: list[weakref.ref] = []
    real = EditPipeline.encode_image

    def encode_image(self, images, height, width):
        if any(image.getpixel((0, 0)) == MARK for image in images):
            scratch = torch.empty(1_000_000)
            held.append(weakref.ref(scratch))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, images, height, width)

    monkeypatch.setattr(EditPipeline, "encode_image", encode_image)
    return held


def _marked_photo(path: Path) -> Path:
    make_photo(path, (64, 64), seed=7)
    with Image.open(path) as image:
        image = image.convert("RGB")
    image.putpixel((0, 0), MARK)
    image.save(path)
    return path


def test_out_of_memory_fails_one_item_frees_memory_and_goes_on(
    cli, tiny_checkpoint, tmp_path, oom_on_marked_image, monkeypatch
):
    src = photos(tmp_path / "src", 3)
    _marked_photo(src / "p01.png")
    freed = []
    real_free = SpeedPlan.release_memory

    def free_memory(self) -> None:
        real_free(self)
        freed.append(all(ref() is None for ref in oom_on_marked_image))

    monkeypatch.setattr(SpeedPlan, "release_memory", free_memory)
    out = tmp_path / "out"
    result = cli("batch", src, "-i", "x", "-o", out, "--batch-size", "3", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 1
    # The batch of three fails, then each item is retried alone: only the marked one fails.
    assert [r["status"] for r in results(out)] == ["ok", "failed", "ok"]
    error = results(out)[1]["error"]
    assert error.startswith("out of memory") and "--offload model" in error and "smaller resolution bin" in error
    assert any(line.startswith("warning:") and "out of memory" in line for line in result.stderr.splitlines())
    assert "Traceback" not in result.stderr
    assert freed == [True, True]  # after the batch and after the item: what the failed attempt held is gone
    assert sorted(p.name for p in out.glob("*.png")) == ["p00.png", "p02.png"]


def test_a_python_warning_during_an_edit_is_one_warning_line(cli, tiny_checkpoint, tmp_path, monkeypatch):
    """Fault injection at the denoise loop: a warning raised mid-edit (as a failed CUDA graph capture raises one)."""
    import warnings

    real = EditPipeline.denoise

    def denoise(self, *args, **kwargs):
        message = "CUDA graph capture failed, running eagerly: operation not permitted\ndetail"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EditPipeline, "denoise", denoise)
    photo = make_photo(tmp_path / "p.png", (64, 64))
    result = cli("edit", photo, "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "warning: CUDA graph capture failed, running eagerly: operation not permitted" in result.stderr.splitlines()
    assert "RuntimeWarning" not in result.stderr and "detail" not in result.stderr
    quiet = cli("edit", photo, "x", "-o", tmp_path / "q.png", "-q", "-m", tiny_checkpoint, *FAST)
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_out_of_memory_in_edit_is_one_line_with_a_hint(cli, tiny_checkpoint, tmp_path, oom_on_marked_image):
    source = _marked_photo(tmp_path / "p.png")
    result = cli("edit", source, "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: out of memory (try --offload model, a smaller --batch-size or fewer --num-images, "
        "or a smaller input (it then runs in a smaller resolution bin))"
    ]
    assert not (tmp_path / "o.png").exists()


def test_an_unexpected_error_in_one_item_does_not_end_the_batch(cli, tiny_checkpoint, tmp_path, monkeypatch):
    """Fault injection in ``EditPipeline.encode_image`` again, with an error nobody anticipated."""
    real = EditPipeline.encode_image

    def encode_image(self, images, height, width):
        if any(image.getpixel((0, 0)) == MARK for image in images):
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
        return real(self, images, height, width)

    monkeypatch.setattr(EditPipeline, "encode_image", encode_image)
    src = photos(tmp_path / "src", 2)
    _marked_photo(src / "p00.png")
    out = tmp_path / "out"
    result = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 1
    records = results(out)
    assert [r["status"] for r in records] == ["failed", "ok"]
    assert records[0]["error"] == "internal error: RuntimeError: cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"


# ---- signals ------------------------------------------------------------------------------------------------------


# The real CLI in its own process, with Ctrl-C handling on even if this process was started with SIGINT ignored
# (as a shell starts background jobs; Python then installs no handler of its own).
_MAIN = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('compactedit_cli', run_name='__main__')"
)


def _start_batch(src: Path, out: Path, checkpoint: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", _MAIN, "batch", str(src), "-i", "x", "-o", str(out), "-m", str(checkpoint), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as single_thread()
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _interrupt_after_two_items(process: subprocess.Popen, out: Path, signum: int) -> tuple[int, str]:
    log = out / "results.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_bytes().count(b"\n") >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the batch never got going"
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """The photos and an uninterrupted batch over them: the pixels every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("signals")
    src, out = photos(root / "src", COUNT), root / "reference"
    with single_thread():
        result = Invoke()("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    return src, out


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_and_a_rerun_resumes(cli, tiny_checkpoint, uninterrupted, tmp_path, signum, code):
    src, reference = uninterrupted
    out = tmp_path / "out"
    returncode, stderr = _interrupt_after_two_items(_start_batch(src, out, tiny_checkpoint), out, signum)
    assert returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == ("error: interrupted" if code == 130 else "error: terminated")
    assert not temporaries(out)
    done = sorted(out.glob("*.png"))
    assert 2 <= len(done) < COUNT
    assert_complete_images(done)
    assert {Path(r["output"]).name for r in results(out) if r["status"] == "ok"} <= {p.name for p in done}

    again = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert again.exit_code == 0, again.stderr
    statuses = [r["status"] for r in results(out)]
    assert len(statuses) == COUNT
    assert statuses.count("skipped") == len(done) and statuses.count("ok") == COUNT - len(done)
    for name in sorted(p.name for p in reference.glob("*.png")):
        resumed = np.asarray(Image.open(out / name), dtype=np.int16)
        whole = np.asarray(Image.open(reference / name), dtype=np.int16)
        assert np.abs(resumed - whole).max() <= 1, name


def test_kill_9_leaves_nothing_half_written(cli, tiny_checkpoint, uninterrupted, tmp_path):
    """SIGKILL allows no cleanup: outputs must already be whole (written aside, then renamed). Where the kill falls
    is luck, so the two things it can leave inside a write are added by hand: a temporary file (killed before the
    rename) and a torn last line of results.jsonl (killed mid-append). The re-run removes and repairs them."""
    src, _ = uninterrupted
    out = tmp_path / "out"
    returncode, _ = _interrupt_after_two_items(_start_batch(src, out, tiny_checkpoint), out, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    done = list(out.glob("*.png"))
    assert_complete_images(done)
    (out / f"{TEMP_PREFIX}p99.png.part").write_bytes(b"\x89PNG half")
    with (out / "results.jsonl").open("a", encoding="utf-8") as log:
        log.write('{"input": "p98.png", "output": "p98')

    again = cli("batch", src, "-i", "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert again.exit_code == 0, again.stderr
    assert "removed 1 temporary file(s)" in again.stderr
    assert not temporaries(out)
    records = results(out)
    assert len(records) == COUNT and {r["status"] for r in records} == {"ok", "skipped"}
    assert_complete_images(out.glob("*.png"))
