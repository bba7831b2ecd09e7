"""DP SQL against real party processes: answers, and a coordinator that speaks the proto.

Three `mpcdp party serve` processes over mTLS hold a visits table (a patient may have several
rows; the privacy unit is the patient). An honest analyst's query gives exact cells with
mechanism none and noised ones with a budget; every attack (a plan that disagrees with its
query text, SQL injection through identifiers, literals and key lists, undeclared columns,
functions outside the subset, GROUP BY a numeric column, privacy-unit bounds other than the
party's) is refused before any charge, and nothing about the data (whether a group or a
filter matches a row) shows outside the noised release.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mpcdp import PROTOCOL_VERSION
from mpcdp.config.datasets import ColumnSpec
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import MpcdpError
from mpcdp.federation import Federation
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.sql.compile import compile_sql
from mpcdp.sql.typed_plan import TableDecl, digest
from tests.conftest import raw_stub

pytestmark = pytest.mark.slow

PARTIES = ("alice", "bob", "carlos")
DEPTS = ("cardio", "onco", "ortho")
#: (patient, dept, cost, year) per party: at most 2 rows per patient, one dept per patient
ROWS: dict[str, list[tuple[str, str, float, int]]] = {}
_rng = np.random.default_rng(7)  # test data only
for _i, _p in enumerate(PARTIES):
    _rows = []
    for _k in range(12 + 4 * _i):
        _dept = DEPTS[int(_rng.integers(0, 2))]  # no one in "ortho": an empty group
        for _ in range(int(_rng.integers(1, 3))):
            _rows.append(
                (f"{_p}-{_k}", _dept, float(_rng.integers(0, 900)), int(_rng.integers(2015, 2026)))
            )
    ROWS[_p] = _rows

TOML = (
    '[datasets.visits]\npath = "visits.csv"\nepsilon = 40.0\ndelta = 1e-6\nallow_exact = true\n'
    'privacy_unit = "patient"\nmax_rows_per_unit = 2\nmax_groups_per_unit = 1\n'
    f"[datasets.visits.columns.dept]\ncategories = {json.dumps(list(DEPTS))}\n"
    "[datasets.visits.columns.cost]\nlower = 0\nupper = 1000\n"
    "[datasets.visits.columns.year]\nlower = 2000\nupper = 2030\n"
)
DECL = TableDecl(
    name="visits",
    columns=(
        ColumnSpec(name="dept", categories=DEPTS),
        ColumnSpec(name="cost", lower=0.0, upper=1000.0),
        ColumnSpec(name="year", lower=2000.0, upper=2030.0),
    ),
    privacy_unit="patient",
    max_rows_per_unit=2,
    max_groups_per_unit=1,
)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("sql")
    for p in PARTIES:
        (root / p).mkdir()
        (root / p / "visits.csv").write_text(
            "patient,dept,cost,year\n" + "".join(f"{a},{b},{c},{d}\n" for a, b, c, d in ROWS[p])
        )
    net = launch(workdir=root, datasets_toml={p: TOML for p in PARTIES}, deadline_s=30)
    try:
        yield net
    finally:
        net.stop()


def charged(net: LocalFederation, party: str) -> int:
    with BudgetLedger(net.workdir / party / "ledger.sqlite") as led:
        return led.status("visits").queries


def all_rows() -> list[tuple[str, str, float, int]]:
    return [r for p in PARTIES for r in ROWS[p]]


def test_exact_cells_match_the_union_of_the_parties_tables(fed: LocalFederation) -> None:
    with Federation.from_config(fed.federation_config) as f:
        res = f.sql(
            "SELECT dept, COUNT(*) AS n, SUM(cost), AVG(cost) FROM visits "
            "WHERE year >= 2020 GROUP BY dept",
            mechanism="none",
        )
    assert res.group_by == ("dept",)
    assert [k[0] for k in res.keys] == list(DEPTS)  # every public key, even the empty one
    rows = [r for r in all_rows() if r[3] >= 2020]
    for key, cells in zip(res.keys, res.cells, strict=True):
        mine = [r[2] for r in rows if r[1] == key[0]]
        assert cells[0].value == len(mine)
        assert cells[1].value == pytest.approx(sum(mine), abs=1e-3)
        if mine:
            assert cells[2].value == pytest.approx(sum(mine) / len(mine), abs=1e-3)
    df = res.to_pandas()
    assert list(df.columns[:3]) == ["dept", "n", "n_std"]


def test_a_noised_query_charges_each_party_once_and_reports_intervals(
    fed: LocalFederation,
) -> None:
    before = {p: charged(fed, p) for p in PARTIES}
    with Federation.from_config(fed.federation_config) as f:
        res = f.sql("SELECT dept, COUNT(*), MEDIAN(cost) FROM visits GROUP BY dept", epsilon=2)
    assert {p: charged(fed, p) - before[p] for p in PARTIES} == {p: 1 for p in PARTIES}
    assert res.epsilon_spent == 2.0
    for cells in res.cells:
        for c in cells:
            assert c.interval95[0] <= c.value <= c.interval95[1]
            assert c.noise_std > 0
        assert 0.0 <= cells[1].value <= 1000.0  # a median inside the public bounds


def test_the_cli_prints_the_table_as_json(fed: LocalFederation) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpcdp.cli",
            "query",
            "sql",
            "SELECT COUNT(*) FROM visits WHERE dept IN ('cardio', 'onco')",
            "--federation",
            str(fed.federation_config),
            "--mechanism",
            "none",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["rows"][0]["count"]["value"] == len(all_rows())


# -- a coordinator speaking the proto -----------------------------------------------------------


def spec(text: str, *, plan_of: str | None = None, **kw: object) -> pb.QuerySpec:
    """A SQL spec; its plan digest is that of ``plan_of`` (default: the text itself; a random
    one when the text does not compile)."""
    try:
        d = digest(compile_sql(plan_of or text, tables={"visits": DECL})).hex()
    except Exception:
        d = secrets.token_hex(32)
    base: dict[str, object] = dict(
        query_id=f"q-{secrets.token_hex(6)}",
        dataset="visits",
        statistic=pb.SQL,
        mechanism="discrete-laplace",
        epsilon="1",
        parties=list(PARTIES),
        colluders=1,
        frac_bits=0,
        max_rows=10**6,
        ring_bits=64,
        sql=text,
        max_parties_per_unit=1,
        max_rows_per_unit=2,
        max_groups_per_unit=1,
        plan_digest=d,
    )
    base.update(kw)
    return pb.QuerySpec(**base)  # type: ignore[arg-type]


def propose(s: pb_grpc.PartyStub, q: pb.QuerySpec) -> pb.ProposeResponse:
    resp: pb.ProposeResponse = s.Propose(
        pb.ProposeRequest(version=PROTOCOL_VERSION, session_id=secrets.token_bytes(16), spec=q),
        timeout=20,
    )
    return resp


@pytest.mark.parametrize(
    ("q", "needle"),
    [
        # the plan proposed is not the one the text compiles to
        (spec("SELECT COUNT(*) FROM visits", plan_of="SELECT SUM(cost) FROM visits"), "plan"),
        # injection through an identifier: one quoted name, not declared
        (spec('SELECT SUM("cost""; DROP TABLE visits; --") FROM visits'), "not declared"),
        # the privacy unit is not a declared column: no query may read it
        (spec("SELECT COUNT(*) FROM visits WHERE patient = 'alice-1'"), "patient"),
        (spec("SELECT SUM(LENGTH(dept)) FROM visits"), "LENGTH"),
        (spec("SELECT COUNT(*) FROM read_csv('/etc/passwd')"), "read_csv"),
        (spec("SELECT year, COUNT(*) FROM visits GROUP BY year"), "year"),
        (spec("SELECT COUNT(*) FROM visits", max_rows_per_unit=5), "max_rows_per_unit"),
        (spec("SELECT COUNT(*) FROM visits", dataset="other"), "other"),
        # noise outside its sampler's exact range (a lattice, or a decay that rounds to 1)
        (spec("SELECT SUM(cost) FROM visits", frac_bits=40), "exact range"),
        (spec("SELECT COUNT(*) FROM visits", epsilon="1e-300"), "range"),
    ],
)
def test_hostile_sql_is_refused_before_any_charge(
    fed: LocalFederation, q: pb.QuerySpec, needle: str
) -> None:
    before = {p: charged(fed, p) for p in PARTIES}
    s, ch = raw_stub(fed.workdir, fed.ports["alice"], party="alice")
    with ch, pytest.raises(grpc.RpcError) as info:
        propose(s, q)
    err = info.value
    assert err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert needle.lower() in (err.details() or "").lower(), err.details()
    assert {p: charged(fed, p) for p in PARTIES} == before


def test_literals_and_keys_are_data_not_sql(fed: LocalFederation) -> None:
    """An injection through a string literal or a key list is a value the engine compares
    with: the query runs, matches nothing, and the table is intact afterwards."""
    evil = "x'); DROP TABLE visits; --"
    with Federation.from_config(fed.federation_config) as f:
        lit = f.sql(
            f"SELECT COUNT(*) FROM visits WHERE dept = '{evil.replace(chr(39), chr(39) * 2)}'",
            mechanism="none",
        )
        keyed = f.sql(
            "SELECT dept, COUNT(*) FROM visits GROUP BY dept",
            mechanism="none",
            keys={"dept": ["cardio", evil]},
        )
        after = f.sql("SELECT COUNT(*) FROM visits", mechanism="none")
    assert lit.cells[0][0].value == 0
    assert [k[0] for k in keyed.keys] == ["cardio", evil]
    assert keyed.cells[1][0].value == 0
    assert after.cells[0][0].value == len(all_rows())


def test_an_empty_group_or_filter_looks_like_any_other(fed: LocalFederation) -> None:
    """Whether a filter or a group matches a row never shows outside the noised cells: the
    same answer shape, no error, and one charge, for a filter that matches nothing."""
    before = charged(fed, "alice")
    with Federation.from_config(fed.federation_config) as f:
        none = f.sql("SELECT dept, COUNT(*) FROM visits WHERE year < 2001 GROUP BY dept", epsilon=1)
        some = f.sql("SELECT dept, COUNT(*) FROM visits GROUP BY dept", epsilon=1)
    assert none.keys == some.keys and len(none.cells) == len(DEPTS)
    assert charged(fed, "alice") == before + 2


def test_the_salary_question_in_sql_gives_the_exact_mean(tmp_path: Path) -> None:
    """The seed's question, asked in SQL of the four salary parties: 3171.5 exactly with
    mechanism none, where every party allows exact answers."""
    raises = {"alice": 3800, "bob": 2514, "carlos": 2982, "david": 3390}
    toml = {}
    for p, r in raises.items():
        (tmp_path / p).mkdir()
        (tmp_path / p / "raises.csv").write_text(f"raise\n{r}\n")
        toml[p] = (
            '[datasets.raises]\npath = "raises.csv"\nepsilon = 1.0\nallow_exact = true\n'
            "[datasets.raises.columns.raise]\nlower = 0\nupper = 10000\n"
        )
    net = launch(workdir=tmp_path, datasets_toml=toml, deadline_s=30)
    try:
        with Federation.from_config(net.federation_config) as f:
            res = f.sql("SELECT AVG(raise) FROM raises", mechanism="none")
        assert res.cells[0][0].value == 3171.5
        assert res.labels == ("avg_raise",)
    finally:
        net.stop()


def test_a_single_statistic_of_a_table_with_a_privacy_unit_is_refused_before_a_charge(
    fed: LocalFederation,
) -> None:
    """The single-statistic plans assume one row per person: on a table whose rows are
    bounded per patient they would under-size the noise, so every party refuses them."""
    before = {p: charged(fed, p) for p in PARTIES}
    with Federation.from_config(fed.federation_config) as f, pytest.raises(MpcdpError) as info:
        f.mean(dataset="visits", column="cost", epsilon=1)
    assert "declares a privacy unit ('patient')" in str(info.value)
    assert {p: charged(fed, p) for p in PARTIES} == before
