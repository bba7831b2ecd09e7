"""The coordinator's side of a query: propose all -> check all alive -> contribute all ->
reveal, and the re-runs without the parties that failed.

The coordinator is also the aggregator. It talks to parties through :class:`PartyClient`
objects (gRPC in mpcdp.transport.client, direct calls in tests) and never sees anything but
signed public keys and masked uploads. Uploads are summed chunk by chunk as they stream in,
so the coordinator holds one vector, whatever the number of parties, and decoded into reals
behind the slowest upload (the words every party has sent are final), so that little is left
to decode after the last chunk.

One round (:func:`run_round`): no Contribute is sent before every party's Propose succeeded,
and every party that has a ``ping`` (the gRPC client's health check) is asked once more that
it is alive right before the Contributes go out, so that a party that died or stopped while
the others prepared their noise fails the round before anyone charges. Any party that fails
before the reveal aborts the round: the coordinator tells every party to forget the session
(all in parallel) and raises :class:`RoundAborted`, whose message says which parties charged
their ledger (their upload header arrived), with the epsilon each reported, which did not,
and which gave no answer. Once it gives a round up, the coordinator stops reading the uploads
still streaming in and cancels them (an upload for a round given up is never added);
partial sums are discarded (without every party's upload the masks do not cancel, so they
are uniformly random anyway).

A query (:func:`run_query`) re-runs a failed round without the parties that failed, as a new
round: a fresh session id (so fresh ephemeral keys and masks at every party), the query id
``<first id>.r<k>`` (the link, also in each party's ledger note), ``parties`` the survivors,
so every noise share is sized for h' = n' - t (the plan follows from the spec's parties and
colluders). It needs at least ``min_parties`` survivors and h' >= 1, else it fails naming
each party that failed and why. Whether a failure is the party's (re-run without it) or the
query's (every party would refuse it: stop) is decided per status code in :data:`FAILURES`;
docs/queries.md ("When a party fails") says what is charged in each failure window.

Warm rounds (docs/queries.md, "Warm queries in one round trip"): given a :class:`WarmKeys`
that holds a batch of pre-published keys of every party of the roster, a round is one
Contribute per party, carrying the spec and each party's key for one slot (batch, index) of
the batch; each party checks and reserves inside that call. A slot is handed out once, so a
re-run takes the next slot (fresh keys); with no slot left the round is the two-round-trip
one above. A warm round has no liveness check and no Propose before it: a party that fails
or refuses in it fails the round after the others may have charged (the last row of the
failure table). A party that refuses its key (restarted, so its keys are gone, or expired)
is not left out: its keys are forgotten here and the query re-run the two-round-trip way.
:func:`run_query` fetches a new batch in the background when a roster has few slots left.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import (
    MpcdpError,
    ParameterError,
    PartyError,
    ProtocolError,
    RoundAborted,
    SessionError,
)
from mpcdp.mpc import encoding, ring
from mpcdp.protocol.failures import (
    FAILURES,
    SILENT_ABORT,
    GaveUp,
    Pingable,
    abort_all,
    abort_in_background,
    failed_at,
    first_failure,
    no_answer,
    order_clients,
    party_failure,
    refused,
    roster_shortfall,
    signed_keys,
)
from mpcdp.protocol.identity import BATCH_ID_BYTES, PREKEY_REFUSAL, Prekey, SignedKey
from mpcdp.protocol.query.plan import ReleasePlan, plan
from mpcdp.protocol.query.query_spec import MAX_QUERY_ID_CHARS, QuerySpec
from mpcdp.protocol.session import SESSION_ID_BYTES, Proposal

__all__ = [
    "FAILURES",
    "Attempt",
    "ContributionStream",
    "PartyClient",
    "QueryFailed",
    "RoundOutcome",
    "WarmKeys",
    "WarmPartyClient",
    "abort_all",
    "accumulate",
    "check_roster",
    "order_clients",
    "rerun_id",
    "run_query",
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


@runtime_checkable
class WarmPartyClient(PartyClient, Protocol):
    """A party client that can run warm rounds (the gRPC client does)."""

    def prekeys(self, *, batch_id: bytes, count: int, ttl_s: int) -> list[Prekey]: ...

    def contribute_warm(
        self, *, session_id: bytes, spec: QuerySpec, keys: Sequence[Prekey], ring_bits: int = 64
    ) -> ContributionStream: ...


@dataclass
class _Batch:
    batch_id: bytes
    keys: dict[str, list[Prekey]]  # party -> its keys, by index
    size: int
    expires: int  # the earliest of its keys' expiries (Unix seconds)
    next: int = 0


class WarmKeys:
    """A coordinator's pre-published keys: batches fetched from the parties, each slot
    (batch, index) handed out to one round only. Thread-safe.

    ``batch_size``: keys asked of each party per batch (at most a party's limit, 64);
    ``ttl_s``: how long the parties keep them; ``margin_s``: a slot whose keys expire
    sooner than this is not used (its round could arrive after the expiry); ``clock``: Unix
    seconds."""

    def __init__(
        self,
        *,
        batch_size: int = 16,
        ttl_s: int = 600,
        margin_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ParameterError("batch_size", batch_size, "must be an int in [1, 64]")
        if not 1 <= batch_size <= 64:
            raise ParameterError("batch_size", batch_size, "must be an int in [1, 64]")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= 3600:
            raise ParameterError("ttl_s", ttl_s, "must be an int number of seconds in [1, 3600]")
        if not 0 <= margin_s < ttl_s:
            raise ParameterError("margin_s", margin_s, f"must be in [0, ttl_s={ttl_s})")
        self.batch_size = batch_size
        self.ttl_s = ttl_s
        self._margin = margin_s
        self._clock = clock
        self._batches: list[_Batch] = []
        self._lock = threading.Lock()
        self._refilling = False

    def _usable(self, parties: Sequence[str]) -> list[_Batch]:
        """Batches with a slot left for ``parties`` (caller holds the lock; drops the
        spent and expiring ones)."""
        now = self._clock()
        self._batches = [
            b for b in self._batches if b.next < b.size and b.expires - self._margin > now
        ]
        return [b for b in self._batches if all(p in b.keys for p in parties)]

    def slots_left(self, parties: Sequence[str]) -> int:
        """Rounds over ``parties`` that can still run warm."""
        with self._lock:
            return sum(b.size - b.next for b in self._usable(parties))

    def take(self, parties: Sequence[str]) -> list[Prekey] | None:
        """The keys of ``parties`` (in that order) for one unused slot, or None when no
        batch holds a slot for all of them. The slot is never handed out again."""
        with self._lock:
            usable = self._usable(parties)
            if not usable:
                return None
            batch = usable[0]  # the oldest: it expires first
            i = batch.next
            batch.next += 1
            return [batch.keys[p][i] for p in parties]

    def forget(self, party: str) -> None:
        """Drop ``party``'s keys (it refused one: restarted, or its keys expired there)."""
        with self._lock:
            for b in self._batches:
                b.keys.pop(party, None)

    def refill(self, clients: Sequence[WarmPartyClient]) -> int:
        """Fetch one batch from every client, in parallel; a party that fails is just not
        in the batch (its rounds stay cold). Returns the parties in the new batch."""
        batch_id = secrets.token_bytes(BATCH_ID_BYTES)

        def one(c: WarmPartyClient) -> list[Prekey] | None:
            try:
                return c.prekeys(batch_id=batch_id, count=self.batch_size, ttl_s=self.ttl_s)
            except Exception as exc:  # a refusal, or a client closed meanwhile: no keys
                log.info("party %s gave no pre-published keys: %s", c.party_id, exc)
                return None

        with ThreadPoolExecutor(
            max_workers=max(1, len(clients)), thread_name_prefix="prekeys"
        ) as pool:
            got = dict(zip([c.party_id for c in clients], pool.map(one, clients), strict=True))
        keys = {p: k for p, k in got.items() if k is not None and len(k) == self.batch_size}
        if len(keys) < 2:
            return 0
        expires = min(k.expires for ks in keys.values() for k in ks)
        with self._lock:
            self._batches.append(
                _Batch(batch_id=batch_id, keys=keys, size=self.batch_size, expires=expires)
            )
        return len(keys)

    def refill_in_background(self, clients: Sequence[WarmPartyClient]) -> None:
        """:meth:`refill` in a daemon thread, unless one is running already."""
        with self._lock:
            if self._refilling:
                return
            self._refilling = True

        def run() -> None:
            try:
                self.refill(clients)
            finally:
                with self._lock:
                    self._refilling = False

        threading.Thread(target=run, name="prekeys-refill", daemon=True).start()


def _warm_clients(clients: Sequence[PartyClient]) -> list[WarmPartyClient] | None:
    out = [c for c in clients if isinstance(c, WarmPartyClient)]
    return out if len(out) == len(clients) else None


def key_refusal(exc: BaseException) -> bool:
    """Did a party refuse its pre-published key (a spent, expired or unknown key)?"""
    if isinstance(exc, PartyError):
        return exc.code == "FAILED_PRECONDITION" and PREKEY_REFUSAL in str(exc)
    return isinstance(exc, SessionError) and PREKEY_REFUSAL in str(exc)


@dataclass(frozen=True)
class Attempt:
    """A failed round of a query: its query id and roster, each party that failed and why
    (those left out of the next round), what each party reported it charged in it (its
    upload header arrived: it charged before sending), and the parties that got a Contribute
    but gave no answer (only their ledger knows whether they charged)."""

    query_id: str
    parties: tuple[str, ...]
    failed: dict[str, str]
    charged: dict[str, str]
    unknown: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "query_id": self.query_id,
            "parties": list(self.parties),
            "failed": dict(self.failed),
            "charged": dict(self.charged),
            "unknown": list(self.unknown),
        }


@dataclass(frozen=True)
class RoundOutcome:
    """The revealed aggregate, decoded per tensor of the plan. ``spec.parties`` are the
    parties that contributed; ``attempts`` the failed rounds before this one (re-runs)."""

    spec: QuerySpec
    plan: ReleasePlan
    tensors: dict[str, NDArray[np.float64]]
    budget_remaining: dict[str, float]
    session_id: bytes
    attempts: tuple[Attempt, ...] = ()

    @property
    def dropped(self) -> dict[str, str]:
        """Each party left out of the release, and why (the failure that left it out)."""
        out: dict[str, str] = {}
        for a in self.attempts:
            out.update(a.failed)
        return out


class QueryFailed(RoundAborted):
    """A query that no round could answer: fewer than ``min_parties`` parties left, no
    honest share left (n' - t < 1), or a failure of the query itself after a re-run.
    ``attempts`` are its failed rounds; the message names each party that failed and why,
    and what was charged. ``cause`` is the first failure (a party's PartyError)."""

    def __init__(
        self,
        query_id: str,
        summary: Exception,
        attempts: Sequence[Attempt],
        *,
        first: Exception | None = None,
    ) -> None:
        self.attempts = tuple(attempts)
        charged = {
            p: ", ".join(f"{a.charged[p]} in {a.query_id}" for a in attempts if p in a.charged)
            for p in dict.fromkeys(p for a in attempts for p in a.charged)
        }
        unknown = list(dict.fromkeys(p for a in attempts for p in a.unknown))
        asked = dict.fromkeys(p for a in attempts for p in a.parties)
        not_charged = [p for p in asked if p not in charged and p not in unknown]
        super().__init__(
            query_id, summary, charged=charged, not_charged=not_charged, unknown=unknown
        )
        if first is not None:
            self.cause = first


#: Called with (party id, chunk) for every chunk received: lets a demo show what the
#: coordinator sees (masked words). Never called with anything unmasked.
Observer = Callable[[str, ring.AnyRingVector], None]


def accumulate(
    stream: ContributionStream,
    total: ring.AnyRingVector,
    lock: threading.Lock,
    expected: str,
    observe: Observer | None,
    gave_up: threading.Event | None = None,
    advanced: Callable[[int], None] | None = None,
) -> float:
    """Add ``stream``'s chunks into ``total`` (strict: length, order, sender). Once
    ``gave_up`` is set, no further chunk is added: the stream is closed (which cancels a
    gRPC upload) and :class:`GaveUp` raised. ``advanced(offset)`` is called after each
    chunk is added (outside ``lock``): this upload's words below ``offset`` are in."""
    if stream.party_id != expected:
        raise ProtocolError(f"contribution from {stream.party_id!r} on the channel of {expected!r}")
    if stream.length != total.size:
        raise ProtocolError(
            f"party {expected!r} announced {stream.length} words, the round has {total.size}"
        )
    offset = 0
    try:
        for chunk in stream.chunks:
            if gave_up is not None and gave_up.is_set():
                raise GaveUp(expected)
            n = chunk.size
            if offset + n > total.size:
                raise ProtocolError(f"party {expected!r} sent more than {total.size} words")
            if observe is not None:
                observe(expected, chunk)
            with lock:
                if gave_up is not None and gave_up.is_set():
                    raise GaveUp(expected)
                seg = total[offset : offset + n]
                np.add(seg, chunk, out=seg)
            offset += n
            if advanced is not None:
                advanced(offset)
    finally:
        close = getattr(stream.chunks, "close", None)
        if close is not None:
            close()  # a generator: ends (and cancels) the upload if it is still running
    if offset != total.size:
        raise ProtocolError(
            f"party {expected!r} sent {offset} of {total.size} words (truncated stream)"
        )
    return stream.budget_remaining


class _RoundFailed(Exception):
    """A round that failed: the RoundAborted to report, the parties that failed (party id ->
    exception) and whether the failure is the query's rather than the parties' own."""

    def __init__(
        self,
        aborted: RoundAborted,
        failed: dict[str, BaseException],
        query_fault: bool,
        warm: bool = False,
    ) -> None:
        super().__init__(str(aborted))
        self.aborted = aborted
        self.failed = failed
        self.query_fault = query_fault
        self.warm = warm


#: the sum is decoded in slices of at least this many words (the last one shorter)
_DECODE_WORDS = 1 << 18


class _Reveal:
    """The sum's words decoded into reals behind the slowest upload: once every party's
    upload has been added up to word w, the words below w are final, so they are decoded
    while the rest streams in (each slice once, by the upload thread that moved the mark)
    instead of in one pass after the last chunk."""

    def __init__(self, release: ReleasePlan, total: ring.AnyRingVector, parties: Sequence[str]):
        self._total = total
        self._out = np.empty(total.size, dtype=np.float64)
        self._tensors: list[tuple[str, int, int, int]] = []  # name, start, stop, frac_bits
        offset = 0
        for t in release.tensors:
            self._tensors.append((t.name, offset, offset + t.length, t.frac_bits))
            offset += t.length
        self._at = dict.fromkeys(parties, 0)  # party -> words of its upload added
        self._claimed = 0  # words below this are decoded or being decoded
        self._lock = threading.Lock()

    def advanced(self, party: str, offset: int) -> None:
        """``party``'s words below ``offset`` are in the sum."""
        with self._lock:
            self._at[party] = offset
            mark = min(self._at.values())
            if mark - self._claimed < _DECODE_WORDS and mark < self._total.size:
                return
            start, self._claimed = self._claimed, mark
        self._decode(start, mark)

    def _decode(self, start: int, stop: int) -> None:
        for _, a, b, frac_bits in self._tensors:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                encoding.decode_fixed(self._total[lo:hi], frac_bits=frac_bits, out=self._out[lo:hi])

    def tensors(self) -> dict[str, NDArray[np.float64]]:
        """Every tensor, decoded (call once every upload has been added and every
        :meth:`advanced` has returned): views of one array."""
        with self._lock:
            start, self._claimed = self._claimed, self._total.size
        self._decode(start, self._total.size)
        return {name: self._out[a:b] for name, a, b, _ in self._tensors}


@dataclass
class _Sum:
    """A round's plan and running sum, set once the vector's length is known (a cold
    round: from the proposals; a warm one: from the first upload header)."""

    release: ReleasePlan | None
    total: ring.AnyRingVector | None
    reveal: _Reveal | None = None

    def start(
        self,
        spec: QuerySpec,
        release_plan: ReleasePlan | None,
        length: int,
    ) -> None:
        release = release_plan or plan(spec, vector_length=length)
        if release.length != length:
            raise ProtocolError(f"parties announced {length} words, the plan has {release.length}")
        self.release = release
        self.total = np.zeros(length, dtype=ring.dtype_for(spec.ring_bits).newbyteorder("="))
        self.reveal = _Reveal(release, self.total, spec.parties)


def run_round(
    *,
    spec: QuerySpec,
    clients: Sequence[PartyClient],
    executor: ThreadPoolExecutor | None = None,
    observe: Observer | None = None,
    release_plan: ReleasePlan | None = None,
    prekeys: WarmKeys | None = None,
) -> RoundOutcome:
    """Run one round of ``spec`` over ``clients`` (one per spec party, any order); raises
    :class:`RoundAborted` when it fails. ``release_plan``: the plan of a SQL query (compiled
    by the caller; every other statistic's plan follows from the spec and the announced
    length). ``prekeys``: a warm round when it has a slot for every party (module
    docstring)."""
    try:
        return _round(
            spec=spec,
            clients=clients,
            executor=executor,
            observe=observe,
            release_plan=release_plan,
            prekeys=prekeys,
        )
    except _RoundFailed as failed:
        raise failed.aborted from failed.aborted.cause


def _round(
    *,
    spec: QuerySpec,
    clients: Sequence[PartyClient],
    executor: ThreadPoolExecutor | None,
    observe: Observer | None,
    release_plan: ReleasePlan | None,
    prekeys: WarmKeys | None = None,
) -> RoundOutcome:
    """One round (module docstring); raises :class:`_RoundFailed`."""
    ordered = order_clients(clients, spec.parties)
    pingable: list[Pingable] = [c for c in ordered if isinstance(c, Pingable)]
    session_id = secrets.token_bytes(SESSION_ID_BYTES)
    warm_clients = _warm_clients(ordered) if prekeys is not None else None
    slot = prekeys.take(spec.parties) if prekeys is not None and warm_clients else None
    # one thread per party; a caller running many rounds passes its own pool (no start-up)
    pool = executor or ThreadPoolExecutor(max_workers=len(ordered), thread_name_prefix="round")
    # what each party reported in its upload header (it charged its ledger before sending it)
    charged: dict[str, str] = {}
    asked: list[Future[Proposal]] = []
    pinged: list[Future[None]] = []
    contributions: list[Future[float]] = []
    gave_up = threading.Event()
    lock = threading.Lock()
    try:
        try:
            acc = _Sum(release=None, total=None)
            keys: list[SignedKey] = []
            if slot is None:
                asked = [pool.submit(c.propose, session_id=session_id, spec=spec) for c in ordered]
                wait(asked)  # every answer is in before any abort (an abort follows its Propose)
                failure = first_failure(asked)
                if failure is not None:
                    raise failure
                proposals = [f.result() for f in asked]
                lengths = {p.length for p in proposals}
                if len(lengths) != 1:
                    raise ProtocolError(f"parties disagree on the vector length: {sorted(lengths)}")
                acc.start(spec, release_plan, lengths.pop())
                keys = signed_keys(proposals, spec.parties)
                # a party that died or stopped while the others prepared is found now, before
                # any party charges (docs/queries.md, "When a party fails")
                pinged = [pool.submit(c.ping) for c in pingable]
                wait(pinged)
                failure = first_failure(pinged)
                if failure is not None:
                    raise failure

            def contribute(client: PartyClient) -> float:
                if slot is None:
                    stream = client.contribute(
                        session_id=session_id, keys=keys, ring_bits=spec.ring_bits
                    )
                else:  # one round trip: the party checks, reserves and charges in this call
                    assert isinstance(client, WarmPartyClient)
                    stream = client.contribute_warm(
                        session_id=session_id, spec=spec, keys=slot, ring_bits=spec.ring_bits
                    )
                with lock:
                    charged[client.party_id] = stream.epsilon_spent
                    if acc.total is None:  # warm: the first header tells the length
                        acc.start(spec, release_plan, stream.length)
                    assert acc.total is not None and acc.reveal is not None
                return accumulate(
                    stream, acc.total, lock, client.party_id, observe, gave_up,
                    advanced=functools.partial(acc.reveal.advanced, client.party_id),
                )  # fmt: skip

            contributions = [pool.submit(contribute, c) for c in ordered]
            wait(contributions, return_when=FIRST_EXCEPTION)
            failure = first_failure(contributions)
            if failure is not None:
                raise failure
            remaining = [f.result() for f in contributions]
        except Exception as exc:
            with lock:
                gave_up.set()  # no upload of this round is added from now on
            # a party that did not answer in time is told in the background: waiting on a
            # stopped party's abort would cost the re-run another deadline (its session
            # expires there anyway)
            silent = {
                p
                for futures, who in ((asked, ordered), (pinged, pingable), (contributions, ordered))
                for p, e in failed_at(futures, who).items()
                if no_answer(e)
            }
            abort_in_background(
                [c for c in ordered if c.party_id in silent], session_id=session_id, reason=str(exc)
            )
            # a warm round leaves no session pending at any party: nothing to abort
            aborts = (
                {}
                if slot is not None
                else abort_all(
                    [c for c in ordered if c.party_id not in silent],
                    session_id=session_id,
                    reason=str(exc),
                )
            )
            aborts.update((c.party_id, SILENT_ABORT) for c in ordered if c.party_id in silent)
            # the uploads whose header has not arrived finish or fail on their own
            # deadline: only then is it known what every party charged
            wait(contributions)
            failed = failed_at(contributions, ordered) if contributions else {}
            if not contributions:
                failed = failed_at(pinged, pingable) or failed_at(asked, ordered)
            query_fault = not failed or not all(party_failure(e) for e in failed.values())
            aborted = _aborted(spec, exc, ordered, contributions, charged, aborts)
            raise _RoundFailed(aborted, failed, query_fault, warm=slot is not None) from exc
    finally:
        if executor is None:
            pool.shutdown(wait=True)
    release, reveal = acc.release, acc.reveal
    assert release is not None and reveal is not None
    return RoundOutcome(
        spec=spec,
        plan=release,
        tensors=reveal.tensors(),
        budget_remaining=dict(zip(spec.parties, remaining, strict=True)),
        session_id=session_id,
    )


def rerun_id(query_id: str, attempt: int) -> str:
    """The query id of re-run ``attempt`` (1, 2, ...) of ``query_id``: ``<query_id>.r<k>``."""
    return f"{query_id}.r{attempt}"


#: Builds the spec a round runs from the spec with its roster and query id set (a planner
#: re-fits its fixed point for the roster) and the release plan when the caller has one.
Prepare = Callable[[QuerySpec], tuple[QuerySpec, ReleasePlan | None]]


def run_query(
    *,
    spec: QuerySpec,
    clients: Sequence[PartyClient],
    min_parties: int | None = None,
    prepare: Prepare | None = None,
    left_out: Mapping[str, Exception] | None = None,
    executor: ThreadPoolExecutor | None = None,
    observe: Observer | None = None,
    prekeys: WarmKeys | None = None,
) -> RoundOutcome:
    """Answer ``spec`` with the parties that do not fail (module docstring).

    The first round runs over ``spec.parties``; each failed round whose failures are all the
    parties' own (:data:`FAILURES`) is followed by a new round without them, as long as at
    least ``min_parties`` (default: every party of ``spec``, plus those in ``left_out``)
    remain and n' - t >= 1. ``prepare`` builds each round's spec and plan from the spec
    with its roster and query id set (default: that spec, planned from the announced
    length). ``left_out``: parties the caller already left out before the first round (e.g.
    they did not answer Describe), party -> its failure; they count towards ``min_parties``' n and
    are reported like the others. Raises :class:`QueryFailed` (a :class:`RoundAborted`)
    when no round can answer; a failure of the query itself in the first round, with
    nobody left out before it, raises that round's RoundAborted as :func:`run_round` does.
    ``prekeys``: run warm rounds while it has slots for the roster, and fetch a new batch in
    the background when it runs low (module docstring).
    """
    gone = dict(left_out or {})
    n = len(spec.parties) + len(gone)
    quorum = n if min_parties is None else min_parties
    if isinstance(quorum, bool) or not isinstance(quorum, int) or not 2 <= quorum <= n:
        raise ParameterError("min_parties", min_parties, f"must be an int in [2, {n}]")
    reruns = len(spec.parties) - quorum  # each re-run leaves at least one party out
    if prekeys is not None:
        reruns += 1  # and one re-run after a refused pre-published key keeps every party
    if reruns > 0 and len(rerun_id(spec.query_id, reruns)) > MAX_QUERY_ID_CHARS:
        raise ParameterError(
            "query_id",
            spec.query_id,
            f"must leave room for the re-run suffix ({rerun_id('', reruns)!r}): at most "
            f"{MAX_QUERY_ID_CHARS - len(rerun_id('', reruns))} characters",
        )
    by_id = {c.party_id: c for c in clients}
    attempts: list[Attempt] = []
    if gone:
        attempts.append(_left_out(gone))
    first = next(iter(gone.values()), None)  # the first failure, for QueryFailed.cause
    roster = spec.parties
    k = 0
    key_reruns = 0
    while True:
        check_roster(
            spec.query_id,
            roster,
            quorum=quorum,
            colluders=spec.colluders,
            attempts=attempts,
            first=first,
        )
        current = (
            spec if k == 0 else replace(spec, parties=roster, query_id=rerun_id(spec.query_id, k))
        )
        current, release = prepare(current) if prepare is not None else (current, None)
        try:
            outcome = _round(
                spec=current,
                clients=[by_id[p] for p in roster],
                executor=executor,
                observe=observe,
                release_plan=release,
                prekeys=prekeys,
            )
        except _RoundFailed as failed:
            _refill_if_low(prekeys, [by_id[p] for p in roster])
            stale = [p for p, e in failed.failed.items() if key_refusal(e)]
            if prekeys is not None and failed.warm and stale and key_reruns == 0:
                # keys the party no longer holds (restarted, expired): not its failure
                for p in stale:
                    prekeys.forget(p)
                failed.failed = {p: e for p, e in failed.failed.items() if p not in stale}
                failed.query_fault = not all(party_failure(e) for e in failed.failed.values())
                key_reruns += 1
            attempt = Attempt(
                query_id=current.query_id,
                parties=current.parties,
                failed={p: str(e) for p, e in failed.failed.items()},
                charged=dict(failed.aborted.charged or {}),
                unknown=failed.aborted.unknown,
            )
            attempts.append(attempt)
            if first is None:
                exc = next(iter(failed.failed.values()), None)
                first = exc if isinstance(exc, Exception) else None
            log.warning(
                "query %s: round failed (%s); %s",
                current.query_id,
                "; ".join(f"{p}: {why}" for p, why in attempt.failed.items()) or failed,
                "giving up" if failed.query_fault else "re-running without them",
            )
            if failed.query_fault:
                if len(attempts) == 1:
                    raise failed.aborted from failed.aborted.cause
                raise QueryFailed(
                    spec.query_id, failed.aborted.cause, _real(attempts), first=first
                ) from failed.aborted.cause
            roster = tuple(p for p in roster if p not in failed.failed)
            k += 1
            continue
        _refill_if_low(prekeys, [by_id[p] for p in roster])
        if attempts:
            log.info(
                "query %s answered by %s after %d failed round(s)",
                current.query_id,
                ", ".join(roster),
                len(_real(attempts)),
            )
        return replace(outcome, attempts=tuple(attempts))


def _refill_if_low(prekeys: WarmKeys | None, clients: Sequence[PartyClient]) -> None:
    """Fetch a new batch of keys in the background when ``clients`` have fewer than half a
    batch of warm rounds left (only where every client can run warm rounds)."""
    if prekeys is None:
        return
    warm = _warm_clients(clients)
    if warm and prekeys.slots_left([c.party_id for c in warm]) < max(1, prekeys.batch_size // 2):
        prekeys.refill_in_background(warm)


def _real(attempts: Sequence[Attempt]) -> list[Attempt]:
    """The rounds that ran (not the record of the parties left out before the first)."""
    return [a for a in attempts if a.query_id]


def check_roster(
    query_id: str,
    roster: Sequence[str],
    *,
    quorum: int,
    colluders: int,
    attempts: Sequence[Attempt] = (),
    left_out: Mapping[str, Exception] | None = None,
    first: Exception | None = None,
) -> None:
    """Raise :class:`QueryFailed` unless ``roster`` can answer a query: at least ``quorum``
    parties and n' - colluders >= 1. The message names each party that failed (in
    ``attempts``, or ``left_out`` before any round) and why; its ``cause`` is ``first``, or
    the first party left out."""
    short = roster_shortfall(roster, quorum=quorum, colluders=colluders)
    if short:
        record = [*([_left_out(left_out)] if left_out else []), *attempts]
        if first is None and left_out:
            first = next(iter(left_out.values()))
        raise QueryFailed(query_id, _failure_cause(short, record), _real(record), first=first)


def _left_out(failures: Mapping[str, Exception]) -> Attempt:
    """The record of the parties left out before the first round (no query id)."""
    return Attempt(
        query_id="", parties=(), failed={p: str(e) for p, e in failures.items()}, charged={}
    )


def _failure_cause(short: str, attempts: Sequence[Attempt]) -> MpcdpError:
    """The cause of a query that ran out of parties: why, and each party that failed."""
    failed = {p: why for a in attempts for p, why in a.failed.items()}
    named = "; ".join(f"{p}: {why}" for p, why in failed.items()) or "none"
    return MpcdpError(f"too few parties to answer ({short}); parties that failed: {named}")


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
        if exc is not None and refused(exc):
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
