"""A party's side of a round: propose -> contribute (docs/design.md, "Round protocol").

:class:`PartyEngine` is the party's state machine, independent of any transport. It enforces
the party's own policy; it trusts nothing the coordinator computed.

propose(session, spec) from coordinator C:
  refuse unless: the session id is new; every party in the spec is a configured peer (or this
  party); the dataset, column, bounds, categories and L2 bound are exactly the declared ones;
  the mechanism is allowed (``none`` only with allow_exact; epsilon <= max_epsilon_per_query);
  the round has headroom; the budget, and the coordinator's share of it, would cover the
  charge and the query id is new in the coordinator's namespace. Then reserve it (on disk,
  for the session's time to live), and
  compute the local statistic and the noise share *now* (off the contribute path), make an
  ephemeral X25519 key and sign it over the spec digest.
contribute(session, keys) from the same coordinator C:
  refuse unless the session is pending (not unknown, expired, foreign or already used) and
  ``keys`` holds exactly one valid signed key per spec party, ours unchanged. Then derive the
  pair keys, charge the ledger (the reservation becomes the charge in place: charge before
  release), mask, and return the upload. The session keeps its coordinator's slot until
  the upload ends: read to its end, or given up (:meth:`PartyEngine.upload_ended`, which the
  transport calls when the call ends however it ends; it gives the slot back once), so
  a coordinator's pending sessions and running uploads together stay within its limit.
abort(session): forget the session.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mpcdp.config.datasets import Table, Vector
from mpcdp.config.party_config import DatasetConfig
from mpcdp.dp.ledger import BudgetLedger, LedgerWriteError
from mpcdp.errors import (
    AuthError,
    DataError,
    LedgerError,
    ParameterError,
    PolicyError,
    ProtocolError,
    SessionError,
)
from mpcdp.mpc import encoding, prg, ring, sharing
from mpcdp.protocol import identity
from mpcdp.protocol.noise_pool import Builder, NoisePool, fill_in_slices
from mpcdp.protocol.query.local_statistic import add_local_words
from mpcdp.protocol.query.plan import ReleasePlan, plan
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic, digest

__all__ = [
    "SESSION_ID_BYTES",
    "ClosedSessions",
    "Contribution",
    "DatasetView",
    "PartyEngine",
    "Proposal",
    "SessionHost",
    "SessionSlots",
    "check_parties",
    "durability_refusal",
    "new_signed_key",
    "session_pair_keys",
    "unavailable",
]

log = logging.getLogger(__name__)

SESSION_ID_BYTES = 16
_MAX_CLOSED = 1 << 16
_NOISE_SLICE = 1 << 16


@dataclass(frozen=True)
class DatasetView:
    """A dataset as the engine sees it: the owner's declaration and the loaded data.

    ``data`` is None when the file failed validation; ``error`` then says why (in the
    party's own log and ``mpcdp party check`` only: a coordinator is told that the dataset is
    unavailable, never which cell, value or path).
    """

    config: DatasetConfig
    data: Table | Vector | None
    error: str | None = None


@dataclass(frozen=True)
class Proposal:
    key: identity.SignedKey
    length: int


@dataclass(frozen=True)
class Contribution:
    """A party's upload, masked slice by slice as it is read (see :meth:`chunks`).

    The unmasked vector is private to this object; nothing but masked words comes out.
    """

    party_id: str
    epsilon_spent: str
    budget_remaining: float
    length: int
    _noisy: ring.AnyRingVector
    _mask: sharing.MaskStream | None  # None: ``_noisy`` is already masked (training steps)
    #: training, last step of an audit run: the canary inclusion bits (mpcdp.audit)
    audit_inclusion: bytes = b""
    #: called once the upload has been read to its end (or its reader closed): the session
    #: gives its slot back (idempotent)
    _done: Callable[[], None] | None = None

    @property
    def ring_bits(self) -> int:
        return ring.bits_of(self._noisy)

    def chunks(self, words_per_chunk: int) -> Iterator[ring.AnyRingVector]:
        """The masked upload in order; each slice is masked just before it is yielded.

        Single use: the mask streams advance as they are read. When the reading ends (the
        last slice, or the iterator closed or dropped), the upload has ended.
        """
        if words_per_chunk < 1:
            raise ParameterError("words_per_chunk", words_per_chunk, "must be >= 1")
        mask = self._mask
        if mask is not None and mask.words_done:
            raise ProtocolError("this contribution was already read")
        try:
            for start in range(0, self.length, words_per_chunk):
                seg = self._noisy[start : start + words_per_chunk]
                if mask is not None:
                    mask.apply(seg)
                yield seg
        finally:
            self.close()

    def close(self) -> None:
        """The upload has ended (read or given up): its session's slot is free again."""
        if self._done is not None:
            self._done()

    def masked(self) -> ring.AnyRingVector:
        """The whole masked upload at once (for in-process use and tests)."""
        for _ in self.chunks(1 << 20):
            pass
        return self._noisy


def _pool_key(spec: QuerySpec) -> QuerySpec:
    """Everything that determines a party's noisy vector: the spec without its query id."""
    return replace(spec, query_id="*")


def _builder(release: ReleasePlan, data: Table | Vector) -> Builder:
    """noise share + encoded local statistic, in the ring of the query (the share drawn in
    slices, on the pool's workers)."""

    spec = release.spec
    dtype = ring.dtype_for(spec.ring_bits).newbyteorder("=")

    def build(rng: np.random.Generator, workers: Executor) -> Any:
        noisy = np.empty(release.length, dtype=dtype)
        offset = 0
        for t in release.tensors:

            def fill(
                a: int, b: int, gen: np.random.Generator, off: int = offset, t: Any = t
            ) -> None:
                share = t.mechanism.share(size=b - a, honest=spec.honest, rng=gen)
                noisy[off + a : off + b] = encoding.to_ring(share, ring_bits=spec.ring_bits)

            # i.i.d. coordinates: any slicing gives the same law
            fill_in_slices(
                size=t.length, slice_size=_NOISE_SLICE, rng=rng, fill=fill, workers=workers
            )
            offset += t.length
        add_local_words(release, data, noisy)
        return noisy

    return build


class SessionSlots:
    """How many sessions each coordinator holds open at a party, bounded per coordinator
    and in total. A slot is taken before a session is built and given back when it ends, so
    the bounds are strict under any concurrency (the caller serialises calls)."""

    def __init__(self, *, per_coordinator: int, total: int) -> None:
        self._per = per_coordinator
        self._total = total
        self._held: dict[str, int] = {}

    def take(self, coordinator: str, *, party_id: str) -> None:
        mine = self._held.get(coordinator, 0)
        if mine >= self._per:
            raise PolicyError(
                f"coordinator {coordinator!r} already has {mine} sessions open at "
                f"{party_id!r} (its limit is {self._per}); retry later"
            )
        if sum(self._held.values()) >= self._total:
            raise PolicyError(
                f"{self._total} sessions are already open at {party_id!r} (its limit for all "
                "coordinators together); retry later"
            )
        self._held[coordinator] = mine + 1

    def give_back(self, coordinator: str) -> None:
        left = self._held.get(coordinator, 0) - 1
        if left > 0:
            self._held[coordinator] = left
        else:
            self._held.pop(coordinator, None)

    @property
    def total(self) -> int:
        """The bound for all coordinators together."""
        return self._total


class SessionHost:
    """What the query engine and the training engine share: a lock, open sessions, the
    closed ones, per-coordinator slots. :meth:`_claiming` is how both start a session."""

    party_id: str
    _lock: threading.Lock
    _sessions: dict[bytes, Any]
    _closed: ClosedSessions
    _slots: SessionSlots

    def _expire(self) -> None:  # pragma: no cover - each engine has its own
        raise NotImplementedError

    @contextmanager
    def _claiming(self, session_id: bytes, coordinator: str) -> Iterator[None]:
        """A new session id and a slot of ``coordinator``'s, held while the block runs and
        given back if it fails (the block registers the session on success)."""
        if len(session_id) != SESSION_ID_BYTES:
            raise SessionError(
                f"session_id must be {SESSION_ID_BYTES} bytes, got {len(session_id)}"
            )
        with self._lock:
            self._expire()
            if session_id in self._sessions or session_id in self._closed:
                raise SessionError(f"session {session_id.hex()} was already used")
            self._slots.take(coordinator, party_id=self.party_id)
        try:
            yield
        except BaseException:
            with self._lock:
                self._slots.give_back(coordinator)
            raise


def _note(spec: QuerySpec) -> str:
    """What a query's charge pays for, in words (the ledger's note)."""
    column = f" of {spec.column}" if spec.column else ""
    return f"{spec.statistic.value}{column} ({spec.mechanism})"


def durability_refusal(party_id: str, exc: LedgerWriteError) -> PolicyError:
    """What a coordinator hears when the party's ledger cannot write (a full disk): that
    nothing was reserved or charged, not the ledger's path (that goes to the party's log)."""
    log.error("%s", exc)
    return PolicyError(
        f"party {party_id!r} cannot record this in its budget ledger durably now (its owner "
        "can see why in its log); nothing was reserved or charged there; retry later"
    )


def unavailable(dataset: str, party_id: str) -> str:
    """What a coordinator hears about a dataset that failed validation: nothing about the
    data (the details name cells, values and paths; they stay in the party's log)."""
    return (
        f"dataset {dataset!r} is unavailable at party {party_id!r}: it failed validation; "
        "the party's owner can see why in its log or with `mpcdp party check`"
    )


class ClosedSessions:
    """Why each recently closed session was closed: a bounded map, oldest forgotten first
    (an id older than that is simply unknown, which is refused just the same)."""

    def __init__(self, limit: int = _MAX_CLOSED) -> None:
        self._why: OrderedDict[bytes, str] = OrderedDict()
        self._limit = limit

    def add(self, session_id: bytes, why: str) -> None:
        self._why[session_id] = why
        while len(self._why) > self._limit:
            self._why.popitem(last=False)

    def get(self, session_id: bytes) -> str | None:
        return self._why.get(session_id)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._why


def check_parties(
    *,
    party_id: str,
    parties: Sequence[str],
    peers: frozenset[str],
    colluders: int,
    min_colluders: int,
) -> None:
    """A party's policy on who takes part: it is one of them, every other one is a configured
    peer, and noise shares are sized for at least its own min_colluders."""
    if party_id not in parties:
        raise PolicyError(f"the parties {list(parties)} do not include {party_id!r}")
    unknown = [p for p in parties if p not in peers]
    if unknown:
        raise PolicyError(f"unknown party {unknown[0]!r}: not a configured peer of {party_id!r}")
    if colluders < min_colluders:
        raise PolicyError(
            f"colluders={colluders} is below this party's min_colluders={min_colluders}: "
            "its noise share would be too small"
        )


def new_signed_key(
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    session_id: bytes,
    spec_digest: bytes,
    party_id: str,
) -> tuple[X25519PrivateKey, identity.SignedKey]:
    """A fresh ephemeral X25519 key for a session and its signature over the spec digest."""
    private_key = prg.generate_keypair()
    signed = identity.sign_key(
        signing_key=signing_key,
        certificate=certificate,
        session_id=session_id,
        spec_digest=spec_digest,
        party_id=party_id,
        public_key=prg.public_bytes(private_key),
    )
    return private_key, signed


def session_pair_keys(
    *,
    party_id: str,
    parties: Sequence[str],
    keys: Sequence[identity.SignedKey],
    own: identity.SignedKey,
    private_key: X25519PrivateKey,
    session_id: bytes,
    spec_digest: bytes,
    ca: x509.Certificate,
    certificates: identity.CertificateCache,
) -> dict[int, bytes]:
    """Check the relayed signed keys and derive this party's pair keys (index -> key).

    ``keys`` must hold exactly one key per party in ``parties``, this party's unchanged from
    what it signed (``own``), every other one validly signed over ``spec_digest`` by a
    certificate of ``ca`` for the party it names.
    """
    by_party: dict[str, identity.SignedKey] = {}
    for k in keys:
        if k.party_id in by_party:
            raise ProtocolError(f"two signed keys for party {k.party_id!r}")
        by_party[k.party_id] = k
    if set(by_party) != set(parties):
        missing = sorted(set(parties) - set(by_party))
        extra = sorted(set(by_party) - set(parties))
        raise ProtocolError(
            f"signed keys do not match the parties: missing {missing}, extra {extra}"
        )
    mine = by_party[party_id]
    if not hmac.compare_digest(mine.public_key, own.public_key) or mine.signature != own.signature:
        raise AuthError("the relayed key of this party is not the one it signed")
    for k in keys:
        if k.party_id != party_id:  # our own key was compared with what we signed
            identity.verify_key(
                k, ca=ca, session_id=session_id, spec_digest=spec_digest, certificates=certificates
            )
    index = {p: i for i, p in enumerate(parties)}
    me = index[party_id]
    return {
        index[pid]: prg.derive_pair_key(
            private_key=private_key,
            peer_public_key=k.public_key,
            session_id=session_id,
            party=me,
            peer=index[pid],
        )
        for pid, k in by_party.items()
        if pid != party_id
    }


@dataclass
class _Session:
    coordinator: str
    spec: QuerySpec
    plan: ReleasePlan
    private_key: X25519PrivateKey
    public: identity.SignedKey
    noisy: ring.AnyRingVector  # local statistic + noise share; never leaves unmasked
    expires: float


class PartyEngine(SessionHost):
    """One party's sessions. Thread-safe: each session is used by one call at a time."""

    def __init__(
        self,
        *,
        party_id: str,
        datasets: Mapping[str, DatasetView],
        ledger: BudgetLedger,
        ca: x509.Certificate,
        certificate: x509.Certificate,
        signing_key: ec.EllipticCurvePrivateKey,
        peers: Sequence[str],
        min_colluders: int = 1,
        session_ttl_s: float = 30.0,
        max_pending: int = 16,
        max_pending_total: int = 32,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.monotonic,
        noise_threads: int | None = None,
    ) -> None:
        self.party_id = party_id
        self.datasets = dict(datasets)
        self.ledger = ledger
        self._ca = ca
        self._certificates = identity.CertificateCache(ca=ca)
        self._cert = certificate
        self._signing_key = signing_key
        self._peers = frozenset(peers) | {party_id}
        self._ttl = session_ttl_s
        self._min_colluders = min_colluders
        # each pending session holds a noisy vector: bound what one coordinator, and all of
        # them together, can pin (strictly: a slot is taken before the session is built)
        self._slots = SessionSlots(per_coordinator=max_pending, total=max_pending_total)
        self._clock = clock
        self._noise = NoisePool(rng=rng, threads=noise_threads)
        self._sessions: dict[bytes, _Session] = {}
        # session id -> why it is closed; bounded: an id older than that is simply unknown,
        # which is refused just the same
        self._closed = ClosedSessions()
        self._finished: dict[bytes, ReleasePlan] = {}  # contributed, upload maybe in flight
        # session id -> coordinator, for uploads that still hold their session's slot
        self._uploading: dict[bytes, str] = {}
        self._lock = threading.Lock()

    @property
    def max_pending_total(self) -> int:
        """Sessions all coordinators together may hold open (each one Contribute at most)."""
        return self._slots.total

    # -- propose -------------------------------------------------------------------------

    def _check_spec(self, spec: QuerySpec) -> tuple[DatasetView, ReleasePlan]:
        check_parties(
            party_id=self.party_id,
            parties=spec.parties,
            peers=self._peers,
            colluders=spec.colluders,
            min_colluders=self._min_colluders,
        )
        view = self.datasets.get(spec.dataset)
        if view is None:
            raise PolicyError(
                f"unknown dataset {spec.dataset!r} (this party has {sorted(self.datasets)})"
            )
        cfg = view.config
        if view.data is None:
            raise DataError(unavailable(cfg.name, self.party_id))
        if isinstance(view.data, Vector):
            if spec.statistic is not Statistic.SUM or spec.column:
                raise PolicyError(f"dataset {cfg.name!r} is a vector: only 'sum' without a column")
            if spec.l2_bound != cfg.l2_bound:
                raise PolicyError(
                    f"l2_bound={spec.l2_bound:g} differs from the declared {cfg.l2_bound:g} "
                    f"of dataset {cfg.name!r}"
                )
            length = view.data.values.size
        else:
            length = 0
            if spec.statistic is not Statistic.COUNT or spec.column:
                try:
                    col = cfg.column(spec.column)
                except ParameterError:
                    raise PolicyError(
                        f"unknown column {spec.column!r} of dataset {cfg.name!r} "
                        f"(declared: {[c.name for c in cfg.columns]})"
                    ) from None
                if spec.statistic is Statistic.HISTOGRAM:
                    if not col.categorical or tuple(spec.categories) != col.categories:
                        raise PolicyError(
                            f"categories {list(spec.categories)} differ from the declared "
                            f"{list(col.categories)} of column {col.name!r}"
                        )
                else:
                    if col.categorical:
                        raise PolicyError(f"column {col.name!r} is categorical: use a histogram")
                    if (spec.lower, spec.upper) != (col.lower, col.upper):
                        raise PolicyError(
                            f"bounds [{spec.lower:g}, {spec.upper:g}] differ from the declared "
                            f"[{col.lower:g}, {col.upper:g}] of column {col.name!r}"
                        )
        if spec.mechanism == "none":
            if not cfg.allow_exact:
                raise PolicyError(
                    f"dataset {cfg.name!r} does not allow exact (mechanism none) releases: "
                    f"its party.toml has allow_exact = false under [datasets.{cfg.name}]"
                )
        elif (
            cfg.max_epsilon_per_query is not None
            and float(Fraction(spec.epsilon)) > cfg.max_epsilon_per_query
        ):
            raise PolicyError(
                f"epsilon={spec.epsilon} exceeds max_epsilon_per_query="
                f"{cfg.max_epsilon_per_query:g} of dataset {cfg.name!r}"
            )
        release = plan(spec, vector_length=length or None)
        release.check_headroom()
        return view, release

    def propose(self, *, session_id: bytes, spec: QuerySpec, coordinator: str) -> Proposal:
        with self._claiming(session_id, coordinator):
            return self._propose(session_id, spec, coordinator)

    def _propose(self, session_id: bytes, spec: QuerySpec, coordinator: str) -> Proposal:
        view, release = self._check_spec(spec)
        # reserve, not just check: rounds in flight count as spent, so every party accepts or
        # refuses the same rounds whatever order their proposals arrive in. The reservation
        # is on disk (the charge at Contribute updates it in place: a full disk refuses
        # here, before any party charges), within the coordinator's share of the budget,
        # and lives as long as the session waits for its Contribute.
        try:
            self.ledger.reserve(
                dataset=spec.dataset,
                query_id=spec.query_id,
                coordinator=coordinator,
                event=release.event,
                share=view.config.share(coordinator),
                ttl_s=self._ttl,
                note=_note(spec),
            )
        except LedgerWriteError as exc:
            raise durability_refusal(self.party_id, exc) from None
        try:
            proposal = self._accept(session_id, spec, coordinator, view, release)
        except BaseException:
            self.ledger.release(spec.query_id, coordinator=coordinator)
            raise
        # the session's time to live starts now (its noise was built after the reservation)
        self.ledger.renew(spec.query_id, coordinator=coordinator, ttl_s=self._ttl)
        return proposal

    def _accept(
        self,
        session_id: bytes,
        spec: QuerySpec,
        coordinator: str,
        view: DatasetView,
        release: ReleasePlan,
    ) -> Proposal:
        if spec.mechanism == "none":
            log.warning(
                "exact release (mechanism none, no differential privacy) of dataset %r "
                "requested by %s",
                spec.dataset,
                coordinator,
            )
        assert view.data is not None  # checked in _check_spec
        noisy = self._noise.take(_pool_key(spec), _builder(release, view.data))
        private_key, signed = new_signed_key(
            signing_key=self._signing_key,
            certificate=self._cert,
            session_id=session_id,
            spec_digest=digest(spec),
            party_id=self.party_id,
        )
        session = _Session(
            coordinator=coordinator,
            spec=spec,
            plan=release,
            private_key=private_key,
            public=signed,
            noisy=noisy,
            expires=self._clock() + self._ttl,
        )
        with self._lock:
            if session_id in self._sessions or session_id in self._closed:
                raise SessionError(f"session {session_id.hex()} was already used")
            self._sessions[session_id] = session
        log.info(
            "session %s: accepted query %s (%s)",
            session_id.hex(),
            spec.query_id,
            spec.statistic.value,
        )
        return Proposal(key=signed, length=release.length)

    # -- contribute ----------------------------------------------------------------------

    def _take(self, session_id: bytes, coordinator: str) -> _Session:
        with self._lock:
            self._expire()
            session = self._sessions.get(session_id)
            if session is None:
                why = self._closed.get(session_id)
                if why == "used":
                    raise SessionError(f"session {session_id.hex()} was already used (replay)")
                if why is not None:
                    raise SessionError(f"session {session_id.hex()} is closed ({why})")
                raise SessionError(f"unknown or expired session {session_id.hex()}")
            if session.coordinator != coordinator:
                raise SessionError(
                    f"session {session_id.hex()} belongs to coordinator {session.coordinator!r}, "
                    f"not {coordinator!r}"
                )
            # used: never again; its slot stays taken until the upload ends (upload_ended)
            del self._sessions[session_id]
            self._closed.add(session_id, "used")
            self._uploading[session_id] = coordinator
            return session

    def upload_ended(self, *, session_id: bytes) -> None:
        """The upload of ``session_id`` ended (sent, failed, cancelled, or its caller went
        away): its coordinator's slot is free again. Idempotent: the slot is given back
        once, whoever calls first (the upload's reader, the transport's end-of-call
        callback, a refused Contribute)."""
        with self._lock:
            coordinator = self._uploading.pop(session_id, None)
            if coordinator is not None:
                self._slots.give_back(coordinator)

    @property
    def uploads_running(self) -> int:
        """Uploads that hold their session's slot now (all coordinators)."""
        with self._lock:
            return len(self._uploading)

    def contribute(
        self, *, session_id: bytes, keys: Sequence[identity.SignedKey], coordinator: str
    ) -> Contribution:
        session = self._take(session_id, coordinator)
        spec = session.spec
        try:
            pair_keys = session_pair_keys(
                party_id=self.party_id,
                parties=spec.parties,
                keys=keys,
                own=session.public,
                private_key=session.private_key,
                session_id=session_id,
                spec_digest=digest(spec),
                ca=self._ca,
                certificates=self._certificates,
            )
            # the reservation made at propose becomes the charge (charge before release)
            charge = self.ledger.charge(
                dataset=spec.dataset,
                query_id=spec.query_id,
                coordinator=session.coordinator,
                event=session.plan.event,
                share=self.datasets[spec.dataset].config.share(session.coordinator),
                reserved=True,
                note=_note(spec),
            )
        except BaseException as exc:
            # nothing leaves: the budget is free again, and so is the slot
            self.upload_ended(session_id=session_id)
            self.ledger.release(spec.query_id, coordinator=session.coordinator)
            if isinstance(exc, LedgerWriteError):
                raise durability_refusal(self.party_id, exc) from None
            raise
        if not charge.new:
            self.upload_ended(session_id=session_id)
            # Two sessions of one query: a second answer with fresh noise would let the
            # coordinator average the noise away, so each query id is answered once.
            raise LedgerError(
                f"query_id={spec.query_id!r} was already answered; use a new query id"
            )
        assert charge.status is not None  # a new charge carries its status
        status = charge.status
        me = spec.index_of(self.party_id)
        try:
            stream = sharing.MaskStream(
                party=me, pair_keys=pair_keys, round_id=0, tensor_id=0, ring_bits=spec.ring_bits
            )
        except BaseException:
            self.upload_ended(session_id=session_id)
            raise
        with self._lock:
            self._finished[session_id] = session.plan
            while len(self._finished) > 64:  # uploads that never reported back
                self._finished.pop(next(iter(self._finished)))
        log.info("session %s: contributing %d words", session_id.hex(), session.noisy.size)
        return Contribution(
            party_id=self.party_id,
            epsilon_spent=spec.epsilon,
            budget_remaining=status.remaining_epsilon,
            length=session.noisy.size,
            _noisy=session.noisy,
            _mask=stream,
            _done=functools.partial(self.upload_ended, session_id=session_id),
        )

    def round_finished(self, *, session_id: bytes) -> None:
        """Called by the transport once the upload of ``session_id`` has been sent: build the
        noisy vector for a next round with the same parameters, off the request path."""
        with self._lock:
            release = self._finished.pop(session_id, None)
        view = self.datasets.get(release.spec.dataset) if release is not None else None
        if release is not None and view is not None and view.data is not None:
            nbytes = release.length * release.spec.ring_bits // 8
            self._noise.prepare(
                _pool_key(release.spec), _builder(release, view.data), nbytes=nbytes
            )

    def close(self) -> None:
        """Stop the background noise generation."""
        self._noise.close()

    def abort(self, *, session_id: bytes, coordinator: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.coordinator == coordinator:
                self._remove(session_id, "aborted")
                self.ledger.release(session.spec.query_id, coordinator=coordinator)
                log.info("session %s: aborted by %s", session_id.hex(), coordinator)

    def _remove(self, session_id: bytes, why: str) -> None:
        """Forget a pending session and remember why it is closed; its coordinator's slot
        is free again (caller holds self._lock)."""
        session = self._sessions.pop(session_id)
        self._slots.give_back(session.coordinator)
        self._closed.add(session_id, why)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s for s, v in self._sessions.items() if v.expires < now]:
            session = self._sessions[sid]
            self._remove(sid, "expired")
            self.ledger.release(session.spec.query_id, coordinator=session.coordinator)
