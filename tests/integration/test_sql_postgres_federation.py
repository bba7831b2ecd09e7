"""DP SQL across three parties whose tables live in PostgreSQL: real nodes over mTLS, a real
server started by the tests, each party reading its own table through a read-only role."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpcdp.errors import MpcdpError
from mpcdp.federation import Federation
from tests.conftest import PARTIES, build_net
from tests.servers import PostgresServer, postgres_server

__all__ = ["postgres_server"]  # the fixture, used by name below

pytestmark = pytest.mark.slow

#: (patient, dept, cost) per party; one patient at two parties (P = 2)
ROWS = {
    "alice": [("p1", "eng", 100.0), ("p1", "eng", 300.0), ("p2", "ops", 50.0)],
    "bob": [("p3", "ops", 400.0), ("p1", "eng", 200.0)],
    "carlos": [("p4", "eng", 1000.0), ("p5", "ops", 20.0), ("p5", "ops", 30.0)],
}


def test_a_grouped_query_over_postgres_tables_matches_the_union(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    extra = {}
    for p in PARTIES:
        postgres_server.run(f"DROP TABLE IF EXISTS public.visits_{p}")
        postgres_server.run(
            f"CREATE TABLE public.visits_{p} (patient TEXT, dept TEXT, cost DOUBLE PRECISION)"
        )
        for row in ROWS[p]:
            postgres_server.run(f"INSERT INTO public.visits_{p} VALUES (%s, %s, %s)", row)
        postgres_server.grant_select("public", f"visits_{p}")
        extra[p] = (
            f'\n[datasets.visits]\nurl = "{postgres_server.url()}"\ntable = "public.visits_{p}"\n'
            'epsilon = 5.0\ndelta = 1e-6\nallow_exact = true\nprivacy_unit = "patient"\n'
            "max_rows_per_unit = 2\nmax_parties_per_unit = 2\n"
            '[datasets.visits.columns.dept]\ncategories = ["eng", "ops"]\n'
            "[datasets.visits.columns.cost]\nlower = 0\nupper = 1000\n"
        )
    n = build_net(tmp_path, extra=extra)
    try:
        with Federation.from_config(n.federation) as fed:
            exact = fed.sql(
                "SELECT dept, COUNT(*), SUM(cost) FROM visits GROUP BY dept",
                mechanism="none",
                max_parties_per_unit=2,
            )
            noised = fed.sql(
                "SELECT dept, COUNT(*) FROM visits GROUP BY dept",
                epsilon=1,
                max_parties_per_unit=2,
            )
            with pytest.raises(MpcdpError, match="max_parties_per_unit=1 is below 2"):
                fed.sql("SELECT COUNT(*) FROM visits", epsilon=1, max_parties_per_unit=1)
        rows = [r for p in PARTIES for r in ROWS[p]]
        for (dept,), cells in zip(exact.keys, exact.cells, strict=True):
            mine = [c for _, d, c in rows if d == dept]
            assert cells[0].value == len(mine)
            assert cells[1].value == pytest.approx(sum(mine), abs=1e-3)
        assert [k[0] for k in noised.keys] == ["eng", "ops"]
        for node in n.nodes.values():
            assert node.ledger.status("visits").queries == 2  # the refusal charged nothing
    finally:
        n.stop()
