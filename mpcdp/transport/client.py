"""The coordinator's gRPC client for one party (implements
protocol.query.round_coordinator.PartyClient).

Every call has a deadline. gRPC failures become :class:`~mpcdp.errors.PartyError` carrying
the party id, the status code name and the party's own message, so a refusal reaches the
analyst intact ("party 'bob' refused (RESOURCE_EXHAUSTED): privacy budget exceeded ...").
A call that got no answer says so instead: "party 'bob' did not answer within 30 s
(DEADLINE_EXCEEDED)", "party 'bob' is unreachable at HOST:PORT (UNAVAILABLE)".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import NDArray

from mpcdp import PROTOCOL_VERSION
from mpcdp.errors import ParameterError, PartyError, ProtocolError
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.protocol.catalog import PartyDescription
from mpcdp.protocol.identity import Prekey, SignedKey
from mpcdp.protocol.query.query_spec import QuerySpec
from mpcdp.protocol.query.round_coordinator import ContributionStream
from mpcdp.protocol.session import Proposal
from mpcdp.protocol.training import TrainSpec
from mpcdp.transport import codec, tls

__all__ = [
    "DEFAULT_ABORT_DEADLINE_S",
    "GrpcPartyClient",
    "Health",
    "check_health",
    "explain_unavailable",
]

#: Abort is a courtesy (an unused session also expires at the party): it gets a short
#: deadline of its own, so a party that stopped answering does not cost a round a second
#: full deadline.
DEFAULT_ABORT_DEADLINE_S = 5.0


class GrpcPartyClient:
    def __init__(
        self,
        *,
        party_id: str,
        address: str,
        creds: tls.Credentials,
        deadline_s: float = 30.0,
        chunk_bytes: int = 0,
        abort_deadline_s: float = DEFAULT_ABORT_DEADLINE_S,
    ) -> None:
        """``deadline_s``: the deadline of every call (a whole upload stream included);
        ``abort_deadline_s``: that of Abort (at most ``deadline_s``)."""
        for name, value in (("deadline_s", deadline_s), ("abort_deadline_s", abort_deadline_s)):
            if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ParameterError(name, value, "must be a finite number of seconds > 0")
        self._party_id = party_id
        self.address = address
        self._deadline = deadline_s
        self._abort_deadline = min(abort_deadline_s, deadline_s)
        self._chunk_bytes = chunk_bytes
        self._channel = tls.channel(address, creds=creds, server_name=party_id)
        self._stub = pb_grpc.PartyStub(self._channel)

    @property
    def party_id(self) -> str:
        return self._party_id

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcPartyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(
        self, err: grpc.RpcError, *, deadline_s: float, answered: bool = False
    ) -> PartyError:
        """``err`` as a PartyError that says what happened: a refusal, or no answer within
        ``deadline_s`` (``answered``: part of a streamed answer had arrived), or no
        connection at all."""
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            outcome = (
                f"did not finish its answer within {deadline_s:g} s"
                if answered
                else f"did not answer within {deadline_s:g} s"
            )
        elif code is grpc.StatusCode.UNAVAILABLE:
            outcome = f"is unreachable at {self.address}"
            details = explain_unavailable(
                details or "", address=self.address, party_id=self._party_id
            )
        elif code is grpc.StatusCode.CANCELLED:
            # the party cancels a call that waited too long on the coordinator (its
            # stream_silence_s); gRPC cannot carry a message on a cancelled call
            outcome = "cancelled the call (see its log: e.g. it waited too long for us)"
        else:
            outcome = "refused"
        return PartyError(
            self._party_id,
            code.name if code else "UNKNOWN",
            details or "no details",
            outcome=outcome,
        )

    def _call(self, method: Any, request: Any, *, deadline_s: float | None = None) -> Any:
        timeout = self._deadline if deadline_s is None else deadline_s
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise self._error(err, deadline_s=timeout) from None

    def describe(self) -> PartyDescription:
        resp = self._call(self._stub.Describe, pb.DescribeRequest(version=PROTOCOL_VERSION))
        return codec.description_from_pb(resp)

    def propose(self, *, session_id: bytes, spec: QuerySpec) -> Proposal:
        req = pb.ProposeRequest(
            version=PROTOCOL_VERSION, session_id=session_id, spec=codec.spec_to_pb(spec)
        )
        return codec.key_from_pb(self._call(self._stub.Propose, req), session_id=session_id)

    def contribute(
        self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
    ) -> ContributionStream:
        req = pb.ContributeRequest(
            version=PROTOCOL_VERSION,
            session_id=session_id,
            keys=[codec.key_to_pb(session_id, k) for k in keys],
            chunk_bytes=self._chunk_bytes,
        )
        responses = self._stub.Contribute(req, timeout=self._deadline)
        return self._upload(responses, session_id=session_id, ring_bits=ring_bits)

    def prekeys(self, *, batch_id: bytes, count: int, ttl_s: int) -> list[Prekey]:
        """A batch of the party's signed keys for this coordinator's warm rounds: index i of
        the batch is for the round this coordinator numbers i in it."""
        req = pb.PrekeysRequest(
            version=PROTOCOL_VERSION, batch_id=batch_id, count=count, ttl_s=ttl_s
        )
        resp = self._call(self._stub.Prekeys, req)
        codec.check_version(resp.version, what="PrekeysResponse")
        keys = codec.prekeys_from_pb(resp.keys)
        want = [(self._party_id, batch_id, i) for i in range(count)]
        if [(k.party_id, k.batch_id, k.index) for k in keys] != want:
            raise ProtocolError(
                f"party {self._party_id!r} answered Prekeys with keys of another party, batch "
                "or numbering"
            )
        return keys

    def contribute_warm(
        self,
        *,
        session_id: bytes,
        spec: QuerySpec,
        keys: Sequence[Prekey],
        ring_bits: int = 64,
    ) -> ContributionStream:
        """A warm round's one call: the spec and every party's pre-published key."""
        req = pb.ContributeRequest(
            version=PROTOCOL_VERSION,
            session_id=session_id,
            chunk_bytes=self._chunk_bytes,
            spec=codec.spec_to_pb(spec),
            prekeys=[codec.prekey_to_pb(k) for k in keys],
        )
        responses = self._stub.Contribute(req, timeout=self._deadline)
        return self._upload(responses, session_id=session_id, ring_bits=ring_bits)

    def train_open(self, *, session_id: bytes, spec: TrainSpec) -> Proposal:
        req = pb.TrainOpenRequest(
            version=PROTOCOL_VERSION, session_id=session_id, spec=codec.train_spec_to_pb(spec)
        )
        return codec.key_from_pb(self._call(self._stub.TrainOpen, req), session_id=session_id)

    def train_step(
        self,
        *,
        session_id: bytes,
        step: int,
        keys: Sequence[SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
        ring_bits: int,
        deadline_s: float | None = None,
        evaluate: bool = False,
    ) -> ContributionStream:
        """One training step; ``deadline_s`` (default: the client's deadline) bounds the
        whole call, the upload included: past it the site sees the call cancelled and
        refuses to send the step (so it is not charged for it). ``evaluate``: the site's
        evaluation before step ``step`` instead (its words are in Z_2^64: ``ring_bits``
        64)."""
        timeout = self._deadline if deadline_s is None else min(deadline_s, self._deadline)
        requests = codec.encode_step_requests(
            session_id=session_id,
            step=step,
            keys=keys,
            parameters=parameters,
            full=full,
            chunk_bytes=self._chunk_bytes,
            evaluate=evaluate,
        )
        responses = self._stub.TrainStep(requests, timeout=timeout)
        return self._upload(responses, session_id=session_id, ring_bits=ring_bits, timeout=timeout)

    def _upload(
        self,
        responses: Iterable[pb.ContributeChunk],
        *,
        session_id: bytes,
        ring_bits: int,
        timeout: float | None = None,
    ) -> ContributionStream:
        """Decode a party's upload stream; gRPC failures while reading become PartyError."""

        def guarded() -> Iterator[pb.ContributeChunk]:
            answered = False
            try:
                for msg in responses:
                    answered = True
                    yield msg
            except grpc.RpcError as err:
                raise self._error(
                    err, deadline_s=timeout or self._deadline, answered=answered
                ) from None
            finally:
                # a reader that stops early (a round given up) ends the call; after the
                # last message this does nothing
                cancel = getattr(responses, "cancel", None)
                if cancel is not None:
                    cancel()

        return codec.decode_chunks(guarded(), session_id=session_id, ring_bits=ring_bits)

    def ping(self) -> None:
        """Is the party alive and serving? One health check on this client's channel with
        the abort's short deadline (a round asks it right before its Contributes); raises
        PartyError when it does not answer SERVING."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        resp = self._call(
            stub.Check, health_pb2.HealthCheckRequest(service=""), deadline_s=self._abort_deadline
        )
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            raise PartyError(
                self._party_id, "UNAVAILABLE", "not serving (shutting down?)", outcome="answered"
            )

    def abort(self, *, session_id: bytes, reason: str) -> None:
        req = pb.AbortRequest(version=PROTOCOL_VERSION, session_id=session_id, reason=reason)
        self._call(self._stub.Abort, req, deadline_s=self._abort_deadline)


@dataclass(frozen=True)
class Health:
    """What ``mpcdp health`` found: ``serving`` when the party answered SERVING over mTLS,
    else ``status`` (a short word: NOT_SERVING, REFUSED, TLS, NAME, TIMEOUT, UNAVAILABLE) and
    ``reason``, a sentence saying what to check."""

    serving: bool
    status: str
    reason: str


def explain_unavailable(details: str, *, address: str, party_id: str) -> str:
    """gRPC's UNAVAILABLE details as what happened and what to check.

    gRPC reports a dead port, a certificate from another CA on either side, a party
    certificate for another name and a connection cut during the handshake alike as
    UNAVAILABLE; its details tell them apart (the strings of grpc 1.6x-1.8x, matched
    loosely, with the original kept at the end). Only a connection the party closed right
    after the handshake reads as a refused certificate: one that was reset during the
    handshake is a party that stopped, restarted or turned the connection away."""
    low = details.lower()
    if "hostname verification" in low or "peer name" in low:
        what = (
            f"the certificate presented at {address} is not {party_id!r}'s: check the "
            "party id (--name, or the id in federation.toml) and that the address is that "
            "party's"
        )
    elif "certificate_verify_failed" in low or "certificate verify failed" in low:
        what = (
            f"TLS handshake with {address} failed: the party's certificate is not signed by "
            "your CA (--ca / [tls] ca): both sides must use the same federation's ca.pem"
        )
    elif any(
        cut in low
        for cut in ("connection reset", "broken pipe", "handshake read failed", "handshake write")
    ):
        what = (
            f"the connection to {address} was cut during the TLS handshake: the party "
            "stopped or restarted, or turned the connection away (it was busy with too many "
            "connections); retry, and see the party's log if it persists"
        )
    elif "socket closed" in low:
        what = (
            f"TLS handshake with {address} failed: the party closed the connection right "
            "after the handshake, so it did not accept your certificate (unless it stopped "
            "at that moment): check that your --cert/--key ([tls] cert, key) come from the "
            "party's federation CA, or that the address is a party at all"
        )
    elif "handshake" in low or "ssl" in low:
        what = (
            f"TLS handshake with {address} failed: check that the address is a party's and "
            "that both sides use the same federation's CA; the party may also have stopped "
            "during the handshake"
        )
    elif "connection refused" in low:
        what = f"nothing listens at {address}: is the party running, on this port?"
    elif "deadline" in low or "timeout" in low or "timed out" in low:
        what = f"no answer from {address}: a firewall, or a host that is down?"
    else:
        what = f"cannot connect to {address}"
    return f"{what} (gRPC: {details})" if details else what


def _health_status(reason: str) -> str:
    if reason.startswith("TLS handshake"):
        return "TLS"
    if reason.startswith("the certificate presented"):
        return "NAME"
    if reason.startswith("nothing listens"):
        return "REFUSED"
    if reason.startswith("no answer"):
        return "TIMEOUT"
    return "UNAVAILABLE"


def check_health(
    *, address: str, creds: tls.Credentials, party_id: str, timeout_s: float = 5.0
) -> Health:
    """Ask the party at ``address`` (whose certificate must name ``party_id``) for its
    health over mTLS, and say why when it does not answer SERVING."""
    with tls.channel(address, creds=creds, server_name=party_id) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = (err.details() if hasattr(err, "details") else None) or ""
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return Health(
                    serving=False,
                    status="TIMEOUT",
                    reason=f"no answer from {address} within {timeout_s:g} s: a firewall, a "
                    "host that is down, or a party still starting?",
                )
            if code is grpc.StatusCode.UNAVAILABLE:
                reason = explain_unavailable(details, address=address, party_id=party_id)
                return Health(serving=False, status=_health_status(reason), reason=reason)
            name = code.name if code else "UNKNOWN"
            return Health(
                serving=False, status=name, reason=f"the party answered {name}: {details}"
            )
        if resp.status == health_pb2.HealthCheckResponse.SERVING:
            return Health(serving=True, status="SERVING", reason="")
        return Health(
            serving=False,
            status="NOT_SERVING",
            reason=f"{party_id!r} at {address} answered but is not serving (shutting down?)",
        )
