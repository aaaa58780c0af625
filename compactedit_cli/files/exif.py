"""The EXIF and XMP policy: what of an input's camera metadata its outputs carry (``--exif keep|safe|none``).

* ``safe`` (the default) keeps what photographers rely on and nothing that leaks: the capture date and time zone,
  camera make and model, lens, exposure settings, Artist and Copyright (:data:`SAFE_TAGS`, :data:`SAFE_XMP`).
  GPS, serial numbers, owner names, unique ids, maker notes, thumbnails, free-text descriptions and comments are
  dropped.
* ``keep`` keeps every tag but those that would be false for the edited file (:data:`STALE_TAGS`: orientation,
  which is applied to the pixels, the thumbnail of the unedited image, sizes, colour space and file layout; and
  their XMP twins, :data:`STALE_XMP`).
* ``none`` keeps nothing of the input.

The orientation is always normalised: pixels are written upright and no Orientation tag is written. The same policy
filters the input's XMP packet, property by property.
"""

from __future__ import annotations

import contextlib
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

EXIF_IFD = 0x8769
GPS_IFD = 0x8825
INTEROP_IFD = 0xA005
SUB_IFDS = (EXIF_IFD, GPS_IFD, INTEROP_IFD)

SOFTWARE = 0x0131
USER_COMMENT = 0x9286

# IFD0 and Exif sub-IFD tags kept by ``safe``, by name for the README (ids from the EXIF 2.32 specification).
SAFE_TAGS: dict[int, dict[int, str]] = {
    0: {
        0x010F: "Make",
        0x0110: "Model",
        0x0132: "DateTime",
        0x013B: "Artist",
        0x8298: "Copyright",
        0x011A: "XResolution",
        0x011B: "YResolution",
        0x0128: "ResolutionUnit",
    },
    EXIF_IFD: {
        0x9003: "DateTimeOriginal",
        0x9004: "DateTimeDigitized",
        0x9010: "OffsetTime",
        0x9011: "OffsetTimeOriginal",
        0x9012: "OffsetTimeDigitized",
        0x9290: "SubSecTime",
        0x9291: "SubSecTimeOriginal",
        0x9292: "SubSecTimeDigitized",
        0x829A: "ExposureTime",
        0x829D: "FNumber",
        0x8822: "ExposureProgram",
        0x8827: "ISOSpeedRatings",
        0x8830: "SensitivityType",
        0x9201: "ShutterSpeedValue",
        0x9202: "ApertureValue",
        0x9204: "ExposureBiasValue",
        0x9205: "MaxApertureValue",
        0x9207: "MeteringMode",
        0x9208: "LightSource",
        0x9209: "Flash",
        0x920A: "FocalLength",
        0xA402: "ExposureMode",
        0xA403: "WhiteBalance",
        0xA405: "FocalLengthIn35mmFilm",
        0xA406: "SceneCaptureType",
        0xA432: "LensSpecification",
        0xA433: "LensMake",
        0xA434: "LensModel",
    },
}

# Tags ``keep`` still drops, because the edited file would make them false: the orientation (applied to the pixels),
# sizes, the colour space (outputs are sRGB), the file layout of the input (TIFF strips and tiles), and what
# compactedit writes itself (Software, UserComment).
STALE_TAGS: dict[int, set[int]] = {
    0: {
        0x0112,  # Orientation
        0x0100,
        0x0101,
        0x0102,
        0x0103,
        0x0106,
        0x0111,
        0x0115,
        0x0116,
        0x0117,
        0x011C,  # layout
        0x0142,
        0x0143,
        0x0144,
        0x0145,
        0x0140,
        0x0152,
        0x0153,
        0x0201,
        0x0202,
        0x0212,
        0x0213,
        0x0214,  # layout
        0x8773,
        0x02BC,
        0x83BB,
        0x8649,  # ICC profile, XMP, IPTC, Photoshop blocks (handled on their own)
        SOFTWARE,
        *SUB_IFDS,
    },
    EXIF_IFD: {0xA001, 0xA002, 0xA003, USER_COMMENT, INTEROP_IFD},  # ColorSpace, PixelX/YDimension
    GPS_IFD: set(),
    INTEROP_IFD: set(),
}

# XMP properties kept by ``safe`` (namespace URI -> local names); everything else in the packet is dropped.
_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "xmpRights": "http://ns.adobe.com/xap/1.0/rights/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "exifEX": "http://cipa.jp/exif/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "aux": "http://ns.adobe.com/exif/1.0/aux/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "x": "adobe:ns:meta/",
}
SAFE_XMP: dict[str, set[str]] = {
    _NS["dc"]: {"creator", "rights"},
    _NS["xmp"]: {"CreateDate", "CreatorTool"},
    _NS["xmpRights"]: {"Marked", "WebStatement", "UsageTerms"},
    _NS["photoshop"]: {"DateCreated", "Credit", "Copyright"},
    _NS["exif"]: {"DateTimeOriginal", "DateTimeDigitized", "ExposureTime", "FNumber", "ISOSpeedRatings", "FocalLength"},
    _NS["exifEX"]: {"LensModel", "LensMake", "LensSpecification", "PhotographicSensitivity"},
    _NS["tiff"]: {"Make", "Model", "Artist", "Copyright"},
    _NS["aux"]: {"Lens", "LensInfo"},
}
# The XMP twins of STALE_TAGS, which ``keep`` drops for the same reason: Pillow, Lightroom and exiftool read
# tiff:Orientation from XMP when EXIF has none, so a kept one would turn the upright output again.
STALE_XMP: dict[str, set[str]] = {
    _NS["tiff"]: {
        "Orientation",
        "ImageWidth",
        "ImageLength",
        "BitsPerSample",
        "Compression",
        "PhotometricInterpretation",
        "SamplesPerPixel",
        "PlanarConfiguration",
        "YCbCrSubSampling",
        "YCbCrPositioning",
    },
    _NS["exif"]: {"PixelXDimension", "PixelYDimension", "ColorSpace"},
    _NS["xmp"]: {"Thumbnails"},
    _NS["photoshop"]: {"ICCProfile"},
}
_RDF = "{" + _NS["rdf"] + "}"
_COMPACTEDIT_NS = "https://github.com/compactedit/compactedit/ns/1.0/"

for _prefix, _uri in _NS.items():
    ET.register_namespace(_prefix, _uri)


@dataclass
class CameraMetadata:
    """An input's EXIF (by IFD: 0 for IFD0, then the sub-IFDs) and XMP packet, as read, before any policy."""

    tags: dict[int, dict[int, Any]] = field(default_factory=dict)
    xmp: bytes | None = None


def read(image: Image.Image) -> CameraMetadata:
    """The EXIF and XMP of an opened (not yet transposed) image; unreadable parts are left out, not raised."""
    tags: dict[int, dict[int, Any]] = {}
    with contextlib.suppress(Exception):  # Pillow raises many kinds on corrupt EXIF; a photo is still a photo
        exif = image.getexif()
        tags[0] = {k: v for k, v in exif.items() if k not in SUB_IFDS}
        for ifd in SUB_IFDS:
            with contextlib.suppress(Exception):
                values = dict(exif.get_ifd(ifd))
                if values:
                    tags[ifd] = values
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    if xmp is None and hasattr(image, "tag_v2"):  # TIFF keeps XMP as tag 700
        xmp = image.tag_v2.get(0x02BC)
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return CameraMetadata(tags, xmp if isinstance(xmp, bytes) and xmp else None)


def kept_tags(camera: CameraMetadata | None, policy: str) -> dict[int, dict[int, Any]]:
    """The EXIF tags ``policy`` keeps of ``camera``, by IFD."""
    if camera is None or policy == "none":
        return {}
    if policy == "safe":
        kept = {
            ifd: {t: v for t, v in camera.tags.get(ifd, {}).items() if t in names} for ifd, names in SAFE_TAGS.items()
        }
    else:
        kept = {
            ifd: {t: v for t, v in tags.items() if t not in STALE_TAGS.get(ifd, set())}
            for ifd, tags in camera.tags.items()
        }
    return {ifd: tags for ifd, tags in kept.items() if tags}


def _writable(ifd: int, tag: int, value: Any) -> bool:
    """Whether Pillow can write ``value`` again (a malformed vendor value may not survive the round trip)."""
    probe = Image.Exif()
    try:
        if ifd == 0:
            probe[tag] = value
        else:
            probe.get_ifd(ifd)[tag] = value
        probe.tobytes()
    except Exception:
        return False
    return True


def build_exif(kept: dict[int, dict[int, Any]], ifd0: dict[int, Any], exif_ifd: dict[int, Any]) -> bytes | None:
    """One EXIF block: ``kept`` tags, then compactedit's own ``ifd0`` and ``exif_ifd`` values over them (``None``
    when there is nothing to write). A kept tag that Pillow cannot write again is dropped alone."""
    writable = {ifd: {t: v for t, v in tags.items() if _writable(ifd, t, v)} for ifd, tags in kept.items()}
    exif = Image.Exif()
    for tag, value in {**writable.get(0, {}), **ifd0}.items():
        exif[tag] = value
    empty = not (writable.get(0) or ifd0)
    for ifd in SUB_IFDS:
        values = {**writable.get(ifd, {}), **(exif_ifd if ifd == EXIF_IFD else {})}
        if values:
            exif.get_ifd(ifd).update(values)
            empty = False
    return None if empty else _undefined_types(exif.tobytes())


# Exif sub-IFD tags the specification types UNDEFINED. Pillow writes bytes it has no type for as BYTE, and readers
# (piexif, so sd-prompt-reader) then see a tuple of numbers instead of the UserComment's bytes.
_UNDEFINED = frozenset({0x9000, 0x9101, 0x927C, 0x9286, 0xA000, 0xA300, 0xA301, 0xA302})
_BYTE, _UNDEFINED_TYPE = 1, 7


def _undefined_types(block: bytes) -> bytes:
    """``block`` (``Exif\\0\\0`` + TIFF) with those tags retyped BYTE -> UNDEFINED: the same size and layout."""
    data = bytearray(block)
    base = 6
    order = "<" if data[base : base + 2] == b"II" else ">"

    def entries(offset: int) -> Iterator[int]:
        (count,) = struct.unpack_from(order + "H", data, base + offset)
        for i in range(count):
            yield base + offset + 2 + 12 * i

    (ifd0,) = struct.unpack_from(order + "I", data, base + 4)
    for entry in entries(ifd0):
        tag, _, _, value = struct.unpack_from(order + "HHII", data, entry)
        if tag != EXIF_IFD:
            continue
        for sub in entries(value):
            tag, kind = struct.unpack_from(order + "HH", data, sub)
            if tag in _UNDEFINED and kind == _BYTE:
                struct.pack_into(order + "H", data, sub + 2, _UNDEFINED_TYPE)
    return bytes(data)


def _qualified(name: str) -> tuple[str, str]:
    uri, _, local = name[1:].partition("}") if name.startswith("{") else ("", "", name)
    return uri, local


def _kept(name: str, policy: str) -> bool:
    """Whether ``policy`` keeps the XMP property ``name`` (``{uri}local``) of the input."""
    uri, local = _qualified(name)
    if uri == _COMPACTEDIT_NS:
        return False
    if policy == "keep":
        return local not in STALE_XMP.get(uri, set())
    return local in SAFE_XMP.get(uri, set())


def kept_xmp(camera: CameraMetadata | None, policy: str) -> list[ET.Element]:
    """The ``rdf:Description`` elements of the input's XMP that ``policy`` keeps (compactedit's own never)."""
    if camera is None or camera.xmp is None or policy == "none":
        return []
    try:
        root = ET.fromstring(camera.xmp.strip(b"\0 \t\r\n").split(b"<?xpacket end", 1)[0].split(b"?>", 1)[-1])
    except ET.ParseError:
        return []
    kept = []
    for description in root.iter(f"{_RDF}Description"):
        copy = ET.Element(description.tag, {f"{_RDF}about": ""})
        for attr, value in description.attrib.items():
            if _qualified(attr)[0] != _NS["rdf"] and _kept(attr, policy):
                copy.set(attr, value)
        for child in description:
            if _kept(child.tag, policy):
                copy.append(child)
        if len(copy.attrib) > 1 or len(copy):
            kept.append(copy)
    return kept


def xmp_descriptions(elements: list[ET.Element]) -> str:
    """``elements`` as XML text, to go inside the output's ``rdf:RDF``."""
    return "".join(ET.tostring(element, encoding="unicode") for element in elements)
