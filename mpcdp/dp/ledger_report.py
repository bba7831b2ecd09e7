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

A person asks "what did each run or query cost, and who spent it": :func:`spending_lines`
groups a training run's blocks (charged as ``RUN_ID/SESSION_HEX/BLOCK`` in the
coordinator's namespace of query ids) into one :class:`SpendLine` per run and coordinator,
with the run's own epsilon (its blocks' RDP curves composed) and the budget's composed total
after it; :func:`parse_since` reads ``mpcdp budget --since`` (a date, a UTC time or a
duration back from now) and :data:`TOTAL_NOTE` explains the running total in one line.

Pure functions over explicit arguments; nothing happens at import time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction

from mpcdp.dp import events as ev
from mpcdp.dp.accountant import compose
from mpcdp.dp.ledger import BudgetStatus, Charge
from mpcdp.errors import ParameterError

__all__ = [
    "RDP_NOTE",
    "TOTAL_NOTE",
    "DatasetReport",
    "Entry",
    "SpendLine",
    "exact_decimal",
    "parse_since",
    "report",
    "spending_lines",
]

#: training blocks are charged as RUN_ID/SESSION_HEX/BLOCK
#: (protocol.training.site_engine._charge_id)
_TRAINING_ID = re.compile(r"^(?P<run>.+)/(?P<session>[0-9a-f]{16,})/(?P<block>\d+)$")

RDP_NOTE = (
    "RDP charges compose: their Renyi-DP curves add up and are converted to one epsilon at "
    "the dataset's delta, which grows more slowly than the sum of each charge's epsilon "
    "alone; 'RDP total' is that epsilon after each entry."
)

#: the running total of a budget, in one line (``mpcdp budget``)
TOTAL_NOTE = (
    "spent = the pure-DP epsilons added exactly + the RDP charges (queries with a delta, "
    "training) composed into one epsilon at the budget's delta (RDP charges compose to less "
    "than the sum of their epsilons; a run's is at most its target); left = budget - spent"
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
    time: float = 0.0  # ``at`` as seconds since the epoch
    rdp_events: tuple[ev.Event, ...] = ()  # the RDP parts of the charge (for composing a run)


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
                time=c.created_at,
                rdp_events=tuple(rdp_parts),
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


@dataclass(frozen=True)
class SpendLine:
    """One query, or one training run (all its blocks, from one coordinator), as one line."""

    kind: str  # "query" or "training"
    id: str  # the query id, or the run id
    coordinator: str  # who spent it ("" in ledgers older than schema 3)
    first_at: str  # UTC, ISO 8601: the first charge of it
    last_at: str  # the last charge of it (== first_at for a query)
    first_time: float  # first_at as seconds since the epoch (for --since)
    last_time: float
    what: str  # what it paid for, in words
    pure_epsilon: Fraction | None  # its pure-DP part, exactly
    exact: bool  # a noiseless release is part of it
    rdp_epsilon: float | None  # its RDP parts composed on their own, at the budget's delta
    rdp_total_after: float | None  # the budget's RDP charges composed, up to its last charge
    blocks: int  # training blocks charged (0 for a query)
    steps: int | None  # training steps charged (None for a query)

    @property
    def epsilon(self) -> float:
        """What it paid on its own: pure part + RDP part (each at the budget's delta)."""
        return float(self.pure_epsilon or 0) + (self.rdp_epsilon or 0.0)


#: a training block's note: "training RUN (MODEL) steps A-B", maybe " (audit run)"
_BLOCK_NOTE = re.compile(r"^training \S+ (?P<model>\(.*?\)) steps \d+-\d+(?P<audit>.*)$")


def spending_lines(report: DatasetReport) -> tuple[SpendLine, ...]:
    """``report``'s entries as one line per query and per training run (its blocks grouped
    by run id and coordinator), ordered by their first charge."""
    groups: dict[tuple[str, str, str], list[Entry]] = {}
    for e in report.entries:
        key = (
            ("training", e.coordinator, e.run_id)
            if e.kind == "training" and e.run_id is not None
            else ("query", e.coordinator, e.query_id)
        )
        groups.setdefault(key, []).append(e)
    lines = []
    for (kind, coordinator, ident), entries in groups.items():
        first, last = entries[0], entries[-1]
        pure = [e.pure_epsilon for e in entries if e.pure_epsilon is not None]
        rdp_alone: float | None = None
        if kind == "query":
            rdp_alone = first.rdp_epsilon_alone
            what = first.note or f"query ({first.mechanism})"
        else:
            rdp_alone = _composed(report, entries)
            note = _BLOCK_NOTE.match(first.note)
            model = f" {note['model']}" if note else ""
            audit = note["audit"] if note else ""
            what = f"training{model}{audit}"
        steps = sum(e.steps or 0 for e in entries) if kind == "training" else None
        lines.append(
            SpendLine(
                kind=kind,
                id=ident,
                coordinator=coordinator,
                first_at=first.at,
                last_at=last.at,
                first_time=first.time,
                last_time=last.time,
                what=what,
                pure_epsilon=sum(pure, Fraction(0)) if pure else None,
                exact=any(e.exact for e in entries),
                rdp_epsilon=rdp_alone,
                rdp_total_after=last.rdp_total_after,
                blocks=len(entries) if kind == "training" else 0,
                steps=steps,
            )
        )
    return tuple(sorted(lines, key=lambda li: li.first_time))


def _composed(report: DatasetReport, entries: Sequence[Entry]) -> float | None:
    """The RDP epsilon of ``entries`` together (a run's blocks), at the report's delta."""
    parts = [p for e in entries for p in e.rdp_events]
    if not parts or report.delta <= 0:
        return None
    return compose(parts, delta=report.delta).epsilon


_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, *, now: float) -> float:
    """``mpcdp budget --since``: a duration back from ``now`` (``90m``, ``12h``, ``7d``,
    ``2w``; s, m, h, d, w), a date (``2026-12-01``, midnight UTC) or a time
    (``2026-12-01T09:30``, UTC unless it gives an offset), as seconds since the epoch."""
    value = text.strip()
    m = _DURATION.match(value)
    if m:
        return now - float(m["n"]) * _SECONDS[m["unit"]]
    try:
        when = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise ParameterError(
            "since",
            text,
            "is neither a duration (e.g. 12h, 7d, 2w; units s m h d w) nor a date or UTC time "
            "(e.g. 2026-12-01 or 2026-12-01T09:30)",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - datetime(1970, 1, 1, tzinfo=timezone.utc)) / timedelta(seconds=1)
