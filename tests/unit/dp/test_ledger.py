"""The budget ledger (mpcdp.dp.ledger): exact charges, idempotence, reservations, schema
versions, crashes mid-charge and concurrent processes that never overdraw."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from mpcdp.dp import events as ev
from mpcdp.dp.accountant import compose
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import BudgetExceededError, LedgerError, ParameterError

ROOT = Path(__file__).resolve().parents[3]


def test_ten_charges_of_a_tenth_fill_a_budget_of_one_exactly(tmp_path: Path) -> None:
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("raises", epsilon=1.0, delta=1e-6)
        for i in range(10):
            assert led.charge(
                dataset="raises", query_id=f"q{i}", event=ev.PureDp(epsilon=Fraction("0.1"))
            ).new
        st = led.status("raises")
        assert st.pure_epsilon_spent == Fraction(1) and st.remaining_epsilon == 0
        with pytest.raises(BudgetExceededError, match=r"dataset='raises'.*requested epsilon=1/10"):
            led.charge(dataset="raises", query_id="q10", event=ev.PureDp(epsilon=Fraction("0.1")))
        assert led.status("raises").queries == 10  # nothing written by the refusal
        assert led.status("raises").spent_epsilon <= 1.0


def test_charge_is_idempotent_by_query_id(tmp_path: Path) -> None:
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("d", epsilon=1, delta=1e-6)
        first = led.charge(dataset="d", query_id="q", event=ev.PureDp(epsilon=Fraction("0.4")))
        again = led.charge(dataset="d", query_id="q", event=ev.PureDp(epsilon=Fraction("0.4")))
        assert first.new and not again.new and again.created_at == first.created_at
        assert led.status("d").pure_epsilon_spent == Fraction(2, 5)
        with pytest.raises(LedgerError, match="query_id='q'"):
            led.charge(dataset="d", query_id="q", event=ev.PureDp(epsilon=Fraction("0.5")))
        led.set_budget("e", epsilon=1, delta=1e-6)
        with pytest.raises(LedgerError, match="already charged to dataset='d'"):
            led.charge(dataset="e", query_id="q", event=ev.PureDp(epsilon=Fraction("0.4")))


def test_rdp_charges_and_delta_zero_budgets(tmp_path: Path) -> None:
    event = ev.Skellam(
        mu=1e6, l1_sensitivity=1e6, l2_sensitivity=1000.0, sample_rate=0.01, steps=1000
    )
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("train", epsilon=3, delta=1e-5)
        led.charge(dataset="train", query_id="epoch1", event=event)
        st = led.status("train")
        assert 0 < st.spent_epsilon < 3 and st.rdp_epsilon_spent == st.spent_epsilon
        led.set_budget("pure", epsilon=100, delta=0)
        with pytest.raises(BudgetExceededError, match="needs delta > 0"):
            led.charge(dataset="pure", query_id="x", event=event)


def test_exact_releases_are_recorded_not_charged(tmp_path: Path) -> None:
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("d", epsilon=1, delta=1e-6)
        led.charge(dataset="d", query_id="exact", event=ev.Exact())
        st = led.status("d")
        assert st.exact_releases == 1 and st.spent_epsilon == 0


def test_bad_input(tmp_path: Path) -> None:
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        with pytest.raises(ParameterError, match="dataset='nope'"):
            led.charge(dataset="nope", query_id="q", event=ev.PureDp(epsilon=Fraction("0.1")))
        with pytest.raises(ParameterError, match="delta"):
            led.set_budget("d", epsilon=1, delta=1.5)
        with pytest.raises(ParameterError, match="epsilon"):
            led.set_budget("d", epsilon=-1, delta=0)
        with pytest.raises(ParameterError, match="query_id"):
            led.set_budget("d", epsilon=1, delta=0)
            led.charge(dataset="d", query_id="", event=ev.PureDp(epsilon=Fraction("0.1")))


def test_ledger_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with BudgetLedger.create(path) as led:
        led.set_budget("d", epsilon=1, delta=1e-6)
        led.charge(dataset="d", query_id="q1", event=ev.PureDp(epsilon=Fraction("0.3")))
    with BudgetLedger(path) as led:
        assert led.status("d").pure_epsilon_spent == Fraction(3, 10)
        assert [c.query_id for c in led.charges("d")] == ["q1"]


def test_refuses_a_foreign_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    BudgetLedger.create(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(LedgerError, match="schema_version='99'"):
        BudgetLedger(path)


def test_a_version_1_ledger_gains_notes_and_keeps_its_charges(tmp_path: Path) -> None:
    """Ledgers written before charges had a note (schema 1) open as schema 3: every charge
    kept, the budget unchanged, new charges say what they paid for."""
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES('schema_version', '1');
            CREATE TABLE budgets(dataset TEXT PRIMARY KEY, epsilon TEXT NOT NULL,
                delta REAL NOT NULL, pure_spent TEXT NOT NULL DEFAULT '0',
                queries INTEGER NOT NULL DEFAULT 0, exact_releases INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE charges(query_id TEXT PRIMARY KEY,
                dataset TEXT NOT NULL REFERENCES budgets(dataset), kind TEXT NOT NULL,
                event TEXT NOT NULL, created_at REAL NOT NULL);
            INSERT INTO budgets VALUES('d', '2', 1e-6, '1/2', 1, 0);
            """
        )
        db.execute(
            "INSERT INTO charges VALUES('old', 'd', 'pure', ?, 1.0)",
            (ev.encode_event(ev.PureDp(epsilon=Fraction(1, 2))),),
        )
    with BudgetLedger(path) as led:
        assert [(c.query_id, c.note) for c in led.charges("d")] == [("old", "")]
        assert led.status("d").pure_epsilon_spent == Fraction(1, 2)
        led.charge(
            dataset="d", query_id="new", event=ev.PureDp(epsilon=Fraction("0.25")), note="mean of x"
        )
        assert [c.note for c in led.charges("d")] == ["", "mean of x"]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)


_CHARGER = textwrap.dedent(
    """
    import sys
    from mpcdp.dp import events as ev
    from mpcdp.dp.ledger import BudgetLedger
    path, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    led = BudgetLedger(path)
    led.set_budget("d", epsilon=1, delta=1e-6)
    print("ready", flush=True)
    for i in range(start, start + count):
        try:
            led.charge(dataset="d", query_id=f"q{i}", event=ev.PureDp(epsilon="0.001"))
        except Exception as exc:
            print(type(exc).__name__, flush=True)
            break
    """
)


def _spawn(path: Path, start: int, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHARGER, str(path), str(start), str(count)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
def test_survives_sigkill_mid_charge(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    BudgetLedger.create(path).close()
    for attempt in range(6):
        proc = _spawn(path, 0, 2000)  # the same query ids each time: idempotent re-runs
        time.sleep(0.05 + 0.04 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with BudgetLedger(path) as led:
            rows = led.charges("d")
            # every row whole and decodable, ids a gap-free prefix: charges are atomic and ordered
            assert [c.query_id for c in rows] == [f"q{i}" for i in range(len(rows))]
            assert led.status("d").pure_epsilon_spent == Fraction(len(rows), 1000)
    # a final uninterrupted run completes the same ids and stops exactly at the budget
    proc = _spawn(path, 0, 1001)
    out, _ = proc.communicate(timeout=120)
    assert "BudgetExceededError" in out
    with BudgetLedger(path) as led:
        st = led.status("d")
        assert st.queries == 1000 and st.pure_epsilon_spent == Fraction(1)


@pytest.mark.slow
def test_concurrent_processes_never_overdraw(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    BudgetLedger.create(path).close()
    procs = [_spawn(path, k * 10_000, 700) for k in range(3)]  # 2100 requests for 1000 slots
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert sum("BudgetExceededError" in o for o in outs) >= 1
    with BudgetLedger(path) as led:
        st = led.status("d")
        assert st.queries == 1000 and st.pure_epsilon_spent == Fraction(1)


def test_rdp_totals_see_charges_made_through_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    event = ev.Skellam(mu=1e6, l1_sensitivity=1e4, l2_sensitivity=100.0, sample_rate=0.1, steps=10)
    BudgetLedger.create(path).close()
    with BudgetLedger(path) as a, BudgetLedger(path) as b:
        a.set_budget("d", epsilon=50, delta=1e-6)
        a.charge(dataset="d", query_id="a1", event=event)
        first = a.status("d").spent_epsilon  # a caches its RDP total here
        b.charge(dataset="d", query_id="b1", event=event)
        b.charge(dataset="d", query_id="b2", event=ev.PureDp(epsilon=Fraction("0.5")))
        both = a.status("d")
        expected = compose([event, event], delta=1e-6).epsilon + 0.5
        assert both.spent_epsilon == pytest.approx(expected) and both.spent_epsilon > first + 0.5
        assert both.queries == 3


def test_reservations_count_as_spent_until_charged_or_released(tmp_path: Path) -> None:
    pure = ev.PureDp(epsilon=Fraction("0.1"))
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("d", epsilon="0.15", delta=0.0)
        led.reserve(dataset="d", query_id="a", event=pure)
        with pytest.raises(BudgetExceededError, match="reserved by rounds in flight"):
            led.reserve(dataset="d", query_id="b", event=pure)
        with pytest.raises(BudgetExceededError):  # an unreserved charge cannot take it either
            led.charge(dataset="d", query_id="c", event=pure)
        with pytest.raises(LedgerError, match="already reserved"):
            led.reserve(dataset="d", query_id="a", event=pure)
        assert led.reserved_epsilon("d") == pytest.approx(0.1)
        assert led.status("d").queries == 0  # a reservation is not a charge
        assert led.charges("d") == []
        assert led.release("a") and not led.release("a")
        led.reserve(dataset="d", query_id="b", event=pure, note="sum of x")
        charge = led.charge(dataset="d", query_id="b", event=pure, reserved=True)
        assert not led.release("b")  # the charge consumed the reservation
        assert charge.new and led.status("d").pure_epsilon_spent == Fraction(1, 10)
        assert [(c.query_id, c.note) for c in led.charges("d")] == [("b", "sum of x")]
        with pytest.raises(LedgerError, match="already answered"):
            led.reserve(dataset="d", query_id="b", event=pure)
        assert led.reserved_epsilon("d") == 0.0


def test_training_blocks_are_reserved_and_charged_one_by_one(tmp_path: Path) -> None:
    block = ev.Skellam(mu=1e6, l1_sensitivity=1e4, l2_sensitivity=100.0, sample_rate=0.1, steps=5)
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("d", epsilon=50, delta=1e-6)
        for b in range(2):
            led.reserve(dataset="d", query_id=f"run/{b}", event=block, coordinator="analyst")
            assert led.reserved_epsilon("d") > 0
            led.charge(
                dataset="d", query_id=f"run/{b}", event=block, coordinator="analyst", reserved=True
            )
            assert led.reserved_epsilon("d") == 0.0
        total = compose([block, block], delta=1e-6).epsilon
        assert led.status("d").spent_epsilon == pytest.approx(total, rel=1e-9)


def test_concurrent_charges_of_reserved_queries_never_refuse(tmp_path: Path) -> None:
    """A budget exactly full of reservations: every reserved query's charge must succeed,
    however the charges interleave (a reservation released only after its charge counted
    twice for a moment, and a concurrent charge was refused)."""
    pure = ev.PureDp(epsilon=Fraction("0.1"))
    with BudgetLedger.create(tmp_path / "l.sqlite") as led:
        led.set_budget("d", epsilon="2", delta=0.0)
        for i in range(20):
            led.reserve(dataset="d", query_id=f"q{i}", event=pure)
        failures: list[Exception] = []

        def one(i: int) -> None:
            try:
                led.charge(dataset="d", query_id=f"q{i}", event=pure, reserved=True)
            except Exception as exc:
                failures.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[0]
        assert led.status("d").pure_epsilon_spent == 2


def test_one_process_owns_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    BudgetLedger.create(path).close()
    owner = BudgetLedger(path, owner=True)
    try:
        with pytest.raises(LedgerError, match="in use by another process"):
            BudgetLedger(path, owner=True)
        probe = subprocess.run(
            [sys.executable, "-c", f"from mpcdp.dp.ledger import BudgetLedger; "
             f"BudgetLedger({str(path)!r}, owner=True)"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert probe.returncode != 0 and "in use by another process" in probe.stderr
        with BudgetLedger(path) as reader:  # readers (mpcdp budget) need no ownership
            assert reader.datasets() == []
    finally:
        owner.close()
    BudgetLedger(path, owner=True).close()  # closing gives the ledger up


def test_a_file_that_is_not_a_ledger_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "notes.sqlite"
    junk.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(LedgerError, match="cannot be used as an SQLite ledger"):
        BudgetLedger(junk, owner=True)
    with pytest.raises(LedgerError, match=r"notes\.sqlite"):
        BudgetLedger(junk)
    with pytest.raises(LedgerError):
        BudgetLedger(tmp_path, owner=False)  # a directory


def test_settle_gives_back_only_the_steps_that_never_left(tmp_path: Path) -> None:
    """A block of 5 steps of which 2 left the party costs exactly 2 steps; a block of which
    none left costs nothing; the totals stay consistent (verify on reopen) and a
    settlement can never add steps, change another parameter, or touch a pure charge."""
    step = ev.Skellam(mu=1e6, l1_sensitivity=1e4, l2_sensitivity=100.0, sample_rate=0.1)
    block = ev.Skellam(mu=1e6, l1_sensitivity=1e4, l2_sensitivity=100.0, sample_rate=0.1, steps=5)
    path = tmp_path / "l.sqlite"
    with BudgetLedger.create(path) as led:
        led.set_budget("d", epsilon=50, delta=1e-6)
        for q in ("run/a", "run/b"):
            led.charge(dataset="d", query_id=q, event=block, coordinator="analyst")
        led.charge(dataset="d", query_id="pure", event=ev.PureDp(epsilon=Fraction(1)))
        before = led.status("d").spent_epsilon  # the cache is warm: it must not go stale
        assert led.settle("run/a", coordinator="analyst", steps=2, note="2 of 5 left")
        assert led.settle("run/b", coordinator="analyst", steps=0, note="none left")
        assert not led.settle("run/a", coordinator="analyst", steps=2, note="again")
        two = compose([ev.PureDp(epsilon=Fraction(1)), *([step] * 2)], delta=1e-6).epsilon
        after = led.status("d")
        assert after.spent_epsilon == pytest.approx(two, rel=1e-9) and after.spent_epsilon < before
        assert after.queries == 2
        for q, steps, why in (
            ("run/a", 3, "only gives back steps"),
            ("run/b", 1, "not a charge"),
            ("pure", 0, "not charged by steps"),
            ("run/a", -1, "steps"),
        ):
            with pytest.raises((LedgerError, ParameterError), match=why):
                led.settle(q, coordinator="" if q == "pure" else "analyst", steps=steps, note="")
        with pytest.raises(LedgerError, match="not a charge"):
            led.settle("run/a", coordinator="other", steps=1, note="")  # not its namespace
        (charge,) = [c for c in led.charges("d") if c.query_id == "run/a"]
        assert charge.event == ev.Skellam(
            mu=1e6, l1_sensitivity=1e4, l2_sensitivity=100.0, sample_rate=0.1, steps=2
        )
        assert "2 of 5 left" in charge.note
    with BudgetLedger(path) as again:  # opening verifies every row against the totals
        assert again.status("d").spent_epsilon == pytest.approx(two, rel=1e-9)
