"""A party's ledger as a person reads it: one entry per query or per training block.

:class:`~mpcdp.dp.ledger.BudgetLedger` stores one row per charge (a query, or a block of
training steps) and composes them to check the budget. This module turns those rows into a
report (``mpcdp budget``): what each entry spent and for what, exact decimals for pure-DP
epsilons (the ledger keeps them as rationals), and the composition of RDP charges made
visible. RDP charges (Skellam, distributed discrete Gaussian, subsampled Gaussian: the
(epsilon, delta) mechanisms and training) are not added up: their Renyi-DP curves are added
and converted to one epsilon at the dataset's delta, so a second charge that costs 2 on its
own can raise the total by less than 2. Each entry therefore shows its epsilon alone and the
running RDP total after it.

Pure functions over explicit arguments; nothing happens at import time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction

from mpcdp.dp import events as ev
from mpcdp.dp.accountant import compose
from mpcdp.dp.ledger import BudgetStatus, Charge

__all__ = ["RDP_NOTE", "DatasetReport", "Entry", "exact_decimal", "report"]

#: training blocks are charged as RUN_ID/SESSION_HEX/BLOCK
#: (protocol.training.site_engine._charge_id)
_TRAINING_ID = re.compile(r"^(?P<run>.+)/(?P<session>[0-9a-f]{16,})/(?P<block>\d+)$")

RDP_NOTE = (
    "RDP charges compose: their Renyi-DP curves add up and are converted to one epsilon at "
    "the dataset's delta, which grows more slowly than the sum of each charge's epsilon "
    "alone; 'RDP total' is that epsilon after each entry."
)


def exact_decimal(value: Fraction) -> str:
    """``value`` as an exact decimal when it has one (1/10 -> "0.1"), else "p/q (~x)"."""
    value = Fraction(value)
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator} (~{float(value):.6g})"
    digits = max(twos, fives)
    scaled = value * 10**digits
    assert scaled.denominator == 1
    sign = "-" if scaled < 0 else ""
    text = str(abs(scaled.numerator)).rjust(digits + 1, "0")
    whole, frac = text[: len(text) - digits], text[len(text) - digits :]
    return f"{sign}{whole}.{frac}" if digits else f"{sign}{whole}"


@dataclass(frozen=True)
class Entry:
    """One charge: a query, or a block of a training run."""

    kind: str  # "query" or "training"
    query_id: str  # the ledger's id (for training: RUN/SESSION/BLOCK)
    run_id: str | None
    block: int | None
    at: str  # UTC, ISO 8601 to the second
    mechanism: str  # what was released: "pure DP", "exact (no DP)", "skellam", ...
    pure_epsilon: Fraction | None  # the pure-DP part, exactly (None: no pure part)
    exact: bool  # a noiseless release (mechanism none) is part of it
    rdp_epsilon_alone: float | None  # the RDP part's epsilon on its own, at the delta
    rdp_total_after: float | None  # all RDP charges up to this one, composed
    steps: int | None  # training steps in the block
    note: str = ""  # what the charge paid for, as the party recorded it
    coordinator: str = ""  # whose query it was ("" in ledgers older than schema 3)


@dataclass(frozen=True)
class DatasetReport:
    dataset: str
    budget_epsilon: Fraction
    delta: float
    pure_spent: Fraction
    rdp_spent: float
    spent: float
    remaining: float
    queries: int
    exact_queries: int
    training_blocks: dict[str, int]  # run id -> blocks charged
    entries: tuple[Entry, ...]


def _mechanism(parts: Sequence[ev.Event]) -> str:
    names = []
    for p in parts:
        name = {
            ev.PureDp.kind: "pure DP",
            ev.Exact.kind: "exact (no DP)",
            ev.Skellam.kind: "skellam",
            ev.DistributedDiscreteGaussian.kind: "discrete-gaussian",
            ev.SubsampledGaussian.kind: "gaussian",
        }[p.kind]
        if name not in names:
            names.append(name)
    return " + ".join(names)


def _at(created_at: float) -> str:
    return datetime.fromtimestamp(created_at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def report(*, status: BudgetStatus, charges: Sequence[Charge]) -> DatasetReport:
    """The report of one dataset from its status and its charges (oldest first)."""
    delta = status.delta
    entries: list[Entry] = []
    rdp_so_far: list[ev.Event] = []
    queries = exact_queries = 0
    blocks: dict[str, int] = {}
    for c in charges:
        parts = ev.flatten([c.event])
        pure = [p.epsilon for p in parts if isinstance(p, ev.PureDp)]
        rdp_parts = [p for p in parts if not isinstance(p, ev.PureDp | ev.Exact)]
        exact = any(isinstance(p, ev.Exact) for p in parts)
        alone = total = None
        if rdp_parts:
            rdp_so_far.extend(rdp_parts)
            if delta > 0:
                alone = compose(rdp_parts, delta=delta).epsilon
                total = compose(rdp_so_far, delta=delta).epsilon
        match = _TRAINING_ID.match(c.query_id)
        steps = sum(getattr(p, "steps", 0) for p in rdp_parts) or None
        if match:
            run = match["run"]
            blocks[run] = blocks.get(run, 0) + 1
        else:
            queries += 1
            exact_queries += int(exact)
        entries.append(
            Entry(
                kind="training" if match else "query",
                query_id=c.query_id,
                run_id=match["run"] if match else None,
                block=int(match["block"]) if match else None,
                at=_at(c.created_at),
                mechanism=_mechanism(parts),
                pure_epsilon=sum(pure, Fraction(0)) if pure else None,
                exact=exact,
                rdp_epsilon_alone=alone,
                rdp_total_after=total,
                steps=steps if match else None,
                note=c.note,
                coordinator=c.coordinator,
            )
        )
    return DatasetReport(
        dataset=status.dataset,
        budget_epsilon=status.budget_epsilon,
        delta=delta,
        pure_spent=status.pure_epsilon_spent,
        rdp_spent=status.rdp_epsilon_spent,
        spent=status.spent_epsilon,
        remaining=status.remaining_epsilon,
        queries=queries,
        exact_queries=exact_queries,
        training_blocks=blocks,
        entries=tuple(entries),
    )
