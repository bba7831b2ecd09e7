"""The session core that the query engine (:mod:`mpcdp.protocol.query.party_engine`) and
the training engine (:mod:`mpcdp.protocol.training.site_engine`) share: who the party is
(:class:`PartyIdentity`: its id, certificate, signing key, CA, ledger, peers and policy on
colluders), and :class:`SessionHost`, which signs a session's ephemeral key, claims a
coordinator's slot, registers and looks up sessions, remembers closed ones and holds the
time to live. Also what a session hands the transport (:class:`Proposal`,
:class:`Contribution`) and the refusals both engines word alike.

:class:`PrekeyStore` holds the keys a party pre-publishes for warm query rounds
(docs/queries.md, "Warm queries in one round trip"): batches signed for one coordinator, each
key for one future round, expiring, taken (removed under the store's lock, so that two calls
can never both use it) by the one round that uses it. Memory is bounded: at most
``MAX_PREKEY_BATCH`` keys per batch and ``max_per_coordinator`` unused keys per coordinator
(a newer batch replaces the oldest keys). Nothing in a batch depends on the party's data.
Transport-agnostic; nothing happens at import time.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mpcdp.dp.ledger import BudgetLedger, LedgerWriteError
from mpcdp.errors import AuthError, ParameterError, PolicyError, ProtocolError, SessionError
from mpcdp.mpc import prg, ring, sharing
from mpcdp.protocol import identity

__all__ = [
    "DEFAULT_MAX_PREKEYS",
    "MAX_PREKEY_BATCH",
    "MAX_PREKEY_TTL_S",
    "SESSION_ID_BYTES",
    "ClosedSessions",
    "Contribution",
    "HeldPrekey",
    "PartyIdentity",
    "PrekeyStore",
    "Proposal",
    "SessionHost",
    "SessionSlots",
    "check_prekeys",
    "durability_refusal",
    "prekey_pair_keys",
    "unavailable",
]

log = logging.getLogger(__name__)

SESSION_ID_BYTES = 16
_MAX_CLOSED = 1 << 16

#: pre-published keys in one batch, at most
MAX_PREKEY_BATCH = 64
#: unused pre-published keys one coordinator may hold at a party (default)
DEFAULT_MAX_PREKEYS = 128
#: the longest a pre-published key may live (seconds)
MAX_PREKEY_TTL_S = 3600.0


@dataclass(frozen=True)
class PartyIdentity:
    """Who a party is to its sessions, the same for its query and its training engine: its
    id, its certificate and signing key, the federation CA, its budget ledger, its configured
    peers (itself included) and the fewest colluders it sizes noise shares for."""

    party_id: str
    ca: x509.Certificate
    certificate: x509.Certificate
    signing_key: ec.EllipticCurvePrivateKey
    ledger: BudgetLedger
    peers: frozenset[str]
    min_colluders: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", frozenset(self.peers) | {self.party_id})

    def new_signed_key(
        self, *, session_id: bytes, spec_digest: bytes
    ) -> tuple[X25519PrivateKey, identity.SignedKey]:
        """A fresh ephemeral X25519 key for a session and its signature over the spec digest
        (the one place a party signs a key)."""
        private_key = prg.generate_keypair()
        signed = identity.sign_key(
            signing_key=self.signing_key,
            certificate=self.certificate,
            session_id=session_id,
            spec_digest=spec_digest,
            party_id=self.party_id,
            public_key=prg.public_bytes(private_key),
        )
        return private_key, signed

    def check_parties(self, *, parties: Sequence[str], colluders: int) -> None:
        """A party's policy on who takes part: it is one of them, every other one is a
        configured peer, and noise shares are sized for at least its own min_colluders."""
        party_id = self.party_id
        if party_id not in parties:
            raise PolicyError(f"the parties {list(parties)} do not include {party_id!r}")
        unknown = [p for p in parties if p not in self.peers]
        if unknown:
            raise PolicyError(
                f"unknown party {unknown[0]!r}: not a configured peer of {party_id!r}"
            )
        if colluders < self.min_colluders:
            raise PolicyError(
                f"colluders={colluders} is below this party's min_colluders="
                f"{self.min_colluders}: its noise share would be too small"
            )


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
    #: the leading words of ``_noisy`` that are masked already (``_mask`` is positioned
    #: there: the party masked them while its ledger wrote the charge)
    _masked_words: int = 0
    #: taken by the first read, never released (single use: one check-and-set, so two
    #: readers at once cannot both pass)
    _read: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def ring_bits(self) -> int:
        return ring.bits_of(self._noisy)

    def chunks(self, words_per_chunk: int) -> Iterator[ring.AnyRingVector]:
        """The masked upload in order; each slice is masked just before it is yielded
        (past the words masked already).

        Single use: the mask streams advance as they are read. When the reading ends (the
        last slice, or the iterator closed or dropped), the upload has ended.
        """
        if words_per_chunk < 1:
            raise ParameterError("words_per_chunk", words_per_chunk, "must be >= 1")
        mask, ahead = self._mask, self._masked_words
        if not self._read.acquire(blocking=False) or (
            mask is not None and mask.words_done != ahead
        ):
            raise ProtocolError("this contribution was already read")
        try:
            for start in range(0, self.length, words_per_chunk):
                seg = self._noisy[start : start + words_per_chunk]
                if mask is not None and start + seg.size > ahead:
                    mask.apply(seg[max(0, ahead - start) :])
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


_K = TypeVar("_K", identity.SignedKey, identity.Prekey)


def one_per_party(keys: Sequence[_K], parties: Sequence[str], *, what: str) -> dict[str, _K]:
    """Party id -> its key, when ``keys`` hold exactly one key per party of ``parties``;
    ProtocolError naming the duplicate, or the missing and extra parties, otherwise
    (``what`` names the kind of key in the message)."""
    by_party: dict[str, _K] = {}
    for k in keys:
        if k.party_id in by_party:
            raise ProtocolError(f"two {what}s for party {k.party_id!r}")
        by_party[k.party_id] = k
    if set(by_party) != set(parties):
        missing = sorted(set(parties) - set(by_party))
        extra = sorted(set(by_party) - set(parties))
        raise ProtocolError(f"{what}s do not match the parties: missing {missing}, extra {extra}")
    return by_party


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
    by_party = one_per_party(keys, parties, what="signed key")
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


def check_prekeys(
    *,
    party_id: str,
    parties: Sequence[str],
    keys: Sequence[identity.Prekey],
    coordinator: str,
    now: float,
    certificates: identity.CertificateCache,
) -> identity.Prekey:
    """Check the pre-published keys relayed for a warm round; return this party's own.

    ``keys`` must hold exactly one key per party in ``parties``, all for the same round (one
    batch, one index: keys of two batches or two slots are refused), each validly signed by
    the party it names for ``coordinator`` and unexpired at ``now`` (Unix seconds).
    """
    by_party = one_per_party(keys, parties, what=identity.PREKEY_REFUSAL)
    mine = by_party[party_id]
    for k in keys:
        if k.slot != mine.slot:
            raise ProtocolError(
                f"{identity.PREKEY_REFUSAL}s of two rounds: {party_id!r}'s is index "
                f"{mine.index} of batch {mine.batch_id.hex()}, {k.party_id!r}'s index "
                f"{k.index} of batch {k.batch_id.hex()}"
            )
    for k in keys:
        identity.verify_prekey(k, coordinator=coordinator, now=now, certificates=certificates)
    return mine


def prekey_pair_keys(
    *,
    party_id: str,
    parties: Sequence[str],
    keys: Sequence[identity.Prekey],
    private_key: X25519PrivateKey,
    session_id: bytes,
    spec_digest: bytes,
) -> dict[int, bytes]:
    """This party's pair keys (index -> key) of a warm round from keys already checked by
    :func:`check_prekeys`, bound to the session id and the spec digest
    (:func:`mpcdp.protocol.identity.prekey_context`)."""
    index = {p: i for i, p in enumerate(parties)}
    me = index[party_id]
    context = identity.prekey_context(session_id, spec_digest)
    return {
        index[k.party_id]: prg.derive_pair_key(
            private_key=private_key,
            peer_public_key=k.public_key,
            session_id=context,
            party=me,
            peer=index[k.party_id],
        )
        for k in keys
        if k.party_id != party_id
    }


@dataclass(frozen=True)
class HeldPrekey:
    """A pre-published key as its party holds it: the private half and what it signed."""

    private_key: X25519PrivateKey
    key: identity.Prekey


class PrekeyStore:
    """A party's pre-published keys, per coordinator (module docstring). Thread-safe."""

    def __init__(
        self,
        party: PartyIdentity,
        *,
        max_per_coordinator: int = DEFAULT_MAX_PREKEYS,
        max_ttl_s: float = MAX_PREKEY_TTL_S,
        wall: Callable[[], float] = time.time,
        closed_limit: int = _MAX_CLOSED,
    ) -> None:
        if isinstance(max_per_coordinator, bool) or not isinstance(max_per_coordinator, int):
            raise ParameterError("max_per_coordinator", max_per_coordinator, "must be an int")
        if max_per_coordinator < 1:
            raise ParameterError("max_per_coordinator", max_per_coordinator, "must be >= 1")
        if not (math.isfinite(max_ttl_s) and 0 < max_ttl_s <= MAX_PREKEY_TTL_S):
            raise ParameterError("max_ttl_s", max_ttl_s, f"must be in (0, {MAX_PREKEY_TTL_S:g}]")
        self._party = party
        self._certificate_der = party.certificate.public_bytes(serialization.Encoding.DER)
        self._max = max_per_coordinator
        self._max_ttl = max_ttl_s
        self._wall = wall
        self._held: dict[str, OrderedDict[tuple[bytes, int], HeldPrekey]] = {}
        # (coordinator, batch id) -> the expiry of its keys: a batch id is signed once
        self._batches: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._batch_limit = closed_limit
        # coordinator + batch id + index -> why the key is gone ("used", "expired", ...)
        self._gone = ClosedSessions(limit=closed_limit)
        self._lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        """The most keys one batch may ask for."""
        return min(MAX_PREKEY_BATCH, self._max)

    def held(self, coordinator: str) -> int:
        """Unused, unexpired keys ``coordinator`` holds here."""
        with self._lock:
            self._purge(self._wall())
            return len(self._held.get(coordinator, ()))

    @staticmethod
    def _name(coordinator: str, batch_id: bytes, index: int) -> bytes:
        return coordinator.encode() + b"\0" + batch_id + index.to_bytes(4, "big")

    def _purge(self, now: float) -> None:
        """Forget expired keys and batches (caller holds the lock)."""
        for coordinator, keys in list(self._held.items()):
            for slot in [s for s, h in keys.items() if h.key.expires <= now]:
                del keys[slot]
                self._gone.add(self._name(coordinator, *slot), "expired")
            if not keys:
                del self._held[coordinator]
        for name in [b for b, expires in self._batches.items() if expires <= now]:
            del self._batches[name]

    def publish(
        self, *, coordinator: str, batch_id: bytes, count: int, ttl_s: float
    ) -> list[identity.Prekey]:
        """Sign ``count`` fresh keys (indexes 0..count-1 of ``batch_id``) for
        ``coordinator``, each valid for ``ttl_s`` seconds. A batch id is signed once."""
        if len(batch_id) != identity.BATCH_ID_BYTES:
            raise ParameterError(
                "batch_id", f"{len(batch_id)} bytes", f"must be {identity.BATCH_ID_BYTES} bytes"
            )
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 1 <= count <= self.max_batch
        ):
            raise ParameterError("count", count, f"must be an int in [1, {self.max_batch}]")
        if isinstance(ttl_s, bool) or not (math.isfinite(ttl_s) and 1 <= ttl_s <= self._max_ttl):
            raise ParameterError("ttl_s", ttl_s, f"must be in [1, {self._max_ttl:g}] seconds")
        expires = int(self._wall() + ttl_s)
        with self._lock:
            if (coordinator, batch_id) in self._batches:
                raise SessionError(
                    f"batch {batch_id.hex()} of {identity.PREKEY_REFUSAL}s was already "
                    "published: each batch id is signed once"
                )
            self._batches[(coordinator, batch_id)] = expires
            while len(self._batches) > self._batch_limit:
                self._batches.popitem(last=False)
        made = []
        for index in range(count):
            private_key = prg.generate_keypair()
            key = identity.sign_prekey(
                signing_key=self._party.signing_key,
                certificate_der=self._certificate_der,
                party_id=self._party.party_id,
                coordinator=coordinator,
                batch_id=batch_id,
                index=index,
                expires=expires,
                public_key=prg.public_bytes(private_key),
            )
            made.append(HeldPrekey(private_key=private_key, key=key))
        with self._lock:
            self._purge(self._wall())
            keys = self._held.setdefault(coordinator, OrderedDict())
            for h in made:
                keys[h.key.slot] = h
            while len(keys) > self._max:  # the oldest unused keys make room
                slot, _ = keys.popitem(last=False)
                self._gone.add(self._name(coordinator, *slot), "replaced by a newer batch")
        log.info(
            "published %d keys (batch %s) for coordinator %s", count, batch_id.hex(), coordinator
        )
        return [h.key for h in made]

    def take(self, *, coordinator: str, batch_id: bytes, index: int) -> HeldPrekey:
        """Remove and return ``coordinator``'s key (``batch_id``, ``index``): it serves this
        round and no other. Removal under the lock is the use: a second call for the same key,
        at the same time or later, is refused."""
        name = self._name(coordinator, batch_id, index)
        with self._lock:
            self._purge(self._wall())
            keys = self._held.get(coordinator)
            held = keys.pop((batch_id, index), None) if keys is not None else None
            if held is None:
                why = self._gone.get(name)
                what = f"{identity.PREKEY_REFUSAL} (batch {batch_id.hex()}, index {index})"
                if why == "used":
                    raise SessionError(f"{what} was already used (replay); nothing was charged")
                if why is not None:
                    raise SessionError(f"{what} is gone ({why}); nothing was charged")
                raise SessionError(
                    f"unknown {what} for coordinator {coordinator!r} (never published here, "
                    "or published before this party restarted); nothing was charged"
                )
            self._gone.add(name, "used")
            return held


class SessionHost:
    """What the query engine and the training engine share: the party's identity, a lock,
    open sessions, the closed ones, per-coordinator slots and the sessions' time to live.
    :meth:`_claiming` is how both start a session, :meth:`_new_key` signs its ephemeral key,
    :meth:`_register` records it and :meth:`_pair_keys` checks the relayed keys."""

    _sessions: dict[bytes, Any]

    def __init__(
        self,
        party: PartyIdentity,
        *,
        ttl_s: float,
        per_coordinator: int,
        total: int,
        closed_limit: int = _MAX_CLOSED,
        clock: Callable[[], float],
    ) -> None:
        self.party = party
        self.party_id = party.party_id
        self.ledger = party.ledger
        self._certificates = identity.CertificateCache(ca=party.ca)
        self._ttl = ttl_s
        # a slot is taken before a session is built: the bounds are strict
        self._slots = SessionSlots(per_coordinator=per_coordinator, total=total)
        self._clock = clock
        self._sessions = {}
        # session id -> why it is closed; bounded: an id older than that is simply unknown,
        # which is refused just the same
        self._closed = ClosedSessions(limit=closed_limit)
        self._lock = threading.Lock()

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

    def _new_key(
        self, session_id: bytes, spec_digest: bytes
    ) -> tuple[X25519PrivateKey, identity.SignedKey]:
        """The session's ephemeral key, signed by this party over the spec digest."""
        return self.party.new_signed_key(session_id=session_id, spec_digest=spec_digest)

    def _register(self, session_id: bytes, session: Any) -> None:
        """Record a new open session (its slot is already taken: :meth:`_claiming`)."""
        with self._lock:
            if session_id in self._sessions or session_id in self._closed:
                raise SessionError(f"session {session_id.hex()} was already used")
            self._sessions[session_id] = session

    def _pair_keys(
        self,
        *,
        session_id: bytes,
        parties: Sequence[str],
        keys: Sequence[identity.SignedKey],
        own: identity.SignedKey,
        private_key: X25519PrivateKey,
        spec_digest: bytes,
    ) -> dict[int, bytes]:
        """Check the relayed signed keys against the CA and derive this party's pair keys."""
        return session_pair_keys(
            party_id=self.party_id,
            parties=parties,
            keys=keys,
            own=own,
            private_key=private_key,
            session_id=session_id,
            spec_digest=spec_digest,
            ca=self.party.ca,
            certificates=self._certificates,
        )
