"""The rendered DuckDB SQL, executed on small in-memory tables, against the pure-Python
reference of the same semantics (tests/unit/sql/reference.py): NULLs, out-of-bounds values,
keys outside the public list, privacy units over their row and group bounds, salts."""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from mpcdp.config.datasets import ColumnSpec
from mpcdp.sql.compile import compile_sql
from mpcdp.sql.plan import SqlQuery, TableDecl
from mpcdp.sql.render import render, to_matrix
from tests.unit.sql.reference import Row, reference

HOSTILE = "x'); DROP TABLE raises; --"
DEPTS = ("eng", "ops", HOSTILE)
COLUMNS = ("pid", "pid_c", "dept", "level", "raise", "year", "score")
SQL_TYPES = ("VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "DOUBLE", "DOUBLE", "DOUBLE")
UNITS = tuple(f"p{i}" for i in range(6))


def _table(*, unit: bool = True, rows: int = 2, groups: int = 1) -> TableDecl:
    return TableDecl(
        name="raises",
        columns=(
            ColumnSpec("pid_c", categories=UNITS),
            ColumnSpec("dept", categories=DEPTS),
            ColumnSpec("level", categories=("1", "2", "3")),
            ColumnSpec("raise", lower=0.0, upper=5000.0),
            ColumnSpec("year", lower=2000.0, upper=2030.0),
            ColumnSpec("score", lower=-10.0, upper=30.0, edges=(-10.0, 0.0, 5.0, 30.0)),
        ),
        privacy_unit="pid" if unit else None,
        max_rows_per_unit=rows,
        max_groups_per_unit=groups,
    )


def _connect(rows: Sequence[Row]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    cols = ", ".join(f'"{c}" {t}' for c, t in zip(COLUMNS, SQL_TYPES, strict=True))
    con.execute(f"CREATE TABLE raises ({cols})")
    if rows:
        marks = ", ".join("?" for _ in COLUMNS)
        con.executemany(
            f"INSERT INTO raises VALUES ({marks})", [[r[c] for c in COLUMNS] for r in rows]
        )
    return con


def _run(
    con: duckdb.DuckDBPyConnection, q: SqlQuery, table: TableDecl, salt: bytes
) -> NDArray[np.float64]:
    e = render(q, table=table, relation='"raises"', dialect="duckdb", salt=salt)
    return to_matrix(q, con.execute(e.text, list(e.params)).fetchall())


def _row(
    pid: str | None,
    dept: str | None,
    level: str | None,
    raise_: float | None,
    year: float | None,
    score: float | None,
) -> Row:
    return {
        "pid": pid,
        "pid_c": pid,
        "dept": dept,
        "level": level,
        "raise": raise_,
        "year": year,
        "score": score,
    }


FIXED: list[Row] = [
    _row("p0", "eng", "1", 100.0, 2025.0, 3.0),
    _row("p0", "eng", "1", 200.0, 2025.0, 4.0),
    _row("p0", "eng", "2", 300.0, 2025.0, 5.0),  # p0: three rows in eng, bound 2
    _row("p0", "ops", "2", 7000.0, 2025.0, 31.0),  # p0: a second group, bound 1
    _row("p1", "ops", "1", None, 2024.0, None),  # NULLs
    _row("p1", "ops", None, -50.0, None, -20.0),  # below the bounds; NULL year
    _row("p2", HOSTILE, "3", 9000.0, 2026.0, 30.0),  # the hostile key matches literally
    _row("p3", "hr", "1", 100.0, 2025.0, 1.0),  # not a public key: dropped
    _row(None, "eng", "1", 1.0, 2025.0, 1.0),  # no unit: dropped
    _row("p4", None, "1", 1.0, 2025.0, 1.0),  # NULL group value: dropped
]

QUERIES = [
    "SELECT dept, COUNT(*), AVG(raise), MEDIAN(score), SUM(raise) AS s, COUNT(level) AS n "
    "FROM raises GROUP BY dept",
    "SELECT COUNT(*), SUM(score), AVG(year), QUANTILE(raise, 0.9) FROM raises",
    "SELECT dept, level, COUNT(*), SUM(raise) FROM raises WHERE year >= 2025 OR year IS NULL "
    "GROUP BY level, dept",
    "SELECT COUNT(*) FROM raises WHERE NOT (raise BETWEEN 50 AND 250) AND level NOT IN ('3')",
    "SELECT dept, COUNT(raise) FROM raises WHERE dept = 'x''); DROP TABLE raises; --' "
    "GROUP BY dept",
    "SELECT dept, COUNT(*) FROM raises WHERE NOT (year < 2025) GROUP BY dept",
]


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("text", QUERIES)
def test_fixed_table_matches_the_reference(text: str, unit: bool) -> None:
    table = _table(unit=unit)
    q = compile_sql(text, tables={"raises": table}, bins=5)
    con = _connect(FIXED)
    for salt in (bytes(16), bytes(range(16)), b"\xff" * 32):
        got = _run(con, q, table, salt)
        np.testing.assert_allclose(got, reference(q, table, FIXED, salt), rtol=1e-12, atol=1e-9)
    assert con.execute("SELECT COUNT(*) FROM raises").fetchone() == (len(FIXED),)


def test_fixed_table_golden_values() -> None:
    """One query worked by hand: the bounds, clamps, NULLs and the dropped rows."""
    table = _table(rows=2, groups=2)
    q = compile_sql(
        "SELECT dept, COUNT(*), COUNT(raise) AS n, SUM(raise) AS s FROM raises GROUP BY dept",
        tables={"raises": table},
    )
    got = _run(_connect(FIXED), q, table, bytes(16))
    eng = got[0]  # p0 keeps 2 of its 3 eng rows: 2 rows, 2 values
    assert eng[0] == 2 and eng[1] == 2 and eng[2] in (300.0, 400.0, 500.0)
    # ops: p0's 7000 clamps to 5000; p1's NULL raise is a row without a value; -50 -> 0
    assert got[1].tolist() == [3.0, 2.0, 5000.0]
    assert got[2].tolist() == [1.0, 1.0, 5000.0]  # the hostile key: 9000 clamps to 5000


def test_unknown_keys_analyst_keys_and_the_hostile_key_match_literally() -> None:
    table = _table(unit=False)
    keys = {"dept": ["hr", HOSTILE, "eng%", "eng"]}
    q = compile_sql(
        "SELECT dept, COUNT(*) FROM raises GROUP BY dept", tables={"raises": table}, keys=keys
    )
    got = _run(_connect(FIXED), q, table, bytes(16))
    assert got[:, 0].tolist() == [1.0, 1.0, 0.0, 4.0]


def test_nan_clamps_to_the_upper_bound() -> None:
    rows = [_row("p0", "eng", "1", float("nan"), 2025.0, float("nan"))]
    table = _table()
    q = compile_sql(
        "SELECT SUM(raise), COUNT(raise) AS n, MEDIAN(score) FROM raises",
        tables={"raises": table},
        bins=4,
    )
    got = _run(_connect(rows), q, table, bytes(16))
    assert got[0].tolist() == [5000.0, 1.0, 0.0, 0.0, 1.0]


# --- contribution bounds, measured in the engine ---------------------------------------------


def _busy_rows() -> list[Row]:
    """Units with many rows in many groups (values distinct, so choices are visible)."""
    out: list[Row] = []
    k = 0
    for u, n in zip(UNITS, (1, 3, 7, 12, 20, 30), strict=True):
        for i in range(n):
            dept = DEPTS[i % 3]
            level = ("1", "2", "3")[(i // 3) % 3]
            out.append(_row(u, dept, level, float(10 * k + 1), 2025.0, float(k % 40 - 10)))
            k += 1
    return out


@pytest.mark.parametrize(("max_rows", "max_groups"), [(1, 1), (2, 1), (3, 2), (5, 9), (40, 9)])
def test_every_unit_keeps_at_most_its_bounds(max_rows: int, max_groups: int) -> None:
    table = _table(rows=max_rows, groups=max_groups)
    rows = _busy_rows()
    con = _connect(rows)
    # the cell (unit, dept, level) exposes what each unit kept: pid_c repeats the unit
    q = compile_sql(
        "SELECT pid_c, dept, level, COUNT(*) FROM raises GROUP BY pid_c, dept, level",
        tables={"raises": table},
    )
    for salt in (bytes(16), b"\x01" * 16):
        got = _run(con, q, table, salt).reshape(len(UNITS), 9)
        for u, counts in zip(UNITS, got, strict=True):
            have: dict[tuple[object, object], int] = {}
            for r in rows:
                if r["pid"] == u:
                    key = (r["dept"], r["level"])
                    have[key] = have.get(key, 0) + 1
            # exactly min(bound, available): never more, and nothing dropped needlessly
            assert np.count_nonzero(counts) == min(max_groups, len(have))
            assert counts.max() <= max_rows
            for i, c in enumerate(counts):  # a kept group keeps min(bound, its rows)
                cell = (DEPTS[i // 3], ("1", "2", "3")[i % 3])
                assert c == 0 or c == min(max_rows, have[cell])
        np.testing.assert_array_equal(got.reshape(-1, 1), reference(q, table, rows, salt))


def test_salts_choose_differently_and_deterministically() -> None:
    table = _table(rows=1, groups=1)
    rows = _busy_rows()
    con = _connect(rows)
    q = compile_sql(
        "SELECT dept, SUM(raise), COUNT(*) FROM raises GROUP BY dept", tables={"raises": table}
    )
    salts = [bytes([i]) * 16 for i in range(6)]
    results = [_run(con, q, table, s) for s in salts]
    for s, r in zip(salts, results, strict=True):
        np.testing.assert_array_equal(r, _run(con, q, table, s))  # same salt, same choice
        np.testing.assert_allclose(r, reference(q, table, rows, s), rtol=1e-12)
        assert r[:, 1].sum() == len(UNITS)  # one row from each unit, whatever the salt
    distinct = {r.tobytes() for r in results}
    assert len(distinct) == len(salts)  # every salt picked a different sample here


# --- property: random tables and queries, engine == reference -------------------------------

_VALUE = st.one_of(
    st.none(), st.integers(-40, 240).map(lambda i: i * 25.0)
)  # NULLs, in and out of [0, 5000]


@st.composite
def _rows(draw: st.DrawFn) -> list[Row]:
    n = draw(st.integers(0, 40))
    out: list[Row] = []
    for _ in range(n):
        pid = draw(st.one_of(st.none(), st.sampled_from(UNITS)))
        out.append(
            _row(
                pid,
                draw(st.one_of(st.none(), st.sampled_from((*DEPTS, "hr")))),
                draw(st.one_of(st.none(), st.sampled_from(("1", "2", "3", "4")))),
                draw(_VALUE),
                draw(st.one_of(st.none(), st.sampled_from((2023.0, 2024.0, 2025.0)))),
                draw(st.one_of(st.none(), st.integers(-60, 160).map(lambda i: i / 4))),
            )
        )
    return out


_PROPERTY_QUERIES = [
    *QUERIES,
    "SELECT level, COUNT(*), AVG(score), QUANTILE(score, 0.25) FROM raises "
    "WHERE dept IN ('eng', 'ops') AND score IS NOT NULL GROUP BY level",
    "SELECT COUNT(*), COUNT(year) AS y FROM raises WHERE raise > 100 AND raise <= 4000 "
    "OR NOT (level = '2')",
]


@settings(
    derandomize=True,
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rows=_rows(),
    text=st.sampled_from(_PROPERTY_QUERIES),
    unit=st.booleans(),
    max_rows=st.integers(1, 4),
    max_groups=st.integers(1, 3),
    salt=st.binary(min_size=16, max_size=16),
)
def test_random_tables_match_the_reference(
    rows: list[Row], text: str, unit: bool, max_rows: int, max_groups: int, salt: bytes
) -> None:
    table = _table(unit=unit, rows=max_rows, groups=max_groups)
    q = compile_sql(text, tables={"raises": table}, bins=3)
    got = _run(_connect(rows), q, table, salt)
    np.testing.assert_allclose(got, reference(q, table, rows, salt), rtol=1e-12, atol=1e-9)
