"""The DP SQL benchmarks run end to end at tiny sizes (their numbers are not checked: only
that every variant ran and counted the rows it was given)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(module: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_sql_engines_tiny(tmp_path: Path) -> None:
    report = tmp_path / "engines.json"
    _run(
        "sql_engines",
        *("--rows", "2000", "--csv-max-rows", "2000", "--spark-rows", "--repeat", "1"),
        "--skip-federation",  # a federation is launched by the utility test
        *("--tmp", str(tmp_path), "--json", str(report)),
    )
    got = json.loads(report.read_text())
    kinds = {r["kind"]: r for r in got["local"]}
    assert set(kinds) == {"duckdb-parquet", "duckdb-csv", "csv-loader"}
    assert all(r["rows"] == 2000 and r["peak_mb"] > 0 for r in kinds.values())
    assert [p.name for p in tmp_path.iterdir()] == ["engines.json"]  # its data removed


def test_sql_utility_tiny(tmp_path: Path) -> None:
    report = tmp_path / "utility.json"
    stdout = _run(
        "sql_utility",
        *("--rows", "3000", "--reps", "1", "--draws", "20"),
        *("--tmp", str(tmp_path), "--json", str(report)),
    )
    assert "declared R=3, G=2, P=2" in stdout
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == 15  # 5 departments x COUNT, AVG, MEDIAN
    counts = [r for r in rows if r["aggregate"] == "COUNT"]
    assert all(r["exact_over_true_minus_1"] == 0 for r in counts)  # the bounds drop no row
