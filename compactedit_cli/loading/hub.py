"""Where weights come from: aliases, hub ids and local folders, resolved through the standard Hugging Face cache.

compactedit keeps no cache of its own: hub models live where ``huggingface_hub`` puts them (``HF_HOME`` /
``HF_HUB_CACHE``), so ``hf cache`` tools see them too. Offline mode (``HF_HUB_OFFLINE=1`` or ``--offline``) never
touches the network. Every resolved folder is verified (all implied files present, every safetensors header
readable and the file as long as it says) before anything loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UsageError
from .checkpoint import (
    COMPONENTS,
    CONFIG_FILES,
    WEIGHT_FILES,
    read_json,
    read_model_index,
    read_safetensors_header,
    verify_folder,
    weight_files,
)
from .refs import ALIASES, COMMIT, DEFAULT_MODEL, REPO_ID, REVISION, ModelRef, parse_model  # noqa: F401

# Only what loading needs: never pickles, notebooks or sample images.
DOWNLOAD_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    *(f"{name}/*.json" for name in WEIGHT_FILES),
    *(f"{name}/*.safetensors" for name in WEIGHT_FILES),
]


@dataclass(frozen=True)
class ResolvedModel:
    """A verified checkpoint folder and where it came from."""

    ref: ModelRef
    path: Path
    commit: str | None  # the snapshot's commit for hub models

    def label(self) -> str:
        """``repo@commit`` for hub models, the folder for local ones (what goes into output metadata)."""
        if self.ref.repo_id:
            return f"{self.ref.repo_id}@{self.commit[:12]}" if self.commit else self.ref.repo_id
        return str(self.path)


def is_offline(flag: bool = False) -> bool:
    """Offline when asked on the command line or by ``HF_HUB_OFFLINE``."""
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_command(ref: ModelRef) -> str:
    revision = f" --revision {ref.revision}" if ref.revision else ""
    return f"compactedit models download {ref.spec}{revision}"


def cache_dir() -> str:
    """The Hugging Face hub cache in use (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _snapshot(ref: ModelRef, *, local_only: bool, force: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                cache_dir=cache_dir(),
                allow_patterns=DOWNLOAD_PATTERNS,
                local_files_only=local_only,
                force_download=force,
                endpoint=os.environ.get("HF_ENDPOINT") or None,  # read now, not at import (mirrors, tests)
            )
        )
    except LocalEntryNotFoundError as exc:
        if local_only:
            raise CheckpointError(
                f"model {ref.spec} is not in the Hugging Face cache", hint=f"download it with: {download_command(ref)}"
            ) from exc
        raise CheckpointError(f"cannot reach the Hugging Face Hub to download {ref.spec} ({_reason(exc)})") from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"revision {ref.revision!r} of {ref.repo_id} does not exist") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise CheckpointError(f"model {ref.repo_id} was not found on the Hub (or needs a token)") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"downloading {ref.spec} failed ({_reason(exc)})", hint="re-run to resume") from exc
    except Exception as exc:  # the HTTP client's own errors (dropped connections, protocol errors)
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "h11"):
            raise
        raise CheckpointError(f"downloading {ref.spec} failed ({_reason(exc)})", hint="re-run to resume") from exc


def _reason(exc: BaseException) -> str:
    """One line saying why a hub call failed: the underlying network error where the hub wrapped one."""
    root = exc.__cause__ or exc.__context__ or exc
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0]}" if text else type(root).__name__


def _commit_of(snapshot: Path) -> str | None:
    return snapshot.name if COMMIT.match(snapshot.name) else None


def verify(ref: ModelRef, path: Path) -> None:
    """Check a folder before loading; the error says how to repair it."""
    try:
        verify_folder(path)
    except CheckpointError as exc:
        hint = f"re-download it with: {download_command(ref)} --force" if ref.repo_id else None
        raise CheckpointError(exc.message, hint=hint) from exc


def resolve(ref: ModelRef, *, offline: bool = False, download: bool = True) -> ResolvedModel:
    """A verified local folder for ``ref``: local as given, else the cached snapshot, else downloaded."""
    if ref.path is not None:
        verify(ref, ref.path)
        return ResolvedModel(ref, ref.path, None)
    try:
        snapshot = _snapshot(ref, local_only=True)
    except CheckpointError:
        if offline or not download:
            raise
        snapshot = _snapshot(ref, local_only=False)
    verify(ref, snapshot)
    return ResolvedModel(ref, snapshot, _commit_of(snapshot))


def download(ref: ModelRef, *, force: bool = False, offline: bool = False) -> ResolvedModel:
    """Fetch (or resume fetching) a hub model into the HF cache, then verify it; offline, verify the cached copy
    (a model that is not cached is then a model error naming what to do)."""
    if ref.repo_id is None:
        raise UsageError(f"{ref.spec} is a local folder; only hub models are downloaded")
    if offline and force:
        raise UsageError("--force downloads again, which offline mode (HF_HUB_OFFLINE / --offline) forbids")
    if offline:
        try:
            snapshot = _snapshot(ref, local_only=True)
        except CheckpointError as exc:
            raise CheckpointError(
                f"model {ref.spec} is not in the Hugging Face cache, and offline mode forbids downloading it",
                hint="download it online: without --offline, with HF_HUB_OFFLINE unset",
            ) from exc
    else:
        snapshot = _snapshot(ref, local_only=False, force=force)
    verify(ref, snapshot)
    return ResolvedModel(ref, snapshot, _commit_of(snapshot))


@dataclass(frozen=True)
class CachedModel:
    """One cached revision of an editing model."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]
    size_bytes: int
    path: Path
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "commit": self.commit,
            "refs": list(self.refs),
            "size_bytes": self.size_bytes,
            "path": str(self.path),
            "complete": self.complete,
        }


def _is_editing_model(snapshot: Path) -> bool:
    try:
        read_model_index(snapshot)
    except CheckpointError:
        return False
    return True


def _scan() -> Any:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(cache_dir())
    except CacheNotFound:
        return None


def list_cached() -> list[CachedModel]:
    """Every cached revision of a VIBE editing model, with its size and whether it is complete."""
    info = _scan()
    if info is None:
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            if not _is_editing_model(revision.snapshot_path):
                continue
            try:
                verify_folder(revision.snapshot_path)
                complete = True
            except CheckpointError:
                complete = False
            found.append(
                CachedModel(
                    repo_id=repo.repo_id,
                    commit=revision.commit_hash,
                    refs=tuple(sorted(revision.refs)),
                    size_bytes=revision.size_on_disk,
                    path=revision.snapshot_path,
                    complete=complete,
                )
            )
    return sorted(found, key=lambda m: (m.repo_id, m.commit))


@dataclass(frozen=True)
class Removal:
    """What removing a model would delete, so it can be shown (and confirmed) before anything goes."""

    ref: ModelRef
    commits: tuple[str, ...]
    size_bytes: int
    _strategy: Any

    def execute(self) -> int:
        """Delete the revisions; returns the bytes freed."""
        self._strategy.execute()
        return self.size_bytes


def removal(ref: ModelRef) -> Removal:
    """The cached revisions of a hub model that ``remove`` would delete (one if ``ref.revision`` is a commit or
    ref), and their size; nothing is deleted yet."""
    if ref.repo_id is None:
        raise UsageError(f"{ref.spec} is a local folder; compactedit only removes what it cached")
    info = _scan()
    repo = next((r for r in info.repos if r.repo_id == ref.repo_id and r.repo_type == "model"), None) if info else None
    if repo is None:
        raise CheckpointError(f"model {ref.spec} is not in the Hugging Face cache")
    revisions = [
        r.commit_hash
        for r in repo.revisions
        if ref.revision is None or ref.revision == r.commit_hash or ref.revision in r.refs
    ]
    if not revisions:
        raise CheckpointError(f"revision {ref.revision} of {ref.repo_id} is not in the cache")
    strategy = info.delete_revisions(*revisions)
    return Removal(ref, tuple(sorted(revisions)), strategy.expected_freed_size, strategy)


def describe(path: Path) -> dict[str, Any]:
    """Components, a config summary, parameter counts and dtypes of a checkpoint folder (headers only)."""
    index = read_model_index(path)
    summary: dict[str, Any] = {"path": str(path), "components": {}}
    for name in COMPONENTS:
        entry: dict[str, Any] = {"class": ".".join(index[name])}
        if name in WEIGHT_FILES:
            files = weight_files(path / name)
            params, dtypes, size = 0, set(), 0
            for file in files:
                for tensor in read_safetensors_header(file).values():
                    count = 1
                    for dim in tensor["shape"]:
                        count *= dim
                    params += count
                    dtypes.add(tensor["dtype"])
                size += file.stat().st_size
            entry.update(parameters=params, dtypes=sorted(dtypes), size_bytes=size, files=len(files))
        if name in CONFIG_FILES:
            entry["config"] = _config_summary(name, read_json(path / name / CONFIG_FILES[name]))
        summary["components"][name] = entry
    return summary


_SUMMARY_FIELDS = {
    "transformer": (
        "num_layers", "num_attention_heads", "attention_head_dim", "caption_channels", "in_channels", "out_channels",
        "num_meta_queries", "edit_head_stacks_num", "qk_norm", "cfg_distilled",
    ),
    "vae": ("latent_channels", "scaling_factor", "encoder_block_out_channels"),
    "scheduler": ("prediction_type", "flow_shift", "solver_order", "algorithm_type", "use_flow_sigmas"),
}  # fmt: skip


def _config_summary(name: str, config: dict[str, Any]) -> dict[str, Any]:
    if name == "text_encoder":
        text = config.get("text_config", {})
        vision = config.get("vision_config", {})
        return {
            "hidden_size": text.get("hidden_size"),
            "num_hidden_layers": text.get("num_hidden_layers"),
            "vocab_size": text.get("vocab_size"),
            "vision_depth": vision.get("depth"),
            "deepstack_visual_indexes": vision.get("deepstack_visual_indexes"),
        }
    return {key: config[key] for key in _SUMMARY_FIELDS.get(name, ()) if key in config}
