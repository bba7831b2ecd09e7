"""How a party node guards its calls against a hostile coordinator and strangers (the rules
are listed in mpcdp.transport.server's docstring): the limits on calls running at once, per
kind and per coordinator (:class:`CallLimit`); the watchdog that cancels a call waiting on its
coordinator without progress or living too long (:class:`Watchdog`, :class:`CallWatch`); the
strict parsing of request messages with a cap per method (:func:`parse_request`); the
bounded refusal log (:class:`RefusalLog`); and the detection of this process's own stalls
(:class:`Suspensions`), so a call that waited in the socket while the party was stopped is
not taken for a fresh one. Nothing happens at import time.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from mpcdp.errors import ParameterError, ProtocolError
from mpcdp.transport import tls

__all__ = [
    "MAX_REQUEST_BYTES",
    "REFUSAL_LOG_BURST",
    "REFUSAL_LOG_WINDOW_S",
    "SUSPENSION_S",
    "CallLimit",
    "CallWatch",
    "RefusalLog",
    "Silent",
    "Suspensions",
    "TooBusy",
    "Watchdog",
    "limit_pair",
    "parse_request",
    "positive_int",
    "seconds",
]

#: the server's logger: an operator's log configuration for the node covers these lines too
log = logging.getLogger("mpcdp.transport.server")

#: Refusal log lines per caller and window.
REFUSAL_LOG_BURST = 20
REFUSAL_LOG_WINDOW_S = 60.0
#: The longest refusal message a log line carries.
_MAX_LOGGED = 400

#: The largest request message of each method, in bytes (a larger one is refused before it
#: is parsed; every field is capped again when it is decoded, codec.LIMITS). A valid
#: Describe, Abort or health check is a few bytes, a Propose or Contribute at most a few
#: hundred KiB (codec.LIMITS: 64 signed keys with their certificates); 2 MiB leaves room
#: and lets an oversized field still be named by its own limit. TrainOpen may carry an
#: architecture of 2^14 entries, and a TrainStep message one chunk of parameters.
MAX_REQUEST_BYTES: dict[str, int] = {
    "Describe": 2 << 20,
    "Abort": 2 << 20,
    "Check": 2 << 20,
    "Propose": 2 << 20,
    "Contribute": 2 << 20,
    "Prekeys": 2 << 20,
    "TrainOpen": tls.MAX_MESSAGE_BYTES,
    "TrainStep": tls.MAX_MESSAGE_BYTES,
}

#: The shortest stall of the whole party process (a SIGSTOP, a frozen VM, or starvation)
#: that is recorded, and the least a stall must last to make a call count as late (a call
#: is late only after a stall longer than its own time left; see Suspensions).
SUSPENSION_S = 1.0
_TICK_S = 0.1
#: stalls remembered
_MAX_STALLS = 64


class Suspensions:
    """Notices when this process was suspended, so that a call read after a resume is not
    taken for a fresh one: gRPC measures a call's deadline from when the party reads it, so
    a Contribute that waited in the socket while the party was stopped looks on time, although
    its coordinator gave it up long ago. A thread ticks every _TICK_S; a tick more than
    SUSPENSION_S after the previous one records a stall (its end and length). A call is
    taken for late only after a stall longer than the time it has left (a stall shorter than
    that cannot have made it late), so a party that is merely busy for a moment refuses
    nothing. One per process (:meth:`get`): a suspension stops every servicer in it."""

    _shared: Suspensions | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def get(cls) -> Suspensions:
        """This process's watcher, started by the first servicer that asks."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_tick = time.monotonic()
        self._stalls: deque[tuple[float, float]] = deque(maxlen=_MAX_STALLS)  # (end, length)
        threading.Thread(target=self._run, name="party-suspensions", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(_TICK_S)
            now = time.monotonic()
            with self._lock:
                if now - self._last_tick > SUSPENSION_S:
                    self._stalls.append((now, now - self._last_tick))
                    log.warning(
                        "this party process was suspended or stalled for %.1f s",
                        now - self._last_tick,
                    )
                self._last_tick = now

    def longer_than(self, length: float, *, since: float) -> bool:
        """Did this process stall for more than ``length`` seconds at once after monotonic
        time ``since``, or has it been stalled that long until now (its ticks not yet
        resumed)?"""
        length = max(length, SUSPENSION_S)
        now = time.monotonic()
        with self._lock:
            if now - self._last_tick > length:
                return True
            return any(end > since and stall > length for end, stall in self._stalls)


class TooBusy(Exception):
    """A call beyond a limit of :class:`CallLimit`."""


class Silent(Exception):
    """A request stream that ended because the watchdog cancelled its call."""


class RefusalLog:
    """Logs refusals, one bounded line each, at most ``burst`` per caller every
    ``window_s`` seconds; then one line says how many of that caller's were left out. It
    remembers at most ``max_callers`` callers (the oldest is forgotten first)."""

    def __init__(
        self,
        *,
        burst: int = REFUSAL_LOG_BURST,
        window_s: float = REFUSAL_LOG_WINDOW_S,
        max_callers: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = burst
        self._window_s = window_s
        self._max_callers = max_callers
        self._clock = clock
        self._lock = threading.Lock()
        # caller -> [window start, lines logged in it, lines left out]
        self._callers: OrderedDict[str, list[float]] = OrderedDict()

    def allow(self, caller: str) -> tuple[bool, int]:
        """Whether a line about ``caller`` may be logged now, and how many of its lines
        were left out in its last full window (to be said once)."""
        now = self._clock()
        with self._lock:
            entry = self._callers.get(caller)
            if entry is None or now - entry[0] >= self._window_s:
                left_out = int(entry[2]) if entry is not None else 0
                entry = [now, 0.0, 0.0]
                self._callers[caller] = entry
                while len(self._callers) > self._max_callers:
                    self._callers.popitem(last=False)
            else:
                left_out = 0
            self._callers.move_to_end(caller)
            if entry[1] < self._burst:
                entry[1] += 1
                if entry[1] == self._burst:
                    return True, -1 - left_out  # the last line of this window: say so
                return True, left_out
            entry[2] += 1
            return False, 0

    def refused(
        self, caller: str, method: str, code: grpc.StatusCode, message: str, *, internal: bool
    ) -> None:
        ok, left_out = self.allow(caller)
        if not ok:
            return
        note = ""
        last = left_out < 0
        if last:
            left_out = -1 - left_out
        if left_out:
            note += f" ({left_out} more refusals of {caller} were not logged)"
        if last:
            note += f" (further refusals of {caller} within {self._window_s:g} s are not logged)"
        if len(message) > _MAX_LOGGED:
            message = message[:_MAX_LOGGED] + f"... ({len(message)} characters)"
        if internal:
            log.error("%s from %s failed%s", method, caller, note, exc_info=True)
        else:
            log.warning("%s from %s refused (%s): %s%s", method, caller, code.name, message, note)


class CallLimit:
    """Counts the running calls of one kind; refuses one beyond the limits at once.
    ``what`` names the kind and ``setting`` the keyword of its limits in messages."""

    def __init__(
        self, *, party_id: str, total: int, per_coordinator: int, what: str, setting: str
    ) -> None:
        self._party_id = party_id
        self.total = total
        self.per_coordinator = per_coordinator
        self._what = what
        self._setting = setting
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()

    def running(self, coordinator: str) -> int:
        with self._lock:
            return self._running[coordinator]

    def refusal(self, coordinator: str, method: str, mine: int) -> TooBusy:
        return TooBusy(
            f"party {self._party_id!r} refused {method} from coordinator {coordinator!r}: "
            f"{mine} {self._what} of this coordinator are already running, the limit "
            f"{self._setting}_per_coordinator is {self.per_coordinator}; retry when one has "
            "finished"
        )

    def enter(self, coordinator: str, method: str) -> Callable[[], None]:
        """Count one call of ``coordinator``; returns its release (idempotent)."""
        with self._lock:
            mine = self._running[coordinator]
            if mine >= self.per_coordinator:
                raise self.refusal(coordinator, method, mine)
            running = sum(self._running.values())
            if running >= self.total:
                raise TooBusy(
                    f"party {self._party_id!r} refused {method} from coordinator "
                    f"{coordinator!r}: {running} {self._what} are already running, the limit "
                    f"{self._setting} is {self.total}; retry when one has finished"
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


class Watchdog:
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


def parse_request(raw: Any, kind: type[Any], *, method: str) -> Any:
    """A request message of ``kind`` from its bytes; anything else is a ProtocolError that
    names the method and the size, never the contents."""
    if not isinstance(raw, bytes):  # the raw handlers get bytes; nothing else is a request
        raise ProtocolError(f"{method}: the request is not a message")
    limit = MAX_REQUEST_BYTES[method]
    if len(raw) > limit:
        raise ProtocolError(
            f"{method}: a request message of {len(raw)} bytes; the limit is {limit} bytes"
        )
    try:
        return kind.FromString(raw)
    except Exception:  # DecodeError, or the parser's recursion limit: not a valid message
        raise ProtocolError(
            f"{method}: the request ({len(raw)} bytes) is not a valid "
            f"{kind.DESCRIPTOR.name} message"
        ) from None


class CallWatch:
    """Cancels one call that waits on its coordinator without progress for longer than
    ``silence_s``, or that lives longer than ``max_call_s``."""

    def __init__(
        self,
        watchdog: Watchdog,
        context: grpc.ServicerContext,
        *,
        silence_s: float,
        max_call_s: float,
        party_id: str,
        method: str,
        coordinator: str,
    ) -> None:
        self._watchdog = watchdog
        self._context = context
        self._silence_s = silence_s
        self._party_id = party_id
        self._method = method
        self._coordinator = coordinator
        #: why the watchdog cancelled the call
        self.fired: str | None = None
        self._total = watchdog.arm(
            max_call_s,
            functools.partial(self._fire, f"it ran for {max_call_s:g} s (max_call_s)"),
        )

    def close(self) -> None:
        self._watchdog.disarm(self._total)

    def _silent(self, what: str) -> None:
        self._fire(
            f"it waited {self._silence_s:g} s for {what} without progress (stream_silence_s)"
        )

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """The block waits on the coordinator (for ``what``)."""
        token = self._watchdog.arm(self._silence_s, functools.partial(self._silent, what))
        try:
            yield
        finally:
            self._watchdog.disarm(token)

    def _fire(self, why: str) -> None:
        if self.fired is not None:
            return
        self.fired = why
        log.warning(
            "party %s cancelled %s from coordinator %s: %s",
            self._party_id,
            self._method,
            self._coordinator,
            why,
        )
        self._context.cancel()

    def request(self, messages: Iterator[Any], kind: type[Any]) -> Any:
        """The one request message of a unary call, read (watched) and parsed."""
        with self.waiting("its request message"):
            try:
                raw = next(messages)
            except StopIteration:
                raw = None
        if self.fired is not None:
            raise Silent()
        if raw is None:
            raise ProtocolError(f"{self._method}: the call carried no request message")
        return parse_request(raw, kind, method=self._method)

    def requests(
        self, messages: Iterator[Any], kind: type[Any], progress: Callable[[Any], bool]
    ) -> Iterator[Any]:
        """The parsed messages of a request stream. The silence timer runs from the last
        message that made ``progress``: messages that carry nothing do not reset it."""
        token: int | None = None
        what = "request bytes of its upload"
        try:
            while True:
                if token is None:
                    token = self._watchdog.arm(
                        self._silence_s, functools.partial(self._silent, what)
                    )
                try:
                    raw = next(messages)
                except StopIteration:
                    break
                message = parse_request(raw, kind, method=self._method)
                if progress(message):
                    self._watchdog.disarm(token)
                    token = None
                yield message
        finally:
            if token is not None:
                self._watchdog.disarm(token)
        if self.fired is not None:  # a cancelled call's request stream just ends
            raise Silent()


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(name, value, "must be an integer >= 1")
    return value


def seconds(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ParameterError(name, value, "must be a finite number of seconds > 0")
    return float(value)


def limit_pair(name: str, total: int, per_coordinator: int) -> int:
    """A (total, per coordinator) pair of limits, checked; returns the total."""
    positive_int(name, total)
    positive_int(f"{name}_per_coordinator", per_coordinator)
    if per_coordinator > total:
        raise ParameterError(
            f"{name}_per_coordinator", per_coordinator, f"must be <= {name}={total}"
        )
    return total
