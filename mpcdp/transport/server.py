"""The Party gRPC servicer: thin, with every domain error mapped to a status code here.

| error                                  | status code          |
| AuthError (caller not a coordinator)   | PERMISSION_DENIED    |
| PolicyError, DataError                 | FAILED_PRECONDITION  |
| SessionError                           | FAILED_PRECONDITION  |
| ProtocolError, ParameterError          | INVALID_ARGUMENT     |
| BudgetExceededError                    | RESOURCE_EXHAUSTED   |
| LedgerError (query id already answered)| ALREADY_EXISTS       |
| HeadroomError                          | OUT_OF_RANGE         |
| too many long or setup calls (below)   | RESOURCE_EXHAUSTED   |
| anything else                          | INTERNAL (details only in the party's log) |

Messages carry the domain error's text, which names parameters and values but never a share,
a key or a noise value.

A party survives a hostile coordinator:

* Calls that can hold a worker are bounded, per coordinator and in total, and the worker
  pool has threads for all of them plus SHORT_CALL_WORKERS, so health checks, Describe and
  Abort always find one:
  - TrainStep streams (``max_long_calls``): one beyond a limit is refused at once
    (RESOURCE_EXHAUSTED, naming the coordinator and the limit);
  - Propose and TrainOpen, which build noise or a model (``max_setup_calls``): the same;
  - Contribute is never refused for being busy: it is the call that charges, and a party
    that refused it after others charged would make the ledgers disagree. Its number is
    bounded by the engine's pending sessions (a slot per session, taken at Propose), and a
    Contribute for an unknown session is refused before it waits on anything.
* A long call that waits on its coordinator for longer than ``stream_silence_s`` (for its
  next request message, or for it to take the next upload message) is cancelled; the time
  the party itself works is not counted.
* HTTP/2 keepalive pings find connections whose peer has gone.
* The port is bound exclusively (no SO_REUSEPORT): a second node on an address in use fails
  to start instead of sharing the connections.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
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
    RankFailure,
    SessionError,
)
from mpcdp.proto import party_pb2 as pb
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.protocol.party import PartyEngine
from mpcdp.protocol.training import TrainingEngine
from mpcdp.transport import codec, tls

__all__ = [
    "DEFAULT_MAX_LONG_CALLS",
    "DEFAULT_MAX_LONG_CALLS_PER_COORDINATOR",
    "DEFAULT_MAX_SETUP_CALLS",
    "DEFAULT_MAX_SETUP_CALLS_PER_COORDINATOR",
    "DEFAULT_STREAM_SILENCE_S",
    "SERVER_OPTIONS",
    "SHORT_CALL_WORKERS",
    "PartyServicer",
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
#: Seconds a long call may wait on its coordinator before the party cancels it.
DEFAULT_STREAM_SILENCE_S = 30.0
#: Worker threads beyond the long-call limit: always free for the short calls.
SHORT_CALL_WORKERS = 8

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


class _TooBusy(Exception):
    """A call beyond a limit of :class:`_CallLimit`."""


class _Silent(Exception):
    """A request stream that ended because the watchdog cancelled its call."""


_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (_TooBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
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


class _CallLimit:
    """Counts the running calls of one kind; refuses one beyond the limits at once.
    ``what`` names the kind and ``setting`` the keyword of its limits in messages."""

    def __init__(
        self, *, party_id: str, total: int, per_coordinator: int, what: str, setting: str
    ) -> None:
        self._party_id = party_id
        self._total = total
        self._per_coordinator = per_coordinator
        self._what = what
        self._setting = setting
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()

    def enter(self, coordinator: str, method: str) -> Callable[[], None]:
        """Count one call of ``coordinator``; returns its release (idempotent)."""
        refused = f"party {self._party_id!r} refused {method} from coordinator {coordinator!r}"
        with self._lock:
            mine = self._running[coordinator]
            if mine >= self._per_coordinator:
                raise _TooBusy(
                    f"{refused}: {mine} {self._what} of this coordinator are already running, "
                    f"the limit {self._setting}_per_coordinator is {self._per_coordinator}; "
                    "retry when one has finished"
                )
            running = sum(self._running.values())
            if running >= self._total:
                raise _TooBusy(
                    f"{refused}: {running} {self._what} are already running, the limit "
                    f"{self._setting} is {self._total}; retry when one has finished"
                )
            self._running[coordinator] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._running[coordinator] -= 1
                    if not self._running[coordinator]:
                        del self._running[coordinator]

        return release


class _Watchdog:
    """One thread that runs each armed callback once its time has come, unless disarmed
    first; the thread runs only while something is armed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._running = False
        self._wake_at = math.inf

    def arm(self, after_s: float, callback: Callable[[], None]) -> int:
        at = time.monotonic() + after_s
        with self._cond:
            token = next(self._ids)
            self._armed[token] = (at, callback)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="party-watchdog", daemon=True).start()
            elif at < self._wake_at:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [t for t, (at, _) in self._armed.items() if at <= now]
                callbacks = [self._armed.pop(t)[1] for t in due]
                if not callbacks:
                    if not self._armed:
                        self._running = False
                        self._wake_at = math.inf
                        return
                    self._wake_at = min(at for at, _ in self._armed.values())
                    self._cond.wait(self._wake_at - now)
                    continue
            for callback in callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("watchdog callback failed")


class _CallWatch:
    """Cancels one long call that waits on its coordinator for longer than ``limit_s``."""

    def __init__(
        self,
        watchdog: _Watchdog,
        context: grpc.ServicerContext,
        *,
        limit_s: float,
        party_id: str,
        method: str,
        coordinator: str,
    ) -> None:
        self._watchdog = watchdog
        self._context = context
        self._limit_s = limit_s
        self._party_id = party_id
        self._method = method
        self._coordinator = coordinator
        #: what the call waited for when the watchdog cancelled it
        self.fired: str | None = None

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """The block waits on the coordinator (for ``what``)."""
        token = self._watchdog.arm(self._limit_s, functools.partial(self._fire, what))
        try:
            yield
        finally:
            self._watchdog.disarm(token)

    def _fire(self, what: str) -> None:
        self.fired = what
        log.warning(
            "party %s cancelled %s from coordinator %s: it waited %g s for %s "
            "(stream_silence_s=%g)",
            self._party_id,
            self._method,
            self._coordinator,
            self._limit_s,
            what,
            self._limit_s,
        )
        self._context.cancel()

    def requests(self, messages: Iterator[Any]) -> Iterator[Any]:
        """``messages`` (a request stream), each wait for the next one watched."""
        while True:
            with self.waiting("its next request message"):
                try:
                    message = next(messages)
                except StopIteration:
                    break
            yield message
        if self.fired is not None:  # a cancelled call's request stream just ends
            raise _Silent()


def _long_call(*, streamed_requests: bool, limited: bool) -> Callable[[F], F]:
    """A long call (server-streaming answer): counted against ``max_long_calls`` when
    ``limited``, watched for silence, every domain error mapped to a status code."""

    def decorate(fn: F) -> F:
        method = fn.__name__

        @functools.wraps(fn)
        def wrapper(
            self: PartyServicer, request: Any, context: grpc.ServicerContext
        ) -> Iterator[Any]:
            release: Callable[[], None] | None = None
            watch: _CallWatch | None = None
            try:
                caller = self._caller(context)
                if limited:
                    release = self._long_calls.enter(caller, method)
                    context.add_callback(release)  # also when gRPC drops this generator
                watch = _CallWatch(
                    self._watchdog,
                    context,
                    limit_s=self._silence_s,
                    party_id=self._engine.party_id,
                    method=method,
                    coordinator=caller,
                )
                if streamed_requests:
                    request = watch.requests(request)
                for message in fn(self, request, context):
                    # gRPC resumes this generator once the message is sent: a coordinator
                    # that stops reading stops it here
                    with watch.waiting("it to take the next upload message"):
                        yield message
            except Exception as exc:
                if watch is not None and watch.fired is not None:
                    return  # cancelled by the watchdog, which logged why
                if isinstance(exc, grpc.RpcError):  # the request stream broke off
                    log.info("%s: the coordinator ended the call", method)
                    return
                _abort(context, exc, method)
            finally:
                if release is not None:
                    release()

        return wrapper  # type: ignore[return-value]

    return decorate


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(name, value, "must be an integer >= 1")
    return value


def _limits(name: str, total: int, per_coordinator: int) -> int:
    """A (total, per coordinator) pair of limits, checked; returns the total."""
    _positive_int(name, total)
    _positive_int(f"{name}_per_coordinator", per_coordinator)
    if per_coordinator > total:
        raise ParameterError(
            f"{name}_per_coordinator", per_coordinator, f"must be <= {name}={total}"
        )
    return total


def _setup_call(fn: F) -> F:
    """Propose / TrainOpen: a unary call that builds something, counted against
    ``max_setup_calls``; every domain error mapped to a status code."""

    @functools.wraps(fn)
    def wrapper(self: PartyServicer, request: Any, context: grpc.ServicerContext) -> Any:
        release: Callable[[], None] | None = None
        try:
            release = self._setup_calls.enter(self._caller(context), fn.__name__)
            return fn(self, request, context)
        except Exception as exc:
            _abort(context, exc, fn.__name__)
        finally:
            if release is not None:
                release()

    return wrapper  # type: ignore[return-value]


class PartyServicer(pb_grpc.PartyServicer):
    def __init__(
        self,
        engine: PartyEngine,
        *,
        coordinators: frozenset[str],
        describe: Callable[[], list[pb.DatasetInfo]],
        training: TrainingEngine | None = None,
        max_long_calls: int = DEFAULT_MAX_LONG_CALLS,
        max_long_calls_per_coordinator: int = DEFAULT_MAX_LONG_CALLS_PER_COORDINATOR,
        max_setup_calls: int = DEFAULT_MAX_SETUP_CALLS,
        max_setup_calls_per_coordinator: int = DEFAULT_MAX_SETUP_CALLS_PER_COORDINATOR,
        stream_silence_s: float = DEFAULT_STREAM_SILENCE_S,
    ) -> None:
        """``max_long_calls``: TrainStep streams run at once (more are refused with
        RESOURCE_EXHAUSTED); ``max_long_calls_per_coordinator``: of those, by one
        coordinator; ``max_setup_calls`` and ``max_setup_calls_per_coordinator``: the same
        for Propose and TrainOpen; ``stream_silence_s``: how long a TrainStep or Contribute
        may wait on its coordinator (for a request message, or for it to take an upload
        message) before it is cancelled. Contribute is bounded by the engine's pending
        sessions (module docstring)."""
        self.max_long_calls = _limits(
            "max_long_calls", max_long_calls, max_long_calls_per_coordinator
        )
        self.max_setup_calls = _limits(
            "max_setup_calls", max_setup_calls, max_setup_calls_per_coordinator
        )
        if (
            isinstance(stream_silence_s, bool)
            or not isinstance(stream_silence_s, int | float)
            or not math.isfinite(stream_silence_s)
            or stream_silence_s <= 0
        ):
            raise ParameterError(
                "stream_silence_s", stream_silence_s, "must be a finite number of seconds > 0"
            )
        self._engine = engine
        self._training = training
        self._coordinators = coordinators
        self._describe = describe
        self._long_calls = _CallLimit(
            party_id=engine.party_id,
            total=max_long_calls,
            per_coordinator=max_long_calls_per_coordinator,
            what="long calls (TrainStep)",
            setting="max_long_calls",
        )
        self._setup_calls = _CallLimit(
            party_id=engine.party_id,
            total=max_setup_calls,
            per_coordinator=max_setup_calls_per_coordinator,
            what="setup calls (Propose, TrainOpen)",
            setting="max_setup_calls",
        )
        self._silence_s = float(stream_silence_s)
        self._watchdog = _Watchdog()

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

    @_setup_call
    def Propose(
        self, request: pb.ProposeRequest, context: grpc.ServicerContext
    ) -> pb.ProposeResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="ProposeRequest")
        session_id = codec.check_session(request.session_id)
        spec = codec.spec_from_pb(request.spec)
        proposal = self._engine.propose(session_id=session_id, spec=spec, coordinator=caller)
        return codec.key_to_pb(session_id, proposal.key, length=proposal.length)

    @property
    def reserved_workers(self) -> int:
        """Workers that bounded calls may hold at once: TrainStep streams, setup calls and
        one Contribute per pending session the engine allows."""
        return self.max_long_calls + self.max_setup_calls + self._engine.max_pending_total

    @_long_call(streamed_requests=False, limited=False)
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

    @_setup_call
    def TrainOpen(
        self, request: pb.TrainOpenRequest, context: grpc.ServicerContext
    ) -> pb.ProposeResponse:
        caller = self._caller(context)
        codec.check_version(request.version, what="TrainOpenRequest")
        session_id = codec.check_session(request.session_id)
        spec = codec.train_spec_from_pb(request.spec)
        proposal = self._trainer().open(session_id=session_id, spec=spec, coordinator=caller)
        return codec.key_to_pb(session_id, proposal.key, length=proposal.length)

    @_long_call(streamed_requests=True, limited=True)
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
    servicer: PartyServicer,
    *,
    listen: str,
    creds: tls.Credentials,
    max_workers: int | None = None,
) -> tuple[grpc.Server, int]:
    """Start the mTLS server with the Party and health services; return it and its port.

    ``max_workers``: threads serving calls, more than the servicer's ``reserved_workers``
    (TrainStep, setup calls and Contributes together) so that short calls always find one
    (default: that plus SHORT_CALL_WORKERS). An address already in use is refused
    (ParameterError naming ``listen``)."""
    if max_workers is None:
        max_workers = servicer.reserved_workers + SHORT_CALL_WORKERS
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise ParameterError("max_workers", max_workers, "must be an integer")
    if max_workers <= servicer.reserved_workers:
        raise ParameterError(
            "max_workers",
            max_workers,
            f"must be more than the {servicer.reserved_workers} workers that TrainStep, "
            "Propose/TrainOpen and Contribute calls may hold, so that health checks and "
            "Describe always find one",
        )
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
