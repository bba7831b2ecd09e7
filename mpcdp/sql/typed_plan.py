"""The typed plan of a DP SQL query: what every party computes, cell by cell.

An analyst's SQL text is compiled (:mod:`mpcdp.sql.compile`) against a party's PUBLIC table
declaration into a :class:`SqlQuery`: one declared table, a typed WHERE predicate, GROUP BY
categorical columns with PUBLIC keys, and aggregates (COUNT, SUM, AVG, quantiles). Nothing in
a plan depends on a party's rows, so every party derives the same plan from the same text and
the same declaration, and :func:`digest` lets them check that they did (a coordinator that
shows parties different plans, or a party whose declared bounds differ, is caught).

Why the keys must be public: the released vector has one entry per cell of the cartesian
product of the key lists. If the cells were the group values found in the data, the very
presence of a cell would reveal that some row has that value, with no noise to hide it. With
public keys every cell is released (missing ones as 0, plus noise) whatever the data holds.

The local measures (:meth:`SqlQuery.measures`): each party computes, per cell, one number per
measure over its own bounded rows (see :mod:`mpcdp.sql.render`):

| aggregate     | measures (kind)                       | per_row: change from one row     |
| COUNT(*)      | rows                                  | 1                                |
| COUNT(col)    | values (non-NULL values of col)       | 1                                |
| SUM(col)      | sum of clamp(col, lower, upper)       | max(|lower|, |upper|)            |
| AVG(col)      | centered_sum: sum of clamp(col) - mid | (upper - lower) / 2              |
|               | values                                | 1                                |
| quantile      | bin: one per bin [e_i, e_i+1)         | 1 (a row lands in ONE bin)       |

AVG is released as mid + centered_sum / values with mid = (lower + upper) / 2: the centered
sum has half the sensitivity of a plain sum. A quantile is released as a histogram over
fixed bins (the declared edges of the column, or uniform bins over its bounds) from which
the level p is read off after the noise; values are clamped to [e_0, e_last] first, so every
non-NULL value lands in exactly one bin (the last bin is closed).

``per_row`` is the change of ONE measure in ONE cell when one row is added or removed. A row
lands in one cell and, within a quantile, in one bin: the lead's sensitivities combine these
per tensor (times the rows and groups a unit may contribute, times the parties per unit).

Canonical encoding for the digest (version 1): a JSON object of the plan's fields with sorted
keys, no whitespace, UTF-8; floats as ``repr`` strings; each constant tagged with its type
({"num": "2024.0"} or {"str": "2024"}), each predicate as {"<kind>": {...}}; digest = SHA-256
of ``b"mpcdp sql plan v1\\n" + that``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from mpcdp.config.datasets import ColumnSpec
from mpcdp.errors import ParameterError

__all__ = [
    "AGGREGATE_KINDS",
    "COMPARE_OPS",
    "MEASURE_KINDS",
    "Aggregate",
    "AggregateKind",
    "And",
    "Between",
    "Compare",
    "CompareOp",
    "Constant",
    "InList",
    "IsNull",
    "Measure",
    "MeasureKind",
    "Not",
    "Or",
    "Predicate",
    "SqlQuery",
    "TableDecl",
    "canonical",
    "digest",
    "predicate_columns",
]

_PLAN_LABEL = b"mpcdp sql plan v1\n"

AggregateKind = Literal["count", "sum", "avg", "quantile"]
MeasureKind = Literal["rows", "values", "sum", "centered_sum", "bin"]
CompareOp = Literal["=", "<>", "<", "<=", ">", ">="]
AGGREGATE_KINDS: tuple[AggregateKind, ...] = ("count", "sum", "avg", "quantile")
MEASURE_KINDS: tuple[MeasureKind, ...] = ("rows", "values", "sum", "centered_sum", "bin")
COMPARE_OPS: tuple[CompareOp, ...] = ("=", "<>", "<", "<=", ">", ">=")

#: A typed constant: float for a numeric column, str for a categorical one.
Constant = float | str


@dataclass(frozen=True)
class TableDecl:
    """What the compiler knows of a table: the party's PUBLIC declaration only.

    ``privacy_unit`` names the column that identifies the person (None: each row is its
    own unit); a unit contributes at most ``max_groups_per_unit`` groups (cells) and at most
    ``max_rows_per_unit`` rows to each of them.
    """

    name: str
    columns: tuple[ColumnSpec, ...]
    privacy_unit: str | None = None
    max_rows_per_unit: int = 1
    max_groups_per_unit: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ParameterError("name", self.name, "a table needs a non-empty name")
        object.__setattr__(self, "columns", tuple(self.columns))
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ParameterError("columns", names, f"table {self.name!r}: names must be distinct")
        if self.privacy_unit is not None and (
            not isinstance(self.privacy_unit, str) or not self.privacy_unit
        ):
            raise ParameterError("privacy_unit", self.privacy_unit, "must be a column name or None")
        for field in ("max_rows_per_unit", "max_groups_per_unit"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10**6:
                raise ParameterError(field, v, "must be an int in [1, 10^6]")

    def column(self, name: str) -> ColumnSpec | None:
        """The declared column ``name`` (exact spelling), or None."""
        for c in self.columns:
            if c.name == name:
                return c
        return None


# --- predicates (WHERE) -------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    """``column op value``; value is a float for a numeric column, a str for a categorical
    one (where only = and <> are allowed: string order depends on the engine's collation)."""

    column: str
    op: CompareOp
    value: Constant


@dataclass(frozen=True)
class InList:
    """``column IN (values...)`` (NOT IN is Not(InList))."""

    column: str
    values: tuple[Constant, ...]


@dataclass(frozen=True)
class Between:
    """``column BETWEEN low AND high`` (inclusive; numeric columns only)."""

    column: str
    low: float
    high: float


@dataclass(frozen=True)
class IsNull:
    """``column IS NULL`` (IS NOT NULL is Not(IsNull))."""

    column: str


@dataclass(frozen=True)
class And:
    parts: tuple[Predicate, ...]


@dataclass(frozen=True)
class Or:
    parts: tuple[Predicate, ...]


@dataclass(frozen=True)
class Not:
    part: Predicate


Predicate = Compare | InList | Between | IsNull | And | Or | Not


def predicate_columns(p: Predicate) -> Iterator[str]:
    """The columns a predicate reads (with repetitions, in textual order)."""
    if isinstance(p, And | Or):
        for part in p.parts:
            yield from predicate_columns(part)
    elif isinstance(p, Not):
        yield from predicate_columns(p.part)
    else:
        yield p.column


# --- aggregates and measures ----------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """One number per cell that a party computes locally.

    ``lower``/``upper``: the clamp bounds of a sum or centered sum, the bin's [lo, hi) of a
    bin (closed on the last bin), 0 for rows and values. ``per_row``: |change| of this
    measure in one cell when one row is added or removed (real units).
    """

    aggregate: int
    kind: MeasureKind
    column: str | None
    lower: float
    upper: float
    per_row: float


@dataclass(frozen=True)
class Aggregate:
    """One aggregate of the SELECT list.

    ``p``: the quantile level in (0, 1) (None unless ``kind`` is "quantile"). ``edges``: the
    quantile's bin edges (strictly increasing; empty otherwise). ``lower``/``upper``: the
    declared bounds of the column for sum and avg (0 otherwise): part of the plan so that
    parties with different declarations get different digests. ``weight``: the aggregate's
    share of epsilon (the weights of a query add up to 1).
    """

    kind: AggregateKind
    column: str | None
    p: float | None
    edges: tuple[float, ...]
    label: str
    weight: float
    lower: float = 0.0
    upper: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATE_KINDS:
            raise ParameterError("kind", self.kind, f"must be one of {list(AGGREGATE_KINDS)}")
        if self.column is None and self.kind != "count":
            raise ParameterError("column", None, f"{self.kind} needs a column")
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        if self.kind == "quantile":
            if self.p is None or not 0.0 < self.p < 1.0:
                raise ParameterError("p", self.p, "a quantile level must be in (0, 1)")
            e = self.edges
            if len(e) < 2 or not all(math.isfinite(x) for x in e):
                raise ParameterError("edges", list(e), "need >= 2 finite edges")
            if any(b <= a for a, b in itertools.pairwise(e)):
                raise ParameterError("edges", list(e), "must be strictly increasing")
        elif self.p is not None or self.edges:
            raise ParameterError("p", self.p, f"{self.kind} has no quantile level or edges")
        for name in ("weight", "lower", "upper"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ParameterError(name, v, "must be a finite number")
            object.__setattr__(self, name, float(v))
        if not self.weight > 0:
            raise ParameterError("weight", self.weight, "must be > 0")
        if self.lower > self.upper:
            raise ParameterError("lower", self.lower, f"must be <= upper={self.upper}")

    def measures(self, index: int) -> tuple[Measure, ...]:
        """This aggregate's measures (``index``: its position in the query)."""
        lo, hi = self.lower, self.upper
        if self.kind == "count":
            kind: MeasureKind = "rows" if self.column is None else "values"
            return (Measure(index, kind, self.column, 0.0, 0.0, 1.0),)
        if self.kind == "sum":
            return (Measure(index, "sum", self.column, lo, hi, max(abs(lo), abs(hi))),)
        if self.kind == "avg":
            return (
                Measure(index, "centered_sum", self.column, lo, hi, (hi - lo) / 2),
                Measure(index, "values", self.column, 0.0, 0.0, 1.0),
            )
        return tuple(
            Measure(index, "bin", self.column, a, b, 1.0) for a, b in itertools.pairwise(self.edges)
        )


@dataclass(frozen=True)
class SqlQuery:
    """A compiled query. ``keys[i]`` are the public keys of ``group_by[i]``."""

    table: str
    aggregates: tuple[Aggregate, ...]
    where: Predicate | None
    group_by: tuple[str, ...]
    keys: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.aggregates:
            raise ParameterError("aggregates", [], "a query needs at least one aggregate")
        if len(self.keys) != len(self.group_by):
            raise ParameterError(
                "keys", len(self.keys), f"need one key list per GROUP BY column {self.group_by}"
            )
        for col, ks in zip(self.group_by, self.keys, strict=True):
            if not ks or len(set(ks)) != len(ks):
                raise ParameterError("keys", col, "each key list must be non-empty and distinct")

    def cells(self) -> tuple[tuple[str, ...], ...]:
        """Every cell: the cartesian product of the key lists, row-major in group_by order
        (one empty tuple without GROUP BY)."""
        return tuple(itertools.product(*self.keys))

    @property
    def n_cells(self) -> int:
        return math.prod(len(k) for k in self.keys)

    def measures(self) -> tuple[Measure, ...]:
        """The local per-cell measures, in contribution order (aggregate by aggregate)."""
        return tuple(m for i, a in enumerate(self.aggregates) for m in a.measures(i))


# --- canonical encoding ------------------------------------------------------------------


def _constant(v: Constant) -> dict[str, str]:
    return {"str": v} if isinstance(v, str) else {"num": repr(float(v))}


def _predicate(p: Predicate) -> dict[str, object]:
    if isinstance(p, Compare):
        body: object = {"column": p.column, "op": p.op, "value": _constant(p.value)}
        return {"compare": body}
    if isinstance(p, InList):
        return {"in": {"column": p.column, "values": [_constant(v) for v in p.values]}}
    if isinstance(p, Between):
        return {"between": {"column": p.column, "low": repr(p.low), "high": repr(p.high)}}
    if isinstance(p, IsNull):
        return {"is_null": {"column": p.column}}
    if isinstance(p, And):
        return {"and": [_predicate(x) for x in p.parts]}
    if isinstance(p, Or):
        return {"or": [_predicate(x) for x in p.parts]}
    return {"not": _predicate(p.part)}


def _float(v: float | None) -> str | None:
    return None if v is None else repr(float(v))


def canonical(q: SqlQuery) -> bytes:
    """The canonical JSON encoding of ``q`` (module docstring)."""
    obj = {
        "table": q.table,
        "aggregates": [
            {
                "kind": a.kind,
                "column": a.column,
                "p": _float(a.p),
                "edges": [repr(e) for e in a.edges],
                "label": a.label,
                "weight": repr(a.weight),
                "lower": repr(a.lower),
                "upper": repr(a.upper),
            }
            for a in q.aggregates
        ],
        "where": None if q.where is None else _predicate(q.where),
        "group_by": list(q.group_by),
        "keys": [list(k) for k in q.keys],
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(q: SqlQuery) -> bytes:
    """SHA-256 over the versioned canonical encoding (module docstring)."""
    return hashlib.sha256(_PLAN_LABEL + canonical(q)).digest()
