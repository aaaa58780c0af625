"""The EXIF policy on real files: what each of --exif safe|keep|none keeps and drops, in EXIF and in XMP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from compactedit_cli.files import metadata, outputs
from compactedit_cli.files.imaging import open_image
from compactedit_cli.options import OutputOptions

IFD0 = {
    0x010F: "Canon",  # Make
    0x0110: "EOS R5",  # Model
    0x0132: "2024:05:01 12:00:00",  # DateTime
    0x013B: "Ada Lovelace",  # Artist
    0x8298: "(c) 2024 Ada Lovelace",  # Copyright
    0x010E: "At home, 12 Acacia Avenue",  # ImageDescription
    0x013C: "ada-laptop",  # HostComputer
    0x0112: 6,  # Orientation: rotate 90° to view
}
EXIF = {
    0x9003: "2024:05:01 11:59:58",  # DateTimeOriginal
    0x9011: "+02:00",  # OffsetTimeOriginal
    0xA434: "RF24-105mm F4 L IS USM",  # LensModel
    0xA431: "012345678901",  # BodySerialNumber
    0xA435: "LENS9876",  # LensSerialNumber
    0xA430: "Ada Lovelace",  # CameraOwnerName
    0xA420: "0123456789abcdef0123456789abcdef",  # ImageUniqueID
    0x927C: b"vendor-private maker note",  # MakerNote
}
GPS = {1: "N", 2: (51.0, 30.0, 12.0), 3: "W", 4: (0.0, 7.0, 39.0)}
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
    b'xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" '
    b'exif:GPSLatitude="51,30.2N" photoshop:City="London" photoshop:DateCreated="2024-05-01T11:59:58+02:00">'
    b'<dc:rights><rdf:Alt><rdf:li xml:lang="x-default">(c) 2024 Ada Lovelace</rdf:li></rdf:Alt></dc:rights>'
    b"</rdf:Description></rdf:RDF></x:xmpmeta>"
)

SAFE_IFD0 = {0x010F, 0x0110, 0x0132, 0x013B, 0x8298}
SAFE_EXIF = {0x9003, 0x9011, 0xA434}


def camera_photo(path: Path, size=(60, 40)) -> Path:
    """A photo straight from a camera held sideways: EXIF with GPS and serials, XMP, orientation 6."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    for tag, value in IFD0.items():
        exif[tag] = value
    exif.get_ifd(0x8769).update(EXIF)
    exif.get_ifd(0x8825).update(GPS)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image.save(path, quality=95, exif=exif.tobytes(), xmp=XMP)
    return path


def _written(source, tmp_path: Path, fmt: str, policy: str) -> Path:
    out = tmp_path / f"out-{policy}.{'jpg' if fmt == 'jpeg' else fmt}"
    out.write_bytes(outputs.file_bytes(source.rgb, None, fmt, OutputOptions(exif=policy, metadata=False), source))  # type: ignore[arg-type]
    return out


def _tags(path: Path) -> tuple[dict, dict, dict, bytes]:
    with Image.open(path) as image:
        exif = image.getexif()
        xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or b""
        xmp = xmp.encode() if isinstance(xmp, str) else xmp
        return dict(exif), dict(exif.get_ifd(0x8769)), dict(exif.get_ifd(0x8825)), xmp


@pytest.fixture
def source(tmp_path):
    return open_image(camera_photo(tmp_path / "camera.jpg"))


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_safe_keeps_what_photographers_need_and_drops_what_leaks(source, tmp_path, fmt):
    ifd0, exif, gps, xmp = _tags(_written(source, tmp_path, fmt, "safe"))
    assert {tag: ifd0[tag] for tag in SAFE_IFD0} == {tag: IFD0[tag] for tag in SAFE_IFD0}
    assert {tag: exif[tag] for tag in SAFE_EXIF} == {tag: EXIF[tag] for tag in SAFE_EXIF}
    assert gps == {}
    for leak in (0x010E, 0x013C, 0x0112):  # description, host computer, orientation
        assert leak not in ifd0
    for leak in (0xA431, 0xA435, 0xA430, 0xA420, 0x927C):  # serials, owner, unique id, maker note
        assert leak not in exif
    assert b"(c) 2024 Ada Lovelace" in xmp and b"2024-05-01T11:59:58+02:00" in xmp  # rights and date kept
    assert b"GPSLatitude" not in xmp and b"London" not in xmp


def test_keep_keeps_everything_but_what_the_edit_made_false(source, tmp_path):
    ifd0, exif, gps, xmp = _tags(_written(source, tmp_path, "jpeg", "keep"))
    assert {tag: ifd0.get(tag) for tag in IFD0 if tag != 0x0112} == {t: v for t, v in IFD0.items() if t != 0x0112}
    assert {tag: exif.get(tag) for tag in EXIF} == EXIF
    assert gps[1] == "N" and tuple(float(v) for v in gps[2]) == GPS[2]
    assert 0x0112 not in ifd0  # the pixels are upright now
    assert b"GPSLatitude" in xmp and b"London" in xmp


# XMP as Lightroom and phones write it: the orientation and sizes of the stored (sideways) pixels, also as elements.
SIDEWAYS_XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    b'xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" '
    b'tiff:Orientation="6" tiff:ImageWidth="60" exif:PixelXDimension="60" photoshop:City="London">'
    b"<tiff:ImageLength>40</tiff:ImageLength><exif:PixelYDimension>40</exif:PixelYDimension>"
    b"</rdf:Description></rdf:RDF></x:xmpmeta>"
)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_keep_drops_the_xmp_orientation_and_sizes_too(tmp_path, fmt):
    """Pillow (and so compactedit, on a second edit), Lightroom and exiftool read tiff:Orientation from XMP when
    EXIF has none: kept, it would turn the upright output sideways again."""
    photo = camera_photo(tmp_path / "camera.jpg")
    with Image.open(photo) as image:
        image.save(photo, quality=95, exif=image.info["exif"], xmp=SIDEWAYS_XMP)
    written = _written(open_image(photo), tmp_path, fmt, "keep")
    *_, xmp = _tags(written)
    assert open_image(written).size == (40, 60)  # still upright when read again
    for stale in (b"Orientation", b"ImageWidth", b"ImageLength", b"PixelXDimension", b"PixelYDimension"):
        assert stale not in xmp
    assert b"London" in xmp  # everything else is kept


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_none_keeps_nothing(source, tmp_path, fmt):
    ifd0, exif, gps, xmp = _tags(_written(source, tmp_path, fmt, "none"))
    assert ifd0 == {} and exif == {} and gps == {} and xmp == b""


def test_orientation_is_applied_to_the_pixels(source):
    assert source.size == (40, 60)  # 60x40 stored, shown rotated


def test_compactedit_metadata_sits_beside_the_kept_exif(cli, tiny_checkpoint, tmp_path):
    photo = camera_photo(tmp_path / "camera.jpg")
    out = tmp_path / "out.jpg"
    result = cli("edit", photo, "add a hat", "-o", out, "-m", tiny_checkpoint, "--steps", "1")
    assert result.exit_code == 0, result.stderr
    ifd0, exif, gps, xmp = _tags(out)
    assert ifd0[0x010F] == "Canon" and exif[0x9003] == EXIF[0x9003] and gps == {}
    assert ifd0[0x0131].startswith("compactedit") and exif[0x9286].startswith(b"UNICODE\0")
    assert b"compactedit:params" in xmp and b"(c) 2024 Ada Lovelace" in xmp
    with Image.open(out) as image:
        assert image.size == (40, 60)


def test_keep_into_a_jpeg_falls_back_to_safe_where_a_segment_would_overflow(cli, tiny_checkpoint, tmp_path):
    """A JPEG segment holds 64 KB; a PNG, TIFF or WebP's EXIF and XMP need not fit one (a large maker note,
    Photoshop's DocumentAncestors). Such a part keeps what ``safe`` keeps; the edit used to fail after its run."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    for tag, value in IFD0.items():
        exif[tag] = value
    exif.get_ifd(0x8769).update({**EXIF, 0x927C: bytes(70_000)})  # MakerNote
    ancestors = b"".join(b"<rdf:li>xmp.did:%032d</rdf:li>" % i for i in range(3000))
    xmp = XMP.replace(b"</rdf:Description>", b"<photoshop:DocumentAncestors><rdf:Bag>" + ancestors
                      + b"</rdf:Bag></photoshop:DocumentAncestors></rdf:Description>")  # fmt: skip
    photo = tmp_path / "layered.png"
    text = PngInfo()
    text.add_itxt("XML:com.adobe.xmp", xmp.decode())
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(photo, exif=exif.tobytes(), pnginfo=text)
    out = tmp_path / "out.jpg"
    result = cli("edit", photo, "add a hat", "-o", out, "-m", tiny_checkpoint, "--steps", "1", "--exif", "keep")
    assert result.exit_code == 0, result.stderr
    ifd0, exif_ifd, gps, xmp_out = _tags(out)
    assert ifd0[0x010F] == "Canon" and exif_ifd[0x9003] == EXIF[0x9003] and gps == {} and 0x927C not in exif_ifd
    assert b"(c) 2024 Ada Lovelace" in xmp_out and b"DocumentAncestors" not in xmp_out
    assert metadata.read(out)["instruction"] == "add a hat"


def test_config_and_flag_choose_the_policy(cli, tiny_checkpoint, tmp_path):
    photo = camera_photo(tmp_path / "camera.jpg")
    assert cli("config", "set", "exif", "none").exit_code == 0
    out = tmp_path / "none.jpg"
    assert cli("edit", photo, "x", "-o", out, "-m", tiny_checkpoint, "--steps", "1").exit_code == 0
    ifd0, exif, _, _ = _tags(out)
    assert 0x010F not in ifd0 and 0x9003 not in exif and 0x9286 in exif  # only compactedit's own
    kept = tmp_path / "keep.jpg"
    assert cli("edit", photo, "x", "-o", kept, "-m", tiny_checkpoint, "--steps", "1", "--exif", "keep").exit_code == 0
    assert _tags(kept)[2][1] == "N"  # the flag wins over the config: GPS kept


def test_bad_policy_values_are_usage_errors(cli, tmp_path):
    photo = camera_photo(tmp_path / "camera.jpg")
    result = cli("edit", photo, "x", "-o", tmp_path / "o.png", "--exif", "some")
    assert result.exit_code == 2 and "--exif must be one of keep, safe, none" in result.stderr
    result = cli("config", "set", "exif", "all")
    assert result.exit_code == 2 and "exif must be one of" in result.stderr


def test_a_manifest_line_sets_its_own_policy(cli, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths on the command line: results.jsonl still says absolute ones
    camera_photo(tmp_path / "camera.jpg")
    manifest = tmp_path / "edits.jsonl"
    lines = [
        {"image": "camera.jpg", "instruction": "x", "output": "kept.jpg", "exif": "keep"},
        {"image": "camera.jpg", "instruction": "x", "output": "safe.jpg"},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    result = cli("batch", "--manifest", "edits.jsonl", "-o", "out", "-m", tiny_checkpoint, "--steps", "1")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(line["input"], line["output"]) for line in lines] == [
        (str(tmp_path / "camera.jpg"), str(tmp_path / "out" / name)) for name in ("kept.jpg", "safe.jpg")
    ]
    assert _tags(tmp_path / "out" / "kept.jpg")[2][1] == "N"
    assert _tags(tmp_path / "out" / "safe.jpg")[2] == {}
    manifest.write_text(json.dumps({"image": "camera.jpg", "instruction": "x", "exif": "gps-only"}))
    result = cli("batch", "--manifest", manifest, "-o", tmp_path / "out2", "-m", tiny_checkpoint)
    assert result.exit_code == 2 and "exif must be one of" in result.stderr
