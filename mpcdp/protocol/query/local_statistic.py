"""A party's local statistic for a release plan, encoded into ring words.

Each party computes its own share of the aggregate from its own rows only, in the engine where
its table lives (mpcdp.data: DuckDB over files, PostgreSQL, Spark), never loading the table into
Python: a DP SQL query runs as compiled from its text (mpcdp.sql.render), and the
single-statistic queries (count, sum, mean, histogram) run as the equivalent SQL
(:func:`legacy_query`), with values clamped to the declared bounds in the engine; vector
datasets are clipped here to the declared L2 bound. Tensors are encoded with
round-to-nearest fixed point (the plan's sensitivities include the rounding) and concatenated
in plan order.

A table with more rows than the query's public ``max_rows`` is not refused (a refusal would
tell the coordinator the row count, and ~30 free proposals would find it exactly): every
local aggregate is clamped to the plan's per-party bound ``max_abs`` (bound * max_rows for a
sum, max_rows for a count or a histogram cell). Clamping is 1-Lipschitz, so one row still
moves each aggregate by at most its sensitivity; the owner is warned in its own log.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.config.datasets import Vector
from mpcdp.data.table_source import Source
from mpcdp.errors import ParameterError, PolicyError
from mpcdp.mpc import encoding, ring
from mpcdp.protocol.query.plan import ReleasePlan
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.query.sql_release import SqlRelease, contribution
from mpcdp.sql.compile import compile_sql
from mpcdp.sql.render import render, to_matrix
from mpcdp.sql.typed_plan import SqlQuery, TableDecl

__all__ = [
    "EngineTable",
    "add_local_words",
    "l2_clip_factor",
    "legacy_query",
    "require_row_level",
]

log = logging.getLogger(__name__)


@functools.cache
def _encoder() -> Any:
    """The compiled one-pass encoder of a vector (numba, imported on first use, cached on disk
    where numba finds a writable cache directory): ``words[i] += rint(x[i] * scale)``, the
    words a signed view of the ring's (int32 or int64: the sum wraps mod 2^bits as the
    ring's does). Five numpy passes with temporaries took 15 ms per 1e7 coordinates here,
    this one 4.4 ms, and a cold round encodes on the request path."""
    import numba

    def add_encoded(words: Any, x: Any, scale: float) -> None:
        for i in range(x.shape[0]):
            words[i] = words[i] + np.int64(np.rint(x[i] * scale))

    try:
        return numba.njit(nogil=True, cache=True)(add_encoded)
    except RuntimeError:  # numba: no locator for its cache (a read-only install)
        return numba.njit(nogil=True)(add_encoded)


def l2_clip_factor(x: NDArray[np.float64], bound: float) -> float:
    """The factor that scales x down to L2 norm <= bound (1 when already inside)."""
    norm = float(np.linalg.norm(x))
    return 1.0 if norm <= bound else bound / norm


@dataclass(frozen=True)
class EngineTable:
    """A table dataset as the party's engine reads it: the source and the declaration."""

    source: Source
    table: TableDecl


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def require_row_level(table: TableDecl) -> None:
    """Refuse a single-statistic query of a table that declares a privacy unit: those plans
    assume one row is one unit; such a table is asked in SQL, whose noise is sized for one
    unit's rows."""
    if table.privacy_unit is not None:
        raise PolicyError(
            f"dataset {table.name!r} declares a privacy unit ({table.privacy_unit!r}): ask it "
            "in SQL (mpcdp query sql), whose noise is sized for one unit's rows"
        )


def legacy_query(spec: QuerySpec, table: TableDecl) -> SqlQuery:
    """The SQL equivalent of a single-statistic query, compiled like any other (one row is
    one unit: :func:`require_row_level`)."""
    require_row_level(table)
    t, c = _quote(table.name), _quote(spec.column)
    text = {
        Statistic.COUNT: f"SELECT COUNT(*) FROM {t}",
        Statistic.SUM: f"SELECT SUM({c}) FROM {t}",
        Statistic.MEAN: f"SELECT AVG({c}) FROM {t}",
        Statistic.HISTOGRAM: f"SELECT {c}, COUNT(*) FROM {t} GROUP BY {c}",
    }[spec.statistic]
    return compile_sql(text, tables={table.name: table})


def _values(plan: ReleasePlan, data: EngineTable, salt: bytes) -> list[NDArray[np.float64]]:
    if isinstance(plan, SqlRelease):
        assert plan.query is not None and plan.table is not None
        query, table = plan.query, plan.table
    else:
        query, table = legacy_query(plan.spec, data.table), data.table
    src = data.source
    rows = src.execute(
        render(query, table=table, relation=src.relation, dialect=src.dialect, salt=salt)
    )
    cells = to_matrix(query, rows)
    if isinstance(plan, SqlRelease):
        return contribution(plan, query, cells)
    kinds = [m.kind for m in query.measures()]
    st = plan.spec.statistic
    if st is Statistic.MEAN:
        return [
            cells[:1, kinds.index("centered_sum")].copy(),
            cells[:1, kinds.index("values")].copy(),
        ]
    # count: one cell of rows; sum: one cell; histogram: one cell per declared category
    return [np.ascontiguousarray(cells[:, 0])]


def add_local_words(
    plan: ReleasePlan, data: EngineTable | Vector, out: ring.AnyRingVector, *, salt: bytes
) -> None:
    """out += the party's encoded local tensors (in place, slice by slice, mod 2^64).
    ``salt``: fresh secret bytes from the party's CSPRNG (the engine's row choice per unit)."""
    if out.size != plan.length:
        raise ParameterError("out", f"len={out.size}", f"expected {plan.length}")
    if isinstance(data, Vector):
        if plan.spec.statistic is not Statistic.SUM or plan.spec.column:
            raise ParameterError("statistic", plan.spec.statistic.value, "vectors support sum only")
        # clip and encode in one pass: x * (clip factor * 2^f), rounded to nearest (the
        # plan's headroom check keeps |x * scale| far below 2^62: the cast is exact)
        x = data.values
        scale = l2_clip_factor(x, plan.spec.l2_bound) * float(1 << plan.tensors[0].frac_bits)
        _encoder()(encoding.signed_view(out), x, scale)
        return
    offset = 0
    for v, t in zip(_values(plan, data, salt), plan.tensors, strict=True):
        clamped = np.clip(v, -t.max_abs, t.max_abs)
        if not np.array_equal(clamped, v):
            log.warning(
                "dataset %s has more rows than max_rows=%d of query %s: its local %s is "
                "clamped to the query's public bound",
                data.table.name,
                plan.spec.max_rows,
                plan.spec.query_id,
                t.name,
            )
        v = clamped
        seg = out[offset : offset + t.length]
        enc = encoding.encode_fixed(v, frac_bits=t.frac_bits, ring_bits=plan.spec.ring_bits)
        np.add(seg, enc, out=seg)
        offset += t.length
