"""Who failed, and what to do about it: the rules a coordinator applies when parties fail in a
round, shared by the query rounds (mpcdp.protocol.query.round_coordinator) and the training
steps (mpcdp.protocol.training.roster).

- :data:`FAILURES` decides, by a failed call's status code, whether the failure is the party's
  own (it is left out and the work re-run with the others) or the work's (every party would
  answer the same: stop);
- :func:`refused` tells a refusal before any charge from a silence, after which only the
  party's own ledger knows what it charged;
- :func:`abort_all` tells every party to forget a session at once, and
  :func:`abort_until_delivered` keeps telling a party that gave no answer in time, so that a
  party resumed after a SIGSTOP gives back its reservation at once;
- :func:`roster_shortfall` says why a roster can no longer answer: fewer than ``min_parties``
  parties, or no honest noise share left (n' - t < 1; docs/design.md, "Threat model").

Nothing happens at import time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

from mpcdp.errors import MpcdpError, PartyError, ProtocolError, SessionError
from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.session import Proposal

log = logging.getLogger(__name__)


@runtime_checkable
class Pingable(Protocol):
    @property
    def party_id(self) -> str: ...

    def ping(self) -> None: ...


class HasPartyId(Protocol):
    @property
    def party_id(self) -> str: ...


class Abortable(HasPartyId, Protocol):
    def abort(self, *, session_id: bytes, reason: str) -> None: ...


_C = TypeVar("_C", bound=HasPartyId)


def order_clients(clients: Sequence[_C], parties: Sequence[str]) -> list[_C]:
    """``clients`` in the order of ``parties`` (index = position); exactly one each."""
    by_id = {c.party_id: c for c in clients}
    if set(by_id) != set(parties) or len(by_id) != len(clients):
        raise ProtocolError(f"clients {sorted(by_id)} do not match the parties {list(parties)}")
    return [by_id[p] for p in parties]


def signed_keys(proposals: Sequence[Proposal], parties: Sequence[str]) -> list[SignedKey]:
    """The keys of the parties' answers, each checked to be for the party that sent it."""
    for p, pid in zip(proposals, parties, strict=True):
        if p.key.party_id != pid:
            raise ProtocolError(f"party {pid!r} answered with a key for {p.key.party_id!r}")
    return [p.key for p in proposals]


#: how many times an abort is sent to a party that answers RESOURCE_EXHAUSTED
ABORT_TRIES = 5


def abort_all(
    clients: Sequence[Abortable], *, session_id: bytes, reason: str
) -> dict[str, str | None]:
    """Tell every party to forget the session, all at once (each abort has the client's own,
    short, deadline, so a party that stopped answering costs one abort deadline, not one per
    party). Returns party id -> None when the abort was delivered, else why not; a party
    that cannot be reached is skipped (a dead party has nothing to undo)."""
    return {
        p: None
        if exc is None
        else (str(exc) if isinstance(exc, MpcdpError) else type(exc).__name__)
        for p, exc in abort_each(clients, session_id=session_id, reason=reason).items()
    }


def abort_each(
    clients: Sequence[Abortable], *, session_id: bytes, reason: str
) -> dict[str, Exception | None]:
    """:func:`abort_all`, with each failure's exception."""
    if not clients:
        return {}

    def one(c: Abortable) -> Exception | None:
        # an abort gives reservations back: a party busy with this coordinator's other short
        # calls is asked again a few times (about 1.5 s in all) rather than left holding them
        # until the session expires
        for attempt in range(ABORT_TRIES):
            try:
                c.abort(session_id=session_id, reason=reason[:500])
            except PartyError as exc:
                if exc.code != "RESOURCE_EXHAUSTED" or attempt == ABORT_TRIES - 1:
                    return exc
                time.sleep(0.05 * 2**attempt)
            except Exception as exc:
                return exc
            else:
                return None
        return None  # pragma: no cover - the loop returns

    with ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="abort") as pool:
        outcomes = dict(zip((c.party_id for c in clients), pool.map(one, clients), strict=True))
    for party, failure in outcomes.items():
        if failure is None:
            log.info("session %s aborted at %s", session_id.hex(), party)
        else:
            log.warning("abort of session %s at %s failed: %s", session_id.hex(), party, failure)
    return outcomes


#: Status codes with which a party refuses a call before it charges anything (its servicer
#: maps its domain errors to these; see mpcdp.transport.server).
REFUSAL_CODES = frozenset(
    {
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "ALREADY_EXISTS",
        "OUT_OF_RANGE",
    }
)


def refused(exc: BaseException) -> bool:
    """Did ``exc``, raised before a party's upload header arrived, come from a party that
    refused (so charged nothing)? False when no answer came (a time-out, a lost
    connection, an internal error, a malformed answer): then only its ledger knows."""
    if isinstance(exc, PartyError):
        return exc.code in REFUSAL_CODES
    # an in-process party raises its domain errors directly; a ProtocolError other than a
    # session refusal may also be a malformed answer decoded here
    return isinstance(exc, MpcdpError) and (
        isinstance(exc, SessionError) or not isinstance(exc, ProtocolError)
    )


#: What a failed call says, by its status code: ``"party"``, that party failed (it is left
#: out and the query re-run with the others, as long as min_parties and h' >= 1 allow);
#: ``"query"``, the query or the coordinator is at fault and every party would answer the
#: same (the query fails at once, nothing is re-run). A code not listed is a query failure.
#: docs/queries.md ("When a party fails") has this table in words.
FAILURES: Mapping[str, str] = MappingProxyType(
    {
        "UNAVAILABLE": "party",  # unreachable: down, restarting, its host or link gone
        "DEADLINE_EXCEEDED": "party",  # no answer in time: stopped, overloaded, a slow link
        "CANCELLED": "party",  # it cancelled the call (it waited too long on this coordinator)
        "RESOURCE_EXHAUSTED": "party",  # busy (its call limits), or its own budget is spent
        "FAILED_PRECONDITION": "party",  # its own policy, dataset or session (lost in a restart)
        "ABORTED": "party",  # one of its worker ranks failed
        "INTERNAL": "party",  # its own bug or environment (details in its log)
        "UNKNOWN": "party",
        "DATA_LOSS": "party",
        "INVALID_ARGUMENT": "query",  # a malformed spec or message: every party refuses it
        "OUT_OF_RANGE": "query",  # no headroom in the ring for this spec
        "ALREADY_EXISTS": "query",  # the query id was answered before
        "PERMISSION_DENIED": "query",  # this coordinator is not admitted, or relayed a bad key
        "UNAUTHENTICATED": "query",
        "UNIMPLEMENTED": "query",  # another protocol version
        "NOT_FOUND": "query",
    }
)


#: how long the coordinator keeps telling a silent party to forget a round (seconds), and
#: its first pause between tries (doubled each time)
SILENT_ABORT_S = 60.0
SILENT_ABORT_PAUSE_S = 0.5


#: what RoundAborted says of the abort at a party that gave no answer in time
SILENT_ABORT = (
    "it gave no answer in time; the abort is sent again in the background until it "
    "arrives, and its session expires there anyway"
)


def no_answer(exc: BaseException) -> bool:
    """A failure without an answer in time: the party may be stopped, and an abort sent to
    it now would wait out its deadline too."""
    return isinstance(exc, PartyError) and exc.code == "DEADLINE_EXCEEDED"


def abort_in_background(clients: Sequence[Abortable], *, session_id: bytes, reason: str) -> None:
    """:func:`abort_until_delivered` on a thread of its own, for the parties that gave no
    answer in time: the caller's re-run need not wait on them (their sessions expire there
    anyway)."""
    if clients:
        threading.Thread(
            target=abort_until_delivered,
            args=(list(clients),),
            kwargs={"session_id": session_id, "reason": reason},
            name="abort-silent",
            daemon=True,
        ).start()


def abort_until_delivered(clients: Sequence[Abortable], *, session_id: bytes, reason: str) -> None:
    """Abort at parties that did not answer in time, again and again until each one takes
    it or SILENT_ABORT_S pass: a party resumed after a SIGSTOP then releases the round's
    reservation at once rather than at its session's expiry (which releases it anyway)."""
    left = list(clients)
    pause = SILENT_ABORT_PAUSE_S
    end = time.monotonic() + SILENT_ABORT_S
    while left:
        outcomes = abort_each(left, session_id=session_id, reason=reason)
        # tried again: only a party that gave no answer (not one that refused, nor a
        # client closed since)
        left = [
            c
            for c in left
            if isinstance(e := outcomes.get(c.party_id), PartyError)
            and e.code in ("DEADLINE_EXCEEDED", "UNAVAILABLE")
        ]
        if not left or time.monotonic() + pause > end:
            return
        time.sleep(pause)
        pause *= 2


def party_failure(exc: BaseException) -> bool:
    """Is ``exc`` a failure of the party it came from (re-run without it)? Only a party's
    status code says so (:data:`FAILURES`); anything raised in this process is the query's."""
    return isinstance(exc, PartyError) and FAILURES.get(exc.code) == "party"


def first_failure(futures: Sequence[Future[Any]]) -> BaseException | None:
    """The exception of the first failed future, in party order."""
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            return f.exception()
    return None


class GaveUp(Exception):
    """An upload that the coordinator stopped reading: its round was given up."""


def failed_at(futures: Sequence[Future[Any]], ordered: Sequence[_C]) -> dict[str, BaseException]:
    """Party id -> exception of every future that failed (not those given up on purpose)."""
    out: dict[str, BaseException] = {}
    for f, c in zip(futures, ordered, strict=False):
        if f.done() and not f.cancelled():
            exc = f.exception()
            if exc is not None and not isinstance(exc, GaveUp):
                out[c.party_id] = exc
    return out


def roster_shortfall(roster: Sequence[str], *, quorum: int, colluders: int) -> str:
    """Why ``roster`` cannot answer a query ("" when it can)."""
    why = []
    if len(roster) < quorum:
        why.append(f"{len(roster)} parties left, min_parties={quorum}")
    elif len(roster) - colluders < 1:
        why.append(
            f"{len(roster)} parties left with colluders={colluders}: no honest noise share "
            f"(n' - t = {len(roster) - colluders} < 1)"
        )
    return "; ".join(why)
