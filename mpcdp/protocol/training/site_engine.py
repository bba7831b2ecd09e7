"""The site's half of federated DP-SGD: :class:`TrainingEngine` opens sessions (checks the
spec and that the whole run fits the coordinator's share of the budget, reserves the run's
first block, builds the gradient source), and per step reserves and charges each block,
computes the clipped, rounded gradient sum, adds its noise share and masks (see the package
docstring). Its evaluations at the sites are in .site_evaluation (a mixin), its sessions'
ledger book-keeping in .site_session. Nothing happens at import time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor

import numpy as np
from numpy.typing import NDArray

from mpcdp.audit.canaries import (
    draw_inclusion,
    gradient_coordinates,
    input_canaries,
    pack_inclusion,
)
from mpcdp.dp import accountant
from mpcdp.dp.ledger import LedgerWriteError
from mpcdp.dp.mechanisms import Skellam
from mpcdp.errors import (
    DataError,
    HeadroomError,
    LedgerError,
    ParameterError,
    PolicyError,
    ProtocolError,
    SessionError,
)
from mpcdp.mpc import encoding
from mpcdp.protocol import identity, pads
from mpcdp.protocol.noise_pool import Builder, NoisePool
from mpcdp.protocol.session import (
    Contribution,
    PartyIdentity,
    Proposal,
    SessionHost,
    durability_refusal,
    unavailable,
)
from mpcdp.protocol.training.evaluation import (
    eval_mechanism,
    eval_words,
)
from mpcdp.protocol.training.fingerprint import check_architecture
from mpcdp.protocol.training.site_evaluation import SiteEvaluation
from mpcdp.protocol.training.site_session import (
    LATE,
    SiteSession,
    block_of,
    charge_id,
    release_block,
    settle_block,
)
from mpcdp.protocol.training.source import GradientSource, TrainingTask
from mpcdp.protocol.training.train_spec import (
    TrainSpec,
    digest,
    max_batch_size,
    mechanism,
    run_event,
    step_event,
)

log = logging.getLogger(__name__)


class TrainingEngine(SiteEvaluation, SessionHost):
    """One site's training sessions (the training twin of PartyEngine, sharing its ledger)."""

    def __init__(
        self,
        party: PartyIdentity,
        *,
        tasks: Mapping[str, TrainingTask],
        idle_ttl_s: float = 600.0,
        max_sessions: int = 4,
        max_sessions_total: int = 8,
        max_params: int = 100_000_000,
        noise_threads: int = 0,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.monotonic,
        test_only_noise_divisor: float = 1.0,
    ) -> None:
        """``test_only_noise_divisor``: FOR TESTS AND BENCHMARKS ONLY. Divides the std of
        this site's noise shares (inf: no noise at all), to show that the one-run audit
        (mpcdp.audit) catches a release less private than claimed. It is a constructor
        argument only: nothing in party.toml or on the wire reaches it."""
        from mpcdp.mpc.rng import ensure_rng

        if (
            isinstance(test_only_noise_divisor, bool)
            or not isinstance(test_only_noise_divisor, int | float)
            or not test_only_noise_divisor >= 1
        ):
            raise ParameterError(
                "test_only_noise_divisor", test_only_noise_divisor, "must be a number >= 1"
            )
        self._noise_divisor = float(test_only_noise_divisor)
        if self._noise_divisor != 1.0:
            log.warning(
                "TEST ONLY: party %s divides its training noise std by %g; its releases are "
                "NOT differentially private as claimed",
                party.party_id,
                self._noise_divisor,
            )

        super().__init__(
            party,
            ttl_s=idle_ttl_s,
            per_coordinator=max_sessions,
            total=max_sessions_total,
            closed_limit=4096,
            clock=clock,
        )
        self.tasks = dict(tasks)
        self._max_params = max_params
        self._rng = ensure_rng(rng)  # batch sampling: must stay secret
        self._pads = NoisePool(rng=rng, max_entries=2, threads=noise_threads, name="pad")
        self._sessions: dict[bytes, SiteSession] = {}

    def max_parameters(self, session_id: bytes) -> int:
        """How many parameter values a step of this open session may carry."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                why = self._closed.get(session_id) or "unknown or expired"
                raise SessionError(f"training session {session_id.hex()}: {why}")
            return session.source.total_params

    # -- open -------------------------------------------------------------------------------

    def open(self, *, session_id: bytes, spec: TrainSpec, coordinator: str) -> Proposal:
        # before a slot is taken: stale sessions of the run must not hold the slots
        self._supersede(spec, coordinator)
        with self._claiming(session_id, coordinator):
            return self._open(session_id, spec, coordinator)

    def _open(self, session_id: bytes, spec: TrainSpec, coordinator: str) -> Proposal:
        self.party.check_parties(parties=spec.parties, colluders=spec.colluders)
        # every parameter that decides this site's noise is in its samplers' exact range
        mechanism(spec).check_range(honest=spec.honest)
        if spec.eval_every:
            words = eval_words(spec.loss)
            eval_mechanism(spec.eval_mu, words=words).check_range(honest=spec.honest)
        task = self.tasks.get(spec.dataset)
        if task is None:
            raise PolicyError(
                f"unknown example dataset {spec.dataset!r} (this party trains on "
                f"{sorted(self.tasks)})"
            )
        if task.make_source is None:
            raise DataError(unavailable(spec.dataset, self.party_id))
        cfg = task.config
        if spec.num_params > self._max_params:
            raise PolicyError(
                f"num_params={spec.num_params} exceeds this site's max_model_params="
                f"{self._max_params}"
            )
        if task.count_params is not None:  # the model's size before it is built
            trainable, total = task.count_params(spec)
            if total > self._max_params:
                raise PolicyError(
                    f"model {spec.model!r} has {total} parameters, more than this site's "
                    f"max_model_params={self._max_params}"
                )
            self._check_architecture(spec, task)  # names the first difference
            _check_num_params(spec, trainable)
        else:
            self._check_architecture(spec, task)
        if spec.eval_every and not task.held_out:
            raise PolicyError(
                f"site {self.party_id!r} declares no held-out split for dataset "
                f"{spec.dataset!r}, so it cannot evaluate (party.toml: eval_path, or "
                "eval_data_paths / eval_data_options for a declared Dataset)"
            )
        # an audit run's included canaries are examples of this site for the session
        self._check_headroom(spec, task.examples + spec.audit_canaries)
        event = run_event(spec)
        if cfg.max_epsilon_per_query is not None:
            eps = accountant.compose([event], delta=cfg.delta).epsilon
            if eps > cfg.max_epsilon_per_query:
                raise PolicyError(
                    f"the session's epsilon {eps:.4g} (delta={cfg.delta:g}) exceeds "
                    f"max_epsilon_per_query={cfg.max_epsilon_per_query:g} of {cfg.name!r}"
                )
        # the whole run must fit the coordinator's share and the budget now; then only its
        # first block is reserved (durably), and each later block when its step comes: an
        # idle or abandoned session holds one block, never the run
        share = cfg.share(coordinator)
        self.ledger.check(dataset=cfg.name, event=event, coordinator=coordinator, share=share)
        self._reserve_block(spec, session_id, coordinator, 0)
        first = charge_id(spec, session_id, 0)
        try:
            source = task.make_source(spec)
        except BaseException:
            self.ledger.release(first, coordinator=coordinator)
            raise
        try:
            _check_num_params(spec, source.num_params)
            canaries = self._canaries(spec, task, source)
            return self._accept(session_id, spec, coordinator, source, canaries)
        except BaseException:
            source.close()
            self.ledger.release(first, coordinator=coordinator)
            raise

    def _supersede(self, spec: TrainSpec, coordinator: str) -> None:
        """A new session of a run ends this coordinator's older sessions of the same run: the
        run goes on in the new one (a site back after a failure; the abort of the old one
        may never have reached this site), so the old one's block is settled now rather
        than when it expires."""
        with self._lock:
            older = [
                sid
                for sid, s in self._sessions.items()
                if s.coordinator == coordinator and s.spec.run_id == spec.run_id
            ]
        for sid in older:
            self._end(sid, "superseded by a newer session of its run")
            log.info(
                "training session %s: superseded by a newer session of run %s",
                sid.hex(),
                spec.run_id,
            )

    def _reserve_block(
        self, spec: TrainSpec, session_id: bytes, coordinator: str, block: int
    ) -> None:
        """Reserve block ``block`` of the session (its steps' event) within the
        coordinator's share, on disk, for as long as the session may stay idle."""
        first, n_steps = block_of(spec, block)
        try:
            self.ledger.reserve(
                dataset=spec.dataset,
                query_id=charge_id(spec, session_id, block),
                coordinator=coordinator,
                event=step_event(spec, steps=n_steps),
                share=self.tasks[spec.dataset].config.share(coordinator),
                ttl_s=self._ttl,
                note=f"training {spec.run_id} ({spec.model}) steps {first}-{first + n_steps - 1}"
                + (" (audit run)" if spec.audit_canaries else ""),
            )
        except LedgerWriteError as exc:
            raise durability_refusal(self.party_id, exc) from None

    def _canaries(
        self, spec: TrainSpec, task: TrainingTask, source: GradientSource
    ) -> tuple[NDArray[np.bool_] | None, NDArray[np.int64] | None]:
        """An audit run's inclusion bits (from this site's CSPRNG) and, for white-box
        canaries, the included ones' coordinates; black-box canaries that are included join
        the source's examples. (None, None) for an ordinary run."""
        if spec.audit_canaries == 0:
            return None, None
        me = spec.index_of(self.party_id)
        bits = draw_inclusion(count=spec.audit_canaries, rng=self._rng)
        if spec.audit_kind == "white-box":
            coords = gradient_coordinates(
                run_id=spec.run_id,
                num_params=spec.num_params,
                sites=len(spec.parties),
                per_site=spec.audit_canaries,
            )[me]
            return bits, coords[bits]
        if not task.feature_shape or task.num_classes < 2:
            raise PolicyError(
                f"dataset {spec.dataset!r} declares no feature shape and classes for input "
                "canaries; use audit_kind='white-box'"
            )
        x, y = input_canaries(
            run_id=spec.run_id,
            site_index=me,
            count=spec.audit_canaries,
            feature_shape=task.feature_shape,
            num_classes=task.num_classes,
        )
        if bits.any():
            source.add_examples(x[bits], y[bits])
        return bits, None

    def _accept(
        self,
        session_id: bytes,
        spec: TrainSpec,
        coordinator: str,
        source: GradientSource,
        canaries: tuple[NDArray[np.bool_] | None, NDArray[np.int64] | None],
    ) -> Proposal:
        private_key, signed = self._new_key(session_id, digest(spec))
        session = SiteSession(
            coordinator=coordinator,
            spec=spec,
            source=source,
            private_key=private_key,
            public=signed,
            expires=self._clock() + self._ttl,
            next_step=spec.start_step,
            canaries_in=canaries[0],
            canary_coordinates=canaries[1],
        )
        self._register(session_id, session)
        log.info(
            "training session %s: run %s, %d steps from %d, %d parameters",
            session_id.hex(),
            spec.run_id,
            spec.steps,
            spec.start_step,
            spec.num_params,
        )
        return Proposal(key=signed, length=spec.num_params)

    def _check_architecture(self, spec: TrainSpec, task: TrainingTask) -> None:
        """The run's loss and model are the ones this site declared and builds (before
        anything is reserved)."""
        if spec.loss != task.loss:
            raise PolicyError(
                f"site {self.party_id!r}: dataset {spec.dataset!r} is trained with loss "
                f"{task.loss!r} here; the run names {spec.loss!r}"
            )
        if not spec.fingerprint:
            log.warning(
                "run %s names no architecture fingerprint: only the parameter count is checked",
                spec.run_id,
            )
        elif task.architecture is not None:
            check_architecture(
                here=task.architecture(spec),
                there=spec.architecture,
                fp=spec.fingerprint,
                model=spec.model,
                site=self.party_id,
            )

    def _check_headroom(self, spec: TrainSpec, examples: int) -> None:
        batch = max_batch_size(examples=examples, sample_rate=spec.sample_rate)
        per_site = batch * math.ceil(spec.max_grad_norm * 2.0**spec.scale_bits) + 1
        n = len(spec.parties)
        tail = mechanism(spec).tail_bound(n_parties=n, honest=spec.honest)
        encoding_bound = n * per_site + tail
        if encoding_bound >= 1 << (spec.ring_bits - 1):
            raise HeadroomError(
                f"training step could overflow the ring: {n} sites * (batch {batch} * "
                f"max_grad_norm={spec.max_grad_norm:g} * 2^scale_bits={spec.scale_bits}) + "
                f"noise tail {tail} >= 2^{spec.ring_bits - 1}; lower scale_bits"
            )

    # -- step -------------------------------------------------------------------------------

    def _acquire(self, session_id: bytes, coordinator: str) -> SiteSession:
        with self._lock:
            self._expire()
            session = self._sessions.get(session_id)
            if session is None:
                why = self._closed.get(session_id)
                if why is not None:
                    raise SessionError(f"training session {session_id.hex()} is closed ({why})")
                raise SessionError(f"unknown or expired training session {session_id.hex()}")
            if session.coordinator != coordinator:
                raise SessionError(
                    f"session {session_id.hex()} belongs to coordinator "
                    f"{session.coordinator!r}, not {coordinator!r}"
                )
            if session.busy:
                raise SessionError(f"session {session_id.hex()} is already running a step")
            session.busy = True
            return session

    def step(
        self,
        *,
        session_id: bytes,
        step: int,
        keys: Sequence[identity.SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
        coordinator: str,
        in_time: Callable[[], bool] | None = None,
        unstalled: Callable[[], bool] | None = None,
    ) -> Contribution:
        """Run step ``step`` of the session: the masked noisy quantized gradient sum.

        ``in_time``: is the coordinator still waiting for this step? (the servicer's view of
        the call: not cancelled, not past its deadline, this process not suspended past it).
        Asked before anything is charged: a step whose coordinator gave up (and re-ran it
        among the other sites) is refused, its session ended, and the step never leaves
        this site, so its block is settled without it. ``unstalled`` (default ``in_time``)
        is asked again once the upload is ready, after the work on private data (a batch
        whose size is secret): the servicer's refuses only when this process was stopped
        past the call's time left, never because the deadline passed while it worked, which
        would tell the coordinator, free of charge, how long that work took."""
        session = self._acquire(session_id, coordinator)
        again = unstalled if unstalled is not None else in_time
        return self._running(
            session_id,
            session,
            f"step {step}",
            lambda: self._step(session_id, session, step, keys, parameters, full, in_time, again),
        )

    def _running(
        self,
        session_id: bytes,
        session: SiteSession,
        what: str,
        run: Callable[[], Contribution],
    ) -> Contribution:
        """Run a step or an evaluation of an acquired session: any failure ends the session
        (nothing is ever answered twice); a session ended meanwhile is settled after it."""
        try:
            return run()
        except Exception as exc:
            self._end(session_id, f"failed at {what}: {type(exc).__name__}")
            raise
        finally:
            with self._lock:
                session.busy = False
                ending = session.ended
            if ending:  # ended while this ran: the ledger is settled now
                self._finish(session_id, session)

    def _step(
        self,
        session_id: bytes,
        session: SiteSession,
        step: int,
        keys: Sequence[identity.SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
        in_time: Callable[[], bool] | None,
        again: Callable[[], bool] | None,
    ) -> Contribution:
        spec = session.spec
        if in_time is not None and not in_time():
            raise SessionError(LATE.format(what=f"step {step}", sid=session_id.hex()))
        if step != session.next_step:
            raise ProtocolError(
                f"step={step} but session {session_id.hex()} expects step {session.next_step}"
            )
        if step >= spec.end_step:
            raise ProtocolError(f"the session's {spec.steps} steps are done")
        self._session_keys(session_id, session, keys, full)
        self._check_parameters(session, parameters, full)
        block = (step - spec.start_step) // spec.steps_per_charge
        if block > session.charged_block:
            if block > session.reserved_block:
                self._reserve_block(spec, session_id, session.coordinator, block)
                session.reserved_block = block
            try:
                charge = self.ledger.charge(
                    dataset=spec.dataset,
                    query_id=charge_id(spec, session_id, block),
                    coordinator=session.coordinator,
                    event=step_event(spec, steps=block_of(spec, block)[1]),
                    share=self.tasks[spec.dataset].config.share(session.coordinator),
                    reserved=True,
                )
            except LedgerWriteError as exc:
                raise durability_refusal(self.party_id, exc) from None
            if not charge.new:
                raise LedgerError(f"block {block} of session {session_id.hex()} was charged")
            session.charged_block = block
            assert charge.status is not None
            session.last_status = charge.status.remaining_epsilon
            session.last_epsilon = f"{charge.status.spent_epsilon:.6g}"
        session.source.load_parameters(parameters, full=full)
        grad = session.source.quantized_gradient(rng=self._rng)
        if grad.shape != (spec.num_params,):
            raise ProtocolError(f"gradient has shape {grad.shape}, expected ({spec.num_params},)")
        if session.canary_coordinates is not None:
            self._add_gradient_canaries(spec, session.canary_coordinates, grad)
        upload = self._pads.take((session_id, step), self._pad_builder(session, step))
        np.add(upload, encoding.to_ring(grad, ring_bits=spec.ring_bits), out=upload)
        with self._lock:  # from here on the step counts as sent (the session's settlement)
            if session.ended or (again is not None and not again()):
                raise SessionError(LATE.format(what=f"step {step}", sid=session_id.hex()))
            session.next_step = step + 1
        session.expires = self._clock() + self._ttl
        reveal = b""
        if session.next_step >= spec.end_step:
            if session.canaries_in is not None:
                # the run's releases are all made: the audit may see which canaries were in
                reveal = pack_inclusion(session.canaries_in)
            if not spec.eval_every:  # else the evaluation after the last step ends it
                self._end(session_id, "finished")
        return Contribution(
            party_id=self.party_id,
            epsilon_spent=session.last_epsilon,
            budget_remaining=session.last_status,
            length=upload.size,
            _noisy=upload,
            _mask=None,
            audit_inclusion=reveal,
        )

    def _session_keys(
        self,
        session_id: bytes,
        session: SiteSession,
        keys: Sequence[identity.SignedKey],
        full: bool,
    ) -> None:
        """The session's pairwise keys from the signed keys its first call relays (a step's
        or an evaluation's: that call also carries all parameters); later calls relay none."""
        if session.pair_keys is None:
            if not keys:
                raise ProtocolError("the first call of a session must relay every signed key")
            if not full:
                raise ProtocolError("the first call of a session must carry all parameters")
            session.pair_keys = self._pair_keys(
                session_id=session_id,
                parties=session.spec.parties,
                keys=keys,
                own=session.public,
                private_key=session.private_key,
                spec_digest=digest(session.spec),
            )
        elif keys:
            raise ProtocolError("signed keys are relayed on a session's first call only")

    @staticmethod
    def _check_parameters(
        session: SiteSession, parameters: NDArray[np.float32], full: bool
    ) -> None:
        expected = session.source.total_params if full else session.source.num_params
        if parameters.shape != (expected,):
            raise ProtocolError(
                f"parameters carry {parameters.size} values, expected {expected} "
                f"({'all' if full else 'trainable'} parameters of {session.spec.model!r})"
            )
        if not np.all(np.isfinite(parameters)):
            raise ParameterError("parameters", "non-finite", "must be finite float32 values")

    def _noise(self, noise: Skellam) -> Skellam | None:
        """``noise`` as this site adds it: divided by the test-only divisor (constructor
        docstring; inf: none at all)."""
        if self._noise_divisor == 1.0:
            return noise
        if math.isinf(self._noise_divisor):
            return None
        return Skellam(
            mu=noise.mu / self._noise_divisor**2,
            l1_sensitivity=noise.l1_sensitivity,
            l2_sensitivity=noise.l2_sensitivity,
        )

    def _add_gradient_canaries(
        self, spec: TrainSpec, coordinates: NDArray[np.int64], grad: np.ndarray
    ) -> None:
        """A white-box audit step: each included Dirac canary is Poisson-sampled like an
        example (rate q, this site's secret CSPRNG) and, when sampled, adds its clipped
        gradient C e_c, scaled by 2^k, to the site's rounded sum, before noise and mask. Its
        value C 2^k is itself randomly rounded (exact when it is an integer, as for C = 1):
        at most ceil(C 2^k) on one coordinate, within the sensitivity C 2^k + sqrt(d) that
        the site charges for every example."""
        sampled = coordinates[self._rng.random(coordinates.size) < spec.sample_rate]
        if sampled.size == 0:
            return
        units = spec.max_grad_norm * 2.0**spec.scale_bits
        low = math.floor(units)
        values = low + (self._rng.random(sampled.size) < units - low)
        grad[sampled] += values.astype(grad.dtype)

    def step_finished(self, *, session_id: bytes) -> None:
        """After a step's upload is sent: build the next step's noise share + mask (they do
        not depend on data) in the background."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.next_step >= session.spec.end_step:
            return
        session.source.prepare_next()
        nbytes = session.spec.num_params * session.spec.ring_bits // 8
        self._pads.prepare(
            (session_id, session.next_step),
            self._pad_builder(session, session.next_step),
            nbytes=nbytes,
        )

    def _pad_builder(self, session: SiteSession, step: int) -> Builder:
        spec = session.spec
        pair_keys = session.pair_keys
        assert pair_keys is not None
        me = spec.index_of(self.party_id)
        noise = self._noise(mechanism(spec))  # TEST ONLY divisor: constructor docstring

        def build(rng: np.random.Generator, workers: Executor) -> np.ndarray:
            # noise share + masks in one pass, slice by slice on the pool's workers
            pad: np.ndarray = pads.build_pad(
                size=spec.num_params, ring_bits=spec.ring_bits, noise=noise, honest=spec.honest,
                party=me, pair_keys=pair_keys, round_id=step, tensor_id=0, rng=rng,
                workers=workers,
            )  # fmt: skip
            return pad

        return build

    def abort(self, *, session_id: bytes, coordinator: str) -> bool:
        """Forget a session; True when it was one of this engine's."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.coordinator != coordinator:
                return False
        self._end(session_id, "aborted")
        log.info("training session %s: aborted by %s", session_id.hex(), coordinator)
        return True

    def close(self) -> None:
        with self._lock:
            open_sessions = list(self._sessions)
        for sid in open_sessions:
            self._end(sid, "the party is shutting down")
        self._pads.close()

    def _end(self, session_id: bytes, why: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            self._closed.add(session_id, why)
            if session is None:
                return
            self._slots.give_back(session.coordinator)
            session.ended = True
            if session.busy:
                return  # the running step finishes the ending (see step)
        self._finish(session_id, session)

    def _finish(self, session_id: bytes, session: SiteSession) -> None:
        """The ledger of an ended session: its uncharged reservation released, its charged
        block settled to the steps that left this site; then its data closed."""
        release_block(self.ledger, session, session_id)
        settle_block(self.ledger, session, session_id)
        session.source.close()

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s for s, v in self._sessions.items() if v.expires < now and not v.busy]:
            session = self._sessions.pop(sid)
            self._slots.give_back(session.coordinator)
            session.ended = True
            self._finish(sid, session)
            self._closed.add(sid, "expired")


def _check_num_params(spec: TrainSpec, trainable: int) -> None:
    if trainable != spec.num_params:
        raise PolicyError(
            f"num_params={spec.num_params} but model {spec.model!r} has {trainable} trainable "
            "parameters here"
        )


# -- the coordinator --------------------------------------------------------------------------
