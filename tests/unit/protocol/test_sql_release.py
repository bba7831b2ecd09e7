"""The release plan of a DP SQL query (sensitivities per privacy unit, the budget split), a
party's own re-derivation of the plan, the answer read back, and an engine failure that must
reach the coordinator as "unavailable" only."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mpcdp.config.datasets import ColumnSpec
from mpcdp.config.party_config import DatasetConfig
from mpcdp.dp.mechanisms import DiscreteGaussian, DiscreteLaplace
from mpcdp.errors import MpcdpError, PolicyError, RoundAborted
from mpcdp.federation import Federation
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.query.sql_release import (
    answer,
    contribution,
    party_release,
    release_plan,
    table_decl,
)
from mpcdp.sql.compile import compile_sql
from mpcdp.sql.typed_plan import TableDecl, digest
from tests.conftest import build_net

PARTIES = ("alice", "bob", "carlos")
DEPTS = ("a", "b", "c", "d", "e")


def cfg(**kw: object) -> DatasetConfig:
    base: dict[str, object] = dict(
        name="visits",
        path=Path("visits.csv"),
        epsilon=10.0,
        delta=1e-6,
        columns=(
            ColumnSpec(name="dept", categories=DEPTS),
            ColumnSpec(name="cost", lower=0.0, upper=10.0),
        ),
        privacy_unit="patient",
        max_rows_per_unit=3,
        max_groups_per_unit=2,
        max_parties_per_unit=1,
    )
    base.update(kw)
    return DatasetConfig(**base)  # type: ignore[arg-type]


def spec_for(text: str, decl: TableDecl, **kw: object) -> QuerySpec:
    q = compile_sql(text, tables={decl.name: decl})
    base: dict[str, object] = dict(
        query_id="q-1",
        dataset=decl.name,
        statistic=Statistic.SQL,
        mechanism="discrete-laplace",
        epsilon="1",
        parties=PARTIES,
        frac_bits=0,
        sql=text,
        max_parties_per_unit=2,
        max_rows_per_unit=decl.max_rows_per_unit,
        max_groups_per_unit=decl.max_groups_per_unit,
        plan_digest=digest(q).hex(),
    )
    base.update(kw)
    return QuerySpec(**base)  # type: ignore[arg-type]


def test_sensitivities_follow_rows_groups_and_parties_per_unit() -> None:
    """R = 3 rows per (unit, cell), G = 2 cells per unit, P = 2 parties per unit: a count's
    tensor moves by P G R = 12 in L1 and P sqrt(G) R in L2; a sum over [0, 10] (frac_bits
    0) by P G (ceil(R 10) + 1) = 124 (each party rounds once per cell)."""
    decl = table_decl(cfg())
    text = "SELECT dept, COUNT(*), SUM(cost) FROM visits GROUP BY dept"
    plan = release_plan(
        spec_for(text, decl),
        compile_sql(text, tables={"visits": decl}),
        decl,
        max_parties_per_unit=2,
    )
    count, total = plan.tensors
    assert isinstance(count.mechanism, DiscreteLaplace)
    assert isinstance(total.mechanism, DiscreteLaplace)
    assert count.mechanism.l1_sensitivity == 2 * 2 * 3
    assert total.mechanism.l1_sensitivity == 2 * 2 * (3 * 10 + 1)
    assert count.length == total.length == len(DEPTS)
    g = (
        release_plan(
            spec_for(text, decl, mechanism="discrete-gaussian", delta=1e-6),
            compile_sql(text, tables={"visits": decl}),
            decl,
            max_parties_per_unit=2,
        )
        .tensors[0]
        .mechanism
    )
    assert isinstance(g, DiscreteGaussian)
    assert g.l2_sensitivity == pytest.approx(2 * math.sqrt(2) * 3)


def test_without_group_by_a_unit_reaches_one_cell_and_without_a_unit_a_row_is_one() -> None:
    decl = table_decl(cfg())
    text = "SELECT COUNT(*) FROM visits"
    one_cell = release_plan(
        spec_for(text, decl),
        compile_sql(text, tables={"visits": decl}),
        decl,
        max_parties_per_unit=1,
    )
    m = one_cell.tensors[0].mechanism
    assert isinstance(m, DiscreteLaplace) and m.l1_sensitivity == 3  # R only
    rows = table_decl(cfg(privacy_unit=None))
    grouped = "SELECT dept, COUNT(*) FROM visits GROUP BY dept"
    plain = (
        release_plan(
            spec_for(grouped, rows, max_rows_per_unit=1, max_groups_per_unit=1),
            compile_sql(grouped, tables={"visits": rows}),
            rows,
            max_parties_per_unit=1,
        )
        .tensors[0]
        .mechanism
    )
    assert isinstance(plain, DiscreteLaplace) and plain.l1_sensitivity == 1


def test_the_budget_split_never_exceeds_the_query_epsilon() -> None:
    """Weights 2 : 1 : 1, the AVG's share halved between its sum and its count; each part is
    rounded down, so the parts add up to at most the spec's epsilon (exactly, as rationals)."""
    decl = table_decl(cfg())
    text = "SELECT COUNT(*), AVG(cost), MEDIAN(cost) FROM visits"
    q = compile_sql(text, tables={"visits": decl}, weights=[2, 1, 1])
    spec = spec_for(text, decl, epsilon="0.7", weights=(2.0, 1.0, 1.0), plan_digest=digest(q).hex())
    plan = release_plan(spec, q, decl, max_parties_per_unit=1)
    eps = [Fraction(repr(t.mechanism.epsilon)) for t in plan.tensors]  # type: ignore[attr-defined]
    assert [t.name for t in plan.tensors] == ["0:count", "1:sum", "1:count", "2:bins"]
    assert sum(eps) <= Fraction("0.7")
    assert float(sum(eps)) == pytest.approx(0.7, rel=1e-12)
    assert eps[0] == pytest.approx(2 * eps[3], rel=1e-12)
    assert eps[1] == pytest.approx(eps[2], rel=1e-12)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(max_rows_per_unit=4), "max_rows_per_unit=4 differs"),
        (dict(max_groups_per_unit=1), "max_groups_per_unit=1 differs"),
        (dict(max_parties_per_unit=1), "max_parties_per_unit=1 is below 2"),
        (dict(plan_digest="0" * 64), "differs from the plan the coordinator proposed"),
        (dict(dataset="other"), "the spec names 'other'"),
    ],
)
def test_a_party_derives_its_own_plan_and_refuses_any_other(
    change: dict[str, object], needle: str
) -> None:
    mine = cfg(max_parties_per_unit=2)
    text = "SELECT dept, COUNT(*) FROM visits GROUP BY dept"
    ok = spec_for(text, table_decl(mine))
    assert party_release(ok, mine).length == len(DEPTS)
    bad = spec_for(text, table_decl(mine), **change)
    with pytest.raises(PolicyError, match=needle):
        party_release(bad, mine)


def test_the_answer_inverts_the_histogram_and_reads_every_cell() -> None:
    decl = table_decl(cfg(privacy_unit=None))
    text = "SELECT dept, COUNT(*), MEDIAN(cost) FROM visits GROUP BY dept"
    q = compile_sql(text, tables={"visits": decl}, bins=10)
    spec = spec_for(
        text,
        decl,
        mechanism="none",
        epsilon="0",
        bins=10,
        max_rows_per_unit=1,
        max_groups_per_unit=1,
        plan_digest=digest(q).hex(),
    )
    plan = release_plan(spec, q, decl, max_parties_per_unit=1)
    cells = np.zeros((len(DEPTS), len(q.measures())))
    cells[:, 0] = [4, 0, 1, 2, 3]  # counts
    cells[0, 1 + 2] = 4  # dept a: every value in [2, 3)
    cells[2, 1 + 9] = 1  # dept c: one value in [9, 10]
    tensors = contribution(plan, q, cells)
    out = answer(plan, q, tensors)
    assert [c[0].value for c in out] == [4, 0, 1, 2, 3]
    assert out[0][1].value == pytest.approx(2.5)
    assert out[2][1].value == pytest.approx(9.5)
    assert out[1][1].value == pytest.approx(5.0)  # nothing released: the middle of the range


def test_an_engine_failure_reaches_the_coordinator_as_unavailable_only(tmp_path: Path) -> None:
    """A file that stops parsing after the node started fails the query in the engine, whose
    message quotes the value; the coordinator hears "unavailable", nothing is charged."""
    n = build_net(tmp_path)
    try:
        (tmp_path / "bob.csv").write_text("raise,dept\nsecret-abc,eng\n")
        with Federation.from_config(n.federation) as fed, pytest.raises(MpcdpError) as info:
            fed.sql("SELECT SUM(raise) FROM raises", epsilon=0.5)
        shown = str(info.value)
        assert "dataset 'raises' is unavailable at party 'bob'" in shown
        assert "secret-abc" not in shown
        for node in n.nodes.values():
            assert node.ledger.status("raises").queries == 0
    finally:
        n.stop()


def test_a_propose_floor_holds_every_answer_until_the_floor(tmp_path: Path) -> None:
    """With ``propose_floor_s``, a party answers Propose (and refuses) no sooner than the
    floor after the call arrived: how long its engine worked does not show."""
    limits = "\n[limits]\npropose_floor_s = 5\n"
    n = build_net(tmp_path, extra={"bob": limits})
    waits: list[float] = []
    n.nodes["bob"].engine._sleep = waits.append  # record instead of sleeping
    try:
        with Federation.from_config(n.federation) as fed:
            fed.sql("SELECT dept, COUNT(*) FROM raises GROUP BY dept", epsilon=0.5)
            with pytest.raises(RoundAborted):
                fed.sql("SELECT COUNT(*) FROM raises", epsilon=50)  # refused: over the cap
        assert len(waits) == 2 and all(0 < w <= 5 for w in waits)
        assert n.nodes["alice"].engine._floor == 0
    finally:
        n.stop()


@pytest.mark.parametrize(
    ("value", "needle"), [("-1", "must be in [0, 60]"), ("30", "must be below session_ttl_s")]
)
def test_the_propose_floor_is_checked_in_party_toml(
    tmp_path: Path, value: str, needle: str
) -> None:
    from mpcdp.config.party_config import load_party_config
    from mpcdp.errors import ConfigError
    from tests.conftest import party_toml

    path = tmp_path / "alice.toml"
    path.write_text(party_toml("alice", PARTIES, extra=f"\n[limits]\npropose_floor_s = {value}\n"))
    with pytest.raises(ConfigError, match="propose_floor_s") as info:
        load_party_config(path)
    assert needle in str(info.value)


def test_histogram_inversion_known_answers() -> None:
    """Rows of noisy histograms over edges 0..4: the first bin whose cumulative count reaches
    p of the total, linear inside it; negative counts count as 0; an empty row gives the
    middle of the range."""
    from mpcdp.protocol.query.sql_release import invert_histograms

    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    rows = np.array(
        [
            [0.0, 10.0, 0.0, 0.0],  # all in [1, 2): the median is its middle
            [5.0, 0.0, 0.0, 5.0],  # half and half: the end of the first bin
            [-3.0, 4.0, -1.0, 4.0],  # negatives floored: as [0, 4, 0, 4]
            [-1.0, -2.0, 0.0, 0.0],  # nothing left
        ]
    )
    assert invert_histograms(rows, edges, 0.5).tolist() == [1.5, 1.0, 2.0, 2.0]
    assert invert_histograms(rows[:1], edges, 0.9).tolist() == [pytest.approx(1.9)]


def test_a_table_is_read_as_it_is_at_each_query(tmp_path: Path) -> None:
    """A prepared vector holds noise only: a table's statistic comes from its engine when a
    query takes the vector, so the same query twice reads the table as it is each time."""
    n = build_net(tmp_path)
    try:
        with Federation.from_config(n.federation) as fed:
            first = fed.sql("SELECT COUNT(*) FROM raises", mechanism="none")
            (tmp_path / "bob.csv").write_text("raise,dept\n1,eng\n2,ops\n3,ops\n")
            second = fed.sql("SELECT COUNT(*) FROM raises", mechanism="none")
        assert second.cells[0][0].value == first.cells[0][0].value + 2
    finally:
        n.stop()


def test_a_disagreement_on_one_table_does_not_stop_queries_of_another() -> None:
    from mpcdp.protocol.catalog import ColumnInfo, DatasetInfo, PartyDescription
    from mpcdp.protocol.query.sql_release import tables_from

    def party(name: str, upper: float) -> PartyDescription:
        return PartyDescription(
            party_id=name,
            datasets=(
                DatasetInfo(name="a", kind="table", columns=(ColumnInfo(name="x", upper=1.0),)),
                DatasetInfo(name="b", kind="table", columns=(ColumnInfo(name="y", upper=upper),)),
            ),
        )

    tables, disagree = tables_from([party("alice", 1.0), party("bob", 2.0)])
    assert set(tables) == {"a", "b"} and set(disagree) == {"b"}
    assert [d.columns[0].upper for d in disagree["b"]] == [1.0, 2.0]
