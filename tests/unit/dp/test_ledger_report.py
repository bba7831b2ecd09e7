"""The ledger as `mpcdp budget` shows it: one entry per query or training block, exact
decimals, and RDP composition made visible."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from mpcdp.dp import events as ev
from mpcdp.dp.accountant import compose
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.dp.ledger_report import exact_decimal, report


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Fraction(1, 10), "0.1"),
        (Fraction(3), "3"),
        (Fraction(0), "0"),
        (Fraction(1, 8), "0.125"),
        (Fraction(-5, 4), "-1.25"),
        (Fraction(1, 40), "0.025"),
        (Fraction(1, 3), "1/3 (~0.333333)"),
    ],
)
def test_exact_decimal(value: Fraction, text: str) -> None:
    assert exact_decimal(value) == text


def test_one_entry_per_query_or_block_with_what_it_spent(tmp_path: Path) -> None:
    skellam = ev.Skellam(mu=400.0, l1_sensitivity=10.0, l2_sensitivity=10.0)
    block = ev.Skellam(mu=4e4, l1_sensitivity=50.0, l2_sensitivity=5.0, sample_rate=0.01, steps=10)
    with BudgetLedger.create(tmp_path / "l.sqlite") as ledger:
        ledger.set_budget("d", epsilon=50, delta=1e-6)
        for i in range(10):
            ledger.charge(dataset="d", query_id=f"q{i}", event=ev.PureDp(Fraction(1, 10)))
        # an exact mean: sum and count, two noiseless releases in one query
        ledger.charge(
            dataset="d", query_id="mean-exact", event=ev.Composite((ev.Exact(), ev.Exact()))
        )
        ledger.charge(dataset="d", query_id="s1", event=skellam)
        ledger.charge(dataset="d", query_id="s2", event=skellam)
        for b in range(3):
            ledger.charge(dataset="d", query_id=f"run-7/{'ab' * 16}/{b}", event=block)
        r = report(status=ledger.status("d"), charges=ledger.charges("d"))
    assert r.pure_spent == 1 and exact_decimal(r.pure_spent) == "1"  # ten 0.1s spend exactly 1
    assert r.queries == 13 and r.exact_queries == 1  # the exact mean is one query
    assert r.training_blocks == {"run-7": 3}
    assert len(r.entries) == 16
    first, exact, s1, s2, b0 = (
        r.entries[0],
        r.entries[10],
        r.entries[11],
        r.entries[12],
        r.entries[13],
    )
    assert first.kind == "query" and first.pure_epsilon == Fraction(1, 10)
    assert exact.exact and exact.mechanism == "exact (no DP)" and exact.pure_epsilon is None
    alone = compose([skellam], delta=1e-6).epsilon
    assert s1.rdp_epsilon_alone == pytest.approx(alone) and s1.rdp_total_after == pytest.approx(
        alone
    )
    # composition: the second identical charge raises the RDP total by less than its own epsilon
    assert s2.rdp_total_after == pytest.approx(compose([skellam, skellam], delta=1e-6).epsilon)
    assert s2.rdp_total_after is not None and s2.rdp_total_after < 2 * alone
    assert b0.kind == "training" and b0.run_id == "run-7" and b0.block == 0 and b0.steps == 10
    assert r.entries[-1].rdp_total_after == pytest.approx(r.rdp_spent)
    assert r.spent == pytest.approx(1 + r.rdp_spent)
