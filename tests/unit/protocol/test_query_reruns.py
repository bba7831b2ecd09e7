"""Queries that go on when parties fail, without a network: party engines called directly.

A round that fails is re-run without the parties that failed (a party's own status code) as a
new round: fresh session, new linked query id, noise shares sized for the survivors; the failed
round charges nothing where no Contribute was sent; a query fault is never re-run; too few
parties fail with every party and its reason named.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpcdp.config.party_config import load_federation_config
from mpcdp.dp.mechanisms import DiscreteLaplace
from mpcdp.errors import ConfigError, ParameterError, PartyError, RoundAborted, SessionError
from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.query.party_engine import PartyEngine
from mpcdp.protocol.query.query_spec import QuerySpec
from mpcdp.protocol.query.round_coordinator import (
    ContributionStream,
    QueryFailed,
    run_query,
    run_round,
)
from mpcdp.protocol.session import Proposal
from tests.conftest import PARTIES, ROWS, Net, build_net, vector_datasets
from tests.unit.protocol.test_query_protocol import Direct, spec


class Flaky(Direct):
    """A party that fails as told: at ``propose``, ``ping`` or ``contribute``, with a status
    code (as the gRPC client raises it), a given number of times."""

    def __init__(self, engine: PartyEngine, *, at: str = "", code: str = "UNAVAILABLE") -> None:
        super().__init__(engine)
        self.at, self.code = at, code
        self.sessions: list[bytes] = []
        self.pings = 0

    def _maybe_fail(self, where: str) -> None:
        if self.at == where:
            self.at = ""  # once
            raise PartyError(self.party_id, self.code, f"injected at {where}", outcome="failed")

    def propose(self, *, session_id: bytes, spec: QuerySpec) -> Proposal:
        self.sessions.append(session_id)
        self._maybe_fail("propose")
        return super().propose(session_id=session_id, spec=spec)

    def ping(self) -> None:
        self.pings += 1
        self._maybe_fail("ping")

    def contribute(
        self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
    ) -> ContributionStream:
        self._maybe_fail("contribute")
        return super().contribute(session_id=session_id, keys=keys, ring_bits=ring_bits)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = build_net(tmp_path, start=False)
    try:
        yield n
    finally:
        n.stop()


def _clients(net: Net, **fail: dict[str, str]) -> dict[str, Flaky]:
    return {p: Flaky(node.engine, **fail.get(p, {})) for p, node in net.nodes.items()}


def _charges(net: Net, party: str) -> list[tuple[str, str]]:
    return [(c.query_id, c.note) for c in net.nodes[party].engine.ledger.charges("raises")]


def _reserved(net: Net, party: str) -> float:
    return net.nodes[party].engine.ledger.reserved_epsilon("raises")


@pytest.mark.parametrize("where", ["propose", "ping"])
def test_a_party_that_fails_is_left_out_and_the_query_re_run(net: Net, where: str) -> None:
    clients = _clients(net, carlos={"at": where})
    s = spec(query_id="q-1", mechanism="none", epsilon="0")
    out = run_query(spec=s, clients=list(clients.values()), min_parties=2)
    assert out.spec.parties == ("alice", "bob") and out.spec.query_id == "q-1.r1"
    assert out.tensors["sum"][0] == pytest.approx(sum(ROWS["alice"]) + sum(ROWS["bob"]), abs=0.01)
    assert list(out.dropped) == ["carlos"] and f"injected at {where}" in out.dropped["carlos"]
    first = out.attempts[0]
    assert first.query_id == "q-1" and first.charged == {} and first.parties == PARTIES
    # one charge per contributing party, under the re-run's id, its note naming the roster
    # and the first round; none for carlos, and no reservation left of the failed round
    for p in ("alice", "bob"):
        [(qid, note)] = _charges(net, p)
        assert qid == "q-1.r1" and "[parties alice,bob; re-run 1 of q-1]" in note
        assert _reserved(net, p) == 0
    assert _charges(net, "carlos") == [] and _reserved(net, "carlos") == 0
    # a fresh session for the re-run (fresh ephemeral keys at every party)
    assert clients["alice"].sessions[0] != clients["alice"].sessions[1]


def test_a_re_run_sizes_each_noise_share_for_the_survivors(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    share = DiscreteLaplace.share

    def recording(self: DiscreteLaplace, *, size: int, honest: int, rng: Any) -> Any:
        sizes.append(honest)
        return share(self, size=size, honest=honest, rng=rng)

    monkeypatch.setattr(DiscreteLaplace, "share", recording)
    # three parties, t = 1: shares sized for h = 2 in the first round, h' = 1 in the re-run
    clients = _clients(net, bob={"at": "ping"})
    out = run_query(spec=spec(query_id="q-2"), clients=list(clients.values()), min_parties=2)
    assert out.spec.honest == 1 and out.plan.spec.honest == 1
    assert sizes == [2, 2, 2, 1, 1]


def test_the_failed_round_charges_nothing_and_shows_it_when_too_few_are_left(net: Net) -> None:
    clients = _clients(net, bob={"at": "ping", "code": "DEADLINE_EXCEEDED"})
    with pytest.raises(QueryFailed) as info:
        run_query(spec=spec(query_id="q-3"), clients=list(clients.values()))  # min: all
    text = str(info.value)
    assert "2 parties left, min_parties=3" in text and "bob: party 'bob' failed" in text
    assert "nothing was charged" in text
    for p in PARTIES:
        assert _charges(net, p) == [] and _reserved(net, p) == 0


def test_no_honest_share_left_fails_naming_the_party(net: Net) -> None:
    clients = _clients(net, carlos={"at": "propose", "code": "RESOURCE_EXHAUSTED"})
    with pytest.raises(QueryFailed) as info:
        run_query(
            spec=spec(query_id="q-4", colluders=2), clients=list(clients.values()), min_parties=2
        )
    text = str(info.value)
    assert "n' - t = 0 < 1" in text and "carlos" in text and "RESOURCE_EXHAUSTED" in text
    assert "nothing was charged" in text
    for p in PARTIES:
        assert _charges(net, p) == [] and _reserved(net, p) == 0


def test_a_fault_of_the_query_itself_is_not_re_run(net: Net) -> None:
    clients = _clients(net, bob={"at": "propose", "code": "INVALID_ARGUMENT"})
    with pytest.raises(RoundAborted) as info:
        run_query(spec=spec(query_id="q-5"), clients=list(clients.values()), min_parties=2)
    assert not isinstance(info.value, QueryFailed) and "INVALID_ARGUMENT" in str(info.value)
    assert all(len(c.sessions) == 1 for c in clients.values())  # one round only
    for p in PARTIES:
        assert _charges(net, p) == [] and _reserved(net, p) == 0


def test_a_party_failing_at_contribute_leaves_the_others_charged_and_reported(net: Net) -> None:
    clients = _clients(net, carlos={"at": "contribute"})
    out = run_query(
        spec=spec(query_id="q-6", mechanism="none", epsilon="0"),
        clients=list(clients.values()),
        min_parties=2,
    )
    # alice and bob had charged the first round before carlos failed: the result says so
    assert out.attempts[0].charged == {"alice": "0", "bob": "0"}
    assert [q for q, _ in _charges(net, "alice")] == ["q-6", "q-6.r1"]
    assert _charges(net, "carlos") == [] and _reserved(net, "carlos") == 0


def test_min_parties_and_the_query_id_are_checked(net: Net) -> None:
    clients = list(_clients(net).values())
    for bad in (1, 4, True):
        with pytest.raises(ParameterError, match="min_parties"):
            run_query(spec=spec(), clients=clients, min_parties=bad)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="query_id"):
        run_query(spec=spec(query_id="x" * 127), clients=clients, min_parties=2)


def test_min_parties_in_federation_toml(tmp_path: Path) -> None:
    base = (
        'coordinator = "analyst"\n[tls]\nca = "ca.pem"\ncert = "a.pem"\nkey = "a.key"\n'
        '[[parties]]\nid = "alice"\naddress = "127.0.0.1:1"\n'
        '[[parties]]\nid = "bob"\naddress = "127.0.0.1:2"\n'
        '[[parties]]\nid = "carlos"\naddress = "127.0.0.1:3"\n'
    )
    path = tmp_path / "federation.toml"
    path.write_text(base)
    assert load_federation_config(path).quorum == 3  # default: all
    path.write_text("min_parties = 2\n" + base)
    assert load_federation_config(path).min_parties == 2
    for bad in ("1", "4", "true", '"2"'):
        path.write_text(f"min_parties = {bad}\n" + base)
        with pytest.raises(ConfigError, match="min_parties"):
            load_federation_config(path)


def test_an_upload_of_a_round_given_up_is_never_added(tmp_path: Path) -> None:
    """bob's upload streams slowly; carlos fails; what bob sends after that is not read."""
    vectors = {p: np.zeros(64) for p in PARTIES}
    net = build_net(tmp_path, extra=vector_datasets(tmp_path, "v", vectors), start=False)
    given_up = threading.Event()
    read_after: list[int] = []

    class Slow(Flaky):
        def contribute(
            self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
        ) -> ContributionStream:
            stream = super().contribute(session_id=session_id, keys=keys, ring_bits=ring_bits)

            def chunks() -> Iterator[np.ndarray]:
                for i, c in enumerate(stream.chunks):
                    if i == 0:
                        given_up.wait(10)  # until the round has failed
                    else:
                        read_after.append(i)
                    yield c

            return ContributionStream(
                stream.party_id,
                stream.length,
                stream.epsilon_spent,
                stream.budget_remaining,
                chunks(),
            )

    class FailLate(Flaky):
        def contribute(self, **kw: Any) -> ContributionStream:
            try:
                return super().contribute(**kw)
            finally:
                threading.Timer(0.2, given_up.set).start()

    clients = [
        Flaky(net.nodes["alice"].engine),
        Slow(net.nodes["bob"].engine),
        FailLate(net.nodes["carlos"].engine, at="contribute"),
    ]
    s = spec(
        query_id="q-7",
        dataset="v",
        column="",
        mechanism="none",
        epsilon="0",
        l2_bound=1.0,
        lower=0,
        upper=0,
    )
    try:
        with pytest.raises(RoundAborted):
            run_round(spec=s, clients=clients)
    finally:
        net.stop()
    assert read_after == []


def test_a_contribute_after_an_abort_is_refused_and_charges_nothing(net: Net) -> None:
    engines = {p: n.engine for p, n in net.nodes.items()}
    sid = secrets.token_bytes(16)
    s = spec(query_id="q-8")
    keys = [engines[p].propose(session_id=sid, spec=s, coordinator="analyst").key for p in PARTIES]
    engines["bob"].abort(session_id=sid, coordinator="analyst")
    with pytest.raises(SessionError, match="closed \\(aborted\\)"):
        engines["bob"].contribute(session_id=sid, keys=keys, coordinator="analyst")
    assert _charges(net, "bob") == [] and _reserved(net, "bob") == 0


def test_a_re_run_never_gets_a_noisy_vector_of_another_session(net: Net) -> None:
    """The noise pool keys vectors by spec without the query id: a re-run over fewer parties
    has another key (a fresh vector), and a prepared vector is taken by one session only."""
    engine = net.nodes["alice"].engine
    pool = engine._noise
    first = spec(query_id="q-9", mechanism="none", epsilon="0")
    again = spec(query_id="q-9b", mechanism="none", epsilon="0")
    rerun = spec(query_id="q-9.r1", parties=("alice", "bob"), mechanism="none", epsilon="0")
    vectors = []
    for s in (first, again, rerun):
        sid = secrets.token_bytes(16)
        engine.propose(session_id=sid, spec=s, coordinator="analyst")
        vectors.append(engine._sessions[sid].noisy)
        engine.abort(session_id=sid, coordinator="analyst")
    # three sessions, three distinct vectors (no identity, no shared memory)
    assert len({id(v) for v in vectors}) == 3
    assert not any(np.shares_memory(a, b) for a in vectors for b in vectors if a is not b)
    # a vector prepared for the spec is handed to exactly one session
    engine.round_finished(session_id=b"")  # nothing to prepare: no-op
    from mpcdp.protocol.query.party_engine import noisy_builder, pool_key

    release = engine._check_spec(first)[1]
    data = engine.datasets["raises"].data
    assert data is not None
    pool.prepare(pool_key(first), noisy_builder(release, data), nbytes=8)
    hits = pool.hits
    taken = [pool.take(pool_key(first), noisy_builder(release, data)) for _ in range(2)]
    assert pool.hits == hits + 1 and taken[0] is not taken[1]
    # the re-run's key differs from the first round's, and so does any prepared vector's
    assert pool_key(rerun) != pool_key(first)
