"""One budget per data, with real party nodes (loopback mTLS, SQLite ledgers): two dataset
entries over the same file that share a budget (party.toml ``budget = "..."``) draw on one
ledger balance, whether a coordinator queries them or trains two models on them, and a
coordinator that alternates between the entries cannot spend more than the one budget. A
party whose entries had budgets of their own keeps every charge when they start sharing one,
and ``mpcdp budget`` shows the shared budget once."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mpcdp.cli.app import app
from mpcdp.config.party_config import load_party_config
from mpcdp.dp import events as ev
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import MpcdpError, RoundAborted
from mpcdp.federation import Federation
from mpcdp.party.node import set_budgets
from tests.conftest import PARTIES, build_net

#: a second entry over each party's raises CSV, drawing on the first entry's budget
SECOND = """
[datasets.raises2]
path = "{p}.csv"
budget = "raises"
epsilon = 3.0
delta = 1e-6
[datasets.raises2.columns.raise]
lower = 0
upper = 5000
"""


def test_a_coordinator_alternating_entries_spends_one_budget(tmp_path: Path) -> None:
    """Budget 3 at every party, queries of epsilon 1 alternating between the two entries:
    three are answered, the fourth is refused whichever entry it names, and every ledger
    holds one budget, spent 3."""
    net = build_net(tmp_path, extra={p: SECOND.format(p=p) for p in PARTIES})
    try:
        with Federation.from_config(net.federation) as fed:
            for i, name in enumerate(("raises", "raises2", "raises")):
                fed.sum(dataset=name, column="raise", epsilon=1.0, query_id=f"q{i}")
            for name in ("raises2", "raises"):
                with pytest.raises(MpcdpError):
                    fed.sum(dataset=name, column="raise", epsilon=1.0, query_id=f"more-{name}")
        for node in net.nodes.values():
            assert node.ledger.datasets() == ["raises"]
            assert node.ledger.status("raises").spent_epsilon == pytest.approx(3.0)
            assert node.ledger.status("raises2").remaining_epsilon == 0
            described = {d.name: d for d in node.describe("analyst")}
            assert described["raises"].remaining_epsilon == described["raises2"].remaining_epsilon
        out = CliRunner().invoke(app, ["budget", "--config", str(tmp_path / "alice.toml")])
        assert out.exit_code == 0, out.output
        assert out.output.count("budget raises (datasets raises, raises2): spent 3 of 3") == 1
        assert "  raises2:" not in out.output
        obj = json.loads(
            CliRunner()
            .invoke(app, ["budget", "--config", str(tmp_path / "alice.toml"), "--json"])
            .stdout
        )
        assert list(obj["datasets"]) == ["raises"]
        assert obj["datasets"]["raises"]["datasets"] == ["raises", "raises2"]
    finally:
        net.stop()


def _examples(root: Path) -> dict[str, str]:
    """Each party's 30 examples in one .npz, declared twice: ex, and ex_wide sharing ex's
    budget (a second entry to try a wider model on the same data)."""
    extra = {}
    for i, p in enumerate(PARTIES):
        rng = np.random.default_rng(i)
        np.savez(
            root / f"{p}.npz", x=rng.normal(size=(30, 8)).astype(np.float32), y=np.arange(30) % 3
        )
        extra[p] = "".join(
            f'\n[datasets.{name}]\npath = "{p}.npz"\nnum_classes = 3\nepsilon = 3.0\n'
            f"delta = 1e-5\n{budget}\n"
            for name, budget in (("ex", ""), ("ex_wide", 'budget = "ex"'))
        )
    return extra


def test_two_models_on_two_entries_with_one_budget_draw_on_one_balance(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    net = build_net(tmp_path, extra=_examples(tmp_path))
    run = {"target_delta": 1e-5, "epochs": 1, "batch_size": 10}
    try:
        with Federation.from_config(net.federation) as fed:
            fed.train(dataset="ex", model="mlp:8,6,3", target_epsilon=1.5, seed=1, **run)
            first = {p: n.ledger.status("ex").spent_epsilon for p, n in net.nodes.items()}
            fed.train(dataset="ex_wide", model="mlp:8,12,3", target_epsilon=1.5, seed=2, **run)
            both = {p: n.ledger.status("ex").spent_epsilon for p, n in net.nodes.items()}
            # a third run that fits the budget alone but not after the two: refused at
            # every site before any charge, whichever entry it names
            for name in ("ex", "ex_wide"):
                with pytest.raises(RoundAborted, match="budget"):
                    fed.train(dataset=name, model="mlp:8,6,3", target_epsilon=2.9, seed=3, **run)
        for p, node in net.nodes.items():
            assert 1.4 < first[p] <= 1.5
            assert first[p] < both[p] <= 3.0
            assert node.ledger.status("ex").spent_epsilon == both[p]  # nothing more
            assert node.ledger.status("ex_wide").spent_epsilon == both[p]
            assert node.ledger.datasets() == ["ex", "raises"]
            notes = " ".join(c.note for c in node.ledger.charges("ex_wide"))
            assert "mlp:8,6,3" in notes and "mlp:8,12,3" in notes
    finally:
        net.stop()


def test_entries_that_had_budgets_of_their_own_keep_their_charges_when_they_share(
    tmp_path: Path,
) -> None:
    """A ledger from before: budgets raises and raises2, each charged. Declared to share
    raises, the node's start moves raises2's charges onto raises: spent 2.5 of 3, no charge
    lost, and the ledger still verifies."""
    (tmp_path / "a.csv").write_text("raise\n1\n")
    cfg = tmp_path / "alice.toml"
    cfg.write_text(
        'id = "alice"\nlisten = "127.0.0.1:0"\nledger = "l.sqlite"\n[tls]\nca = "ca.pem"\n'
        'cert = "a.pem"\nkey = "a.key"\ncoordinators = ["analyst"]\n'
        + SECOND.replace("{p}", "a").replace("raises2", "raises").replace('budget = "raises"', "")
        + SECOND.format(p="a")
    )
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        for i, name in enumerate(("raises", "raises2")):
            led.set_budget(name, epsilon=3.0, delta=1e-6)
            led.charge(dataset=name, query_id=f"q{i}", event=ev.PureDp(epsilon=Fraction(2 + i, 2)))
    config = load_party_config(cfg)
    with BudgetLedger(tmp_path / "l.sqlite", owner=True) as led:
        set_budgets(led, config)
        assert led.datasets() == ["raises"]
        assert led.status("raises2").spent_epsilon == pytest.approx(2.5)
        assert led.status("raises").queries == 2
    with BudgetLedger(tmp_path / "l.sqlite", owner=True) as led:  # a restart: nothing moves
        set_budgets(led, config)
        assert led.status("raises").spent_epsilon == pytest.approx(2.5)
