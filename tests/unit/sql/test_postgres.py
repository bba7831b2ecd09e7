"""The rendered PostgreSQL SQL, executed by a real cluster (as a read-only role, through
psycopg's %s markers) against the pure-Python reference: the same semantics as DuckDB, with
PostgreSQL's own text form of a double in the keyed hash."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from mpcdp.sql.compile import compile_sql
from mpcdp.sql.render import render, to_matrix
from tests.servers import PostgresServer
from tests.unit.sql import engine_data as dk
from tests.unit.sql.reference import postgres_float_text, reference

TABLE = "sql_render_raises"


@pytest.fixture(scope="module")
def server(postgres_server: PostgresServer) -> PostgresServer:
    cols = ", ".join(
        f'"{c}" {t.replace("DOUBLE", "DOUBLE PRECISION")}'
        for c, t in zip(dk.COLUMNS, dk.SQL_TYPES, strict=True)
    )
    postgres_server.run(f"DROP TABLE IF EXISTS public.{TABLE}")
    postgres_server.run(f"CREATE TABLE public.{TABLE} ({cols})")
    marks = ", ".join("%s" for _ in dk.COLUMNS)
    with psycopg.connect(postgres_server.url(user=postgres_server.owner), autocommit=True) as c:
        c.cursor().executemany(
            f"INSERT INTO public.{TABLE} VALUES ({marks})".encode(),
            [[r[col] for col in dk.COLUMNS] for r in dk.FIXED + dk.busy_rows()],
        )
    postgres_server.grant_select("public", TABLE)
    return postgres_server


@pytest.mark.parametrize("text", dk.PROPERTY_QUERIES)
def test_postgres_matches_the_reference(server: PostgresServer, text: str) -> None:
    rows = dk.FIXED + dk.busy_rows()
    with psycopg.connect(server.url()) as conn:  # the read-only role
        for unit, max_rows, max_groups in ((True, 1, 1), (True, 2, 2), (False, 1, 1)):
            table = dk.table_decl(unit=unit, rows=max_rows, groups=max_groups)
            q = compile_sql(text, tables={"raises": table}, bins=3)
            for salt in (bytes(16), bytes(range(16))):
                e = render(
                    q, table=table, relation=f'public."{TABLE}"', dialect="postgres", salt=salt
                )
                got = to_matrix(q, conn.execute(e.text.encode(), e.params).fetchall())
                want = reference(q, table, rows, salt, float_text=postgres_float_text)
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


def test_postgres_hostile_keys_and_percent_signs_are_data(server: PostgresServer) -> None:
    table = dk.table_decl(unit=False)
    q = compile_sql(
        "SELECT dept, COUNT(*) FROM raises GROUP BY dept",
        tables={"raises": table},
        keys={"dept": ["eng", dk.HOSTILE, "50%?", "hr"]},
    )
    relation = f"(SELECT * FROM public.\"{TABLE}\" WHERE '%' = '%') AS \"r%\""
    e = render(q, table=table, relation=relation, dialect="postgres", salt=bytes(16))
    with psycopg.connect(server.url()) as conn:
        got = to_matrix(q, conn.execute(e.text.encode(), e.params).fetchall())
    assert got[:, 0].tolist() == [30.0, 24.0, 0.0, 1.0]
    assert server.run(f"SELECT COUNT(*) FROM public.{TABLE}") == [(83,)]
