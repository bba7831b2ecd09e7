"""PostgreSQL through psycopg, against a real server started by the tests (tests/servers.py):
the same aggregates as every other engine, parameters bound by the server, every query in a
read-only transaction with a statement timeout, the declared columns checked by schema."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpcdp.config.party_config import load_party_config
from mpcdp.data import EngineOptions, Source, open_source, validate
from mpcdp.errors import DataError
from tests.servers import PostgresServer
from tests.unit.data.table import EXPECTED, HOSTILE, ROWS, Q, by_dept, dataset, query

#: mixed case: the relation must be quoted to find it
TABLE = "hr.Raises"


@pytest.fixture(scope="module")
def pg(postgres_server: PostgresServer) -> PostgresServer:
    s = postgres_server
    s.run("DROP SCHEMA IF EXISTS hr CASCADE")
    s.run(
        'CREATE SCHEMA hr; CREATE TABLE hr."Raises" '
        "(id text, dept text, year integer, raise double precision, bonus numeric(10, 2))"
    )
    for row in ROWS:
        s.run('INSERT INTO hr."Raises" VALUES (%s, %s, %s, %s, 1.25)', row)
    s.grant_select("hr", "Raises")
    return s


@pytest.fixture
def source(pg: PostgresServer, tmp_path: Path) -> Iterator[Source]:
    src = open_source(dataset(tmp_path, source="postgres", url=pg.url(), table=TABLE))
    yield src
    src.close()


def _count(pg: PostgresServer) -> int:
    return int(pg.run('SELECT COUNT(*) FROM hr."Raises"')[0][0])


def test_the_same_aggregates_as_every_engine(source: Source) -> None:
    assert source.dialect == "postgres" and source.relation == '"hr"."Raises"'
    assert source.execute(query(source.relation, dialect="postgres")) == EXPECTED
    assert source.execute(query(source.relation, dialect="postgres", year=2030)) == []


def test_an_injection_attempt_through_a_parameter_arrives_literally(source: Source) -> None:
    rel = source.relation
    assert source.execute(by_dept(rel, dialect="postgres", dept=HOSTILE)) == [(1,)]
    assert source.execute(by_dept(rel, dialect="postgres", dept="eng' OR '1'='1")) == [(0,)]
    assert source.execute(by_dept(rel, dialect="postgres", dept="eng")) == [(3,)]
    # the salt of a query is a bytes parameter
    assert source.execute(Q("SELECT octet_length(%s)", (bytes(range(16)),))) == [(16,)]


def test_a_write_fails_even_for_a_role_that_may_write(pg: PostgresServer, tmp_path: Path) -> None:
    owner = open_source(
        dataset(tmp_path, source="postgres", url=pg.url(user=pg.owner), table=TABLE)
    )
    before = _count(pg)
    try:
        insert = Q('INSERT INTO hr."Raises" (id) VALUES (%s)', ("intruder",))
        with pytest.raises(DataError, match="read-only transaction"):
            owner.execute(insert)
        # ending the read-only transaction inside the text: one statement per query only
        with pytest.raises(DataError, match="the PostgreSQL query failed"):
            owner.execute(Q('COMMIT; INSERT INTO hr."Raises" (id) VALUES (%s)', ("x",)))
        with pytest.raises(DataError, match="the PostgreSQL query failed"):
            owner.execute(Q('COMMIT; DROP TABLE hr."Raises"', ()))
        # a setting changed by one query is rolled back with it
        owner.execute(Q("SELECT set_config('default_transaction_read_only', 'off', false)", ()))
        with pytest.raises(DataError, match="read-only transaction"):
            owner.execute(insert)
        assert owner.execute(Q('SELECT COUNT(*) FROM hr."Raises"', ())) == [(before,)]
    finally:
        owner.close()
    assert _count(pg) == before


def test_the_reader_role_may_not_write_either(pg: PostgresServer) -> None:
    import psycopg

    with psycopg.connect(pg.url(), autocommit=True) as conn, pytest.raises(psycopg.Error):
        conn.execute(b'DELETE FROM hr."Raises"')
    assert _count(pg) == len(ROWS)


def test_a_slow_query_is_cancelled_by_the_statement_timeout(
    pg: PostgresServer, tmp_path: Path
) -> None:
    src = open_source(
        dataset(tmp_path, source="postgres", url=pg.url(), table=TABLE),
        options=EngineOptions(statement_timeout_s=0.2),
    )
    try:
        with pytest.raises(DataError, match="statement timeout"):
            src.execute(Q("SELECT pg_sleep(%s)", (30,)))
        assert src.execute(Q("SELECT 1", ())) == [(1,)]  # the connection is still usable
    finally:
        src.close()


def test_numeric_comes_back_as_float_and_close_reconnects(source: Source) -> None:
    rows = source.execute(Q(f"SELECT SUM(bonus) FROM {source.relation}", ()))
    assert rows == [(7.5,)] and isinstance(rows[0][0], float)
    source.close()
    assert source.execute(Q("SELECT %s::text", ("again",))) == [("again",)]


def test_validation(pg: PostgresServer, tmp_path: Path) -> None:
    ds = dataset(tmp_path, source="postgres", url=pg.url(), table=TABLE)
    src = open_source(ds)
    try:
        validate(src, dataset=ds)
        assert src.columns() == ("id", "dept", "year", "raise", "bonus")
        missing = dataset(tmp_path, source="postgres", url=pg.url(), table=TABLE, privacy_unit="p")
        with pytest.raises(
            DataError, match=r"declared column\(s\) \['p'\] are not in its postgres"
        ):
            validate(src, dataset=missing)
    finally:
        src.close()
    pg.run("CREATE TABLE hr.secret (x double precision)")  # no SELECT granted
    src = open_source(dataset(tmp_path, source="postgres", url=pg.url(), table="hr.secret"))
    try:
        with pytest.raises(DataError, match="permission denied"):
            src.columns()
    finally:
        src.close()


def test_a_server_that_is_not_there(tmp_path: Path) -> None:
    url = f"postgresql://u:s3cret@/db?host={tmp_path}&port=5999"
    src = open_source(dataset(tmp_path, source="postgres", url=url, table=TABLE))
    with pytest.raises(DataError) as info:
        src.columns()
    msg = str(info.value)
    assert msg.startswith("dataset 'raises': cannot connect to PostgreSQL at postgresql://u:***@")
    assert "s3cret" not in msg


def test_from_party_toml(pg: PostgresServer, tmp_path: Path) -> None:
    (tmp_path / "party.toml").write_text(
        f"""
id = "alice"
listen = "127.0.0.1:0"
ledger = "l.sqlite"
[tls]
ca = "ca.pem"
cert = "alice.pem"
key = "alice.key"
coordinators = ["analyst"]
[datasets.raises]
url = "{pg.url()}"
table = "{TABLE}"
epsilon = 1.0
privacy_unit = "id"
max_rows_per_unit = 2
[datasets.raises.columns.raise]
lower = 0
upper = 5000
[datasets.raises.columns.year]
lower = 2000
upper = 2100
[datasets.raises.columns.dept]
categories = ["eng", "ops", "hr"]
"""
    )
    ds = load_party_config(tmp_path / "party.toml").datasets["raises"]
    src = open_source(ds)
    try:
        validate(src, dataset=ds)
        assert src.execute(query(src.relation, dialect="postgres")) == EXPECTED
    finally:
        src.close()


def test_a_connection_the_server_dropped_is_opened_again(
    source: Source, pg: PostgresServer
) -> None:
    assert source.execute(Q("SELECT 1", ())) == [(1,)]
    killed = pg.run(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'mpcdp' AND usename = %s",
        (pg.reader,),
    )
    assert killed == [(True,)]
    for _ in range(500):  # the backend exits soon after the signal
        gone = "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'mpcdp'"
        if pg.run(gone) == [(0,)]:
            break
        time.sleep(0.01)
    assert source.execute(query(source.relation, dialect="postgres")) == EXPECTED
