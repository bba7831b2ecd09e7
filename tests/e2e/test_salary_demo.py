"""The salary demo as a user runs it: the Python API, `mpcdp demo salary` (four party
processes, or local), Ctrl-C clean-up, the script in demos/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mpcdp.cli.app import app
from mpcdp.demos import salary_demo

ROOT = Path(__file__).resolve().parents[2]


def test_salary_demo_python_api(tmp_path: Path) -> None:
    report = salary_demo.run(workdir=tmp_path, epsilon=1.0)
    assert report.exact_mean == 3171.5
    assert sum(report.textbook_shares[0]) % 2**64 == 3800 % 2**64
    assert [b.remaining_epsilon for b in report.budgets] == [1.0] * 4
    dp = report.dp
    assert dp.statistic == "mean" and dp.parties == ("alice", "bob", "carlos", "david")
    assert dp.interval95 is not None
    lo, hi = dp.interval95
    assert isinstance(dp.value, float)  # a mean is one number
    assert 0 <= lo <= dp.value <= hi <= 5000  # inside the public bounds
    assert dp.budget_remaining == {"alice": 1.0, "bob": 1.0, "carlos": 1.0, "david": 1.0}
    # one ledger entry per query: the exact mean and the DP mean (not one per tensor)
    assert [b.queries for b in report.budgets] == [2] * 4


def _mpcdp() -> list[str]:
    exe = shutil.which("mpcdp", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "mpcdp.cli"]


def test_cli_demo_salary_json_with_and_without_party_processes() -> None:
    """``--json`` over four party processes and with ``--local`` (one process): the same
    exact mean, a valid DP mean in each, one schema."""
    out = subprocess.run(
        [*_mpcdp(), "demo", "salary", "--json"], check=True, capture_output=True, text=True
    )
    report = json.loads(out.stdout)
    assert report["exact_mean"] == pytest.approx(3171.5)
    assert report["budget_remaining"] == {"alice": 1.0, "bob": 1.0, "carlos": 1.0, "david": 1.0}
    assert set(report["observed_words"]) == {"alice", "bob", "carlos", "david"}
    _check_dp_mean(report["dp"])
    local = subprocess.run(
        [*_mpcdp(), "demo", "salary", "--local", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    local_report = json.loads(local.stdout)
    assert local_report["exact_mean"] == 3171.5
    _check_dp_mean(local_report["dp"])
    # both variants emit one schema: the same keys at every level
    assert set(local_report) == set(report)
    assert set(local_report["dp"]) == set(report["dp"])
    assert set(local_report["budget_remaining"]) == set(report["budget_remaining"])
    assert set(local_report["observed_words"]) == set(report["observed_words"])


def _check_dp_mean(dp: dict[str, Any]) -> None:
    """``dp``: the demo's JSON report of the DP mean."""
    lo, hi = dp["interval95"]
    assert dp["statistic"] == "mean" and dp["mechanism"] == "discrete-laplace"
    assert 0 <= lo <= dp["value"] <= hi <= 5000
    assert dp["noise_std"] > 0


def test_demo_cleans_up_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import time

    env = dict(__import__("os").environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [*_mpcdp(), "demo", "salary"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob("mpcdp-salary-*/*/port")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode in (0, 130)
    assert not list(tmp_path.glob("mpcdp-salary-*")), "temporary folder left behind"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps, "party processes left behind"


def test_cli_demo_salary_text_and_bad_epsilon() -> None:
    out = subprocess.run([*_mpcdp(), "demo", "salary"], check=True, capture_output=True, text=True)
    assert "3171.50" in out.stdout and "Alice" in out.stdout
    # refused before anything starts: the same app in this process
    bad = CliRunner().invoke(app, ["demo", "salary", "--epsilon", "-1"])
    assert bad.exit_code == 2 and "epsilon=-1.0" in bad.stderr


def test_demo_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "demos" / "salary_average.py")],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "3171.5" in out.stdout


def test_cli_demo_default_bound_matches_the_demo() -> None:
    from mpcdp.cli import demo_commands

    assert demo_commands.DEFAULT_BOUND == salary_demo.DEFAULT_BOUND
