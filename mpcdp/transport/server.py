"""The Party gRPC servicer: thin, with every domain error mapped to a status code here.

| error                                  | status code          |
| AuthError (caller not a coordinator)   | PERMISSION_DENIED    |
| PolicyError, DataError                 | FAILED_PRECONDITION  |
| SessionError                           | FAILED_PRECONDITION  |
| ProtocolError, ParameterError          | INVALID_ARGUMENT     |
| BudgetExceededError                    | RESOURCE_EXHAUSTED   |
| LedgerError (query id already answered)| ALREADY_EXISTS       |
| HeadroomError                          | OUT_OF_RANGE         |
| anything else                          | INTERNAL (details only in the party's log) |

Messages carry the domain error's text, which names parameters and values but never a share,
a key or a noise value.

The port is bound exclusively (no SO_REUSEPORT): a second node on an address in use fails to
start instead of sharing the connections.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mpcdp import PROTOCOL_VERSION
from mpcdp.errors import (
    AuthError,
    BudgetExceededError,
    DataError,
    HeadroomError,
    LedgerError,
    ParameterError,
    PolicyError,
    ProtocolError,
    SessionError,
)
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.protocol.party import PartyEngine
from mpcdp.protocol.training import TrainingEngine
from mpcdp.transport import codec, tls

__all__ = ["SERVER_OPTIONS", "PartyServicer", "start_server", "status_for"]

log = logging.getLogger(__name__)

SERVER_OPTIONS: list[tuple[str, int]] = [
    *tls.GRPC_OPTIONS,
    # bind exclusively: with SO_REUSEPORT (gRPC's default) a second node on the same address
    # would start without error and take half of the connections
    ("grpc.so_reuseport", 0),
]

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (AuthError, grpc.StatusCode.PERMISSION_DENIED),
    (SessionError, grpc.StatusCode.FAILED_PRECONDITION),
    (PolicyError, grpc.StatusCode.FAILED_PRECONDITION),
    (DataError, grpc.StatusCode.FAILED_PRECONDITION),
    (BudgetExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LedgerError, grpc.StatusCode.ALREADY_EXISTS),
    (HeadroomError, grpc.StatusCode.OUT_OF_RANGE),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (ParameterError, grpc.StatusCode.INVALID_ARGUMENT),
]

F = TypeVar("F", bound=Callable[..., Any])


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the party's log"


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    else:
        log.warning("%s refused: %s", method, message)
    context.abort(code, message)


def _unary(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: PartyServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # mapped to a status code in one place
            _abort(context, exc, fn.__name__)

    return wrapper  # type: ignore[return-value]


def _streaming(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: PartyServicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:
            _abort(context, exc, fn.__name__)

    return wrapper  # type: ignore[return-value]


class PartyServicer(pb_grpc.PartyServicer):
    def __init__(
        self,
        engine: PartyEngine,
        *,
        coordinators: frozenset[str],
        describe: Callable[[], list[pb.DatasetInfo]],
        training: TrainingEngine | None = None,
    ) -> None:
        self._engine = engine
        self._training = training
        self._coordinators = coordinators
        self._describe = describe

    def _caller(self, context: grpc.ServicerContext) -> str:
        name = tls.peer_name(context)
        if name not in self._coordinators:
            raise AuthError(
                f"certificate {name!r} is not a configured coordinator of party "
                f"{self._engine.party_id!r}"
            )
        return name

    @_unary
    def Describe(
        self, request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.DescribeResponse:
        self._caller(context)
        codec.check_version(request.version, what="DescribeRequest")
        return pb.DescribeResponse(
            version=PROTOCOL_VERSION, party_id=self._engine.party_id, datasets=self._describe()
        )

    @_unary
    def Propose(
        self, request: pb.ProposeRequest, context: grpc.ServicerContext
    ) -> pb.ProposeResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="ProposeRequest")
        session_id = codec.check_session(request.session_id)
        spec = codec.spec_from_pb(request.spec)
        proposal = self._engine.propose(session_id=session_id, spec=spec, coordinator=caller)
        return codec.key_to_pb(session_id, proposal.key, length=proposal.length)

    @_streaming
    def Contribute(
        self, request: pb.ContributeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ContributeChunk]:
        caller = self._caller(context)
        codec.check_version(request.version, what="ContributeRequest")
        session_id = codec.check_session(request.session_id)
        keys = codec.keys_from_pb(request.keys, session_id=session_id)
        chunk = codec.check_chunk_bytes(request.chunk_bytes)  # before the ledger is charged
        contribution = self._engine.contribute(session_id=session_id, keys=keys, coordinator=caller)
        yield from codec.encode_chunks(session_id, contribution, chunk_bytes=chunk)
        del contribution  # its vector is sent: free it before the next one is built
        self._engine.round_finished(session_id=session_id)

    @_unary
    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="AbortRequest")
        session_id = codec.check_session(request.session_id)
        if self._training is None or not self._training.abort(
            session_id=session_id, coordinator=caller
        ):
            self._engine.abort(session_id=session_id, coordinator=caller)
        return pb.AbortResponse(version=PROTOCOL_VERSION)

    def _trainer(self) -> TrainingEngine:
        if self._training is None:
            raise PolicyError(
                f"party {self._engine.party_id!r} has no example datasets to train on"
            )
        return self._training

    @_unary
    def TrainOpen(
        self, request: pb.TrainOpenRequest, context: grpc.ServicerContext
    ) -> pb.ProposeResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="TrainOpenRequest")
        session_id = codec.check_session(request.session_id)
        spec = codec.train_spec_from_pb(request.spec)
        proposal = self._trainer().open(session_id=session_id, spec=spec, coordinator=caller)
        return codec.key_to_pb(session_id, proposal.key, length=proposal.length)

    @_streaming
    def TrainStep(
        self, request_iterator: Iterator[pb.TrainStepRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ContributeChunk]:
        caller = self._caller(context)
        trainer = self._trainer()
        session_id, header, keys, values = codec.decode_step_requests(
            request_iterator, max_values=trainer.max_parameters
        )
        chunk = codec.check_chunk_bytes(header.chunk_bytes)  # before the ledger is charged
        upload = trainer.step(
            session_id=session_id,
            step=header.step,
            keys=keys,
            parameters=values,
            full=header.full,
            coordinator=caller,
        )
        yield from codec.encode_chunks(session_id, upload, chunk_bytes=chunk)
        del upload  # sent: free it before the next step's pad is built
        trainer.step_finished(session_id=session_id)


def _bind_problem(listen: str) -> str:
    """Why ``listen`` could not be bound, as far as a plain socket can tell."""
    host, _, port = listen.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None,
            int(port),
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except (OSError, ValueError) as exc:
        return f"could not bind this address ({exc})"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "address already in use (is another party node running on it?)"
                return f"could not bind this address ({exc.strerror})"
    return "could not bind this address"


def start_server(
    servicer: PartyServicer, *, listen: str, creds: tls.Credentials, max_workers: int = 8
) -> tuple[grpc.Server, int]:
    """Start the mTLS server with the Party and health services; return it and its port.

    An address already in use is refused (ParameterError naming ``listen``)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="party"),
        options=SERVER_OPTIONS,
    )
    pb_grpc.add_PartyServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_secure_port(listen, tls.server_credentials(creds))
    except RuntimeError:  # gRPC 1.85 raises where older versions returned 0
        port = 0
    if port == 0:
        raise ParameterError("listen", listen, _bind_problem(listen))
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("mpcdp.proto.Party", health_pb2.HealthCheckResponse.SERVING)
    return server, port
