"""One small table, written in every format the data sources read, and its declaration.

Every engine test runs :data:`QUERY` over this table and expects :data:`EXPECTED`: the same
rows from DuckDB (CSV, Parquet, JSON lines), PostgreSQL and Spark.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mpcdp.config.datasets import ColumnSpec
from mpcdp.config.party_config import DatasetConfig, SourceKind
from mpcdp.sql.compile import compile_sql
from mpcdp.sql.render import EngineQuery, render
from mpcdp.sql.typed_plan import SqlQuery, TableDecl

#: a category that is also an injection attempt: it must arrive as a plain value
HOSTILE = "x' OR '1'='1"

#: (id, dept, year, raise): raise None is a NULL, 6000 is above the declared upper bound
ROWS: list[tuple[str, str, int, float | None]] = [
    ("p1", "eng", 2023, 100.0),
    ("p1", "eng", 2024, 250.5),
    ("p2", "ops", 2024, None),
    ("p3", "eng", 2025, 6000.0),
    ("p4", "hr", 2022, 300.0),
    ("p5", HOSTILE, 2024, 10.0),
]

COLUMNS = (
    ColumnSpec(name="dept", categories=("eng", "ops", "hr", HOSTILE)),
    ColumnSpec(name="year", lower=2000, upper=2100),
    ColumnSpec(name="raise", lower=0, upper=5000, edges=(0.0, 100.0, 5000.0)),
)


#: a hand-written parameterised query
Q = EngineQuery


def query(relation: str, *, dialect: SourceKind, year: int = 2024) -> Q:
    """Per department from ``year`` on: rows, non-NULL raises, the raises clamped to
    [0, 5000] and summed (the CASE keeps a NULL a NULL: GREATEST skips NULLs in all three
    engines, so GREATEST(NULL, 0.0) is 0.0)."""
    mark = "%s" if dialect == "postgres" else "?"
    return Q(
        text=(
            'SELECT "dept", COUNT(*), COUNT("raise"), '
            'SUM(CASE WHEN "raise" IS NOT NULL THEN LEAST(GREATEST("raise", 0.0), 5000.0) END) '
            f'FROM {relation} WHERE "year" >= {mark} GROUP BY "dept" ORDER BY "dept"'
        ).replace('"', "`" if dialect == "spark" else '"'),
        params=(year,),
    )


EXPECTED: list[tuple[object, ...]] = [
    ("eng", 2, 2, 5250.5),
    ("ops", 1, 0, None),
    (HOSTILE, 1, 1, 10.0),
]


def by_dept(relation: str, *, dialect: SourceKind, dept: str) -> Q:
    mark = "%s" if dialect == "postgres" else "?"
    q = "`" if dialect == "spark" else '"'
    return Q(text=f"SELECT COUNT(*) FROM {relation} WHERE {q}dept{q} = {mark}", params=(dept,))


def dataset(path: Path, **kw: Any) -> DatasetConfig:
    """The declaration of the table at ``path`` (DuckDB, privacy unit ``id``, unless ``kw``
    says otherwise: any DatasetConfig field)."""
    kw.setdefault("privacy_unit", "id")
    return DatasetConfig(name="raises", path=path, epsilon=1.0, delta=0.0, columns=COLUMNS, **kw)


def write_csv(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "dept", "year", "raise", "note"])
        for pid, dept, year, value in ROWS:
            w.writerow([pid, dept, year, "" if value is None else value, "a, b"])
    return path


def write_jsonl(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for pid, dept, year, value in ROWS:
            row = {"id": pid, "dept": dept, "year": year, "raise": value, "note": [1, 2]}
            fh.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: Path) -> Path:
    """Written by DuckDB from the CSV, with the file's own types (year INTEGER, raise
    DOUBLE)."""
    import duckdb

    src = write_csv(path.with_suffix(".src.csv"))
    con = duckdb.connect(":memory:")
    try:
        con.execute(
            "COPY (SELECT id, dept, CAST(year AS INTEGER) AS year, "
            "CAST(raise AS DOUBLE) AS raise FROM read_csv(?, all_varchar = true)) "
            "TO '" + str(path).replace("'", "''") + "' (FORMAT parquet)",
            [str(src)],
        )
    finally:
        con.close()
    src.unlink()
    return path


#: an analyst's query, compiled against the declaration above, rendered per dialect
SQL = "SELECT dept, COUNT(*), SUM(raise), AVG(raise) FROM raises WHERE year >= 2024 GROUP BY dept"


def rendered(relation: str, *, dialect: SourceKind) -> tuple[SqlQuery, EngineQuery]:
    """:data:`SQL` compiled and rendered as a party would (privacy unit ``id``, one row and
    one group per unit; a fixed salt: every unit keeps its one row whatever the salt)."""
    decl = TableDecl(name="raises", columns=COLUMNS, privacy_unit="id")
    q = compile_sql(SQL, tables={"raises": decl})
    return q, render(q, table=decl, relation=relation, dialect=dialect, salt=bytes(16))


#: the contribution matrix of :data:`SQL`: a row per cell (the declared categories, in
#: order), a column per measure (rows, the clamped sum, the sum centred on 2500 for AVG,
#: the non-NULL values); 6000 is clamped to 5000, the NULL raise counts as a row only
RENDERED = [
    [2.0, 5250.5, 250.5, 2.0],
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0],
    [1.0, 10.0, -2490.0, 1.0],
]
