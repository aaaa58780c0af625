"""Real-size component configs, as package data: what a random-weight build of the published model needs.

Each ``<name>.json`` holds ``source`` (where the values come from: the VIBE reference notes), ``config`` (the
component's config as its checkpoint file would hold it) and any architecture constants that are not config fields.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load_config(name: str) -> dict[str, Any]:
    """The document ``configs/<name>.json`` (a fresh copy, so callers may edit it)."""
    text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
