"""``compactedit edit`` through the real CLI, on a tiny checkpoint."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_photo
from PIL import Image

from compactedit_cli.files import metadata as meta_io

FAST = ["--steps", "2"]


@pytest.fixture
def photo(tmp_path):
    return make_photo(tmp_path / "in.jpg")


def test_edit_writes_same_size_output(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "out.png"
    result = cli("edit", photo, "make the sky blue", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    with Image.open(out) as image:
        assert image.size == (100, 75) and image.mode == "RGB"


def test_default_output_name(cli, tiny_checkpoint, photo):
    result = cli("edit", photo, "x", "-m", tiny_checkpoint, *FAST, "-q")
    assert result.exit_code == 0, result.stderr
    assert (photo.parent / "in_edited.png").is_file()
    assert result.stderr == ""


def test_json_describes_the_result(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "out.webp"
    result = cli("edit", photo, "add a hat", "-o", out, "-m", tiny_checkpoint, *FAST, "--json", "--seed", "7")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["outputs"] == [str(out)]
    assert report["seed"] == 7 and report["steps"] == 2 and report["instruction"] == "add a hat"
    assert report["size"] == [100, 75] and report["model_size"] == [576, 416]  # [width, height] of the 0.72 bin
    assert report["guidance_scale"] == 4.5 and report["image_guidance_scale"] == 1.2


def test_several_images_get_numbered_names(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "many.png"
    result = cli("edit", photo, "x", "-o", out, "-n", "2", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    first, second = tmp_path / "many-1.png", tmp_path / "many-2.png"
    assert result.stdout.split() == [str(first), str(second)]
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_random_seed_is_printed_and_recorded(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "r.png"
    result = cli("edit", photo, "x", "-o", out, "--seed", "random", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    seed = meta_io.read(out)["seed"]
    assert f"seed: {seed}" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{tmp}/o.png", "--format", "jpg"], "conflicts"),
        (["-o", "{tmp}/o.tiff"], "unknown output extension"),
        (["-o", "{tmp}/o.png", "--seed", "abc"], "--seed must be an integer"),
        (["-o", "{tmp}/o.png", "--dtype", "int8"], "--dtype must be one of auto, bf16, fp16, fp32 (got 'int8')"),
        (["-o", "{tmp}/o.png", "--device", "tpu"], "--device must be one of auto, cpu, cuda, cuda:N, mps"),
        (["-o", "{tmp}/o.png", "--device", "cuda"], "CUDA"),
        (["-o", "-", "-n", "2"], "one image"),
        (["-o", "-", "--json"], "both use stdout"),
        (["-o", "{tmp}/o.png", "--offload", "disk"], "offload"),
        (["-o", "{tmp}/o.png", "--model", "not a model"], "unknown model"),
    ],
)
def test_usage_errors_exit_2(cli, tiny_checkpoint, photo, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args += ["-m", str(tiny_checkpoint)]
    result = cli("edit", photo, "x", *args, *FAST)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("o.*"))


def test_existing_output_and_input_are_protected(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"keep me")
    result = cli("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 5 and "--overwrite" in result.stderr
    assert out.read_bytes() == b"keep me"
    assert cli("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, *FAST, "--overwrite").exit_code == 0
    assert out.read_bytes() != b"keep me"
    original = photo.read_bytes()
    result = cli("edit", photo, "x", "-o", photo, "-m", tiny_checkpoint, *FAST, "--overwrite")
    assert result.exit_code == 5 and "input" in result.stderr
    assert photo.read_bytes() == original


def test_missing_output_folders_are_created(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "a" / "b" / "o.png"
    assert cli("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, *FAST).exit_code == 0
    assert out.is_file()


def test_png_metadata_and_replay(cli, tiny_checkpoint, photo, tmp_path):
    first = tmp_path / "first.png"
    args = ["-m", tiny_checkpoint, "--steps", "3", "--seed", "123", "--guidance", "3", "--image-guidance", "1.5"]
    assert cli("edit", photo, "turn it into winter", "-o", first, *args).exit_code == 0
    with Image.open(first) as image:
        text = image.info["parameters"]
        record = json.loads(image.info["compactedit"])
    assert text.startswith("turn it into winter\nSteps: 3,")
    assert "Seed: 123" in text and "CFG scale: 3.0" in text and "Image CFG scale: 1.5" in text
    assert "Size: 100x75" in text
    assert record["seed"] == 123 and record["steps"] == 3 and record["source"] == "in.jpg"
    again = tmp_path / "again.png"
    result = cli("edit", photo, "--replay", first, "-o", again, "-m", tiny_checkpoint)
    assert result.exit_code == 0, result.stderr
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert meta_io.read(again)["instruction"] == "turn it into winter"


@pytest.mark.parametrize("ext", [".jpg", ".webp"])
def test_jpeg_and_webp_carry_metadata_in_xmp(cli, tiny_checkpoint, photo, tmp_path, ext):
    out = tmp_path / f"o{ext}"
    assert cli("edit", photo, "add snow", "-o", out, "-m", tiny_checkpoint, *FAST, "--seed", "9").exit_code == 0
    record = meta_io.read(out)
    assert record["instruction"] == "add snow" and record["seed"] == 9
    with Image.open(out) as image:
        assert "compactedit" in image.getexif().get(0x0131, "")


def test_no_metadata_and_sidecar(cli, tiny_checkpoint, photo, tmp_path):
    bare = tmp_path / "bare.png"
    assert cli("edit", photo, "x", "-o", bare, "-m", tiny_checkpoint, *FAST, "--no-metadata").exit_code == 0
    with Image.open(bare) as image:
        assert "parameters" not in image.info and "compactedit" not in image.info
    side = tmp_path / "side.png"
    assert cli("edit", photo, "x", "-o", side, "-m", tiny_checkpoint, *FAST, "--sidecar").exit_code == 0
    sidecar = json.loads((tmp_path / "side.png.json").read_text())
    assert sidecar == meta_io.read(side)


def test_a_sidecar_is_an_output_like_the_image(cli, tiny_checkpoint, photo, tmp_path):
    """OUT.json is checked before any work, as OUT is: an existing one is kept without --overwrite, and an input
    that happens to be named OUT.json is never replaced (it used to be, even without --overwrite)."""
    notes = tmp_path / "side.png.json"
    notes.write_text("my notes")
    result = cli("edit", photo, "x", "-o", tmp_path / "side.png", "-m", tiny_checkpoint, *FAST, "--sidecar")
    assert result.exit_code == 5 and result.stderr.strip().startswith(f"error: {notes} already exists")
    assert notes.read_text() == "my notes" and not (tmp_path / "side.png").exists()
    named = make_photo(tmp_path / "scan-source.png").rename(tmp_path / "scan.png.json")  # a PNG, whatever its name
    before = named.read_bytes()
    again = ["-m", tiny_checkpoint, *FAST, "--sidecar", "--overwrite"]
    result = cli("edit", named, "x", "-o", tmp_path / "scan.png", *again)
    assert result.exit_code == 5 and "is the input image" in result.stderr
    assert named.read_bytes() == before and not (tmp_path / "scan.png").exists()
    result = cli("edit", photo, "x", "-o", tmp_path / "side.png", *again)
    assert result.exit_code == 0 and json.loads(notes.read_text())["instruction"] == "x"


def test_quality_changes_jpeg_size(cli, tiny_checkpoint, photo, tmp_path):
    low, high = tmp_path / "low.jpg", tmp_path / "high.jpg"
    assert cli("edit", photo, "x", "-o", low, "--quality", "10", "-m", tiny_checkpoint, *FAST).exit_code == 0
    assert cli("edit", photo, "x", "-o", high, "--quality", "95", "-m", tiny_checkpoint, *FAST).exit_code == 0
    assert low.stat().st_size < high.stat().st_size


def test_no_binning_is_recorded(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "nb.png"
    result = cli("edit", photo, "x", "-o", out, "--no-binning", "--json", "-m", tiny_checkpoint, *FAST)
    report = json.loads(result.stdout)
    assert report["resolution_binning"] is False and report["model_size"] == [96, 64]


def test_stdin_to_stdout_in_a_real_pipe(tiny_checkpoint, photo):
    buffer = io.BytesIO()
    Image.open(photo).save(buffer, format="PNG")
    command = [
        sys.executable,
        "-m",
        "compactedit_cli",
        "edit",
        "-",
        "make it red",
        "-o",
        "-",
        "-m",
        str(tiny_checkpoint),
        *FAST,
    ]
    done = subprocess.run(command, input=buffer.getvalue(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    with Image.open(io.BytesIO(done.stdout)) as image:
        assert image.format == "PNG" and image.size == (100, 75)


def test_stdin_needs_an_output(cli, tiny_checkpoint, photo):
    result = cli("edit", "-", "x", "-m", tiny_checkpoint, input=photo.read_bytes())
    assert result.exit_code == 2 and "needs -o" in result.stderr


def test_verbose_adds_traceback_quiet_silences(cli, tiny_checkpoint, tmp_path):
    missing = tmp_path / "nope.png"
    loud = cli("edit", missing, "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint, "-v")
    assert loud.exit_code == 3 and "Traceback" in loud.stderr
    quiet = cli("edit", missing, "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint, "-q")
    assert quiet.exit_code == 3 and quiet.stderr.strip() == f"error: no such file: {missing}"


def test_hub_model_from_cache_records_revision(cli, cached_model, photo, tmp_path):
    out = tmp_path / "o.png"
    result = cli("edit", photo, "x", "-o", out, "-m", cached_model, *FAST, "--offline")
    assert result.exit_code == 0, result.stderr
    record = meta_io.read(out)
    assert record["model"] == cached_model and record["revision"] == "1" * 40
    assert f"Model: {cached_model}@{'1' * 40}" in Image.open(out).info["parameters"]


def test_config_file_supplies_defaults(cli, tiny_checkpoint, photo, tmp_path):
    assert cli("config", "set", "model", str(tiny_checkpoint)).exit_code == 0
    shown = json.loads(cli("config", "show").stdout)
    assert shown["values"] == {"model": str(tiny_checkpoint)}
    result = cli("edit", photo, "x", "-o", tmp_path / "c.png", *FAST)
    assert result.exit_code == 0, result.stderr
    assert cli("config", "set", "colour", "blue").exit_code == 2
    assert cli("config", "unset", "model").exit_code == 0


def test_device_and_dtype_choices(cli, tiny_checkpoint, photo, tmp_path):
    out = tmp_path / "bf16.png"
    result = cli(
        "edit", photo, "x", "-o", out, "--device", "cpu", "--dtype", "bf16", "--json", "-m", tiny_checkpoint, *FAST
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["device"], report["dtype"]) == ("cpu", "bfloat16")
    assert Image.open(out).size == (100, 75)


def test_revision_of_a_cached_model(cli, cached_model, photo, tmp_path):
    ok = cli("edit", photo, "x", "-o", tmp_path / "a.png", "-m", cached_model, "--revision", "main", *FAST)
    assert ok.exit_code == 0, ok.stderr
    missing = cli("edit", photo, "x", "-o", tmp_path / "b.png", "-m", cached_model, "--revision", "v2", "--offline")
    assert missing.exit_code == 4 and "--revision v2" in missing.stderr


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_modes_give_the_same_image(cli, tiny_checkpoint, photo, tmp_path, mode):
    plain, offloaded = tmp_path / "plain.png", tmp_path / f"{mode}.png"
    assert cli("edit", photo, "x", "-o", plain, "-m", tiny_checkpoint, *FAST).exit_code == 0
    result = cli("edit", photo, "x", "-o", offloaded, "--offload", mode, "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    difference = np.abs(np.asarray(Image.open(plain), np.int16) - np.asarray(Image.open(offloaded), np.int16))
    assert difference.max() <= 1  # same weights and maths; sequential offload computes cross-attention keys per step


def test_bad_pixel_limit_setting_is_a_usage_error(cli, tiny_checkpoint, photo, tmp_path):
    result = cli("edit", photo, "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint,
                 env={"COMPACTEDIT_MAX_PIXELS": "lots"})  # fmt: skip
    assert result.exit_code == 2 and "COMPACTEDIT_MAX_PIXELS" in result.stderr


def test_corrupt_exif_is_one_warning_line(cli, tiny_checkpoint, tmp_path):
    from test_imaging import _jpeg_with_corrupt_exif

    image = tmp_path / "bad-exif.jpg"
    image.write_bytes(_jpeg_with_corrupt_exif())
    result = cli("edit", image, "x", "-o", tmp_path / "o.png", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "EXIF" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "bad-exif.jpg" in warnings[0]


def test_cuda_graphs_flag(cli, tiny_checkpoint, photo, tmp_path):
    """On the CPU the flag says once that it does not apply and the edit runs eagerly; with offload it is refused."""
    plain, graphed = tmp_path / "plain.png", tmp_path / "graphed.png"
    assert cli("edit", photo, "x", "-o", plain, "-m", tiny_checkpoint, *FAST).exit_code == 0
    result = cli("edit", photo, "x", "-o", graphed, "--cuda-graphs", "-m", tiny_checkpoint, *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("CUDA graphs skipped") == 1 and "Traceback" not in result.stderr
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(graphed)))
    mixed = tmp_path / "mixed.png"
    refused = cli("edit", photo, "x", "-o", mixed, "--cuda-graphs", "--offload", "model", "-m", tiny_checkpoint)
    assert refused.exit_code == 2 and "--offload" in refused.stderr and not mixed.exists()


@pytest.fixture
def wide(tmp_path):
    """16,400 pixels wide: past WebP's 16,383 (within the pixel and aspect limits)."""
    path = tmp_path / "wide.png"
    Image.new("RGB", (16_400, 82), (40, 90, 160)).save(path)
    return path


@pytest.mark.parametrize("target", ["file", "stdout"])
def test_an_output_its_format_cannot_store_is_refused_before_the_model_loads(cli, wide, tmp_path, target):
    """No model is given (the default is not in the offline cache): the refusal comes before any loading."""
    out = tmp_path / "o.webp"
    args = ["-o", out] if target == "file" else ["-o", "-", "--format", "webp"]
    result = cli("edit", wide, "make it winter", *args)
    assert result.exit_code == 2, result.stderr
    where = out if target == "file" else "stdout"
    assert result.stderr.strip() == (
        f"error: {where} would be 16400x82, and WEBP stores at most 16,383 pixels a side (write a .png instead)"
    )
    assert not out.exists() and result.stdout_bytes == b""


def test_the_library_refuses_an_output_its_format_cannot_store(tiny_checkpoint, wide, tmp_path):
    from compactedit_cli.editor import Editor
    from compactedit_cli.errors import UsageError
    from compactedit_cli.options import OutputOptions

    editor = Editor(str(tiny_checkpoint), device="cpu", offline=True)
    with pytest.raises(UsageError, match="WEBP stores at most 16,383"):
        editor.edit(wide, "x", tmp_path / "o.webp", steps=1)
    with pytest.raises(UsageError, match="the output would be 16400x82, and WEBP"):
        editor.edit(wide, "x", io.BytesIO(), output_options=OutputOptions(format="webp"), steps=1)
    assert list(tmp_path.iterdir()) == [wide]
