"""The coordinator's gRPC client for one party (implements protocol.coordinator.PartyClient).

Every call has a deadline. gRPC failures become :class:`~mpcdp.errors.PartyError` carrying
the party id, the status code name and the party's own message, so a refusal reaches the
analyst intact ("party 'bob' refused (RESOURCE_EXHAUSTED): privacy budget exceeded ...").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import NDArray

from mpcdp import PROTOCOL_VERSION
from mpcdp.errors import PartyError
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.protocol.coordinator import ContributionStream
from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.party import Proposal
from mpcdp.protocol.spec import QuerySpec
from mpcdp.protocol.training import TrainSpec
from mpcdp.transport import codec, tls

__all__ = ["GrpcPartyClient", "check_health"]


class GrpcPartyClient:
    def __init__(
        self,
        *,
        party_id: str,
        address: str,
        creds: tls.Credentials,
        deadline_s: float = 30.0,
        chunk_bytes: int = 0,
    ) -> None:
        self._party_id = party_id
        self.address = address
        self._deadline = deadline_s
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

    def _error(self, err: grpc.RpcError) -> PartyError:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        return PartyError(self._party_id, code.name if code else "UNKNOWN", details or "no details")

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._deadline)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def describe(self) -> pb.DescribeResponse:
        resp = self._call(self._stub.Describe, pb.DescribeRequest(version=PROTOCOL_VERSION))
        codec.check_version(resp.version, what="DescribeResponse")
        return resp  # type: ignore[no-any-return]

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
    ) -> ContributionStream:
        requests = codec.encode_step_requests(
            session_id=session_id,
            step=step,
            keys=keys,
            parameters=parameters,
            full=full,
            chunk_bytes=self._chunk_bytes,
        )
        responses = self._stub.TrainStep(requests, timeout=self._deadline)
        return self._upload(responses, session_id=session_id, ring_bits=ring_bits)

    def _upload(
        self, responses: Iterable[pb.ContributeChunk], *, session_id: bytes, ring_bits: int
    ) -> ContributionStream:
        """Decode a party's upload stream; gRPC failures while reading become PartyError."""

        def guarded() -> Iterator[pb.ContributeChunk]:
            try:
                yield from responses
            except grpc.RpcError as err:
                raise self._error(err) from None

        return codec.decode_chunks(guarded(), session_id=session_id, ring_bits=ring_bits)

    def abort(self, *, session_id: bytes, reason: str) -> None:
        req = pb.AbortRequest(version=PROTOCOL_VERSION, session_id=session_id, reason=reason)
        self._call(self._stub.Abort, req)


def check_health(
    *, address: str, creds: tls.Credentials, party_id: str, timeout_s: float = 5.0
) -> bool:
    """True when the party at ``address`` answers SERVING over mTLS."""
    with tls.channel(address, creds=creds, server_name=party_id) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
