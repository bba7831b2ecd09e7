"""``mpcdp budget`` as a person reads it: one line per query or training run (what it paid,
which coordinator, when), ``--dataset`` and ``--since`` (bad values named), the running
total explained in one line, and ``--json`` with the same lines."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mpcdp.cli.app import app
from mpcdp.dp import events as ev
from mpcdp.dp.ledger import BudgetLedger

PARTY = """
id = "alice"
listen = "127.0.0.1:0"
ledger = "l.sqlite"
[tls]
ca = "ca.pem"
cert = "alice.pem"
key = "alice.key"
coordinators = ["analyst", "other"]
[datasets.digits]
path = "ex.npz"
num_classes = 2
epsilon = 50
delta = 1e-6
[datasets.raises]
path = "ex2.npz"
num_classes = 2
epsilon = 5
delta = 1e-6
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A party whose ledger holds two training runs of 3 blocks (by two coordinators) and
    a query on digits, and one query on raises."""
    for name in ("ex.npz", "ex2.npz"):
        np.savez(tmp_path / name, x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "alice.toml").write_text(PARTY)
    block = ev.Skellam(mu=4e4, l1_sensitivity=50.0, l2_sensitivity=5.0, sample_rate=0.01, steps=10)
    with BudgetLedger.create(tmp_path / "l.sqlite") as ledger:
        ledger.set_budget("digits", epsilon=50, delta=1e-6)
        ledger.set_budget("raises", epsilon=5, delta=1e-6)
        for who in ("analyst", "other"):
            for b in range(3):
                ledger.charge(
                    dataset="digits",
                    query_id=f"train-1/{'cd' * 8}/{b}",
                    event=block,
                    coordinator=who,
                    note=f"training train-1 (mlp:4,2) steps {10 * b}-{10 * b + 9}",
                )
        ledger.charge(
            dataset="digits",
            query_id="q-1",
            event=ev.PureDp(Fraction(1, 2)),
            coordinator="analyst",
            note="count of * (discrete-laplace)",
        )
        ledger.charge(
            dataset="raises",
            query_id="q-2",
            event=ev.PureDp(Fraction(1, 10)),
            coordinator="other",
            note="sum of raise (discrete-laplace)",
        )
    return tmp_path / "alice.toml"


def budget(config: Path, *args: str) -> tuple[int, str, str]:
    out = CliRunner().invoke(app, ["budget", "--config", str(config), *args])
    return out.exit_code, out.stdout, out.stderr


def test_one_line_per_run_or_query_with_its_coordinator(config: Path) -> None:
    code, text, _ = budget(config)
    assert code == 0, text
    lines = [li.strip() for li in text.splitlines()]
    runs = [li for li in lines if "run train-1:" in li]
    assert len(runs) == 2  # six blocks, two runs (one per coordinator)
    assert "  analyst  run train-1: epsilon " in runs[0] and "  other  run train-1:" in runs[1]
    assert "30 steps in 3 blocks" in runs[0] and "training (mlp:4,2)" in runs[0]
    assert "RDP total" in runs[0]
    assert any("analyst  query q-1: epsilon 0.5;" in li for li in lines)
    assert "block" not in " ".join(li for li in lines if "query" in li.split(":")[0])
    assert "1 query (0 exact, no DP), 2 training runs" in text
    # the running total, explained once, in one line
    assert text.count("total: spent = the pure-DP epsilons added exactly") == 1
    assert "alone" not in text


def test_dataset_and_since_narrow_what_is_listed(config: Path) -> None:
    code, text, _ = budget(config, "--dataset", "raises")
    assert code == 0 and "raises: spent 0.1 of 5" in text and "digits" not in text
    code, text, _ = budget(config, "--since", "1h")
    assert code == 0 and text.count("run train-1:") == 2 and "since " in text
    code, text, _ = budget(config, "--since", "2999-01-01")
    assert code == 0 and "run train-1" not in text and "query q-" not in text
    assert "0 of 3" in text and "digits: spent" in text  # the totals stay the budget's
    obj = json.loads(budget(config, "--json", "--dataset", "digits", "--since", "2999-01-01")[1])
    assert list(obj["datasets"]) == ["digits"] and obj["since"].startswith("2999-01-01")
    assert obj["datasets"]["digits"]["runs"] == [] and obj["datasets"]["digits"]["entries"] == []


def test_json_has_one_line_per_run(config: Path) -> None:
    obj = json.loads(budget(config, "--json")[1])
    runs = obj["datasets"]["digits"]["runs"]
    assert [(r["kind"], r["id"], r["coordinator"]) for r in runs] == [
        ("training", "train-1", "analyst"),
        ("training", "train-1", "other"),
        ("query", "q-1", "analyst"),
    ]
    assert runs[0]["blocks"] == 3 and runs[0]["steps"] == 30 and runs[2]["epsilon"] == 0.5
    assert len(obj["datasets"]["digits"]["entries"]) == 7  # the blocks are still there
    assert "left = budget - spent" in obj["total_note"]


@pytest.mark.parametrize(
    ("args", "option", "value"),
    [
        (["--since", "last tuesday"], "--since", "'last tuesday'"),
        (["--since", "2026-02-30"], "--since", "'2026-02-30'"),
        (["--dataset", "digit"], "--dataset", "'digit'"),
    ],
)
def test_bad_values_are_named(config: Path, args: list[str], option: str, value: str) -> None:
    code, _, err = budget(config, *args)
    assert code == 2 and option in err and value in err


def test_a_misspelled_dataset_lists_the_valid_names(config: Path) -> None:
    _, _, err = budget(config, "--dataset", "digit")
    assert "did you mean 'digits'?" in err and "valid names: digits, raises" in err
