"""The secure-sum benchmark end to end at a tiny size: party processes, cold and warm
rounds side by side, and no Propose in a warm round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_secure_sum_tiny(tmp_path: Path) -> None:
    report = tmp_path / "sum.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.secure_sum",
            *("--parties", "3", "--sizes", "1000", "--repeat", "2"),
            *("--mpyc-max-work", "0", "--json", str(report)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "warm/plain" in out.stdout and "cold/plain" in out.stdout
    (row,) = json.loads(report.read_text())
    assert row["mpcdp_warm_proposes"] == 0  # a warm round is one Contribute per party
    assert row["mpcdp_propose_s"] > 0  # a cold round proposes
    assert row["mpcdp_bytes_per_coord"] == 4.0
    for key in ("mpcdp_warm_s", "mpcdp_cold_s", "mpcdp_first_s", "plain_s"):
        assert 0 < row[key] < 300
