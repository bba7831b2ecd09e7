"""A pure-Python reference of the rendered query's semantics (mpcdp.sql.render), row by row.

Rows are dicts of column -> value (None for NULL). Categorical values are str, numeric ones
float or int, the privacy unit str or int. The keyed hash is the one the engine computes:
md5 over the salt's hex and the '<length>:<text>' encodings ('-' for NULL) of the unit, the
group values and the row content, with text as DuckDB casts it (a double as Python's repr
of the float, which DuckDB, and Spark, match for the values these tests use; PostgreSQL
prints an integral double without ".0", so its choices differ, equally bounded).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

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
)

Row = dict[str, object]


def _truth(p: Predicate, row: Row, categorical: set[str]) -> bool | None:
    """SQL three-valued logic: True, False or None (unknown)."""
    if isinstance(p, And):
        vals = [_truth(x, row, categorical) for x in p.parts]
        if False in vals:
            return False
        return None if None in vals else True
    if isinstance(p, Or):
        vals = [_truth(x, row, categorical) for x in p.parts]
        if True in vals:
            return True
        return None if None in vals else False
    if isinstance(p, Not):
        v = _truth(p.part, row, categorical)
        return None if v is None else not v
    raw = row[p.column]
    if isinstance(p, IsNull):
        return raw is None
    if raw is None:
        return None
    x: object = str(raw) if p.column in categorical else float(raw)  # type: ignore[arg-type]
    if isinstance(p, InList):
        return x in p.values
    if isinstance(p, Between):
        assert isinstance(x, float)
        return p.low <= x <= p.high
    assert isinstance(p, Compare)
    c = p.value
    if p.op == "=":
        return x == c
    if p.op == "<>":
        return x != c
    assert isinstance(x, float) and isinstance(c, float)
    return {"<": x < c, "<=": x <= c, ">": x > c, ">=": x >= c}[p.op]


FloatText = Callable[[float], str]


def postgres_float_text(v: float) -> str:
    """How PostgreSQL casts these tests' doubles to text (no ".0" on integral values)."""
    text = repr(v)
    return text[:-2] if text.endswith(".0") else text


def _enc(v: object, float_text: FloatText) -> str:
    if v is None:
        return "-"
    s = float_text(v) if isinstance(v, float) else str(v)
    return f"{len(s)}:{s}"


def _md5(salt: bytes, items: Sequence[object], float_text: FloatText) -> str:
    encoded = "".join(_enc(x, float_text) for x in items)
    return hashlib.md5((salt.hex() + encoded).encode()).hexdigest()


def _typed(v: object, categorical: bool) -> object:
    if v is None:
        return None
    return str(v) if categorical else float(v)  # type: ignore[arg-type]


def bounded_rows(
    q: SqlQuery, table: TableDecl, rows: Sequence[Row], salt: bytes, *, float_text: FloatText = repr
) -> list[tuple[tuple[str, ...], Row]]:
    """The rows the engine aggregates, each with its cell: filtered, then bounded per unit."""
    categorical = {c.name for c in table.columns if c.categorical}
    kept: list[tuple[tuple[str, ...], Row]] = []
    for row in rows:
        cell = tuple(row[g] for g in q.group_by)
        if any(v is None or str(v) not in ks for v, ks in zip(cell, q.keys, strict=True)):
            continue
        if table.privacy_unit is not None and row[table.privacy_unit] is None:
            continue
        if q.where is not None and _truth(q.where, row, categorical) is not True:
            continue
        kept.append((tuple(str(v) for v in cell), row))
    unit = table.privacy_unit
    if unit is None:
        return kept
    content_cols = list(dict.fromkeys(a.column for a in q.aggregates if a.column is not None))
    by_unit: dict[object, list[tuple[tuple[str, ...], Row]]] = defaultdict(list)
    for cell, row in kept:
        by_unit[row[unit]].append((cell, row))
    out: list[tuple[tuple[str, ...], Row]] = []
    for u, items in by_unit.items():
        groups = sorted(
            {cell for cell, _ in items}, key=lambda c: (_md5(salt, [u, *c], float_text), c)
        )
        allowed = set(groups[: table.max_groups_per_unit]) if q.group_by else set(groups)
        for cell in allowed:
            members = [row for c, row in items if c == cell]
            members.sort(
                key=lambda r: _md5(
                    salt,
                    [
                        u,
                        *cell,
                        *[_typed(r[c], c in categorical) for c in content_cols],
                    ],
                    float_text,
                )
            )
            out.extend((cell, r) for r in members[: table.max_rows_per_unit])
    return out


def reference(
    q: SqlQuery, table: TableDecl, rows: Sequence[Row], salt: bytes, *, float_text: FloatText = repr
) -> NDArray[np.float64]:
    """The (cells, measures) matrix that to_matrix(render(...)) must give; ``float_text`` is
    the engine's text form of a double (repr for DuckDB and Spark, postgres_float_text)."""
    cells = {c: i for i, c in enumerate(itertools.product(*q.keys))}
    measures = q.measures()
    out = np.zeros((len(cells), len(measures)), dtype=np.float64)
    for cell, row in bounded_rows(q, table, rows, salt, float_text=float_text):
        i = cells[cell]
        for j, m in enumerate(measures):
            raw = None if m.column is None else row[m.column]
            agg = q.aggregates[m.aggregate]
            if m.kind == "rows":
                out[i, j] += 1
            elif raw is None:
                continue
            elif m.kind == "values":
                out[i, j] += 1
            elif m.kind in ("sum", "centered_sum"):
                x = min(max(float(raw), m.lower), m.upper)  # type: ignore[arg-type]
                out[i, j] += x - (m.lower + m.upper) / 2 if m.kind == "centered_sum" else x
            else:
                x = min(max(float(raw), agg.edges[0]), agg.edges[-1])  # type: ignore[arg-type]
                last = m.upper == agg.edges[-1]
                if m.lower <= x and (x < m.upper or (last and x <= m.upper)):
                    out[i, j] += 1
    return out
