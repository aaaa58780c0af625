"""``compactedit selftest`` runs offline and reports the environment."""

from __future__ import annotations

import json


def test_selftest_passes_offline(cli):
    result = cli("selftest", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and all(report["checks"].values())
    assert {"compactedit", "torch", "diffusers", "transformers", "cuda_available", "mps_available"} <= set(report)


def test_selftest_human_output(cli):
    result = cli("selftest")
    assert result.exit_code == 0
    assert "output has the input size" in result.stderr and "torch" in result.stderr
