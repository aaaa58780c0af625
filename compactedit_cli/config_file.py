"""compactedit's own config file: defaults for the model, device, dtype, offload and output format.

It lives in the platform's config folder (``platformdirs``), or under ``COMPACTEDIT_HOME`` when that is set.
Weights never go here: they stay in the Hugging Face cache. Command-line flags always win over the file.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from .errors import UsageError

KEYS = {
    "model": "default --model (alias, hub id or folder)",
    "device": "default --device (auto, cpu, cuda, cuda:N, mps)",
    "dtype": "default --dtype (auto, bf16, fp16, fp32)",
    "offload": "default --offload (none, model, sequential)",
    "output_format": "default output format for batch (png, jpg, webp)",
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


def load() -> dict[str, str]:
    """The saved defaults; a malformed file is a one-line error that names it."""
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UsageError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    bad = sorted(k for k, v in data.items() if not isinstance(v, str))
    if bad:
        raise UsageError(f"config file {path}: {', '.join(bad)} must be strings")
    return data


def save(values: dict[str, str]) -> Path:
    """Write the defaults (sorted, one ``key = "value"`` per line)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{key} = {_toml_string(values[key])}" for key in sorted(values)]
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def set_value(key: str, value: str) -> Path:
    if key not in KEYS:
        raise UsageError(f"unknown config key {key!r} (one of: {', '.join(KEYS)})")
    values = load()
    values[key] = value
    return save(values)


def unset_value(key: str) -> Path:
    if key not in KEYS:
        raise UsageError(f"unknown config key {key!r} (one of: {', '.join(KEYS)})")
    values = load()
    values.pop(key, None)
    return save(values)
