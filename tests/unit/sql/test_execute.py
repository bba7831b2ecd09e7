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

from mpcdp.sql.compile import compile_sql
from mpcdp.sql.render import render, to_matrix
from mpcdp.sql.typed_plan import SqlQuery, TableDecl
from tests.unit.sql.engine_data import (
    COLUMNS,
    DEPTS,
    FIXED,
    HOSTILE,
    PROPERTY_QUERIES,
    QUERIES,
    SQL_TYPES,
    UNITS,
    busy_rows,
    make_row,
    table_decl,
)
from tests.unit.sql.reference import Row, reference


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


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("text", QUERIES)
def test_fixed_table_matches_the_reference(text: str, unit: bool) -> None:
    table = table_decl(unit=unit)
    q = compile_sql(text, tables={"raises": table}, bins=5)
    con = _connect(FIXED)
    for salt in (bytes(16), bytes(range(16)), b"\xff" * 32):
        got = _run(con, q, table, salt)
        np.testing.assert_allclose(got, reference(q, table, FIXED, salt), rtol=1e-12, atol=1e-9)
    assert con.execute("SELECT COUNT(*) FROM raises").fetchone() == (len(FIXED),)


def test_fixed_table_golden_values() -> None:
    """One query worked by hand: the bounds, clamps, NULLs and the dropped rows."""
    table = table_decl(rows=2, groups=2)
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
    table = table_decl(unit=False)
    keys = {"dept": ["hr", HOSTILE, "eng%", "eng"]}
    q = compile_sql(
        "SELECT dept, COUNT(*) FROM raises GROUP BY dept", tables={"raises": table}, keys=keys
    )
    got = _run(_connect(FIXED), q, table, bytes(16))
    assert got[:, 0].tolist() == [1.0, 1.0, 0.0, 4.0]


def test_nan_clamps_to_the_upper_bound() -> None:
    rows = [make_row("p0", "eng", "1", float("nan"), 2025.0, float("nan"))]
    table = table_decl()
    q = compile_sql(
        "SELECT SUM(raise), COUNT(raise) AS n, MEDIAN(score) FROM raises",
        tables={"raises": table},
        bins=4,
    )
    got = _run(_connect(rows), q, table, bytes(16))
    assert got[0].tolist() == [5000.0, 1.0, 0.0, 0.0, 0.0, 1.0]


# --- contribution bounds, measured in the engine ---------------------------------------------


@pytest.mark.parametrize(("max_rows", "max_groups"), [(1, 1), (2, 1), (3, 2), (5, 9), (40, 9)])
def test_every_unit_keeps_at_most_its_bounds(max_rows: int, max_groups: int) -> None:
    table = table_decl(rows=max_rows, groups=max_groups)
    rows = busy_rows()
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
    table = table_decl(rows=1, groups=1)
    rows = busy_rows()
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
            make_row(
                pid,
                draw(st.one_of(st.none(), st.sampled_from((*DEPTS, "hr")))),
                draw(st.one_of(st.none(), st.sampled_from(("1", "2", "3", "4")))),
                draw(_VALUE),
                draw(st.one_of(st.none(), st.sampled_from((2023.0, 2024.0, 2025.0)))),
                draw(st.one_of(st.none(), st.integers(-60, 160).map(lambda i: i / 4))),
            )
        )
    return out


@settings(
    derandomize=True,
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rows=_rows(),
    text=st.sampled_from(PROPERTY_QUERIES),
    unit=st.booleans(),
    max_rows=st.integers(1, 4),
    max_groups=st.integers(1, 3),
    salt=st.binary(min_size=16, max_size=16),
)
def test_random_tables_match_the_reference(
    rows: list[Row], text: str, unit: bool, max_rows: int, max_groups: int, salt: bytes
) -> None:
    table = table_decl(unit=unit, rows=max_rows, groups=max_groups)
    q = compile_sql(text, tables={"raises": table}, bins=3)
    got = _run(_connect(rows), q, table, salt)
    np.testing.assert_allclose(got, reference(q, table, rows, salt), rtol=1e-12, atol=1e-9)


_HOSTILE_TEXT = st.text(alphabet="a'\"\\%?;-)(*/é\t ", min_size=1, max_size=12)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(
    keys=st.lists(_HOSTILE_TEXT, min_size=1, max_size=5, unique=True),
    values=st.lists(_HOSTILE_TEXT, min_size=0, max_size=12),
    where=_HOSTILE_TEXT,
)
def test_any_key_or_constant_text_matches_itself_literally(
    keys: list[str], values: list[str], where: str
) -> None:
    table = table_decl(unit=False)
    rows = [make_row("p0", v, "1", 1.0, 2025.0, 1.0) for v in [*values, *keys[:1]]]
    literal = "'" + where.replace("'", "''") + "'"
    q = compile_sql(
        f"SELECT dept, COUNT(*) FROM raises WHERE dept <> {literal} GROUP BY dept",
        tables={"raises": table},
        keys={"dept": keys},
    )
    con = _connect(rows)
    got = _run(con, q, table, bytes(16))
    want = [sum(1 for r in rows if r["dept"] == k and k != where) for k in keys]
    assert got[:, 0].tolist() == want
    assert con.execute("SELECT COUNT(*) FROM raises").fetchone() == (len(rows),)
