"""compactedit's own config file: defaults for the model, device, dtype, offload, output format, EXIF policy,
kernels, quantisation and compiling.

It lives in the platform's config folder (``platformdirs``), or under ``COMPACTEDIT_HOME`` when that is set.
Weights never go here: they stay in the Hugging Face cache. Command-line flags always win over the file.

Values are checked with the same rules as the flags, when they are set and again when the file is read (it may
have been edited by hand), so a bad value fails at once, naming the key and the file, instead of in every later
edit. The model is only checked for its shape here (one line of text); whether it is a usable alias, hub id or
folder is decided where it is used, since that check imports torch (:func:`cli.flags.model_options`).
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Callable
from pathlib import Path

from . import options
from .errors import CompactEditError, OutputError, UsageError

KEYS = {
    "model": "default --model (alias, hub id or folder)",
    "device": "default --device (auto, cpu, cuda, cuda:N, mps)",
    "dtype": "default --dtype (auto, bf16, fp16, fp32)",
    "offload": "default --offload (none, model, sequential)",
    "output_format": "default output format of batch, and of edit when -o gives none (png, jpg, webp)",
    "server": "default --server of edit and batch (auto, never, http://HOST:PORT or a socket path)",
    "exif": "default --exif: what of the input's EXIF and XMP outputs keep (safe, keep, none)",
    "kernels": "default --kernels of the transformer (off, triton)",
    "quantize": "default --quantize of the transformer's linear layers (none, fp8)",
    "compile": "torch.compile the transformer unless --compile/--no-compile says (off, on, auto, aot)",
}
DEFAULTS = {
    "model": options.DEFAULT_MODEL,
    "device": "auto",
    "dtype": "auto",
    "offload": "none",
    "output_format": options.DEFAULT_FORMAT,
    "server": options.DEFAULT_SERVER,
    "exif": options.DEFAULT_EXIF,
    "kernels": options.DEFAULT_KERNELS,
    "quantize": options.DEFAULT_QUANTIZE,
    "compile": options.DEFAULT_COMPILE,
}


def _model(value: str, name: str) -> str:
    text = value.strip()
    if not text or not text.isprintable():
        raise UsageError(f"{name} must be an alias, a hub id (owner/name) or a folder (got {value!r})")
    return text


# Each key's check: the options.py rule for the flag it stands for, returning the value as it is stored.
CHECKS: dict[str, Callable[[str, str], str]] = {
    "model": _model,
    "device": options.device,
    "dtype": options.dtype,
    "offload": options.offload,
    "output_format": options.output_format_name,
    "server": options.server,
    "exif": options.exif_policy,
    "kernels": options.kernels,
    "quantize": options.quantize,
    "compile": options.compile_mode,
}


def config_dir() -> Path:
    """``COMPACTEDIT_HOME`` if set, else the platform's user config folder."""
    override = os.environ.get("COMPACTEDIT_HOME")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("compactedit", appauthor=False))


def config_path() -> Path:
    return config_dir() / "config.toml"


def _key(key: str) -> str:
    if key not in KEYS:
        raise UsageError(f"unknown config key {key!r} (one of: {', '.join(KEYS)})")
    return key


def check(key: str, value: str) -> str:
    """``value`` checked as ``key`` (the message names the key), in the form it is stored."""
    return CHECKS[_key(key)](value, key)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _read(writing: bool = False) -> dict[str, str]:
    """The file's keys and values as written (a missing file is empty); only its syntax is checked, so that
    ``set`` and ``unset`` can repair a file holding a bad value. An unusable place is a usage error, or an output
    error when ``writing``."""
    path = config_path()
    unusable = OutputError if writing else UsageError
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except NotADirectoryError:
        raise unusable(f"config folder {path.parent} is unusable: it is, or lies under, a file") from None
    except IsADirectoryError:
        raise unusable(f"config file {path} is a folder") from None
    except OSError as exc:
        raise unusable(f"cannot read config file {path}: {_reason(exc)}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UsageError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    bad = sorted(k for k, v in data.items() if not isinstance(v, str))
    if bad:
        raise UsageError(f"config file {path}: {', '.join(bad)} must be strings")
    return data


def load() -> dict[str, str]:
    """The saved defaults, each checked; a bad one is a one-line error naming the key, the file and the repair."""
    values = _read()
    for key, value in values.items():
        try:
            values[key] = check(key, value)
        except CompactEditError as exc:
            raise blame(key, exc) from None
    return values


def blame(key: str, exc: CompactEditError) -> UsageError:
    """A usage error saying that the saved ``key`` caused ``exc``, and how to change it."""
    return UsageError(
        f"config file {config_path()}: {exc}", hint=f"change it with: compactedit config set {key} VALUE, or unset it"
    )


def get(key: str) -> tuple[str, bool]:
    """The value in effect for ``key``, and whether it comes from the file (else it is the built-in default)."""
    values = load()
    return (values[key], True) if _key(key) in values else (DEFAULTS[key], False)


def save(values: dict[str, str]) -> Path:
    """Write the defaults (sorted, one ``key = "value"`` per line), whole or not at all."""
    path = config_path()
    lines = [f"{key} = {_toml_string(values[key])}" for key in sorted(values)]
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write config file {path}: {_reason(exc)}") from None
    return path


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def set_value(key: str, value: str) -> Path:
    stored = check(key, value)
    values = _read(writing=True)
    values[key] = stored
    return save(values)


def unset_value(key: str) -> Path:
    values = _read(writing=True)
    values.pop(_key(key), None)
    return save(values)
