"""LoRA training and --lora on the tiny checkpoint: the loss falls, the adapter moves edits toward the targets, a
resumed run equals an uninterrupted one, scale 0 is the base, adapters stack, and misfits are refused (exit 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import single_thread
from PIL import Image

from compactedit_cli.loading.lora import PREFIX, apply_loras, read_adapter
from compactedit_cli.options import ModelOptions
from compactedit_cli.training.config import TrainOptions, checkpoint_path
from compactedit_cli.training.data import load_pairs
from compactedit_cli.training.trainer import train

FAST = {"rank": 4, "lr": 1e-2, "seed": 0, "batch_size": 2, "gradient_checkpointing": False}


def tint_set(root: Path, count: int = 4) -> Path:
    """Noise photos and their red-tinted targets (the red channel at full), as a JSONL manifest."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"s{i}.png")
        pixels[..., 0] = 255
        Image.fromarray(pixels).save(root / f"t{i}.png")
        lines.append(json.dumps({"source": f"s{i}.png", "target": f"t{i}.png", "instruction": "make it red"}))
    manifest = root / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    """One adapter trained for 40 steps (a few seconds), shared by the tests that read it."""
    root = tmp_path_factory.mktemp("lora")
    pairs = load_pairs(tint_set(root))
    with single_thread():
        result = train(
            ModelOptions(model=str(tiny_checkpoint), device="cpu"),
            pairs,
            root / "a.safetensors",
            TrainOptions(steps=40, **FAST),
        )
    return root, pairs, result


def _fresh_pipe(checkpoint: Path):
    from compactedit_cli.engine.pipeline import EditPipeline

    return EditPipeline.from_pretrained(checkpoint, device="cpu", dtype=torch.float32)


def test_loss_falls_and_the_adapter_moves_edits_toward_the_targets(trained, tiny_checkpoint):
    root, pairs, result = trained
    early, late = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert late < 0.6 * early, (early, late)

    def distance(pipe) -> float:
        """Mean squared distance of the edits' final latents to the targets' (what the DiT is trained to reach;
        the tiny VAE's random decoder would only blur the comparison)."""
        total = 0.0
        for pair in pairs:
            final = pipe(pair.source, pair.instruction, num_inference_steps=8, seed=1, output_type="latent").latents
            target = pipe.encode_image([pair.target.rgb], *(side * pipe.vae_scale_factor for side in final.shape[2:]))
            total += float(torch.mean((final - target) ** 2))
        return total / len(pairs)

    with single_thread():
        base = distance(_fresh_pipe(tiny_checkpoint))
        adapted_pipe = _fresh_pipe(tiny_checkpoint)
        apply_loras(adapted_pipe.transformer, [(str(root / "a.safetensors"), 1.0)])
        adapted = distance(adapted_pipe)
    assert adapted < 0.8 * base, (base, adapted)


def test_adapter_file_is_what_diffusers_and_peft_read(trained, tiny_checkpoint):
    """Names and header as diffusers' Sana loader reads them; diffusers' own load gives the fused model's output."""
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
    from safetensors import safe_open

    root, _, _ = trained
    path = root / "a.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        names = list(handle.keys())
    assert f"{PREFIX}transformer_blocks.0.attn1.to_q.lora_A.weight" in names
    assert f"{PREFIX}transformer_blocks.1.ff.conv_point.lora_B.weight" in names
    info = json.loads(header["compactedit.adapter"])
    assert (info["rank"], info["alpha"], info["base_model"]) == (4, 4.0, tiny_checkpoint.name)
    assert "to_out.0" in info["target_modules"] and "base_revision" in info
    assert not any("edit_head" in n for n in names)

    state, metadata = SanaLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    adapter = read_adapter(path)
    assert set(state) == {f"{PREFIX}{m}.lora_{x}.weight" for m in adapter.pairs for x in "AB"}
    from compactedit_cli.random_weights.reference import load_reference

    theirs, ours = load_reference(tiny_checkpoint / "transformer"), _fresh_pipe(tiny_checkpoint).transformer
    theirs.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    theirs.fuse_lora()
    apply_loras(ours, [(str(path), 1.0)])
    ours_modules = dict(ours.named_modules())
    for name, layer in theirs.named_modules():
        if name in adapter.pairs:
            assert torch.equal(layer.base_layer.weight, ours_modules[name].weight), name


def test_resume_continues_exactly(tiny_checkpoint, tmp_path, one_thread):
    pairs = load_pairs(tint_set(tmp_path, 3))
    model = ModelOptions(model=str(tiny_checkpoint), device="cpu")
    whole = train(model, pairs, tmp_path / "whole.safetensors", TrainOptions(steps=6, **FAST))
    train(model, pairs, tmp_path / "half.safetensors", TrainOptions(steps=3, **FAST))
    rest = train(
        model,
        pairs,
        tmp_path / "rest.safetensors",
        TrainOptions(steps=6, **FAST),
        resume=checkpoint_path(tmp_path / "half.safetensors"),
    )
    assert rest.steps == 6 and len(rest.losses) == 3
    assert rest.losses == whole.losses[3:]
    a, b = read_adapter(tmp_path / "whole.safetensors"), read_adapter(tmp_path / "rest.safetensors")
    assert all(torch.equal(a.pairs[m][i], b.pairs[m][i]) for m in a.pairs for i in (0, 1))


def _edit(cli, source: Path, out: Path, checkpoint: Path, *extra: str):
    return cli("edit", source, "make it red", "-o", out, "-m", checkpoint, "--device", "cpu", "--steps", "2", *extra)


def test_scale_zero_is_the_base_and_the_scale_is_recorded(trained, tiny_checkpoint, cli, tmp_path):
    root, _, _ = trained
    adapter = root / "a.safetensors"
    assert _edit(cli, root / "s0.png", tmp_path / "base.png", tiny_checkpoint).exit_code == 0
    result = _edit(cli, root / "s0.png", tmp_path / "zero.png", tiny_checkpoint, "--lora", f"{adapter}:0")
    assert result.exit_code == 0, result.stderr
    assert _edit(cli, root / "s0.png", tmp_path / "one.png", tiny_checkpoint, "--lora", str(adapter)).exit_code == 0
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("base", "zero", "one")}
    assert np.array_equal(pixels["base"], pixels["zero"])
    assert not np.array_equal(pixels["base"], pixels["one"])
    from compactedit_cli.files import metadata

    assert metadata.read(tmp_path / "zero.png")["loras"] == [["a.safetensors", 0.0]]  # a file's name, no path


def test_a_manifest_lora_column_edits_each_line_with_its_adapters(trained, tiny_checkpoint, cli, tmp_path):
    """Lines with their own adapters are edited by a model with those fused; the others by the run's."""
    import json
    import shutil

    root, _, _ = trained
    shutil.copy(root / "a.safetensors", tmp_path / "a.safetensors")
    shutil.copy(root / "s0.png", tmp_path / "s0.png")
    lines = [
        {"image": "s0.png", "instruction": "make it red", "output": "plain.png"},
        {"image": "s0.png", "instruction": "make it red", "output": "adapted.png", "lora": "a.safetensors:0.5"},
        {"image": "s0.png", "instruction": "make it red", "output": "off.png", "lora": "none"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = cli("batch", "--manifest", manifest, "-o", tmp_path / "out", "-m", tiny_checkpoint, "--device", "cpu",
              "--steps", "2", "--lora", f"{tmp_path / 'a.safetensors'}:1")  # fmt: skip
    assert run.exit_code == 0, run.stderr
    for name, extra in [("plain", ["--lora", f"{root / 'a.safetensors'}:1"]),
                        ("adapted", ["--lora", f"{root / 'a.safetensors'}:0.5"]), ("off", [])]:  # fmt: skip
        assert _edit(cli, root / "s0.png", tmp_path / f"{name}-edit.png", tiny_checkpoint, *extra).exit_code == 0
        batched = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert np.array_equal(batched, np.asarray(Image.open(tmp_path / f"{name}-edit.png"))), name
    from compactedit_cli.files import metadata

    assert metadata.read(tmp_path / "out" / "adapted.png")["loras"] == [["a.safetensors", 0.5]]
    assert metadata.read(tmp_path / "out" / "off.png")["loras"] == []


def test_two_adapters_stack(trained, tiny_checkpoint, tmp_path):
    """Two adapters fused together change each weight by the sum of their scaled deltas."""
    from safetensors.torch import save_file

    from compactedit_cli.loading.lora import adapter_metadata, lora_delta

    root, _, _ = trained
    first = read_adapter(root / "a.safetensors")
    second = tmp_path / "b.safetensors"
    tensors = {
        f"{PREFIX}{m}.lora_{x}.weight": t.flip(0)
        for m, (a, b) in first.pairs.items()
        for x, t in zip("AB", (a, b.flip(1)), strict=True)
    }
    save_file(tensors, str(second), metadata=adapter_metadata(4, 8.0, first.target_modules, {}))
    base = _fresh_pipe(tiny_checkpoint).transformer
    stacked = _fresh_pipe(tiny_checkpoint).transformer
    apply_loras(stacked, [(str(root / "a.safetensors"), 0.5), (str(second), -1.0)])
    other = read_adapter(second)
    modules = dict(base.named_modules())
    stacked_modules = dict(stacked.named_modules())
    for module, (down, up) in first.pairs.items():
        expected = modules[module].weight + 0.5 * lora_delta(down, up) - 2.0 * lora_delta(*other.pairs[module])
        torch.testing.assert_close(stacked_modules[module].weight, expected, rtol=1e-5, atol=1e-6)


def test_mismatched_adapters_are_refused_naming_the_tensor(trained, tiny_checkpoint, cli, tmp_path):
    from safetensors.torch import save_file

    root, _, _ = trained
    name = f"{PREFIX}transformer_blocks.0.attn1.to_q.lora_A.weight"
    wrong_shape = tmp_path / "shape.safetensors"
    save_file({name: torch.zeros(4, 99), name.replace("lora_A", "lora_B"): torch.zeros(16, 4)}, str(wrong_shape))
    result = _edit(cli, root / "s0.png", tmp_path / "x.png", tiny_checkpoint, "--lora", str(wrong_shape))
    assert result.exit_code == 4 and name in result.stderr and "Traceback" not in result.stderr
    other_base = tmp_path / "other.safetensors"
    missing = f"{PREFIX}transformer_blocks.7.attn1.to_q.lora_A.weight"
    save_file({missing: torch.zeros(4, 16), missing.replace("lora_A", "lora_B"): torch.zeros(16, 4)}, str(other_base))
    result = _edit(cli, root / "s0.png", tmp_path / "y.png", tiny_checkpoint, "--lora", str(other_base))
    assert result.exit_code == 4 and missing in result.stderr
    not_lora = tmp_path / "plain.safetensors"
    save_file({"transformer.proj_out.weight": torch.zeros(2, 2)}, str(not_lora))
    assert _edit(cli, root / "s0.png", tmp_path / "z.png", tiny_checkpoint, "--lora", str(not_lora)).exit_code == 4
    assert not any(tmp_path.glob("[xyz].png"))


def test_hub_adapter_resolves_through_the_cache(trained, cached_model, hf_cache, cli, tmp_path):
    from compactedit_cli.random_weights.tiny import install_in_hf_cache

    root, _, _ = trained
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes((root / "a.safetensors").read_bytes())
    install_in_hf_cache(folder, hf_cache, "acme/style-lora", "2" * 40)
    result = cli(
        "edit",
        root / "s0.png",
        "make it red",
        "-o",
        tmp_path / "h.png",
        "-m",
        cached_model,
        "--device",
        "cpu",
        "--steps",
        "2",
        "--offline",
        "--lora",
        "acme/style-lora/style.safetensors:0.7",
    )
    assert result.exit_code == 0, result.stderr
    from compactedit_cli.files import metadata

    recorded = metadata.read(tmp_path / "h.png")
    assert recorded["loras"] == [["acme/style-lora/style.safetensors", 0.7]]
    assert metadata.replayable(recorded)[0]["loras"] == recorded["loras"]
    missing = cli(
        "edit",
        root / "s0.png",
        "x",
        "-o",
        tmp_path / "m.png",
        "-m",
        cached_model,
        "--offline",
        "--lora",
        "acme/style-lora/nope.safetensors",
    )
    assert missing.exit_code == 4


def test_bad_pairs_get_clean_errors(tiny_checkpoint, cli, tmp_path):
    manifest = tint_set(tmp_path, 2)
    lines = manifest.read_text().splitlines()

    def run(text: str):
        manifest.write_text(text)
        return cli("train", manifest, "-o", tmp_path / "a.safetensors", "-m", tiny_checkpoint, "--steps", "1")

    result = run(lines[0] + "\n" + lines[1].replace("t1.png", "gone.png"))
    assert result.exit_code == 3 and "pairs.jsonl:2" in result.stderr and "gone.png" in result.stderr
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    result = run(lines[0] + "\n" + lines[1].replace("t1.png", "small.png"))
    assert result.exit_code == 3 and "pairs.jsonl:2" in result.stderr and "10x10" in result.stderr
    result = run(lines[0].replace("make it red", "  "))
    assert result.exit_code == 2 and "pairs.jsonl:1" in result.stderr and "empty" in result.stderr
    folder = tmp_path / "set"
    (folder / "target").mkdir(parents=True)
    (folder / "control").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "target" / "a.png")
    result = cli("train", folder, "-o", tmp_path / "b.safetensors", "-m", tiny_checkpoint)
    assert result.exit_code == 2 and "a.txt" in result.stderr
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_train_cli_json_summary_and_validation(tiny_checkpoint, cli, tmp_path):
    manifest = tint_set(tmp_path, 2)
    out = tmp_path / "cli.safetensors"
    result = cli(
        "train",
        manifest,
        "-o",
        out,
        "-m",
        tiny_checkpoint,
        "--device",
        "cpu",
        "--steps",
        "2",
        "--rank",
        "2",
        "--validate-every",
        "2",
        "--validation-dir",
        tmp_path / "val",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["adapter"] == str(out)
    assert isinstance(summary["first_loss"], float) and summary["seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "val" / "step-000002").iterdir()) == ["t0.png", "t1.png"]
    assert read_adapter(out).rank == 2


def test_an_adapter_that_cannot_be_written_is_refused_before_training(tiny_checkpoint, cli, tmp_path):
    """Its folder is checked, as an edit's is, before the model loads (it used to fail only at the save, after the
    training, with an internal error)."""
    manifest = tint_set(tmp_path, 2)
    (tmp_path / "a-file").write_text("not a folder")
    result = cli("train", manifest, "-o", tmp_path / "a-file" / "x.safetensors", "-m", tiny_checkpoint, "--steps", "1")
    assert result.exit_code == 5, result.stderr
    assert result.stderr.strip() == f"error: the output folder {tmp_path / 'a-file'} is a file, not a folder"
    (tmp_path / "a.safetensors").write_bytes(b"kept")
    result = cli("train", manifest, "-o", tmp_path / "a.safetensors", "-m", tiny_checkpoint, "--steps", "1")
    assert result.exit_code == 5 and "already exists (use --overwrite to replace it)" in result.stderr
    assert (tmp_path / "a.safetensors").read_bytes() == b"kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_train_outputs_are_checked_before_any_work(tiny_checkpoint, cli, tmp_path):
    """A bad output path is exit 5 at once (not an internal error after the whole run), and nothing is clobbered:
    not the checkpoint beside the adapter, not the manifest, not a file where validation edits would go."""
    manifest = tint_set(tmp_path, 2)

    def run(data: Path, out: Path, *extra: str):
        result = cli("train", data, "-o", out, "-m", tiny_checkpoint, "--device", "cpu", "--steps", "1", *extra)
        assert result.exit_code == 5 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "internal" not in result.stderr
        return result

    assert "s0.png" in run(manifest, tmp_path / "s0.png" / "a.safetensors").stderr
    (tmp_path / "dir.safetensors").mkdir()
    assert "directory" in run(manifest, tmp_path / "dir.safetensors", "--overwrite").stderr
    (tmp_path / "b.checkpoint.safetensors").write_bytes(b"an earlier run's state")
    assert "b.checkpoint.safetensors" in run(manifest, tmp_path / "b.safetensors").stderr
    assert (tmp_path / "b.checkpoint.safetensors").read_bytes() == b"an earlier run's state"
    named = tmp_path / "pairs.safetensors"
    named.write_bytes(manifest.read_bytes())
    assert "input" in run(named, named, "--overwrite").stderr
    assert named.read_bytes() == manifest.read_bytes()
    assert "s1.png" in run(manifest, tmp_path / "c.safetensors", "--validate-every", "1",
                           "--validation-dir", tmp_path / "s1.png").stderr  # fmt: skip
    assert not any((tmp_path / f"{name}.safetensors").exists() for name in "abc")


def test_an_instruction_file_that_is_not_text_is_a_usage_error(tiny_checkpoint, cli, tmp_path):
    """A dataset folder's caption that is not UTF-8 is exit 2 naming the file, not an internal error."""
    folder = tmp_path / "set"
    for side in ("target", "control"):
        (folder / side).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(folder / side / "a.png")
    (folder / "target" / "a.txt").write_bytes(b"\xff\xfe\x00make it red")
    result = cli("train", folder, "-o", tmp_path / "a.safetensors", "-m", tiny_checkpoint, "--device", "cpu")
    assert result.exit_code == 2 and "a.txt" in result.stderr and "UTF-8" in result.stderr, result.stderr
    assert "internal" not in result.stderr and not (tmp_path / "a.safetensors").exists()


def test_a_write_that_fails_after_training_is_an_output_error(tiny_checkpoint, tmp_path):
    """A file-size limit (as a full disk or quota would) refuses the checkpoint's write: exit 5, one line naming the
    file, and nothing left in the output folder (no partial file)."""
    resource = pytest.importorskip("resource")
    import os
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    manifest = tint_set(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "compactedit_cli", "train", str(manifest), "-o", str(out / "a.safetensors"),
               "-m", str(tiny_checkpoint), "--device", "cpu", "--steps", "1", "--rank", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit, env=env, timeout=300)
    assert run.returncode == 5, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: cannot write") and "Traceback" not in run.stderr
    assert "a.checkpoint.safetensors" in run.stderr and list(out.iterdir()) == []


def test_resuming_its_own_checkpoint_continues_the_run(tiny_checkpoint, cli, tmp_path):
    """The --help example: continuing ADAPTER.checkpoint.safetensors replaces that run's files without --overwrite."""
    manifest = tint_set(tmp_path, 2)
    out = tmp_path / "a.safetensors"
    common = ("-m", tiny_checkpoint, "--device", "cpu", "--rank", "2", "--json")
    assert cli("train", manifest, "-o", out, "--steps", "1", *common).exit_code == 0
    result = cli("train", manifest, "-o", out, "--steps", "2", "--resume", checkpoint_path(out), *common)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2 and read_adapter(out).rank == 2
    other = tmp_path / "b.safetensors"
    other.write_bytes(b"kept")  # another adapter is still not replaced by a resumed run
    result = cli("train", manifest, "-o", other, "--steps", "3", "--resume", checkpoint_path(out), *common)
    assert result.exit_code == 5 and other.read_bytes() == b"kept", result.stderr


def test_a_wrong_resume_is_refused_before_the_model_loads(tiny_checkpoint, cli, tmp_path):
    """A checkpoint of other settings, or one whose record is malformed, is named at once: with a model that does
    not exist, the checkpoint's error still comes first, so the model never loaded."""
    from safetensors.torch import save_file

    manifest = tint_set(tmp_path, 2)
    out = tmp_path / "a.safetensors"
    assert cli("train", manifest, "-o", out, "--steps", "1", "--rank", "2", "-m", tiny_checkpoint).exit_code == 0

    def resume(checkpoint: Path, *extra: str):
        result = cli("train", manifest, "-o", tmp_path / "b.safetensors", "--resume", checkpoint,
                     "-m", tmp_path / "no-such-model", "--device", "cpu", *extra)  # fmt: skip
        assert "Traceback" not in result.stderr and "internal" not in result.stderr, result.stderr
        return result

    result = resume(checkpoint_path(out), "--rank", "4", "--steps", "2")
    assert result.exit_code == 2 and "trained with rank 2, not 4" in result.stderr, result.stderr
    result = resume(checkpoint_path(out), "--rank", "2", "--steps", "1")
    assert result.exit_code == 2 and "at step 1 already" in result.stderr, result.stderr
    for record in ('{"step": 1}', '{"step": "1", "settings": {}}', "[1]", '{"step": -1, "settings": {}}'):
        bad = tmp_path / "bad.safetensors"
        save_file({"x": torch.zeros(1)}, str(bad), metadata={"compactedit.checkpoint": record})
        result = resume(bad, "--rank", "2", "--steps", "2")
        assert result.exit_code == 4 and "not a compactedit training checkpoint" in result.stderr, (record, result)


def test_alpha_must_be_above_zero(cli, tmp_path):
    result = cli("train", tint_set(tmp_path, 1), "-o", tmp_path / "a.safetensors", "--alpha", "0")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --alpha must be a number above 0 (got 0.0)", result.stderr
