"""``compactedit models`` against a fake hub on 127.0.0.1 (only the network is faked) and a real HF cache."""

from __future__ import annotations

import json

import pytest
from fakehub import FakeHub

REPO = "acme/tiny-vibe"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def online(monkeypatch, hf_cache):
    """Network allowed for this test (tests default to HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return hf_cache


@pytest.fixture
def hub(tiny_checkpoint, online, monkeypatch):
    with FakeHub({REPO: tiny_checkpoint}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


def test_download_list_info_remove(cli, hub, online):
    result = cli("models", "download", REPO, "-q")
    assert result.exit_code == 0, result.stderr
    snapshot = online / "models--acme--tiny-vibe" / "snapshots" / hub.commit
    assert result.stdout.strip() == str(snapshot)
    assert not any(".bin" in path for _, path, _ in hub.requests)

    listed = json.loads(cli("models", "list", "--json").stdout)
    assert [(m["repo_id"], m["commit"], m["complete"]) for m in listed] == [(REPO, hub.commit, True)]
    assert listed[0]["size_bytes"] > 1_000_000

    info = json.loads(cli("models", "info", REPO, "--json").stdout)
    transformer = info["components"]["transformer"]
    assert transformer["class"] == "vibe.transformer.vibe_sana_editing.VIBESanaEditingModel"
    assert transformer["config"]["num_meta_queries"] == 8 and transformer["dtypes"] == ["F32"]
    assert transformer["parameters"] > 10_000
    assert info["components"]["text_encoder"]["config"]["hidden_size"] == 64

    assert cli("models", "remove", REPO, "-y").exit_code == 0
    assert json.loads(cli("models", "list", "--json").stdout) == []
    assert cli("models", "remove", REPO, "-y").exit_code == 4


def test_first_edit_downloads_a_missing_model(cli, hub, online, tmp_path):
    from conftest import make_photo

    photo = make_photo(tmp_path / "p.png")
    result = cli("edit", photo, "x", "-o", tmp_path / "o.png", "-m", REPO, "--steps", "1")
    assert result.exit_code == 0, result.stderr
    assert any(WEIGHTS in path for _, path, _ in hub.requests)


def test_dropped_connection_resumes_with_a_range_request(cli, hub, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)  # so part of the file lands before the drop
    hub.drop(WEIGHTS, after=40_000)
    result = cli("models", "download", REPO, "-q")
    assert result.exit_code == 0, result.stderr
    ranges = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith(WEIGHTS)]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0
    assert json.loads(cli("models", "list", "--json").stdout)[0]["complete"] is True


def test_rerun_after_a_failed_download_fetches_only_what_is_missing(cli, hub, online):
    hub.drop(WEIGHTS, after=1000, times=100)  # the connection keeps dropping: this run gives up
    failed = cli("models", "download", REPO)
    assert failed.exit_code == 4 and "re-run" in failed.stderr
    hub.drop(WEIGHTS, after=0, times=0)
    hub.requests.clear()
    assert cli("models", "download", REPO, "-q").exit_code == 0
    fetched = sorted(
        path.split("/resolve/")[1].split("/", 1)[1]
        for method, path, _ in hub.requests
        if method == "GET" and "/resolve/" in path
    )
    assert fetched == [WEIGHTS]


def test_force_redownload_repairs_a_truncated_cache(cli, hub, online):
    assert cli("models", "download", REPO, "-q").exit_code == 0
    weights = (online / "models--acme--tiny-vibe" / "snapshots" / hub.commit / WEIGHTS).resolve()
    weights.write_bytes(weights.read_bytes()[:100])
    listed = json.loads(cli("models", "list", "--json").stdout)
    assert listed[0]["complete"] is False
    broken = cli("models", "info", REPO)
    assert broken.exit_code == 4 and "--force" in broken.stderr
    assert cli("models", "download", REPO, "--force", "-q").exit_code == 0
    assert json.loads(cli("models", "list", "--json").stdout)[0]["complete"] is True


def test_unknown_repo_is_a_model_error(cli, hub):
    result = cli("models", "download", "acme/nothing-here")
    assert result.exit_code == 4 and "acme/nothing-here" in result.stderr


@pytest.mark.parametrize("spec", ["../evil", "acme/../x", "a/b/c", "acme/x--y", "-rf"])
def test_invalid_model_ids_are_refused(cli, online, spec):
    result = cli("models", "download", spec)
    assert result.exit_code in (2, 4)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("revision", ["../main", "a b", ""])
def test_invalid_revisions_are_refused(cli, online, revision):
    result = cli("models", "download", REPO, "--revision", revision)
    assert result.exit_code == 2


def test_offline_download_of_a_missing_model_is_a_model_error(cli, hf_cache):
    result = cli("models", "download", REPO, "--offline")
    assert result.exit_code == 4 and result.stderr.count("error:") == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: model {REPO} is not in the Hugging Face cache")
    assert "offline mode forbids downloading it" in result.stderr


def test_offline_download_of_a_cached_model_verifies_it(cli, cached_model, hf_cache):
    result = cli("models", "download", cached_model, "--offline")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(hf_cache / "models--acme--tiny-vibe" / "snapshots" / ("1" * 40))
    assert "verified" in result.stderr
    assert cli("models", "download", cached_model, "--offline", "--force").exit_code == 2


def test_offline_download_finds_a_truncated_cached_model(cli, cached_model, hf_cache):
    snapshot = hf_cache / "models--acme--tiny-vibe" / "snapshots" / ("1" * 40)
    weights = (snapshot / WEIGHTS).resolve()
    weights.write_bytes(weights.read_bytes()[:100])
    result = cli("models", "download", cached_model, "--offline")
    assert result.exit_code == 4 and "--force" in result.stderr


def _cached(cli) -> list[str]:
    return [m["repo_id"] for m in json.loads(cli("models", "list", "--json").stdout)]


def test_remove_without_a_terminal_needs_yes(cli, cached_model):
    result = cli("models", "remove", cached_model)
    assert result.exit_code == 2 and "-y" in result.stderr and result.stderr.count("\n") == 1
    assert _cached(cli) == [cached_model]


@pytest.mark.parametrize(("answer", "code", "kept"), [("n", 1, True), ("", 1, True), ("y", 0, False)])
def test_remove_asks_on_a_terminal(cli, cached_model, answer, code, kept):
    """A real process with a pseudo-terminal on stdin, answering the prompt."""
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "compactedit_cli", "models", "remove", cached_model],
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(leader, f"{answer}\n".encode())
        _, err = process.communicate(timeout=120)
    finally:
        os.close(follower)
        os.close(leader)
    assert process.returncode == code, err
    assert f"remove {cached_model} (1 revision(s)," in err
    assert _cached(cli) == ([cached_model] if kept else [])


@pytest.mark.parametrize("spec", ["foo", "vibe-distiled"])
def test_info_with_an_owner_less_id_is_a_usage_error(cli, hf_cache, tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    result = cli("models", "info", spec)
    assert result.exit_code == 2 and f"unknown model {spec!r}" in result.stderr


def test_info_on_a_local_folder_named_without_a_slash(cli, tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "foo")
    monkeypatch.chdir(tmp_path)
    result = cli("models", "info", "foo", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(tmp_path / "foo")


def test_info_on_a_local_folder(cli, tiny_checkpoint):
    result = cli("models", "info", tiny_checkpoint)
    assert result.exit_code == 0, result.stderr
    assert "AutoencoderDC" in result.stderr.replace("\n", "")


def test_unreachable_hub_is_one_line(cli, online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    result = cli("models", "download", REPO)
    assert result.exit_code == 4
    last = result.stderr.strip().splitlines()[-1]  # the error is the last line, whole
    assert last.startswith("error: cannot reach the Hugging Face Hub") and "Connection refused" in last
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


def test_a_local_path_that_is_not_a_model_folder_is_named_so(cli, tiny_checkpoint, tmp_path):
    """A file is "a file, not a model folder" (not "not found"); downloading a local folder is one error line."""
    (tmp_path / "weights.bin").write_bytes(b"x")
    result = cli("models", "info", tmp_path / "weights.bin")
    assert (
        result.exit_code == 4
        and result.stderr.strip() == f"error: model {tmp_path / 'weights.bin'} is a file, not a model folder"
    )
    result = cli("models", "download", tiny_checkpoint, "--offline")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip() == f"error: {tiny_checkpoint} is a local folder; only hub models are downloaded"
