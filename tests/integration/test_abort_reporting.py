"""A failed round: every party is told at once, a time-out is not called a refusal, and the
error says exactly which parties charged their ledger (real mTLS gRPC nodes on loopback)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mpcdp.config.party_config import load_federation_config
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import PartyError, RoundAborted
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.query.round_coordinator import ContributionStream, abort_all, run_round
from mpcdp.transport import tls
from mpcdp.transport.client import DEFAULT_ABORT_DEADLINE_S, GrpcPartyClient
from tests.conftest import PARTIES, Net, build_net, stop_process


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
    abort_deadline_s: float = DEFAULT_ABORT_DEADLINE_S,
) -> list[GrpcPartyClient]:
    cfg = load_federation_config(federation)
    creds = tls.load_credentials(cfg.tls)
    special = special or {}
    return [
        special.get(p.id)
        or GrpcPartyClient(
            party_id=p.id,
            address=p.address,
            creds=creds,
            deadline_s=deadline_s,
            abort_deadline_s=abort_deadline_s,
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


class _Busy:
    """A party busy with the coordinator's other short calls for its first ``busy`` asks."""

    def __init__(self, busy: int) -> None:
        self.party_id, self.busy, self.asked = "alice", busy, 0

    def abort(self, *, session_id: bytes, reason: str) -> None:
        self.asked += 1
        if self.asked <= self.busy:
            raise PartyError("alice", "RESOURCE_EXHAUSTED", "16 short calls already running")


def test_an_abort_refused_for_capacity_is_sent_again() -> None:
    """An abort gives a reservation back, so a party that refuses it only because this
    coordinator's other short calls fill its allowance is asked again; other refusals are
    reported at once, and a party busy every time is reported after the last try."""
    busy = _Busy(2)
    assert abort_all([busy], session_id=b"s" * 16, reason="t") == {"alice": None}
    assert busy.asked == 3
    always = _Busy(100)
    outcome = abort_all([always], session_id=b"s" * 16, reason="t")["alice"]
    assert outcome is not None and "RESOURCE_EXHAUSTED" in outcome and always.asked == 5


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
        stop_process(table_net.processes[p])  # alive, but never answers
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
    assert "nothing was charged" in text
    assert "the abort did not reach: bob (it gave no answer in time" in text
    assert info.value.abort_failures.keys() == set(stopped)


# -- what was charged where ---------------------------------------------------------------------


class _Reporting(GrpcPartyClient):
    """Signals once its party's upload header (so its charge) has arrived."""

    def __init__(self, arrived: threading.Event, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.arrived = arrived

    def contribute(
        self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
    ) -> ContributionStream:
        stream = super().contribute(session_id=session_id, keys=keys, ring_bits=ring_bits)
        self.arrived.set()
        return stream


class _Last(GrpcPartyClient):
    """Contributes only after the others' headers arrived, first running ``before``."""

    def __init__(self, others: Sequence[threading.Event], before: object, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.others, self.before = others, before

    def contribute(
        self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
    ) -> ContributionStream:
        for e in self.others:
            assert e.wait(30)
        self.before()  # type: ignore[operator]
        return super().contribute(session_id=session_id, keys=keys, ring_bits=ring_bits)


def _round_with_carlos_last(net: Net, *, before: object, chunk_bytes: int = 0) -> RoundAborted:
    cfg = load_federation_config(net.federation)
    creds = tls.load_credentials(cfg.tls)
    addr = {p.id: p.address for p in cfg.parties}
    arrived = {p: threading.Event() for p in ("alice", "bob")}
    special: dict[str, GrpcPartyClient] = {
        p: _Reporting(arrived[p], party_id=p, address=addr[p], creds=creds, deadline_s=20)
        for p in arrived
    }
    special["carlos"] = _Last(
        list(arrived.values()),
        before,
        party_id="carlos",
        address=addr["carlos"],
        creds=creds,
        deadline_s=20,
        chunk_bytes=chunk_bytes,
    )
    with pytest.raises(RoundAborted) as info:
        run_round(spec=_spec(), clients=_clients(net.federation, special=special))
    return info.value


def test_round_aborted_at_contribute_says_who_charged_and_who_refused(tmp_path: Path) -> None:
    net = build_net(tmp_path)
    try:
        # carlos refuses its Contribute (a chunk size it does not accept) after alice and
        # bob have charged and sent their headers
        err = _round_with_carlos_last(net, before=lambda: None, chunk_bytes=3)
        assert isinstance(err.cause, PartyError) and err.cause.party == "carlos"
        assert err.cause.code == "INVALID_ARGUMENT"
        eps = _spec().epsilon  # as each party reports it in its header
        assert f"charged: alice (epsilon={eps}), bob (epsilon={eps}); not charged: carlos" in str(
            err
        )
        assert err.charged == {"alice": eps, "bob": eps} and err.not_charged == ("carlos",)
        # ...and the ledgers agree
        assert {p: n.ledger.status("raises").queries for p, n in net.nodes.items()} == {
            "alice": 1,
            "bob": 1,
            "carlos": 0,
        }
    finally:
        net.stop()


def test_round_aborted_by_a_party_gone_at_contribute_says_its_charge_is_unknown(
    tmp_path: Path,
) -> None:
    net = build_net(tmp_path)
    try:
        err = _round_with_carlos_last(net, before=lambda: net.nodes["carlos"].stop(0))
        assert isinstance(err.cause, PartyError) and err.cause.code == "UNAVAILABLE"
        assert str(err.cause).startswith("party 'carlos' is unreachable at 127.0.0.1:")
        text = str(err)
        eps = _spec().epsilon
        assert f"charged: alice (epsilon={eps}), bob (epsilon={eps})" in text
        assert "not known whether charged (no answer; see the party's ledger): carlos" in text
        assert err.unknown == ("carlos",)
        assert "nothing was charged" not in text
        with BudgetLedger(net.nodes["carlos"].config.ledger) as ledger:
            assert ledger.status("raises").queries == 0
    finally:
        for p in ("alice", "bob"):
            net.nodes[p].stop(0)


def test_round_aborted_before_contribute_says_nothing_was_charged(tmp_path: Path) -> None:
    net = build_net(tmp_path, budgets={"alice": 3.0, "bob": 0.1, "carlos": 3.0})
    try:
        with pytest.raises(RoundAborted) as info:
            run_round(spec=_spec(), clients=_clients(net.federation))
        cause = info.value.cause
        assert isinstance(cause, PartyError) and cause.code == "RESOURCE_EXHAUSTED"
        assert str(info.value).endswith("; nothing was charged")
        assert info.value.charged == {}
        for node in net.nodes.values():
            assert node.ledger.status("raises").queries == 0
    finally:
        net.stop()
