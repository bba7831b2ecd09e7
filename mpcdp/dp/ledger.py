"""Per-party privacy budget ledger in SQLite (docs/design.md, "Budget").

Each party owns one ledger file with a budget (epsilon, delta) per dataset and one row per
charged query. The rules:

- created on purpose, never silently: :meth:`BudgetLedger.create` (``mpcdp party init``, or
  ``mpcdp party serve --create-ledger`` on a first start) makes a ledger; opening one
  (``BudgetLedger(path)``) refuses a missing, empty (0-byte), foreign or corrupt file with a
  message that says how to restore it, instead of starting over with the whole budget.
  Every row is checked when a ledger is opened (:meth:`BudgetLedger.verify`): an event that
  does not decode, a budget that is not a number, running totals that differ from the rows.
- charge before release: a party calls :meth:`BudgetLedger.charge` and only sends its
  contribution after it returned; once sent, a release is assumed to have happened, so nothing
  sent is ever refunded. A training block is charged before its first step leaves; when the
  session ends early, :meth:`settle` gives back the block's steps that never left the party
  (the row's event keeps the steps that did; no other change of a charged row exists).
- idempotent by query id, one namespace per coordinator: charging the same (coordinator,
  query id) again with the same dataset and event is a no-op that returns the original
  charge; a reused id with another dataset or event is an error. Two coordinators' ids never
  collide (the row's key is ``COORDINATOR/QUERY_ID``; coordinator names have no '/').
- refuse, don't overdraw: a charge that would take the dataset beyond its budget raises
  :class:`~mpcdp.errors.BudgetExceededError` and writes nothing.
- a coordinator's share: :meth:`reserve` and :meth:`charge` take the coordinator's ``share``
  of the dataset's budget (a fraction in (0, 1], party.toml ``coordinator_shares``); what the
  coordinator has charged and holds reserved may not exceed ``share * budget``, so it cannot
  reserve what it may not spend, nor hold the other coordinators' part hostage.
- exact arithmetic for pure eps: epsilons are stored as "num/den" rationals, so ten charges of
  0.1 spend exactly 1. RDP events are stored whole (mpcdp.dp.events JSON) and their epsilon is
  recomputed at the dataset's delta on every check.
- durable: synchronous=FULL, a persistent rollback journal (``journal_mode=PERSIST``), and
  each change one ``BEGIN IMMEDIATE`` transaction, so a process killed at any point leaves
  either the whole charge or none of it, and concurrent processes serialise on the write lock.
- reserve durably, then charge in place: a party reserves a query's event when it accepts
  the query (:meth:`reserve`, at Propose / for each training block), and every later check
  counts what is reserved as spent. The reservation is written to disk as the charge's own
  row (state ``reserved``), so Contribute turns it into the charge by updating that row and
  the dataset's totals in place (``charge(..., reservation=...)``): the same pages, no new
  ones, and a journal that already holds as many pages (PERSIST keeps its size). A ledger on
  a full disk therefore refuses at Propose, before any party charges, rather than at
  Contribute after the others did. Abort or expiry releases the reservation
  (:meth:`release`); a reservation can also carry a time to live (``ttl_s``), after which it
  no longer counts. Reservations belong to sessions, which die with the owning process: the
  owner deletes leftover reserved rows when it opens the ledger.
- one owner: the party node opens its ledger with ``owner=True``, which takes an exclusive
  advisory lock (flock) on the file for the ledger's lifetime; a second party process on the
  same ledger fails at start instead of enforcing the budget a second time. Read-only users
  (``mpcdp budget``) open it without the lock.
- one budget per data: dataset entries that read the same data share one budget row
  (party.toml ``budget = "..."``, mpcdp.config.party_config); :meth:`share_budgets` maps
  each entry onto its budget, so every call naming an entry reserves, charges and reads the
  shared row, and :meth:`merge_budget` moves an entry's charges from a budget of its own
  onto the shared one (nothing spent is dropped). A budget's row keeps its name: ledgers
  whose entries each have their own budget are unchanged.
- a total across all the party's data: :meth:`set_total` (party.toml ``[total_budget]``) caps
  what every dataset together may spend, composed at the total's delta (pure epsilons add,
  RDP curves add): a reservation or charge on any dataset must fit its own budget and the
  total, every other dataset's charges and live reservations counted. It is kept in
  ``meta`` (``total_epsilon``, ``total_delta``), so older ledgers need no new table.
- backups: :meth:`backup` copies the ledger with SQLite's online backup API (consistent even
  while the node charges), and checks the copy like any ledger it opens.

Schema (version 3)::

    meta(key TEXT PRIMARY KEY, value TEXT)                    -- 'schema_version' -> '3'
    budgets(dataset TEXT PRIMARY KEY, epsilon TEXT, delta REAL,
            pure_spent TEXT, queries INTEGER, exact_releases INTEGER)   -- running totals
    charges(query_id TEXT PRIMARY KEY, dataset TEXT REFERENCES budgets, kind TEXT,
            event TEXT, created_at REAL, note TEXT, coordinator TEXT, state TEXT)

``note`` (version 2) says what a charge paid for ("mean of raise (discrete-laplace)",
"training run-7 steps 30-39"); ``coordinator`` and ``state`` ('charged' or 'reserved') are
version 3. Older ledgers gain the columns when opened (empty coordinator, 'charged').

The running totals count charged rows only and are updated in the same transaction as the
row, so a check costs O(1) for pure-eps datasets; RDP events are re-read and composed (they
are few: a training run is charged as a few blocks).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp import events as ev
from mpcdp.dp import rdp
from mpcdp.dp.accountant import compose, rdp_curve
from mpcdp.errors import BudgetExceededError, LedgerError, MpcdpError, ParameterError

__all__ = ["RESTORE_HINT", "TOTAL", "BudgetLedger", "BudgetStatus", "Charge", "LedgerWriteError"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = "3"
#: the name the party's total budget goes by in statuses and refusals
TOTAL = "(all datasets)"
_MAX_ID_LEN = 256
CHARGED = "charged"
RESERVED = "reserved"

_TABLES = (
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE budgets(
    dataset TEXT PRIMARY KEY,
    epsilon TEXT NOT NULL,
    delta REAL NOT NULL,
    pure_spent TEXT NOT NULL DEFAULT '0',
    queries INTEGER NOT NULL DEFAULT 0,
    exact_releases INTEGER NOT NULL DEFAULT 0
)""",
    """CREATE TABLE charges(
    query_id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL REFERENCES budgets(dataset),
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    created_at REAL NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    coordinator TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'charged'
)""",
    "CREATE INDEX charges_by_dataset ON charges(dataset)",
)
# never on ``state``: turning a reservation into a charge must not touch an index page
_INDEX_V3 = "CREATE INDEX IF NOT EXISTS charges_by_kind ON charges(dataset, kind, coordinator)"

#: how an operator gets a ledger back; every refusal to open one ends with it
RESTORE_HINT = (
    "to restore it, stop the party and copy its latest backup to this path (`mpcdp budget "
    "--config party.toml --backup FILE` makes one, also while the party runs); only if this "
    "party has never answered a query with this ledger, create a new, full one with `mpcdp "
    "party init --config party.toml`"
)


class LedgerWriteError(LedgerError):
    """A change could not be written durably (a full disk, an I/O error); nothing of it was
    written."""


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
    #: the coordinator whose query it was ("" in ledgers older than schema 3)
    coordinator: str = ""


@dataclass(frozen=True)
class BudgetStatus:
    """A dataset's budget and what has been spent of it, at the budget's delta (or one
    coordinator's share of it and what that coordinator spent)."""

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


def _check_coordinator(value: object) -> str:
    if value == "":
        return ""
    _check_name("coordinator", value)
    assert isinstance(value, str)
    if "/" in value:
        raise ParameterError("coordinator", value, "must not contain '/'")
    return value


def _check_share(share: Fraction | None) -> Fraction | None:
    if share is None:
        return None
    if not isinstance(share, Fraction) or not 0 < share <= 1:
        raise ParameterError("share", share, "must be a Fraction in (0, 1]")
    return share


def _key(coordinator: str, query_id: str) -> str:
    """The row key: one namespace of query ids per coordinator."""
    return f"{coordinator}/{query_id}" if coordinator else query_id


def _unkey(coordinator: str, key: str) -> str:
    return key[len(coordinator) + 1 :] if coordinator and key.startswith(coordinator + "/") else key


def _delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
        raise ParameterError("delta", delta, "must be in [0, 1)")
    return float(delta)


@dataclass(frozen=True)
class _Reservation:
    dataset: str
    coordinator: str
    event: ev.Event
    expires: float | None  # on the ledger's clock; None: until charged or released


@dataclass(frozen=True)
class _Spend:
    """What a set of charged rows adds up to, and the rows seen (for the cache)."""

    last_rowid: int
    rows: int
    pure: Fraction
    curve: NDArray[np.float64]
    rdp_parts: int
    exact: int


def _lock_file(path: Path, *, create: bool) -> int:
    """An exclusive, non-blocking flock on ``path`` (created when ``create``); the descriptor
    holds it until closed."""
    import fcntl

    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerError(
            f"ledger {path} is in use by another process (is another `mpcdp party serve` "
            "running with this party.toml?); one process owns a ledger at a time"
        ) from None
    return fd


def _is_fraction(text: object, *, positive: bool) -> bool:
    if not isinstance(text, str):
        return False
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return False
    return value > 0 if positive else value >= 0


class BudgetLedger:
    """A party's ledger file. Use as a context manager, or call :meth:`close`.

    ``create=True`` makes a new ledger (refused when the file exists); otherwise the file
    must be a ledger already, checked row by row (module docstring). ``owner=True`` (the
    party node) holds an exclusive lock on the file while open. ``clock``: what reservation
    times to live are measured on. Thread-safe: every call runs under one lock.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        timeout_s: float = 30.0,
        owner: bool = False,
        create: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._reserved: dict[str, _Reservation] = {}
        self._stale: set[str] = set()  # released reservations whose row is still on disk
        self._owner_fd: int | None = None
        self._clock = clock
        self._cache: dict[tuple[str, str | None], _Spend] = {}
        #: dataset entry -> the budget it draws on, where that is not its own name
        self._budget_names: dict[str, str] = {}
        self._db: sqlite3.Connection | None = None
        try:
            if create:
                self._refuse_existing()
            else:
                self._require_existing()
            if owner:
                self._owner_fd = _lock_file(self.path, create=create)
            uri = f"file:{quote(str(self.path.absolute()))}?mode={'rwc' if create else 'rw'}"
            self._db = sqlite3.connect(
                uri, uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # a persistent journal keeps its size: a charge that updates the pages its
            # reservation wrote needs no new disk space (module docstring)
            mode = self._db.execute("PRAGMA journal_mode=PERSIST").fetchone()[0]
            if owner and mode != "persist":
                raise LedgerError(
                    f"ledger {self.path} could not switch to journal_mode=persist (it is "
                    f"{mode!r}): is another process using it?"
                )
            if create:
                self._create()
            else:
                self._open()
                self.verify()
            if owner:
                self._drop_leftover_reservations()
        except sqlite3.Error as exc:
            self._close_quietly()
            raise LedgerError(
                f"ledger {self.path} cannot be used as an SQLite ledger: {exc}; {RESTORE_HINT}"
            ) from None
        except OSError as exc:
            self._close_quietly()
            raise LedgerError(f"ledger {self.path}: {exc.strerror}") from None
        except ValueError as exc:  # e.g. a NUL character in the path
            self._close_quietly()
            raise LedgerError(f"ledger path {str(self.path)!r} cannot be used: {exc}") from None
        except BaseException:
            self._close_quietly()
            raise

    @classmethod
    def create(cls, path: str | Path, *, owner: bool = False) -> BudgetLedger:
        """A new, empty ledger at ``path`` (refused when the file exists), open."""
        return cls(path, owner=owner, create=True)

    # -- opening ---------------------------------------------------------------------------

    def _refuse_existing(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            size = self.path.stat().st_size if self.path.is_file() else None
            what = f"{size} bytes" if size is not None else "not a regular file"
            raise LedgerError(
                f"ledger {self.path} already exists ({what}); a ledger is created once and "
                "never overwritten: the node opens it as it is (move it away first only if "
                "you mean to start this party's budgets over)"
            )

    def _require_existing(self) -> None:
        if not self.path.exists():
            raise LedgerError(
                f"ledger {self.path} does not exist. A party's ledger is created once, on "
                "purpose: `mpcdp party init --config party.toml` (or `mpcdp party serve "
                "--create-ledger` on the party's first start). If this party had a ledger, "
                f"it was lost: {RESTORE_HINT}"
            )
        if not self.path.is_file():
            raise LedgerError(f"ledger {self.path} is not a regular file")
        if self.path.stat().st_size == 0:
            raise LedgerError(
                f"ledger {self.path} is empty (0 bytes): it was truncated or never "
                "initialised. Refusing to use it: an empty ledger would make every dataset's "
                f"whole budget available again and lose its history; {RESTORE_HINT}"
            )

    def _create(self) -> None:
        db = self._conn
        with self._transaction():
            for stmt in (*_TABLES, _INDEX_V3):
                db.execute(stmt)
            db.execute(
                "INSERT INTO meta(key, value) VALUES('schema_version', ?), ('created_at', ?)",
                (SCHEMA_VERSION, repr(time.time())),
            )
        log.info("created ledger %s", self.path)

    def _open(self) -> None:
        db = self._conn
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = {"meta", "budgets", "charges"} - tables
        if missing:
            raise LedgerError(
                f"ledger {self.path} is not an mpcdp ledger (it has no table "
                f"{sorted(missing)[0]!r}); refusing to use it; {RESTORE_HINT}"
            )
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = None if row is None else row[0]
        if version == SCHEMA_VERSION:
            return
        if version not in ("1", "2"):
            raise LedgerError(
                f"ledger {self.path} has schema_version={version!r}, expected {SCHEMA_VERSION}"
            )
        with self._transaction():  # 2 added charges.note, 3 coordinator and state
            if version == "1":
                db.execute("ALTER TABLE charges ADD COLUMN note TEXT NOT NULL DEFAULT ''")
            db.execute("ALTER TABLE charges ADD COLUMN coordinator TEXT NOT NULL DEFAULT ''")
            db.execute("ALTER TABLE charges ADD COLUMN state TEXT NOT NULL DEFAULT 'charged'")
            db.execute(_INDEX_V3)
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))

    def verify(self) -> None:
        """Check every row: SQLite's quick_check, each budget a number in range, each event
        decodable and of its row's kind, and the running totals equal to the charged rows.
        LedgerError naming the first problem (and how many there are) otherwise."""
        with self._lock:
            # one read transaction: another process charging between the SELECTs of the
            # budgets and of the charges would otherwise look like totals that do not add up
            self._conn.execute("BEGIN")
            try:
                problems = self._problems()
            finally:
                self._conn.execute("COMMIT")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise LedgerError(
                f"ledger {self.path} is corrupt: {problems[0]}{more}. Refusing to use it: "
                f"budgets could no longer be enforced; {RESTORE_HINT}"
            )

    def _problems(self) -> list[str]:
        db = self._conn
        out: list[str] = []
        check = [r[0] for r in db.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            out.append(f"SQLite quick_check: {check[0]}")
            return out
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if "total_epsilon" in meta and not _is_fraction(meta["total_epsilon"], positive=True):
            out.append(f"meta total_epsilon={meta['total_epsilon']!r} is not a number > 0")
        if "total_delta" in meta:
            try:
                ok = 0 <= float(meta["total_delta"]) < 1
            except (TypeError, ValueError):
                ok = False
            if not ok:
                out.append(f"meta total_delta={meta['total_delta']!r} is not a number in [0, 1)")
        budgets: dict[str, tuple[object, object, object]] = {}
        for dataset, eps, delta, pure, queries, exact in db.execute(
            "SELECT dataset, epsilon, delta, pure_spent, queries, exact_releases FROM budgets"
        ):
            where = f"budgets row of dataset {dataset!r}"
            if not isinstance(dataset, str) or not dataset or not dataset.isprintable():
                out.append(f"a budgets row has dataset={dataset!r}")
                continue
            if not _is_fraction(eps, positive=True):
                out.append(f"{where}: epsilon={eps!r} is not a number > 0")
            if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
                out.append(f"{where}: delta={delta!r} is not a number in [0, 1)")
            if not _is_fraction(pure, positive=False):
                out.append(f"{where}: pure_spent={pure!r} is not a number >= 0")
            for name, n in (("queries", queries), ("exact_releases", exact)):
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    out.append(f"{where}: {name}={n!r} is not a count")
            budgets[dataset] = (pure, queries, exact)
        sums: dict[str, list[object]] = {d: [Fraction(0), 0, 0] for d in budgets}
        for key, dataset, kind, text, at, note, coordinator, state in db.execute(
            "SELECT query_id, dataset, kind, event, created_at, note, coordinator, state "
            "FROM charges ORDER BY rowid"
        ):
            where = f"charges row {key!r}"
            if dataset not in budgets:
                out.append(f"{where}: dataset={dataset!r} has no budget")
                continue
            if state not in (CHARGED, RESERVED):
                out.append(f"{where}: state={state!r} is neither {CHARGED!r} nor {RESERVED!r}")
                continue
            if not isinstance(at, float | int) or isinstance(at, bool) or not math.isfinite(at):
                out.append(f"{where}: created_at={at!r} is not a time")
            if not isinstance(note, str) or not isinstance(coordinator, str):
                out.append(f"{where}: note or coordinator is not text")
                continue
            if not isinstance(key, str) or (coordinator and not key.startswith(coordinator + "/")):
                out.append(f"{where}: its key is not in coordinator {coordinator!r}'s namespace")
            try:
                event = ev.decode_event(text) if isinstance(text, str) else None
            except (MpcdpError, ValueError, TypeError, KeyError, AttributeError) as exc:
                out.append(f"{where}: its event does not decode ({exc})")
                continue
            if event is None or event.kind != kind:
                out.append(f"{where}: kind={kind!r} differs from its event's")
                continue
            if state == CHARGED:
                acc = sums[dataset]
                for part in ev.flatten([event]):
                    if isinstance(part, ev.PureDp):
                        acc[0] = Fraction(str(acc[0])) + part.epsilon
                    elif isinstance(part, ev.Exact):
                        acc[2] = int(str(acc[2])) + 1
                acc[1] = int(str(acc[1])) + 1
        for dataset, (pure, queries, exact) in budgets.items():
            got = sums[dataset]
            if _is_fraction(pure, positive=False) and Fraction(str(pure)) != got[0]:
                out.append(
                    f"budgets.pure_spent of dataset {dataset!r} is {pure!r} but its charges "
                    f"add up to {got[0]}"
                )
            if queries != got[1]:
                out.append(
                    f"budgets.queries of dataset {dataset!r} is {queries!r} but it has "
                    f"{got[1]} charges"
                )
            if exact != got[2]:
                out.append(
                    f"budgets.exact_releases of dataset {dataset!r} is {exact!r} but its "
                    f"charges hold {got[2]}"
                )
        return out

    def _drop_leftover_reservations(self) -> None:
        """Reserved rows of a process that ended: their sessions died with it."""
        with self._transaction():
            gone = self._conn.execute("DELETE FROM charges WHERE state=?", (RESERVED,)).rowcount
        if gone:
            log.info("ledger %s: dropped %d reservations of a previous run", self.path, gone)

    # -- plumbing --------------------------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerError(f"ledger {self.path} is closed")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A transaction whose storage failure (full disk, I/O error) is a LedgerWriteError."""
        try:
            with self._transaction():
                yield
        except sqlite3.OperationalError as exc:
            raise LedgerWriteError(
                f"ledger {self.path} could not write {what} durably ({exc}); nothing of it "
                "was written"
            ) from None

    def _close_quietly(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._release_owner()

    def _release_owner(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # closing the descriptor drops the flock
            self._owner_fd = None

    def close(self) -> None:
        with self._lock:
            self._close_quietly()
            self._reserved.clear()

    def __enter__(self) -> BudgetLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def backup(self, target: str | Path) -> None:
        """Copy the ledger to ``target`` (a new file) with SQLite's online backup API: a
        consistent copy even while the party charges. The copy is opened and checked row by
        row before this returns; LedgerError (and no file) when it is not a good ledger."""
        dest = Path(target)
        if dest.exists():
            raise LedgerError(f"backup target {dest} already exists; name a new file")
        if not dest.parent.is_dir():
            raise LedgerError(f"backup target {dest}: folder {dest.parent} does not exist")
        try:
            copy = sqlite3.connect(dest)
            try:
                with self._lock:
                    self._conn.backup(copy)
            finally:
                copy.close()
            BudgetLedger(dest).close()
        except (sqlite3.Error, LedgerError, OSError) as exc:
            dest.unlink(missing_ok=True)
            raise LedgerError(f"backup of ledger {self.path} to {dest} failed: {exc}") from None
        log.info("ledger %s backed up to %s", self.path, dest)

    # -- budgets ---------------------------------------------------------------------------

    def set_budget(self, dataset: str, *, epsilon: float | Fraction | str, delta: float) -> None:
        """Create or change a dataset's budget (the party owner's decision)."""
        _check_name("dataset", dataset)
        eps = ev.exact_epsilon(epsilon, name="epsilon")
        d = _delta(delta)
        with self._lock, self._writing(f"the budget of dataset {dataset!r}"):
            old = self._conn.execute(
                "SELECT epsilon, delta FROM budgets WHERE dataset=?", (dataset,)
            ).fetchone()
            if old is not None and (Fraction(old[0]), old[1]) == (eps, d):
                return
            self._conn.execute(
                "INSERT INTO budgets(dataset, epsilon, delta) VALUES(?, ?, ?) "
                "ON CONFLICT(dataset) DO UPDATE SET epsilon=excluded.epsilon, delta=excluded.delta",
                (dataset, str(eps), d),
            )
        if old is not None:
            log.info("budget of dataset %r changed from %s to %s", dataset, old[0], eps)

    def share_budgets(self, names: dict[str, str]) -> None:
        """Let each dataset entry of ``names`` draw on the budget it maps to (party.toml
        ``budget = "..."``): every later call that names the entry reserves, charges and
        reads that budget's row, so entries over the same data spend one budget. An entry
        mapped to itself is left as it is; the budgets must exist (:meth:`set_budget`)."""
        checked = {e: b for e, b in names.items() if _check_name("dataset", e) != b}
        with self._lock:
            for entry, budget in checked.items():
                self._budget_row(_check_name("budget", budget))  # ParameterError: none such
                if entry in checked.values():
                    raise ParameterError(
                        "dataset", entry, f"names a shared budget, so it cannot draw on {budget!r}"
                    )
            self._budget_names = checked

    def merge_budget(self, old: str, *, into: str) -> int:
        """Move every charge of budget ``old`` to budget ``into`` and drop ``old``'s row, in
        one transaction: what was spent under ``old`` then counts against ``into`` (a
        dataset entry that used to have a budget of its own and now shares one). Nothing is
        refunded; ``into`` may end up over its budget, and then refuses every new charge.
        Returns the number of charges moved."""
        _check_name("dataset", old)
        _check_name("budget", into)
        if old == into:
            raise ParameterError("into", into, "must differ from the budget merged into it")
        with self._lock:
            if any(r.dataset == old for r in self._live().values()):
                raise LedgerError(f"budget {old!r} has reservations in flight; merge it later")
            pure, queries, exact = self._budget_row(old)[2:]
            target = self._budget_row(into)
            with self._writing(f"the merge of budget {old!r} into {into!r}"):
                self._delete_stale()
                moved = self._conn.execute(
                    "UPDATE charges SET dataset=? WHERE dataset=?", (into, old)
                ).rowcount
                self._conn.execute(
                    "UPDATE budgets SET pure_spent=?, queries=?, exact_releases=? WHERE dataset=?",
                    (str(target[2] + pure), target[3] + queries, target[4] + exact, into),
                )
                self._conn.execute("DELETE FROM budgets WHERE dataset=?", (old,))
            self._cache.clear()
        log.warning(
            "ledger %s: the %d charge(s) of budget %r now count against budget %r",
            self.path,
            moved,
            old,
            into,
        )
        return int(moved)

    def set_total(self, *, epsilon: float | Fraction | str | None, delta: float = 0.0) -> None:
        """Cap what all datasets together may spend at (``epsilon``, ``delta``) (the party
        owner's decision; None: no cap). Charges already made count against it."""
        with self._lock, self._writing("the party's total budget"):
            if epsilon is None:
                self._conn.execute("DELETE FROM meta WHERE key IN ('total_epsilon', 'total_delta')")
                return
            eps = ev.exact_epsilon(epsilon, name="epsilon")
            d = _delta(delta)
            self._conn.executemany(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                [("total_epsilon", str(eps)), ("total_delta", repr(d))],
            )

    def total(self) -> BudgetStatus | None:
        """The party's total budget across all its datasets and what they spent together
        (charges only), or None when it has none."""
        with self._lock:
            return self._total_status(())

    def _total_row(self) -> tuple[Fraction, float] | None:
        rows = dict(
            self._conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('total_epsilon', 'total_delta')"
            ).fetchall()
        )
        if "total_epsilon" not in rows:
            return None
        return Fraction(rows["total_epsilon"]), float(rows.get("total_delta", "0"))

    def _total_status(self, extra: Sequence[ev.Event]) -> BudgetStatus | None:
        """What every dataset has charged, plus the ``extra`` events, against the total."""
        total = self._total_row()
        if total is None:
            return None
        budget, delta = total
        pure, queries, exact = Fraction(0), 0, 0
        curve, count = np.zeros(len(rdp.DEFAULT_ORDERS)), 0
        rows = self._conn.execute(
            "SELECT dataset, pure_spent, queries, exact_releases FROM budgets"
        ).fetchall()  # one read of every budget's running totals, not one per budget
        for name, spent_pure, n, n_exact in rows:
            spend = self._spend(name, None)
            pure, queries, exact = pure + Fraction(spent_pure), queries + n, exact + n_exact
            curve, count = curve + spend.curve, count + spend.rdp_parts
        return _with_events(
            TOTAL, budget, delta, _Spend(0, queries, pure, curve, count, exact), extra
        )

    def _require_total(self, event: ev.Event, *, coordinator: str, exclude: str | None) -> None:
        """BudgetExceededError when ``event``, with every live reservation on any dataset
        but ``exclude``, would overdraw the party's total budget. The refusal counts the
        asking coordinator's own reservations, never the others' (it only says that theirs,
        released when their rounds end, are in the way)."""
        held = {k: r for k, r in self._live().items() if k != exclude}
        after = self._total_status([*(r.event for r in held.values()), event])
        if after is None or self._within(after):
            return
        before = self._total_status(())
        assert before is not None
        mine = [r.event for r in held.values() if r.coordinator == coordinator]
        spent = f"{before.spent_epsilon:.6g} by all its datasets together"
        if mine:
            own = self._total_status(mine)
            assert own is not None
            spent += f" (+{own.spent_epsilon - before.spent_epsilon:.6g} reserved by your rounds)"
        alone = self._total_status([*mine, event])
        if alone is not None and self._within(alone):
            spent += (
                "; it is refused because of other coordinators' reservations, released when "
                "their rounds end: retry then"
            )
        raise BudgetExceededError(
            dataset=TOTAL,
            requested=_describe(event, before.delta),
            spent=spent,
            budget=f"{before.budget_epsilon} (the party's total_budget)",
            delta=before.delta,
        )

    def _budget_of(self, dataset: str) -> str:
        """The budget row a dataset entry draws on (its own name unless shared)."""
        _check_name("dataset", dataset)
        return self._budget_names.get(dataset, dataset)

    def datasets(self) -> list[str]:
        with self._lock:
            rows = self._conn.execute("SELECT dataset FROM budgets ORDER BY dataset").fetchall()
        return [r[0] for r in rows]

    # -- spend -----------------------------------------------------------------------------

    def _spend(self, dataset: str, coordinator: str | None) -> _Spend:
        """The charged rows of ``dataset``: all of one coordinator's, or (None) the RDP rows
        of all coordinators (the pure totals are the budgets row's). Cached and extended
        with the rows added since; recomputed when rows at or below the cached ones changed
        (a reservation turned into a charge by another connection)."""
        if coordinator is None:
            where = "dataset=? AND kind NOT IN (?, ?) AND state=?"
            args: tuple[object, ...] = (dataset, ev.PureDp.kind, ev.Exact.kind, CHARGED)
        else:
            where = "dataset=? AND coordinator=? AND state=?"
            args = (dataset, coordinator, CHARGED)
        db = self._conn
        cached = self._cache.get((dataset, coordinator))
        if cached is not None:
            seen = db.execute(
                f"SELECT count(*) FROM charges WHERE {where} AND rowid <= ?",
                (*args, cached.last_rowid),
            ).fetchone()[0]
            if seen != cached.rows:
                cached = None
        spend = cached or _Spend(0, 0, Fraction(0), np.zeros(len(rdp.DEFAULT_ORDERS)), 0, 0)
        last, rows, pure, curve, parts, exact = (
            spend.last_rowid,
            spend.rows,
            spend.pure,
            spend.curve,
            spend.rdp_parts,
            spend.exact,
        )
        for rowid, text in db.execute(
            f"SELECT rowid, event FROM charges WHERE {where} AND rowid > ? ORDER BY rowid",
            (*args, last),
        ):
            pure, curve, parts, exact = _add(ev.decode_event(text), pure, curve, parts, exact)
            last, rows = rowid, rows + 1
        spend = _Spend(last, rows, pure, curve, parts, exact)
        self._cache[(dataset, coordinator)] = spend
        return spend

    def _budget_row(self, dataset: str) -> tuple[Fraction, float, Fraction, int, int]:
        row = self._conn.execute(
            "SELECT epsilon, delta, pure_spent, queries, exact_releases FROM budgets "
            "WHERE dataset=?",
            (dataset,),
        ).fetchone()
        if row is None:
            raise ParameterError("dataset", dataset, "has no budget in this ledger")
        return Fraction(row[0]), float(row[1]), Fraction(row[2]), int(row[3]), int(row[4])

    def _status(
        self,
        dataset: str,
        extra: Sequence[ev.Event] = (),
        *,
        coordinator: str | None = None,
        share: Fraction | None = None,
    ) -> BudgetStatus:
        """Status from the charged rows plus the ``extra`` events: the dataset's, or (with
        ``coordinator``) that coordinator's against ``share`` of the budget."""
        budget, delta, pure, queries, exact = self._budget_row(dataset)
        if coordinator is None:
            spend = self._spend(dataset, None)
        else:
            spend = self._spend(dataset, coordinator)
            budget = budget * (share if share is not None else 1)
            pure, queries, exact = spend.pure, spend.rows, spend.exact
        return _with_events(
            dataset,
            budget,
            delta,
            _Spend(0, queries, pure, spend.curve, spend.rdp_parts, exact),
            extra,
        )

    def _live(self) -> dict[str, _Reservation]:
        """This process's reservations, those whose time to live ran out dropped."""
        now = self._clock()
        for k in [
            k for k, r in self._reserved.items() if r.expires is not None and r.expires <= now
        ]:
            del self._reserved[k]
            self._stale.add(k)
        return self._reserved

    def _delete_stale(self) -> None:
        """Inside a write transaction: the rows of reservations dropped since the last one."""
        for k in self._stale:
            self._conn.execute("DELETE FROM charges WHERE query_id=? AND state=?", (k, RESERVED))
        self._stale.clear()

    def _require_budget(
        self,
        dataset: str,
        event: ev.Event,
        *,
        coordinator: str,
        share: Fraction | None,
        exclude: str | None = None,
    ) -> BudgetStatus:
        """The dataset's status after charging ``event``; BudgetExceededError if it, plus
        every live reservation on the dataset but ``exclude``, would overdraw the
        coordinator's share or the dataset's budget."""
        held = {k: r for k, r in self._live().items() if r.dataset == dataset and k != exclude}
        mine = [r.event for r in held.values() if r.coordinator == coordinator]
        if share is not None and share < 1:
            own = self._status(dataset, [*mine, event], coordinator=coordinator, share=share)
            if not self._within(own):
                before = self._status(dataset, coordinator=coordinator, share=share)
                reserved = (
                    self._status(dataset, mine, coordinator=coordinator, share=share).spent_epsilon
                    - before.spent_epsilon
                )
                whole = self._budget_row(dataset)[0]
                raise BudgetExceededError(
                    dataset=dataset,
                    requested=_describe(event, before.delta),
                    spent=f"{before.spent_epsilon:.6g} by coordinator {coordinator!r}"
                    + (f" (+{reserved:.6g} reserved by its rounds in flight)" if mine else ""),
                    budget=f"{own.budget_epsilon} (coordinator {coordinator!r}'s share "
                    f"{share} of the dataset's {whole})",
                    delta=before.delta,
                )
        if not self._within(self._status(dataset, [*(r.event for r in held.values()), event])):
            before = self._status(dataset)
            reserved = (
                self._status(dataset, [r.event for r in held.values()]).spent_epsilon
                - before.spent_epsilon
            )
            others = [r for r in held.values() if r.coordinator != coordinator]
            spent = f"{before.spent_epsilon:.6g}"
            if held:
                spent += f" (+{reserved:.6g} reserved by rounds in flight)"
            if others and self._within(self._status(dataset, [*mine, event])):
                # never name them: the coordinator learns that others hold it, and for how long
                ttl = [r.expires for r in others if r.expires is not None]
                until = (
                    f"within {max(0.0, max(ttl) - self._clock()):.0f} s"
                    if len(ttl) == len(others)
                    else "when their rounds end"
                )
                spent += (
                    "; it is refused because of other coordinators' reservations, which are "
                    f"released {until}: retry then"
                )
            raise BudgetExceededError(
                dataset=dataset,
                requested=_describe(event, before.delta),
                spent=spent,
                budget=str(before.budget_epsilon),
                delta=before.delta,
            )
        self._require_total(event, coordinator=coordinator, exclude=exclude)
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
        dataset = self._budget_of(dataset)
        with self._lock:
            return self._status(dataset)

    def coordinator_status(
        self, dataset: str, *, coordinator: str, share: Fraction | None
    ) -> BudgetStatus:
        """What ``coordinator`` has charged to ``dataset``, against its ``share`` of the
        budget (None: the whole budget)."""
        dataset = self._budget_of(dataset)
        _check_coordinator(coordinator)
        with self._lock:
            return self._status(
                dataset, coordinator=coordinator, share=_check_share(share) or Fraction(1)
            )

    def coordinator_remaining(
        self, dataset: str, *, coordinator: str, share: Fraction | None
    ) -> float:
        """Epsilon (at the dataset's delta) that ``coordinator`` may still spend of
        ``dataset``: its ``share`` of the budget (None: the whole budget) less what it has
        charged and holds reserved, and at most what the dataset has left after every
        charge and this coordinator's reservations. The other coordinators' reservations
        are not counted: they are theirs (and what the dataset has left after charges is
        public to every coordinator anyway)."""
        dataset = self._budget_of(dataset)
        _check_coordinator(coordinator)
        share = _check_share(share)
        with self._lock:
            mine = [
                r.event
                for r in self._live().values()
                if r.dataset == dataset and r.coordinator == coordinator
            ]
            left = self._status(dataset, mine).remaining_epsilon
            if share is None or share >= 1:
                return left
            own = self._status(dataset, mine, coordinator=coordinator, share=share)
            return min(left, own.remaining_epsilon)

    def check(
        self,
        *,
        dataset: str,
        event: ev.Event,
        coordinator: str = "",
        share: Fraction | None = None,
    ) -> BudgetStatus:
        """What :meth:`reserve` would refuse, refused; nothing is reserved or written."""
        dataset = self._budget_of(dataset)
        _check_coordinator(coordinator)
        with self._lock:
            return self._require_budget(
                dataset, event, coordinator=coordinator, share=_check_share(share)
            )

    def reserved_epsilon(self, dataset: str) -> float:
        """Epsilon (at the dataset's delta) that the live reservations on ``dataset`` add."""
        dataset = self._budget_of(dataset)
        with self._lock:
            held = [r.event for r in self._live().values() if r.dataset == dataset]
            base = self._status(dataset)
            return self._status(dataset, held).spent_epsilon - base.spent_epsilon if held else 0.0

    def reserve(
        self,
        *,
        dataset: str,
        query_id: str,
        event: ev.Event,
        coordinator: str = "",
        share: Fraction | None = None,
        ttl_s: float | None = None,
        note: str = "",
    ) -> BudgetStatus:
        """Hold ``event`` against ``dataset``'s budget for ``coordinator``'s ``query_id``
        until it is charged or released, or ``ttl_s`` seconds pass (module docstring). The
        reservation is written to disk as the charge's row, so the charge can be made in
        place. Refuses, writing nothing, what :meth:`charge` would refuse
        (BudgetExceededError), counting the other reservations as spent; a query id that
        is already reserved or was already charged (LedgerError: a party answers each
        query id once); and a reservation the disk cannot hold (LedgerWriteError)."""
        dataset = self._budget_of(dataset)
        _check_name("query_id", query_id)
        _check_coordinator(coordinator)
        _check_share(share)
        if ttl_s is not None and not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ParameterError("ttl_s", ttl_s, "must be a finite number of seconds > 0")
        key = _key(coordinator, query_id)
        encoded = ev.encode_event(event)
        with self._lock:
            if key in self._live():
                raise LedgerError(
                    f"query_id={query_id!r} is already reserved by a round in flight; use a "
                    "new query id"
                )
            with self._writing(f"the reservation of query {query_id!r}"):
                self._delete_stale()
                row = self._conn.execute(
                    "SELECT state FROM charges WHERE query_id=?", (key,)
                ).fetchone()
                if row is not None and row[0] == CHARGED:
                    raise LedgerError(
                        f"query_id={query_id!r} was already answered; use a new query id"
                    )
                if row is not None:  # a reservation another connection left behind
                    self._conn.execute("DELETE FROM charges WHERE query_id=?", (key,))
                after = self._require_budget(dataset, event, coordinator=coordinator, share=share)
                self._conn.execute(
                    "INSERT INTO charges(query_id, dataset, kind, event, created_at, note, "
                    "coordinator, state) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        dataset,
                        event.kind,
                        encoded,
                        time.time(),
                        str(note)[:200],
                        coordinator,
                        RESERVED,
                    ),
                )
            expires = None if ttl_s is None else self._clock() + ttl_s
            self._reserved[key] = _Reservation(dataset, coordinator, event, expires)
            return after

    def renew(self, query_id: str, *, coordinator: str = "", ttl_s: float) -> bool:
        """Let ``coordinator``'s reservation of ``query_id`` live ``ttl_s`` seconds from now;
        False when it holds none."""
        key = _key(_check_coordinator(coordinator), query_id)
        with self._lock:
            r = self._live().get(key)
            if r is None:
                return False
            self._reserved[key] = _Reservation(
                r.dataset, r.coordinator, r.event, self._clock() + ttl_s
            )
            return True

    def release(self, query_id: str, *, coordinator: str = "") -> bool:
        """Drop ``coordinator``'s reservation of ``query_id`` (nothing was released under
        it); True if it held one."""
        key = _key(_check_coordinator(coordinator), query_id)
        with self._lock:
            if self._reserved.pop(key, None) is None:
                return False
            self._stale.add(key)
            try:
                with self._transaction():
                    self._delete_stale()
            except sqlite3.Error as exc:
                # it no longer counts; its row goes with the next write, or at the next start
                log.warning(
                    "ledger %s: a released reservation stays on disk for now: %s", self.path, exc
                )
                self._stale.add(key)
            return True

    def charge(
        self,
        *,
        dataset: str,
        query_id: str,
        event: ev.Event,
        coordinator: str = "",
        share: Fraction | None = None,
        reserved: bool = False,
        note: str = "",
    ) -> Charge:
        """Charge ``event`` to ``dataset`` under ``coordinator``'s ``query_id``; see the
        module docstring.

        ``reserved``: the query's reservation (:meth:`reserve`) covers this charge. Its
        budget is not counted against the charge, and the charge turns it into the charge
        in place, in one step (a reservation released only after the charge would count
        twice for a moment and make a concurrent charge refuse); the note given at
        :meth:`reserve` stays. ``note``: what an unreserved charge pays for, in words (at
        most 200 characters kept).
        """
        dataset = self._budget_of(dataset)
        _check_name("query_id", query_id)
        _check_coordinator(coordinator)
        _check_share(share)
        key = _key(coordinator, query_id)
        encoded = ev.encode_event(event)
        with self._lock:
            held = self._live().get(key) if reserved else None
            with self._writing(f"the charge of query {query_id!r}"):
                self._delete_stale()
                row = self._conn.execute(
                    "SELECT dataset, event, created_at, state, note, rowid FROM charges "
                    "WHERE query_id=?",
                    (key,),
                ).fetchone()
                if row is not None and row[3] == CHARGED:
                    if (row[0], row[1]) != (dataset, encoded):
                        raise LedgerError(
                            f"query_id={query_id!r} was already charged to dataset={row[0]!r} "
                            "with another event; query ids must be unique"
                        )
                    return Charge(
                        query_id,
                        dataset,
                        event,
                        float(row[2]),
                        new=False,
                        note=row[4],
                        coordinator=coordinator,
                    )
                in_place = held is not None and row is not None
                if in_place and (row[0], row[1]) != (dataset, encoded):
                    raise LedgerError(
                        f"query_id={query_id!r} was reserved for another dataset or event"
                    )
                after = self._require_budget(
                    dataset,
                    event,
                    coordinator=coordinator,
                    share=share,
                    exclude=key if held is not None else None,
                )
                now = time.time()
                if in_place:  # the same row, the same size or smaller: no new page
                    note = row[4]
                    self._conn.execute(
                        "UPDATE charges SET state=?, created_at=? WHERE query_id=?",
                        (CHARGED, now, key),
                    )
                elif row is not None:
                    self._conn.execute(
                        "UPDATE charges SET dataset=?, kind=?, event=?, created_at=?, note=?, "
                        "coordinator=?, state=? WHERE query_id=?",
                        (
                            dataset,
                            event.kind,
                            encoded,
                            now,
                            str(note)[:200],
                            coordinator,
                            CHARGED,
                            key,
                        ),
                    )
                else:
                    self._conn.execute(
                        "INSERT INTO charges(query_id, dataset, kind, event, created_at, note, "
                        "coordinator, state) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            key,
                            dataset,
                            event.kind,
                            encoded,
                            now,
                            str(note)[:200],
                            coordinator,
                            CHARGED,
                        ),
                    )
                self._conn.execute(
                    "UPDATE budgets SET pure_spent=?, queries=?, exact_releases=? WHERE dataset=?",
                    (str(after.pure_epsilon_spent), after.queries, after.exact_releases, dataset),
                )
            self._reserved.pop(key, None)  # committed: the reservation is the charge now
            if row is not None:
                self._cache.pop((dataset, None), None)
                self._cache.pop((dataset, coordinator), None)
        log.info("charged query %s to dataset %r (%s)", query_id, dataset, event.kind)
        return Charge(
            query_id,
            dataset,
            event,
            now,
            new=True,
            status=after,
            note=str(note)[:200],
            coordinator=coordinator,
        )

    def settle(self, query_id: str, *, coordinator: str = "", steps: int, note: str) -> bool:
        """Return to the budget the steps of a charged block that never left this party.

        A training site charges a block of steps before the first of them leaves it (charge
        before release); when its session ends early (a site left out, the coordinator gone,
        a step refused as late), the block's later steps were never computed or sent, so no
        release happened under them. ``steps`` is how many of the block's steps did leave:
        the row's event becomes the same event with ``steps`` steps (every other parameter
        equal; RDP composes additively over identical steps, so this is exactly the spend of
        the steps released), or the row is removed when ``steps`` is 0. Only the party
        decides this, from what it sent itself; nothing that left is ever given back.

        Returns True when the row changed. LedgerError when the row is not a charge, its
        event has no ``steps``, or ``steps`` is not below its steps; LedgerWriteError (as a
        charge) when it cannot be written, in which case the whole block stays charged."""
        key = _key(_check_coordinator(coordinator), query_id)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ParameterError("steps", steps, "must be an integer >= 0")
        with self._lock, self._writing(f"the settlement of query {query_id!r}"):
            row = self._conn.execute(
                "SELECT dataset, event, state, note FROM charges WHERE query_id=?", (key,)
            ).fetchone()
            if row is None or row[2] != CHARGED:
                raise LedgerError(f"query_id={query_id!r} is not a charge of this ledger")
            dataset, charged = row[0], ev.decode_event(row[1])
            if not isinstance(
                charged, ev.Skellam | ev.SubsampledGaussian | ev.DistributedDiscreteGaussian
            ):
                raise LedgerError(f"query_id={query_id!r} was not charged by steps")
            had = charged.steps
            if steps >= had:
                if steps == had:
                    return False
                raise LedgerError(
                    f"query_id={query_id!r} was charged for {had} steps, not {steps}: a "
                    "settlement only gives back steps"
                )
            if steps == 0:
                self._conn.execute("DELETE FROM charges WHERE query_id=?", (key,))
                # an event by steps has no pure part: only the count of charges changes
                self._conn.execute(
                    "UPDATE budgets SET queries=queries-1 WHERE dataset=?", (dataset,)
                )
            else:
                smaller = replace(charged, steps=steps)
                self._conn.execute(
                    "UPDATE charges SET event=?, note=? WHERE query_id=?",
                    (ev.encode_event(smaller), f"{row[3]} ({note})"[:200], key),
                )
            # a row changed in place: the cached sums over the rows are stale
            self._cache.pop((dataset, None), None)
            self._cache.pop((dataset, coordinator), None)
        log.info("settled query %s: %d of %d steps left this party", query_id, steps, had)
        return True

    def charges(self, dataset: str) -> list[Charge]:
        """Every charge of ``dataset``, oldest first (reservations are not charges)."""
        dataset = self._budget_of(dataset)
        with self._lock:
            return [
                Charge(
                    _unkey(r[4], r[0]),
                    dataset,
                    ev.decode_event(r[1]),
                    float(r[2]),
                    new=False,
                    note=r[3],
                    coordinator=r[4],
                )
                for r in self._conn.execute(
                    "SELECT query_id, event, created_at, note, coordinator FROM charges "
                    "WHERE dataset=? AND state=? ORDER BY rowid",
                    (dataset, CHARGED),
                )
            ]


def _with_events(
    name: str, budget: Fraction, delta: float, spent: _Spend, extra: Sequence[ev.Event]
) -> BudgetStatus:
    """The status of budget ``name`` (``budget`` at ``delta``) after ``spent`` (its rows:
    the releases counted) and the ``extra`` events."""
    pure, curve, count, exact = spent.pure, spent.curve, spent.rdp_parts, spent.exact
    queries = spent.rows
    for event in extra:
        queries += 1
        pure, curve, count, exact = _add(event, pure, curve, count, exact)
    rdp_eps = 0.0
    if count:
        # An RDP release needs delta > 0; a pure-eps-only budget can never pay for it.
        rdp_eps = (
            rdp.to_epsilon(orders=rdp.DEFAULT_ORDERS, rdp=curve, delta=delta)[0]
            if delta > 0
            else math.inf
        )
    return BudgetStatus(
        dataset=name,
        budget_epsilon=budget,
        delta=delta,
        spent_epsilon=float(pure) + rdp_eps,
        pure_epsilon_spent=pure,
        rdp_epsilon_spent=rdp_eps,
        queries=queries,
        exact_releases=exact,
    )


def _add(
    event: ev.Event, pure: Fraction, curve: NDArray[np.float64], count: int, exact: int
) -> tuple[Fraction, NDArray[np.float64], int, int]:
    for part in ev.flatten([event]):
        if isinstance(part, ev.PureDp):
            pure += part.epsilon
        elif isinstance(part, ev.Exact):
            exact += 1
        else:
            curve = curve + rdp_curve(part, orders=rdp.DEFAULT_ORDERS)
            count += 1
    return pure, curve, count, exact


def _describe(event: ev.Event, delta: float) -> str:
    parts = ev.flatten([event])
    if all(isinstance(p, ev.PureDp | ev.Exact) for p in parts):
        pure = sum((p.epsilon for p in parts if isinstance(p, ev.PureDp)), Fraction(0))
        return str(pure) if pure else "0 (exact)"
    if delta == 0:
        return f"{event.kind} (needs delta > 0)"
    return f"{compose([event], delta=delta).epsilon:.6g}"
