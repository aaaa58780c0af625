"""Edit parameters written into outputs, in the conventions other tools read, and read back for ``--replay``.

* PNG: a ``parameters`` text chunk in the AUTOMATIC1111 grammar (what image browsers and "PNG info" tools parse),
  plus a ``compactedit`` chunk holding the full JSON.
* JPEG and WebP: the same JSON in an XMP packet, the ``parameters`` text in the UserComment of the Exif sub-IFD
  (``UNICODE`` prefix, UTF-16 big-endian), where A1111, piexif and the readers built on them look.
* Optionally a ``OUT.json`` sidecar with the same JSON.

Metadata read back is data only: values are type-checked and nothing in it is used as a path or executed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from html import escape, unescape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import options
from ..errors import UsageError
from ..loading.refs import recorded_adapter
from ..record import METADATA_FIELDS, RETOUCH_FIELDS
from . import exif
from .exif import CameraMetadata
from .imaging import decode_input

if TYPE_CHECKING:
    from ..editor import EditJob

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
    if meta.get("num_images", 1) > 1:  # A1111's own names: which output of the seed's draw this is
        fields[5:5] = [f"Batch size: {meta['num_images']}", f"Batch pos: {meta['index']}"]
    return meta["instruction"].replace("\n", " ") + "\n" + ", ".join(fields)


# A1111's own pattern for its ``Key: value`` pairs (modules/infotext_utils.py).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_FROM_TEXT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Steps": ("steps", int),
    "CFG scale": ("guidance_scale", float),
    "Image CFG scale": ("image_guidance_scale", float),
    "Seed": ("seed", int),
    "Batch size": ("num_images", int),
    "Batch pos": ("index", int),
}


def parse_parameters(text: str) -> dict[str, Any]:
    """The record fields an A1111 ``parameters`` text holds (what --replay falls back on when a file has no
    compactedit record, for example after a tool dropped its XMP): prompt, steps, scales, seed, model."""
    lines = text.strip().splitlines()
    if len(lines) < 2:
        return {}
    prompt = [line for line in lines[:-1] if not line.startswith("Negative prompt:")]
    meta: dict[str, Any] = {"instruction": " ".join(prompt)}
    for key, value in _PAIR.findall(lines[-1]):
        value = value.strip().strip('"')
        if key in _FROM_TEXT:
            field, kind = _FROM_TEXT[key]
            try:
                meta[field] = kind(value)
            except ValueError:
                meta[field] = value  # kept as text: replayable() refuses it with a warning
        elif key == "Model":
            model, _, revision = value.partition("@")
            meta["model"], meta["revision"] = model, revision or None
    return meta


def _exif_parameters(image: Image.Image) -> str | None:
    """The UserComment of the Exif sub-IFD, decoded by its character-code prefix."""
    try:
        raw = image.getexif().get_ifd(exif.EXIF_IFD).get(exif.USER_COMMENT)
    except Exception:
        return None
    if not isinstance(raw, bytes) or len(raw) <= 8:
        return raw if isinstance(raw, str) else None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        codec = "utf-16" if body[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-16-be"
        return body.decode(codec, "replace")
    return body.decode("utf-8" if prefix != b"ASCII\0\0\0" else "ascii", "replace")


def _xmp_packet(meta: dict[str, Any] | None, kept: str) -> bytes | None:
    """One XMP packet: compactedit's record (when ``meta``), then the input's kept descriptions."""
    if meta is None and not kept:
        return None
    ours = ""
    if meta is not None:
        payload = escape(json.dumps(meta, ensure_ascii=False), quote=True)
        ours = f'<rdf:Description rdf:about="" xmlns:compactedit="{XMP_NAMESPACE}" compactedit:params="{payload}"/>'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f"{ours}{kept}</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def user_comment(text: str) -> bytes:
    """An EXIF UserComment: the 8-byte character-code prefix, then the text (UCS-2 big-endian, as A1111 writes)."""
    return b"UNICODE\0" + text.encode("utf-16-be")


# The most EXIF and XMP bytes a JPEG's APP1 segment holds (Pillow refuses more): the XMP less its namespace prefix.
_JPEG_SEGMENT = {"exif": 65533, "xmp": 65533 - len(b"http://ns.adobe.com/xap/1.0/\0")}


def _fitted(fmt: str, part: str, policy: str, build: Callable[[str], bytes | None]) -> bytes | None:
    """``build(policy)``; in a JPEG, where that overflows its segment, ``build`` of the next stricter policy (keep,
    safe, none): a PNG, TIFF or WebP input's metadata need not fit 64 KB (a maker note, Photoshop's history)."""
    limit = _JPEG_SEGMENT[part] if fmt == "jpeg" else None
    for candidate in options.EXIF_POLICIES[options.EXIF_POLICIES.index(policy) :]:
        made = build(candidate)
        if made is None or limit is None or len(made) <= limit:
            break
    return made  # under "none" only compactedit's own record: a few KB, always within the segment


def save_options(
    fmt: str, meta: dict[str, Any] | None, camera: CameraMetadata | None = None, policy: str = options.DEFAULT_EXIF
) -> dict[str, Any]:
    """Extra ``Image.save`` keyword arguments: ``meta`` embedded where readers look for it in ``fmt``, and the
    input's ``camera`` EXIF and XMP as far as the EXIF ``policy`` keeps them (and a JPEG's segments hold)."""
    extra: dict[str, Any] = {}
    if fmt == "png":
        info = PngInfo()
        if meta is not None:
            info.add_text("parameters", parameters_text(meta))  # tEXt (iTXt only if the text is not Latin-1)
            info.add_itxt("compactedit", json.dumps(meta, ensure_ascii=False))
        packet = _xmp_packet(None, exif.xmp_descriptions(exif.kept_xmp(camera, policy)))
        if packet is not None:
            info.add_itxt("XML:com.adobe.xmp", packet.decode())
        extra["pnginfo"] = info
        block = exif.build_exif(exif.kept_tags(camera, policy), {}, {})
    else:
        ours = {} if meta is None else {exif.SOFTWARE: meta["software"]}
        comment = {} if meta is None else {exif.USER_COMMENT: user_comment(parameters_text(meta))}
        block = _fitted(fmt, "exif", policy, lambda p: exif.build_exif(exif.kept_tags(camera, p), ours, comment))
        packet = _fitted(
            fmt, "xmp", policy, lambda p: _xmp_packet(meta, exif.xmp_descriptions(exif.kept_xmp(camera, p)))
        )
        if packet is not None:
            extra["xmp"] = packet
    if block is not None:
        extra["exif"] = block
    return extra


def _recorded(image: Image.Image, _name: str) -> tuple[dict[str, Any], str | None]:
    """A decoded image's info (its text chunks, after the pixels too) and its A1111 ``parameters`` text."""
    info = dict(image.info)
    text = info.get("parameters") if isinstance(info.get("parameters"), str) else _exif_parameters(image)
    return info, text


def read(path: Path) -> dict[str, Any]:
    """The edit recorded in an image: compactedit's JSON (PNG chunk or XMP), else the A1111 ``parameters``
    (PNG text chunk, or the EXIF UserComment of a JPEG or WebP); a UsageError if it has neither.

    The file is read as an input image is (a FIFO, a bomb header, oversized text: InputImageError), since a file to
    replay is as untrusted as one to edit."""
    (info, text), _ = decode_input(path, _recorded)
    raw: str | None = info.get("compactedit")
    if raw is None and isinstance(info.get("xmp"), (bytes, str)):
        xmp = info["xmp"] if isinstance(info["xmp"], bytes) else info["xmp"].encode()
        match = _XMP_ATTRIBUTE.search(xmp)
        raw = unescape(match.group(1).decode("utf-8", "replace")) if match else None
    if raw is None:
        meta = parse_parameters(text) if text else {}
        if not meta:
            raise UsageError(f"{path} has no compactedit metadata to replay")
        return meta
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
    "index": _exact(lambda v: options.bounded_int(v, "index", 0, options.MAX_NUM_IMAGES - 1), int),
    "num_images": _exact(options.num_images, int),
    "model": _is_model,
    "revision": _is_revision,
    "resolution_binning": lambda v: isinstance(v, bool),
    "loras": _is_loras,
    "mask": lambda v: isinstance(v, str),  # only named in a warning: a recorded name is never opened
    "mask_sha256": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
    "invert_mask": lambda v: isinstance(v, bool),
    "mask_mode": _exact(options.mask_mode, str),
    "feather": _exact(options.feather, int),
    "crop": lambda v: isinstance(v, list) and len(v) == 4 and all(type(x) is int and x >= 0 for x in v),
    "color_match": lambda v: isinstance(v, bool),
}


def replayable(meta: dict[str, Any], given: frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """The values ``--replay`` may reuse, and a warning for each recorded value it ignores.

    Metadata is untrusted data: a value of the wrong type or range is dropped, and a recorded model is used only
    as a hub id, with its revision (a revision without its model is meaningless). Keys in ``given`` (set on the
    command line) are not read at all, so they draw no warning.
    """
    clean: dict[str, Any] = {}
    ignored: list[str] = []
    for key, check in REPLAYABLE.items():
        value = meta.get(key)
        if value is None or key in given:
            continue
        if check(value):
            clean[key] = value
        elif key == "model":
            ignored.append(
                f"ignoring the recorded model {_short(value)}: it is not a hub id or alias, and local paths are not "
                "trusted from metadata; give the model with -m"
            )
        else:
            ignored.append(f"ignoring the recorded {key} {_short(value)}: not a valid {key}")
    if "revision" in clean and "model" not in clean:
        ignored.append(f"ignoring the recorded revision {_short(clean.pop('revision'))}: it belongs to no usable model")
    if clean.get("index", 0) >= clean.get("num_images", 1):
        ignored.append(f"ignoring the recorded index {clean.pop('index')}: past the recorded number of images")
    return clean, ignored


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mask_changes(job: EditJob, recorded: dict[str, Any]) -> list[str]:
    """How the mask a job asks for differs from the one its existing output was made with (by the file's hash)."""
    from .masks import file_sha256

    was = recorded.get("mask_sha256")
    mask = getattr(job, "mask", None)
    if mask is None:
        return [] if was is None else ["mask (one was used), now none"]
    now = file_sha256(Path(mask)) if Path(mask).is_file() else None
    if now != was:
        return ["mask none, now one" if was is None else f"mask {_short(was)}, now {_short(now)}"]
    wanted = {"mask_mode": job.options.mask_mode, "feather": job.options.feather}
    return [f"{key} {_short(recorded.get(key))}, now {_short(value)}" for key, value in wanted.items()
            if recorded.get(key) is not None and recorded.get(key) != value]  # fmt: skip


def compare_existing(
    job: EditJob,
    previous: dict[str, Any] | None,
    model: tuple[str, str | None],
    loras: tuple[tuple[str, float], ...] = (),
) -> tuple[dict[str, Any], list[str]]:
    """What made ``job``'s existing output, and each way it differs from ``job`` (resuming a batch).

    What made it is the record embedded in the file, else its line in an earlier ``results.jsonl``. Unset
    requests (a random seed, the model's default guidance) match anything; a file whose parameters cannot be told
    differs. ``model`` is the model and revision as records name them, ``loras`` the adapters the job is edited
    with.
    """
    chosen = job.options
    try:
        recorded = read(job.output)
    except UsageError:
        recorded = previous or {}
    recorded = {key: recorded[key] for key in (*METADATA_FIELDS, *RETOUCH_FIELDS) if key in recorded}
    if not recorded:
        return {}, ["no recorded parameters"]
    wanted: dict[str, Any] = {
        "instruction": job.instruction,
        "seed": chosen.seed,
        "steps": chosen.steps,
        "guidance_scale": chosen.guidance,
        "image_guidance_scale": chosen.image_guidance,
        "resolution_binning": chosen.binning,
        "model": model[0],
        "revision": model[1],
        "loras": [[recorded_adapter(spec), scale] for spec, scale in loras],
    }
    changed = _mask_changes(job, recorded)
    for key, value in wanted.items():
        was = recorded.get(key)
        if value is None or (key in ("revision", "loras") and was is None):
            continue
        same = math.isclose(was, value) if isinstance(value, float) and isinstance(was, (int, float)) else was == value
        if not same:
            changed.append(f"{key} {_short(was)}, now {_short(value)}")
    return recorded, changed
