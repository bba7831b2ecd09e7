"""Spark over Parquet data (a folder of part files, and the same data as a catalog table),
in a real local Spark session started once per test process (tests/servers.py). One test:
Spark's start and first jobs take seconds, so the checks share a session and a view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mpcdp.data import Source, open_source, validate
from mpcdp.errors import DataError
from mpcdp.sql.render import to_matrix
from tests.unit.data.table import (
    EXPECTED,
    HOSTILE,
    RENDERED,
    Q,
    by_dept,
    dataset,
    query,
    rendered,
    write_parquet,
)

pytestmark = [
    pytest.mark.slow,
    # pyspark's notice about the pandas it finds (it uses none here)
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]


def _checks(src: Source) -> None:
    assert src.dialect == "spark" and src.relation.startswith("`mpcdp_")
    assert src.execute(query(src.relation, dialect="spark")) == EXPECTED
    assert src.execute(by_dept(src.relation, dialect="spark", dept=HOSTILE)) == [(1,)]
    assert src.execute(by_dept(src.relation, dialect="spark", dept="eng' OR '1'='1")) == [(0,)]


def test_spark_source(spark_session: Any, tmp_path: Path) -> None:
    folder = tmp_path / "raises.parquet"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet")
    ds = dataset(folder, source="spark", spark_master="local[2]")
    src = open_source(ds)
    try:
        validate(src, dataset=ds)
        _checks(src)
        types = src.execute(Q(f"SELECT typeof(year), typeof(dept) FROM {src.relation}", ()))
        assert set(types) == {("double", "string")}
        # the salt of a query is a bytes parameter
        assert src.execute(Q("SELECT octet_length(?)", (bytes(range(16)),))) == [(16,)]
        # an analyst's query, compiled and rendered: the matrix every other engine gives
        q, eq = rendered(src.relation, dialect="spark")
        assert to_matrix(q, src.execute(eq)).tolist() == RENDERED
        with pytest.raises(DataError, match="dataset 'raises': the Spark query failed"):
            src.execute(Q(f"SELECT nope FROM {src.relation}", ()))
    finally:
        src.close()

    # the same data as a catalog table (an external one over the folder)
    spark_session.sql(f"CREATE TABLE raises_tbl USING parquet LOCATION '{folder}'")
    ds = dataset(tmp_path, source="spark", spark_master="local[2]", table="default.raises_tbl")
    src = open_source(ds)
    try:
        validate(src, dataset=ds)
        assert src.execute(query(src.relation, dialect="spark")) == EXPECTED
        missing = dataset(tmp_path, source="spark", spark_master="local[2]", privacy_unit="p")
        with pytest.raises(DataError, match=r"declared column\(s\) \['p'\] are not in its spark"):
            validate(src, dataset=missing)
    finally:
        src.close()

    other = open_source(dataset(folder, source="spark", spark_master="local[1]"))
    with pytest.raises(DataError, match="already runs a Spark session on 'local\\[2\\]'"):
        other.columns()
