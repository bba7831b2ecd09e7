"""A party's ledger file in SQLite: made once, opened with every row checked, one owner,
durable transactions, online backups (docs/design.md, "Budget").

What the rows mean, and every rule about spending, is :mod:`mpcdp.dp.ledger`'s; this module
keeps the file those rules rely on:

- created on purpose, never silently: a new ledger is refused over an existing file, and
  opening one refuses a missing, empty (0-byte), foreign or corrupt file with a message that
  says how to restore it, instead of starting over with the whole budget
  (:data:`RESTORE_HINT`). Every row is checked when a ledger is opened
  (:meth:`LedgerFile.verify`): an event that does not decode, a budget that is not a number,
  running totals that differ from the rows.
- durable: synchronous=FULL, a persistent rollback journal (``journal_mode=PERSIST``), and
  each change one ``BEGIN IMMEDIATE`` transaction (:meth:`LedgerFile.writing`), so a process
  killed at any point leaves either the whole change or none of it, and concurrent processes
  serialise on the write lock. PERSIST keeps the journal's size, so a change that rewrites
  the pages an earlier one wrote needs no new disk space. WAL would be faster, but a copy of
  the ``.db`` file alone can lose committed rows, and it needs new space at charge time.
- one owner: the party node opens its ledger with ``owner=True``, which takes an exclusive
  advisory lock (flock) on the file for the ledger's lifetime; a second party process on the
  same ledger fails at start instead of enforcing the budget a second time. Reservations
  belong to sessions, which die with the owning process, so the owner deletes leftover
  reserved rows when it opens the file. Read-only users (``mpcdp budget``) take no lock.
- backups: :meth:`LedgerFile.backup` copies the file with SQLite's online backup API
  (consistent even while the node charges), and checks the copy like any ledger it opens.

Schema (version 3)::

    meta(key TEXT PRIMARY KEY, value TEXT)                    -- 'schema_version' -> '3'
    budgets(dataset TEXT PRIMARY KEY, epsilon TEXT, delta REAL,
            pure_spent TEXT, queries INTEGER, exact_releases INTEGER)   -- running totals
    charges(query_id TEXT PRIMARY KEY, dataset TEXT REFERENCES budgets, kind TEXT,
            event TEXT, created_at REAL, note TEXT, coordinator TEXT, state TEXT)

``note`` (version 2) says what a charge paid for ("mean of raise (discrete-laplace)",
"training run-7 steps 30-39"); ``coordinator`` and ``state`` ('charged' or 'reserved') are
version 3. Older ledgers gain the columns when opened (empty coordinator, 'charged'). The
party's total budget, where it has one, is kept in ``meta`` (``total_epsilon``,
``total_delta``), so no version added a table for it.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from urllib.parse import quote

from mpcdp.dp import events as ev
from mpcdp.errors import LedgerError, MpcdpError

__all__ = ["CHARGED", "RESERVED", "RESTORE_HINT", "LedgerFile", "LedgerWriteError"]

log = logging.getLogger("mpcdp.dp.ledger")

SCHEMA_VERSION = "3"
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


class LedgerFile:
    """One ledger's SQLite file, open (module docstring). ``create=True`` makes a new one
    (refused when the file exists); otherwise the file must be a ledger already, checked row
    by row. ``owner=True`` (the party node) holds an exclusive lock on the file while open.
    Every use of :attr:`conn` holds :attr:`lock`."""

    def __init__(
        self,
        path: str | Path,
        *,
        timeout_s: float = 30.0,
        owner: bool = False,
        create: bool = False,
    ) -> None:
        self.path = Path(path)
        #: every use of the connection holds it (the ledger is shared by threads)
        self.lock = threading.RLock()
        self._owner_fd: int | None = None
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
        db = self.conn
        with self.transaction():
            for stmt in (*_TABLES, _INDEX_V3):
                db.execute(stmt)
            db.execute(
                "INSERT INTO meta(key, value) VALUES('schema_version', ?), ('created_at', ?)",
                (SCHEMA_VERSION, repr(time.time())),
            )
        log.info("created ledger %s", self.path)

    def _open(self) -> None:
        db = self.conn
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
        with self.transaction():  # 2 added charges.note, 3 coordinator and state
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
        with self.lock:
            # one read transaction: another process charging between the SELECTs of the
            # budgets and of the charges would otherwise look like totals that do not add up
            self.conn.execute("BEGIN")
            try:
                problems = self._problems()
            finally:
                self.conn.execute("COMMIT")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise LedgerError(
                f"ledger {self.path} is corrupt: {problems[0]}{more}. Refusing to use it: "
                f"budgets could no longer be enforced; {RESTORE_HINT}"
            )

    def _problems(self) -> list[str]:
        db = self.conn
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
        with self.transaction():
            gone = self.conn.execute("DELETE FROM charges WHERE state=?", (RESERVED,)).rowcount
        if gone:
            log.info("ledger %s: dropped %d reservations of a previous run", self.path, gone)

    # -- use --------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerError(f"ledger {self.path} is closed")
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[None]:
        db = self.conn
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """A transaction whose storage failure (full disk, I/O error) is a LedgerWriteError."""
        try:
            with self.transaction():
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
        with self.lock:
            self._close_quietly()

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
                with self.lock:
                    self.conn.backup(copy)
            finally:
                copy.close()
            LedgerFile(dest).close()  # opened like any ledger: checked row by row
        except (sqlite3.Error, LedgerError, OSError) as exc:
            dest.unlink(missing_ok=True)
            raise LedgerError(f"backup of ledger {self.path} to {dest} failed: {exc}") from None
        log.info("ledger %s backed up to %s", self.path, dest)
