"""Render a typed plan into one SQL query for the engine where a party's data lives.

:func:`render` writes the query for DuckDB, PostgreSQL or Spark SQL from the typed plan ONLY:
identifiers come from the party's declaration and are always quoted for the dialect, and
every constant (comparison values, keys, bounds, bin edges, the salt, the contribution
bounds) is a positional parameter, never text. The one piece of text not generated here is
``relation``, the party's own trusted SQL naming its data (from its config). The analyst's
text never reaches the engine: a string such as ``x'); DROP TABLE raises; --`` arrives as a
parameter and matches itself literally.

The query, stage by stage (the same plan in all three dialects):

1. ``_src``: the rows that pass the WHERE predicate (SQL three-valued logic on the raw
   values: a row is kept where it is TRUE) and whose group values are among the PUBLIC keys
   (the others are dropped before bounding, so they can neither use a unit's group slots
   nor appear as cells that are not released); rows without a privacy unit are dropped
   (they cannot be bounded). Categorical columns are read as text, numeric ones as double.
2. Contribution bounding, with a privacy unit only: each unit keeps at most
   ``max_groups_per_unit`` groups (DENSE_RANK) and at most ``max_rows_per_unit`` rows per
   (unit, group) (ROW_NUMBER). DP adjacency is add/remove of one UNIT (a person may have
   many rows), so the sensitivity is the per-row change times these bounds, and the bounds
   must hold for every unit whatever its rows. The choice is made per unit, from the unit's
   own rows only, so adding or removing one unit changes no other unit's choice. It is
   ordered by a keyed hash, md5(salt || unit || row content), with a fresh secret 16-byte
   salt per query from the party's CSPRNG: a public order (first rows, smallest values)
   could be correlated with the values and bias every answer the same way, and an unsalted
   hash would drop the same rows in every query. Ties (equal hashes) are between equal
   contents, so which one is kept changes nothing. Without a privacy unit each row is its
   own unit and no bounding is needed.
3. ``_vals``: numeric values clamped to the declared bounds (LEAST/GREATEST), to the edges'
   range [e_0, e_last] for a quantile. NULL stays NULL: the engines' LEAST/GREATEST skip
   NULL arguments, so the clamp is guarded by CASE. NaN orders above every number in all
   three engines, so it clamps to the upper bound.
4. One row per non-empty cell: the group keys, then one column per measure in
   :meth:`SqlQuery.measures` order. COUNT(*) counts rows, COUNT(col), SUM, AVG and quantiles
   ignore NULLs; an empty SUM is 0. Without GROUP BY the answer is exactly one row.

Parameter markers: ``?`` for DuckDB and Spark (``spark.sql(text, args=[...])``, Spark
3.5+), ``%s`` for PostgreSQL through psycopg (every other ``%`` is doubled, the relation's
included). PostgreSQL takes at most 65535 parameters per statement: larger queries are
refused here, naming the count.

:func:`to_matrix` turns the engine's rows into the (cells, measures) matrix that the party
contributes, missing cells 0. Its errors never echo a value from the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from numbers import Real
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import DataError, ParameterError
from mpcdp.sql.typed_plan import (
    And,
    Between,
    Compare,
    InList,
    IsNull,
    Not,
    Or,
    Predicate,
    SqlQuery,
    TableDecl,
    predicate_columns,
)

__all__ = [
    "DIALECTS",
    "MAX_POSTGRES_PARAMS",
    "MIN_SALT_BYTES",
    "Dialect",
    "EngineQuery",
    "render",
    "to_matrix",
]

Dialect = Literal["duckdb", "postgres", "spark"]
DIALECTS: tuple[Dialect, ...] = ("duckdb", "postgres", "spark")
MIN_SALT_BYTES = 16
MAX_POSTGRES_PARAMS = 65535


@dataclass(frozen=True)
class EngineQuery:
    """SQL in the engine's dialect with positional markers, and the values they stand for.

    ``params`` hold the query's secret salt (as hex) and the analyst's constants: never log
    them, nor put them in an error that leaves the party."""

    text: str
    params: tuple[object, ...]


# --- fragments: text and parameters kept in textual order ---------------------------------


@dataclass(frozen=True)
class _Param:
    value: object


@dataclass(frozen=True)
class _Frag:
    parts: tuple[str | _Param, ...]

    def __add__(self, other: _Frag | str) -> _Frag:
        return _Frag(self.parts + _frag(other).parts)

    def __radd__(self, other: str) -> _Frag:
        return _Frag((other, *self.parts))


def _frag(x: _Frag | str) -> _Frag:
    return x if isinstance(x, _Frag) else _Frag((x,))


def _join(sep: str, items: Iterable[_Frag | str]) -> _Frag:
    parts: list[str | _Param] = []
    for i, item in enumerate(items):
        if i:
            parts.append(sep)
        parts.extend(_frag(item).parts)
    return _Frag(tuple(parts))


class _Dialect:
    def __init__(self, name: Dialect) -> None:
        self.name = name
        self.text = {"duckdb": "VARCHAR", "postgres": "TEXT", "spark": "STRING"}[name]
        self.double = {"duckdb": "DOUBLE", "postgres": "DOUBLE PRECISION", "spark": "DOUBLE"}[name]

    def ident(self, name: str) -> str:
        if "\x00" in name:
            raise ParameterError("identifier", name, "may not contain NUL")
        if self.name == "spark":
            return "`" + name.replace("`", "``") + "`"
        return '"' + name.replace('"', '""') + '"'

    def param(self, value: object) -> _Frag:
        """A bare marker (its type comes from the other side of a comparison)."""
        return _Frag((_Param(value),))

    def typed(self, value: object) -> _Frag:
        """A marker cast to the value's SQL type (text, double or bigint)."""
        if isinstance(value, str):
            sql_type = self.text
        elif isinstance(value, float):
            sql_type = self.double
        else:
            sql_type = "BIGINT"
        return "CAST(" + self.param(value) + f" AS {sql_type})"

    def as_text(self, expr: _Frag | str) -> _Frag:
        return "CAST(" + _frag(expr) + f" AS {self.text})"

    def as_double(self, expr: _Frag | str) -> _Frag:
        return "CAST(" + _frag(expr) + f" AS {self.double})"

    def md5(self, items: Sequence[_Frag]) -> _Frag:
        h = "md5(" + _join(" || ", items) + ")"
        # hex digests compare byte-wise whatever the database's collation
        return h + ' COLLATE "C"' if self.name == "postgres" else h

    def encode(self, expr: _Frag | str) -> _Frag:
        """An injective text encoding of a value: '<length>:<text>', or '-' for NULL."""
        s = self.as_text(expr)
        length = self.as_text("LENGTH(" + s + ")")
        return (
            "COALESCE("
            + length
            + " || "
            + self.typed(":")
            + " || "
            + s
            + ", "
            + (self.typed("-") + ")")
        )

    def finish(self, frag: _Frag) -> EngineQuery:
        marker = "%s" if self.name == "postgres" else "?"
        text: list[str] = []
        params: list[object] = []
        for part in frag.parts:
            if isinstance(part, _Param):
                text.append(marker)
                params.append(part.value)
            else:
                text.append(part.replace("%", "%%") if self.name == "postgres" else part)
        if self.name == "postgres" and len(params) > MAX_POSTGRES_PARAMS:
            raise ParameterError(
                "params",
                len(params),
                f"PostgreSQL takes at most {MAX_POSTGRES_PARAMS} parameters per query: use "
                "fewer keys or bins",
            )
        return EngineQuery(text="".join(text), params=tuple(params))


# --- the query -----------------------------------------------------------------------------


def _predicate(d: _Dialect, p: Predicate, categorical: set[str]) -> _Frag:
    if isinstance(p, And | Or):
        sep = " AND " if isinstance(p, And) else " OR "
        return "(" + _join(sep, (_predicate(d, x, categorical) for x in p.parts)) + ")"
    if isinstance(p, Not):
        return "(NOT " + _predicate(d, p.part, categorical) + ")"
    name = d.ident(p.column)
    ref = d.as_text(name) if p.column in categorical else d.as_double(name)
    if isinstance(p, IsNull):
        return "(" + ref + " IS NULL)"
    if isinstance(p, Compare):
        return "(" + ref + f" {p.op} " + d.typed(p.value) + ")"
    if isinstance(p, Between):
        return "(" + ref + " BETWEEN " + d.typed(p.low) + " AND " + d.typed(p.high) + ")"
    assert isinstance(p, InList)
    return "(" + ref + " IN (" + _join(", ", (d.typed(v) for v in p.values)) + "))"


def _check(q: SqlQuery, table: TableDecl) -> set[str]:
    """The plan's columns exist in ``table`` with the plan's types; returns the categorical
    ones."""
    if q.table != table.name:
        raise ParameterError("table", table.name, f"the query reads table {q.table!r}")
    used = list(q.group_by) + [a.column for a in q.aggregates if a.column is not None]
    if q.where is not None:
        used += list(predicate_columns(q.where))
    categorical: set[str] = set()
    for name in used:
        spec = table.column(name)
        if spec is None:
            raise ParameterError("table", table.name, f"does not declare column {name!r}")
        if spec.categorical:
            categorical.add(name)
    for a in q.aggregates:
        if a.kind != "count" and a.column in categorical:
            raise ParameterError("table", table.name, f"column {a.column!r} is categorical")
    for g in q.group_by:
        if g not in categorical:
            raise ParameterError("table", table.name, f"GROUP BY column {g!r} is numeric")
    return categorical


def render(
    q: SqlQuery,
    *,
    table: TableDecl,
    relation: str,
    dialect: Dialect,
    salt: bytes,
) -> EngineQuery:
    """The engine query for ``q`` over ``relation`` (module docstring).

    ``table``: the party's declaration that ``q`` was compiled against (its privacy unit and
    contribution bounds apply here); ``relation``: trusted SQL naming the data, inserted
    verbatim after FROM (a quoted table name, a table function; a subquery must carry its
    own alias); ``salt``: at least 16 secret random bytes, fresh per query.
    """
    if dialect not in DIALECTS:
        raise ParameterError("dialect", dialect, f"must be one of {list(DIALECTS)}")
    if not isinstance(salt, bytes) or len(salt) < MIN_SALT_BYTES:
        raise ParameterError(
            "salt",
            f"{len(salt) if isinstance(salt, bytes) else type(salt).__name__}",
            f"must be at least {MIN_SALT_BYTES} random bytes",
        )
    if not isinstance(relation, str) or not relation.strip():
        raise ParameterError("relation", relation, "must name the data")
    categorical = _check(q, table)
    d = _Dialect(dialect)

    # 1. _src: typed columns under generated names, filtered
    groups = [f"g{i}" for i in range(len(q.group_by))]
    agg_cols = list(dict.fromkeys(a.column for a in q.aggregates if a.column is not None))
    values = {name: f"a{i}" for i, name in enumerate(agg_cols)}
    select: list[_Frag | str] = []
    for name, alias in zip(q.group_by, groups, strict=True):
        select.append(d.as_text(d.ident(name)) + f" AS {d.ident(alias)}")
    for name in agg_cols:
        ref = d.ident(name)
        typed = d.as_text(ref) if name in categorical else d.as_double(ref)
        select.append(typed + f" AS {d.ident(values[name])}")
    unit = table.privacy_unit
    if unit is not None:
        select.append(f"{d.ident(unit)} AS {d.ident('u')}")
    if not select:
        select.append(d.typed(1) + f" AS {d.ident('one')}")
    conditions: list[_Frag] = []
    for name, keys in zip(q.group_by, q.keys, strict=True):
        in_keys = _join(", ", (d.param(k) for k in keys))
        conditions.append("(" + d.as_text(d.ident(name)) + " IN (" + in_keys + "))")
    if unit is not None:
        conditions.append(_frag(f"({d.ident(unit)} IS NOT NULL)"))
    if q.where is not None:
        conditions.append(_predicate(d, q.where, categorical))
    src = "SELECT " + _join(", ", select) + f" FROM {relation}"
    if conditions:
        src = src + " WHERE " + _join(" AND ", conditions)
    ctes: list[_Frag] = [d.ident("_src") + " AS (" + src + ")"]
    source = d.ident("_src")

    # 2. contribution bounding per unit, ordered by a keyed hash
    if unit is not None:
        salt_hex = d.typed(salt.hex())
        g_ids = [d.ident(g) for g in groups]
        unit_key = d.encode(d.ident("u"))
        content = [d.encode(d.ident(values[name])) for name in agg_cols]
        row_hash = d.md5([salt_hex, unit_key, *[d.encode(g) for g in g_ids], *content])
        part_rows = _join(", ", [d.ident("u"), *g_ids])
        windows: list[_Frag | str] = ["*"]
        keep: list[_Frag] = []
        if groups:
            group_hash = d.md5(
                [d.typed(salt.hex()), d.encode(d.ident("u"))] + [d.encode(g) for g in g_ids]
            )
            order = _join(", ", [group_hash, *g_ids])
            windows.append(
                "DENSE_RANK() OVER (PARTITION BY "
                + d.ident("u")
                + " ORDER BY "
                + order
                + ")"
                + f" AS {d.ident('_gr')}"
            )
            keep.append(d.ident("_gr") + " <= " + d.typed(table.max_groups_per_unit))
        windows.append(
            "ROW_NUMBER() OVER (PARTITION BY "
            + part_rows
            + " ORDER BY "
            + row_hash
            + ")"
            + f" AS {d.ident('_rr')}"
        )
        keep.append(d.ident("_rr") + " <= " + d.typed(table.max_rows_per_unit))
        ctes.append(d.ident("_ranked") + " AS (SELECT " + _join(", ", windows) + f" FROM {source})")
        ctes.append(
            d.ident("_kept")
            + f" AS (SELECT * FROM {d.ident('_ranked')} WHERE "
            + _join(" AND ", keep)
            + ")"
        )
        source = d.ident("_kept")

    # 3. _vals: clamped values per aggregate
    vals: list[_Frag | str] = [d.ident(g) for g in groups]
    v_names: list[str] = []
    for j, a in enumerate(q.aggregates):
        v = f"v{j}"
        v_names.append(v)
        if a.column is None:
            continue
        ref = d.ident(values[a.column])
        if a.kind == "count":
            vals.append(f"{ref} AS {d.ident(v)}")
            continue
        lo, hi = (a.edges[0], a.edges[-1]) if a.kind == "quantile" else (a.lower, a.upper)
        clamp = "LEAST(GREATEST(" + ref + ", " + d.typed(lo) + "), " + d.typed(hi) + ")"
        vals.append(f"CASE WHEN {ref} IS NOT NULL THEN " + clamp + f" END AS {d.ident(v)}")
    if len(vals) == 0:
        vals.append("*")
    ctes.append(d.ident("_vals") + " AS (SELECT " + _join(", ", vals) + f" FROM {source})")

    # 4. one row per non-empty cell: keys, then the measures
    out: list[_Frag | str] = [d.ident(g) for g in groups]
    for m in q.measures():
        v = d.ident(v_names[m.aggregate])
        if m.kind == "rows":
            out.append("COUNT(*)")
        elif m.kind == "values":
            out.append(f"COUNT({v})")
        elif m.kind == "sum":
            out.append(f"COALESCE(SUM({v}), " + d.typed(0.0) + ")")
        elif m.kind == "centered_sum":
            mid = (m.lower + m.upper) / 2
            out.append(f"COALESCE(SUM({v} - " + d.typed(mid) + "), " + d.typed(0.0) + ")")
        else:
            last = m.upper == q.aggregates[m.aggregate].edges[-1]
            upper = " <= " if last else " < "
            cond = f"{v} >= " + d.typed(m.lower) + f" AND {v}{upper}" + d.typed(m.upper)
            out.append("COUNT(CASE WHEN " + cond + f" THEN {v} END)")
    final = "SELECT " + _join(", ", out) + f" FROM {d.ident('_vals')}"
    if groups:
        final = final + " GROUP BY " + ", ".join(d.ident(g) for g in groups)
    return d.finish("WITH " + _join(", ", ctes) + " " + final)


# --- the engine's rows as the party's matrix --------------------------------------------------


def _number(v: object, row: int) -> float:
    if isinstance(v, bool) or not isinstance(v, Real | Decimal):
        raise DataError(f"engine result row {row}: a measure is not a number")
    x = float(v)
    if not math.isfinite(x):
        raise DataError(f"engine result row {row}: a measure is not finite")
    return x


def to_matrix(q: SqlQuery, rows: Iterable[Sequence[object]]) -> NDArray[np.float64]:
    """The engine's rows as a float64 matrix of shape (len(cells), len(measures)), rows in
    :meth:`SqlQuery.cells` order, cells without a row 0. A row whose keys are not a cell, a
    cell given twice or a malformed row is refused (the rendered query cannot produce them);
    the message never echoes a value."""
    n_groups = len(q.group_by)
    n_measures = len(q.measures())
    index = [{k: i for i, k in enumerate(keys)} for keys in q.keys]
    strides = [1] * n_groups
    for i in range(n_groups - 2, -1, -1):
        strides[i] = strides[i + 1] * len(q.keys[i + 1])
    out = np.zeros((q.n_cells, n_measures), dtype=np.float64)
    seen = np.zeros(q.n_cells, dtype=bool)
    for r, row in enumerate(rows):
        if len(row) != n_groups + n_measures:
            raise DataError(
                f"engine result row {r} has {len(row)} columns, expected {n_groups + n_measures}"
            )
        cell = 0
        for i in range(n_groups):
            key = row[i]
            k = index[i].get(key) if isinstance(key, str) else None
            if k is None:
                raise DataError(
                    f"engine result row {r}: its {q.group_by[i]!r} is not one of the public keys"
                )
            cell += k * strides[i]
        if seen[cell]:
            raise DataError(f"engine result row {r} repeats a cell")
        seen[cell] = True
        out[cell] = [_number(v, r) for v in row[n_groups:]]
    return out
