"""A party's total budget across all its data (party.toml ``[total_budget]``,
BudgetLedger.set_total): every dataset's charges and live reservations count against it, pure
epsilons add and RDP curves compose at the total's delta, a refusal names it and writes
nothing, it survives reopening and is checked like every row, and a party that declares one
refuses a query on one dataset once the others spent the total."""

from __future__ import annotations

import json
import sqlite3
from fractions import Fraction
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mpcdp.cli.app import app
from mpcdp.config.party_config import load_party_config
from mpcdp.dp import events as ev
from mpcdp.dp.accountant import compose
from mpcdp.dp.ledger import TOTAL, BudgetLedger
from mpcdp.errors import BudgetExceededError, ConfigError, LedgerError
from mpcdp.federation import Federation
from tests.conftest import build_net, party_toml

PURE = ev.PureDp


def _ledger(tmp_path: Path) -> BudgetLedger:
    led = BudgetLedger.create(tmp_path / "l.sqlite")
    for name in ("a", "b"):
        led.set_budget(name, epsilon=3, delta=1e-6)
    return led


def test_pure_charges_on_every_dataset_add_up_against_the_total(tmp_path: Path) -> None:
    with _ledger(tmp_path) as led:
        assert led.total() is None
        led.set_total(epsilon=2, delta=1e-6)
        led.charge(dataset="a", query_id="q1", event=PURE(epsilon=Fraction("1.5")))
        with pytest.raises(BudgetExceededError, match=r"total_budget") as info:
            led.charge(dataset="b", query_id="q2", event=PURE(epsilon=Fraction(1)))
        assert info.value.dataset == TOTAL
        assert led.status("b").queries == 0  # nothing written by the refusal
        led.charge(dataset="b", query_id="q3", event=PURE(epsilon=Fraction("0.5")))
        total = led.total()
        assert total is not None
        assert total.pure_epsilon_spent == Fraction(2) and total.remaining_epsilon == 0
        led.set_total(epsilon=None)  # the owner lifts it: each budget alone again
        led.charge(dataset="b", query_id="q4", event=PURE(epsilon=Fraction(1)))


def test_rdp_charges_compose_across_datasets_at_the_total_delta(tmp_path: Path) -> None:
    step = ev.Skellam(mu=1e8, l1_sensitivity=4e6, l2_sensitivity=2000.0, steps=1)
    two = compose([step, step], delta=1e-5).epsilon
    with _ledger(tmp_path) as led:
        led.set_total(epsilon=Fraction(str(two * 1.001)), delta=1e-5)
        led.charge(dataset="a", query_id="q1", event=step)
        led.charge(dataset="b", query_id="q2", event=step)
        total = led.total()
        assert total is not None and total.spent_epsilon == pytest.approx(two)
        with pytest.raises(BudgetExceededError, match="total_budget"):
            led.check(dataset="a", event=step)


def test_live_reservations_on_other_datasets_count(tmp_path: Path) -> None:
    with _ledger(tmp_path) as led:
        led.set_total(epsilon=1, delta=1e-6)
        led.reserve(dataset="a", query_id="r1", event=PURE(epsilon=Fraction("0.75")), ttl_s=60)
        with pytest.raises(BudgetExceededError, match=r"reserved by your rounds") as mine:
            led.reserve(dataset="b", query_id="r2", event=PURE(epsilon=Fraction("0.5")), ttl_s=60)
        assert "other coordinators" not in str(mine.value)
        # another coordinator is told that others' reservations are in the way, not how much
        with pytest.raises(BudgetExceededError, match=r"other coordinators' reservations") as x:
            led.reserve(
                dataset="b", query_id="r3", coordinator="x",
                event=PURE(epsilon=Fraction("0.5")), ttl_s=60,
            )  # fmt: skip
        assert "0.75" not in str(x.value) and "reserved by your rounds" not in str(x.value)
        # the reservation's own charge is not counted twice
        led.charge(dataset="a", query_id="r1", event=PURE(epsilon=Fraction("0.75")), reserved=True)
        led.release("r1")
        led.charge(dataset="b", query_id="q", event=PURE(epsilon=Fraction("0.25")))


def test_the_total_survives_reopening_and_a_corrupt_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with _ledger(tmp_path) as led:
        led.set_total(epsilon="1/2", delta=1e-6)
        led.charge(dataset="a", query_id="q", event=PURE(epsilon=Fraction("0.5")))
    with BudgetLedger(path) as led:
        total = led.total()
        assert total is not None and total.budget_epsilon == Fraction(1, 2)
        with pytest.raises(BudgetExceededError):
            led.charge(dataset="b", query_id="q2", event=PURE(epsilon=Fraction("0.1")))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='lots' WHERE key='total_epsilon'")
    with pytest.raises(LedgerError, match="total_epsilon='lots'"):
        BudgetLedger(path)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("epsilon = 0\ndelta = 1e-6", r"total_budget\.epsilon: must be > 0"),
        ("epsilon = 1\ndelta = 1", r"total_budget\.delta: must be in \[0, 1\)"),
        ("epsilon = 1\nwhatever = 1", r"total_budget.*whatever"),
        ("delta = 1e-6", r"total_budget\.epsilon"),
        # without delta, or delta 0 with a dataset allowing RDP releases: every training run
        # and Skellam query would be refused
        ("epsilon = 1", r"total_budget\.delta: is required"),
        ("epsilon = 1\ndelta = 0", r"total_budget\.delta: is 0, but datasets \['raises'\]"),
    ],
)
def test_bad_total_budgets_are_refused_naming_the_key(
    tmp_path: Path, table: str, message: str
) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text(party_toml("alice", ("alice", "bob")) + f"\n[total_budget]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_party_config(cfg)


def test_a_party_with_a_total_refuses_a_dataset_once_the_others_spent_it(tmp_path: Path) -> None:
    """Two datasets over other files, each with a budget of 3; a total of 1.2 at alice: a
    count on ``raises`` spends 1, then a count on ``raises2`` is refused by alice alone."""
    extra = {}
    for p in ("alice", "bob", "carlos"):
        (tmp_path / f"{p}-2.csv").write_text("raise,dept\n10,eng\n20,ops\n")
        extra[p] = (
            f'\n[datasets.raises2]\npath = "{p}-2.csv"\nepsilon = 3.0\ndelta = 1e-6\n'
            "[datasets.raises2.columns.raise]\nlower = 0\nupper = 5000\n"
            '[datasets.raises2.columns.dept]\ncategories = ["eng", "ops"]\n'
        )
    extra["alice"] += "\n[total_budget]\nepsilon = 1.2\ndelta = 1e-6\n"
    net = build_net(tmp_path, extra=extra)
    try:
        with Federation.from_config(net.federation) as fed:
            fed.count(dataset="raises", epsilon=1.0)
            with pytest.raises(Exception, match=r"total_budget") as info:
                fed.count(dataset="raises2", epsilon=0.5)
            assert "alice" in str(info.value)
        config = str(net.root / "alice.toml")
        out = CliRunner().invoke(app, ["budget", "--config", config, "--json"])
        text = CliRunner().invoke(app, ["budget", "--config", config]).stdout
    finally:
        net.stop()
    total = json.loads(out.stdout)["total_budget"]
    assert total["budget_epsilon"] == 1.2 and total["spent_epsilon"] == pytest.approx(1.0)
    assert "all datasets together (total_budget): spent 1 of 1.2 (left 0.2" in text
