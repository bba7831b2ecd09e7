"""Per-party privacy budget ledger in SQLite (docs/design.md, "Budget").

Each party owns one ledger file with a budget (epsilon, delta) per dataset and one row per
charged query. The rules:

- charge before release: a party calls :meth:`BudgetLedger.charge` and only sends its
  contribution after it returned; once sent, a release is assumed to have happened, so a charge
  is never refunded.
- idempotent by query id: charging the same query id again with the same dataset and event is
  a no-op that returns the original charge; a reused id with another dataset or event is an
  error.
- refuse, don't overdraw: a charge that would take the dataset beyond its budget raises
  :class:`~mpcdp.errors.BudgetExceededError` and writes nothing.
- exact arithmetic for pure eps: epsilons are stored as "num/den" rationals, so ten charges of
  0.1 spend exactly 1. RDP events are stored whole (mpcdp.dp.events JSON) and their epsilon is
  recomputed at the dataset's delta on every check.
- durable: WAL journal with synchronous=FULL, and each charge one ``BEGIN IMMEDIATE``
  transaction, so a process killed at any point leaves either the whole charge or none of it,
  and concurrent processes serialise on the write lock.
- reserve, then charge: a party reserves a query's event when it accepts the query
  (:meth:`BudgetLedger.reserve`, at Propose / TrainOpen), and every later check counts what
  is reserved as spent. Contribute turns the reservation into a charge in one step
  (``charge(..., reservation=key)``); Abort or expiry releases it (:meth:`release`). So
  parties that see the same rounds in different orders accept or refuse the same rounds,
  and nobody is charged for a round that cannot be revealed. Reservations live in the
  owning process's memory: they belong to sessions, which die with it.
- one owner: the party node opens its ledger with ``owner=True``, which takes an exclusive
  advisory lock (flock) on the file for the ledger's lifetime; a second party process on the
  same ledger fails at start instead of enforcing the budget a second time. Read-only users
  (``mpcdp budget``) open it without the lock.

Schema (version 2)::

    meta(key TEXT PRIMARY KEY, value TEXT)                    -- 'schema_version' -> '2'
    budgets(dataset TEXT PRIMARY KEY, epsilon TEXT, delta REAL,
            pure_spent TEXT, queries INTEGER, exact_releases INTEGER)   -- running totals
    charges(query_id TEXT PRIMARY KEY, dataset TEXT REFERENCES budgets, kind TEXT,
            event TEXT, created_at REAL, note TEXT)

``note`` (version 2) says what a charge paid for ("mean of raise (discrete-laplace)",
"training run-7 steps 30-39"); a version-1 ledger gains the column (empty) when opened.

The running totals are updated in the same transaction as the charge row, so a check costs
O(1) for pure-eps datasets; RDP events are re-read and composed (they are few: a training run
is charged as one event).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp import events as ev
from mpcdp.dp import rdp
from mpcdp.dp.accountant import compose, rdp_curve
from mpcdp.errors import BudgetExceededError, LedgerError, ParameterError

__all__ = ["BudgetLedger", "BudgetStatus", "Charge"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = "2"
_MAX_ID_LEN = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budgets(
    dataset TEXT PRIMARY KEY,
    epsilon TEXT NOT NULL,
    delta REAL NOT NULL,
    pure_spent TEXT NOT NULL DEFAULT '0',
    queries INTEGER NOT NULL DEFAULT 0,
    exact_releases INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS charges(
    query_id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL REFERENCES budgets(dataset),
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    created_at REAL NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS charges_by_dataset ON charges(dataset);
"""


@dataclass(frozen=True)
class Charge:
    """One charged query. ``new`` is False when the query id had been charged before."""

    query_id: str
    dataset: str
    event: ev.Event
    created_at: float
    new: bool
    #: the dataset's status right after this charge (None for a repeated query id)
    status: BudgetStatus | None = None
    #: what the charge paid for, in words (for people reading the ledger)
    note: str = ""


@dataclass(frozen=True)
class BudgetStatus:
    """A dataset's budget and what has been spent of it, at the budget's delta."""

    dataset: str
    budget_epsilon: Fraction
    delta: float
    spent_epsilon: float
    pure_epsilon_spent: Fraction
    rdp_epsilon_spent: float
    queries: int
    exact_releases: int

    @property
    def remaining_epsilon(self) -> float:
        return max(0.0, float(self.budget_epsilon) - self.spent_epsilon)


def _check_name(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_ID_LEN:
        raise ParameterError(name, value, f"must be a non-empty string of <= {_MAX_ID_LEN} chars")
    if not value.isprintable():
        raise ParameterError(name, value, "must contain printable characters only")
    return value


def _delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
        raise ParameterError("delta", delta, "must be in [0, 1)")
    return float(delta)


@dataclass(frozen=True)
class _Reservation:
    dataset: str
    event: ev.Event


def _lock_file(path: Path) -> int:
    """An exclusive, non-blocking flock on ``path`` (created if missing); the descriptor
    holds it until closed."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerError(
            f"ledger {path} is in use by another process (is another `mpcdp party serve` "
            "running with this party.toml?); one process owns a ledger at a time"
        ) from None
    return fd


class BudgetLedger:
    """A party's ledger file. Use as a context manager, or call :meth:`close`.

    ``owner=True`` (the party node) holds an exclusive lock on the file while open (module
    docstring). Thread-safe: every call runs under one lock.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 30.0, owner: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._reserved: dict[str, _Reservation] = {}
        self._owner_fd: int | None = None
        try:
            if owner:
                self._owner_fd = _lock_file(self.path)
            self._db = sqlite3.connect(
                self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._rdp_cache: dict[str, tuple[int, NDArray[np.float64], int]] = {}
            with self._transaction():
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(stmt)
                row = self._db.execute(
                    "SELECT value FROM meta WHERE key='schema_version'"
                ).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO meta(key, value) VALUES('schema_version', ?)",
                        (SCHEMA_VERSION,),
                    )
                elif row[0] == "1":  # version 2 added charges.note
                    self._db.execute("ALTER TABLE charges ADD COLUMN note TEXT NOT NULL DEFAULT ''")
                    self._db.execute(
                        "UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,)
                    )
                elif row[0] != SCHEMA_VERSION:
                    raise LedgerError(
                        f"ledger {self.path} has schema_version={row[0]!r}, "
                        f"expected {SCHEMA_VERSION}"
                    )
        except sqlite3.Error as exc:
            self._release_owner()
            raise LedgerError(
                f"ledger {self.path} cannot be used as an SQLite ledger: {exc}"
            ) from None
        except OSError as exc:
            self._release_owner()
            raise LedgerError(f"ledger {self.path}: {exc.strerror}") from None
        except BaseException:
            self._release_owner()
            raise

    def _release_owner(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # closing the descriptor drops the flock
            self._owner_fd = None

    # -- plumbing --------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._reserved.clear()
            self._release_owner()

    def __enter__(self) -> BudgetLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- budgets ---------------------------------------------------------------------------

    def set_budget(self, dataset: str, *, epsilon: float | Fraction | str, delta: float) -> None:
        """Create or change a dataset's budget (the party owner's decision)."""
        _check_name("dataset", dataset)
        eps = ev.exact_epsilon(epsilon, name="epsilon")
        d = _delta(delta)
        with self._lock, self._transaction():
            old = self._db.execute(
                "SELECT epsilon, delta FROM budgets WHERE dataset=?", (dataset,)
            ).fetchone()
            if old is not None and (Fraction(old[0]), old[1]) == (eps, d):
                return
            self._db.execute(
                "INSERT INTO budgets(dataset, epsilon, delta) VALUES(?, ?, ?) "
                "ON CONFLICT(dataset) DO UPDATE SET epsilon=excluded.epsilon, delta=excluded.delta",
                (dataset, str(eps), d),
            )
        if old is not None:
            log.info("budget of dataset %r changed from %s to %s", dataset, old[0], eps)

    def datasets(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT dataset FROM budgets ORDER BY dataset").fetchall()
        return [r[0] for r in rows]

    # -- charges ---------------------------------------------------------------------------

    def _status(self, dataset: str, extra: Sequence[ev.Event] = ()) -> BudgetStatus:
        """Status from the running totals and the RDP events, plus the ``extra`` events."""
        row = self._db.execute(
            "SELECT epsilon, delta, pure_spent, queries, exact_releases FROM budgets "
            "WHERE dataset=?",
            (dataset,),
        ).fetchone()
        if row is None:
            raise ParameterError("dataset", dataset, "has no budget in this ledger")
        budget, delta = Fraction(row[0]), float(row[1])
        pure, queries, exact = Fraction(row[2]), int(row[3]), int(row[4])
        curve, count = self._rdp_total(dataset)
        for event in extra:
            queries += 1
            for part in ev.flatten([event]):
                if isinstance(part, ev.PureDp):
                    pure += part.epsilon
                elif isinstance(part, ev.Exact):
                    exact += 1
                else:
                    curve = curve + rdp_curve(part, orders=rdp.DEFAULT_ORDERS)
                    count += 1
        rdp_eps = 0.0
        if count:
            # An RDP release needs delta > 0; a pure-eps-only budget can never pay for it.
            rdp_eps = (
                rdp.to_epsilon(orders=rdp.DEFAULT_ORDERS, rdp=curve, delta=delta)[0]
                if delta > 0
                else math.inf
            )
        return BudgetStatus(
            dataset=dataset,
            budget_epsilon=budget,
            delta=delta,
            spent_epsilon=float(pure) + rdp_eps,
            pure_epsilon_spent=pure,
            rdp_epsilon_spent=rdp_eps,
            queries=queries,
            exact_releases=exact,
        )

    def _rdp_total(self, dataset: str) -> tuple[NDArray[np.float64], int]:
        """Sum of the RDP curves of the dataset's committed RDP charges, and their number.

        Rows are only ever appended, so the sum is cached and extended with the rows added
        since (by this or any other process): a check costs O(new rows), not O(all rows).
        """
        last, total, count = self._rdp_cache.get(dataset, (0, np.zeros(len(rdp.DEFAULT_ORDERS)), 0))
        for rowid, text in self._db.execute(
            "SELECT rowid, event FROM charges WHERE dataset=? AND kind NOT IN (?, ?) "
            "AND rowid > ? ORDER BY rowid",
            (dataset, ev.PureDp.kind, ev.Exact.kind, last),
        ):
            for part in ev.flatten([ev.decode_event(text)]):
                if not isinstance(part, ev.PureDp | ev.Exact):
                    total = total + rdp_curve(part, orders=rdp.DEFAULT_ORDERS)
                    count += 1
            last = rowid
        self._rdp_cache[dataset] = (last, total, count)
        return total, count

    def _require_budget(
        self, dataset: str, event: ev.Event, *, reservation: str | None = None
    ) -> BudgetStatus:
        """The status after charging ``event``; BudgetExceededError if it, plus every
        reservation on the dataset but ``reservation``, would overdraw."""
        held = [
            r.event for k, r in self._reserved.items() if r.dataset == dataset and k != reservation
        ]
        if not self._within(self._status(dataset, [*held, event])):
            before = self._status(dataset)
            reserved = self._status(dataset, held).spent_epsilon - before.spent_epsilon
            raise BudgetExceededError(
                dataset=dataset,
                requested=_describe(event, before.delta),
                spent=f"{before.spent_epsilon:.6g}"
                + (f" (+{reserved:.6g} reserved by rounds in flight)" if held else ""),
                budget=str(before.budget_epsilon),
                delta=before.delta,
            )
        return self._status(dataset, [event])

    @staticmethod
    def _within(status: BudgetStatus) -> bool:
        """Exact check: the pure part as a rational plus the RDP float converted exactly."""
        if not math.isfinite(status.rdp_epsilon_spent):
            return False
        total = status.pure_epsilon_spent + Fraction(status.rdp_epsilon_spent)
        return total <= status.budget_epsilon

    def status(self, dataset: str) -> BudgetStatus:
        """Budget, spend and counts for ``dataset`` (charges only, not reservations)."""
        _check_name("dataset", dataset)
        with self._lock:
            return self._status(dataset)

    def reserved_epsilon(self, dataset: str) -> float:
        """Epsilon (at the dataset's delta) that the reservations on ``dataset`` add."""
        _check_name("dataset", dataset)
        with self._lock:
            held = [r.event for r in self._reserved.values() if r.dataset == dataset]
            base = self._status(dataset)
            return self._status(dataset, held).spent_epsilon - base.spent_epsilon if held else 0.0

    def _refuse_answered(self, query_id: str) -> None:
        row = self._db.execute(
            "SELECT dataset FROM charges WHERE query_id=?", (query_id,)
        ).fetchone()
        if row is not None:
            raise LedgerError(f"query_id={query_id!r} was already answered; use a new query id")

    def reserve(
        self, *, dataset: str, key: str, event: ev.Event, query_id: str | None = None
    ) -> BudgetStatus:
        """Hold ``event`` against ``dataset``'s budget under ``key`` until it is charged or
        released (module docstring). Refuses, writing nothing, what :meth:`charge` would
        refuse (BudgetExceededError), counting the other reservations as spent; a ``key``
        that is already held; and a ``query_id`` (default: ``key``) that was already
        charged (LedgerError: a party answers each query id once)."""
        _check_name("dataset", dataset)
        _check_name("key", key)
        with self._lock:
            if key in self._reserved:
                raise LedgerError(
                    f"{key!r} is already reserved by a round in flight; use a new query id"
                )
            self._refuse_answered(query_id or key)
            after = self._require_budget(dataset, event)
            self._reserved[key] = _Reservation(dataset=dataset, event=event)
            return after

    def release(self, key: str) -> bool:
        """Drop ``key``'s reservation (nothing was released under it); True if it held one."""
        with self._lock:
            return self._reserved.pop(key, None) is not None

    def charge(
        self,
        *,
        dataset: str,
        query_id: str,
        event: ev.Event,
        reservation: str | None = None,
        keep: ev.Event | None = None,
        note: str = "",
    ) -> Charge:
        """Charge ``event`` to ``dataset`` under ``query_id``; see the module docstring.

        ``reservation``: the key whose reservation covers this charge. Its budget is not
        counted against the charge, and the charge consumes it in the same step (a
        reservation released only after the charge would count twice for a moment and make
        a concurrent charge refuse); with ``keep`` the reservation then holds ``keep``
        instead (a training session: what its remaining steps cost). ``note``: what the
        charge pays for, in words (at most 200 characters kept).
        """
        _check_name("dataset", dataset)
        _check_name("query_id", query_id)
        encoded = ev.encode_event(event)
        with self._lock:
            with self._transaction():
                row = self._db.execute(
                    "SELECT dataset, event, created_at FROM charges WHERE query_id=?", (query_id,)
                ).fetchone()
                if row is not None:
                    if (row[0], row[1]) != (dataset, encoded):
                        raise LedgerError(
                            f"query_id={query_id!r} was already charged to dataset={row[0]!r} "
                            "with another event; query ids must be unique"
                        )
                    return Charge(query_id, dataset, event, float(row[2]), new=False)
                after = self._require_budget(dataset, event, reservation=reservation)
                now = time.time()
                self._db.execute(
                    "INSERT INTO charges(query_id, dataset, kind, event, created_at, note) "
                    "VALUES(?, ?, ?, ?, ?, ?)",
                    (query_id, dataset, event.kind, encoded, now, str(note)[:200]),
                )
                self._db.execute(
                    "UPDATE budgets SET pure_spent=?, queries=?, exact_releases=? WHERE dataset=?",
                    (str(after.pure_epsilon_spent), after.queries, after.exact_releases, dataset),
                )
            if reservation is not None:  # committed: the reservation becomes the charge
                if keep is None:
                    self._reserved.pop(reservation, None)
                else:
                    self._reserved[reservation] = _Reservation(dataset=dataset, event=keep)
        log.info("charged query %s to dataset %r (%s)", query_id, dataset, event.kind)
        return Charge(query_id, dataset, event, now, new=True, status=after, note=str(note)[:200])

    def charges(self, dataset: str) -> list[Charge]:
        """Every charge of ``dataset``, oldest first."""
        _check_name("dataset", dataset)
        with self._lock:
            return self._charges(dataset)

    def _charges(self, dataset: str) -> list[Charge]:
        return [
            Charge(r[0], dataset, ev.decode_event(r[1]), float(r[2]), new=False, note=r[3])
            for r in self._db.execute(
                "SELECT query_id, event, created_at, note FROM charges WHERE dataset=? "
                "ORDER BY rowid",
                (dataset,),
            )
        ]


def _describe(event: ev.Event, delta: float) -> str:
    parts = ev.flatten([event])
    if all(isinstance(p, ev.PureDp | ev.Exact) for p in parts):
        pure = sum((p.epsilon for p in parts if isinstance(p, ev.PureDp)), Fraction(0))
        return str(pure) if pure else "0 (exact)"
    if delta == 0:
        return f"{event.kind} (needs delta > 0)"
    return f"{compose([event], delta=delta).epsilon:.6g}"
