"""Real party nodes (gRPC + mTLS on loopback): queries, refusals and their status codes."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import pytest

from mpcdp import PROTOCOL_VERSION
from mpcdp.config.party_config import TlsConfig, load_federation_config
from mpcdp.dp.poisson import POISSON_MAX_LAM
from mpcdp.errors import ParameterError, PartyError, RoundAborted
from mpcdp.federation import Federation
from mpcdp.party.node import check_datasets
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.protocol.query.plan import fit, plan
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.transport import tls
from mpcdp.transport.cert_files import init_federation
from mpcdp.transport.client import GrpcPartyClient, check_health
from tests.conftest import DEPTS, PARTIES, ROWS, Net, build_net, raw_stub, vector_datasets

TRUE_MEAN = sum(sum(r) for r in ROWS.values()) / sum(len(r) for r in ROWS.values())


def test_exact_statistics(net: Net) -> None:
    with Federation.from_config(net.federation) as fed:
        mean = fed.mean(dataset="raises", column="raise", mechanism="none")
        assert mean.value == pytest.approx(TRUE_MEAN, abs=1e-3)
        assert mean.epsilon_spent == 0 and mean.noise_std == 0
        assert fed.sum(dataset="raises", column="raise", mechanism="none").value == pytest.approx(
            12786, abs=1e-3
        )
        assert fed.count(dataset="raises", mechanism="none").value == 5
        hist = fed.histogram(dataset="raises", column="dept", mechanism="none").value
        assert hist == {"eng": 3.0, "ops": 2.0}
    _ = DEPTS


@pytest.mark.parametrize("mechanism", ["discrete-laplace", "skellam", "discrete-gaussian"])
def test_dp_queries_spend_budget_everywhere(net: Net, mechanism: str) -> None:
    with Federation.from_config(net.federation) as fed:
        res = fed.mean(dataset="raises", column="raise", epsilon=0.5, mechanism=mechanism)
        assert 0 <= res.value <= 5000  # type: ignore[operator]
        assert res.noise_std > 0 and res.interval95 is not None
        # the ledger composes RDP parts tightly, so it may charge less than the nominal 0.5
        assert all(2.5 - 1e-9 <= left < 2.9 for left in res.budget_remaining.values())
        assert res.to_json().keys() >= {
            "value",
            "epsilon_spent",
            "noise_scale",
            "parties",
            "budget_remaining",
        }
    for node in net.nodes.values():
        st = node.ledger.status("raises")
        assert st.queries == 1 and 0.1 <= st.spent_epsilon <= 0.5


def test_over_budget_refusal_reaches_analyst_and_charges_nobody(tmp_path: Path) -> None:
    n = build_net(tmp_path, budgets={"alice": 3.0, "bob": 0.5, "carlos": 3.0})
    try:
        with Federation.from_config(n.federation) as fed, pytest.raises(RoundAborted) as info:
            fed.sum(dataset="raises", column="raise", epsilon=1.0)
        cause = info.value.cause
        assert isinstance(cause, PartyError) and cause.party == "bob"
        assert cause.code == "RESOURCE_EXHAUSTED" and "budget exceeded for dataset='raises'" in str(
            cause
        )
        for node in n.nodes.values():
            assert node.ledger.status("raises").queries == 0
    finally:
        n.stop()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(dataset="nope", column="raise"), "dataset"),
        (dict(dataset="raises", column="salary"), "column"),
    ],
)
def test_unknown_dataset_or_column_is_refused_before_any_round(
    net: Net, kwargs: dict[str, str], needle: str
) -> None:
    with Federation.from_config(net.federation) as fed, pytest.raises(Exception, match=needle):
        fed.sum(epsilon=0.1, **kwargs)


def test_party_refuses_other_bounds(net: Net) -> None:
    with (
        Federation.from_config(net.federation) as fed,
        pytest.raises(RoundAborted, match="differ from the declared"),
    ):
        fed.sum(dataset="raises", column="raise", epsilon=0.1, lower=0, upper=100)


def test_unknown_party_in_query_is_refused(tmp_path: Path) -> None:
    n = build_net(tmp_path)
    try:
        cfg = load_federation_config(n.federation)
        init_federation(out=tmp_path / "more", parties=["mallory"], coordinators=["x"])
        with Federation(cfg) as fed:
            spec = QuerySpec(
                query_id="q1",
                dataset="raises",
                column="raise",
                statistic=Statistic.SUM,
                mechanism="discrete-laplace",
                epsilon="0.1",
                parties=("alice", "mallory"),
                lower=0,
                upper=5000,
            )
            with pytest.raises(PartyError, match="unknown party 'mallory'"):
                fed.clients[0].propose(session_id=b"s" * 16, spec=spec)
    finally:
        n.stop()


def test_client_with_wrong_ca_cannot_connect(net: Net, tmp_path: Path) -> None:
    init_federation(out=tmp_path / "evil", parties=["alice"], coordinators=["analyst"])
    creds = tls.load_credentials(
        TlsConfig(
            ca=tmp_path / "evil/ca.pem",
            cert=tmp_path / "evil/analyst.pem",
            key=tmp_path / "evil/analyst.key",
        )
    )
    port = net.nodes["alice"].port
    with GrpcPartyClient(
        party_id="alice", address=f"127.0.0.1:{port}", creds=creds, deadline_s=3
    ) as client:
        with pytest.raises(PartyError) as info:
            client.describe()
    assert info.value.code == "UNAVAILABLE"
    assert net.nodes["alice"].ledger.status("raises").queries == 0


def test_known_ca_but_unknown_name_is_permission_denied(net: Net) -> None:
    root = net.root
    creds = tls.load_credentials(
        TlsConfig(ca=root / "certs/ca.pem", cert=root / "certs/bob.pem", key=root / "certs/bob.key")
    )
    with GrpcPartyClient(
        party_id="alice", address=f"127.0.0.1:{net.nodes['alice'].port}", creds=creds
    ) as client:
        with pytest.raises(PartyError) as info:
            client.describe()
    assert info.value.code == "PERMISSION_DENIED"
    assert "'bob' is not a configured coordinator of party 'alice'" in info.value.message


def test_coordinator_refuses_a_server_with_another_partys_certificate(net: Net) -> None:
    root = net.root
    creds = tls.load_credentials(
        TlsConfig(
            ca=root / "certs/ca.pem",
            cert=root / "certs/analyst.pem",
            key=root / "certs/analyst.key",
        )
    )
    # bob's port, but we expect alice's certificate there
    with GrpcPartyClient(
        party_id="alice", address=f"127.0.0.1:{net.nodes['bob'].port}", creds=creds, deadline_s=3
    ) as client:
        with pytest.raises(PartyError, match="UNAVAILABLE"):
            client.describe()


def _raw_stub(net: Net, party: str = "alice") -> tuple[pb_grpc.PartyStub, grpc.Channel]:
    return raw_stub(net.root, net.nodes[party].port or 0, party=party)


def test_wrong_protocol_version_and_malformed_requests(net: Net) -> None:
    stub, ch = _raw_stub(net)
    with ch:
        with pytest.raises(grpc.RpcError) as info:
            stub.Describe(pb.DescribeRequest(version=PROTOCOL_VERSION + 1), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "protocol version 2 is not supported" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.Propose(
                pb.ProposeRequest(version=PROTOCOL_VERSION, session_id=b"short"), timeout=5
            )
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and "session_id" in info.value.details()
        )
        with pytest.raises(grpc.RpcError) as info:
            spec = pb.QuerySpec(
                query_id="q",
                dataset="raises",
                statistic=pb.SUM,
                mechanism="laplace",
                epsilon="1",
                parties=["alice", "bob"],
            )
            stub.Propose(
                pb.ProposeRequest(version=PROTOCOL_VERSION, session_id=b"x" * 16, spec=spec),
                timeout=5,
            )
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and "mechanism" in info.value.details()
        )
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.Contribute(
                    pb.ContributeRequest(version=PROTOCOL_VERSION, session_id=b"y" * 16), timeout=5
                )
            )
        assert (
            info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "unknown or expired session" in info.value.details()
        )


def test_health_service_over_mtls(net: Net) -> None:
    root = net.root
    creds = tls.load_credentials(
        TlsConfig(
            ca=root / "certs/ca.pem",
            cert=root / "certs/analyst.pem",
            key=root / "certs/analyst.key",
        )
    )
    assert check_health(
        address=f"127.0.0.1:{net.nodes['bob'].port}", creds=creds, party_id="bob"
    ).serving


def strict_dataset(party: str) -> str:
    """TOML of a dataset "strict": the same file and columns as "raises" (so its budget), with
    the party's policy ``out_of_bounds = "error"`` on the numeric column (the default clips)."""
    return (
        f'\n[datasets.strict]\npath = "{party}.csv"\nbudget = "raises"\nepsilon = 3.0\n'
        "delta = 1e-6\n"
        "allow_exact = true\n[datasets.strict.columns.raise]\nlower = 0\nupper = 5000\n"
        'out_of_bounds = "error"\n[datasets.strict.columns.dept]\ncategories = ["eng", "ops"]\n'
    )


@pytest.mark.parametrize(
    ("bad", "needle", "dataset"),
    [
        ("raise,dept\n100,eng\nnan,ops\n", "row 3 column 'raise': 'nan' is not finite", "raises"),
        ("raise,dept\ninf,eng\n", "row 2 column 'raise': 'inf' is not finite", "raises"),
        ("raise,dept\n9000,eng\n", "9000 is outside the declared bounds [0, 5000]", "strict"),
        ("raise,dept\nabc,eng\n", "'abc' is not a number", "raises"),
        ("raise,dept\n100,hr\n", "'hr' is not one of the declared categories", "raises"),
    ],
)
def test_bad_csv_values_make_the_dataset_unavailable_without_telling_the_coordinator_why(
    tmp_path: Path, bad: str, needle: str, dataset: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The offending cell, its value and the file's path are the party's private business:
    the coordinator hears "unavailable", the owner's log and `mpcdp party check` say why.
    An out-of-bounds value makes a dataset unavailable only where its owner declared
    ``out_of_bounds = "error"`` ("strict"); the default ("raises") clips it."""
    extra = {p: strict_dataset(p) for p in ("alice", "bob", "carlos")}
    n = build_net(tmp_path, csv_override={"bob": bad}, extra=extra)
    try:
        with Federation.from_config(n.federation) as fed, pytest.raises(RoundAborted) as info:
            fed.mean(dataset=dataset, column="raise", epsilon=0.1)
        cause = info.value.cause
        assert (
            isinstance(cause, PartyError)
            and cause.party == "bob"
            and cause.code == "FAILED_PRECONDITION"
        )
        assert f"dataset {dataset!r} is unavailable at party 'bob'" in cause.message
        assert "mpcdp party check" in cause.message
        shown = str(info.value)
        for secret in (needle, "bob.csv", str(tmp_path), "row "):
            assert secret not in shown
        for node in n.nodes.values():
            assert node.ledger.status(dataset).queries == 0
        assert any(needle in r.getMessage() for r in caplog.records)  # the owner's own log
        problems = check_datasets(n.nodes["bob"].config)
        problem = problems[dataset]
        assert problem is not None and needle in problem and "bob.csv" in problem
        # the same file under the default policy: clipped, available (bad values refused)
        clipped = dataset == "strict"
        assert (problems["raises"] is None) == clipped
        assert check_datasets(n.nodes["alice"].config) == {"raises": None, "strict": None}
    finally:
        n.stop()


def test_exact_release_needs_the_partys_consent(tmp_path: Path) -> None:
    n = build_net(tmp_path, allow_exact={"carlos": False})
    try:
        with Federation.from_config(n.federation) as fed, pytest.raises(RoundAborted) as info:
            fed.mean(dataset="raises", column="raise", mechanism="none")
        assert "dataset 'raises' does not allow exact" in str(info.value)
        assert "allow_exact = false" in str(info.value)
        assert n.nodes["alice"].ledger.status("raises").queries == 0
    finally:
        n.stop()


def test_vector_dataset_sum(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)  # test data only
    vecs = {p: rng.normal(size=1000) * 0.01 for p in ("alice", "bob", "carlos")}
    extra = vector_datasets(tmp_path, "grad", vecs)
    n = build_net(tmp_path, extra=extra)
    try:
        with Federation.from_config(n.federation) as fed:
            exact = fed.sum(dataset="grad", mechanism="none")
            assert np.allclose(np.asarray(exact.value), sum(vecs.values()), atol=1e-4)
            noisy = fed.sum(dataset="grad", epsilon=2.0, mechanism="skellam")
            err = np.asarray(noisy.value) - sum(vecs.values())
            assert abs(err.std() / noisy.noise_std - 1) < 0.15
    finally:
        n.stop()


def test_explicit_fixed_point_outside_the_samplers_range_is_refused_before_any_round(
    net: Net,
) -> None:
    """fed.sum(..., mechanism="skellam", epsilon=1, frac_bits=16) released a lattice (every
    share's noise had >= 6 trailing zero bits). Now the analyst's own plan refuses it, and
    the planner's default uses the fixed point the noise needs."""
    with Federation.from_config(net.federation) as fed:
        with pytest.raises(ParameterError, match="exact range"):
            fed.sum(dataset="raises", column="raise", mechanism="skellam", epsilon=1.0,
                    frac_bits=16)  # fmt: skip
        for node in net.nodes.values():
            assert node.ledger.status("raises").queries == 0
        res = fed.sum(dataset="raises", column="raise", mechanism="skellam", epsilon=1.0)
    # default plan: frac_bits 0 for bounds [0, 5000]; each Poisson rate mu/(2h) ~ 1e8
    spec = QuerySpec(query_id="x", dataset="raises", column="raise", statistic=Statistic.SUM,
                     mechanism="skellam", epsilon="1", delta=1e-6, parties=PARTIES,
                     upper=5000)  # fmt: skip
    fitted = fit(spec, vector_length=None, frac_bits=None, ring_bits=None)
    assert fitted.frac_bits == 0
    mu = plan(fitted).tensors[0].mechanism.mu  # type: ignore[attr-defined]
    assert mu / 2 / 2 < POISSON_MAX_LAM
    assert res.noise_std == pytest.approx(math.sqrt(mu * 3 / 2), rel=1e-9)
