"""A party node survives hostile callers: real `mpcdp party serve` processes, real mTLS, all on
127.0.0.1. One coordinator that never reads its uploads, strangers that stall their TLS
handshakes, requests that are not valid messages, and what the analyst is told when a party
stops in the middle of a handshake.

Liveness bounds are generous on purpose (a 2-core machine shared with other work): a call
that the party answers at once must answer within CALL_S; one that is frozen never answers,
so the bound separates the two without measuring speed.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mpcdp import PROTOCOL_VERSION
from mpcdp.errors import PartyError
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.transport import call_guard, codec, tls
from mpcdp.transport import server as srv
from mpcdp.transport.client import GrpcPartyClient
from tests.conftest import coordinator_creds, exact_vector_spec, localnet_vectors, unread_channel

pytestmark = pytest.mark.slow

PARTIES = ("alice", "bob", "carlos")
#: a call the party answers at once answers well within this (seconds), even on a loaded
#: machine; a frozen party never does
CALL_S = 5.0


def _creds(net: LocalFederation, name: str) -> tls.Credentials:
    return coordinator_creds(net.workdir, name)


def _channel(net: LocalFederation, party: str, who: str) -> grpc.Channel:
    return tls.channel(f"127.0.0.1:{net.ports[party]}", creds=_creds(net, who), server_name=party)


def _describe(stub: pb_grpc.PartyStub) -> pb.DescribeResponse:
    resp: pb.DescribeResponse = stub.Describe(
        pb.DescribeRequest(version=PROTOCOL_VERSION), timeout=CALL_S
    )
    return resp


def test_unread_uploads_of_one_coordinator_leave_the_others_served(tmp_path: Path) -> None:
    """64 uploads that one coordinator never reads: each party worker that sends one waits
    on it, and today's pool had 64. The party counts every upload against its coordinator
    until it ends, so another coordinator's Describe, health check and Propose are answered
    at once (measured: a few ms; the bound is CALL_S)."""
    d = 1 << 18  # 2 MiB of words: more than the 64 KiB the attacker's window lets through
    net = launch(
        workdir=tmp_path, datasets_toml=localnet_vectors(tmp_path, d), other_coordinators=["other"]
    )
    channels = {p: unread_channel(net.workdir, net.ports[p], p) for p in PARTIES}
    stubs = {p: pb_grpc.PartyStub(ch) for p, ch in channels.items()}
    other_ch = _channel(net, "alice", "other")
    other = pb_grpc.PartyStub(other_ch)
    uploads: list[grpc.Future] = []
    refusals: list[str] = []
    try:
        for i in range(64):
            session_id = secrets.token_bytes(16)
            req = pb.ProposeRequest(
                version=PROTOCOL_VERSION,
                session_id=session_id,
                spec=codec.spec_to_pb(exact_vector_spec(f"u-{i}")),
            )
            try:
                keys = [stubs[p].Propose(req, timeout=CALL_S) for p in PARTIES]
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break  # alice is frozen: the checks below fail
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                refusals.append(exc.details())
                for p in PARTIES:
                    stubs[p].Abort(
                        pb.AbortRequest(version=PROTOCOL_VERSION, session_id=session_id),
                        timeout=CALL_S,
                    )
                continue
            for p in ("bob", "carlos"):  # frees their slots; their signed keys stay valid
                stubs[p].Abort(
                    pb.AbortRequest(version=PROTOCOL_VERSION, session_id=session_id),
                    timeout=CALL_S,
                )
            contribute = pb.ContributeRequest(
                version=PROTOCOL_VERSION, session_id=session_id, keys=keys
            )
            uploads.append(stubs["alice"].Contribute(contribute, timeout=120))  # never read
        # the other coordinator is served at once
        assert _describe(other).party_id == "alice"
        health = health_pb2_grpc.HealthStub(other_ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=CALL_S
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        session_id = secrets.token_bytes(16)
        proposed = other.Propose(
            pb.ProposeRequest(
                version=PROTOCOL_VERSION,
                session_id=session_id,
                spec=codec.spec_to_pb(exact_vector_spec("o")),
            ),
            timeout=CALL_S,
        )
        assert proposed.session_id == session_id
        other.Abort(
            pb.AbortRequest(version=PROTOCOL_VERSION, session_id=session_id), timeout=CALL_S
        )
        # the unread uploads beyond the coordinator's limit were refused, at Propose (before
        # any party charged) or at Contribute, naming the limit
        limit = srv.DEFAULT_MAX_UPLOADS_PER_COORDINATOR
        refused = [u for u in uploads if u.done()]
        for u in refused:
            assert u.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, u.details()
            refusals.append(u.details())
        assert len(uploads) - len(refused) <= limit
        assert refusals and all(f"max_uploads_per_coordinator is {limit}" in r for r in refusals), (
            refusals[:1]
        )
        assert all("coordinator 'analyst'" in r for r in refusals)
    finally:
        for u in uploads:
            u.cancel()
        for ch in (*channels.values(), other_ch):
            ch.close()
        net.stop()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def many_sockets() -> Iterator[None]:
    """Room for 2,000 sockets in this process (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4096
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stalled_handshakes_do_not_take_the_party_down(tmp_path: Path, many_sockets: None) -> None:
    """2,000 connections from one address that never finish their TLS handshake (half send
    nothing, half a partial ClientHello), at a party limited to 512 file descriptors: the
    party never runs out of descriptors, keeps answering the analyst's open connection, and
    a new analyst gets an answer once the handshake deadline has closed the strangers'
    connections (party.toml ``[limits] handshake_timeout_s = 2``, so this takes seconds;
    the bound is 60 s; without a handshake deadline gRPC's is 120 s)."""
    nofile = 512
    table = {}
    for p in PARTIES:
        (tmp_path / p).mkdir()
        (tmp_path / p / "r.csv").write_text("raise\n1\n2\n")
        table[p] = (
            '[datasets.raises]\npath = "r.csv"\nepsilon = 3.0\ndelta = 1e-6\n'
            "allow_exact = true\n[datasets.raises.columns.raise]\nlower = 0\nupper = 5000\n"
            "[limits]\nhandshake_timeout_s = 2\n"
        )
    net = launch(workdir=tmp_path, datasets_toml=table, max_open_files=nofile)
    pid = net.processes["alice"].pid
    address = f"127.0.0.1:{net.ports['alice']}"
    creds = _creds(net, "analyst")
    ch = _channel(net, "alice", "analyst")
    open_stub = pb_grpc.PartyStub(ch)
    strangers: list[socket.socket] = []
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello cut short
    try:
        assert _describe(open_stub).party_id == "alice"
        for i in range(2000):
            s = socket.create_connection(("127.0.0.1", net.ports["alice"]), timeout=10)
            if i % 2:
                s.sendall(hello)
            strangers.append(s)
        most = _fds(pid)
        # the connection that was open before keeps being answered
        for _ in range(3):
            assert _describe(open_stub).party_id == "alice"
            most = max(most, _fds(pid))
        # a new analyst is answered once the stalled handshakes have timed out
        answered = False
        deadline = time.monotonic() + 60
        while not answered and time.monotonic() < deadline:
            with GrpcPartyClient(
                party_id="alice", address=address, creds=creds, deadline_s=CALL_S
            ) as client:
                try:
                    answered = client.describe().party_id == "alice"
                except PartyError:
                    time.sleep(0.5)
            most = max(most, _fds(pid))
        assert answered, "a new analyst got no answer within 60 s"
        assert net.processes["alice"].poll() is None
        assert most < nofile - 64, f"the party had {most} of its {nofile} descriptors open"
        assert "File descriptor limit" not in net.log("alice")
    finally:
        for s in strangers:
            s.close()
        ch.close()
        net.stop()


#: every method, as (path, how it is called); the raw channel sends bytes as they are
_METHODS = [
    ("/mpcdp.proto.Party/Describe", "unary"),
    ("/mpcdp.proto.Party/Propose", "unary"),
    ("/mpcdp.proto.Party/Abort", "unary"),
    ("/mpcdp.proto.Party/TrainOpen", "unary"),
    ("/mpcdp.proto.Party/Contribute", "unary_stream"),
    ("/mpcdp.proto.Party/TrainStep", "stream_stream"),
    ("/grpc.health.v1.Health/Check", "unary"),
]


def _raw_call(ch: grpc.Channel, path: str, how: str, body: bytes) -> grpc.RpcError:
    """Send ``body`` as the request of ``path``; the error the party answers with."""
    with pytest.raises(grpc.RpcError) as info:
        if how == "unary":
            ch.unary_unary(path)(body, timeout=CALL_S)
        elif how == "unary_stream":
            list(ch.unary_stream(path)(body, timeout=CALL_S))
        else:
            list(ch.stream_stream(path)(iter([body]), timeout=CALL_S))
    return info.value


def _log_since(net: LocalFederation, party: str, start: int) -> str:
    return net.log(party)[start:]


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_malformed_requests_are_invalid_argument_with_one_short_log_line(
    tmp_path: Path,
) -> None:
    datasets = localnet_vectors(tmp_path, 8)
    rng = np.random.default_rng(0)  # test data only
    np.savez(tmp_path / "alice" / "ex.npz", x=rng.normal(size=(8, 4)), y=np.arange(8) % 2)
    datasets["alice"] += (  # a site: TrainStep reads its request stream
        '[datasets.ex]\npath = "ex.npz"\nnum_classes = 2\nepsilon = 1.0\ndelta = 1e-5\n'
    )
    net = launch(workdir=tmp_path, datasets_toml=datasets)
    ch = _channel(net, "alice", "analyst")
    try:
        for path, how in _METHODS:
            start = len(net.log("alice"))
            err = _raw_call(ch, path, how, b"\xff\xff")  # not a protobuf message
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.details())
            assert "is not a valid" in (err.details() or ""), (path, err.details())
            added = _log_since(net, "alice", start)
            lines = added.splitlines()
            assert len(lines) == 1, (path, added)
            assert len(lines[0]) < 600 and "Traceback" not in added, (path, added)
        # a request that is valid up to its last byte is refused the same way
        good = pb.DescribeRequest(version=PROTOCOL_VERSION).SerializeToString()
        err = _raw_call(ch, "/mpcdp.proto.Party/Describe", "unary", good + b"\x0a\x05ab")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # and one larger than its method's cap is refused before it is parsed
        err = _raw_call(ch, "/mpcdp.proto.Party/Describe", "unary", b"\x00" * (3 << 20))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        limit = call_guard.MAX_REQUEST_BYTES["Describe"]
        assert f"a request message of {3 << 20} bytes; the limit is {limit}" in err.details()
    finally:
        ch.close()
        net.stop()


def test_a_stranger_is_refused_before_its_request_is_read(tmp_path: Path) -> None:
    """A certificate of the federation that is not a coordinator's (here: party bob's)
    calling alice: refused before its request is read, so 16 MiB requests cost the party no
    memory, and its refusals are logged a few lines per minute, not one traceback each."""
    net = launch(workdir=tmp_path, datasets_toml=localnet_vectors(tmp_path, 8))
    pid = net.processes["alice"].pid
    ch = _channel(net, "alice", "bob")
    describe = ch.unary_unary("/mpcdp.proto.Party/Describe")
    try:
        start = len(net.log("alice"))
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as info:
                describe(b"\xff\xff", timeout=CALL_S)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not a configured coordinator" in (info.value.details() or "")
        added = _log_since(net, "alice", start)
        assert "Traceback" not in added
        assert len(added.splitlines()) <= call_guard.REFUSAL_LOG_BURST, added
        assert len(added) < 4000, len(added)
        # large requests: refused without being read
        before = _rss_peak_mb(pid)
        big = b"\xff" * ((16 << 20) - 4096)
        calls = [describe.future(big, timeout=60) for _ in range(16)]
        for c in calls:
            with pytest.raises(grpc.RpcError) as info:
                c.result()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
        grown = _rss_peak_mb(pid) - before
        assert grown < 100, f"the party's peak memory grew by {grown:.0f} MB"
    finally:
        ch.close()
        net.stop()


def _server_rx_queued(port: int) -> bool:
    """An established connection to ``port`` whose received bytes nobody has read yet (gRPC
    listens on a dual-stack socket: look at IPv4 and IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01":
                if int(queues.split(":")[1], 16) > 0:
                    return True
    return False


def test_a_party_stopped_mid_handshake_is_not_reported_as_refusing_the_certificate(
    tmp_path: Path,
) -> None:
    table = {}
    for p in PARTIES:
        (tmp_path / p).mkdir()
        (tmp_path / p / "r.csv").write_text("raise\n1\n")
        table[p] = (
            '[datasets.raises]\npath = "r.csv"\nepsilon = 3.0\ndelta = 1e-6\n'
            "allow_exact = true\n[datasets.raises.columns.raise]\nlower = 0\nupper = 5000\n"
        )
    net = launch(workdir=tmp_path, datasets_toml=table)
    port = net.ports["bob"]
    errors: list[Exception] = []
    try:
        net.processes["bob"].send_signal(signal.SIGSTOP)  # the kernel still accepts

        def call() -> None:
            with GrpcPartyClient(
                party_id="bob", address=f"127.0.0.1:{port}", creds=_creds(net, "analyst"),
                deadline_s=30,
            ) as client:  # fmt: skip
                try:
                    client.describe()
                except PartyError as exc:
                    errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        # the analyst's ClientHello waits, unread, at the stopped party: now it dies
        deadline = time.monotonic() + 30
        while not _server_rx_queued(port):
            assert time.monotonic() < deadline, "the ClientHello never arrived"
            time.sleep(0.02)
        net.kill("bob")
        caller.join(60)
        assert len(errors) == 1
        message = str(errors[0])
        assert "UNAVAILABLE" in message
        assert "did not accept your certificate" not in message, message
        assert "stopped or restarted" in message, message
    finally:
        if net.processes["bob"].poll() is None:
            net.processes["bob"].send_signal(signal.SIGCONT)
        net.stop()
