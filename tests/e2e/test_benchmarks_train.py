"""The training benchmarks run end to end at tiny sizes, with and without Opacus installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HAVE_OPACUS = importlib.util.find_spec("opacus") is not None


def _run(module: str, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_dp_step_tiny(tmp_path: Path) -> None:
    report = tmp_path / "step.json"
    stdout = _run(
        "dp_step",
        *("--models", "cnn", "--batch-size", "8", "--repeat", "1", "--warmup", "0"),
        *("--json", str(report)),
    )
    assert "ratio/np" in stdout and "ratio/ours" in stdout
    rows = {r["variant"]: r for r in json.loads(report.read_text())["rows"]}
    assert rows["non-private"]["ratio_nonprivate"] == pytest.approx(1.0)
    assert rows["mpcdp"]["ratio_ours"] == pytest.approx(1.0)
    assert rows["mpcdp"]["step_s"] > 0
    if HAVE_OPACUS:
        assert rows["opacus-hooks"]["step_s"] > 0, rows["opacus-hooks"]["error"]
        assert rows["opacus-ghost"]["step_s"] > 0, rows["opacus-ghost"]["error"]
    else:
        assert "Opacus rows are skipped" in stdout


def test_dp_step_without_opacus(tmp_path: Path) -> None:
    # an `opacus` that fails to import, first on the path, whether or not one is installed:
    # the benchmark must leave its rows out and say so
    fake = tmp_path / "hide" / "opacus"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('opacus hidden by the test')\n")
    path = os.pathsep.join([str(fake.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    stdout = _run(
        "dp_step",
        *("--models", "mlp", "--mlp-widths", "32", "--batch-size", "4", "--repeat", "1"),
        *("--warmup", "0"),
        env=env,
    )
    assert "Opacus rows are skipped" in stdout
    assert "ratio/np" in stdout and "opacus-hooks" not in stdout


def test_digits_utility_quick(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    report = tmp_path / "utility.json"
    stdout = _run(
        "digits_utility",
        *("--quick", "--seeds", "1", "--epochs", "1", "--epsilons", "3"),
        *("--json", str(report)),
    )
    assert "ratio with/without" in stdout
    data = json.loads(report.read_text())
    configs = {r["config"] for r in data["runs"]}
    assert {"non-private", "mpcdp", "mpcdp-warm"} <= configs
    assert data["summary"]["warm_start"]["error_increase_without"] is not None
    if HAVE_OPACUS:
        assert "opacus" in configs
        assert "eps=3" in data["summary"]["gaps_pp"]
    else:
        assert "Opacus rows are skipped" in stdout


def test_federation_overhead_tiny(tmp_path: Path) -> None:
    report = tmp_path / "overhead.json"
    stdout = _run(
        "federation_overhead",
        *("--model", "mlp:8,6,3", "--examples", "40", "--batch-size", "12"),
        *("--steps", "2", "--warmup", "1", "--repeat", "1", "--json", str(report)),
    )
    assert "ratio federated back to back / local" in stdout
    assert "ratio federated with pads ready / 3 local at once" in stdout
    assert "ratio federated with pads ready / plaintext federated" in stdout
    data = json.loads(report.read_text())
    assert data["num_params"] == 8 * 6 + 6 + 6 * 3 + 3
    assert len(data["federated_steps_s"]) == 3 and len(data["federated_ready_steps_s"]) == 2
    assert data["local_together_s"] > 0 and data["settle_s"] >= 0.2
    assert len(data["plaintext_steps_s"]) == 3 and data["plaintext_s"] > 0
    assert len(data["transport_only_steps_s"]) == 3 and data["transport_only_s"] > 0
    assert "transport only" in stdout


def test_one_run_audit_tiny(tmp_path: Path) -> None:
    report = tmp_path / "audit.json"
    stdout = _run(
        "one_run_audit",
        *("--canaries", "50", "--epsilons", "3", "--broken", "inf", "--epochs", "1"),
        # 150 canaries cannot test a claim of 3 (the ceiling is below it): the script
        # refuses such a run unless told to run it anyway, which this smoke test does
        "--allow-untestable",
        # the script exits 1 when an honest bound exceeds its claim: at confidence 1 - 1e-7
        # that happens with probability <= 1e-7
        *("--confidence", "0.9999999", "--json", str(report)),
    )
    assert "audit lb" in stdout and "honest rows below their claim: True" in stdout
    rows = json.loads(report.read_text())["rows"]
    assert [r["noise"] for r in rows] == ["honest", "none"]
    assert all(r["m"] == 150 for r in rows)
    assert rows[0]["lower_bound"] <= rows[0]["claimed_epsilon"]
