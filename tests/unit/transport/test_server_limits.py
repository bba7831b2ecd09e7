"""A party survives a hostile coordinator: silent or unread long calls, too many long calls,
invalid chunk sizes, a second node on an address in use (real mTLS gRPC on loopback)."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mpcdp import PROTOCOL_VERSION
from mpcdp.errors import ParameterError, PartyError
from mpcdp.federation import Federation
from mpcdp.party.node import PartyNode
from mpcdp.proto import party_pb2 as pb
from mpcdp.protocol.query.query_spec import QuerySpec
from mpcdp.transport import codec
from mpcdp.transport import server as srv
from mpcdp.transport.client import GrpcPartyClient, check_health
from tests.conftest import (
    PARTIES,
    Net,
    build_net,
    coordinator_creds,
    exact_vector_spec,
    raw_stub,
    vector_datasets,
)
from tests.training_support import examples_toml, tspec


def _serve(node: PartyNode, **limits: float) -> tuple[grpc.Server, int]:
    """Serve ``node``'s engines with their own servicer limits (node.start() uses defaults)."""
    servicer = srv.PartyServicer(
        node.engine,
        coordinators=frozenset(node.config.coordinators),
        describe=node.describe,
        training=node.training,
        **limits,  # type: ignore[arg-type]
    )
    return srv.start_server(servicer, listen="127.0.0.1:0", creds=node.creds)


def _silent(release: threading.Event) -> Iterator[pb.TrainStepRequest]:
    """A TrainStep request stream that sends nothing until ``release`` is set."""
    release.wait(60)
    yield from ()


def _until(what: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_silent_train_streams_do_not_freeze_a_party(tmp_path: Path) -> None:
    # the node as `mpcdp party serve` starts it: default limits
    net = build_net(tmp_path, extra=examples_toml(tmp_path))
    port = net.nodes["alice"].port
    assert port
    analyst, analyst_ch = raw_stub(tmp_path, port, coordinator="analyst")
    other, other_ch = raw_stub(tmp_path, port, coordinator="other")
    release = threading.Event()
    # more silent streams than the old pool had workers (8), all from one coordinator
    calls = [analyst.TrainStep(_silent(release), timeout=60) for _ in range(12)]
    try:
        # the streams beyond the coordinator's limit are refused at once, not queued
        _until(lambda: sum(c.done() for c in calls) >= 8, 5)
        # another coordinator's short calls still find a worker
        described = other.Describe(pb.DescribeRequest(version=PROTOCOL_VERSION), timeout=5)
        assert described.party_id == "alice"
        assert check_health(
            address=f"127.0.0.1:{port}",
            creds=coordinator_creds(tmp_path, "other"),
            party_id="alice",
            timeout_s=5,
        ).serving
        # and so do the analyst's own
        assert analyst.Describe(pb.DescribeRequest(version=PROTOCOL_VERSION), timeout=5).datasets
        limit = srv.DEFAULT_MAX_LONG_CALLS_PER_COORDINATOR
        refused = [c for c in calls if c.done()]
        assert len(refused) == len(calls) - limit
        for c in refused:
            assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "coordinator 'analyst'" in c.details()
            assert f"max_long_calls_per_coordinator is {limit}" in c.details()
        assert not any(c.done() for c in calls if c not in refused)  # still silent, still open
    finally:
        release.set()
        for c in calls:
            c.cancel()
        analyst_ch.close()
        other_ch.close()
        net.stop()


def test_silent_streams_are_ended_after_the_silence_limit(tmp_path: Path) -> None:
    net = build_net(tmp_path, start=False, extra=examples_toml(tmp_path))
    server, port = _serve(
        net.nodes["alice"], max_long_calls=6, max_long_calls_per_coordinator=4, stream_silence_s=1.0
    )
    analyst, analyst_ch = raw_stub(tmp_path, port, coordinator="analyst")
    other, other_ch = raw_stub(tmp_path, port, coordinator="other")
    release = threading.Event()
    try:
        t0 = time.monotonic()
        calls = [analyst.TrainStep(_silent(release), timeout=60) for _ in range(4)]
        calls += [other.TrainStep(_silent(release), timeout=60) for _ in range(3)]
        # 7 long calls, 6 in total allowed: one is refused by the party-wide limit
        assert _until(lambda: any(c.done() for c in calls), 10)
        refused = [c for c in calls if c.done()]
        assert len(refused) == 1
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit max_long_calls is 6" in refused[0].details()
        # the silent ones are ended by the party after the silence limit, long before the
        # client's own 60 s deadline
        assert _until(lambda: all(c.done() for c in calls), 30)
        elapsed = time.monotonic() - t0
        for c in calls:
            if c is not refused[0]:
                assert c.code() == grpc.StatusCode.CANCELLED
        assert 0.9 <= elapsed < 30
        # their slots are free again: a new long call is heard (and refused on its merits)
        header = pb.TrainStepRequest(
            version=PROTOCOL_VERSION,
            session_id=secrets.token_bytes(16),
            header=pb.TrainStepHeader(step=0, parameter_count=1),
        )

        def heard() -> bool:
            with pytest.raises(grpc.RpcError) as info:
                list(analyst.TrainStep(iter([header]), timeout=5))
            return bool(info.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED)

        assert _until(heard, 5)
    finally:
        release.set()
        analyst_ch.close()
        other_ch.close()
        server.stop(0)
        net.stop()


def _proposed(
    net: Net, root: Path, ports: dict[str, int], spec: QuerySpec
) -> tuple[bytes, list[pb.ProposeResponse]]:
    """A session proposed at every party; its id and the keys a ContributeRequest relays."""
    creds = coordinator_creds(root, "analyst")
    session_id = secrets.token_bytes(16)
    keys = []
    for p in PARTIES:
        with GrpcPartyClient(
            party_id=p, address=f"127.0.0.1:{ports[p]}", creds=creds, deadline_s=30
        ) as client:
            proposal = client.propose(session_id=session_id, spec=spec)
        keys.append(codec.key_to_pb(session_id, proposal.key))
    return session_id, keys


def test_an_unread_upload_is_cancelled_after_the_silence_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = 4_000_000  # 32 MB of words: more than the transport buffers on loopback
    extra = vector_datasets(tmp_path, "v", {p: np.zeros(d) for p in PARTIES})
    net = build_net(tmp_path, extra=extra, start=False)
    for p in ("bob", "carlos"):
        net.nodes[p].start()
    server, port = _serve(net.nodes["alice"], stream_silence_s=1.0)
    ports = {
        "alice": port,
        "bob": net.nodes["bob"].port or 0,
        "carlos": net.nodes["carlos"].port or 0,
    }
    analyst, ch = raw_stub(tmp_path, port, coordinator="analyst")
    try:
        session_id, keys = _proposed(net, tmp_path, ports, exact_vector_spec("q1"))
        req = pb.ContributeRequest(version=PROTOCOL_VERSION, session_id=session_id, keys=keys)
        call = analyst.Contribute(req, timeout=120)
        assert next(call).WhichOneof("body") == "header"  # ...and nothing more is read
        # while the upload waits on the analyst, other calls are answered at once (a
        # Contribute of an unknown session is refused before it waits on anything)
        other = pb.ContributeRequest(version=PROTOCOL_VERSION, session_id=secrets.token_bytes(16))
        with pytest.raises(grpc.RpcError) as info:
            list(analyst.Contribute(other, timeout=5))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # and the party cancels the unread upload after the silence limit
        assert _until(
            lambda: any("cancelled Contribute" in r.getMessage() for r in caplog.records), 30
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    finally:
        ch.close()
        server.stop(0)
        net.stop()


@pytest.mark.parametrize("chunk_bytes", [3, codec.MAX_CHUNK_BYTES + 8])
def test_invalid_chunk_bytes_is_refused_before_the_ledger_is_charged(
    tmp_path: Path, chunk_bytes: int
) -> None:
    rng = np.random.default_rng(1)  # test data only
    extra = vector_datasets(tmp_path, "v", {p: rng.normal(size=100) * 0.01 for p in PARTIES})
    net = build_net(tmp_path, extra=extra)
    ports = {p: n.port or 0 for p, n in net.nodes.items()}
    analyst, ch = raw_stub(tmp_path, ports["alice"], coordinator="analyst")
    try:
        session_id, keys = _proposed(net, tmp_path, ports, exact_vector_spec("q1"))
        bad = pb.ContributeRequest(
            version=PROTOCOL_VERSION, session_id=session_id, keys=keys, chunk_bytes=chunk_bytes
        )
        with pytest.raises(grpc.RpcError) as info:
            list(analyst.Contribute(bad, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"invalid chunk_bytes={chunk_bytes}" in info.value.details()
        assert net.nodes["alice"].ledger.status("v").queries == 0
        # the session is untouched: a valid request for it is answered (and charged)
        good = pb.ContributeRequest(version=PROTOCOL_VERSION, session_id=session_id, keys=keys)
        assert len(list(analyst.Contribute(good, timeout=10))) >= 2
        assert net.nodes["alice"].ledger.status("v").queries == 1
    finally:
        ch.close()
        net.stop()


def test_invalid_chunk_bytes_in_a_train_step_is_refused_before_the_ledger_is_charged(
    tmp_path: Path,
) -> None:
    torch = pytest.importorskip("torch")
    from mpcdp.train.models import build_model

    spec = tspec(steps=2, steps_per_charge=1)
    net = build_net(tmp_path, extra=examples_toml(tmp_path))
    ports = {p: n.port or 0 for p, n in net.nodes.items()}
    creds = coordinator_creds(tmp_path, "analyst")
    session_id = secrets.token_bytes(16)
    analyst, ch = raw_stub(tmp_path, ports["alice"], coordinator="analyst")
    try:
        keys = []
        for p in PARTIES:
            with GrpcPartyClient(
                party_id=p, address=f"127.0.0.1:{ports[p]}", creds=creds, deadline_s=30
            ) as client:
                keys.append(client.train_open(session_id=session_id, spec=spec).key)
        torch.manual_seed(0)
        params = torch.nn.utils.parameters_to_vector(build_model(spec.model).parameters())
        requests = codec.encode_step_requests(
            session_id=session_id,
            step=0,
            keys=keys,
            parameters=params.detach().numpy(),
            full=True,
            chunk_bytes=3,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(analyst.TrainStep(requests, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid chunk_bytes=3" in info.value.details()
        status = net.nodes["alice"].ledger.status("ex")
        assert status.queries == 0 and status.spent_epsilon == 0
    finally:
        ch.close()
        net.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_second_server_on_an_address_in_use_fails_to_start(tmp_path: Path) -> None:
    net = build_net(tmp_path, start=False)
    node = net.nodes["alice"]
    listen = f"127.0.0.1:{_free_port()}"
    servicer = srv.PartyServicer(
        node.engine, coordinators=frozenset(node.config.coordinators), describe=node.describe
    )
    first, _ = srv.start_server(servicer, listen=listen, creds=node.creds)
    try:
        with pytest.raises(ParameterError) as info:
            srv.start_server(servicer, listen=listen, creds=node.creds)
        assert info.value.name == "listen" and info.value.value == listen
        assert "address already in use" in str(info.value)
        assert listen in str(info.value)
    finally:
        first.stop(0)
        net.stop()


@pytest.mark.parametrize(
    ("limits", "name"),
    [
        ({"max_long_calls": 0}, "max_long_calls"),
        ({"max_long_calls": True}, "max_long_calls"),
        (
            {"max_long_calls": 2, "max_long_calls_per_coordinator": 3},
            "max_long_calls_per_coordinator",
        ),
        ({"max_setup_calls": 0}, "max_setup_calls"),
        (
            {"max_setup_calls": 2, "max_setup_calls_per_coordinator": 3},
            "max_setup_calls_per_coordinator",
        ),
        ({"stream_silence_s": 0.0}, "stream_silence_s"),
        ({"stream_silence_s": float("nan")}, "stream_silence_s"),
        ({"max_uploads": 0}, "max_uploads"),
        ({"max_uploads": 4, "max_uploads_per_coordinator": 5}, "max_uploads_per_coordinator"),
        ({"max_short_calls_per_caller": 0}, "max_short_calls_per_caller"),
        ({"max_call_s": float("inf")}, "max_call_s"),
    ],
)
def test_servicer_limits_are_checked(tmp_path: Path, limits: dict[str, float], name: str) -> None:
    net = build_net(tmp_path, start=False)
    node = net.nodes["alice"]
    try:
        with pytest.raises(ParameterError) as info:
            srv.PartyServicer(
                node.engine,
                coordinators=frozenset(node.config.coordinators),
                describe=node.describe,
                **limits,  # type: ignore[arg-type]
            )
        assert info.value.name == name
        servicer = srv.PartyServicer(
            node.engine, coordinators=frozenset(node.config.coordinators), describe=node.describe
        )
        # 8 TrainStep + 16 setup calls + 32 uploads + 16 short calls for each of the two
        # coordinators and for the other certificates together
        assert srv.DEFAULT_MAX_SHORT_CALLS_PER_CALLER == 16
        with pytest.raises(ParameterError, match="must be more than the 104 workers"):
            srv.start_server(
                servicer,
                listen="127.0.0.1:0",
                creds=node.creds,
                max_workers=servicer.reserved_workers,
            )
    finally:
        net.stop()


def test_many_rounds_of_one_coordinator_contribute_at_once(tmp_path: Path) -> None:
    """Contribute is the call that charges: a party that refused it for being busy after the
    others charged would make the ledgers disagree (seen under load with 32 rounds in
    flight). Twelve rounds of one coordinator contribute at once, none refused."""
    net = build_net(tmp_path)
    try:
        with Federation.from_config(net.federation) as fed:
            errors: list[Exception] = []

            def one(i: int) -> None:
                try:
                    fed.sum(dataset="raises", column="raise", epsilon=0.1, query_id=f"c-{i}")
                except Exception as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors, errors[0]
        for node in net.nodes.values():
            assert node.ledger.status("raises").queries == 12
    finally:
        net.stop()


def test_setup_calls_beyond_their_limit_are_refused_before_anything_is_reserved(
    tmp_path: Path,
) -> None:
    d = 2_000_000  # a Propose that builds 2e6 coordinates of noise takes a while
    extra = vector_datasets(tmp_path, "v", {p: np.zeros(d) for p in PARTIES})
    # the limits come from party.toml's [limits]
    extra["alice"] += "\n[limits]\nsetup_calls = 2\nsetup_calls_per_coordinator = 1\n"
    net = build_net(tmp_path, extra=extra)
    analyst, ch = raw_stub(tmp_path, net.nodes["alice"].port or 0, coordinator="analyst")
    try:
        calls = [
            analyst.Propose.future(
                pb.ProposeRequest(
                    version=PROTOCOL_VERSION,
                    session_id=secrets.token_bytes(16),
                    spec=codec.spec_to_pb(exact_vector_spec(f"s-{i}")),
                ),
                timeout=60,
            )
            for i in range(4)
        ]
        codes = []
        for c in calls:
            try:
                c.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "max_setup_calls_per_coordinator is 1" in exc.details()
        assert codes.count(grpc.StatusCode.OK) >= 1
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert net.nodes["alice"].ledger.status("v").queries == 0
    finally:
        ch.close()
        net.stop()


def test_the_coordinator_is_told_that_the_party_cancelled_a_silent_call(tmp_path: Path) -> None:
    d = 4_000_000
    extra = vector_datasets(tmp_path, "v", {p: np.zeros(d) for p in PARTIES})
    extra["alice"] += "\n[limits]\nstream_silence_s = 1\n"
    net = build_net(tmp_path, extra=extra)
    ports = {p: n.port or 0 for p, n in net.nodes.items()}
    try:
        session_id, keys = _proposed(net, tmp_path, ports, exact_vector_spec("q1"))
        with GrpcPartyClient(
            party_id="alice", address=f"127.0.0.1:{ports['alice']}",
            creds=coordinator_creds(tmp_path, "analyst"), deadline_s=60,
        ) as client:  # fmt: skip
            stream = client.contribute(
                session_id=session_id, keys=[codec.key_from_pb(k, session_id=session_id).key
                                             for k in keys], ring_bits=64,
            )  # fmt: skip
            time.sleep(3)  # a coordinator that stops reading: the party cancels the upload
            with pytest.raises(PartyError) as info:
                for _ in stream.chunks:
                    pass
        assert "cancelled the call" in str(info.value) and "refused" not in str(info.value)
    finally:
        net.stop()


def _open_training_session(net: Net) -> tuple[bytes, int]:
    """A training session at alice only (a TrainStep stream is heard once its header names an
    open session); its id and the model's parameter count."""
    pytest.importorskip("torch")
    spec = tspec(steps=2, steps_per_charge=1)
    session_id = secrets.token_bytes(16)
    node = net.nodes["alice"]
    assert node.training is not None
    node.training.open(session_id=session_id, spec=spec, coordinator="analyst")
    return session_id, spec.num_params


def _step_stream(
    session_id: bytes, count: int, body: Callable[[], bytes], pause_s: float, stop: threading.Event
) -> Iterator[pb.TrainStepRequest]:
    """A TrainStep request stream: its header, then a message of ``body()`` every
    ``pause_s`` until ``stop`` is set."""
    yield pb.TrainStepRequest(
        version=PROTOCOL_VERSION,
        session_id=session_id,
        header=pb.TrainStepHeader(step=0, parameter_count=count, full=True),
    )
    while not stop.wait(pause_s):
        yield pb.TrainStepRequest(
            version=PROTOCOL_VERSION, session_id=session_id, parameters=body()
        )


@pytest.mark.parametrize(
    ("body", "limits", "why"),
    [
        # empty chunks are no progress: the silence limit ends the stream
        (lambda: b"", {"stream_silence_s": 1.0}, "without progress (stream_silence_s)"),
        # a stream that crawls (one value per message) ends at the call's total limit
        (
            lambda: np.float32(0).tobytes(),
            {"stream_silence_s": 5.0, "max_call_s": 2.0},
            "it ran for 2 s (max_call_s)",
        ),
    ],
    ids=["empty-chunks", "crawling"],
)
def test_a_stream_that_makes_no_progress_or_lives_too_long_is_ended(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    body: Callable[[], bytes],
    limits: dict[str, float],
    why: str,
) -> None:
    net = build_net(tmp_path, start=False, extra=examples_toml(tmp_path))
    server, port = _serve(net.nodes["alice"], **limits)
    analyst, ch = raw_stub(tmp_path, port, coordinator="analyst")
    stop = threading.Event()
    try:
        session_id, count = _open_training_session(net)
        # a message every 0.2 s: it would take 15 s to send all 75 values one by one
        call = analyst.TrainStep(_step_stream(session_id, count, body, 0.2, stop), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        # the party ended it (CANCELLED), long before the client's deadline
        assert info.value.code() == grpc.StatusCode.CANCELLED
        cancelled = [
            r.getMessage() for r in caplog.records if "cancelled TrainStep" in r.getMessage()
        ]
        assert len(cancelled) == 1 and why in cancelled[0], cancelled
    finally:
        stop.set()
        ch.close()
        server.stop(0)
        net.stop()
