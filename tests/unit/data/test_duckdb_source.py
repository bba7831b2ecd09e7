"""DuckDB over a party's own file: CSV, Parquet (a file or a folder) and JSON lines give the
same aggregates; parameters arrive literally; the declared columns are checked by schema;
the database reads the dataset's file and nothing else."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from mpcdp.data import EngineOptions, open_source, open_validated, validate
from mpcdp.data.table_source import quote_identifier
from mpcdp.errors import DataError, ParameterError
from tests.unit.data.table import (
    EXPECTED,
    HOSTILE,
    Q,
    by_dept,
    dataset,
    query,
    write_csv,
    write_jsonl,
    write_parquet,
)

WRITERS = {
    "raises.csv": write_csv,
    "raises.parquet": write_parquet,
    "raises.jsonl": write_jsonl,
    "raises.ndjson": write_jsonl,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_file_format_gives_the_same_aggregates(tmp_path: Path, name: str) -> None:
    ds = dataset(WRITERS[name](tmp_path / name))
    src = open_source(ds, options=EngineOptions(memory_limit="256MB", threads=1))
    try:
        assert src.dialect == "duckdb" and src.relation == '"raises"'
        validate(src, dataset=ds)
        assert src.execute(query(src.relation, dialect="duckdb")) == EXPECTED
        assert src.execute(query(src.relation, dialect="duckdb", year=2030)) == []
    finally:
        src.close()
    src.close()  # idempotent


def test_a_parquet_folder_is_read_whole(tmp_path: Path) -> None:
    folder = tmp_path / "raises.parquet"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet")
    src = open_source(dataset(folder))
    try:
        assert src.execute(query(src.relation, dialect="duckdb")) == EXPECTED
    finally:
        src.close()


def test_an_injection_attempt_through_a_parameter_arrives_literally(tmp_path: Path) -> None:
    src = open_source(dataset(write_csv(tmp_path / "raises.csv")))
    try:
        assert src.execute(by_dept(src.relation, dialect="duckdb", dept=HOSTILE)) == [(1,)]
        attempt = "eng' OR '1'='1"
        assert src.execute(by_dept(src.relation, dialect="duckdb", dept=attempt)) == [(0,)]
        assert src.execute(by_dept(src.relation, dialect="duckdb", dept="eng")) == [(3,)]
        # the salt of a query is a bytes parameter
        assert src.execute(Q("SELECT octet_length(?)", (bytes(range(16)),))) == [(16,)]
    finally:
        src.close()


def test_declared_columns_are_cast_and_a_non_number_fails_the_query(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "raises.csv")
    src = open_source(dataset(path))
    try:
        types = src.execute(Q("SELECT typeof(year), typeof(dept), typeof(id) FROM raises", ()))
        assert set(types) == {("DOUBLE", "VARCHAR", "VARCHAR")}
    finally:
        src.close()
    path.write_text(path.read_text().replace("250.5", "lots"))
    src = open_source(dataset(path))
    try:
        with pytest.raises(DataError, match="dataset 'raises': the DuckDB query failed"):
            src.execute(query(src.relation, dialect="duckdb"))
    finally:
        src.close()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_validation_names_the_missing_declared_columns(tmp_path: Path, name: str) -> None:
    ds = dataset(WRITERS[name](tmp_path / name), privacy_unit="patient")
    src = open_source(ds)
    try:
        with pytest.raises(DataError) as info:
            validate(src, dataset=ds)
    finally:
        src.close()
    msg = str(info.value)
    assert msg.startswith("dataset 'raises': declared column(s) ['patient'] are not in its duckdb")
    assert str(tmp_path) not in msg


def test_csv_cells_are_trimmed_as_the_csv_loader_trims_them(tmp_path: Path) -> None:
    path = tmp_path / "raises.csv"
    path.write_text("id,dept,year,raise\n p1 , eng ,2024, 7.5 \np2,eng, 2024,1\n")
    src = open_validated(dataset(path))
    try:
        rows = src.execute(Q("SELECT id, dept, year, raise FROM raises ORDER BY id", ()))
        assert rows == [("p1", "eng", 2024.0, 7.5), ("p2", "eng", 2024.0, 1.0)]
    finally:
        src.close()


def test_open_validated_refuses_a_missing_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"declared column\(s\) \['patient'\]"):
        open_validated(dataset(write_csv(tmp_path / "raises.csv"), privacy_unit="patient"))


def test_a_missing_file_is_a_data_error_without_its_path(tmp_path: Path) -> None:
    src = open_source(dataset(tmp_path / "gone.parquet"))
    with pytest.raises(DataError) as info:
        src.columns()
    assert str(info.value) == "dataset 'raises': its file does not exist"


def test_the_database_reads_only_the_dataset_file(tmp_path: Path) -> None:
    write_csv(tmp_path / "raises.csv")
    other = shutil.copy(tmp_path / "raises.csv", tmp_path / "other.csv")
    src = open_source(dataset(tmp_path / "raises.csv"))
    try:
        with pytest.raises(DataError, match="the DuckDB query failed"):
            src.execute(Q("SELECT COUNT(*) FROM read_csv(?)", (str(other),)))
        with pytest.raises(DataError, match="the DuckDB query failed"):
            src.execute(Q("SET enable_external_access = true", ()))
        assert src.execute(Q("SELECT COUNT(*) FROM raises", ())) == [(6,)]
    finally:
        src.close()


def test_a_path_with_a_quote_is_quoted(tmp_path: Path) -> None:
    folder = tmp_path / "o'brien"
    folder.mkdir()
    src = open_source(dataset(write_csv(folder / "raises.csv")))
    try:
        assert src.execute(query(src.relation, dialect="duckdb")) == EXPECTED
    finally:
        src.close()


def test_non_table_datasets_have_no_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset 'raises': a vector dataset has no SQL source"):
        open_source(dataset(tmp_path / "v.npy"))


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"memory_limit": "lots"}, "memory_limit"),
        ({"memory_limit": "1GB; DROP"}, "memory_limit"),
        ({"threads": 0}, "threads"),
        ({"shuffle_partitions": True}, "shuffle_partitions"),
        ({"statement_timeout_s": 0.0}, "statement_timeout_s"),
        ({"connect_timeout_s": float("nan")}, "connect_timeout_s"),
    ],
)
def test_engine_options_are_checked(kw: dict[str, object], name: str) -> None:
    with pytest.raises(ParameterError, match=f"invalid {name}="):
        EngineOptions(**kw)  # type: ignore[arg-type]


def test_identifiers_are_quoted_per_dialect() -> None:
    assert quote_identifier('a"b', dialect="duckdb") == '"a""b"'
    assert quote_identifier('a"b', dialect="postgres") == '"a""b"'
    assert quote_identifier("a`b", dialect="spark") == "`a``b`"
    with pytest.raises(ParameterError, match="identifier"):
        quote_identifier("a\0b", dialect="duckdb")


def _check(tmp_path: Path, text: str, **kw: Any) -> None:
    from mpcdp.data.duckdb_source import DuckDBSource

    path = tmp_path / "raises.csv"
    path.write_text("id,dept,year,raise\n" + text)
    src = open_source(dataset(path, **kw))
    assert isinstance(src, DuckDBSource)
    try:
        src.check_values()
    finally:
        src.close()


def test_check_values_accepts_what_the_csv_loader_accepted(tmp_path: Path) -> None:
    _check(tmp_path, " p1 , eng ,2024, 7.5 \np2,ops,2025,\np3,,2024,6000\n")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("p1,eng,2024,1\np2,sales,2024,1\n", "row 3 column 'dept': 'sales' is not one of"),
        ("p1,eng,2024,lots\n", "row 2 column 'raise': 'lots' is not a number"),
        ("p1,eng,2024,inf\n", "row 2 column 'raise': 'inf' is not finite"),
    ],
)
def test_check_values_refuses_what_the_csv_loader_refused(
    tmp_path: Path, text: str, why: str
) -> None:
    with pytest.raises(DataError, match=why):
        _check(tmp_path, text)


def test_check_values_logs_how_many_values_are_clipped_never_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mpcdp.data.duckdb_source"):
        _check(tmp_path, "p1,eng,2024,6000\np2,eng,2024,-7\np3,eng,2024,7\n")
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "clipped 2 value(s) of column 'raise'" in logged[0]
    # never the values (paths left out: pytest's numbered folders, e.g. pytest-712, hold "-7")
    values = [m.replace(str(tmp_path), "<folder>") for m in logged]
    assert not any("6000" in m or "-7" in m for m in values), values
