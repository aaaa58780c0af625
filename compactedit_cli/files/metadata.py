"""Edit parameters written into outputs, in the conventions other tools read, and read back for ``--replay``.

* PNG: a ``parameters`` text chunk in the AUTOMATIC1111 grammar (what image browsers and "PNG info" tools parse),
  plus a ``compactedit`` chunk holding the full JSON.
* JPEG and WebP: the same JSON in an XMP packet, the ``parameters`` text in EXIF UserComment.
* Optionally a ``OUT.json`` sidecar with the same JSON.

Metadata read back is data only: values are type-checked and nothing in it is used as a path or executed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from html import escape, unescape
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import options
from ..errors import UsageError

XMP_NAMESPACE = "https://github.com/compactedit/compactedit/ns/1.0/"
_XMP_ATTRIBUTE = re.compile(rb'compactedit:params="([^"]*)"')


def parameters_text(meta: dict[str, Any]) -> str:
    """The A1111-style ``parameters`` string: the prompt line, then ``Key: value`` pairs."""
    model = meta["model"] + (f"@{meta['revision']}" if meta.get("revision") else "")
    width, height = meta["size"]
    fields = [
        f"Steps: {meta['steps']}",
        "Sampler: DPM++ 2M flow",
        f"CFG scale: {meta['guidance_scale']}",
        f"Image CFG scale: {meta['image_guidance_scale']}",
        f"Seed: {meta['seed']}",
        f"Size: {width}x{height}",
        f"Model: {model}",
        f"Version: {meta['software']}",
    ]
    return meta["instruction"].replace("\n", " ") + "\n" + ", ".join(fields)


def _xmp_packet(meta: dict[str, Any]) -> bytes:
    payload = escape(json.dumps(meta, ensure_ascii=False), quote=True)
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:compactedit="{XMP_NAMESPACE}" compactedit:params="{payload}"/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


def save_options(fmt: str, meta: dict[str, Any] | None) -> dict[str, Any]:
    """Extra ``Image.save`` keyword arguments that embed ``meta`` in a file of format ``fmt``."""
    if meta is None:
        return {}
    if fmt == "png":
        info = PngInfo()
        info.add_itxt("parameters", parameters_text(meta))
        info.add_itxt("compactedit", json.dumps(meta, ensure_ascii=False))
        return {"pnginfo": info}
    exif = Image.Exif()
    exif[0x0131] = meta["software"]  # Software
    exif[0x9286] = b"UNICODE\0" + parameters_text(meta).encode("utf-16-be")  # UserComment
    return {"exif": exif, "xmp": _xmp_packet(meta)}


def read(path: Path) -> dict[str, Any]:
    """The compactedit record embedded in an image (PNG chunk or XMP), or a UsageError if it has none."""
    try:
        with Image.open(path) as image:
            info = dict(image.info)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read metadata from {path}: {exc}") from None
    raw: str | None = info.get("compactedit")
    if raw is None and isinstance(info.get("xmp"), (bytes, str)):
        xmp = info["xmp"] if isinstance(info["xmp"], bytes) else info["xmp"].encode()
        match = _XMP_ATTRIBUTE.search(xmp)
        raw = unescape(match.group(1).decode("utf-8", "replace")) if match else None
    if raw is None:
        raise UsageError(f"{path} has no compactedit metadata to replay")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise UsageError(f"{path} has corrupt compactedit metadata") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} has corrupt compactedit metadata")
    return meta


def _passes(check: Callable[[Any], Any], value: Any) -> bool:
    """Whether ``check`` accepts ``value`` as it is (a check that would convert it, or raises, refuses it)."""
    from ..errors import CompactEditError

    try:
        return check(value) == value
    except CompactEditError:
        return False


def _is_model(value: Any) -> bool:
    from ..loading.hub import parse_model

    return isinstance(value, str) and _passes(lambda spec: spec if parse_model(spec).repo_id else None, value)


def _is_revision(value: Any) -> bool:
    from ..loading.hub import REVISION

    return isinstance(value, str) and REVISION.match(value) is not None and ".." not in value


def _exact(check: Callable[[Any], Any], kind: type) -> Callable[[Any], bool]:
    """A recorded value must already have the right type: ``"20"`` is not a step count, ``True`` is not a seed."""
    return lambda v: isinstance(v, kind) and not isinstance(v, bool) and _passes(check, v)


def _is_loras(value: Any) -> bool:
    """Recorded adapters: ``[spec, scale]`` pairs whose spec is a hub file (``owner/name/FILE``), never a path."""
    from ..loading.hub import REPO_ID

    def hub_file(spec: Any) -> bool:
        parts = spec.split("/") if isinstance(spec, str) else []
        return len(parts) > 2 and REPO_ID.match("/".join(parts[:2])) is not None and ".." not in parts

    return isinstance(value, list) and all(
        isinstance(e, list) and len(e) == 2 and hub_file(e[0]) and _passes(options.lora, tuple(e)) for e in value
    )


# The fields --replay may take from a file, each with the check its value must pass; nothing else is read. A
# recorded model must be a hub id or alias: it is never taken as a path (``/etc``, ``../x``, a local folder).
REPLAYABLE: dict[str, Callable[[Any], bool]] = {
    "instruction": _exact(options.instruction, str),
    "steps": _exact(options.steps, int),
    "guidance_scale": _exact(options.scale, (int, float)),
    "image_guidance_scale": _exact(options.scale, (int, float)),
    "seed": _exact(options.seed, int),
    "model": _is_model,
    "revision": _is_revision,
    "resolution_binning": lambda v: isinstance(v, bool),
    "loras": _is_loras,
}


def replayable(meta: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The values ``--replay`` may reuse, and a warning for each recorded value it ignores.

    Metadata is untrusted data: a value of the wrong type or range is dropped, and a recorded model is used only
    as a hub id, with its revision (a revision without its model is meaningless).
    """
    clean: dict[str, Any] = {}
    ignored: list[str] = []
    for key, check in REPLAYABLE.items():
        value = meta.get(key)
        if value is None:
            continue
        if check(value):
            clean[key] = value
        else:
            ignored.append(f"ignoring the recorded {key} {_short(value)}: not a valid {key}")
    if "revision" in clean and "model" not in clean:
        ignored.append(f"ignoring the recorded revision {_short(clean.pop('revision'))}: it belongs to no usable model")
    return clean, ignored


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
