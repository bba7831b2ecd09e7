"""party.toml declarations of SQL table datasets (mpcdp.data): where the data is (path for
DuckDB, url + table for PostgreSQL, spark_master + path or table for Spark), the privacy
unit and its contribution bounds, quantile bin edges, and federation.toml's
max_parties_per_unit. Every error names the file, the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpcdp.config.party_config import (
    DatasetConfig,
    load_federation_config,
    load_party_config,
    redact_url,
)
from mpcdp.errors import ConfigError

HEAD = """
id = "alice"
listen = "127.0.0.1:0"
ledger = "l.sqlite"
[tls]
ca = "ca.pem"
cert = "alice.pem"
key = "alice.key"
coordinators = ["analyst"]
"""

COLUMNS = """
[datasets.raises.columns.raise]
lower = 0
upper = 5000
[datasets.raises.columns.dept]
categories = ["eng", "ops"]
"""


def _party(tmp_path: Path, body: str, columns: str = COLUMNS) -> Path:
    p = tmp_path / "party.toml"
    p.write_text(HEAD + "[datasets.raises]\nepsilon = 1.0\n" + body + columns)
    return p


def _load(tmp_path: Path, body: str, columns: str = COLUMNS) -> DatasetConfig:
    return load_party_config(_party(tmp_path, body, columns)).datasets["raises"]


def _error(tmp_path: Path, body: str, columns: str = COLUMNS) -> str:
    path = _party(tmp_path, body, columns)
    with pytest.raises(ConfigError) as info:
        load_party_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: datasets.raises."), msg
    return msg


# ---- where the data is ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["raises.csv", "raises.parquet", "raises.jsonl", "r.ndjson"])
def test_a_table_file_is_read_by_duckdb(tmp_path: Path, name: str) -> None:
    ds = _load(tmp_path, f'path = "{name}"\n')
    assert ds.source == "duckdb" and ds.kind == "table" and ds.path == tmp_path / name
    assert (ds.url, ds.table, ds.spark_master, ds.privacy_unit) == (None, None, None, None)
    assert (ds.max_rows_per_unit, ds.max_groups_per_unit, ds.max_parties_per_unit) == (1, 1, 1)


def test_a_table_file_needs_columns(tmp_path: Path) -> None:
    msg = _error(tmp_path, 'path = "r.parquet"\n', columns="")
    assert "columns: a .parquet dataset needs at least one declared column" in msg


def test_a_glob_character_in_a_duckdb_path_is_refused(tmp_path: Path) -> None:
    msg = _error(tmp_path, 'path = "r*.parquet"\n')
    assert "path: " in msg and "r*.parquet" in msg and "glob character" in msg


def test_a_postgres_table(tmp_path: Path) -> None:
    ds = _load(tmp_path, 'url = "postgresql://reader@db:5432/hr"\ntable = "public.Raises"\n')
    assert ds.source == "postgres" and ds.kind == "table"
    assert ds.url == "postgresql://reader@db:5432/hr" and ds.table == "public.Raises"
    assert ds.path == tmp_path
    assert "postgresql" not in repr(ds)  # the url may hold a password: never in a repr


def test_a_spark_parquet_path_or_catalog_table(tmp_path: Path) -> None:
    ds = _load(tmp_path, 'spark_master = "local[2]"\npath = "events"\n')
    assert (ds.source, ds.spark_master, ds.path, ds.table) == (
        "spark",
        "local[2]",
        tmp_path / "events",
        None,
    )
    for table in ("events", "db.events", "cat.db.events"):
        ds = _load(tmp_path, f'spark_master = "spark://h:7077"\ntable = "{table}"\n')
        assert (ds.source, ds.table, ds.path) == ("spark", table, tmp_path)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            'path = "r.csv"\nurl = "postgresql://db/hr"\ntable = "public.r"\n',
            "url: give one of path (a file for DuckDB), url (PostgreSQL) or spark_master "
            "(Spark), not path and url",
        ),
        (
            'url = "postgresql://db/hr"\nspark_master = "local"\ntable = "public.r"\n',
            "spark_master: give one of",
        ),
        ('url = "postgresql://db/hr"\n', "table: is required"),
        ('table = "public.r"\n', "table: needs url (PostgreSQL) or spark_master (Spark)"),
        ('url = "mysql://db/hr"\ntable = "public.r"\n', "url: 'mysql://db/hr' is not a PostgreSQL"),
        ('url = "postgresql://db /hr"\ntable = "public.r"\n', "is not a PostgreSQL URL"),
        ('url = "postgresql://db:99999/hr"\ntable = "public.r"\n', "does not parse"),
        ('url = 5\ntable = "public.r"\n', "url: has the wrong type (int: 5)"),
        ('url = "postgresql://db/hr"\ntable = "raises"\n', "table: 'raises' is not schema.name"),
        ('url = "postgresql://db/hr"\ntable = "a.b.c"\n', "table: 'a.b.c' is not schema.name"),
        ('url = "postgresql://db/hr"\ntable = "public.r; --"\n', "'public.r; --' is not"),
        ('url = "postgresql://db/hr"\ntable = \'public."r"\'\n', "is not schema.name"),
        ('url = "postgresql://db/hr"\ntable = "public.1r"\n', "is not schema.name"),
        ('url = "postgresql://db/hr"\ntable = "public.r"\nl2_bound = 1.0\n', "l2_bound: applies"),
        ('spark_master = "local[2]"\n', "spark_master: needs exactly one of path"),
        ('spark_master = "local"\npath = "p"\ntable = "t"\n', "needs exactly one of path"),
        ('spark_master = "local[0]"\npath = "p"\n', "spark_master: 'local[0]' is not a Spark"),
        ('spark_master = "mesos"\npath = "p"\n', "spark_master: 'mesos' is not a Spark master"),
        ('spark_master = "local"\npath = "r.csv"\n', "path: Spark reads Parquet here"),
        ('spark_master = "local"\ntable = "a.b.c.d"\n', "table: 'a.b.c.d' is not name, db.name"),
    ],
)
def test_source_errors(tmp_path: Path, body: str, expected: str) -> None:
    assert expected in _error(tmp_path, body)


def test_a_url_password_never_shows_in_an_error(tmp_path: Path) -> None:
    msg = _error(tmp_path, 'url = "mysql://u:s3cret@db/hr"\ntable = "public.r"\n')
    assert "s3cret" not in msg and "'mysql://u:***@db/hr'" in msg
    msg = _error(tmp_path, 'url = "postgresql://db/hr?password=s3cret&x= y"\ntable = "p.r"\n')
    assert "s3cret" not in msg and "password=%2A%2A%2A" in msg


def test_redact_url() -> None:
    assert redact_url("postgresql://u:p@h:5/d?sslmode=require") == (
        "postgresql://u:***@h:5/d?sslmode=require"
    )
    assert redact_url("postgresql://u@h/d") == "postgresql://u@h/d"
    assert "pw" not in redact_url("postgresql:///d?host=/tmp&password=pw")
    assert redact_url("postgresql://[db/d") == "<a url that does not parse>"


# ---- the privacy unit and its bounds ----------------------------------------------------


def test_privacy_unit_and_bounds(tmp_path: Path) -> None:
    ds = _load(
        tmp_path,
        'path = "r.csv"\nprivacy_unit = "patient id"\nmax_rows_per_unit = 3\n'
        "max_groups_per_unit = 2\nmax_parties_per_unit = 4\n",
    )
    assert ds.privacy_unit == "patient id"
    assert (ds.max_rows_per_unit, ds.max_groups_per_unit, ds.max_parties_per_unit) == (3, 2, 4)
    pg = _load(
        tmp_path,
        'url = "postgresql://db/hr"\ntable = "s.t"\nprivacy_unit = "dept"\nmax_rows_per_unit = 2\n',
    )
    assert (pg.privacy_unit, pg.max_rows_per_unit) == ("dept", 2)
    # without a unit, one row is one person; parties may still share a person
    assert _load(tmp_path, 'path = "r.csv"\nmax_parties_per_unit = 2\n').max_parties_per_unit == 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('privacy_unit = ""', "privacy_unit: '' is not a usable column name"),
        ("privacy_unit = 'a\"b'", "privacy_unit: 'a\"b' is not a usable column name"),
        ('privacy_unit = "a`b"', "is not a usable column name"),
        ('privacy_unit = "a\\nb"', "is not a usable column name"),
        ('privacy_unit = "' + "x" * 129 + '"', "is not a usable column name"),
        ("privacy_unit = 3", "privacy_unit: has the wrong type (int: 3)"),
        ('privacy_unit = "id"\nmax_rows_per_unit = 0', "max_rows_per_unit: must be an integer"),
        ('privacy_unit = "id"\nmax_rows_per_unit = 2147483648', "in [1, 2147483647], got"),
        ('privacy_unit = "id"\nmax_rows_per_unit = 1.5', "max_rows_per_unit: has the wrong type"),
        ('privacy_unit = "id"\nmax_groups_per_unit = -1', "max_groups_per_unit: must be an"),
        ('privacy_unit = "id"\nmax_groups_per_unit = true', "max_groups_per_unit: must be int"),
        ('privacy_unit = "id"\nmax_parties_per_unit = 0', "max_parties_per_unit: must be an"),
        ('max_parties_per_unit = "2"', "max_parties_per_unit: has the wrong type"),
        ("max_rows_per_unit = 3", "max_rows_per_unit: is 3 but needs privacy_unit"),
        ("max_groups_per_unit = 2", "max_groups_per_unit: is 2 but needs privacy_unit"),
    ],
)
def test_unit_errors(tmp_path: Path, body: str, expected: str) -> None:
    assert expected in _error(tmp_path, 'path = "r.csv"\n' + body + "\n")


@pytest.mark.parametrize("key", ["privacy_unit", "max_parties_per_unit", "url", "table"])
def test_table_keys_on_a_vector_or_a_training_dataset_are_refused(tmp_path: Path, key: str) -> None:
    value = '"x"' if key != "max_parties_per_unit" else "2"
    if key in ("url", "table"):  # a source key makes the dataset a table: test training
        msg = _error(tmp_path, f'data = "m:f"\ndelta = 1e-5\n{key} = {value}\n', columns="")
        assert f"{key}: applies to table datasets, not to a training dataset" in msg
        return
    msg = _error(tmp_path, f'path = "v.npy"\nl2_bound = 1.0\n{key} = {value}\n', columns="")
    assert f"{key}: applies to table datasets, not to 'v.npy' (not a table)" in msg


# ---- quantile bin edges -----------------------------------------------------------------


def _edges(edges: str) -> str:
    return f"[datasets.raises.columns.raise]\nlower = 0\nupper = 100\nedges = {edges}\n"


def test_edges(tmp_path: Path) -> None:
    ds = _load(tmp_path, 'path = "r.csv"\n', _edges("[0, 10, 50.5, 100]"))
    assert ds.column("raise").edges == (0.0, 10.0, 50.5, 100.0)
    assert _load(tmp_path, 'path = "r.csv"\n').column("raise").edges == ()
    many = "[" + ", ".join(str(i / 100) for i in range(10_000)) + "]"
    assert len(_load(tmp_path, 'path = "r.csv"\n', _edges(many)).column("raise").edges) == 10_000


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ("[5]", "edges: must hold 2 to 10000 numbers, got 1"),
        ("[]", "edges: must hold 2 to 10000 numbers, got 0"),
        ("[" + ", ".join(["1"] * 10_001) + "]", "got 10001"),
        ("[0, 5, 5]", "edges: must be strictly increasing: edges[2]=5 after 5.0"),
        ("[0, 50, 10]", "edges[2]=10 after 50.0"),
        ("[-1, 5]", "edges: edges[0]=-1 is outside [lower, upper]=[0.0, 100.0]"),
        ("[0, 100.5]", "edges[1]=100.5 is outside"),
        ("[0, nan]", "edges: edges[1]=nan is not a finite number"),
        ("[0, inf]", "edges[1]=inf is not a finite number"),
        ('[0, "5"]', "edges[1]='5' is not a finite number"),
        ("[0, true]", "edges[1]=True is not a finite number"),
        ("5", "edges: has the wrong type (int: 5)"),
    ],
)
def test_edge_errors(tmp_path: Path, edges: str, expected: str) -> None:
    msg = _error(tmp_path, 'path = "r.csv"\n', _edges(edges))
    assert "datasets.raises.columns.raise.edges: " in msg and expected in msg


def test_edges_on_a_categorical_column_are_refused(tmp_path: Path) -> None:
    cols = '[datasets.raises.columns.dept]\ncategories = ["a"]\nedges = [0, 1]\n'
    msg = _error(tmp_path, 'path = "r.csv"\n', cols)
    assert "columns.dept.edges: applies to numeric columns (lower, upper), not categories" in msg


# ---- federation.toml --------------------------------------------------------------------

FEDERATION = """
coordinator = "analyst"
[tls]
ca = "ca.pem"
cert = "analyst.pem"
key = "analyst.key"
[[parties]]
id = "alice"
address = "127.0.0.1:50051"
[[parties]]
id = "bob"
address = "127.0.0.1:50052"
"""


def test_federation_max_parties_per_unit(tmp_path: Path) -> None:
    p = tmp_path / "federation.toml"
    p.write_text(FEDERATION)
    assert load_federation_config(p).max_parties_per_unit == 1
    p.write_text("max_parties_per_unit = 2\n" + FEDERATION)
    assert load_federation_config(p).max_parties_per_unit == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "must be an integer in [1, 2], got 0"),
        ("3", "must be an integer in [1, 2], got 3"),
        ("true", "must be int, got True"),
        ("1.0", "has the wrong type (float: 1.0)"),
    ],
)
def test_federation_max_parties_per_unit_errors(tmp_path: Path, value: str, expected: str) -> None:
    p = tmp_path / "federation.toml"
    p.write_text(f"max_parties_per_unit = {value}\n" + FEDERATION)
    with pytest.raises(ConfigError) as info:
        load_federation_config(p)
    assert str(info.value) == f"{p}: max_parties_per_unit: {expected}"


# ---- [engines] --------------------------------------------------------------------------


def test_engines(tmp_path: Path) -> None:
    from mpcdp.config.party_config import EngineOptions

    p = _party(tmp_path, 'path = "r.csv"\n')
    assert load_party_config(p).engines == EngineOptions()
    p.write_text(
        p.read_text()
        + '[engines]\nmemory_limit = "512MB"\nthreads = 1\nstatement_timeout_s = 2.5\n'
        + "connect_timeout_s = 3\nshuffle_partitions = 8\n"
    )
    assert load_party_config(p).engines == EngineOptions(
        memory_limit="512MB",
        threads=1,
        statement_timeout_s=2.5,
        connect_timeout_s=3,
        shuffle_partitions=8,
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('memory_limit = "lots"', "memory_limit: 'lots' must be like '512MB' or '4GB'"),
        ('memory_limit = "1GB; SET x = 1"', "memory_limit: '1GB; SET x = 1' must be like"),
        ("memory_limit = 1", "memory_limit: has the wrong type (int: 1)"),
        ("threads = 0", "threads: 0 must be an integer in [1, 1024]"),
        ("threads = 2.0", "threads: has the wrong type (float: 2.0)"),
        ("shuffle_partitions = true", "shuffle_partitions: must be int, got True"),
        ("statement_timeout_s = 0", "statement_timeout_s: 0 must be in (0, 604800] seconds"),
        ("statement_timeout_s = nan", "statement_timeout_s: nan must be in (0, 604800]"),
        ("connect_timeout_s = -1", "connect_timeout_s: -1 must be in"),
        ("colour = 1", "colour: unknown key"),
    ],
)
def test_engines_errors(tmp_path: Path, line: str, expected: str) -> None:
    p = _party(tmp_path, 'path = "r.csv"\n')
    p.write_text(p.read_text() + f"[engines]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_party_config(p)
    assert str(info.value).startswith(f"{p}: engines.{expected}"), str(info.value)
