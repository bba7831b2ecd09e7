"""Warm query rounds without a network: pre-published keys, one call per party.

Every refusal of a key (replayed, unknown, expired, foreign, of two batches or two slots)
must come before anything is charged, and a key must serve one round only, also when two
calls race for it.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from mpcdp.errors import (
    AuthError,
    BudgetExceededError,
    ParameterError,
    PartyError,
    PolicyError,
    ProtocolError,
    SessionError,
)
from mpcdp.mpc import prg
from mpcdp.protocol.identity import Prekey, SignedKey
from mpcdp.protocol.query.party_engine import PartyEngine
from mpcdp.protocol.query.query_spec import QuerySpec
from mpcdp.protocol.query.round_coordinator import (
    ContributionStream,
    WarmKeys,
    run_query,
    run_round,
)
from mpcdp.protocol.session import PrekeyStore, Proposal
from tests.conftest import PARTIES, ROWS, Net, build_net
from tests.unit.protocol.test_query_protocol import spec

EXACT_SUM = sum(sum(r) for r in ROWS.values())


class Clock:
    """Unix seconds that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class WarmDirect:
    """A PartyClient with warm rounds that calls a PartyEngine in-process; counts calls."""

    def __init__(self, engine: PartyEngine, coordinator: str = "analyst") -> None:
        self.engine, self.coordinator = engine, coordinator
        self.calls: list[str] = []
        self.seen: list[list[Prekey]] = []
        self.fail_warm: Exception | None = None

    @property
    def party_id(self) -> str:
        return self.engine.party_id

    def _stream(self, c: object) -> ContributionStream:
        from mpcdp.protocol.session import Contribution

        assert isinstance(c, Contribution)

        def chunks() -> Iterator[np.ndarray]:
            for seg in c.chunks(5):
                yield seg.copy()

        return ContributionStream(
            c.party_id, c.length, c.epsilon_spent, c.budget_remaining, chunks()
        )

    def propose(self, *, session_id: bytes, spec: QuerySpec) -> Proposal:
        self.calls.append("propose")
        return self.engine.propose(session_id=session_id, spec=spec, coordinator=self.coordinator)

    def contribute(
        self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
    ) -> ContributionStream:
        self.calls.append("contribute")
        return self._stream(
            self.engine.contribute(session_id=session_id, keys=keys, coordinator=self.coordinator)
        )

    def abort(self, *, session_id: bytes, reason: str) -> None:
        self.engine.abort(session_id=session_id, coordinator=self.coordinator)

    def prekeys(self, *, batch_id: bytes, count: int, ttl_s: int) -> list[Prekey]:
        self.calls.append("prekeys")
        return self.engine.publish_keys(
            coordinator=self.coordinator, batch_id=batch_id, count=count, ttl_s=ttl_s
        )

    def contribute_warm(
        self, *, session_id: bytes, spec: QuerySpec, keys: Sequence[Prekey], ring_bits: int = 64
    ) -> ContributionStream:
        self.calls.append("warm")
        self.seen.append(list(keys))
        if self.fail_warm is not None:
            raise self.fail_warm
        return self._stream(
            self.engine.contribute_warm(
                session_id=session_id, spec=spec, keys=keys, coordinator=self.coordinator
            )
        )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engines(tmp_path: Path, clock: Clock) -> Iterator[dict[str, PartyEngine]]:
    """Each party's query engine on its node's identity and data, on a hand-moved clock."""
    net: Net = build_net(tmp_path, start=False)
    out = {
        p: PartyEngine(
            node.engine.party,
            datasets=node.engine.datasets,
            wall=clock,
            max_prekeys_per_coordinator=8,
        )
        for p, node in net.nodes.items()
    }
    try:
        yield out
    finally:
        for e in out.values():
            e.close()
        net.stop()


def _queries(engine: PartyEngine) -> int:
    return engine.ledger.status("raises").queries


def _batch(engines: dict[str, PartyEngine], count: int = 4, *, coordinator: str = "analyst",
           ttl_s: float = 600) -> tuple[bytes, dict[str, list[Prekey]]]:  # fmt: skip
    batch_id = secrets.token_bytes(16)
    return batch_id, {
        p: e.publish_keys(coordinator=coordinator, batch_id=batch_id, count=count, ttl_s=ttl_s)
        for p, e in engines.items()
    }


def _slot(keys: dict[str, list[Prekey]], i: int) -> list[Prekey]:
    return [keys[p][i] for p in PARTIES]


def _warm(engine: PartyEngine, s: QuerySpec, keys: Sequence[Prekey], **kw: str) -> None:
    c = engine.contribute_warm(
        session_id=secrets.token_bytes(16), spec=s, keys=keys, coordinator=kw.get("as", "analyst")
    )
    c.masked()


def test_a_warm_round_is_one_call_per_party_and_sums_exactly(
    engines: dict[str, PartyEngine],
) -> None:
    clients = [WarmDirect(e) for e in engines.values()]
    ring = WarmKeys(batch_size=2)
    # no keys yet: the two-round-trip round
    out = run_round(spec=spec(mechanism="none", epsilon="0"), clients=clients, prekeys=ring)
    assert out.tensors["sum"][0] == pytest.approx(EXACT_SUM, abs=0.01)
    assert all(c.calls == ["propose", "contribute"] for c in clients)
    assert ring.refill(clients) == 3
    for c in clients:
        c.calls.clear()
    out = run_round(spec=spec(mechanism="none", epsilon="0"), clients=clients, prekeys=ring)
    assert out.tensors["sum"][0] == pytest.approx(EXACT_SUM, abs=0.01)
    assert all(c.calls == ["warm"] for c in clients)
    # a noisy warm round charges each party once, as a cold one does
    before = {p: _queries(e) for p, e in engines.items()}
    run_round(spec=spec(), clients=clients, prekeys=ring)
    assert {p: _queries(e) for p, e in engines.items()} == {p: q + 1 for p, q in before.items()}
    # the batch (2 slots) is spent: back to two round trips
    for c in clients:
        c.calls.clear()
    run_round(spec=spec(mechanism="none", epsilon="0"), clients=clients, prekeys=ring)
    assert all(c.calls == ["propose", "contribute"] for c in clients)


def test_a_replayed_key_is_refused_and_charges_nothing(engines: dict[str, PartyEngine]) -> None:
    _, keys = _batch(engines)
    for e in engines.values():
        _warm(e, spec(query_id="first"), _slot(keys, 0))
    charged = {p: _queries(e) for p, e in engines.items()}
    for e in engines.values():
        with pytest.raises(SessionError, match=r"already used \(replay\); nothing was charged"):
            _warm(e, spec(), _slot(keys, 0))
    assert {p: _queries(e) for p, e in engines.items()} == charged
    assert all(e.ledger.reserved_epsilon("raises") == 0 for e in engines.values())


def test_two_calls_racing_for_one_key_use_it_once(engines: dict[str, PartyEngine]) -> None:
    alice = engines["alice"]
    _, keys = _batch(engines)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        try:
            _warm(alice, spec(), _slot(keys, 1))
            outcomes.append("used")
        except SessionError:
            outcomes.append("refused")

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["used"]
    assert _queries(alice) == 1


def test_keys_of_two_batches_or_two_slots_are_refused(engines: dict[str, PartyEngine]) -> None:
    _, first = _batch(engines)
    _, second = _batch(engines)
    mixed = [first["alice"][0], second["bob"][0], first["carlos"][0]]
    with pytest.raises(ProtocolError, match="of two rounds"):
        _warm(engines["alice"], spec(), mixed)
    slots = [first["alice"][0], first["bob"][1], first["carlos"][0]]
    with pytest.raises(ProtocolError, match="of two rounds"):
        _warm(engines["alice"], spec(), slots)
    assert _queries(engines["alice"]) == 0
    # the refusals came before the key was taken: the slot still serves its round
    for e in engines.values():
        _warm(e, spec(query_id="q-after"), _slot(first, 0))
    assert _queries(engines["alice"]) == 1


def test_an_expired_key_is_refused_by_every_party(
    engines: dict[str, PartyEngine], clock: Clock
) -> None:
    _, keys = _batch(engines, ttl_s=60)
    clock.now += 61
    for e in engines.values():
        with pytest.raises(SessionError, match="expired"):
            _warm(e, spec(), _slot(keys, 0))
        assert _queries(e) == 0
    assert engines["alice"].prekeys.held("analyst") == 0


def test_a_foreign_unknown_or_altered_key_is_refused(engines: dict[str, PartyEngine]) -> None:
    _, theirs = _batch(engines, coordinator="other")
    with pytest.raises(AuthError, match="signed for coordinator 'other', not 'analyst'"):
        _warm(engines["alice"], spec(), _slot(theirs, 0))
    _, keys = _batch(engines)
    forged = _slot(keys, 0)
    forged[1] = dataclasses.replace(forged[1], public_key=prg.public_bytes(prg.generate_keypair()))
    with pytest.raises(ProtocolError, match="pre-published key of 'bob' does not verify"):
        _warm(engines["alice"], spec(), forged)
    # a slot alice never signed, relayed with her name: its signature cannot verify
    unknown = [dataclasses.replace(k, index=7) for k in _slot(keys, 0)]
    with pytest.raises(ProtocolError, match="does not verify"):
        _warm(engines["alice"], spec(), unknown)
    # alice's own key for another coordinator, presented to her as if it were hers here
    with pytest.raises(AuthError):
        _warm(engines["alice"], spec(), _slot(theirs, 1), **{"as": "analyst"})
    assert all(_queries(e) == 0 for e in engines.values())


def test_a_key_the_party_no_longer_holds_is_unknown(
    engines: dict[str, PartyEngine], clock: Clock
) -> None:
    _, keys = _batch(engines)
    restarted = PartyEngine(engines["alice"].party, datasets=engines["alice"].datasets, wall=clock)
    try:
        with pytest.raises(SessionError, match="unknown pre-published key"):
            _warm(restarted, spec(), _slot(keys, 0))
    finally:
        restarted.close()
    assert _queries(engines["alice"]) == 0


def test_the_spec_is_checked_as_propose_checks_it(engines: dict[str, PartyEngine]) -> None:
    _, keys = _batch(engines)
    with pytest.raises(PolicyError, match="unknown column 'bonus'"):
        _warm(engines["alice"], spec(column="bonus"), _slot(keys, 0))
    with pytest.raises(BudgetExceededError):
        _warm(engines["alice"], spec(epsilon="5"), _slot(keys, 1))
    assert _queries(engines["alice"]) == 0
    assert engines["alice"].ledger.reserved_epsilon("raises") == 0


def test_publishing_is_bounded_and_checked(engines: dict[str, PartyEngine]) -> None:
    alice = engines["alice"]  # at most 8 keys per coordinator in this fixture
    sid = secrets.token_bytes(16)
    for name, kw in [
        ("count", dict(batch_id=sid, count=0, ttl_s=60)),
        ("count", dict(batch_id=sid, count=9, ttl_s=60)),
        ("ttl_s", dict(batch_id=sid, count=1, ttl_s=0)),
        ("ttl_s", dict(batch_id=sid, count=1, ttl_s=3601)),
        ("batch_id", dict(batch_id=b"short", count=1, ttl_s=60)),
    ]:
        with pytest.raises(ParameterError) as info:
            alice.publish_keys(coordinator="analyst", **kw)  # type: ignore[arg-type]
        assert info.value.name == name
    first = alice.publish_keys(coordinator="analyst", batch_id=sid, count=6, ttl_s=60)
    with pytest.raises(SessionError, match="already published"):
        alice.publish_keys(coordinator="analyst", batch_id=sid, count=1, ttl_s=60)
    alice.publish_keys(coordinator="analyst", batch_id=secrets.token_bytes(16), count=6, ttl_s=60)
    assert alice.prekeys.held("analyst") == 8  # the 4 oldest made room
    assert alice.prekeys.held("other") == 0
    with pytest.raises(SessionError, match="replaced by a newer batch"):
        alice.prekeys.take(coordinator="analyst", batch_id=sid, index=first[0].index)
    with pytest.raises(ParameterError, match="max_per_coordinator"):
        PrekeyStore(alice.party, max_per_coordinator=0)


def test_warm_keys_parameters_are_checked() -> None:
    for kw, name in [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=65), "batch_size"),
        (dict(ttl_s=0), "ttl_s"),
        (dict(ttl_s=10, margin_s=10), "margin_s"),
    ]:
        with pytest.raises(ParameterError) as info:
            WarmKeys(**kw)  # type: ignore[arg-type]
        assert info.value.name == name


def test_a_re_run_after_a_failed_warm_round_uses_fresh_keys(
    engines: dict[str, PartyEngine],
) -> None:
    clients = [WarmDirect(e) for e in engines.values()]
    ring = WarmKeys(batch_size=4)
    ring.refill(clients)
    clients[2].fail_warm = PartyError("carlos", "UNAVAILABLE", "down", outcome="is unreachable")
    out = run_query(spec=spec(), clients=clients, min_parties=2, prekeys=ring)
    assert out.spec.parties == ("alice", "bob")
    first, second = clients[0].seen
    assert {k.public_key for k in first}.isdisjoint(k.public_key for k in second)
    assert first[0].index != second[0].index


def test_a_refused_key_keeps_its_party_and_the_query_runs_cold(
    engines: dict[str, PartyEngine], clock: Clock
) -> None:
    clients = [WarmDirect(e) for e in engines.values()]
    ring = WarmKeys(batch_size=4)
    ring.refill(clients)
    # carlos restarts: his keys are gone
    carlos = engines["carlos"]
    clients[2] = WarmDirect(PartyEngine(carlos.party, datasets=carlos.datasets, wall=clock))
    try:
        out = run_query(spec=spec(), clients=clients, min_parties=2, prekeys=ring)
        assert out.spec.parties == PARTIES
        assert clients[2].calls[:3] == ["warm", "propose", "contribute"]
        assert out.attempts and out.attempts[0].failed == {}
    finally:
        clients[2].engine.close()


def test_a_warm_charge_counts_the_reservations_in_flight(engines: dict[str, PartyEngine]) -> None:
    alice = engines["alice"]  # budget 3
    alice.propose(session_id=secrets.token_bytes(16), spec=spec(epsilon="2"), coordinator="other")
    _, keys = _batch(engines)
    with pytest.raises(BudgetExceededError):
        _warm(alice, spec(epsilon="1.5"), _slot(keys, 0))
    assert _queries(alice) == 0
    _warm(alice, spec(epsilon="1"), _slot(keys, 1))
    assert _queries(alice) == 1


def test_a_slot_close_to_its_expiry_is_not_handed_out(
    engines: dict[str, PartyEngine], clock: Clock
) -> None:
    clients = [WarmDirect(e) for e in engines.values()]
    ring = WarmKeys(batch_size=4, ttl_s=100, margin_s=30, clock=clock)
    ring.refill(clients)
    assert ring.slots_left(PARTIES) == 4
    first = ring.take(PARTIES)
    assert first is not None and ring.take(PARTIES) != first  # each slot once
    assert ring.take(("alice", "bob", "dave")) is None  # no keys of dave
    clock.now += 71  # 29 s left: a round might arrive after the expiry
    assert ring.take(PARTIES) is None and ring.slots_left(PARTIES) == 0
