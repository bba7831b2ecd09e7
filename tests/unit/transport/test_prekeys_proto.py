"""Warm rounds over the wire: a coordinator that speaks the proto directly (mTLS gRPC to
in-process party nodes) replays a pre-published key, mixes keys of two batches, relays an
expired or a foreign one; each is refused with its status code and nothing is charged.
The honest warm round, and the Federation's, are one Contribute per party."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from mpcdp import PROTOCOL_VERSION
from mpcdp.federation import Federation
from mpcdp.mpc import encoding, ring
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.transport import codec
from tests.conftest import PARTIES, ROWS, Net, raw_stub
from tests.unit.protocol.test_query_protocol import spec

EXACT_SUM = sum(sum(r) for r in ROWS.values())


@pytest.fixture
def stubs(net: Net) -> Iterator[dict[str, pb_grpc.PartyStub]]:
    out, channels = {}, []
    for p, node in net.nodes.items():
        stub, ch = raw_stub(net.root, node.port or 0, party=p)
        out[p] = stub
        channels.append(ch)
    try:
        yield out
    finally:
        for ch in channels:
            ch.close()


def _publish(
    net: Net, *, count: int = 4, ttl_s: int = 600, coordinator: str = "analyst"
) -> dict[str, list[pb.Prekey]]:
    batch_id = secrets.token_bytes(16)
    out = {}
    for p, node in net.nodes.items():
        stub, ch = raw_stub(net.root, node.port or 0, party=p, coordinator=coordinator)
        with ch:
            resp = stub.Prekeys(
                pb.PrekeysRequest(
                    version=PROTOCOL_VERSION, batch_id=batch_id, count=count, ttl_s=ttl_s
                ),
                timeout=10,
            )
        out[p] = list(resp.keys)
    return out


def _warm(
    stub: pb_grpc.PartyStub, keys: list[pb.Prekey], session_id: bytes = b"", **kw: object
) -> list[pb.ContributeChunk]:
    request = pb.ContributeRequest(
        version=PROTOCOL_VERSION,
        session_id=session_id or secrets.token_bytes(16),
        spec=codec.spec_to_pb(spec(**kw)),  # type: ignore[arg-type]
        prekeys=keys,
    )
    return list(stub.Contribute(request, timeout=10))


def _queries(net: Net) -> dict[str, int]:
    return {p: n.engine.ledger.status("raises").queries for p, n in net.nodes.items()}


def _refused(code: grpc.StatusCode, needle: str, call: object) -> None:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() is code, info.value.details()
    assert needle in (info.value.details() or "")


def _slot(keys: dict[str, list[pb.Prekey]], i: int) -> list[pb.Prekey]:
    return [keys[p][i] for p in PARTIES]


def test_an_honest_warm_round_over_the_wire(net: Net, stubs: dict[str, pb_grpc.PartyStub]) -> None:
    keys = _publish(net)
    total = np.zeros(1, dtype=np.uint64)
    qid, sid = f"q-{secrets.token_hex(4)}", secrets.token_bytes(16)
    for p in PARTIES:
        msgs = _warm(stubs[p], _slot(keys, 1), sid, query_id=qid, mechanism="none", epsilon="0")
        assert msgs[0].header.party_id == p and msgs[0].header.length == 1
        words = np.frombuffer(b"".join(m.data for m in msgs[1:]), dtype="<u8")
        total = ring.add(total, words.astype(np.uint64))
    assert encoding.decode_fixed(total, frac_bits=8)[0] == pytest.approx(EXACT_SUM, abs=0.01)
    assert _queries(net) == {p: 1 for p in PARTIES}
    # the masks are bound to the session: parties told different session ids do not cancel
    qid = f"q-{secrets.token_hex(4)}"
    total = np.zeros(1, dtype=np.uint64)
    for p in PARTIES:
        msgs = _warm(stubs[p], _slot(keys, 2), query_id=qid, mechanism="none", epsilon="0")
        total = ring.add(total, np.frombuffer(msgs[1].data, dtype="<u8").astype(np.uint64))
    assert encoding.decode_fixed(total, frac_bits=8)[0] != pytest.approx(EXACT_SUM, abs=1e3)


def test_a_replayed_key_is_refused_over_the_wire(
    net: Net, stubs: dict[str, pb_grpc.PartyStub]
) -> None:
    keys = _publish(net)
    for p in PARTIES:
        _warm(stubs[p], _slot(keys, 0), query_id="q-first")
    charged = _queries(net)
    for p in PARTIES:
        _refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "already used (replay); nothing was charged",
            lambda p=p: _warm(stubs[p], _slot(keys, 0), query_id="q-second"),
        )
    assert _queries(net) == charged


def test_keys_of_two_batches_are_refused_over_the_wire(
    net: Net, stubs: dict[str, pb_grpc.PartyStub]
) -> None:
    first, second = _publish(net), _publish(net)
    mixed = [first["alice"][0], second["bob"][0], first["carlos"][0]]
    for p in PARTIES:
        _refused(
            grpc.StatusCode.INVALID_ARGUMENT, "of two rounds", lambda p=p: _warm(stubs[p], mixed)
        )
    assert _queries(net) == {p: 0 for p in PARTIES}


def test_an_expired_key_is_refused_over_the_wire(
    net: Net, stubs: dict[str, pb_grpc.PartyStub]
) -> None:
    keys = _publish(net, ttl_s=1)
    time.sleep(2.1)  # past the keys' expiry (whole Unix seconds)
    for p in PARTIES:
        _refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "expired",
            lambda p=p: _warm(stubs[p], _slot(keys, 0)),
        )
    assert _queries(net) == {p: 0 for p in PARTIES}


def test_a_foreign_key_is_refused_over_the_wire(
    net: Net, stubs: dict[str, pb_grpc.PartyStub]
) -> None:
    theirs = _publish(net, coordinator="other")
    _refused(
        grpc.StatusCode.PERMISSION_DENIED,
        "signed for coordinator 'other', not 'analyst'",
        lambda: _warm(stubs["alice"], _slot(theirs, 0)),
    )
    assert _queries(net) == {p: 0 for p in PARTIES}


def test_malformed_prekey_requests_name_the_field(
    net: Net, stubs: dict[str, pb_grpc.PartyStub]
) -> None:
    alice = stubs["alice"]
    for count, ttl_s, needle in [(0, 60, "count"), (65, 60, "count"), (1, 0, "ttl_s")]:
        request = pb.PrekeysRequest(
            version=PROTOCOL_VERSION, batch_id=secrets.token_bytes(16), count=count, ttl_s=ttl_s
        )
        _refused(grpc.StatusCode.INVALID_ARGUMENT, needle, lambda r=request: alice.Prekeys(r))
    short = pb.PrekeysRequest(version=PROTOCOL_VERSION, batch_id=b"short", count=1, ttl_s=60)
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "batch_id", lambda: alice.Prekeys(short))
    keys = _publish(net)
    cut = [pb.Prekey(), *_slot(keys, 0)[1:]]
    cut[0].CopyFrom(_slot(keys, 0)[0])
    cut[0].batch_id = b"short"
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "batch_id", lambda: _warm(alice, cut))
    both = pb.ContributeRequest(
        version=PROTOCOL_VERSION,
        session_id=secrets.token_bytes(16),
        spec=codec.spec_to_pb(spec()),
        prekeys=_slot(keys, 0),
        keys=[pb.ProposeResponse(version=PROTOCOL_VERSION, party_id="alice")],
    )
    _refused(grpc.StatusCode.INVALID_ARGUMENT, "not keys", lambda: list(alice.Contribute(both)))
    no_spec = pb.ContributeRequest(
        version=PROTOCOL_VERSION, session_id=secrets.token_bytes(16), prekeys=_slot(keys, 0)
    )
    _refused(
        grpc.StatusCode.INVALID_ARGUMENT, "need the spec", lambda: list(alice.Contribute(no_spec))
    )
    assert _queries(net) == {p: 0 for p in PARTIES}


def test_the_federation_runs_warm_queries_when_asked(net: Net) -> None:
    with Federation.from_config(net.federation, warm_queries=True) as fed:
        first = fed.sum(dataset="raises", column="raise", epsilon=0.5)
        assert first.parties == PARTIES
        engines = [n.engine for n in net.nodes.values()]
        deadline = time.monotonic() + 30  # the background refill after the first query
        while min(e.prekeys.held("analyst") for e in engines) < 16:
            assert time.monotonic() < deadline, "no keys were pre-published"
            time.sleep(0.05)
        fed.sum(dataset="raises", column="raise", epsilon=0.5)
        assert [e.prekeys.held("analyst") for e in engines] == [15, 15, 15]
    assert _queries(net) == {p: 2 for p in PARTIES}
    with Federation.from_config(net.federation) as cold:
        cold.sum(dataset="raises", column="raise", epsilon=0.5)
    assert [e.prekeys.held("analyst") for e in engines] == [15, 15, 15]
