"""What a ledger's charged rows add up to, at a budget's delta (docs/design.md, "Budget").

Pure epsilons add as exact rationals (the ``budgets`` row keeps their running total); every
other event is composed by its RDP curve over :data:`mpcdp.dp.rdp.DEFAULT_ORDERS` (curves
add, Mironov 2017, Proposition 1) and converted at the budget's delta
(:func:`mpcdp.dp.rdp.to_epsilon`); exact releases are counted. :class:`Spending` reads the
rows of :mod:`mpcdp.dp.ledger_file` once and keeps each dataset's sums (all coordinators,
or one coordinator's), extending them by the rows added since and recomputing them when a
row at or below the ones seen changed; :func:`within` is the exact check every
reservation and charge of :mod:`mpcdp.dp.ledger` must pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp import events as ev
from mpcdp.dp import rdp
from mpcdp.dp.accountant import rdp_curve
from mpcdp.dp.ledger_file import CHARGED, LedgerFile
from mpcdp.errors import ParameterError

__all__ = ["TOTAL", "BudgetStatus", "Spend", "Spending", "within"]

#: the name the party's total budget goes by in statuses and refusals
TOTAL = "(all datasets)"


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


@dataclass(frozen=True)
class Spend:
    """What a set of charged rows adds up to, and the rows seen (for the cache)."""

    last_rowid: int
    rows: int
    pure: Fraction
    curve: NDArray[np.float64]
    rdp_parts: int
    exact: int


class Spending:
    """The sums of one ledger file's charged rows, cached (module docstring). The caller
    holds the file's lock around every call, and calls :meth:`forget` when it changed a row
    in place (a reservation turned into a charge, a settlement, a merge)."""

    def __init__(self, file: LedgerFile) -> None:
        self._file = file
        self._cache: dict[tuple[str, str | None], Spend] = {}

    def forget(self, dataset: str | None = None, coordinator: str | None = None) -> None:
        """Drop the sums of ``dataset`` (all coordinators' and ``coordinator``'s), or every
        sum (``dataset`` None)."""
        if dataset is None:
            self._cache.clear()
            return
        self._cache.pop((dataset, None), None)
        self._cache.pop((dataset, coordinator), None)

    def spend(self, dataset: str, coordinator: str | None) -> Spend:
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
        db = self._file.conn
        cached = self._cache.get((dataset, coordinator))
        if cached is not None:
            seen = db.execute(
                f"SELECT count(*) FROM charges WHERE {where} AND rowid <= ?",
                (*args, cached.last_rowid),
            ).fetchone()[0]
            if seen != cached.rows:
                cached = None
        spend = cached or Spend(0, 0, Fraction(0), np.zeros(len(rdp.DEFAULT_ORDERS)), 0, 0)
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
            pure, curve, parts, exact = add_event(ev.decode_event(text), pure, curve, parts, exact)
            last, rows = rowid, rows + 1
        spend = Spend(last, rows, pure, curve, parts, exact)
        self._cache[(dataset, coordinator)] = spend
        return spend

    def budget_row(self, dataset: str) -> tuple[Fraction, float, Fraction, int, int]:
        row = self._file.conn.execute(
            "SELECT epsilon, delta, pure_spent, queries, exact_releases FROM budgets "
            "WHERE dataset=?",
            (dataset,),
        ).fetchone()
        if row is None:
            raise ParameterError("dataset", dataset, "has no budget in this ledger")
        return Fraction(row[0]), float(row[1]), Fraction(row[2]), int(row[3]), int(row[4])

    def status(
        self,
        dataset: str,
        extra: Sequence[ev.Event] = (),
        *,
        coordinator: str | None = None,
        share: Fraction | None = None,
    ) -> BudgetStatus:
        """Status from the charged rows plus the ``extra`` events: the dataset's, or (with
        ``coordinator``) that coordinator's against ``share`` of the budget."""
        budget, delta, pure, queries, exact = self.budget_row(dataset)
        if coordinator is None:
            spend = self.spend(dataset, None)
        else:
            spend = self.spend(dataset, coordinator)
            budget = budget * (share if share is not None else 1)
            pure, queries, exact = spend.pure, spend.rows, spend.exact
        return with_events(
            dataset,
            budget,
            delta,
            Spend(0, queries, pure, spend.curve, spend.rdp_parts, exact),
            extra,
        )

    def total_row(self) -> tuple[Fraction, float] | None:
        rows = dict(
            self._file.conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('total_epsilon', 'total_delta')"
            ).fetchall()
        )
        if "total_epsilon" not in rows:
            return None
        return Fraction(rows["total_epsilon"]), float(rows.get("total_delta", "0"))

    def total_status(self, extra: Sequence[ev.Event]) -> BudgetStatus | None:
        """What every dataset has charged, plus the ``extra`` events, against the total."""
        total = self.total_row()
        if total is None:
            return None
        budget, delta = total
        pure, queries, exact = Fraction(0), 0, 0
        curve, count = np.zeros(len(rdp.DEFAULT_ORDERS)), 0
        rows = self._file.conn.execute(
            "SELECT dataset, pure_spent, queries, exact_releases FROM budgets"
        ).fetchall()  # one read of every budget's running totals, not one per budget
        for name, spent_pure, n, n_exact in rows:
            spend = self.spend(name, None)
            pure, queries, exact = pure + Fraction(spent_pure), queries + n, exact + n_exact
            curve, count = curve + spend.curve, count + spend.rdp_parts
        return with_events(
            TOTAL, budget, delta, Spend(0, queries, pure, curve, count, exact), extra
        )


def within(status: BudgetStatus) -> bool:
    """Exact check: the pure part as a rational plus the RDP float converted exactly."""
    if not math.isfinite(status.rdp_epsilon_spent):
        return False
    total = status.pure_epsilon_spent + Fraction(status.rdp_epsilon_spent)
    return total <= status.budget_epsilon


def with_events(
    name: str, budget: Fraction, delta: float, spent: Spend, extra: Sequence[ev.Event]
) -> BudgetStatus:
    """The status of budget ``name`` (``budget`` at ``delta``) after ``spent`` (its rows:
    the releases counted) and the ``extra`` events."""
    pure, curve, count, exact = spent.pure, spent.curve, spent.rdp_parts, spent.exact
    queries = spent.rows
    for event in extra:
        queries += 1
        pure, curve, count, exact = add_event(event, pure, curve, count, exact)
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


def add_event(
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
