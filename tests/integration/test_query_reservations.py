"""Reservations cannot be used as a weapon: real party processes (mpcdp party serve) on
loopback with mTLS, one honest coordinator (analyst) and one hostile one (mallory) that
proposes queries and never contributes.

Each coordinator reserves only within its own share of a dataset's budget (party.toml
``coordinator_shares``), so mallory's reservations cannot lock the analyst out of its share;
where no shares are declared, a refusal caused by another coordinator's reservation says so
without naming that coordinator; and query ids are one namespace per coordinator. Describe
tells each coordinator its own share and what it may still spend, and nothing about the
others' reservations.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpcdp.errors import MpcdpError, PartyError, RoundAborted
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.query.round_coordinator import run_round
from mpcdp.protocol.session import SESSION_ID_BYTES
from mpcdp.transport.client import GrpcPartyClient
from tests.conftest import coordinator_clients

pytestmark = pytest.mark.slow

PARTIES = ("alice", "bob", "carlos")


def _datasets(workdir: Path) -> dict[str, str]:
    out = {}
    for i, p in enumerate(PARTIES):
        (workdir / p).mkdir(parents=True, exist_ok=True)
        for name in ("shared", "pool", "own"):  # three datasets over three files: a budget each
            (workdir / p / f"{name}.csv").write_text(f"raise\n{1000 * (i + 1)}\n")
        table = (
            'path = "{name}.csv"\nepsilon = 3.0\ndelta = 1e-6\n'
            "[datasets.{name}.columns.raise]\nlower = 0\nupper = 5000\n"
        )
        out[p] = (
            "[datasets.shared]\n"
            + table.format(name="shared")
            + "[datasets.shared.coordinator_shares]\nanalyst = 0.5\nmallory = 0.5\n"
            + "[datasets.pool]\n"
            + table.format(name="pool")
            + "[datasets.own]\n"
            + table.format(name="own")
            + "[datasets.own.coordinator_shares]\nanalyst = 0.5\nmallory = 0.25\n"
        )
    return out


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("reservations")
    fed = launch(
        workdir=workdir,
        datasets_toml=_datasets(workdir),
        other_coordinators=["mallory"],
        deadline_s=20,
    )
    try:
        yield fed
    finally:
        fed.stop()


def _clients(net: LocalFederation, coordinator: str) -> list[GrpcPartyClient]:
    return coordinator_clients(net.federation_config, net.workdir, coordinator, deadline_s=20)


def _spec(dataset: str, epsilon: str, query_id: str) -> QuerySpec:
    return QuerySpec(
        query_id=query_id,
        dataset=dataset,
        column="raise",
        statistic=Statistic.SUM,
        mechanism="discrete-laplace",
        epsilon=epsilon,
        parties=PARTIES,
        lower=0,
        upper=5000,
        frac_bits=8,
    )


def _hold(clients: list[GrpcPartyClient], spec: QuerySpec) -> list[str]:
    """Propose ``spec`` at every party and never contribute: what each party answered."""
    answers = []
    for c in clients:
        try:
            c.propose(session_id=secrets.token_bytes(SESSION_ID_BYTES), spec=spec)
            answers.append("accepted")
        except PartyError as exc:
            answers.append(f"{exc.code}: {exc}")
    return answers


def test_a_coordinator_cannot_lock_the_others_out_of_their_share(net: LocalFederation) -> None:
    mallory, analyst = _clients(net, "mallory"), _clients(net, "analyst")
    # mallory reserves its whole share (half of 3) at every party, and never contributes
    assert _hold(mallory, _spec("shared", "1.5", "grab")) == ["accepted"] * 3
    # ... and can reserve nothing beyond it
    beyond = _hold(mallory, _spec("shared", "0.25", "more"))
    assert all(a.startswith("RESOURCE_EXHAUSTED") and "share" in a for a in beyond), beyond
    # the analyst's query runs within its own share, with mallory's query id: the ids are
    # one namespace per coordinator, so mallory neither burnt nor took it
    out = run_round(spec=_spec("shared", "1", "grab"), clients=analyst)
    assert out.budget_remaining == pytest.approx({p: 2.0 for p in PARTIES})


def test_a_refusal_caused_by_another_coordinators_reservation_says_so(
    net: LocalFederation,
) -> None:
    mallory, analyst = _clients(net, "mallory"), _clients(net, "analyst")
    assert _hold(mallory, _spec("pool", "3", "all-of-it")) == ["accepted"] * 3
    with pytest.raises((RoundAborted, PartyError)) as info:
        run_round(spec=_spec("pool", "0.5", "mine"), clients=analyst)
    text = str(info.value) + str(getattr(info.value, "cause", ""))
    assert "other coordinators' reservations" in text, text
    assert "mallory" not in text  # the other coordinator is never named
    assert isinstance(info.value, MpcdpError)


def _own(client: GrpcPartyClient, dataset: str) -> tuple[float, float, float]:
    """(remaining_epsilon, coordinator_share, coordinator_remaining_epsilon) of ``dataset``
    in the caller's Describe."""
    info = next(d for d in client.describe().datasets if d.name == dataset)
    return info.remaining_epsilon, info.coordinator_share, info.coordinator_remaining_epsilon


def test_describe_tells_each_coordinator_what_it_may_still_spend(net: LocalFederation) -> None:
    mallory, analyst = _clients(net, "mallory"), _clients(net, "analyst")
    assert _own(analyst[0], "own") == (3.0, 0.5, 1.5)
    assert _own(mallory[0], "own") == (3.0, 0.25, 0.75)
    # mallory holds 0.5 of its 0.75 reserved: its own remainder says so; the analyst's
    # Describe does not change (another coordinator's reservations are not revealed)
    assert _hold(mallory, _spec("own", "0.5", "held")) == ["accepted"] * 3
    assert _own(mallory[0], "own") == pytest.approx((3.0, 0.25, 0.25))
    assert _own(analyst[0], "own") == (3.0, 0.5, 1.5)
    # the analyst spends 1 of its 1.5
    out = run_round(spec=_spec("own", "1", "spend"), clients=analyst)
    assert out.budget_remaining == pytest.approx({p: 2.0 for p in PARTIES})
    for c in analyst:
        assert _own(c, "own") == pytest.approx((2.0, 0.5, 0.5))
    # without a share: whatever the dataset has left after charges and its own reservations
    remaining, share, mine = _own(analyst[0], "pool")
    assert share == 0.0 and mine == remaining
