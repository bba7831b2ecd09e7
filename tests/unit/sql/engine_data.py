"""Tables, rows and queries shared by the execution tests of the rendered SQL (DuckDB,
PostgreSQL)."""

from __future__ import annotations

from mpcdp.config.datasets import ColumnSpec
from mpcdp.sql.typed_plan import TableDecl
from tests.unit.sql.reference import Row

HOSTILE = "x'); DROP TABLE raises; --"
DEPTS = ("eng", "ops", HOSTILE)
COLUMNS = ("pid", "pid_c", "dept", "level", "raise", "year", "score")
SQL_TYPES = ("VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "DOUBLE", "DOUBLE", "DOUBLE")
UNITS = tuple(f"p{i}" for i in range(6))


def table_decl(*, unit: bool = True, rows: int = 2, groups: int = 1) -> TableDecl:
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


def make_row(
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
    make_row("p0", "eng", "1", 100.0, 2025.0, 3.0),
    make_row("p0", "eng", "1", 200.0, 2025.0, 4.0),
    make_row("p0", "eng", "2", 300.0, 2025.0, 5.0),  # p0: three rows in eng, bound 2
    make_row("p0", "ops", "2", 7000.0, 2025.0, 31.0),  # p0: a second group, bound 1
    make_row("p1", "ops", "1", None, 2024.0, None),  # NULLs
    make_row("p1", "ops", None, -50.0, None, -20.0),  # below the bounds; NULL year
    make_row("p2", HOSTILE, "3", 9000.0, 2026.0, 30.0),  # the hostile key matches literally
    make_row("p3", "hr", "1", 100.0, 2025.0, 1.0),  # not a public key: dropped
    make_row(None, "eng", "1", 1.0, 2025.0, 1.0),  # no unit: dropped
    make_row("p4", None, "1", 1.0, 2025.0, 1.0),  # NULL group value: dropped
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


def busy_rows() -> list[Row]:
    """Units with many rows in many groups (values distinct, so choices are visible)."""
    out: list[Row] = []
    k = 0
    for u, n in zip(UNITS, (1, 3, 7, 12, 20, 30), strict=True):
        for i in range(n):
            dept = DEPTS[i % 3]
            level = ("1", "2", "3")[(i // 3) % 3]
            out.append(make_row(u, dept, level, float(10 * k + 1), 2025.0, float(k % 40 - 10)))
            k += 1
    return out


PROPERTY_QUERIES = [
    *QUERIES,
    "SELECT level, COUNT(*), AVG(score), QUANTILE(score, 0.25) FROM raises "
    "WHERE dept IN ('eng', 'ops') AND score IS NOT NULL GROUP BY level",
    "SELECT COUNT(*), COUNT(year) AS y FROM raises WHERE raise > 100 AND raise <= 4000 "
    "OR NOT (level = '2')",
]
