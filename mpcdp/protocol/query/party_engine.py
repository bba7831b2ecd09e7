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
  start the noisy vector (a table's local statistic is computed now, before the answer; a
  vector dataset's noise share and encoded vector are drawn on the pool's threads while the
  round goes on: the answer, the coordinator's liveness check and the key checks of
  Contribute overlap the draw), make an ephemeral X25519 key and sign it over the spec
  digest.
contribute(session, keys) from the same coordinator C:
  refuse unless the session is pending (not unknown, expired, foreign or already used) and
  ``keys`` holds exactly one valid signed key per spec party, ours unchanged. Then derive the
  pair keys, wait for the noisy vector (a failed draw refuses, charging nothing), charge the
  ledger (the reservation becomes the charge in place: charge before release), mask, and
  return the upload. The masking starts on another thread while the ledger writes the
  charge (a wait on the disk); nothing is handed out before the write. The session keeps its
  coordinator's slot until the upload ends: read to its end, or given up
  (:meth:`PartyEngine.upload_ended`, which the transport calls when the call ends however
  it ends; it gives the slot back once), so a coordinator's pending sessions and running
  uploads together stay within its limit.
abort(session): forget the session.

A warm round is one call (docs/queries.md, "Warm queries in one round trip"):
publish_keys(batch, count, ttl) from coordinator C: sign ``count`` fresh ephemeral keys for C,
each for one future round (mpcdp.protocol.session.PrekeyStore; nothing about the data).
contribute_warm(session, spec, keys) from C: the checks of propose, in the same order, then
the relayed keys (one per spec party, all of one batch and index, each signed for C and
unexpired; mpcdp.protocol.session.check_prekeys); then this party's key is taken from the
store (its use: a second call with it is refused), the pair keys derived for the session id
and the spec digest, the noisy vector built, and the budget checked (within C's share,
counting every reservation in flight) and charged in one durable write, the reservation and
the charge at once, before the upload is returned as contribute returns it. Any refusal
comes before that write: nothing is charged.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mpcdp.config.datasets import Vector
from mpcdp.config.party_config import DatasetConfig
from mpcdp.dp.ledger import LedgerWriteError
from mpcdp.errors import (
    AuthError,
    DataError,
    LedgerError,
    ParameterError,
    PolicyError,
    SessionError,
)
from mpcdp.mpc import ring, sharing
from mpcdp.protocol import identity, pads
from mpcdp.protocol.noise_pool import Builder, NoisePool
from mpcdp.protocol.query.local_statistic import (
    EngineTable,
    add_local_words,
    require_row_level,
)
from mpcdp.protocol.query.plan import ReleasePlan, plan
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic, digest
from mpcdp.protocol.query.sql_release import party_release
from mpcdp.protocol.session import (
    DEFAULT_MAX_PREKEYS,
    SESSION_ID_BYTES,
    Contribution,
    PartyIdentity,
    PrekeyStore,
    Proposal,
    SessionHost,
    check_prekeys,
    durability_refusal,
    prekey_pair_keys,
    unavailable,
)

__all__ = [
    # what a session hands out, defined in mpcdp.protocol.session (named here too)
    "SESSION_ID_BYTES",
    "Contribution",
    "DatasetView",
    "PartyEngine",
    "Proposal",
    "noisy_builder",
    "pool_key",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetView:
    """A dataset as the engine sees it: the owner's declaration and the loaded data.

    ``data`` is None when the file failed validation; ``error`` then says why (in the
    party's own log and ``mpcdp party check`` only: a coordinator is told that the dataset is
    unavailable, never which cell, value or path).
    """

    config: DatasetConfig
    data: EngineTable | Vector | None
    error: str | None = None


def pool_key(spec: QuerySpec) -> QuerySpec:
    """Everything that determines a party's noisy vector: the spec without its query id."""
    return replace(spec, query_id="*")


#: secret bytes per build that key the engine's choice of rows per privacy unit
_SALT_BYTES = 16


def noisy_builder(release: ReleasePlan, data: EngineTable | Vector) -> Builder:
    """noise share (+ the encoded local statistic of an in-memory vector), in the ring of the
    query (the share drawn in slices, on the pool's workers). A table's statistic is not
    built here: its engine runs when a query takes the vector (:meth:`PartyEngine._accept`),
    so a prepared vector never holds stale data and no query runs speculatively."""

    spec = release.spec
    dtype = ring.dtype_for(spec.ring_bits).newbyteorder("=")

    def build(rng: np.random.Generator, workers: Executor) -> Any:
        noisy = np.empty(release.length, dtype=dtype)
        offset = 0
        for t in release.tensors:
            # i.i.d. coordinates: any slicing gives the same law
            pads.fill_noise(
                noisy[offset : offset + t.length], noise=t.mechanism, honest=spec.honest,
                rng=rng, workers=workers,
            )  # fmt: skip
            offset += t.length
        if isinstance(data, Vector):
            add_local_words(release, data, noisy, salt=b"")
        return noisy

    return build


#: words masked between two looks at the stop flag of a :class:`_MaskAhead`
_AHEAD_SLICE_WORDS = 1 << 16


class _MaskAhead:
    """Masks the leading words of an upload on an executor's thread, slice by slice, until
    :meth:`stop`: the party does this while its ledger writes the charge (a wait on the
    disk), so that less is left to mask once the charge is written. The words stay in the
    party's memory until the Contribution that holds them is handed out, after the charge;
    the mask stream is used by one thread at a time (this one until :meth:`stop` returns)."""

    def __init__(self, executor: Executor, stream: sharing.MaskStream, vec: np.ndarray) -> None:
        self._stream, self._vec = stream, vec
        self._halt = threading.Event()
        self._words = 0
        self._job = executor.submit(self._run)

    def _run(self) -> None:
        for start in range(0, self._vec.size, _AHEAD_SLICE_WORDS):
            if self._halt.is_set():
                return
            seg = self._vec[start : start + _AHEAD_SLICE_WORDS]
            self._stream.apply(seg)
            self._words = start + seg.size

    def stop(self) -> int:
        """Stop after the slice under way; the number of leading words masked (the stream
        is positioned there). Raises what the masking raised."""
        self._halt.set()
        if self._job.cancel():  # never started (every thread was busy)
            return 0
        self._job.result()
        return self._words


#: the ledger keeps this many characters of a note
_NOTE_CHARS = 200
#: a re-run's query id: ``<first round's id>.r<k>`` (mpcdp.protocol.query.round_coordinator)
_RERUN = re.compile(r"^(?P<first>.+)\.r(?P<k>[1-9][0-9]*)$")


def _note(spec: QuerySpec) -> str:
    """What a query's charge pays for, in words (the ledger's note): the statistic or the
    SQL text, then in brackets the roster that contributes and, for a re-run, the first
    round's query id (the text is shortened so that the ledger's 200 characters always
    keep the brackets)."""
    roster = f"parties {','.join(spec.parties)}"
    if len(roster) > _NOTE_CHARS // 2:
        roster = f"{len(spec.parties)} parties incl. {spec.parties[0]}"
    rerun = _RERUN.match(spec.query_id)
    if rerun is not None:
        roster += f"; re-run {rerun['k']} of {rerun['first'][:40]}"
    if spec.statistic is Statistic.SQL:
        what = f"sql ({spec.mechanism}): {' '.join(spec.sql.split())}"
    else:
        column = f" of {spec.column}" if spec.column else ""
        what = f"{spec.statistic.value}{column} ({spec.mechanism})"
    tail = f" [{roster}]"
    return what[: _NOTE_CHARS - len(tail)] + tail


@dataclass
class _Session:
    coordinator: str
    spec: QuerySpec
    plan: ReleasePlan
    private_key: X25519PrivateKey
    public: identity.SignedKey
    #: local statistic + noise share (never leaves unmasked), drawn while the round goes on
    noisy: Future[ring.AnyRingVector]
    expires: float


class PartyEngine(SessionHost):
    """One party's sessions. Thread-safe: each session is used by one call at a time."""

    def __init__(
        self,
        party: PartyIdentity,
        *,
        datasets: Mapping[str, DatasetView],
        session_ttl_s: float = 30.0,
        max_pending: int = 16,
        max_pending_total: int = 32,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.monotonic,
        noise_threads: int | None = None,
        propose_floor_s: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        max_prekeys_per_coordinator: int = DEFAULT_MAX_PREKEYS,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``max_prekeys_per_coordinator``: unused pre-published keys one coordinator may
        hold here (a newer batch replaces the oldest); ``wall``: the clock (Unix seconds)
        that pre-published keys expire by."""
        # each pending session holds a noisy vector: bound what one coordinator, and all of
        # them together, can pin
        super().__init__(
            party,
            ttl_s=session_ttl_s,
            per_coordinator=max_pending,
            total=max_pending_total,
            clock=clock,
        )
        self.datasets = dict(datasets)
        if not 0 <= propose_floor_s < session_ttl_s:
            raise ParameterError(
                "propose_floor_s", propose_floor_s, f"must be in [0, session_ttl_s={session_ttl_s})"
            )
        self._floor = propose_floor_s
        self._sleep = sleep
        self._wall = wall
        self.prekeys = PrekeyStore(
            party, max_per_coordinator=max_prekeys_per_coordinator, wall=wall
        )
        self._noise = NoisePool(rng=rng, threads=noise_threads)
        # mask the leading words of uploads while their charges are written (_MaskAhead)
        self._maskers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mask-ahead")
        self._sessions: dict[bytes, _Session] = {}
        self._finished: dict[bytes, ReleasePlan] = {}  # contributed, upload maybe in flight
        # session id -> coordinator, for uploads that still hold their session's slot
        self._uploading: dict[bytes, str] = {}

    @property
    def max_pending_total(self) -> int:
        """Sessions all coordinators together may hold open (each one Contribute at most)."""
        return self._slots.total

    # -- propose -------------------------------------------------------------------------

    def _check_spec(self, spec: QuerySpec) -> tuple[DatasetView, ReleasePlan]:
        self.party.check_parties(parties=spec.parties, colluders=spec.colluders)
        view = self.datasets.get(spec.dataset)
        if view is None:
            raise PolicyError(
                f"unknown dataset {spec.dataset!r} (this party has {sorted(self.datasets)})"
            )
        cfg = view.config
        if view.data is None:
            raise DataError(unavailable(cfg.name, self.party_id))
        release: ReleasePlan | None = None
        if spec.statistic is Statistic.SQL:
            if isinstance(view.data, Vector):
                raise PolicyError(f"dataset {cfg.name!r} is a vector, not a table SQL can read")
            release = party_release(spec, cfg)
            length = release.length
        elif isinstance(view.data, Vector):
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
            require_row_level(view.data.table)  # before any charge
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
        if release is None:
            release = plan(spec, vector_length=length or None)
        release.check_headroom()
        return view, release

    def propose(self, *, session_id: bytes, spec: QuerySpec, coordinator: str) -> Proposal:
        """Check, reserve and prepare a query (module docstring). With a floor
        (``propose_floor_s``), the answer, or the refusal, leaves no sooner than the floor
        after the call arrived, so its timing does not show how long the engine took."""
        start = self._clock()
        try:
            with self._claiming(session_id, coordinator):
                return self._propose(session_id, spec, coordinator)
        finally:
            self._hold_to_floor(start, spec.query_id)

    def _hold_to_floor(self, start: float, query_id: str) -> None:
        """Wait until ``propose_floor_s`` has passed since ``start`` (if a floor is set)."""
        if self._floor <= 0:
            return
        left = self._floor - (self._clock() - start)
        if left > 0:
            self._sleep(left)
        else:
            log.warning(
                "query %s took %.3f s, past propose_floor_s=%g: its timing may show "
                "how long the engine worked (raise the floor)",
                query_id,
                self._floor - left,
                self._floor,
            )

    def _reserve(
        self, spec: QuerySpec, coordinator: str, view: DatasetView, release: ReleasePlan
    ) -> None:
        """Reserve the query's charge within ``coordinator``'s share, on disk."""
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

    def _propose(self, session_id: bytes, spec: QuerySpec, coordinator: str) -> Proposal:
        view, release = self._check_spec(spec)
        self._reserve(spec, coordinator, view, release)
        try:
            proposal = self._accept(session_id, spec, coordinator, view, release)
        except BaseException:
            self.ledger.release(spec.query_id, coordinator=coordinator)
            raise
        # the session's time to live starts now (its noise was built after the reservation)
        self.ledger.renew(spec.query_id, coordinator=coordinator, ttl_s=self._ttl)
        return proposal

    def _build(
        self, spec: QuerySpec, view: DatasetView, release: ReleasePlan
    ) -> ring.AnyRingVector:
        """The noisy local vector of a query: a prepared noise share (or one built now),
        plus the local statistic (a table's from its engine, as it is now)."""
        assert view.data is not None  # checked in _check_spec
        try:
            noisy = self._noise.take(pool_key(spec), noisy_builder(release, view.data))
            if isinstance(view.data, EngineTable):  # the table as it is now, in its engine
                add_local_words(release, view.data, noisy, salt=secrets.token_bytes(_SALT_BYTES))
        except DataError as exc:
            # an engine's message may quote the data: it stays in the owner's log
            log.error("dataset %r failed its query %s: %s", spec.dataset, spec.query_id, exc)
            raise DataError(unavailable(spec.dataset, self.party_id)) from None
        return noisy

    def _build_later(
        self, spec: QuerySpec, view: DatasetView, release: ReleasePlan
    ) -> Future[ring.AnyRingVector]:
        """The noisy local vector of a cold round, drawn while the round goes on: a vector
        dataset's (noise share + its encoded vector, which depends on nothing but the
        in-memory vector and the spec: the pool builds the same off the request path) on
        the pool's threads, awaited at Contribute; a table's now, as :meth:`_build` does,
        so that its engine runs before Propose answers (and within ``propose_floor_s``)."""
        assert view.data is not None  # checked in _check_spec
        if isinstance(view.data, Vector):
            return self._noise.take_later(pool_key(spec), noisy_builder(release, view.data))
        done: Future[ring.AnyRingVector] = Future()
        done.set_result(self._build(spec, view, release))
        return done

    def _noisy_of(self, session: _Session) -> ring.AnyRingVector:
        """The session's noisy vector, once drawn (a failed build fails the Contribute)."""
        try:
            return session.noisy.result()
        except DataError as exc:  # its message may quote the data: it stays in the log
            log.error("dataset %r failed its query %s: %s", session.spec.dataset,
                      session.spec.query_id, exc)  # fmt: skip
            raise DataError(unavailable(session.spec.dataset, self.party_id)) from None

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
        # after the reservation: a refused query draws nothing
        noisy = self._build_later(spec, view, release)
        try:
            private_key, signed = self._new_key(session_id, digest(spec))
        except BaseException:
            noisy.cancel()
            raise
        session = _Session(
            coordinator=coordinator,
            spec=spec,
            plan=release,
            private_key=private_key,
            public=signed,
            noisy=noisy,
            expires=self._clock() + self._ttl,
        )
        try:
            self._register(session_id, session)
        except BaseException:
            noisy.cancel()
            raise
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
        self,
        *,
        session_id: bytes,
        keys: Sequence[identity.SignedKey],
        coordinator: str,
        in_time: Callable[[], bool] | None = None,
    ) -> Contribution:
        """Charge and hand out this party's masked upload. ``in_time``: asked right before
        the charge (after the noisy vector is ready); false (the servicer's: this process
        stalled past the call's deadline since the call's first check) refuses, charging
        nothing."""
        session = self._take(session_id, coordinator)
        spec = session.spec
        try:
            pair_keys = self._pair_keys(
                session_id=session_id,
                parties=spec.parties,
                keys=keys,
                own=session.public,
                private_key=session.private_key,
                spec_digest=digest(spec),
            )
            noisy = self._noisy_of(session)
        except BaseException:
            # nothing leaves: the budget is free again, and so is the slot
            session.noisy.cancel()
            self.upload_ended(session_id=session_id)
            self.ledger.release(spec.query_id, coordinator=session.coordinator)
            raise
        return self._charge_and_mask(
            session_id, spec, session.plan, noisy, pair_keys, session.coordinator,
            in_time=in_time,
        )  # fmt: skip

    def publish_keys(
        self, *, coordinator: str, batch_id: bytes, count: int, ttl_s: float
    ) -> list[identity.Prekey]:
        """Sign a batch of ``count`` keys for ``coordinator``'s warm rounds (module
        docstring). Reads no data and reserves nothing."""
        return self.prekeys.publish(
            coordinator=coordinator, batch_id=batch_id, count=count, ttl_s=ttl_s
        )

    def contribute_warm(
        self,
        *,
        session_id: bytes,
        spec: QuerySpec,
        keys: Sequence[identity.Prekey],
        coordinator: str,
        in_time: Callable[[], bool] | None = None,
    ) -> Contribution:
        """A whole round in one call, on pre-published keys (module docstring): refused,
        with nothing reserved or charged, unless propose would accept ``spec`` and ``keys``
        are one valid unused key per party of one round, this party's taken from its store
        now (a key serves one round: a replayed, unknown, expired or foreign one is
        refused), and, right before the charge, ``in_time`` (as :meth:`contribute`)."""
        start = self._clock()
        try:
            with self._claiming(session_id, coordinator):
                view, release = self._check_spec(spec)
                own = check_prekeys(
                    party_id=self.party_id,
                    parties=spec.parties,
                    keys=keys,
                    coordinator=coordinator,
                    now=self._wall(),
                    certificates=self._certificates,
                )
                held = self.prekeys.take(
                    coordinator=coordinator, batch_id=own.batch_id, index=own.index
                )
                if held.key != own:
                    raise AuthError(
                        f"the relayed {identity.PREKEY_REFUSAL} of {self.party_id!r} is not the "
                        "one it signed; nothing was charged"
                    )
                spec_digest = digest(spec)
                pair_keys = prekey_pair_keys(
                    party_id=self.party_id,
                    parties=spec.parties,
                    keys=keys,
                    private_key=held.private_key,
                    session_id=session_id,
                    spec_digest=spec_digest,
                )
                # the vector is built before the charge (a failure here charges nothing);
                # the charge below is the reservation and the charge in one durable write
                noisy = self._build(spec, view, release)
                if spec.mechanism == "none":
                    log.warning(
                        "exact release (mechanism none, no differential privacy) of "
                        "dataset %r requested by %s",
                        spec.dataset,
                        coordinator,
                    )
                with self._lock:
                    # used: never again; the slot stays taken until the upload ends
                    self._closed.add(session_id, "used")
                    self._uploading[session_id] = coordinator
        finally:
            self._hold_to_floor(start, spec.query_id)
        log.info(
            "session %s: warm round of query %s (%s)",
            session_id.hex(),
            spec.query_id,
            spec.statistic.value,
        )
        return self._charge_and_mask(
            session_id, spec, release, noisy, pair_keys, coordinator, reserved=False,
            in_time=in_time,
        )  # fmt: skip

    def _charge_and_mask(
        self,
        session_id: bytes,
        spec: QuerySpec,
        release: ReleasePlan,
        noisy: ring.AnyRingVector,
        pair_keys: dict[int, bytes],
        coordinator: str,
        *,
        reserved: bool = True,
        in_time: Callable[[], bool] | None = None,
    ) -> Contribution:
        """Charge (charge before release) and hand out the masked upload. ``reserved``: the
        charge turns the query's reservation into the charge; else (a warm round) it checks
        the budget, within the coordinator's share, and charges in one durable write. The
        session's slot is held by the upload (``_uploading``) on entry. ``in_time`` false
        right before the charge (this process was stopped past the call's deadline):
        refused, the reservation released, nothing charged."""

        def nothing_charged() -> None:
            """Before the charge is written: the slot and the budget are free again."""
            self.upload_ended(session_id=session_id)
            if reserved:
                self.ledger.release(spec.query_id, coordinator=coordinator)

        if in_time is not None and not in_time():
            nothing_charged()
            raise SessionError(
                f"Contribute of session {session_id.hex()} outlived its deadline before its "
                "charge (this party was stopped or slowed); nothing was charged"
            )
        me = spec.index_of(self.party_id)
        try:
            stream = sharing.MaskStream(
                party=me, pair_keys=pair_keys, round_id=0, tensor_id=0, ring_bits=spec.ring_bits
            )
            # the leading words are masked on another thread while the ledger writes the
            # charge (a durable write waits on the disk); nothing leaves before it is written.
            # An engine that is closing takes no more work (RuntimeError): nothing charged
            ahead = _MaskAhead(self._maskers, stream, noisy)
        except BaseException:
            nothing_charged()
            raise
        try:
            charge = self.ledger.charge(
                dataset=spec.dataset,
                query_id=spec.query_id,
                coordinator=coordinator,
                event=release.event,
                share=self.datasets[spec.dataset].config.share(coordinator),
                reserved=reserved,
                note=_note(spec),
            )
        except BaseException as exc:
            try:
                ahead.stop()
            except Exception as masking:  # the charge's refusal is what the caller needs
                log.warning(
                    "session %s: masking ahead failed too: %s", session_id.hex(), type(masking)
                )
            nothing_charged()  # nothing leaves
            if isinstance(exc, LedgerWriteError):
                raise durability_refusal(self.party_id, exc) from None
            raise
        try:
            masked = ahead.stop()
        except BaseException:
            self.upload_ended(session_id=session_id)  # charged; nothing leaves
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
        with self._lock:
            self._finished[session_id] = release
            while len(self._finished) > 64:  # uploads that never reported back
                self._finished.pop(next(iter(self._finished)))
        log.info("session %s: contributing %d words", session_id.hex(), noisy.size)
        return Contribution(
            party_id=self.party_id,
            epsilon_spent=spec.epsilon,
            budget_remaining=status.remaining_epsilon,
            length=noisy.size,
            _noisy=noisy,
            _mask=stream,
            _done=functools.partial(self.upload_ended, session_id=session_id),
            _masked_words=masked,
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
                pool_key(release.spec), noisy_builder(release, view.data), nbytes=nbytes
            )

    def close(self) -> None:
        """Stop the background noise generation."""
        self._noise.close()
        self._maskers.shutdown(wait=True, cancel_futures=True)

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
        session.noisy.cancel()  # a build that has not started never runs
        self._slots.give_back(session.coordinator)
        self._closed.add(session_id, why)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s for s, v in self._sessions.items() if v.expires < now]:
            session = self._sessions[sid]
            self._remove(sid, "expired")
            self.ledger.release(session.spec.query_id, coordinator=session.coordinator)
