"""A failed round: every party is told at once, and a time-out is not called a refusal (real
party processes on loopback)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpcdp.config import load_federation_config
from mpcdp.errors import PartyError, RoundAborted
from mpcdp.localnet import LocalFederation, launch
from mpcdp.protocol.coordinator import abort_all, run_round
from mpcdp.protocol.spec import QuerySpec, Statistic
from mpcdp.transport import tls
from mpcdp.transport.client import GrpcPartyClient
from tests.conftest import PARTIES


def _spec(query_id: str = "q-1") -> QuerySpec:
    return QuerySpec(
        query_id=query_id,
        dataset="raises",
        column="raise",
        statistic=Statistic.SUM,
        mechanism="discrete-laplace",
        epsilon="0.5",
        parties=PARTIES,
        lower=0,
        upper=5000,
        frac_bits=8,
    )


def _clients(
    federation: Path,
    *,
    deadline_s: float = 20,
    special: dict[str, GrpcPartyClient] | None = None,
    **kw: float,
) -> list[GrpcPartyClient]:
    cfg = load_federation_config(federation)
    creds = tls.load_credentials(cfg.tls)
    special = special or {}
    return [
        special.get(p.id)
        or GrpcPartyClient(
            party_id=p.id, address=p.address, creds=creds, deadline_s=deadline_s, **kw
        )
        for p in cfg.parties
    ]


# -- abort_all ----------------------------------------------------------------------------------


class _Fake:
    def __init__(self, party_id: str, barrier: threading.Barrier, fail: bool = False) -> None:
        self.party_id, self._barrier, self._fail = party_id, barrier, fail

    def abort(self, *, session_id: bytes, reason: str) -> None:
        self._barrier.wait()  # passes only when every party is being asked at the same time
        if self._fail:
            raise PartyError(self.party_id, "DEADLINE_EXCEEDED", "x", outcome="did not answer")


def test_abort_all_asks_every_party_at_once_and_reports_each() -> None:
    barrier = threading.Barrier(3, timeout=10)
    clients = [_Fake("alice", barrier), _Fake("bob", barrier), _Fake("carlos", barrier, True)]
    outcomes = abort_all(clients, session_id=b"s" * 16, reason="test")
    assert outcomes == {
        "alice": None,
        "bob": None,
        "carlos": "party 'carlos' did not answer (DEADLINE_EXCEEDED): x",
    }


# -- a party that never answers -------------------------------------------------------------------


@pytest.fixture
def table_net(tmp_path: Path) -> Iterator[LocalFederation]:
    datasets = {}
    for i, p in enumerate(PARTIES):
        (tmp_path / p).mkdir(parents=True, exist_ok=True)
        (tmp_path / p / "raises.csv").write_text(f"raise\n{1000 * (i + 1)}\n")
        datasets[p] = (
            '[datasets.raises]\npath = "raises.csv"\nepsilon = 3.0\ndelta = 1e-6\n'
            "[datasets.raises.columns.raise]\nlower = 0\nupper = 5000\n"
        )
    net = launch(workdir=tmp_path, datasets_toml=datasets, deadline_s=10)
    try:
        yield net
    finally:
        net.stop()


@pytest.mark.slow
def test_parties_that_never_answer_cost_one_deadline_not_two(table_net: LocalFederation) -> None:
    deadline = 4.0
    stopped = ("bob", "carlos")
    for p in stopped:
        table_net.processes[p].send_signal(signal.SIGSTOP)  # alive, but never answers
    try:
        clients = _clients(table_net.federation_config, deadline_s=deadline, abort_deadline_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(RoundAborted) as info:
            run_round(spec=_spec(), clients=clients)
        elapsed = time.monotonic() - t0
    finally:
        for p in stopped:
            table_net.processes[p].send_signal(signal.SIGCONT)
    # the round's deadline, then one short abort for every party at once (before: the round's
    # deadline again for each stopped party, one after the other)
    assert elapsed < 2 * deadline
    cause = info.value.cause
    assert isinstance(cause, PartyError) and cause.code == "DEADLINE_EXCEEDED"
    assert cause.party in stopped
    assert f"did not answer within {deadline:g} s" in str(cause)
    text = str(info.value)
    assert "refused" not in text
    assert "the abort did not reach: bob (party 'bob' did not answer within 1 s" in text
    assert info.value.abort_failures.keys() == set(stopped)
