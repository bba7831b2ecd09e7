"""The whole party side of a DP SQL query, without the network: the analyst's text compiled
against the declaration, rendered for the source's dialect over its relation, executed by
the source, turned into the contribution matrix: the same matrix from every file format
and from PostgreSQL (Spark: tests/unit/data/test_spark_source.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.data import open_validated
from mpcdp.sql.render import to_matrix
from tests.servers import PostgresServer
from tests.unit.data.table import (
    RENDERED,
    ROWS,
    dataset,
    rendered,
    write_csv,
    write_jsonl,
    write_parquet,
)

WRITERS = {"csv": write_csv, "parquet": write_parquet, "jsonl": write_jsonl}


def _matrix(ds_path: Path, **kw: Any) -> NDArray[np.float64]:
    src = open_validated(dataset(ds_path, **kw))
    try:
        q, eq = rendered(src.relation, dialect=src.dialect)
        return to_matrix(q, src.execute(eq))
    finally:
        src.close()


def test_every_source_contributes_the_same_matrix(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    matrices = {k: _matrix(w(tmp_path / f"raises.{k}")) for k, w in WRITERS.items()}
    s = postgres_server
    s.run("DROP TABLE IF EXISTS public.rendered")
    s.run("CREATE TABLE public.rendered (id text, dept text, year integer, raise real)")
    for row in ROWS:
        s.run("INSERT INTO public.rendered VALUES (%s, %s, %s, %s)", row)
    s.grant_select("public", "rendered")
    matrices["postgres"] = _matrix(
        tmp_path, source="postgres", url=s.url(), table="public.rendered"
    )
    for name, m in matrices.items():
        np.testing.assert_array_equal(m, np.array(RENDERED), err_msg=name)
