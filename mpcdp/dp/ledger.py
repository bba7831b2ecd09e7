"""Per-party privacy budget ledger in SQLite (docs/design.md, "Budget").

Each party owns one ledger file with a budget (epsilon, delta) per dataset and one row per
charged query. The rules:

- the file: :meth:`BudgetLedger.create` (``mpcdp party init``, or ``mpcdp party serve
  --create-ledger`` on a first start) makes a ledger once; opening one checks every row and
  refuses a missing, empty, foreign or corrupt file; one process owns it; every change is
  one durable transaction; backups are online. All of it is :mod:`mpcdp.dp.ledger_file`'s,
  with the schema.
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

The running totals count charged rows only and are updated in the same transaction as the
row, so a check costs O(1) for pure-eps datasets; RDP events are re-read and composed (they
are few: a training run is charged as a few blocks).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from types import TracebackType

from mpcdp.dp import events as ev
from mpcdp.dp.accountant import compose
from mpcdp.dp.ledger_file import CHARGED, RESERVED, RESTORE_HINT, LedgerFile, LedgerWriteError
from mpcdp.dp.ledger_spend import TOTAL, BudgetStatus, Spending, within
from mpcdp.errors import BudgetExceededError, LedgerError, ParameterError

__all__ = ["RESTORE_HINT", "TOTAL", "BudgetLedger", "BudgetStatus", "Charge", "LedgerWriteError"]

log = logging.getLogger(__name__)

_MAX_ID_LEN = 256


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
        self._file = LedgerFile(path, timeout_s=timeout_s, owner=owner, create=create)
        self.path = self._file.path
        self._lock = self._file.lock
        self._reserved: dict[str, _Reservation] = {}
        self._stale: set[str] = set()  # released reservations whose row is still on disk
        self._clock = clock
        self._spent = Spending(self._file)
        #: dataset entry -> the budget it draws on, where that is not its own name
        self._budget_names: dict[str, str] = {}

    @classmethod
    def create(cls, path: str | Path, *, owner: bool = False) -> BudgetLedger:
        """A new, empty ledger at ``path`` (refused when the file exists), open."""
        return cls(path, owner=owner, create=True)

    # -- the file (mpcdp.dp.ledger_file) ----------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        return self._file.conn

    def _writing(self, what: str) -> AbstractContextManager[None]:
        return self._file.writing(what)

    def verify(self) -> None:
        """Check every row of the file (:meth:`.LedgerFile.verify`)."""
        self._file.verify()

    def backup(self, target: str | Path) -> None:
        """Copy the ledger to ``target``, a new file, checked (:meth:`.LedgerFile.backup`)."""
        self._file.backup(target)

    def close(self) -> None:
        with self._lock:
            self._file.close()
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
                self._spent.budget_row(_check_name("budget", budget))  # ParameterError: none such
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
            pure, queries, exact = self._spent.budget_row(old)[2:]
            target = self._spent.budget_row(into)
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
            self._spent.forget()
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
            return self._spent.total_status(())

    def _require_total(self, event: ev.Event, *, coordinator: str, exclude: str | None) -> None:
        """BudgetExceededError when ``event``, with every live reservation on any dataset
        but ``exclude``, would overdraw the party's total budget. The refusal counts the
        asking coordinator's own reservations, never the others' (it only says that theirs,
        released when their rounds end, are in the way)."""
        held = {k: r for k, r in self._live().items() if k != exclude}
        after = self._spent.total_status([*(r.event for r in held.values()), event])
        if after is None or within(after):
            return
        before = self._spent.total_status(())
        assert before is not None
        mine = [r.event for r in held.values() if r.coordinator == coordinator]
        spent = f"{before.spent_epsilon:.6g} by all its datasets together"
        if mine:
            own = self._spent.total_status(mine)
            assert own is not None
            spent += f" (+{own.spent_epsilon - before.spent_epsilon:.6g} reserved by your rounds)"
        alone = self._spent.total_status([*mine, event])
        if alone is not None and within(alone):
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
            own = self._spent.status(dataset, [*mine, event], coordinator=coordinator, share=share)
            if not within(own):
                before = self._spent.status(dataset, coordinator=coordinator, share=share)
                reserved = (
                    self._spent.status(
                        dataset, mine, coordinator=coordinator, share=share
                    ).spent_epsilon
                    - before.spent_epsilon
                )
                whole = self._spent.budget_row(dataset)[0]
                raise BudgetExceededError(
                    dataset=dataset,
                    requested=_describe(event, before.delta),
                    spent=f"{before.spent_epsilon:.6g} by coordinator {coordinator!r}"
                    + (f" (+{reserved:.6g} reserved by its rounds in flight)" if mine else ""),
                    budget=f"{own.budget_epsilon} (coordinator {coordinator!r}'s share "
                    f"{share} of the dataset's {whole})",
                    delta=before.delta,
                )
        if not within(self._spent.status(dataset, [*(r.event for r in held.values()), event])):
            before = self._spent.status(dataset)
            reserved = (
                self._spent.status(dataset, [r.event for r in held.values()]).spent_epsilon
                - before.spent_epsilon
            )
            others = [r for r in held.values() if r.coordinator != coordinator]
            spent = f"{before.spent_epsilon:.6g}"
            if held:
                spent += f" (+{reserved:.6g} reserved by rounds in flight)"
            if others and within(self._spent.status(dataset, [*mine, event])):
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
        return self._spent.status(dataset, [event])

    def status(self, dataset: str) -> BudgetStatus:
        """Budget, spend and counts for ``dataset`` (charges only, not reservations)."""
        dataset = self._budget_of(dataset)
        with self._lock:
            return self._spent.status(dataset)

    def coordinator_status(
        self, dataset: str, *, coordinator: str, share: Fraction | None
    ) -> BudgetStatus:
        """What ``coordinator`` has charged to ``dataset``, against its ``share`` of the
        budget (None: the whole budget)."""
        dataset = self._budget_of(dataset)
        _check_coordinator(coordinator)
        with self._lock:
            return self._spent.status(
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
            left = self._spent.status(dataset, mine).remaining_epsilon
            if share is None or share >= 1:
                return left
            own = self._spent.status(dataset, mine, coordinator=coordinator, share=share)
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
            base = self._spent.status(dataset)
            return (
                self._spent.status(dataset, held).spent_epsilon - base.spent_epsilon
                if held
                else 0.0
            )

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
                with self._file.transaction():
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
                self._spent.forget(dataset, coordinator)
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
            self._spent.forget(dataset, coordinator)
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


def _describe(event: ev.Event, delta: float) -> str:
    parts = ev.flatten([event])
    if all(isinstance(p, ev.PureDp | ev.Exact) for p in parts):
        pure = sum((p.epsilon for p in parts if isinstance(p, ev.PureDp)), Fraction(0))
        return str(pure) if pure else "0 (exact)"
    if delta == 0:
        return f"{event.kind} (needs delta > 0)"
    return f"{compose([event], delta=delta).epsilon:.6g}"
