"""The Party gRPC servicer: thin, with every domain error mapped to a status code here.

| error                                  | status code          |
| AuthError (caller not a coordinator)   | PERMISSION_DENIED    |
| PolicyError, DataError                 | FAILED_PRECONDITION  |
| SessionError                           | FAILED_PRECONDITION  |
| ProtocolError, ParameterError          | INVALID_ARGUMENT     |
| a request that is not a valid message  | INVALID_ARGUMENT     |
| BudgetExceededError                    | RESOURCE_EXHAUSTED   |
| LedgerError (query id already answered)| ALREADY_EXISTS       |
| HeadroomError                          | OUT_OF_RANGE         |
| too many calls of one kind (below)     | RESOURCE_EXHAUSTED   |
| anything else                          | INTERNAL (details only in the party's log) |

Messages carry the domain error's text, which names parameters and values but never a share,
a key or a noise value.

A party survives a hostile coordinator, and strangers:

* The caller is known before a request is read: every method is served from the raw request
  stream, so the certificate is checked (PERMISSION_DENIED for one that is not a configured
  coordinator; health checks excepted) and the call counted before its request message is
  read at all. A message is then parsed here, so bytes that are not a valid message are
  INVALID_ARGUMENT, never INTERNAL, and a message larger than its method's cap
  (:data:`MAX_REQUEST_BYTES`; only the TrainStep upload and TrainOpen's architecture reach
  the transport's 16 MiB) is refused.
* Every call counts against its caller's limits until it ends, in total and per
  coordinator; one beyond a limit is refused at once (RESOURCE_EXHAUSTED, naming the
  coordinator and the limit):
  - TrainStep streams (``max_long_calls``);
  - Propose, TrainOpen and Prekeys, which build noise or a model or sign keys
    (``max_setup_calls``);
  - Contribute uploads (``max_uploads``), until the last chunk is taken. A Propose of a
    coordinator whose uploads are at its limit is refused too, so a coordinator that
    keeps its uploads unread is stopped before a new round charges anything anywhere.
    An upload also keeps its session's slot in the engine until it ends (sent, failed,
    cancelled or its coordinator gone), so a coordinator's pending sessions and running
    uploads together stay within ``pending_sessions_per_coordinator``;
  - Describe, Abort and health checks (``max_short_calls_per_caller`` per coordinator;
    the certificates that are not coordinators share one such allowance).
  The worker pool has a thread for every call these limits allow, plus SPARE_WORKERS for
  the moment a refused call holds one: whatever one coordinator does, another's health
  check, Describe and Abort find a worker.
* A call that waits on its coordinator for longer than ``stream_silence_s`` without
  progress (for its request message, for request bytes of a TrainStep upload -- messages
  that carry no bytes do not count -- or for it to take the next upload message) is
  cancelled; the time the party itself works is not counted. Any call that lives longer
  than ``max_call_s`` is cancelled too.
* A Propose or Contribute that arrives after its coordinator gave up on it (the call is
  cancelled, less than LATE_CALL_MARGIN_S is left before its deadline, or the party process
  stalled, e.g. stopped by SIGSTOP, for longer than the call's time left after its session's
  Propose) is refused before anything is reserved or charged, and its session is closed as
  by an Abort (docs/queries.md, "When a party fails").
* Refusals are logged one bounded line each, at most REFUSAL_LOG_BURST lines per caller
  every REFUSAL_LOG_WINDOW_S (then one line saying how many were left out).
* Connections: a TLS handshake must finish within ``handshake_timeout_s`` (a stranger's
  stalled connection is closed), and at most ``max_connections`` connections are open at
  once, by default half of the process's file descriptors (RLIMIT_NOFILE), so strangers
  cannot exhaust the descriptors the party needs. A limit per source address belongs in
  front of the node (a TCP proxy; docker/README.md). HTTP/2 keepalive pings find
  connections whose peer has gone.
* The port is bound exclusively (no SO_REUSEPORT): a second node on an address in use fails
  to start instead of sharing the connections.
"""

from __future__ import annotations

import errno
import functools
import logging
import resource
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2

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
    RankFailure,
    SessionError,
)
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.protocol.catalog import DatasetInfo, PartyDescription
from mpcdp.protocol.query.party_engine import PartyEngine
from mpcdp.protocol.training import TrainingEngine
from mpcdp.transport import codec, tls
from mpcdp.transport.call_guard import (
    CallLimit,
    CallWatch,
    RefusalLog,
    Silent,
    Suspensions,
    TooBusy,
    Watchdog,
    limit_pair,
    positive_int,
    seconds,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "DEFAULT_MAX_CALL_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_LONG_CALLS",
    "DEFAULT_MAX_LONG_CALLS_PER_COORDINATOR",
    "DEFAULT_MAX_SETUP_CALLS",
    "DEFAULT_MAX_SETUP_CALLS_PER_COORDINATOR",
    "DEFAULT_MAX_SHORT_CALLS_PER_CALLER",
    "DEFAULT_MAX_UPLOADS_PER_COORDINATOR",
    "DEFAULT_STREAM_SILENCE_S",
    "LATE_CALL_MARGIN_S",
    "SERVER_OPTIONS",
    "SPARE_WORKERS",
    "PartyServicer",
    "ServerHandle",
    "connection_limit",
    "start_server",
    "status_for",
]

log = logging.getLogger(__name__)

#: TrainStep streams a party runs at once, in total and per coordinator.
DEFAULT_MAX_LONG_CALLS = 8
DEFAULT_MAX_LONG_CALLS_PER_COORDINATOR = 4
#: Propose and TrainOpen calls a party runs at once, in total and per coordinator.
DEFAULT_MAX_SETUP_CALLS = 16
DEFAULT_MAX_SETUP_CALLS_PER_COORDINATOR = 8
#: Contribute uploads one coordinator runs at once (in total: the engine's pending sessions).
DEFAULT_MAX_UPLOADS_PER_COORDINATOR = 16
#: Describe, Abort and health checks one caller runs at once.
DEFAULT_MAX_SHORT_CALLS_PER_CALLER = 16
#: Seconds a call may wait on its coordinator without progress before the party cancels it.
DEFAULT_STREAM_SILENCE_S = 30.0
#: Seconds any call may last, whatever it does.
DEFAULT_MAX_CALL_S = 3600.0
#: Seconds a connection may take for its TLS handshake.
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
#: Connections open at once (at most half of the process's file descriptors).
DEFAULT_MAX_CONNECTIONS = 1024
#: Worker threads beyond those the limits allow to be held: for refusals.
SPARE_WORKERS = 4
#: The key that callers which are not coordinators share (their health checks).
_STRANGERS = "(certificates that are not coordinators)"


SERVER_OPTIONS: list[tuple[str, int]] = [
    *tls.GRPC_OPTIONS,
    # bind exclusively: with SO_REUSEPORT (gRPC's default) a second node on the same address
    # would start without error and take half of the connections
    ("grpc.so_reuseport", 0),
    # ping a connection after a minute without traffic and close it when no answer comes
    # within 20 s: a coordinator that vanished (host down, network cut) frees its calls
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
    # a client may ping at most every 10 s; more often counts as abuse (GOAWAY after 2)
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
]


#: Propose times remembered (the oldest is forgotten first)
_MAX_PROPOSED = 1 << 12

#: A Propose or Contribute with less time left than this before its deadline is refused
#: (nothing reserved or charged): its answer could not reach the coordinator in time.
LATE_CALL_MARGIN_S = 0.05


_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (TooBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AuthError, grpc.StatusCode.PERMISSION_DENIED),
    (SessionError, grpc.StatusCode.FAILED_PRECONDITION),
    (PolicyError, grpc.StatusCode.FAILED_PRECONDITION),
    (DataError, grpc.StatusCode.FAILED_PRECONDITION),
    (BudgetExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LedgerError, grpc.StatusCode.ALREADY_EXISTS),
    (HeadroomError, grpc.StatusCode.OUT_OF_RANGE),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (ParameterError, grpc.StatusCode.INVALID_ARGUMENT),
    (RankFailure, grpc.StatusCode.ABORTED),
]

F = TypeVar("F", bound=Callable[..., Any])


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the party's log"


@dataclass(frozen=True)
class _Method:
    """How one method is served: its limit, its request type, whether requests and answers
    are streams, and the servicer method that answers."""

    kind: str  # "short", "setup", "upload" or "long"
    request: type[Any]
    response: type[Any]
    streamed_requests: bool
    streamed_answers: bool


_PARTY_METHODS: dict[str, _Method] = {
    "Describe": _Method("short", pb.DescribeRequest, pb.DescribeResponse, False, False),
    "Abort": _Method("short", pb.AbortRequest, pb.AbortResponse, False, False),
    "Propose": _Method("setup", pb.ProposeRequest, pb.ProposeResponse, False, False),
    "TrainOpen": _Method("setup", pb.TrainOpenRequest, pb.ProposeResponse, False, False),
    "Prekeys": _Method("setup", pb.PrekeysRequest, pb.PrekeysResponse, False, False),
    "Contribute": _Method("upload", pb.ContributeRequest, pb.ContributeChunk, False, True),
    "TrainStep": _Method("long", pb.TrainStepRequest, pb.ContributeChunk, True, True),
}


def _step_progress(message: pb.TrainStepRequest) -> bool:
    """A TrainStep request message moved something: the header, or parameter bytes."""
    return message.WhichOneof("body") == "header" or len(message.parameters) > 0


class PartyServicer(pb_grpc.PartyServicer):
    def __init__(
        self,
        engine: PartyEngine,
        *,
        coordinators: frozenset[str],
        describe: Callable[[str], Sequence[DatasetInfo]],
        training: TrainingEngine | None = None,
        max_long_calls: int = DEFAULT_MAX_LONG_CALLS,
        max_long_calls_per_coordinator: int = DEFAULT_MAX_LONG_CALLS_PER_COORDINATOR,
        max_setup_calls: int = DEFAULT_MAX_SETUP_CALLS,
        max_setup_calls_per_coordinator: int = DEFAULT_MAX_SETUP_CALLS_PER_COORDINATOR,
        max_uploads: int | None = None,
        max_uploads_per_coordinator: int | None = None,
        max_short_calls_per_caller: int = DEFAULT_MAX_SHORT_CALLS_PER_CALLER,
        stream_silence_s: float = DEFAULT_STREAM_SILENCE_S,
        max_call_s: float = DEFAULT_MAX_CALL_S,
    ) -> None:
        """``max_long_calls``: TrainStep streams run at once (more are refused with
        RESOURCE_EXHAUSTED); ``max_long_calls_per_coordinator``: of those, by one
        coordinator; ``max_setup_calls`` and ``max_setup_calls_per_coordinator``: the same
        for Propose and TrainOpen; ``max_uploads`` and ``max_uploads_per_coordinator``: the
        same for Contribute (default: the engine's pending sessions, and at most
        DEFAULT_MAX_UPLOADS_PER_COORDINATOR of them per coordinator);
        ``describe(coordinator)``: the datasets as that coordinator sees them (its own
        share and remainder included); ``max_short_calls_per_caller``: Describe, Abort and
        health checks of one coordinator (the certificates that are not coordinators share
        one such allowance);
        ``stream_silence_s``: how long a call may wait on its coordinator without progress
        (for a request message or request bytes, or for it to take an upload message)
        before it is cancelled; ``max_call_s``: how long any call may last."""
        self.max_long_calls = limit_pair(
            "max_long_calls", max_long_calls, max_long_calls_per_coordinator
        )
        self.max_setup_calls = limit_pair(
            "max_setup_calls", max_setup_calls, max_setup_calls_per_coordinator
        )
        if max_uploads is None:
            max_uploads = engine.max_pending_total
        if max_uploads_per_coordinator is None:
            max_uploads_per_coordinator = min(DEFAULT_MAX_UPLOADS_PER_COORDINATOR, max_uploads)
        self.max_uploads = limit_pair("max_uploads", max_uploads, max_uploads_per_coordinator)
        positive_int("max_short_calls_per_caller", max_short_calls_per_caller)
        self._silence_s = seconds("stream_silence_s", stream_silence_s)
        self._max_call_s = seconds("max_call_s", max_call_s)
        self._engine = engine
        self._training = training
        self._coordinators = coordinators
        self._describe = describe
        party = engine.party_id
        self._long_calls = CallLimit(
            party_id=party,
            total=max_long_calls,
            per_coordinator=max_long_calls_per_coordinator,
            what="long calls (TrainStep)",
            setting="max_long_calls",
        )
        self._setup_calls = CallLimit(
            party_id=party,
            total=max_setup_calls,
            per_coordinator=max_setup_calls_per_coordinator,
            what="setup calls (Propose, TrainOpen)",
            setting="max_setup_calls",
        )
        self._uploads = CallLimit(
            party_id=party,
            total=max_uploads,
            per_coordinator=max_uploads_per_coordinator,
            what="uploads (Contribute)",
            setting="max_uploads",
        )
        # every coordinator, and the strangers together, may hold this many short calls
        self._short_calls = CallLimit(
            party_id=party,
            total=max_short_calls_per_caller * (len(coordinators) + 1),
            per_coordinator=max_short_calls_per_caller,
            what="short calls (Describe, Abort, health checks)",
            setting="max_short_calls",
        )
        self._limit_of = {
            "short": self._short_calls,
            "setup": self._setup_calls,
            "upload": self._uploads,
            "long": self._long_calls,
        }
        self._watchdog = Watchdog()
        self._suspensions = Suspensions.get()
        # session id -> when its Propose was answered (monotonic), for _check_in_time
        self._proposed: OrderedDict[bytes, float] = OrderedDict()
        self._lock_proposed = threading.Lock()
        self._refusals = RefusalLog()

    @property
    def reserved_workers(self) -> int:
        """Workers that counted calls may hold at once: TrainStep streams, setup calls,
        uploads and every caller's short calls."""
        return sum(limit.total for limit in self._limit_of.values())

    def _caller(self, context: grpc.ServicerContext) -> str:
        name = tls.peer_name(context)
        if name not in self._coordinators:
            raise AuthError(
                f"certificate {name[:80]!r} is not a configured coordinator of party "
                f"{self._engine.party_id!r}"
            )
        return name

    @staticmethod
    def _log_key(context: grpc.ServicerContext) -> str:
        """Whom a refusal is logged for (and rate-limited by): the certificate's name."""
        try:
            return repr(tls.peer_name(context)[:80])
        except AuthError:
            return "(a caller without a certificate name)"

    def _who(self, context: grpc.ServicerContext) -> str:
        """The caller as its refusals are logged and health checks counted: a coordinator's
        name, or the key all other certificates share."""
        try:
            name = tls.peer_name(context)
        except AuthError:
            return _STRANGERS
        return name if name in self._coordinators else _STRANGERS

    # -- serving: every method from its raw request stream ---------------------------------

    def _refuse(self, context: grpc.ServicerContext, exc: Exception, method: str) -> None:
        code, message = status_for(exc)
        internal = code is grpc.StatusCode.INTERNAL
        self._refusals.refused(self._log_key(context), method, code, message, internal=internal)
        context.abort(code, message)

    def _begin(
        self, context: grpc.ServicerContext, method: str, kind: str, *, health_check: bool
    ) -> tuple[str, Callable[[], None], CallWatch]:
        """The caller (checked before anything is read), its call counted, and the watch
        over the call."""
        caller = self._who(context) if health_check else self._caller(context)
        if method == "Propose":  # a coordinator whose uploads are at its limit: no new round
            mine = self._uploads.running(caller)
            if mine >= self._uploads.per_coordinator:
                raise self._uploads.refusal(caller, method, mine)
        release = self._limit_of[kind].enter(caller, method)
        context.add_callback(release)  # also when gRPC drops the call's generator
        watch = CallWatch(
            self._watchdog,
            context,
            silence_s=self._silence_s,
            max_call_s=self._max_call_s,
            party_id=self._engine.party_id,
            method=method,
            coordinator=caller,
        )
        return caller, release, watch

    def _unary_handler(
        self,
        method: str,
        spec: _Method,
        answer: Callable[[Any, grpc.ServicerContext], Any],
        *,
        health_check: bool = False,
    ) -> grpc.RpcMethodHandler:
        def behavior(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            release: Callable[[], None] | None = None
            watch: CallWatch | None = None
            try:
                _, release, watch = self._begin(
                    context, method, spec.kind, health_check=health_check
                )
                request = watch.request(requests, spec.request)
                return answer(request, context)
            except Silent:
                return spec.response()  # the call is cancelled: nothing is sent
            except grpc.RpcError:
                # its caller gave the call up before its request was read (e.g. a party
                # resumed after a SIGSTOP): nothing was done, nothing is sent
                log.info("%s: the caller had ended the call before it was read", method)
                return spec.response()
            except Exception as exc:
                if watch is not None and watch.fired is not None:
                    return spec.response()
                self._refuse(context, exc, method)
                raise AssertionError("unreachable: abort raises") from None
            finally:
                if watch is not None:
                    watch.close()
                if release is not None:
                    release()

        return grpc.stream_unary_rpc_method_handler(
            behavior, response_serializer=spec.response.SerializeToString
        )

    def _stream_handler(
        self,
        method: str,
        spec: _Method,
        answer: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
    ) -> grpc.RpcMethodHandler:
        def behavior(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            caller = _STRANGERS
            release: Callable[[], None] | None = None
            watch: CallWatch | None = None
            try:
                caller = self._who(context)
                caller, release, watch = self._begin(context, method, spec.kind, health_check=False)
                request: Any
                if spec.streamed_requests:
                    request = watch.requests(requests, spec.request, _step_progress)  # type: ignore[arg-type]
                else:
                    request = watch.request(requests, spec.request)
                for message in answer(request, context):
                    # gRPC resumes this generator once the message is sent: a coordinator
                    # that stops reading stops it here
                    with watch.waiting("it to take the next upload message"):
                        yield message
            except Exception as exc:
                if watch is not None and watch.fired is not None:
                    return  # cancelled by the watchdog, which logged why
                if isinstance(exc, grpc.RpcError):  # the request stream broke off
                    log.info("%s: coordinator %s ended the call", method, caller)
                    return
                self._refuse(context, exc, method)
            finally:
                if watch is not None:
                    watch.close()
                if release is not None:
                    release()

        return grpc.stream_stream_rpc_method_handler(
            behavior, response_serializer=spec.response.SerializeToString
        )

    def handlers(self, health_servicer: health.HealthServicer) -> list[grpc.GenericRpcHandler]:
        """The Party service and the health check (Check only: a Watch stream would hold a
        worker for as long as its caller likes), each served from its raw request stream."""
        party: dict[str, grpc.RpcMethodHandler] = {}
        for method, spec in _PARTY_METHODS.items():
            answer = getattr(self, method)
            if spec.streamed_answers:
                party[method] = self._stream_handler(method, spec, answer)
            else:
                party[method] = self._unary_handler(method, spec, answer)
        check = _Method(
            "short", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, False, False
        )
        return [
            grpc.method_handlers_generic_handler("mpcdp.proto.Party", party),
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {
                    "Check": self._unary_handler(
                        "Check", check, health_servicer.Check, health_check=True
                    )
                },
            ),
        ]

    # -- the methods ------------------------------------------------------------------------

    def Describe(
        self, request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.DescribeResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="DescribeRequest")
        return codec.description_to_pb(
            PartyDescription(party_id=self._engine.party_id, datasets=tuple(self._describe(caller)))
        )

    def _check_in_time(
        self, context: grpc.ServicerContext, method: str, *, session_id: bytes, caller: str
    ) -> Callable[[], bool]:
        """Refuse a call that its coordinator has given up (cancelled, or past its deadline,
        or so close to it that the answer could not arrive), before anything is reserved or
        charged: a Contribute that arrives late, e.g. at a party resumed after a SIGSTOP,
        must not charge a round the coordinator has re-run without this party. Its session
        is closed (and its reservation released) as by an Abort. Returns the check to ask
        again right before the charge: :meth:`_unstalled`, from now."""
        now = time.monotonic()
        with self._lock_proposed:
            proposed = self._proposed.pop(session_id, None)
        # a Contribute is late after a stall longer than its time left since its session's
        # Propose; a Propose (or a session not remembered) only during such a stall
        if self._in_time(context, since=now if proposed is None else proposed):
            return self._unstalled(context)
        self._engine.abort(session_id=session_id, coordinator=caller)
        log.info(
            "%s of session %s from %s arrived after its caller gave up; refused, nothing charged",
            method,
            session_id.hex(),
            caller,
        )
        raise SessionError(
            f"{method} of session {session_id.hex()} arrived after its deadline (or while "
            "this party was suspended); nothing was reserved or charged"
        )

    def _remember(self, session_id: bytes) -> None:
        """The time of a session's latest exchange (Propose, TrainOpen, the end of a
        TrainStep): a stall of this process after it makes the session's next call late."""
        with self._lock_proposed:
            self._proposed[session_id] = time.monotonic()
            self._proposed.move_to_end(session_id)
            while len(self._proposed) > _MAX_PROPOSED:
                self._proposed.popitem(last=False)

    def _unstalled(self, context: grpc.ServicerContext) -> Callable[[], bool]:
        """The check a party asks again after working on private data, right before it
        charges: false only when this process has stalled since now (a SIGSTOP, which
        under load can reach a party's threads after one of them read the call; a frozen
        VM) for longer than the call has left now. Never false because the deadline passed
        or the call was cancelled while the party worked: that would be a refusal, free of
        charge, whose moment tells the coordinator how long the work on private data took
        (the upload then goes into a call nobody reads: an overcharge, never an
        undercharge)."""
        left = context.time_remaining()
        if left is None:
            return lambda: True
        since = time.monotonic()
        return lambda: not self._suspensions.longer_than(left, since=since)

    def _in_time(self, context: grpc.ServicerContext, *, since: float) -> bool:
        """Is the caller still waiting for this call's answer? Not cancelled, not past (or
        within LATE_CALL_MARGIN_S of) its deadline, and this process not stalled since
        ``since`` for longer than the time the call has left."""
        left = context.time_remaining()
        return (
            context.is_active()
            and (left is None or left >= LATE_CALL_MARGIN_S)
            and (left is None or not self._suspensions.longer_than(left, since=since))
        )

    def Propose(
        self, request: pb.ProposeRequest, context: grpc.ServicerContext
    ) -> pb.ProposeResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="ProposeRequest")
        session_id = codec.check_session(request.session_id)
        spec = codec.spec_from_pb(request.spec)
        self._check_in_time(context, "Propose", session_id=session_id, caller=caller)
        proposal = self._engine.propose(session_id=session_id, spec=spec, coordinator=caller)
        self._remember(session_id)
        return codec.key_to_pb(session_id, proposal.key, length=proposal.length)

    def Contribute(
        self, request: pb.ContributeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ContributeChunk]:
        caller = self._caller(context)
        codec.check_version(request.version, what="ContributeRequest")
        session_id = codec.check_session(request.session_id)
        warm = request.HasField("spec")
        if warm and len(request.keys):
            raise ProtocolError("a warm Contribute (with a spec) carries prekeys, not keys")
        if not warm and len(request.prekeys):
            raise ProtocolError("prekeys need the spec of the round (a warm Contribute)")
        keys = codec.keys_from_pb(request.keys, session_id=session_id)
        prekeys = codec.prekeys_from_pb(request.prekeys)
        spec = codec.spec_from_pb(request.spec) if warm else None
        chunk = codec.check_chunk_bytes(request.chunk_bytes)  # before the ledger is charged
        in_time = self._check_in_time(context, "Contribute", session_id=session_id, caller=caller)
        if spec is not None:  # one round trip: the party checks and reserves here
            contribution = self._engine.contribute_warm(
                session_id=session_id, spec=spec, keys=prekeys, coordinator=caller,
                in_time=in_time,
            )  # fmt: skip
        else:
            contribution = self._engine.contribute(
                session_id=session_id, keys=keys, coordinator=caller, in_time=in_time
            )
        # the session holds its slot until the upload ends, however it ends: sent, failed,
        # cancelled by the watchdog, or the coordinator gone (gRPC may drop this generator
        # without closing it; the call's end runs the callback). Given back once.
        ended = functools.partial(self._engine.upload_ended, session_id=session_id)
        if not context.add_callback(ended):
            ended()  # the call has already ended
        try:
            yield from codec.encode_chunks(session_id, contribution, chunk_bytes=chunk)
        finally:
            contribution.close()
        del contribution  # its vector is sent: free it before the next one is built
        self._engine.round_finished(session_id=session_id)

    def Prekeys(
        self, request: pb.PrekeysRequest, context: grpc.ServicerContext
    ) -> pb.PrekeysResponse:
        """A batch of signed keys for the caller's warm rounds (nothing about the data)."""
        caller = self._caller(context)
        codec.check_version(request.version, what="PrekeysRequest")
        keys = self._engine.publish_keys(
            coordinator=caller,
            batch_id=request.batch_id,
            count=request.count,
            ttl_s=request.ttl_s,
        )
        return pb.PrekeysResponse(
            version=PROTOCOL_VERSION,
            party_id=self._engine.party_id,
            keys=[codec.prekey_to_pb(k) for k in keys],
        )

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="AbortRequest")
        session_id = codec.check_session(request.session_id)
        codec.check_reason(request.reason)
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

    def TrainOpen(
        self, request: pb.TrainOpenRequest, context: grpc.ServicerContext
    ) -> pb.ProposeResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="TrainOpenRequest")
        session_id = codec.check_session(request.session_id)
        spec = codec.train_spec_from_pb(request.spec)
        proposal = self._trainer().open(session_id=session_id, spec=spec, coordinator=caller)
        self._remember(session_id)
        return codec.key_to_pb(session_id, proposal.key, length=proposal.length)

    def TrainStep(
        self, request_iterator: Iterator[pb.TrainStepRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ContributeChunk]:
        caller = self._caller(context)
        trainer = self._trainer()
        arrived = time.monotonic()
        session_id, header, keys, values = codec.decode_step_requests(
            request_iterator, max_values=trainer.max_parameters
        )
        chunk = codec.check_chunk_bytes(header.chunk_bytes)  # before the ledger is charged
        # a step that waited in the socket while this party was stopped looks fresh to
        # gRPC: it is late after a stall longer than its time left since the session's
        # previous exchange
        with self._lock_proposed:
            since = min(arrived, self._proposed.get(session_id, arrived))
        run = trainer.evaluate if header.evaluate else trainer.step
        upload = run(
            session_id=session_id,
            step=header.step,
            keys=keys,
            parameters=values,
            full=header.full,
            coordinator=caller,
            # a step its coordinator gave up on (and re-ran among the other sites) is
            # refused before it is charged; after its private work, only a stall refuses
            in_time=functools.partial(self._in_time, context, since=since),
            unstalled=self._unstalled(context),
        )
        yield from codec.encode_chunks(session_id, upload, chunk_bytes=chunk)
        self._remember(session_id)
        del upload  # sent: free it before the next step's pad is built
        if not header.evaluate:
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


def connection_limit(max_connections: int | None = None) -> int:
    """The connections a node allows at once: ``max_connections`` (default
    DEFAULT_MAX_CONNECTIONS), but at most half of this process's file descriptors
    (RLIMIT_NOFILE), so that its ledger, data and logs always find one."""
    if max_connections is not None:
        positive_int("max_connections", max_connections)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // 2))


class ServerHandle(Protocol):
    """What a running server's owner needs of it (a grpc.Server is one): stop it, with a
    grace period in seconds, and wait on the event that tells it has stopped."""

    def stop(self, grace: float | None) -> threading.Event: ...


def start_server(
    servicer: PartyServicer,
    *,
    listen: str,
    creds: tls.Credentials,
    max_workers: int | None = None,
    max_connections: int | None = None,
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
) -> tuple[grpc.Server, int]:
    """Start the mTLS server with the Party and health services; return it and its port.

    ``max_workers``: threads serving calls, more than the servicer's ``reserved_workers``
    (every call its limits allow) so that a refusal always finds one (default: that plus
    SPARE_WORKERS). ``max_connections``: connections open at once (default
    DEFAULT_MAX_CONNECTIONS; never more than half of the process's file descriptors);
    ``handshake_timeout_s``: how long a connection may take for its TLS handshake. An
    address already in use is refused (ParameterError naming ``listen``)."""
    if max_workers is None:
        max_workers = servicer.reserved_workers + SPARE_WORKERS
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise ParameterError("max_workers", max_workers, "must be an integer")
    if max_workers <= servicer.reserved_workers:
        raise ParameterError(
            "max_workers",
            max_workers,
            f"must be more than the {servicer.reserved_workers} workers that the calls the "
            "servicer's limits allow may hold, so that health checks and Describe always "
            "find one",
        )
    handshake_ms = round(seconds("handshake_timeout_s", handshake_timeout_s) * 1000)
    connections = connection_limit(max_connections)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="party"),
        options=[
            *SERVER_OPTIONS,
            # a connection that has not finished its TLS handshake by then is closed, and
            # connections beyond the limit are closed as they arrive: strangers that stall
            # their handshakes cannot take every file descriptor
            ("grpc.server_handshake_timeout_ms", max(1, handshake_ms)),
            ("grpc.max_allowed_incoming_connections", connections),
        ],
    )
    health_servicer = health.HealthServicer()
    server.add_generic_rpc_handlers(servicer.handlers(health_servicer))
    try:
        port = server.add_secure_port(listen, tls.server_credentials(creds))
    except RuntimeError:  # gRPC 1.85 raises where older versions returned 0
        port = 0
    if port == 0:
        raise ParameterError("listen", listen, _bind_problem(listen))
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("mpcdp.proto.Party", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving with %d workers, at most %d connections, TLS handshakes within %g s",
        max_workers,
        connections,
        handshake_ms / 1000,
    )
    return server, port
