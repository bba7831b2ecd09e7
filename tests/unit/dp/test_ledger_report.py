"""The ledger as `mpcdp budget` shows it: one entry per query or training block, exact
decimals, and RDP composition made visible; one line per query or training run (a run's
blocks grouped per coordinator, with the run's composed epsilon); ``--since`` read."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from mpcdp.dp import events as ev
from mpcdp.dp.accountant import compose
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.dp.ledger_report import exact_decimal, parse_since, report, spending_lines
from mpcdp.errors import ParameterError


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


def _two_runs_and_a_query(path: Path) -> BudgetLedger:
    """Two training runs of three blocks each (one per coordinator, the same run id) and a
    pure query between them."""
    block = ev.Skellam(mu=4e4, l1_sensitivity=50.0, l2_sensitivity=5.0, sample_rate=0.01, steps=10)
    ledger = BudgetLedger.create(path)
    ledger.set_budget("d", epsilon=50, delta=1e-6)
    for who in ("analyst", "other"):
        for b in range(3):
            ledger.charge(
                dataset="d",
                query_id=f"run-7/{'ab' * 8}/{b}",
                event=block,
                coordinator=who,
                note=f"training run-7 (mlp:4,2) steps {10 * b}-{10 * b + 9}",
            )
        if who == "analyst":
            ledger.charge(
                dataset="d",
                query_id="q1",
                event=ev.PureDp(Fraction(1, 10)),
                coordinator="analyst",
                note="sum of x (discrete-laplace)",
            )
    return ledger


def test_a_run_is_one_line_per_coordinator_with_its_composed_epsilon(tmp_path: Path) -> None:
    with _two_runs_and_a_query(tmp_path / "l.sqlite") as ledger:
        r = report(status=ledger.status("d"), charges=ledger.charges("d"))
    lines = spending_lines(r)
    assert [(li.kind, li.id, li.coordinator) for li in lines] == [
        ("training", "run-7", "analyst"),
        ("query", "q1", "analyst"),
        ("training", "run-7", "other"),
    ]
    run, query, other = lines
    block = r.entries[0].rdp_events[0]
    # a run's own cost: its three blocks' RDP curves composed, not three blocks added
    assert run.rdp_epsilon == pytest.approx(compose([block] * 3, delta=1e-6).epsilon)
    assert (
        run.rdp_epsilon is not None and run.rdp_epsilon < 3 * compose([block], delta=1e-6).epsilon
    )
    assert run.blocks == 3 and run.steps == 30 and run.what == "training (mlp:4,2)"
    assert run.pure_epsilon is None and run.epsilon == run.rdp_epsilon
    assert query.pure_epsilon == Fraction(1, 10) and query.rdp_epsilon is None
    assert query.what == "sum of x (discrete-laplace)" and query.blocks == 0
    # the budget's running total after the last run is everything composed
    assert other.rdp_total_after == pytest.approx(r.rdp_spent)


@pytest.mark.parametrize(
    ("text", "seconds_back"),
    [("90s", 90), ("90m", 5400), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("1.5h", 5400)],
)
def test_since_takes_a_duration_back_from_now(text: str, seconds_back: float) -> None:
    assert parse_since(text, now=1_000_000_000.0) == 1_000_000_000.0 - seconds_back


def test_since_takes_a_date_or_a_utc_time() -> None:
    assert parse_since("1970-01-02", now=0.0) == 86400
    assert parse_since("1970-01-01T01:00", now=0.0) == 3600
    assert parse_since("1970-01-01T01:00Z", now=0.0) == 3600
    assert parse_since("1970-01-01T02:00+01:00", now=0.0) == 3600


@pytest.mark.parametrize("text", ["yesterday", "7 days", "-3d", "2026-13-01", ""])
def test_since_refuses_what_it_cannot_read_naming_it(text: str) -> None:
    with pytest.raises(ParameterError, match="since") as info:
        parse_since(text, now=0.0)
    assert info.value.value == text and "duration" in info.value.reason
