"""The coordinator's side of a round: propose all -> contribute all -> reveal.

The coordinator is also the aggregator. It talks to parties through :class:`PartyClient`
objects (gRPC in mpcdp.transport.client, direct calls in tests) and never sees anything but
signed public keys and masked uploads. Uploads are summed chunk by chunk as they stream in,
so the coordinator holds one vector, whatever the number of parties.

Failure rule (docs/design.md): any party that fails before the reveal aborts the round. The
coordinator tells every party to forget the session (all in parallel) and raises
:class:`RoundAborted`, whose message says which parties charged their ledger (their upload
header arrived), with the epsilon each reported, which did not, and which gave no answer;
partial sums are discarded (without every party's upload the masks do not cancel, so they
are uniformly random anyway). A retry is a new query with a new session and fresh keys.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import MpcdpError, PartyError, ProtocolError, RoundAborted, SessionError
from mpcdp.mpc import encoding, ring
from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.query.plan import ReleasePlan, plan
from mpcdp.protocol.query.query_spec import QuerySpec
from mpcdp.protocol.session import SESSION_ID_BYTES, Proposal

__all__ = [
    "ContributionStream",
    "PartyClient",
    "RoundOutcome",
    "abort_all",
    "accumulate",
    "order_clients",
    "run_round",
    "signed_keys",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContributionStream:
    """A party's answer to contribute: a header, then the upload in chunks of words."""

    party_id: str
    length: int
    epsilon_spent: str
    budget_remaining: float
    chunks: Iterator[ring.AnyRingVector]
    #: training, last step of an audit run: the site's packed canary inclusion bits
    audit_inclusion: bytes = b""


class PartyClient(Protocol):
    """How the coordinator reaches one party."""

    @property
    def party_id(self) -> str: ...

    def propose(self, *, session_id: bytes, spec: QuerySpec) -> Proposal: ...

    def contribute(
        self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
    ) -> ContributionStream: ...

    def abort(self, *, session_id: bytes, reason: str) -> None: ...


class _HasPartyId(Protocol):
    @property
    def party_id(self) -> str: ...


class _Abortable(_HasPartyId, Protocol):
    def abort(self, *, session_id: bytes, reason: str) -> None: ...


_C = TypeVar("_C", bound=_HasPartyId)


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
_ABORT_TRIES = 5


def abort_all(
    clients: Sequence[_Abortable], *, session_id: bytes, reason: str
) -> dict[str, str | None]:
    """Tell every party to forget the session, all at once (each abort has the client's own,
    short, deadline, so a party that stopped answering costs one abort deadline, not one per
    party). Returns party id -> None when the abort was delivered, else why not; a party
    that cannot be reached is skipped (a dead party has nothing to undo)."""
    if not clients:
        return {}

    def one(c: _Abortable) -> str | None:
        # an abort gives reservations back: a party busy with this coordinator's other short
        # calls is asked again a few times (about 1.5 s in all) rather than left holding them
        # until the session expires
        for attempt in range(_ABORT_TRIES):
            try:
                c.abort(session_id=session_id, reason=reason[:500])
            except PartyError as exc:
                if exc.code != "RESOURCE_EXHAUSTED" or attempt == _ABORT_TRIES - 1:
                    return str(exc)
                time.sleep(0.05 * 2**attempt)
            except Exception as exc:
                return str(exc) if isinstance(exc, MpcdpError) else type(exc).__name__
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
_REFUSAL_CODES = frozenset(
    {
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "ALREADY_EXISTS",
        "OUT_OF_RANGE",
    }
)


def _refused(exc: BaseException) -> bool:
    """Did ``exc``, raised before a party's upload header arrived, come from a party that
    refused (so charged nothing)? False when no answer came (a time-out, a lost
    connection, an internal error, a malformed answer): then only its ledger knows."""
    if isinstance(exc, PartyError):
        return exc.code in _REFUSAL_CODES
    # an in-process party raises its domain errors directly; a ProtocolError other than a
    # session refusal may also be a malformed answer decoded here
    return isinstance(exc, MpcdpError) and (
        isinstance(exc, SessionError) or not isinstance(exc, ProtocolError)
    )


def _first_failure(futures: Sequence[Future[Any]]) -> BaseException | None:
    """The exception of the first failed future, in party order."""
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            return f.exception()
    return None


@dataclass(frozen=True)
class RoundOutcome:
    """The revealed aggregate, decoded per tensor of the plan."""

    spec: QuerySpec
    plan: ReleasePlan
    tensors: dict[str, NDArray[np.float64]]
    budget_remaining: dict[str, float]
    session_id: bytes


#: Called with (party id, chunk) for every chunk received: lets a demo show what the
#: coordinator sees (masked words). Never called with anything unmasked.
Observer = Callable[[str, ring.AnyRingVector], None]


def accumulate(
    stream: ContributionStream,
    total: ring.AnyRingVector,
    lock: threading.Lock,
    expected: str,
    observe: Observer | None,
) -> float:
    """Add ``stream``'s chunks into ``total`` (strict: length, order, sender)."""
    if stream.party_id != expected:
        raise ProtocolError(f"contribution from {stream.party_id!r} on the channel of {expected!r}")
    if stream.length != total.size:
        raise ProtocolError(
            f"party {expected!r} announced {stream.length} words, the round has {total.size}"
        )
    offset = 0
    for chunk in stream.chunks:
        n = chunk.size
        if offset + n > total.size:
            raise ProtocolError(f"party {expected!r} sent more than {total.size} words")
        if observe is not None:
            observe(expected, chunk)
        with lock:
            seg = total[offset : offset + n]
            np.add(seg, chunk, out=seg)
        offset += n
    if offset != total.size:
        raise ProtocolError(
            f"party {expected!r} sent {offset} of {total.size} words (truncated stream)"
        )
    return stream.budget_remaining


def run_round(
    *,
    spec: QuerySpec,
    clients: Sequence[PartyClient],
    executor: ThreadPoolExecutor | None = None,
    observe: Observer | None = None,
    release_plan: ReleasePlan | None = None,
) -> RoundOutcome:
    """Run one round of ``spec`` over ``clients`` (one per spec party, any order).
    ``release_plan``: the plan of a SQL query (compiled by the caller; every other statistic's
    plan follows from the spec and the announced length)."""
    ordered = order_clients(clients, spec.parties)
    session_id = secrets.token_bytes(SESSION_ID_BYTES)
    # one thread per party; a caller running many rounds passes its own pool (no start-up)
    pool = executor or ThreadPoolExecutor(max_workers=len(ordered), thread_name_prefix="round")
    # what each party reported in its upload header (it charged its ledger before sending it)
    charged: dict[str, str] = {}
    contributions: list[Future[float]] = []
    try:
        try:
            asked = [pool.submit(c.propose, session_id=session_id, spec=spec) for c in ordered]
            wait(asked)  # every answer is in before any abort (an abort must follow its Propose)
            failure = _first_failure(asked)
            if failure is not None:
                raise failure
            proposals = [f.result() for f in asked]
            lengths = {p.length for p in proposals}
            if len(lengths) != 1:
                raise ProtocolError(f"parties disagree on the vector length: {sorted(lengths)}")
            length = lengths.pop()
            release = release_plan or plan(spec, vector_length=length)
            if release.length != length:
                raise ProtocolError(
                    f"parties announced {length} words, the plan has {release.length}"
                )
            keys = signed_keys(proposals, spec.parties)
            total = np.zeros(length, dtype=ring.dtype_for(spec.ring_bits).newbyteorder("="))
            lock = threading.Lock()

            def contribute(client: PartyClient) -> float:
                stream = client.contribute(
                    session_id=session_id, keys=keys, ring_bits=spec.ring_bits
                )
                with lock:
                    charged[client.party_id] = stream.epsilon_spent
                return accumulate(stream, total, lock, client.party_id, observe)

            contributions = [pool.submit(contribute, c) for c in ordered]
            wait(contributions, return_when=FIRST_EXCEPTION)
            failure = _first_failure(contributions)
            if failure is not None:
                raise failure
            remaining = [f.result() for f in contributions]
        except Exception as exc:
            aborts = abort_all(ordered, session_id=session_id, reason=str(exc))
            # the uploads still running finish or fail on their own deadline: only then is
            # it known what every party charged
            wait(contributions)
            raise _aborted(spec, exc, ordered, contributions, charged, aborts) from exc
    finally:
        if executor is None:
            pool.shutdown(wait=True)
    tensors: dict[str, NDArray[np.float64]] = {}
    offset = 0
    for t in release.tensors:
        tensors[t.name] = encoding.decode_fixed(
            total[offset : offset + t.length], frac_bits=t.frac_bits
        )
        offset += t.length
    return RoundOutcome(
        spec=spec,
        plan=release,
        tensors=tensors,
        budget_remaining=dict(zip(spec.parties, remaining, strict=True)),
        session_id=session_id,
    )


def _aborted(
    spec: QuerySpec,
    cause: Exception,
    ordered: Sequence[PartyClient],
    contributions: Sequence[Future[float]],
    charged: dict[str, str],
    aborts: dict[str, str | None],
) -> RoundAborted:
    """The RoundAborted of a failed round, saying what each party charged."""
    not_charged: list[str] = []
    unknown: list[str] = []
    for i, client in enumerate(ordered):
        pid = client.party_id
        if pid in charged:
            continue
        if i >= len(contributions):  # never asked to contribute
            not_charged.append(pid)
            continue
        exc = contributions[i].exception()
        if exc is not None and _refused(exc):
            not_charged.append(pid)
        else:
            unknown.append(pid)
    return RoundAborted(
        spec.query_id,
        cause,
        charged={p.party_id: charged[p.party_id] for p in ordered if p.party_id in charged},
        not_charged=not_charged,
        unknown=unknown,
        abort_failures={p: why for p, why in aborts.items() if why is not None},
    )
