"""Load: a long batch through the real CLI does not leak memory."""

from __future__ import annotations

import gc
import json

import psutil
import pytest
from conftest import make_photo

from compactedit_cli.batch import results as batch

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.single_thread

ITEMS = 500


@pytest.mark.slow
def test_500_items_without_a_leak(cli, tiny_checkpoint, tmp_path, monkeypatch):
    """RSS after item 500 stays within 10% of RSS after item 50 (measured in the whole pytest process: 494 MB and
    499 MB). Sampled as each item's results line is written; the first 50 items warm every cache and pool."""
    src = tmp_path / "src"
    for index in range(ITEMS):
        make_photo(src / f"p{index:03d}.png", (64, 64), seed=index)
    samples: dict[int, int] = {}
    real_append = batch.ResultsLog.append

    def append(log, record) -> None:  # instrumentation, not a fault: the real append runs
        real_append(log, record)
        written = len(samples) + 1
        if written in (50, ITEMS):
            gc.collect()
        samples[written] = psutil.Process().memory_info().rss

    monkeypatch.setattr(batch.ResultsLog, "append", append)
    out = tmp_path / "out"
    args = ["-i", "x", "-o", out, "-m", tiny_checkpoint, "--steps", "1", "--no-binning", "--batch-size", "8", "-q"]
    result = cli("batch", src, *args)
    assert result.exit_code == 0, result.stderr
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == ITEMS and all(json.loads(line)["status"] == "ok" for line in lines)
    at_50, at_500 = samples[50], samples[ITEMS]
    print(f"RSS after item 50: {at_50 / 2**20:.0f} MB, after item {ITEMS}: {at_500 / 2**20:.0f} MB")
    assert at_500 <= at_50 * 1.10
