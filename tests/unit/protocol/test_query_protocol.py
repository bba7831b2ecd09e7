"""The round protocol without a network: party engines and the coordinator, called directly."""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mpcdp.errors import (
    AuthError,
    BudgetExceededError,
    HeadroomError,
    LedgerError,
    ParameterError,
    PolicyError,
    ProtocolError,
    RoundAborted,
    SessionError,
)
from mpcdp.mpc import encoding, prg
from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.query.party_engine import PartyEngine
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic, digest
from mpcdp.protocol.query.round_coordinator import ContributionStream, run_round
from mpcdp.protocol.session import Proposal, SessionSlots
from tests.conftest import PARTIES, ROWS, Net, build_net, vector_datasets
from tests.stats import assert_uniform_words


class Direct:
    """A PartyClient that calls a PartyEngine in-process (the in-memory transport)."""

    def __init__(self, engine: PartyEngine, coordinator: str = "analyst") -> None:
        self.engine, self.coordinator = engine, coordinator

    @property
    def party_id(self) -> str:
        return self.engine.party_id

    def propose(self, *, session_id: bytes, spec: QuerySpec) -> Proposal:
        return self.engine.propose(session_id=session_id, spec=spec, coordinator=self.coordinator)

    def contribute(
        self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
    ) -> ContributionStream:
        c = self.engine.contribute(session_id=session_id, keys=keys, coordinator=self.coordinator)

        def chunks() -> Iterator[np.ndarray]:
            for seg in c.chunks(7):
                yield seg.copy()

        return ContributionStream(
            c.party_id, c.length, c.epsilon_spent, c.budget_remaining, chunks()
        )

    def abort(self, *, session_id: bytes, reason: str) -> None:
        self.engine.abort(session_id=session_id, coordinator=self.coordinator)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[dict[str, PartyEngine]]:
    n: Net = build_net(tmp_path, start=False)
    try:
        yield {p: node.engine for p, node in n.nodes.items()}
    finally:
        n.stop()


def spec(**kw: object) -> QuerySpec:
    base: dict[str, object] = dict(
        query_id=f"q-{secrets.token_hex(4)}",
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
    base.update(kw)
    return QuerySpec(**base)  # type: ignore[arg-type]


def test_round_over_the_in_memory_transport(engines: dict[str, PartyEngine]) -> None:
    out = run_round(
        spec=spec(mechanism="none", epsilon="0"), clients=[Direct(e) for e in engines.values()]
    )
    assert out.tensors["sum"][0] == pytest.approx(sum(sum(r) for r in ROWS.values()), abs=0.01)


def _propose_all(engines: dict[str, PartyEngine], s: QuerySpec, sid: bytes) -> list[SignedKey]:
    return [
        engines[p].propose(session_id=sid, spec=s, coordinator="analyst").key for p in s.parties
    ]


def test_coordinator_that_shows_parties_different_queries_is_caught(
    engines: dict[str, PartyEngine],
) -> None:
    sid = secrets.token_bytes(16)
    honest = spec()
    other = dataclasses.replace(honest, epsilon="1")
    keys = [engines["alice"].propose(session_id=sid, spec=honest, coordinator="analyst").key]
    keys += [
        engines[p].propose(session_id=sid, spec=other, coordinator="analyst").key
        for p in ("bob", "carlos")
    ]
    with pytest.raises(ProtocolError, match="does not verify"):
        engines["alice"].contribute(session_id=sid, keys=keys, coordinator="analyst")
    assert engines["alice"].ledger.status("raises").queries == 0


def test_substituted_ephemeral_key_is_caught(engines: dict[str, PartyEngine]) -> None:
    sid = secrets.token_bytes(16)
    keys = _propose_all(engines, spec(), sid)
    evil = prg.public_bytes(prg.generate_keypair())
    keys[1] = dataclasses.replace(keys[1], public_key=evil)  # the coordinator's own key for bob
    with pytest.raises(ProtocolError, match="signed key of 'bob' does not verify"):
        engines["alice"].contribute(session_id=sid, keys=keys, coordinator="analyst")
    # a key signed by bob but presented as carlos'
    keys = _propose_all(engines, spec(), sid2 := secrets.token_bytes(16))
    keys[2] = dataclasses.replace(keys[1], party_id="carlos")
    with pytest.raises(AuthError, match="certificate is 'bob'"):
        engines["alice"].contribute(session_id=sid2, keys=keys, coordinator="analyst")


def test_missing_or_extra_keys(engines: dict[str, PartyEngine]) -> None:
    sid = secrets.token_bytes(16)
    keys = _propose_all(engines, spec(), sid)
    with pytest.raises(ProtocolError, match=r"missing \['carlos'\]"):
        engines["alice"].contribute(session_id=sid, keys=keys[:2], coordinator="analyst")


def test_replayed_foreign_and_expired_sessions(engines: dict[str, PartyEngine]) -> None:
    alice = engines["alice"]
    sid = secrets.token_bytes(16)
    keys = _propose_all(engines, spec(), sid)
    with pytest.raises(SessionError, match="belongs to coordinator 'analyst', not 'other'"):
        alice.contribute(session_id=sid, keys=keys, coordinator="other")
    # the foreign attempt does not burn the session for its owner; then a replay is refused
    alice.contribute(session_id=sid, keys=keys, coordinator="analyst")
    with pytest.raises(SessionError, match="already used"):
        alice.contribute(session_id=sid, keys=keys, coordinator="analyst")
    with pytest.raises(SessionError, match="already used"):
        alice.propose(session_id=sid, spec=spec(), coordinator="analyst")
    with pytest.raises(SessionError, match="unknown or expired"):
        alice.contribute(session_id=secrets.token_bytes(16), keys=keys, coordinator="analyst")


def test_session_expiry(engines: dict[str, PartyEngine]) -> None:
    alice = engines["alice"]
    now = [0.0]
    alice._clock = lambda: now[0]  # type: ignore[method-assign]
    sid = secrets.token_bytes(16)
    keys = _propose_all(engines, spec(), sid)
    now[0] = 10_000.0
    with pytest.raises(SessionError, match="is closed \\(expired\\)"):
        alice.contribute(session_id=sid, keys=keys, coordinator="analyst")


def test_a_query_id_is_answered_once(engines: dict[str, PartyEngine]) -> None:
    s = spec()
    run_round(spec=s, clients=[Direct(e) for e in engines.values()])
    with pytest.raises(RoundAborted) as info:
        run_round(spec=s, clients=[Direct(e) for e in engines.values()])
    assert isinstance(info.value.cause, LedgerError) and "already answered" in str(info.value.cause)


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        (dict(dataset="salaries"), PolicyError, "unknown dataset 'salaries'"),
        (dict(column="bonus"), PolicyError, "unknown column 'bonus'"),
        (dict(upper=6000.0), PolicyError, "differ from the declared [0, 5000]"),
        (
            dict(statistic=Statistic.HISTOGRAM, column="dept", categories=("eng",)),
            PolicyError,
            "categories",
        ),
        (dict(statistic=Statistic.SUM, column="dept"), PolicyError, "categorical"),
        (dict(epsilon="5"), BudgetExceededError, "budget exceeded"),
        (dict(frac_bits=20, max_rows=10**9), HeadroomError, "overflow the ring"),
        (dict(frac_bits=40, max_rows=10**9), ParameterError, "exact range"),
    ],
)
def test_policy_refusals(
    engines: dict[str, PartyEngine], change: dict[str, object], error: type, needle: str
) -> None:
    with pytest.raises(error) as info:
        engines["alice"].propose(
            session_id=secrets.token_bytes(16), spec=spec(**change), coordinator="analyst"
        )
    assert needle in str(info.value)
    assert engines["alice"].ledger.status("raises").queries == 0


def test_max_epsilon_per_query(tmp_path: Path) -> None:
    n = build_net(tmp_path, start=False, cap={"alice": 0.2})
    try:
        with pytest.raises(PolicyError, match=r"exceeds max_epsilon_per_query=0\.2"):
            n.nodes["alice"].engine.propose(
                session_id=secrets.token_bytes(16), spec=spec(epsilon="0.3"), coordinator="analyst"
            )
    finally:
        n.stop()


def test_what_the_coordinator_receives_from_a_party_is_uniform(tmp_path: Path) -> None:
    zeros = np.zeros(1 << 16)
    extra = vector_datasets(tmp_path, "z", dict.fromkeys(PARTIES, zeros), epsilon=50.0)
    n = build_net(tmp_path, start=False, extra=extra)
    try:
        engines = {p: node.engine for p, node in n.nodes.items()}
        for mechanism, eps in (("none", "0"), ("skellam", "1")):
            s = spec(
                dataset="z",
                column="",
                mechanism=mechanism,
                epsilon=eps,
                delta=1e-6 if eps != "0" else 0.0,
                l2_bound=1.0,
                lower=0,
                upper=0,
            )
            sid = secrets.token_bytes(16)
            keys = _propose_all(engines, s, sid)
            for p in PARTIES:
                words = (
                    engines[p].contribute(session_id=sid, keys=keys, coordinator="analyst").masked()
                )
                assert_uniform_words(words)
    finally:
        n.stop()


def test_truncated_or_overlong_streams_abort_the_round(engines: dict[str, PartyEngine]) -> None:
    class Truncating(Direct):
        def contribute(
            self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
        ) -> ContributionStream:
            good = super().contribute(session_id=session_id, keys=keys, ring_bits=ring_bits)
            return dataclasses.replace(good, chunks=iter([]))

    class Overlong(Direct):
        def contribute(
            self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
        ) -> ContributionStream:
            good = super().contribute(session_id=session_id, keys=keys, ring_bits=ring_bits)
            return dataclasses.replace(
                good, chunks=iter([*good.chunks, np.zeros(1, dtype=np.uint64)])
            )

    for cls, needle in ((Truncating, "truncated"), (Overlong, "more than")):
        clients = [Direct(engines["alice"]), Direct(engines["bob"]), cls(engines["carlos"])]
        with pytest.raises(RoundAborted, match=needle):
            run_round(spec=spec(), clients=clients)


def test_spec_validation_and_digest() -> None:
    s = spec()
    assert digest(s) == digest(dataclasses.replace(s))
    assert digest(s) != digest(dataclasses.replace(s, epsilon="0.25"))
    refused: list[tuple[dict[str, object], str]] = [
        (dict(mechanism="laplace"), "mechanism"),
        (dict(parties=("alice",)), "parties"),
        (dict(parties=("alice", "alice")), "parties"),
        (dict(colluders=3), "colluders"),
        (dict(colluders=True), "colluders"),
        (dict(mechanism="skellam"), "delta"),
        (dict(epsilon="-1"), "epsilon"),
        (dict(lower=10.0, upper=1.0), "lower"),
        (dict(statistic=Statistic.HISTOGRAM, categories=()), "categories"),
        (dict(query_id=""), "query_id"),
        (dict(lower=float("nan")), "lower"),
    ]
    for bad, needle in refused:
        with pytest.raises(Exception, match=needle):
            spec(**bad)


def test_max_rows_below_a_row_count_is_clamped_not_refused(
    engines: dict[str, PartyEngine],
) -> None:
    """A refusal would tell the coordinator the row count (a binary search over max_rows
    finds it in ~30 free proposals): every max_rows is accepted alike, and each party's
    aggregate is clamped to the query's public bound instead."""
    alice = engines["alice"]
    for max_rows in (1, 2, 3, 10**9):
        sid = secrets.token_bytes(16)
        prop = alice.propose(
            session_id=sid, spec=spec(statistic=Statistic.COUNT, column="", max_rows=max_rows),
            coordinator="analyst",
        )  # fmt: skip
        assert prop.length == 1
        alice.abort(session_id=sid, coordinator="analyst")
    assert alice.ledger.status("raises").queries == 0  # proposes charge nothing
    clients = [Direct(e) for e in engines.values()]
    count = run_round(
        spec=spec(statistic=Statistic.COUNT, column="", mechanism="none", epsilon="0",
                  max_rows=1),
        clients=clients,
    )  # fmt: skip
    assert count.tensors["count"][0] == 3  # alice's and carlos's 2 rows count as 1 each
    total = run_round(
        spec=spec(mechanism="none", epsilon="0", max_rows=1), clients=clients
    ).tensors["sum"][0]
    assert total == sum(min(sum(r), 5000) for r in ROWS.values())  # each local sum <= 5000


def test_headroom_is_checked_against_all_parties(engines: dict[str, PartyEngine]) -> None:
    with pytest.raises(HeadroomError):
        encoding.check_headroom(n_parties=3, max_abs=5000 * 10**9, frac_bits=30, noise_tail=0)


def test_fit_chooses_the_ring_and_fixed_point() -> None:
    from mpcdp.protocol.query.plan import fit

    vec = spec(
        dataset="v",
        column="",
        mechanism="skellam",
        epsilon="5",
        delta=1e-5,
        l2_bound=1.0,
        lower=0,
        upper=0,
        frac_bits=16,
    )
    auto = fit(vec, vector_length=10**6, frac_bits=None, ring_bits=None)
    assert auto.ring_bits == 32 and 8 <= auto.frac_bits <= 16
    assert fit(vec, vector_length=10**6, frac_bits=None, ring_bits=64).ring_bits == 64
    scalar = fit(spec(), vector_length=None, frac_bits=None, ring_bits=None)
    assert scalar.ring_bits == 64
    # the planner's fixed point: rounding adds <= 1% to the sensitivity, no more bits
    assert auto.frac_bits == 16  # ceil(log2(sqrt(1e6) / 2 / 0.01)) = 16
    assert fit(dataclasses.replace(vec, l2_bound=64.0), vector_length=10**6, frac_bits=None,
               ring_bits=None).frac_bits == 10  # fmt: skip
    # an explicit frac_bits that does not fit 32 bits falls back to 64
    exact = dataclasses.replace(vec, mechanism="none", epsilon="0", delta=0.0)
    assert fit(exact, vector_length=10**6, frac_bits=30, ring_bits=None).ring_bits == 64
    # noise that no fixed point keeps inside the samplers' range is refused with the reason
    with pytest.raises(ParameterError, match="exact range"):
        fit(dataclasses.replace(vec, epsilon="0.001"), vector_length=10**6, frac_bits=None,
            ring_bits=None)  # fmt: skip


def test_round_in_the_32_bit_ring_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)  # test data only
    vecs = {p: rng.normal(size=5000) * 0.001 for p in PARTIES}
    extra = vector_datasets(tmp_path, "w", vecs)
    n = build_net(tmp_path, start=False, extra=extra)
    try:
        s = spec(
            dataset="w",
            column="",
            mechanism="none",
            epsilon="0",
            l2_bound=1.0,
            lower=0,
            upper=0,
            ring_bits=32,
            frac_bits=20,
        )
        out = run_round(spec=s, clients=[Direct(node.engine) for node in n.nodes.values()])
        assert np.allclose(out.tensors["vector"], sum(vecs.values()), atol=3 * 2.0**-20)
    finally:
        n.stop()


def test_a_contribution_is_masked_as_it_is_read_and_read_once(
    engines: dict[str, PartyEngine],
) -> None:
    sid = secrets.token_bytes(16)
    keys = _propose_all(engines, spec(), sid)
    c = engines["alice"].contribute(session_id=sid, keys=keys, coordinator="analyst")
    first = np.concatenate(list(c.chunks(1)))
    assert first.size == c.length == 1
    with pytest.raises(ProtocolError, match="already read"):
        list(c.chunks(1))


def test_two_sessions_of_one_query_get_one_answer(engines: dict[str, PartyEngine]) -> None:
    s = spec()
    sid1, sid2 = secrets.token_bytes(16), secrets.token_bytes(16)
    keys1 = _propose_all(engines, s, sid1)
    with pytest.raises(LedgerError, match="already reserved by a round in flight"):
        engines["alice"].propose(session_id=sid2, spec=s, coordinator="analyst")
    engines["alice"].contribute(session_id=sid1, keys=keys1, coordinator="analyst").masked()
    with pytest.raises(LedgerError, match="already answered"):
        engines["alice"].propose(session_id=sid2, spec=s, coordinator="analyst")
    assert engines["alice"].ledger.status("raises").queries == 1


def test_party_refuses_noise_sized_for_fewer_colluders_than_its_policy(
    engines: dict[str, PartyEngine],
) -> None:
    with pytest.raises(PolicyError, match="colluders=0 is below this party's min_colluders=1"):
        engines["bob"].propose(
            session_id=secrets.token_bytes(16), spec=spec(colluders=0), coordinator="analyst"
        )


def test_pending_sessions_are_bounded_per_coordinator_and_in_total(
    engines: dict[str, PartyEngine],
) -> None:
    alice = engines["alice"]
    alice._slots = SessionSlots(per_coordinator=2, total=3)
    held = [secrets.token_bytes(16) for _ in range(2)]
    for sid in held:
        alice.propose(session_id=sid, spec=spec(), coordinator="analyst")
    with pytest.raises(PolicyError, match="coordinator 'analyst' already has 2 sessions"):
        alice.propose(session_id=secrets.token_bytes(16), spec=spec(), coordinator="analyst")
    # another coordinator is not locked out by the first one's sessions
    alice.propose(session_id=secrets.token_bytes(16), spec=spec(), coordinator="other")
    with pytest.raises(PolicyError, match="3 sessions are already open"):
        alice.propose(session_id=secrets.token_bytes(16), spec=spec(), coordinator="other")
    alice.abort(session_id=held[0], coordinator="analyst")  # an abort frees its slot
    alice.propose(session_id=secrets.token_bytes(16), spec=spec(), coordinator="analyst")


def test_the_pending_bound_is_strict_under_concurrent_proposals(
    engines: dict[str, PartyEngine],
) -> None:
    """300 proposals at once from 3 coordinators' threads: exactly max_pending are accepted
    per coordinator (the bound used to be checked before the session was built, so 17
    of 16 got in)."""
    alice = engines["alice"]
    alice._slots = SessionSlots(per_coordinator=5, total=64)
    accepted: dict[str, int] = {"analyst": 0, "other": 0}
    lock = threading.Lock()

    def one(coordinator: str) -> None:
        try:
            alice.propose(
                session_id=secrets.token_bytes(16),
                spec=spec(epsilon="0.1"),
                coordinator=coordinator,
            )
        except PolicyError:
            return
        with lock:
            accepted[coordinator] += 1

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(one, ["analyst", "other"] * 150))
    assert accepted == {"analyst": 5, "other": 5}


def test_each_party_clips_its_vector_to_the_declared_l2_bound(tmp_path: Path) -> None:
    big = np.full(400, 0.5)  # L2 norm 10 > bound 1
    extra = vector_datasets(tmp_path, "b", dict.fromkeys(PARTIES, big))
    n = build_net(tmp_path, start=False, extra=extra)
    try:
        s = spec(
            dataset="b", column="", mechanism="none", epsilon="0", l2_bound=1.0, lower=0, upper=0
        )
        out = run_round(spec=s, clients=[Direct(node.engine) for node in n.nodes.values()])
        # frac_bits=8: each party rounds each coordinate to the nearest 2^-8
        assert np.allclose(out.tensors["vector"], 3 * big / 10, atol=3 * 2.0**-9)
    finally:
        n.stop()


def test_certificate_cache_checks_ca_and_name(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from mpcdp.errors import AuthError
    from mpcdp.protocol.identity import CertificateCache
    from mpcdp.transport.cert_files import issue, make_ca

    ca_key, ca = make_ca()
    other_key, other_ca = make_ca(name="someone-else")
    _, bob = issue(name="bob", ca_key=ca_key, ca_cert=ca)
    _, evil = issue(name="bob", ca_key=other_key, ca_cert=other_ca)
    cache = CertificateCache(ca=ca)
    der = bob.public_bytes(serialization.Encoding.DER)
    assert cache.get(der, claimed="bob") is cache.get(der, claimed="bob")  # cached
    with pytest.raises(AuthError, match="certificate is 'bob'"):
        cache.get(der, claimed="carlos")  # the cache still checks the name
    with pytest.raises(AuthError, match="not issued by the federation CA"):
        cache.get(evil.public_bytes(serialization.Encoding.DER), claimed="bob")
    with pytest.raises(ProtocolError, match="not DER"):
        cache.get(b"junk", claimed="bob")


def test_closed_sessions_are_remembered_up_to_a_bound() -> None:
    from mpcdp.protocol.session import ClosedSessions

    closed = ClosedSessions(limit=3)
    for i in range(5):
        closed.add(bytes([i]) * 16, f"why {i}")
    assert bytes([0]) * 16 not in closed and closed.get(bytes([1]) * 16) is None
    assert bytes([4]) * 16 in closed and closed.get(bytes([2]) * 16) == "why 2"
    closed.add(bytes([2]) * 16, "again")  # a newer reason replaces the older
    assert closed.get(bytes([2]) * 16) == "again"


def test_rounds_near_the_end_of_a_budget_charge_nobody_when_they_cannot_be_revealed(
    tmp_path: Path,
) -> None:
    """The review's deterministic form: budget 0.15, rounds A and B of 0.1 proposed in
    different orders at different parties. Reservations at Propose make the parties refuse
    the round that no longer fits; neither round can be revealed, so after the aborts nobody
    has been charged and the ledgers agree (before: all three were charged)."""
    n = build_net(tmp_path, start=False, budgets=dict.fromkeys(PARTIES, 0.15))
    try:
        eng = {p: node.engine for p, node in n.nodes.items()}
        a, b = spec(epsilon="0.1"), spec(epsilon="0.1")
        sa, sb = secrets.token_bytes(16), secrets.token_bytes(16)
        for p in ("alice", "bob"):
            eng[p].propose(session_id=sa, spec=a, coordinator="analyst")
        eng["carlos"].propose(session_id=sb, spec=b, coordinator="analyst")
        for p in ("alice", "bob"):
            with pytest.raises(BudgetExceededError, match="reserved by rounds in flight"):
                eng[p].propose(session_id=sb, spec=b, coordinator="analyst")
        with pytest.raises(BudgetExceededError, match="reserved by rounds in flight"):
            eng["carlos"].propose(session_id=sa, spec=a, coordinator="analyst")
        for e in eng.values():  # the coordinator aborts both rounds everywhere
            e.abort(session_id=sa, coordinator="analyst")
            e.abort(session_id=sb, coordinator="analyst")
        for e in eng.values():
            assert e.ledger.status("raises").queries == 0
            assert e.ledger.reserved_epsilon("raises") == 0.0
        # the budget is whole again: a round proposed everywhere in one order is revealed
        out = run_round(spec=spec(epsilon="0.1"), clients=[Direct(e) for e in eng.values()])
        assert set(out.budget_remaining) == set(PARTIES)
        for e in eng.values():
            assert e.ledger.status("raises").pure_epsilon_spent == Fraction(1, 10)
    finally:
        n.stop()


def test_expired_and_failed_sessions_release_their_reservation(
    engines: dict[str, PartyEngine],
) -> None:
    alice = engines["alice"]
    clock = [0.0]
    alice._clock = lambda: clock[0]
    sid = secrets.token_bytes(16)
    alice.propose(session_id=sid, spec=spec(), coordinator="analyst")
    assert alice.ledger.reserved_epsilon("raises") == pytest.approx(0.5)
    clock[0] = 10_000.0  # past the session's ttl: the next call expires it
    alice.propose(session_id=secrets.token_bytes(16), spec=spec(epsilon="1"), coordinator="analyst")
    assert alice.ledger.reserved_epsilon("raises") == pytest.approx(1.0)
    # a contribute with bad keys uses the session up and releases its reservation
    sid2 = secrets.token_bytes(16)
    s2 = spec()
    alice.propose(session_id=sid2, spec=s2, coordinator="analyst")
    with pytest.raises(ProtocolError):
        alice.contribute(session_id=sid2, keys=[], coordinator="analyst")
    assert alice.ledger.reserved_epsilon("raises") == pytest.approx(1.0)
    assert alice.ledger.status("raises").queries == 0


def _vector_net(tmp_path: Path) -> Net:
    extra = vector_datasets(tmp_path, "b", dict.fromkeys(PARTIES, np.full(64, 0.01)))
    return build_net(tmp_path, start=False, extra=extra)


def _vector_spec() -> QuerySpec:
    return spec(dataset="b", column="", mechanism="skellam", epsilon="1", delta=1e-6,
                l2_bound=1.0, lower=0, upper=0)  # fmt: skip


def test_a_vector_draw_that_fails_refuses_the_contribute_and_charges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vector dataset's noisy vector is drawn while the round goes on; a draw that fails
    refuses the Contribute before the charge: nothing charged, the reservation and the
    slot given back."""
    from mpcdp.protocol.query import party_engine

    n = _vector_net(tmp_path)
    try:
        engines = {p: node.engine for p, node in n.nodes.items()}
        alice = engines["alice"]

        def failing(*args: object) -> object:
            def build(*_: object) -> np.ndarray:
                raise MemoryError("no room for the vector")

            return build

        monkeypatch.setattr(party_engine, "noisy_builder", failing)
        s, sid = _vector_spec(), secrets.token_bytes(16)
        keys = _propose_all(engines, s, sid)  # each party answers before its draw ends
        assert alice.ledger.reserved_epsilon("b") > 0
        with pytest.raises(MemoryError, match="no room"):
            alice.contribute(session_id=sid, keys=keys, coordinator="analyst")
        assert alice.ledger.status("b").queries == 0
        assert alice.ledger.reserved_epsilon("b") == 0
        assert alice.uploads_running == 0
        with pytest.raises(SessionError, match="already used"):
            alice.contribute(session_id=sid, keys=keys, coordinator="analyst")
    finally:
        n.stop()


def test_an_aborted_session_cancels_a_draw_that_has_not_started(tmp_path: Path) -> None:
    """Abort (and expiry) drop a session's vector: a draw still waiting never runs."""
    from concurrent.futures import Future

    n = _vector_net(tmp_path)
    try:
        alice = n.nodes["alice"].engine
        waiting: list[Future[np.ndarray]] = []

        def later(*_: object) -> Future[np.ndarray]:
            waiting.append(Future())
            return waiting[-1]

        alice._noise.take_later = later  # type: ignore[method-assign, assignment]
        sid = secrets.token_bytes(16)
        alice.propose(session_id=sid, spec=_vector_spec(), coordinator="analyst")
        alice.abort(session_id=sid, coordinator="analyst")
        assert waiting[0].cancelled()
        assert alice.ledger.reserved_epsilon("b") == 0
    finally:
        n.stop()


def test_vector_rounds_sum_exactly_with_the_draw_under_way(tmp_path: Path) -> None:
    """Cold rounds of a vector dataset (vector drawn while the round goes on) sum exactly:
    an exact round and a noisy one, each party charged once."""
    n = _vector_net(tmp_path)
    try:
        clients = [Direct(node.engine) for node in n.nodes.values()]
        exact = dataclasses.replace(_vector_spec(), mechanism="none", epsilon="0", delta=0.0)
        out = run_round(spec=exact, clients=clients)
        assert np.allclose(out.tensors["vector"], 0.03, atol=3 * 2.0**-9)
        run_round(spec=_vector_spec(), clients=clients)
        assert [node.engine.ledger.status("b").queries for node in n.nodes.values()] == [2] * 3
    finally:
        n.stop()


@pytest.mark.parametrize("bits", [32, 64])
def test_a_vector_is_encoded_and_added_in_one_wrapping_pass(bits: int) -> None:
    """The compiled encoder adds rint(x * scale) to every ring word mod 2^bits, as numpy's
    round-half-to-even, int64 cast and wrapping add do: ties, signs, words at the ring's
    edges (test data only: fixed values, no noise)."""
    from mpcdp.protocol.query.local_statistic import _encoder

    gen = np.random.default_rng(3)
    x = gen.uniform(-1, 1, 5000)
    x[:8] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0, -0.0]
    dtype = np.uint32 if bits == 32 else np.uint64
    top = (1 << bits) - 1
    for scale in (1.0, 2.0**20, 2.0 ** (bits - 4)):
        words = gen.integers(0, top, x.size, dtype=dtype, endpoint=True)
        words[:4] = [0, 1, top, 1 << (bits - 1)]
        expect = words + np.rint(x * scale).astype(np.int64).astype(dtype)
        _encoder()(encoding.signed_view(words), x, scale)
        assert np.array_equal(words, expect)
