"""An upload keeps its session's slot until it ends, and gives it back exactly once.

A party bounds what one coordinator holds: ``pending_sessions_per_coordinator`` sessions,
each with a noisy vector. A Contribute's upload is still that session, holding the vector,
until the last chunk is taken; so the slot stays taken until then and comes back however
the upload ends: read to its end, cancelled by the coordinator, its connection closed
mid-stream, or refused before the first byte.

Real `mpcdp party serve` processes on 127.0.0.1 with mTLS (the engine's own checks in
process, below). Liveness bounds are generous: the slots come back within SLOTS_BACK_S of
the uploads' end (measured: tens of ms).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mpcdp import PROTOCOL_VERSION
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.protocol.query.party_engine import PartyEngine
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.session import Contribution
from mpcdp.transport import codec
from tests.conftest import Net, build_net, exact_vector_spec, localnet_vectors, unread_channel

PARTIES = ("alice", "bob", "carlos")
#: each coordinator's sessions (pending and uploading) at a party
PER_COORDINATOR = 8
#: uploads held at once in each round of the real-process test
HELD = 4
CALL_S = 10.0
SLOTS_BACK_S = 30.0


class _Analyst:
    def __init__(self, net: LocalFederation) -> None:
        self.net = net
        self.channels = {p: unread_channel(net.workdir, net.ports[p], p) for p in PARTIES}
        self.stubs = {p: pb_grpc.PartyStub(ch) for p, ch in self.channels.items()}

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    def propose(self, party: str, session_id: bytes, query_id: str) -> pb.ProposeResponse:
        req = pb.ProposeRequest(
            version=PROTOCOL_VERSION,
            session_id=session_id,
            spec=codec.spec_to_pb(exact_vector_spec(query_id)),
        )
        resp: pb.ProposeResponse = self.stubs[party].Propose(req, timeout=CALL_S)
        return resp

    def abort(self, party: str, session_id: bytes) -> None:
        req = pb.AbortRequest(version=PROTOCOL_VERSION, session_id=session_id)
        self.stubs[party].Abort(req, timeout=CALL_S)

    def contribute_request(self, query_id: str) -> pb.ContributeRequest:
        """A session at every party, then given up at bob and carlos (their slots are
        free; their signed keys stay valid): alice's Contribute request."""
        session_id = secrets.token_bytes(16)
        keys = [self.propose(p, session_id, query_id) for p in PARTIES]
        for p in ("bob", "carlos"):
            self.abort(p, session_id)
        return pb.ContributeRequest(version=PROTOCOL_VERSION, session_id=session_id, keys=keys)

    def free_slots_at_alice(self) -> tuple[int, str]:
        """How many sessions alice accepts now (all given up again), and the refusal that
        ended the count."""
        held: list[bytes] = []
        why = ""
        try:
            for _ in range(PER_COORDINATOR + 1):
                session_id = secrets.token_bytes(16)
                try:
                    self.propose("alice", session_id, f"probe-{session_id.hex()}")
                except grpc.RpcError as exc:
                    why = f"{exc.code().name}: {exc.details()}"
                    break
                held.append(session_id)
        finally:
            for session_id in held:
                self.abort("alice", session_id)
        return len(held), why


def _wait_for_all_slots(analyst: _Analyst) -> tuple[int, str]:
    deadline = time.monotonic() + SLOTS_BACK_S
    while True:
        free, why = analyst.free_slots_at_alice()
        if free == PER_COORDINATOR or time.monotonic() > deadline:
            return free, why
        time.sleep(0.1)


def _in_flight(call: grpc.Future) -> bool:
    return not call.done()


@pytest.mark.slow
def test_uploads_hold_their_slots_until_they_end_however_they_end(tmp_path: Path) -> None:
    """16 rounds of 4 uploads held at alice at once (64 in all): while they are in flight
    alice accepts only the sessions left of the coordinator's 8 (on the old engine, which
    gave the slot back when the upload started, it accepted 8 more); each round's uploads
    then end four ways (cancelled by the coordinator, its connection closed mid-stream,
    read to the end, and a Contribute refused before anything is sent), and every slot
    comes back: 8 sessions are accepted again, and not a ninth."""
    d = 1 << 15  # 256 KiB of words: more than the 64 KiB the unread channel lets through
    limits = f"[limits]\npending_sessions_per_coordinator = {PER_COORDINATOR}\n"
    net = launch(workdir=tmp_path, datasets_toml=localnet_vectors(tmp_path, d, extra=limits))
    analyst = _Analyst(net)
    extra: list[grpc.Channel] = []
    try:
        for r in range(64 // HELD):
            uploads: list[grpc.Future] = []
            own_channels: list[grpc.Channel] = []
            for i in range(HELD):
                req = analyst.contribute_request(f"r{r}-u{i}")
                if i == 1:  # on a channel of its own, closed mid-stream below
                    ch = unread_channel(net.workdir, net.ports["alice"], "alice")
                    own_channels.append(ch)
                    extra.append(ch)
                    stub = pb_grpc.PartyStub(ch)
                else:
                    stub = analyst.stubs["alice"]
                uploads.append(stub.Contribute(req, timeout=120))
            # the first message (the header) arrives: each upload has started at alice
            for u in uploads:
                next(u)
            assert all(_in_flight(u) for u in uploads)
            if r == 0:
                free, why = analyst.free_slots_at_alice()
                assert free == PER_COORDINATOR - HELD, (free, why)
                assert why.startswith("FAILED_PRECONDITION") and "sessions open" in why, why
            uploads[0].cancel()  # the coordinator cancels
            for ch in own_channels:  # the coordinator goes away mid-stream
                ch.close()
            assert sum(len(m.data) for m in uploads[2]) == d * 8  # read to its end
            # still held: the fourth; a Contribute with a missing key is refused at once
            bad = analyst.contribute_request(f"r{r}-bad")
            del bad.keys[1]
            with pytest.raises(grpc.RpcError) as info:
                list(analyst.stubs["alice"].Contribute(bad, timeout=CALL_S))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            uploads[3].cancel()
            free, why = _wait_for_all_slots(analyst)
            assert free == PER_COORDINATOR, (r, free, why)
        # and never more than the limit: a ninth is refused
        free, why = analyst.free_slots_at_alice()
        assert free == PER_COORDINATOR and "sessions open" in why, (free, why)
        assert net.processes["alice"].poll() is None
    finally:
        analyst.close()
        for ch in extra:
            ch.close()
        net.stop()


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[dict[str, PartyEngine]]:
    n: Net = build_net(tmp_path, start=False)
    try:
        yield {p: node.engine for p, node in n.nodes.items()}
    finally:
        n.stop()


def _spec_in_process(query_id: str) -> QuerySpec:
    return QuerySpec(
        query_id=query_id,
        dataset="raises",
        column="raise",
        statistic=Statistic.SUM,
        mechanism="none",
        epsilon="0",
        parties=PARTIES,
        lower=0,
        upper=5000,
        frac_bits=8,
    )


def test_an_upload_gives_its_slot_back_once(engines: dict[str, PartyEngine]) -> None:
    """In process: every way an upload ends gives its slot back once, however many of them
    report it (the reader, the transport's end-of-call callback, a second close)."""
    alice = engines["alice"]
    per = alice._slots._per

    def free() -> int:
        sids = []
        try:
            for _ in range(per + 1):
                sid = secrets.token_bytes(16)
                try:
                    alice.propose(
                        session_id=sid, spec=_spec_in_process(sid.hex()), coordinator="analyst"
                    )
                except Exception:
                    break
                sids.append(sid)
        finally:
            for sid in sids:
                alice.abort(session_id=sid, coordinator="analyst")
        return len(sids)

    def upload() -> tuple[bytes, Contribution]:
        sid = secrets.token_bytes(16)
        s = _spec_in_process(f"u-{sid.hex()}")
        keys = [
            engines[p].propose(session_id=sid, spec=s, coordinator="analyst").key for p in PARTIES
        ]
        return sid, alice.contribute(session_id=sid, keys=keys, coordinator="analyst")

    held_sid, held = upload()  # stays in flight throughout
    sid, c = upload()
    assert free() == per - 2 and alice.uploads_running == 2
    c.close()
    c.close()
    alice.upload_ended(session_id=sid)
    assert free() == per - 1 and alice.uploads_running == 1
    # read to the end, then reported again
    sid, c = upload()
    c.masked()
    alice.upload_ended(session_id=sid)
    assert free() == per - 1
    # a Contribute refused after the session was taken (a missing key)
    sid = secrets.token_bytes(16)
    s = _spec_in_process(f"bad-{sid.hex()}")
    keys = [engines[p].propose(session_id=sid, spec=s, coordinator="analyst").key for p in PARTIES]
    with pytest.raises(Exception, match="missing"):
        alice.contribute(session_id=sid, keys=keys[:2], coordinator="analyst")
    alice.upload_ended(session_id=sid)
    assert free() == per - 1 and alice.uploads_running == 1
    alice.upload_ended(session_id=held_sid)
    assert free() == per and alice.uploads_running == 0
    del held
