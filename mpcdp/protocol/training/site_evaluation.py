"""Evaluation at the sites, the site's half (mpcdp.protocol.training.evaluation):
:class:`SiteEvaluation` scores the coordinator's model on the site's held-out split at the
spec's evaluation points, once each, and answers with its masked, noised words of Z_2^64.
A mixin of :class:`~mpcdp.protocol.training.site_engine.TrainingEngine`, whose session
handling (acquire, run, keys, parameters, noise) it reuses, so an evaluation goes through the
same checks as a step. Nothing happens at import time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp.ledger import BudgetLedger, LedgerWriteError
from mpcdp.dp.mechanisms import Skellam
from mpcdp.errors import LedgerError, ProtocolError, SessionError
from mpcdp.mpc import encoding
from mpcdp.protocol import identity, pads
from mpcdp.protocol.session import Contribution, durability_refusal
from mpcdp.protocol.training.evaluation import (
    EVAL_RING_BITS,
    EVAL_TENSOR_ID,
    eval_event,
    eval_mechanism,
    eval_words,
    reports_accuracy,
)
from mpcdp.protocol.training.site_session import LATE, SiteSession, eval_id
from mpcdp.protocol.training.source import TrainingTask

__all__ = ["SiteEvaluation"]

log = logging.getLogger(__name__)


class SiteEvaluation:
    """The evaluation half of :class:`~mpcdp.protocol.training.site_engine.TrainingEngine`
    (a mixin): the attributes and methods below are the engine's."""

    party_id: str
    ledger: BudgetLedger
    tasks: dict[str, TrainingTask]
    _ttl: float
    _rng: np.random.Generator
    _lock: threading.Lock
    _clock: Callable[[], float]

    if TYPE_CHECKING:

        def _acquire(self, session_id: bytes, coordinator: str) -> SiteSession: ...

        def _running(
            self,
            session_id: bytes,
            session: SiteSession,
            what: str,
            run: Callable[[], Contribution],
        ) -> Contribution: ...

        def _session_keys(
            self,
            session_id: bytes,
            session: SiteSession,
            keys: Sequence[identity.SignedKey],
            full: bool,
        ) -> None: ...

        @staticmethod
        def _check_parameters(
            session: SiteSession, parameters: NDArray[np.float32], full: bool
        ) -> None: ...

        def _noise(self, noise: Skellam) -> Skellam | None: ...

        def _end(self, session_id: bytes, why: str) -> None: ...

    def evaluate(
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
        """The session's evaluation before step ``step`` (mpcdp.protocol.training.evaluation):
        ``parameters`` scored on this site's held-out split, its words of Z_2^64 with the
        evaluation's noise share and masks. Only at the spec's evaluation points, once each,
        at the session's current step; reserved before the model is scored, charged once the
        words are ready. Refused (and released) when ``in_time`` is false before the
        scoring, or ``unstalled`` (default ``in_time``) after it (see :meth:`step`)."""
        session = self._acquire(session_id, coordinator)
        again = unstalled if unstalled is not None else in_time
        return self._running(
            session_id,
            session,
            f"the evaluation before step {step}",
            lambda: self._evaluate(
                session_id, session, step, keys, parameters, full, in_time, again
            ),
        )

    def _evaluate(
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
        late = LATE.format(what=f"the evaluation before step {step}", sid=session_id.hex())
        if in_time is not None and not in_time():
            raise SessionError(late)
        if not spec.eval_every:
            raise ProtocolError("this session evaluates nothing (its spec's eval_every is 0)")
        if step != session.next_step:
            raise ProtocolError(
                f"an evaluation before step={step}, but session {session_id.hex()} is at step "
                f"{session.next_step}"
            )
        if not spec.is_eval_point(step):
            raise ProtocolError(
                f"step={step} is not an evaluation point of the session (multiples of "
                f"eval_every={spec.eval_every} from {spec.start_step}, and its end {spec.end_step})"
            )
        if step in session.evaluated:
            raise ProtocolError(
                f"the session evaluated before step {step} already: an evaluation's masks are "
                "used once"
            )
        self._session_keys(session_id, session, keys, full)
        self._check_parameters(session, parameters, full)
        cfg = self.tasks[spec.dataset].config
        query_id = eval_id(spec, session_id, step)
        words = eval_words(spec.loss)
        event = eval_event(spec.eval_mu, words=words)
        try:
            self.ledger.reserve(
                dataset=spec.dataset,
                query_id=query_id,
                coordinator=session.coordinator,
                event=event,
                share=cfg.share(session.coordinator),
                ttl_s=self._ttl,
                note=f"evaluation of training {spec.run_id} ({spec.model}) before step {step}",
            )
        except LedgerWriteError as exc:
            raise durability_refusal(self.party_id, exc) from None
        session.evaluated.add(step)  # refused again whatever happens next
        charged = False
        try:
            session.source.load_parameters(parameters, full=full)
            terms = session.source.evaluation(
                loss_bound=spec.eval_loss_bound,
                accuracy=reports_accuracy(spec.loss),
                rng=self._rng,
            )
            assert session.pair_keys is not None
            upload: np.ndarray = pads.build_pad(
                size=words, ring_bits=EVAL_RING_BITS, honest=spec.honest,
                noise=self._noise(eval_mechanism(spec.eval_mu, words=words)),
                party=spec.index_of(self.party_id), pair_keys=session.pair_keys, round_id=step,
                tensor_id=EVAL_TENSOR_ID, rng=self._rng,
            )  # fmt: skip
            np.add(upload, encoding.to_ring(terms, ring_bits=EVAL_RING_BITS), out=upload)
            if again is not None and not again():
                raise SessionError(late)
            try:
                charge = self.ledger.charge(
                    dataset=spec.dataset,
                    query_id=query_id,
                    coordinator=session.coordinator,
                    event=event,
                    share=cfg.share(session.coordinator),
                    reserved=True,
                )
            except LedgerWriteError as exc:
                raise durability_refusal(self.party_id, exc) from None
            charged = True
            if not charge.new:
                raise LedgerError(f"evaluation {query_id!r} was charged before")
        finally:
            if not charged:
                self.ledger.release(query_id, coordinator=session.coordinator)
        assert charge.status is not None
        session.last_status = charge.status.remaining_epsilon
        session.last_epsilon = f"{charge.status.spent_epsilon:.6g}"
        with self._lock:
            # from here on the evaluation counts as sent (a session ended meanwhile keeps
            # the charge: more than what left, never less)
            if session.ended:
                raise SessionError(f"training session {session_id.hex()} ended meanwhile")
        session.expires = self._clock() + self._ttl
        if step >= spec.end_step:
            self._end(session_id, "finished")
        return Contribution(
            party_id=self.party_id,
            epsilon_spent=session.last_epsilon,
            budget_remaining=session.last_status,
            length=words,
            _noisy=upload,
            _mask=None,
        )
