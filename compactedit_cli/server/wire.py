"""What compactedit's own client and server send each other for one edit (no torch here).

The client opens and checks the image (and any mask) itself, then sends the normalised pixels (upright RGB, the
alpha plane if any, and the mask plane, white editable, with the mask's name and hash) as raw bytes, so the
server decodes nothing a client names and sees exactly what an in-process edit would see. The server answers with
newline-delimited JSON events (the queue position, the stage, each denoising step), then one ``result`` event whose
pictures follow it as raw bytes, which the client saves as an in-process edit saves them: the same pixels, metadata
and atomic write.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from PIL import Image

from ..errors import UsageError
from ..files.imaging import SourceImage
from ..files.masks import Mask, from_plane

PROTOCOL = 1
EDIT_PATH = "/v1/compactedit/edits"
VERSION_HEADER = "X-Compactedit-Version"
PROTOCOL_HEADER = "X-Compactedit-Protocol"
MAX_WARNINGS = 16
_PLANES = {"RGB": 3, "L": 1}
PLANES = ("rgb", "alpha", "mask")  # the file fields of a request, each one plane of the image's size


def event_line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode() + b"\n"


def picture_parts(image: Image.Image) -> tuple[dict[str, Any], bytes]:
    """A picture's header (mode, size, byte count and the ``info`` entries that survive JSON) and raw bytes."""
    data = image.tobytes()
    info: dict[str, Any] = {}
    for key, value in image.info.items():
        if isinstance(value, bytes):
            info[key] = {"base64": base64.b64encode(value).decode("ascii")}
        elif isinstance(value, (str, int, float)):
            info[key] = value
        elif isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
            info[key] = {"tuple": list(value)}
    return {"mode": image.mode, "size": list(image.size), "length": len(data), "info": info}, data


def rebuild(header: dict[str, Any], data: bytes) -> Image.Image:
    """The picture :func:`picture_parts` took apart."""
    image = Image.frombytes(header["mode"], tuple(header["size"]), data)
    for key, value in header.get("info", {}).items():
        if isinstance(value, dict) and "base64" in value:
            value = base64.b64decode(value["base64"])
        elif isinstance(value, dict) and "tuple" in value:
            value = tuple(value["tuple"])
        image.info[key] = value
    return image


def source_fields(source: SourceImage, mask: Mask | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The request's description of ``source`` (and ``mask``) and its raw planes (``rgb``, and ``alpha`` and
    ``mask`` when there are)."""
    planes = {"rgb": source.rgb.tobytes()}
    if source.alpha is not None:
        planes["alpha"] = source.alpha.tobytes()
    described: dict[str, Any] = {"width": source.size[0], "height": source.size[1], "warnings": list(source.warnings)}
    if mask is not None:
        planes["mask"] = mask.plane().tobytes()
        described["mask"] = {"name": mask.name, "sha256": mask.sha256, "inverted": mask.inverted}
    return described, planes


def mask_from(described: dict[str, Any], planes: dict[str, bytes]) -> Mask | None:
    """The mask a request sends (its plane already checked by :func:`source_from`), or None."""
    if "mask" not in planes:
        return None
    about = described.get("mask") or {}
    if not isinstance(about, dict):
        raise UsageError("mask must be an object")
    name, sha256, inverted = about.get("name"), about.get("sha256"), about.get("inverted", False)
    if not all(v is None or isinstance(v, str) for v in (name, sha256)) or not isinstance(inverted, bool):
        raise UsageError("the mask's name and sha256 must be strings")
    width, height = described["width"], described["height"]
    plane = Image.frombytes("L", (width, height), planes["mask"])
    return Mask(from_plane(plane).editable, name, sha256, inverted)


def source_from(described: dict[str, Any], planes: dict[str, bytes], max_pixels: int) -> SourceImage:
    """The SourceImage a request describes, its size checked against ``max_pixels`` before any plane is read."""
    width, height = described.get("width"), described.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise UsageError("width and height must be positive integers")
    if width * height > max_pixels:
        raise UsageError(f"the image has {width * height:,} pixels, over the limit of {max_pixels:,}")
    warnings = described.get("warnings") or []
    if not isinstance(warnings, list) or len(warnings) > MAX_WARNINGS or not all(isinstance(w, str) for w in warnings):
        raise UsageError("warnings must be a short list of strings")
    unknown = set(planes) - set(PLANES)
    if unknown or "rgb" not in planes:
        raise UsageError("send the pixels as the file fields rgb (and alpha, mask)")
    images = {}
    for name, data in planes.items():
        mode = "RGB" if name == "rgb" else "L"
        if len(data) != width * height * _PLANES[mode]:
            raise UsageError(f"{name} has {len(data):,} bytes, not the {width * height * _PLANES[mode]:,} of the size")
        if name != "mask":
            images[name] = Image.frombytes(mode, (width, height), data)
    return SourceImage(images["rgb"], images.get("alpha"), list(warnings))


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    import secrets

    boundary = f"compactedit-{secrets.token_hex(16)}"
    chunks: list[bytes] = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        chunks.append(value.encode() + b"\r\n")
    for name, data in files.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        chunks.append(data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
