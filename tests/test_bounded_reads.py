"""Reads are bounded: a header is checked before its body is read, and no input is read past the byte limit.

The CLI runs in a fresh interpreter (``python -c``) that reports its peak resident memory (VmHWM) and whether torch
was imported, so each refusal is shown to come at once, in bounded memory, and before the model loads.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from corpus import IMAGE_CASES, bomb_png, encoded, fifo, noise, png_chunk, png_head, ztxt_bomb

from compactedit_cli.errors import InputImageError
from compactedit_cli.files.imaging import max_bytes_limit, open_image

LINUX = Path("/proc/self/status").is_file()
needs_proc = pytest.mark.skipif(not LINUX, reason="peak memory is read from /proc/self/status (Linux)")

_PEAK = """
import atexit
import sys
from pathlib import Path

def report():
    peak = Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]
    print(f"peak-kb {peak} torch {'torch' in sys.modules}", file=sys.stderr)

atexit.register(report)
if sys.argv[1] == "--cap":  # edit never loads torch before its input is checked; a regression fails, not swaps
    import resource
    cap = int(sys.argv.pop(2))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.argv.pop(1)
from compactedit_cli.cli import main
main()
"""

EDIT_CAP = 4 * 1024**3  # address-space cap for edit runs: far above a bounded read, far below an unbounded one
TIMEOUT = 60


class Measured:
    """One CLI run: exit code, stderr, peak memory (MB), whether torch was imported, wall time."""

    def __init__(self, done: subprocess.CompletedProcess, seconds: float) -> None:
        self.code = done.returncode
        self.stderr = done.stderr.decode(errors="replace")
        report = self.stderr.rsplit("peak-kb ", 1)[1].split()
        self.peak_mb = int(report[0]) / 1024
        self.torch = report[2] == "True"
        self.seconds = seconds

    def error(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in self.stderr and len(lines) == 1, self.stderr
        return lines[0]


def _command(args: list) -> list[str]:
    cap = ["--cap", str(EDIT_CAP)] if args[0] == "edit" else []
    return [sys.executable, "-c", _PEAK, *cap, *map(str, args)]


def measured(args: list, *, stdin=None, env: dict | None = None) -> Measured:
    started = time.perf_counter()
    done = subprocess.run(
        _command(args), stdin=stdin, capture_output=True, timeout=TIMEOUT, env={**os.environ, **(env or {})}
    )
    return Measured(done, time.perf_counter() - started)


def _offer(head: bytes, block: bytes, most: int, env: dict, args: list, log: Path) -> tuple[Measured, int]:
    """Run ``args`` with ``head`` and then ``block`` after ``block`` (up to ``most`` bytes) written to its stdin;
    also return how many bytes were written before it closed the pipe. Its stderr goes to ``log``."""
    started = time.perf_counter()
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            _command(args), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **env}
        )
    written = 0
    try:
        with contextlib.suppress(BrokenPipeError):  # the process stopped reading: what the test is about
            process.stdin.write(head)
            written += len(head)
            while written < most:
                process.stdin.write(block)
                written += len(block)
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        process.wait(timeout=TIMEOUT)
    finally:
        process.kill()
    done = subprocess.CompletedProcess(process.args, process.returncode, None, log.read_bytes())
    return Measured(done, time.perf_counter() - started), written


def _endless_png() -> tuple[bytes, bytes]:
    """A 2000x2000 16-bit RGBA header (32 MB of pixel data) and an IDAT that never ends: stored (level 0) deflate
    blocks of zeros, valid as far as they go, so only the byte limit stops the read."""
    deflate = zlib.compressobj(0)
    first = deflate.compress(bytes(65536)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    block = deflate.compress(bytes(65536)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    return png_head((2000, 2000), 16, 6) + struct.pack(">I", 2**31 - 1) + b"IDAT" + first, block


# ---- stdin --------------------------------------------------------------------------------------------------------


@needs_proc
def test_dev_zero_on_stdin_is_refused_at_once(tiny_checkpoint, tmp_path):
    """``compactedit edit - x -o o.png < /dev/zero`` used to read for ever; zeros are no image format."""
    with Path("/dev/zero").open("rb") as zeros:
        run = measured(["edit", "-", "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint], stdin=zeros)
    print(f"/dev/zero: {run.seconds:.2f}s, peak {run.peak_mb:.0f} MB")
    assert run.code == 3 and "<stdin> is not a recognised image file" in run.error()
    assert run.seconds < 30 and run.peak_mb < 300 and not run.torch
    assert not (tmp_path / "o.png").exists()


@needs_proc
@pytest.mark.parametrize("name", ["text", "endless-png-body"])
def test_a_stream_is_read_only_as_far_as_needed(tiny_checkpoint, tmp_path, name):
    """A stream that is not an image is refused after its first chunk; one whose header is fine but whose body goes
    on is refused at the byte limit (set here to 2 MB). Either way it is offered 64 MiB and takes a little."""
    limit = 2_000_000
    head, block = (b"", b"y\n" * 32768) if name == "text" else _endless_png()
    args = ["edit", "-", "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint]
    run, written = _offer(head, block, 64 * 1024**2, {"COMPACTEDIT_MAX_BYTES": str(limit)}, args, tmp_path / "log")
    print(f"{name}: took {written:,} bytes in {run.seconds:.2f}s, peak {run.peak_mb:.0f} MB")
    message = "is not a recognised image file" if name == "text" else "<stdin> is over the limit of 2,000,000 bytes"
    assert run.code == 3 and message in run.error()
    assert not run.torch and run.peak_mb < 300
    slack = 4 * 1024**2  # what the pipe and the writer hold
    if name == "text":
        assert written < slack
    else:  # it was read up to the limit, and no further
        assert limit < written < limit + slack


def test_header_is_checked_before_the_body_is_read():
    """A 50000x50000 header followed by 32 MiB: refused by the pixel limit after one 64 KiB read."""

    class Counted(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data, self.taken = data, 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            chunk = self.data[self.taken : self.taken + len(buffer)]
            buffer[: len(chunk)] = chunk
            self.taken += len(chunk)
            return len(chunk)

    stream = Counted(png_head((50_000, 50_000)) + png_chunk(b"IDAT", bytes(32 * 1024**2)))
    with pytest.raises(InputImageError, match=r"50000x50000 \(2,500,000,000 pixels\), over the limit"):
        open_image(io.BufferedReader(stream, buffer_size=4096))
    assert stream.taken <= 64 * 1024 + 4096


# ---- files --------------------------------------------------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize("mode", ["edit", "batch"])
def test_a_large_file_that_is_no_image_is_not_read(tiny_checkpoint, tmp_path, mode):
    """1.5 GiB of zeros (sparse, under a 4 GiB byte limit) named ``.png``: refused from its first bytes, so peak
    memory stays far below the file's size (reading it whole would take at least 1.5 GiB)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with (inputs / "zeros.png").open("wb") as handle:
        handle.truncate(1536 * 1024**2)
    env = {"COMPACTEDIT_MAX_BYTES": str(4 * 1024**3)}
    out = tmp_path / "out"
    if mode == "edit":
        args = ["edit", inputs / "zeros.png", "x", "-o", out / "o.png"]
    else:
        args = ["batch", inputs, "-i", "x", "-o", out]
    run = measured([*args, "-m", tiny_checkpoint, "--steps", "1"], env=env)
    print(f"{mode}: {run.seconds:.2f}s, peak {run.peak_mb:.0f} MB")
    assert "zeros.png is not a recognised image file" in run.stderr
    assert run.code == (3 if mode == "edit" else 1)
    assert run.peak_mb < 1024
    assert not list(out.glob("*.png"))


def _padded_png(path: Path, size: int) -> Path:
    """A small valid PNG followed by zeros up to ``size`` bytes (sparse: no disk used); Pillow stops at IEND."""
    path.write_bytes(encoded(noise((16, 16)), "PNG"))
    with path.open("r+b") as handle:
        handle.truncate(size)
    return path


def test_byte_limit_follows_the_pixel_limit(tmp_path, monkeypatch):
    """The same 80 MiB file opens under the default limits, is refused by its size when the pixel limit is lowered
    to 1,000 (and the byte limit with it), and opens again when the byte limit is raised on its own."""
    path = _padded_png(tmp_path / "padded.png", 80 * 1024**2)
    assert open_image(path).size == (16, 16)
    monkeypatch.setenv("COMPACTEDIT_MAX_PIXELS", "1000")
    assert max_bytes_limit() < 80 * 1024**2
    with pytest.raises(InputImageError, match=r"padded.png is 83,886,080 bytes, over the limit of .* bytes"):
        open_image(path)
    monkeypatch.setenv("COMPACTEDIT_MAX_BYTES", str(100 * 1024**2))
    assert open_image(path).size == (16, 16)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1e6"])
def test_bad_byte_limit_setting_is_a_usage_error(cli, tiny_checkpoint, tmp_path, value):
    photo = _padded_png(tmp_path / "p.png", 4096)
    result = cli("edit", photo, "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint,
                 env={"COMPACTEDIT_MAX_BYTES": value})  # fmt: skip
    assert result.exit_code == 2 and "COMPACTEDIT_MAX_BYTES" in result.stderr
    assert not (tmp_path / "o.png").exists()


# ---- --replay -----------------------------------------------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize(
    "case", [case for case in IMAGE_CASES if case.make in (fifo, bomb_png, ztxt_bomb)], ids=lambda case: case.name
)
def test_a_file_to_replay_is_read_as_an_image_is(tiny_checkpoint, tmp_path, case):
    """``--replay`` reads a file as untrusted as the one to edit, under the same rules: a FIFO is refused at once
    (it used to wait for a writer for ever), a bomb header by the pixel limit (it was an internal error)."""
    photo = tmp_path / "p.png"
    photo.write_bytes(encoded(noise((16, 16)), "PNG"))
    out = tmp_path / "o.png"
    run = measured(["edit", photo, "x", "--replay", case.make(tmp_path / "replay"), "-o", out, "-m", tiny_checkpoint])
    assert run.code == 3 and case.outcome.message in run.error()
    assert not run.torch and not out.exists()
