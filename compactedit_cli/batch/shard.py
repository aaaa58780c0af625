"""Shards for any scheduler: ``--shard K/N`` keeps the items whose output path hashes to K.

The hash is of the output's path relative to the output folder, so the partition is the same on every node, in
any manifest order and on every resume; it needs no coordination, only one output folder. Each shard keeps its own
results file and lock, so the N shards run side by side; ``compactedit batch report`` merges their files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .plan import BatchItem

SHARD_RESULTS_GLOB = "results-shard-*-of-*.jsonl"


def shard_of(item: BatchItem, out_dir: Path, count: int) -> int:
    """The shard (1 … ``count``) that edits ``item``."""
    relative = item.output.relative_to(out_dir).as_posix()
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def select(items: list[BatchItem], out_dir: Path, shard: tuple[int, int]) -> list[BatchItem]:
    """The items of shard ``K/N``."""
    k, n = shard
    return [item for item in items if shard_of(item, out_dir, n) == k]


def results_name(shard: tuple[int, int]) -> str:
    return f"results-shard-{shard[0]}-of-{shard[1]}.jsonl"


def lock_name(shard: tuple[int, int]) -> str:
    return f".compactedit-batch-shard-{shard[0]}-of-{shard[1]}.lock"
