"""Usage errors are one ``error:`` line with exit 2, whoever finds them (options.py or Click's parser); with
``--json`` the same error is also a JSON object on stdout; ``-o -`` refuses a terminal; status lines go to stderr."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest
from conftest import make_photo


@pytest.fixture
def photo(tmp_path):
    return make_photo(tmp_path / "in.png")


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Usage:" not in result.stderr and "Input should" not in result.stderr  # no Click block, no pydantic
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--steps", "0"], "error: --steps must be between 1 and 1000 (got 0)"),
        (["-n", "0"], "error: --num-images must be between 1 and 64 (got 0)"),
        (["--quality", "1000"], "error: --quality must be between 1 and 100 (got 1000)"),
        (["--guidance", "nan"], "error: --guidance must be a finite number >= 0 (got nan)"),
        (["--steps", "abc"], "error: --steps must be an integer (got 'abc')"),
        (["-n", "two"], "error: --num-images must be an integer (got 'two')"),
        (["--image-guidance", "lots"], "error: --image-guidance must be a number (got 'lots')"),
        (["--stesp", "3"], "error: unknown option --stesp (did you mean --steps or --seed?)"),
        (["--seed", "-1"], "error: --seed must be between 0 and 2147483647 (got -1)"),
        (["--device", "tpu"], "error: --device must be one of auto, cpu, cuda, cuda:N, mps (got 'tpu')"),
    ],
)
def test_edit_flag_errors_are_one_line(cli, photo, tmp_path, flags, line):
    assert _one_error_line(cli("edit", photo, "x", "-o", tmp_path / "o.png", *flags)) == line


def test_an_instruction_over_the_limit_is_one_line(cli, photo, tmp_path):
    result = cli("edit", photo, "a" * 65_537, "-o", tmp_path / "o.png")
    assert _one_error_line(result) == "error: the instruction is 65,537 bytes long, over the limit of 65,536"
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--steps", "0"], "error: --steps must be between 1 and 1000 (got 0)"),
        (["--batch-size", "0"], "error: --batch-size must be between 1 and 64 (got 0)"),
        (["--quality", "1000"], "error: --quality must be between 1 and 100 (got 1000)"),
        (["--guidance", "nan"], "error: --guidance must be a finite number >= 0 (got nan)"),
        (["--recursiv"], "error: unknown option --recursiv (did you mean --recursive or --workers?)"),
    ],
)
def test_batch_flag_errors_are_one_line(cli, photo, tmp_path, flags, line):
    result = cli("batch", photo.parent, "-i", "x", "-o", tmp_path / "out", *flags)
    assert _one_error_line(result) == line


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--steps", "0"], "error: --steps must be between 1 and 1000 (got 0)"),
        (["--batch", "0"], "error: --batch must be between 1 and 64 (got 0)"),
        (["--warmup", "-1"], "error: --warmup must be between 0 and 1000 (got -1)"),
        (["--repeats", "x"], "error: --repeats must be an integer (got 'x')"),
        (["abc"], "error: RESOLUTION must be an integer (got 'abc')"),
    ],
)
def test_bench_flag_errors_are_one_line(cli, flags, line):
    assert _one_error_line(cli("bench", "--random-weights", "tiny", *flags)) == line


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["edit"], "error: missing argument IMAGE; see compactedit edit --help"),
        (["edit", "a.png", "make", "it"], "error: got unexpected extra argument(s) (it); see compactedit edit --help"),
        (["edit", "a.png", "x", "--steps"], "error: option '--steps' requires an argument"),
        (["edit", "a.png", "x", "-Z"], "error: unknown option -Z; see compactedit edit --help"),
        (["batch", "in/"], "error: missing option --output; see compactedit batch --help"),
        (["edti"], "error: unknown command 'edti' (did you mean edit?)"),
        (
            ["frob"],
            "error: unknown command 'frob' (one of: edit, batch, selftest, bench, train, models, config, serve)",
        ),
        (["models", "lst"], "error: unknown command 'lst' (did you mean list?)"),
        (["config", "sett", "device", "cpu"], "error: unknown command 'sett' (did you mean set or unset?)"),
        (["models", "list", "--jsno"], "error: unknown option --jsno (did you mean --json?)"),
        (["edit", "a.png", "x", "--replay", "nope.png"], "error: --replay: file 'nope.png' does not exist"),
    ],
)
def test_click_errors_are_one_line(cli, tmp_path, monkeypatch, args, line):
    monkeypatch.chdir(tmp_path)
    assert _one_error_line(cli(*args)) == line


def test_no_arguments_still_prints_the_help(cli):
    result = cli("models")
    assert result.exit_code == 2 and "Commands:" in result.stderr + result.stdout


def test_json_errors_from_click_and_from_commands(cli, photo, tmp_path):
    parse = cli("edit", photo, "x", "--json", "--steps", "abc")
    line = _one_error_line(parse)
    assert json.loads(parse.stdout) == {"error": {"message": line[7:], "code": 2, "type": "UsageError"}}

    checked = cli("edit", photo, "x", "--json", "--steps", "0")
    assert json.loads(checked.stdout)["error"] == {
        "message": "--steps must be between 1 and 1000 (got 0)",
        "code": 2,
        "type": "UsageError",
    }

    missing = cli("edit", tmp_path / "nope.png", "x", "-o", tmp_path / "o.png", "--json")
    assert missing.exit_code == 3
    error = json.loads(missing.stdout)["error"]
    assert error["code"] == 3 and error["type"] == "InputImageError" and "nope.png" in error["message"]

    model = cli("models", "info", "acme/not-cached", "--json")
    assert model.exit_code == 4 and json.loads(model.stdout)["error"]["type"] == "CheckpointError"


def test_without_json_stdout_stays_empty_on_errors(cli, photo):
    result = cli("edit", photo, "x", "--steps", "abc")
    assert result.exit_code == 2 and result.stdout == ""


def test_json_after_double_dash_is_not_the_flag(cli, photo):
    result = cli("edit", photo, "--steps", "abc", "--", "--json")
    assert result.exit_code == 2 and result.stdout == ""


def _run(*args: str, stdout=subprocess.PIPE, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compactedit_cli", *args], stdout=stdout, stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_one_line_errors_in_real_processes(photo, tmp_path):
    done = _run("edit", str(photo), "x", "--steps", "abc")
    assert (done.returncode, done.stderr, done.stdout) == (2, "error: --steps must be an integer (got 'abc')\n", "")
    done = _run("edit", str(photo), "x", "--stesp", "3", "--json")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert json.loads(done.stdout)["error"]["message"] == "unknown option --stesp (did you mean --steps or --seed?)"
    done = _run("bench", "--steps", "0")
    assert (done.returncode, done.stderr) == (2, "error: --steps must be between 1 and 1000 (got 0)\n")
    done = _run("frob")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown command 'frob'")


def test_stdout_onto_a_terminal_is_refused(photo, tmp_path):
    """As curl refuses: image bytes would garble the terminal. A real pseudo-terminal on stdout."""
    leader, follower = pty.openpty()
    try:
        done = _run("edit", str(photo), "x", "-o", "-", stdout=follower, timeout=120)
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 2
    assert done.stderr.startswith("error: -o - writes image bytes, and stdout is a terminal")


def test_stdout_onto_a_pipe_is_the_image(cli, tiny_checkpoint, photo):
    result = cli("edit", photo, "x", "-o", "-", "-m", tiny_checkpoint, "--steps", "1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes.startswith(b"\x89PNG")
    assert result.stderr.strip().splitlines()[-1].startswith("wrote png to stdout in ")  # status: stderr, not -q


def test_status_lines_go_to_stderr_and_quiet_drops_them(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "o.png"
    loud = cli("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, "--steps", "1", "--cuda-graphs", "--device", "cpu")
    assert loud.exit_code == 0, loud.stderr
    assert loud.stdout == f"{out}\n"
    assert loud.stderr.count("CUDA graphs skipped") == 1  # on the CPU: said once
    assert loud.stderr.strip().splitlines()[-1].startswith("done in ")
    quiet = cli("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, "--steps", "1", "--overwrite", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == f"{out}\n"
