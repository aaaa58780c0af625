"""Third-party readers parse what compactedit writes: sd-parsers and sd-prompt-reader (from PyPI), in PNG, JPEG and
WebP, and ``--replay`` reads all three (also when only the A1111 text survives)."""

from __future__ import annotations

import pytest
from conftest import Invoke, make_photo
from PIL import Image

from compactedit_cli.files import metadata

sd_parsers = pytest.importorskip("sd_parsers")  # the test extra installs both readers
image_data_reader = pytest.importorskip("sd_prompt_reader.image_data_reader")

INSTRUCTION = "put a red scarf on the dog"
FORMATS = ("png", "jpg", "webp")
_alive: list[Image.Image] = []


@pytest.fixture(scope="module")
def outputs(tiny_checkpoint, tmp_path_factory):
    """One edit written in each format, through the real CLI."""
    folder = tmp_path_factory.mktemp("readers")
    photo = make_photo(folder / "dog.jpg", size=(96, 64))
    env = {"COMPACTEDIT_HOME": str(folder / "home")}
    written = {}
    for ext in FORMATS:
        out = folder / f"out.{ext}"
        args = ("edit", photo, INSTRUCTION, "-o", out, "-m", tiny_checkpoint, "--steps", "3", "--seed", "1234")
        result = Invoke()(*args, "--guidance", "3.5", env=env)
        assert result.exit_code == 0, result.stderr
        written[ext] = out
    return written


@pytest.mark.parametrize("ext", FORMATS)
def test_sd_parsers_reads_prompt_seed_steps_guidance_and_size(outputs, ext):
    image = Image.open(outputs[ext])
    _alive.append(image)  # sd-parsers caches by id(image): a freed image's id, reused, would read stale data
    info = sd_parsers.ParserManager().parse(image)
    assert info is not None, f"sd-parsers found nothing in {ext}"
    assert info.generator.name == "AUTOMATIC1111"
    [sampler] = info.samplers
    assert [p.value for p in sampler.prompts] == [INSTRUCTION]
    assert sampler.parameters["seed"] == "1234" and sampler.parameters["steps"] == "3"
    assert float(sampler.parameters["cfg_scale"]) == 3.5
    assert info.metadata["Size"] == "96x64"


@pytest.mark.parametrize("ext", FORMATS)
def test_sd_prompt_reader_reads_prompt_seed_steps_guidance_and_size(outputs, ext):
    reader = image_data_reader.ImageDataReader(str(outputs[ext]))
    assert reader.tool == "A1111 webUI"
    assert reader.positive == INSTRUCTION
    parameters = reader.parameter
    assert parameters["seed"] == "1234" and parameters["steps"] == "3" and float(parameters["cfg"]) == 3.5
    assert parameters["size"] == "96x64"


@pytest.mark.parametrize("ext", FORMATS)
def test_the_json_record_is_kept_beside_the_a1111_text(outputs, ext):
    record = metadata.read(outputs[ext])
    assert record["schema"] == "compactedit/1" and record["seed"] == 1234 and record["source"] == "dog.jpg"


@pytest.mark.parametrize("ext", ["jpg", "webp", "png"])
def test_replay_falls_back_on_the_a1111_text(outputs, tmp_path, ext):
    """A tool that keeps EXIF (or PNG text) but drops XMP and private chunks leaves only the A1111 parameters."""
    stripped = tmp_path / f"stripped.{ext}"
    with Image.open(outputs[ext]) as image:
        if ext == "png":
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text("parameters", image.info["parameters"])
            image.save(stripped, pnginfo=info)
        else:
            image.save(stripped, exif=image.getexif(), quality=95)
    with Image.open(stripped) as image:
        assert "xmp" not in image.info and "compactedit" not in image.info
    recorded, ignored = metadata.replayable(metadata.read(stripped))
    assert ignored == [f for f in ignored if "model" in f]  # the tiny model is a local folder: not replayed
    assert recorded["instruction"] == INSTRUCTION and recorded["seed"] == 1234 and recorded["steps"] == 3
    assert recorded["guidance_scale"] == 3.5
