"""What a ``--model`` value names, checked without torch: an alias, a hub id at a revision, or a local folder.

The client side of a server (which must not import torch) matches models with these, as loading does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, UsageError

ALIASES = {
    "vibe": "iitolstykh/VIBE-Image-Edit",
    "vibe-distilled": "iitolstykh/VIBE-Image-Edit-DistilledCFG",
}
DEFAULT_MODEL = "vibe"

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``--model``: a local folder, or a hub repo at a revision."""

    spec: str
    repo_id: str | None = None
    path: Path | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        return self.repo_id or str(self.path)


def parse_model(spec: str, revision: str | None = None) -> ModelRef:
    """Validate a ``--model`` value: an alias, a local folder, or an ``owner/name`` hub id."""
    spec = spec.strip()
    if not spec:
        raise UsageError("--model is empty")
    if (revision is not None and not REVISION.match(revision)) or (revision and ".." in revision):
        raise UsageError(f"invalid revision {revision!r}")
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.replace("/", "") or Path(spec).is_dir()
    if looks_local and spec not in ALIASES:
        path = Path(spec).expanduser()
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"model {spec} is a file, not a model folder")
        if not path.is_dir():
            raise CheckpointError(f"model folder not found: {spec}")
        if revision:
            raise UsageError("--revision applies to hub models, not to a local folder")
        return ModelRef(spec=spec, path=path.resolve())
    repo_id = ALIASES.get(spec, spec)
    if not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise UsageError(
            f"unknown model {spec!r}: use an alias ({', '.join(ALIASES)}), a hub id (owner/name) or a local folder"
        )
    return ModelRef(spec=spec, repo_id=repo_id, revision=revision)


def recorded_model(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """The model and revision as records name them, known before loading: the hub id and the revision if it is a
    commit (a branch's commit is known only once resolved), or a local folder's name (never its path)."""
    ref = parse_model(spec, revision)
    commit = ref.revision if ref.revision and COMMIT.match(ref.revision) else None
    return ref.repo_id or ref.path.name, commit


def recorded_adapter(spec: str) -> str:
    """A LoRA adapter as records name it: a hub file (``owner/name/FILE``) as given, a local file by its name."""
    path = Path(spec).expanduser()
    return path.name if path.is_file() else spec
