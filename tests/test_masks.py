"""Masked edits on real files with the tiny checkpoint: outside the mask (past the feather band) the output is the
normalised input bit for bit, for every kind of input; the feather profile; both mask conventions; size mismatches;
all-white equals unmasked and all-black never runs the model; latent blending keeps the source outside the mask;
the --crop-to-mask geometry; colour matching; --replay; and masks through batch and the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo, single_thread
from PIL import Image

from compactedit_cli.files.imaging import open_image

STEPS = ["--steps", "2", "--device", "cpu"]
FEATHER = 6


@pytest.fixture(scope="module")
def editor(tiny_checkpoint):
    from compactedit_cli.editor import Editor

    with single_thread():
        yield Editor(str(tiny_checkpoint), device="cpu", offline=True)


def box_mask(path: Path, size: tuple[int, int], box: tuple[int, int, int, int], mode: str = "L") -> Path:
    """A mask file of ``size`` whose ``box`` (left, top, right, bottom) is editable, in the given convention."""
    editable = np.zeros((size[1], size[0]), dtype=bool)
    left, top, right, bottom = box
    editable[top:bottom, left:right] = True
    if mode == "RGBA":  # OpenAI's: transparent is editable, the colour says nothing
        array = np.full((size[1], size[0], 4), 200, dtype=np.uint8)
        array[..., 3] = np.where(editable, 0, 255)
        Image.fromarray(array, mode="RGBA").save(path)
    else:
        Image.fromarray(np.where(editable, 255, 0).astype(np.uint8), mode="L").save(path)
    return path


def untouched(size: tuple[int, int], box: tuple[int, int, int, int], band: int) -> np.ndarray:
    """Pixels at least ``band`` pixels (in the larger of x and y) from the box: past any feather band."""
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    left, top, right, bottom = box
    dx = np.maximum(np.maximum(left - xs, xs - (right - 1)), 0)
    dy = np.maximum(np.maximum(top - ys, ys - (bottom - 1)), 0)
    return np.maximum(dx, dy) >= band


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def exif_rotated(path: Path) -> Path:
    """A JPEG stored 80x48 whose EXIF says to turn it to 48x80."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(make_photo(path.with_suffix(".png"), size=(80, 48), seed=4)).save(path, exif=exif.tobytes())
    return path


def sixteen_bit(path: Path) -> Path:
    ramp = (np.arange(60 * 40, dtype=np.uint32).reshape(40, 60) * 27 % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def display_p3_photo(path: Path) -> Path:
    from icc import display_p3

    Image.open(make_photo(path.with_suffix(".raw.png"), size=(56, 40), seed=7)).save(path, icc_profile=display_p3())
    return path


def rgba(path: Path) -> Path:
    array = np.random.default_rng(6).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    Image.fromarray(array, mode="RGBA").save(path)
    return path


INPUTS = {
    "square": lambda p: make_photo(p, size=(64, 64), seed=1),
    "portrait": lambda p: make_photo(p, size=(48, 80), seed=2),
    "extreme": lambda p: make_photo(p, size=(200, 24), seed=3),
    "exif-rotated": lambda p: exif_rotated(p.with_suffix(".jpg")),
    "rgba": rgba,
    "16-bit": sixteen_bit,
    "display-p3": display_p3_photo,
}


@pytest.mark.parametrize("mode", ["composite", "blend"])
@pytest.mark.parametrize("kind", list(INPUTS))
def test_outside_the_mask_is_the_input_bit_for_bit(editor, tmp_path, kind, mode):
    from compactedit_cli.options import EditOptions

    source = INPUTS[kind](tmp_path / "in.png")
    normalised = open_image(source)
    width, height = normalised.size
    box = (width // 4, height // 4, width // 4 + max(4, width // 4), height // 4 + max(4, height // 4))
    mask = box_mask(tmp_path / "mask.png", normalised.size, box, "RGBA" if kind == "rgba" else "L")
    out = tmp_path / "out.png"
    with single_thread():
        [record] = editor.edit(
            source, "make it red", out, mask=mask, edit_options=EditOptions(steps=2, mask_mode=mode, feather=FEATHER)
        )
    result = rgb(out)
    assert result.shape == (height, width, 3)
    far = untouched(normalised.size, box, FEATHER)
    assert np.array_equal(result[far], np.asarray(normalised.rgb)[far])
    left, top, right, bottom = box
    assert not np.array_equal(result[top:bottom, left:right], np.asarray(normalised.rgb)[top:bottom, left:right])
    if normalised.alpha is not None:
        assert np.array_equal(np.asarray(Image.open(out).getchannel("A")), np.asarray(normalised.alpha))
    assert (record.mask, record.mask_mode, record.feather) == ("mask.png", mode, FEATHER)


def test_the_feather_profile():
    from compactedit_cli.files.compositing import feather_weights

    editable = np.zeros((40, 80), dtype=bool)
    editable[:, :30] = True  # a straight edge: the distance from it is the column distance
    band = 10
    row = feather_weights(editable, band)[20]
    assert np.all(row[:30] == 1)
    for distance in range(1, band):
        assert row[29 + distance] == pytest.approx(1 - distance / band, abs=1e-6)
    assert np.all(row[29 + band :] == 0)
    assert np.all(np.diff(row) <= 0)
    corner = np.zeros((40, 40), dtype=bool)
    corner[:10, :10] = True
    weights = feather_weights(corner, band)
    # Round the corner the band is an octagon: the diagonal fades out sooner than a square band, later than a disc.
    assert 0 < weights[14, 14] < weights[9, 14]
    assert weights[9 + band, 9 + band] == 0


def test_both_conventions_and_invert(tmp_path):
    from compactedit_cli.files.masks import open_mask

    box = (5, 6, 15, 12)
    grey = open_mask(box_mask(tmp_path / "grey.png", (20, 16), box), (20, 16))
    alpha = open_mask(box_mask(tmp_path / "alpha.png", (20, 16), box, "RGBA"), (20, 16))
    expected = np.zeros((16, 20), dtype=bool)
    expected[6:12, 5:15] = True
    assert np.array_equal(grey.editable, expected) and np.array_equal(alpha.editable, expected)
    inverted = open_mask(tmp_path / "grey.png", (20, 16), invert=True)
    assert np.array_equal(inverted.editable, ~expected) and inverted.inverted
    assert grey.sha256 != alpha.sha256 and grey.name == "grey.png"
    # An alpha channel opaque everywhere carries no mask: the grey levels are read, as in a greyscale mask.
    Image.open(tmp_path / "grey.png").convert("RGBA").save(tmp_path / "opaque.png")
    assert np.array_equal(open_mask(tmp_path / "opaque.png", (20, 16)).editable, expected)
    # A soft greyscale mask is editable from mid-grey up.
    Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8)).save(tmp_path / "soft.png")
    assert open_mask(tmp_path / "soft.png").editable.tolist() == [[False, False, True, True]]


def test_a_mask_is_turned_upright_by_its_exif(tmp_path):
    from compactedit_cli.files.masks import open_mask

    stored = np.zeros((10, 30), dtype=np.uint8)
    stored[0, 0] = 255  # top-left as stored; orientation 6 turns it to the top-right of a 10x30 picture
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "m.png", exif=exif.tobytes())
    mask = open_mask(tmp_path / "m.png", (10, 30))
    assert mask.size == (10, 30) and mask.editable[0, 9] and mask.editable.sum() == 1


def test_bad_masks_are_one_line_errors(cli, tiny_checkpoint, tmp_path):
    photo = make_photo(tmp_path / "p.png", size=(40, 30))
    box_mask(tmp_path / "small.png", (30, 40), (0, 0, 5, 5))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for mask, words in [
        ("small.png", "is 30x40 but the image is 40x30"),
        ("broken.png", "broken.png"),
        ("missing.png", "no such file"),
        (".", "is a directory"),
    ]:
        result = cli("edit", photo, "x", "--mask", tmp_path / mask, "-o", tmp_path / "o.png", "-m", tiny_checkpoint)
        assert result.exit_code == 3, result.stderr
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
    box_mask(tmp_path / "fits.png", (40, 30), (0, 0, 5, 5))
    before = (tmp_path / "fits.png").read_bytes()
    result = cli("edit", photo, "x", "--mask", tmp_path / "fits.png", "-o", tmp_path / "fits.png", "--overwrite",
                 "-m", tiny_checkpoint)  # fmt: skip
    assert result.exit_code == 5 and "is the input image" in result.stderr
    assert (tmp_path / "fits.png").read_bytes() == before
    result = cli("edit", photo, "x", "--crop-to-mask", "-o", tmp_path / "o.png", "-m", tiny_checkpoint)
    assert result.exit_code == 2 and "need --mask" in result.stderr


@pytest.mark.parametrize("mode", ["composite", "blend"])
def test_an_all_white_mask_is_the_unmasked_edit(editor, tmp_path, mode):
    from compactedit_cli.options import EditOptions

    photo = make_photo(tmp_path / "p.png", size=(60, 44), seed=8)
    white = box_mask(tmp_path / "white.png", (60, 44), (0, 0, 60, 44))
    with single_thread():
        editor.edit(photo, "x", tmp_path / "plain.png", steps=2)
        chosen = EditOptions(steps=2, mask_mode=mode, crop_to_mask=True)
        editor.edit(photo, "x", tmp_path / "masked.png", mask=white, edit_options=chosen)
    assert np.array_equal(rgb(tmp_path / "plain.png"), rgb(tmp_path / "masked.png"))


def test_an_all_black_mask_returns_the_input_without_running_the_model(editor, tmp_path):
    photo = rgba(tmp_path / "p.png")
    black = box_mask(tmp_path / "black.png", (70, 50), (0, 0, 0, 0))
    stages: list[str] = []

    class Seen:
        def stage(self, name: str) -> None:
            stages.append(name)

        def step(self, state) -> None:
            stages.append("step")

    records = editor.edit(photo, "x", tmp_path / "out.png", mask=black, progress=Seen(), steps=2)
    assert stages == []
    assert "the mask marks nothing editable" in records[0].warnings[-1]  # said, not silent
    out = Image.open(tmp_path / "out.png")
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(photo)))


def test_blending_keeps_the_source_latents_outside_the_mask(tiny_pipe, tmp_path):
    import torch

    from compactedit_cli.engine.masking import latent_cells
    from compactedit_cli.files.compositing import Retouch
    from compactedit_cli.files.masks import Mask

    source = open_image(make_photo(tmp_path / "p.png", size=(96, 64), seed=9))
    editable = np.zeros((64, 96), dtype=bool)
    editable[10:30, 20:50] = True
    retouch = Retouch.plan(source, Mask(editable), band=0, mode="blend")
    with single_thread():
        result = tiny_pipe(source, "x", num_inference_steps=3, output_type="latent", retouch=retouch)
        plain = tiny_pipe(source, "x", num_inference_steps=3, output_type="latent")
    height, width = tiny_pipe.model_size(source.size)
    encoded = tiny_pipe.encode_image([source.rgb], height, width)
    cells = torch.from_numpy(latent_cells(editable, *encoded.shape[2:]))
    assert 0 < cells.sum() < cells.numel()
    kept = ~cells
    assert torch.allclose(result.latents[0][:, kept], encoded[0][:, kept].float(), atol=1e-5)
    assert not torch.allclose(result.latents[0][:, cells], encoded[0][:, cells].float(), atol=1e-2)  # generated
    assert not torch.allclose(plain.latents[0][:, kept], encoded[0][:, kept].float(), atol=1e-2)  # unblended


def test_latent_cells_cover_every_touched_pixel():
    from compactedit_cli.engine.masking import latent_cells

    editable = np.zeros((64, 96), dtype=bool)
    editable[31, 33] = True  # one pixel: the cell holding it (and no other) is editable on a 2x3 grid
    assert latent_cells(editable, 2, 3).tolist() == [[False, True, False], [False, False, False]]
    editable[32, 33] = True  # on the boundary row: the cell below too
    assert latent_cells(editable, 2, 3).tolist() == [[False, True, False], [False, True, False]]


def test_the_crop_is_pasted_back_within_a_pixel():
    from compactedit_cli.engine.binning import closest_bin
    from compactedit_cli.engine.pixels import to_model_pixels, to_pil
    from compactedit_cli.files.compositing import Retouch
    from compactedit_cli.files.imaging import normalise, restore_geometry
    from compactedit_cli.files.masks import Mask

    photo = np.zeros((3000, 4000, 3), dtype=np.uint8)
    photo[1400:1700, 2100:2500] = 255  # a sharp white block to find again
    source = normalise(Image.fromarray(photo))
    editable = np.zeros((3000, 4000), dtype=bool)
    editable[1300:1800, 2000:2600] = True
    retouch = Retouch.plan(source, Mask(editable), band=16, crop_to_mask=True)
    left, top, right, bottom = retouch.box
    assert retouch.cropped and left <= 2000 and top <= 1300 and right >= 2600 and bottom >= 1800
    assert (right - left) * (bottom - top) < 4000 * 3000 / 10
    work = retouch.work(source)
    height, width = closest_bin(work.size[1], work.size[0])
    # The pipeline's own way there and back: the plain resize to the bin and the resize to the crop's size.
    there_and_back = restore_geometry(to_pil(to_model_pixels(work.rgb, height, width))[0], work)
    out = np.asarray(retouch.finish(there_and_back, source))[..., 0] > 127
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert abs(rows[0] - 1400) <= 1 and abs(rows[-1] - 1699) <= 1
    assert abs(cols[0] - 2100) <= 1 and abs(cols[-1] - 2499) <= 1


def test_crop_to_mask_edits_the_crop_at_its_own_bin(editor, tmp_path):
    from compactedit_cli.options import EditOptions

    photo = make_photo(tmp_path / "p.png", size=(600, 400), seed=10)
    box = (400, 250, 460, 300)
    mask = box_mask(tmp_path / "m.png", (600, 400), box)
    with single_thread():
        [record] = editor.edit(
            photo, "x", tmp_path / "o.png", mask=mask, edit_options=EditOptions(steps=2, crop_to_mask=True)
        )
    left, top, right, bottom = record.crop
    assert left < 400 and top < 250 and right > 460 and bottom > 300 and (right - left) < 600
    crop_w, crop_h = right - left, bottom - top
    model_w, model_h = record.model_size
    assert abs(model_w / model_h - crop_w / crop_h) < 0.25  # the crop's aspect, not the photo's 3:2
    far = untouched((600, 400), box, 16)
    assert np.array_equal(rgb(tmp_path / "o.png")[far], rgb(photo)[far])


def test_color_match_moves_the_lab_statistics_to_the_source():
    from compactedit_cli.files.compositing import color_match, lab_statistics

    rng = np.random.default_rng(11)
    source = rng.integers(40, 200, (60, 80, 3), dtype=np.uint8)
    drifted = np.clip(source * 0.8 + np.array([40, 10, -20]), 0, 255).astype(np.uint8)  # darker contrast, warm tint
    inside = np.zeros((60, 80), dtype=bool)
    inside[20:40, 30:50] = True
    drifted[inside] = [0, 255, 0]  # the edit: something new and green, which must not steer the match
    matched = np.asarray(color_match(Image.fromarray(drifted), Image.fromarray(source), ~inside))
    want_mean, want_std = lab_statistics(source, ~inside)
    got_mean, got_std = lab_statistics(matched, ~inside)
    before_mean, _ = lab_statistics(drifted, ~inside)
    assert np.abs(got_mean - want_mean).max() < 1.0 < np.abs(before_mean - want_mean).max()
    assert np.abs(got_std - want_std).max() < 1.0
    assert np.asarray(matched)[30, 40, 1] > np.asarray(matched)[30, 40, 0]  # the edit stays green
    whole = np.asarray(color_match(Image.fromarray(drifted), Image.fromarray(source)))
    assert np.abs(lab_statistics(whole)[0] - lab_statistics(source)[0]).max() < 1.0


def test_replay_with_the_mask_reproduces_and_another_mask_warns(cli, tiny_checkpoint, tmp_path):
    photo = make_photo(tmp_path / "p.png", size=(64, 48), seed=12)
    box_mask(tmp_path / "m.png", (64, 48), (10, 10, 30, 30))
    box_mask(tmp_path / "other.png", (64, 48), (30, 10, 50, 30))
    model = ["-m", tiny_checkpoint, *STEPS]
    flags = ["--mask", tmp_path / "m.png", "--feather", "4", "--mask-mode", "blend", "--color-match", "--invert-mask"]
    first = cli("edit", photo, "x", "-o", tmp_path / "a.png", *model, *flags)
    assert first.exit_code == 0, first.stderr
    again = cli("edit", photo, "--replay", tmp_path / "a.png", "-m", tiny_checkpoint, "--mask", tmp_path / "m.png",
                "-o", tmp_path / "b.png")  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert rgb(tmp_path / "a.png").tobytes() == rgb(tmp_path / "b.png").tobytes()
    other = cli("edit", photo, "--replay", tmp_path / "a.png", "-m", tiny_checkpoint, "--mask",
                tmp_path / "other.png", "-o", tmp_path / "c.png")  # fmt: skip
    assert other.exit_code == 0 and "is not the recorded mask m.png" in other.stderr
    without = cli("edit", photo, "--replay", tmp_path / "a.png", "-m", tiny_checkpoint, "-o", tmp_path / "d.png")
    assert without.exit_code == 0 and "give it with --mask" in without.stderr


def test_masks_through_a_batch_manifest(cli, tiny_checkpoint, tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    make_photo(folder / "a.png", size=(64, 48), seed=13)
    make_photo(folder / "b.png", size=(64, 48), seed=14)
    box_mask(folder / "a-mask.png", (64, 48), (8, 8, 24, 24))
    lines = [
        {"image": "a.png", "instruction": "x", "mask": "a-mask.png", "feather": 4},
        {"image": "b.png", "instruction": "x"},
    ]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = cli("batch", "--manifest", folder / "jobs.jsonl", "-o", tmp_path / "out", "-m", tiny_checkpoint, *STEPS)
    assert result.exit_code == 0, result.stderr
    far = untouched((64, 48), (8, 8, 24, 24), 4)
    assert np.array_equal(rgb(tmp_path / "out" / "a.png")[far], rgb(folder / "a.png")[far])
    assert not np.array_equal(rgb(tmp_path / "out" / "b.png")[far], rgb(folder / "b.png")[far])
    from compactedit_cli.files import metadata

    assert metadata.read(tmp_path / "out" / "a.png")["mask"] == "a-mask.png"
    # Resuming: the same mask skips quietly; another mask in the same file is said, and the output kept.
    again = cli("batch", "--manifest", folder / "jobs.jsonl", "-o", tmp_path / "out", "-m", tiny_checkpoint, *STEPS)
    assert again.exit_code == 0, again.stderr
    assert "other parameters" not in again.stderr
    made = (tmp_path / "out" / "a.png").read_bytes()
    box_mask(folder / "a-mask.png", (64, 48), (30, 8, 60, 40))
    changed = cli("batch", "--manifest", folder / "jobs.jsonl", "-o", tmp_path / "out", "-m", tiny_checkpoint, *STEPS)
    assert changed.exit_code == 0, changed.stderr
    assert "a.png was made with other parameters (mask '" in changed.stderr
    assert "b.png" not in changed.stderr
    assert (tmp_path / "out" / "a.png").read_bytes() == made


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    from test_server import Server

    running = Server(tiny_checkpoint).wait_ready()
    yield running
    running.close()


def test_the_openai_mask_field(server, tmp_path):
    import base64
    import io

    photo = make_photo(tmp_path / "p.png", size=(80, 60), seed=15)
    mask = box_mask(tmp_path / "m.png", (80, 60), (20, 20, 40, 40), "RGBA")
    with photo.open("rb") as image, mask.open("rb") as plane:
        answer = server.client().images.edit(
            image=image, mask=plane, prompt="add a hat", extra_body={"steps": 2, "feather": 4}
        )
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).convert("RGB"))
    far = untouched((80, 60), (20, 20, 40, 40), 4)
    assert np.array_equal(out[far], rgb(photo)[far])
    assert not np.array_equal(out[20:40, 20:40], rgb(photo)[20:40, 20:40])


def test_edit_mask_through_the_server_writes_the_same_bytes(server, editor, tiny_checkpoint, tmp_path):
    from test_server_client import compactedit

    from compactedit_cli.options import EditOptions

    photo = make_photo(tmp_path / "p.png", size=(64, 48), seed=16)
    mask = box_mask(tmp_path / "m.png", (64, 48), (30, 5, 60, 25))
    flags = ["-m", tiny_checkpoint, *STEPS, "--mask", mask, "--mask-mode", "blend", "--color-match"]
    remote = compactedit("edit", photo, "x", "-o", tmp_path / "remote.png", *flags, "--server", server.socket)
    assert remote.returncode == 0, remote.stderr
    with single_thread():
        chosen = EditOptions(steps=2, mask_mode="blend", color_match=True)
        editor.edit(photo, "x", tmp_path / "local.png", mask=mask, edit_options=chosen)
    assert (tmp_path / "remote.png").read_bytes() == (tmp_path / "local.png").read_bytes()


def test_a_float_mask_within_0_to_1_reads_1_as_white(tmp_path):
    """A float TIFF mask as numpy writes one (1.0 editable) is not read as all black; one with 0..255 levels is
    read as 8-bit levels."""
    from compactedit_cli.files.masks import open_mask

    values = np.zeros((12, 16), dtype=np.float32)
    values[:, 8:] = 1.0
    Image.fromarray(values, mode="F").save(tmp_path / "unit.tiff")
    Image.fromarray(values * 255, mode="F").save(tmp_path / "levels.tiff")
    for name in ("unit.tiff", "levels.tiff"):
        editable = open_mask(tmp_path / name, (16, 12)).editable
        assert editable[:, 8:].all() and not editable[:, :8].any(), name
