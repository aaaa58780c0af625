"""Every option's default, bounds and validation, and the rules between options: one place, and no torch.

Flags, manifest values, the config file and the Python API all go through these checks, so a value means the same
thing and fails the same way wherever it comes from. Each check raises a one-line :class:`UsageError` that names
the option as the caller spells it (``--steps`` on the command line, ``steps`` in a manifest line)::

    --steps must be between 1 and 1000 (got 0)

Nothing here imports torch, diffusers or transformers: a command checks everything it was given before the engine
is imported.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

# ---- defaults and bounds ----------------------------------------------------------------------------------------

DEFAULT_MODEL = "vibe"
DEFAULT_STEPS = 20
MAX_STEPS = 1000
DEFAULT_SEED = 42
MAX_SEED = 2**31 - 1  # the reference's range (0 … int32 max)
DEFAULT_GUIDANCE = 4.5  # the reference's text guidance
DEFAULT_IMAGE_GUIDANCE = 1.2  # and image guidance; a CFG-distilled model runs both at 0
DEFAULT_NUM_IMAGES = 1
MAX_NUM_IMAGES = 64
DEFAULT_BATCH_SIZE = 1
MAX_BATCH_SIZE = 64
DEFAULT_QUALITY = 95  # JPEG and WebP
MAX_QUALITY = 100

OFFLOAD_MODES = ("none", "model", "sequential")
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Accepted dtype spellings -> the torch attribute name (None: the device's default).
DTYPE_NAMES: dict[str, str | None] = {
    "auto": None,
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}

OUTPUT_EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
FORMAT_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_FORMAT = "png"

# ---- the EXIF policy: what of an input's EXIF and XMP its outputs keep (files/exif.py says which tags) ---------

EXIF_POLICIES = ("keep", "safe", "none")
DEFAULT_EXIF = "safe"

# Masks (README, "Editing only part of a photo"). A mask pixel is editable from this grey level up (white is 255).
MASK_THRESHOLD = 128
MASK_MODES = ("composite", "blend")  # composite: paste the edit back; blend: also steer the denoising to the mask
DEFAULT_MASK_MODE = "composite"
# The feather band, in photo pixels outside the mask, over which the edit fades into the untouched photo: wide
# enough to hide the model's softer edge (its latents are 32 photo pixels a cell at a 1:1 bin), narrow enough to
# keep the change where it was asked for.
DEFAULT_FEATHER = 16
MAX_FEATHER = 1024
# --crop-to-mask keeps this much context around the mask's bounding box (a fraction of its longer side, at least
# the feather band plus MIN_CROP_MARGIN pixels), so the model sees what it edits in its surroundings.
CROP_CONTEXT = 0.25
MIN_CROP_MARGIN = 32


def mask_mode(value: Any, name: str = "--mask-mode") -> str:
    text = str(value).strip().lower()
    if text not in MASK_MODES:
        raise UsageError(f"{name} must be one of {', '.join(MASK_MODES)} (got {value!r})")
    return text


def feather(value: Any, name: str = "--feather") -> int:
    return bounded_int(value, name, 0, MAX_FEATHER)


def exif_policy(value: Any, name: str = "--exif") -> str:
    """``keep`` (all but what the edit makes false), ``safe`` (date, camera, lens, author; no GPS or serials) or
    ``none``."""
    text = str(value).strip().lower()
    if text not in EXIF_POLICIES:
        raise UsageError(f"{name} must be one of {', '.join(EXIF_POLICIES)} (got {value!r})")
    return text


GRAPHS_AND_OFFLOAD = "--cuda-graphs and --offload do not mix: a graph replays the weights where it captured them"
FP8_AND_OFFLOAD = "--quantize fp8 and --offload do not mix yet: the offloader moves the weights it found at load"


KERNEL_MODES = ("off", "triton")
DEFAULT_KERNELS = "off"  # on by default only once the kernels have been checked on a GPU (BENCHMARKS.md)
QUANTIZE_MODES = ("none", "fp8")
DEFAULT_QUANTIZE = "none"


COMPILE_MODES = ("off", "on", "auto", "aot")
# Compiled by default (``auto``) only once the cold and warm-cache compile costs are measured on a GPU (BENCHMARKS.md).
DEFAULT_COMPILE = "off"


def compile_mode(value: Any, name: str = "compile") -> str:
    """``off``, ``on``, ``auto`` or ``aot``; a boolean (``--compile``, a config's ``true``) is ``on`` or ``off``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _choice(value, name, COMPILE_MODES)


def runs_compiled(mode: str, device_type: str, *, long_run: bool, warm: bool) -> bool:
    """Whether an edit runs the compiled blocks. ``auto`` compiles only on CUDA, where the compiled step is faster,
    and only when compiling pays: the size's graphs are already in the compile cache (``warm``), or the model serves
    many edits (``long_run``: a batch, a server), over which one compile per size is spread."""
    if mode == "auto":
        return device_type == "cuda" and (long_run or warm)
    return mode == "on"


def kernels(value: Any, name: str = "--kernels") -> str:
    """Which implementation the DiT's attention and gated convolution use: the plain torch ops or Triton's."""
    return _choice(value, name, KERNEL_MODES)


def quantize(value: Any, name: str = "--quantize") -> str:
    """The DiT's linear layers' number format: ``none`` (the model's dtype) or ``fp8``."""
    return _choice(value, name, QUANTIZE_MODES)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
    return text


# VAE tiles, in pixels: diffusers' AutoencoderDC sizes, so tiled output matches its tiled output.
DEFAULT_VAE_TILE = 512
DEFAULT_VAE_TILE_STRIDE = 448


def vae_tile(size: Any, stride: Any, factor: int, name: str = "vae_tile") -> tuple[int, int]:
    """A VAE tile's side and the stride between tiles, in pixels: tiles must overlap or touch (or pixels would go
    missing), and step at least one latent (``factor`` pixels) at a time."""
    size = bounded_int(size, f"{name} size", factor, 2**16)
    stride = bounded_int(stride, f"{name} stride", factor, size)
    return size, stride


def speed_options(offload_mode: str, cuda_graphs: bool, quantize_mode: str = "none") -> None:
    """The rules between the speed options: CUDA graphs need the weights to stay where they were captured; FP8
    replaces weights after the offloader has taken hold of them."""
    if cuda_graphs and offload_mode != "none":
        raise UsageError(GRAPHS_AND_OFFLOAD)
    if quantize_mode != "none" and offload_mode != "none":
        raise UsageError(FP8_AND_OFFLOAD)


# ---- single values ----------------------------------------------------------------------------------------------


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{name} must be an integer (got {value!r})")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise UsageError(f"{name} must be an integer (got {value!r})") from None
    if not isinstance(value, int):
        raise UsageError(f"{name} must be an integer (got {value!r})")
    return value


def bounded_int(value: Any, name: str, low: int, high: int) -> int:
    """An integer in ``[low, high]``; strings of digits are accepted (CSV cells, environment variables)."""
    number = _integer(value, name)
    if not low <= number <= high:
        raise UsageError(f"{name} must be between {low} and {high} (got {number})")
    return number


def steps(value: Any, name: str = "--steps") -> int:
    return bounded_int(value, name, 1, MAX_STEPS)


def num_images(value: Any, name: str = "--num-images") -> int:
    return bounded_int(value, name, 1, MAX_NUM_IMAGES)


def batch_size(value: Any, name: str = "--batch-size") -> int:
    return bounded_int(value, name, 1, MAX_BATCH_SIZE)


def quality(value: Any, name: str = "--quality") -> int | None:
    return None if value is None else bounded_int(value, name, 1, MAX_QUALITY)


def seed(value: Any, name: str = "--seed") -> int | None:
    """A seed in the reference's range; ``None`` or ``"random"`` means a fresh seed per edit (``None``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "random"):
        return None
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        raise UsageError(f"{name} must be an integer or 'random' (got {value!r})")
    return bounded_int(value, name, 0, MAX_SEED)


def random_seed() -> int:
    """A fresh seed in the reference's range."""
    return random.SystemRandom().randint(0, MAX_SEED)


def scale(value: Any, name: str = "--guidance") -> float | None:
    """A guidance scale: a finite number >= 0; ``None`` keeps the model's default."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise UsageError(f"{name} must be a number (got {value!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number (got {value!r})")
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} must be a finite number >= 0 (got {value!r})")
    return float(value)


def lora(value: Any, name: str = "--lora") -> tuple[str, float]:
    """An adapter as ``PATH[:SCALE]`` (or an already split ``(spec, scale)``): the spec, and the scale (default 1).

    The spec is a local file or ``owner/name/FILE`` on the hub (:mod:`compactedit_cli.loading.lora` resolves it);
    the scale multiplies the adapter's own ``alpha / rank`` and may be any finite number (0 leaves the base as is).
    """
    if isinstance(value, (tuple, list)) and len(value) == 2:
        spec, number = value
    elif isinstance(value, str):
        spec, _, tail = value.strip().rpartition(":")
        if not spec or not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail.strip()):
            spec, tail = value.strip(), "1"
        number = tail
    else:
        raise UsageError(f"{name} must be PATH[:SCALE] (got {value!r})")
    spec = str(spec).strip()
    if not spec:
        raise UsageError(f"{name} names no adapter (got {value!r})")
    weight = _finite(number, f"{name} {spec}: the scale")
    return spec, weight


def _finite(value: Any, name: str) -> float:
    """Any finite number (an adapter's scale may be negative)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise UsageError(f"{name} must be a number (got {value!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number (got {value!r})")
    return float(value)


def offload(value: Any, name: str = "--offload") -> str:
    return _choice(value, name, OFFLOAD_MODES)


def device(value: Any, name: str = "--device") -> str:
    """A device name's spelling (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``); whether it exists is the engine's
    to check, since that needs torch."""
    text = str(value).strip().lower()
    if not _DEVICE.match(text):
        raise UsageError(f"{name} must be one of {', '.join(DEVICE_NAMES)} (got {value!r})")
    return text


def dtype(value: Any, name: str = "--dtype") -> str:
    """A dtype spelling, kept as given once checked (``bf16``, ``float32``, ``auto``…)."""
    text = str(value).strip().lower()
    if text not in DTYPE_NAMES:
        raise UsageError(f"{name} must be one of auto, bf16, fp16, fp32 (got {value!r})")
    return text


def torch_dtype_name(value: str) -> str | None:
    """The torch attribute name of a checked dtype spelling (``bf16`` -> ``bfloat16``); ``None`` for ``auto``."""
    return DTYPE_NAMES[dtype(value)]


# ---- serving ---------------------------------------------------------------------------------------------------

DEFAULT_SERVER = "auto"
SERVER_CHOICES = ("auto", "never")
DEFAULT_MAX_QUEUE = 16
MAX_MAX_QUEUE = 10_000
DEFAULT_MAX_BATCH = 1


def server(value: Any, name: str = "--server") -> str:
    """``auto`` (a matching running server, else in-process), ``never``, ``http://HOST:PORT``, ``unix:PATH`` or
    a socket's path."""
    text = str(value if value is not None else DEFAULT_SERVER).strip()
    if not text:
        raise UsageError(f"{name} is empty: give auto, never, http://HOST:PORT or a socket path")
    return text.lower() if text.lower() in SERVER_CHOICES else text


def max_queue(value: Any, name: str = "--max-queue") -> int:
    return bounded_int(value, name, 1, MAX_MAX_QUEUE)


def max_batch(value: Any, name: str = "--max-batch") -> int:
    return bounded_int(value, name, 1, MAX_BATCH_SIZE)


def idle_timeout(value: Any, name: str = "--idle-timeout") -> float | None:
    """Seconds without an edit before a server stops; 0 (or None) never."""
    try:
        seconds = float(value or 0)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number of seconds (got {value!r})") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UsageError(f"{name} must be a number of seconds >= 0 (got {value})")
    return seconds or None


# Zero-width and other invisible format characters that make an instruction look non-empty.
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn"}
# Far past what an edit reads (it keeps the first few hundred tokens, warning when it cuts): a longer text is a
# mistake (a file where an instruction belongs), and every path, the server's form fields too, takes this much.
MAX_INSTRUCTION_BYTES = 64 * 1024


def instruction(value: Any, name: str = "the instruction") -> str:
    """An instruction made ready to use: control and zero-width characters removed (tabs and line breaks become
    spaces), surrounding whitespace trimmed; the rest of the text is kept as given.

    Empty (or only invisible characters), not text, not encodable as UTF-8 (bad bytes in argv) or over
    ``MAX_INSTRUCTION_BYTES`` is a UsageError.
    """
    if not isinstance(value, str):
        raise UsageError(f"{name} must be text (got {type(value).__name__})")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError(f"{name} is not valid UTF-8 text") from None
    if size > MAX_INSTRUCTION_BYTES:
        raise UsageError(f"{name} is {size:,} bytes long, over the limit of {MAX_INSTRUCTION_BYTES:,}")
    kept = (" " if ch in "\t\n\r" else ch for ch in value)
    cleaned = "".join(ch for ch in kept if unicodedata.category(ch) not in _INVISIBLE).strip()
    if not cleaned:
        raise UsageError(f"{name} is empty")
    return cleaned


# ---- output formats ---------------------------------------------------------------------------------------------


def output_format_name(value: Any, name: str = "--format") -> str:
    """``png``, ``jpg``/``jpeg`` or ``webp`` -> the canonical format name."""
    key = str(value).strip().lower().lstrip(".")
    fmt = OUTPUT_EXTENSIONS.get(f".{key}")
    if fmt is None:
        raise UsageError(f"{name} must be png, jpg or webp (got {value!r})")
    return fmt


def output_format(path: Path | None, explicit: str | None = None) -> str:
    """The format of an output: ``explicit`` (``--format``), else the file's extension; they must agree."""
    suffix = path.suffix.lower() if path is not None else ""
    from_ext = OUTPUT_EXTENSIONS.get(suffix) if suffix else None
    if suffix and from_ext is None:
        raise UsageError(f"unknown output extension {path.suffix!r} in {path} (use .png, .jpg or .webp)")
    if explicit is not None:
        fmt = output_format_name(explicit)
        if from_ext is not None and from_ext != fmt:
            raise UsageError(f"--format {explicit} conflicts with the extension of {path}")
        return fmt
    if from_ext is None:
        raise UsageError(f"cannot tell the output format of {path}: give it an extension or use --format")
    return from_ext


# The longest side each format can store (PNG's, 2^31 - 1, is past any image the pixel limit lets in).
FORMAT_MAX_SIDE = {"jpeg": 65_535, "webp": 16_383}


def check_output_fits(fmt: str, size: tuple[int, int], where: str) -> None:
    """Refuse, before any work, an output its format cannot store: an output has its input's size, and the
    encoder would fail only once the edit is done."""
    limit = FORMAT_MAX_SIDE.get(fmt)
    if limit is not None and max(size) > limit:
        raise UsageError(
            f"{where} would be {size[0]}x{size[1]}, and {fmt.upper()} stores at most {limit:,} pixels a side",
            hint="write a .png instead",
        )


def draw(value: Any, chosen_seed: int | None, count: int, name: str = "the recorded index") -> tuple[int, int] | None:
    """``(index, of)``: which output of a ``-n of`` draw to make. It needs a seed and makes one image."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise UsageError(f"{name} must be (index, num_images) (got {value!r})")
    of = num_images(value[1], f"{name}'s num_images")
    index = bounded_int(value[0], name, 0, of - 1)
    if chosen_seed is None or count != 1:
        raise UsageError(f"{name} needs a fixed seed and one image (got seed {chosen_seed!r}, {count} images)")
    return index, of


# ---- groups of options ------------------------------------------------------------------------------------------


def _set(obj: object, **values: Any) -> None:
    for key, value in values.items():
        object.__setattr__(obj, key, value)


@dataclass(frozen=True)
class EditOptions:
    """The parameters of one edit. Checked when made, so the Python API fails as the command line does.

    ``guidance`` and ``image_guidance`` of ``None`` take the model's defaults (4.5 and 1.2, or 0 for a CFG-distilled
    model); ``seed`` of ``None`` draws a fresh seed, recorded with the result. ``draw`` of ``(index, of)`` makes only
    output ``index`` of the ``of`` outputs that ``seed`` gives (how ``--replay`` reproduces ``out-2`` of ``-n 2``).
    """

    steps: int = DEFAULT_STEPS
    guidance: float | None = None
    image_guidance: float | None = None
    seed: int | None = DEFAULT_SEED
    num_images: int = DEFAULT_NUM_IMAGES
    binning: bool = True
    draw: tuple[int, int] | None = None
    mask_mode: str = DEFAULT_MASK_MODE  # how a mask given to the edit is used (an edit without one ignores it)
    feather: int = DEFAULT_FEATHER
    crop_to_mask: bool = False
    color_match: bool = False

    def __post_init__(self) -> None:
        _set(
            self,
            mask_mode=mask_mode(self.mask_mode, "mask_mode"),
            feather=feather(self.feather, "feather"),
            crop_to_mask=bool(self.crop_to_mask),
            color_match=bool(self.color_match),
            steps=steps(self.steps, "steps"),
            guidance=scale(self.guidance, "guidance"),
            image_guidance=scale(self.image_guidance, "image_guidance"),
            seed=seed(self.seed, "seed"),
            num_images=num_images(self.num_images, "num_images"),
            binning=bool(self.binning),
            draw=draw(self.draw, seed(self.seed, "seed"), num_images(self.num_images, "num_images")),
        )

    def replace(self, **changes: Any) -> EditOptions:
        """A copy with ``changes`` applied (and checked); ``None`` values leave a field as it is."""
        values = {**self.__dict__, **{k: v for k, v in changes.items() if v is not None}}
        return EditOptions(**values)


@dataclass(frozen=True)
class ModelOptions:
    """Which model, where it runs and how: what opening an :class:`~compactedit_cli.editor.Editor` needs.

    Plain strings and flags, so it pickles (a Ray worker rebuilds the Editor from it).
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    offload: str = "none"
    compile: str | bool = DEFAULT_COMPILE  # :data:`COMPILE_MODES`; a boolean means on or off
    cuda_graphs: bool = False
    kernels: str = DEFAULT_KERNELS
    quantize: str = DEFAULT_QUANTIZE
    loras: tuple[tuple[str, float], ...] = ()  # (spec, scale) adapters fused into the DiT at load, in order
    long_run: bool = False  # many edits on this model (a batch, a server): ``compile="auto"`` compiles at once

    def __post_init__(self) -> None:
        model = str(self.model).strip() if self.model is not None else DEFAULT_MODEL
        if not model:
            raise UsageError("--model is empty")
        _set(
            self,
            model=model,
            device=device(self.device),
            dtype=dtype(self.dtype),
            offload=offload(self.offload),
            offline=bool(self.offline),
            compile=compile_mode(self.compile),
            long_run=bool(self.long_run),
            cuda_graphs=bool(self.cuda_graphs),
            kernels=kernels(self.kernels),
            quantize=quantize(self.quantize),
            loras=tuple(lora(entry) for entry in (self.loras or ())),
        )
        speed_options(self.offload, self.cuda_graphs, self.quantize)


@dataclass(frozen=True)
class OutputOptions:
    """How outputs are written. ``format`` of ``None`` follows each output's extension."""

    format: str | None = None
    quality: int | None = None
    metadata: bool = True
    sidecar: bool = False
    overwrite: bool = False
    exif: str = DEFAULT_EXIF

    def __post_init__(self) -> None:
        fmt = None if self.format is None else output_format_name(self.format)
        _set(self, format=fmt, quality=quality(self.quality), exif=exif_policy(self.exif, "exif"))


def compile_cache_dir() -> Path:
    """Where ``--compile`` keeps torch's compiled-graph caches, so a later process of the same size reuses them.

    ``COMPACTEDIT_CACHE_DIR/compile`` when that is set, else ``compile`` in the platform's user cache folder
    (platformdirs). Not torch's ``TORCHINDUCTOR_CACHE_DIR``: torch fills that in itself once anything asks inductor
    for its cache, so it cannot say what the user chose; ``--compile`` replaces it.
    """
    import os

    override = os.environ.get("COMPACTEDIT_CACHE_DIR")
    if override:
        return Path(override).expanduser() / "compile"
    import platformdirs

    return Path(platformdirs.user_cache_dir("compactedit", appauthor=False)) / "compile"


# ---- scaling a batch out: devices, workers, shards, engines ------------------------------------------------------

MAX_WORKERS = 64
ENGINES = ("local", "ray")
ALL_DEVICES = "all"  # every CUDA device; counting them needs torch, so the batch resolves it


def devices(value: Any, name: str = "--devices") -> list[str] | str:
    """``all`` (kept as is), or a comma list of device indices and names: ``0,1,3`` means ``cuda:0,cuda:1,cuda:3``
    and ``cpu,cpu`` two CPU workers. A CUDA device may appear once; ``cpu`` as often as wanted."""
    text = str(value).strip().lower()
    if text == ALL_DEVICES:
        return ALL_DEVICES
    names = [part.strip() for part in text.split(",")]
    chosen = []
    for part in names:
        spelled = f"cuda:{part}" if part.isdigit() else part
        if spelled in ("auto", "cuda") or not _DEVICE.match(spelled):
            raise UsageError(f"{name} takes all, or a comma list of GPU indices or cpu (got {value!r})")
        if spelled != "cpu" and spelled in chosen:
            raise UsageError(f"{name} names {spelled} twice (one worker per GPU)")
        chosen.append(spelled)
    if len(chosen) > MAX_WORKERS:
        raise UsageError(f"{name} names more than {MAX_WORKERS} devices")
    return chosen


def workers(value: Any, name: str = "--workers") -> int:
    return bounded_int(value, name, 1, MAX_WORKERS)


def engine(value: Any, name: str = "--engine") -> str:
    text = str(value).strip().lower()
    if text not in ENGINES:
        raise UsageError(f"{name} must be one of {', '.join(ENGINES)} (got {value!r})")
    return text


def shard(value: Any, environ: Mapping[str, str], name: str = "--shard") -> tuple[int, int]:
    """``K/N`` (1 <= K <= N), or ``auto``: Slurm's array task, numbered from ``SLURM_ARRAY_TASK_MIN`` (an array
    ``--array=0-7`` and one ``--array=1-8`` both give shards 1/8 … 8/8; a stepped array is divided by its step)."""
    text = str(value).strip().lower()
    if text == "auto":
        try:
            task = int(environ["SLURM_ARRAY_TASK_ID"])
            count = int(environ["SLURM_ARRAY_TASK_COUNT"])
            base = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = max(1, int(environ.get("SLURM_ARRAY_TASK_STEP", "1")))
        except KeyError as exc:
            raise UsageError(f"{name} auto needs Slurm's array variables ({exc.args[0]} is not set)") from None
        except ValueError:
            raise UsageError(f"{name} auto: Slurm's array variables are not integers") from None
        k, n = (task - base) // step + 1, count
    else:
        k_text, slash, n_text = text.partition("/")
        if not slash or not k_text.isdigit() or not n_text.isdigit():
            raise UsageError(f"{name} must be K/N (for example 2/8) or auto (got {value!r})")
        k, n = int(k_text), int(n_text)
    if not 1 <= k <= n:
        raise UsageError(f"{name}: shard {k} of {n} is out of range (K runs from 1 to N)")
    return k, n
