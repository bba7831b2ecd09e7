"""The coordinator's half of federated DP-SGD: :class:`TrainingSession` opens a session at
every site, relays the signed keys, runs steps and reveals each step's noisy sum (see the
package docstring). Nothing happens at import time.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from mpcdp.audit.canaries import (
    unpack_inclusion,
)
from mpcdp.errors import (
    ParameterError,
    PartyError,
    ProtocolError,
    RoundAborted,
)
from mpcdp.mpc import encoding, ring
from mpcdp.protocol import identity
from mpcdp.protocol.failures import (
    GaveUp,
    abort_all,
    abort_in_background,
    failed_at,
    no_answer,
    order_clients,
    party_failure,
    signed_keys,
)
from mpcdp.protocol.query.round_coordinator import ContributionStream, accumulate
from mpcdp.protocol.session import SESSION_ID_BYTES, Proposal
from mpcdp.protocol.training.evaluation import EVAL_RING_BITS, eval_words
from mpcdp.protocol.training.train_spec import TrainSpec

log = logging.getLogger(__name__)


class TrainingClient(Protocol):
    """How the coordinator reaches one site for training."""

    @property
    def party_id(self) -> str: ...

    def train_open(self, *, session_id: bytes, spec: TrainSpec) -> Proposal: ...

    def train_step(
        self,
        *,
        session_id: bytes,
        step: int,
        keys: Sequence[identity.SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
        ring_bits: int,
        deadline_s: float | None = None,
        evaluate: bool = False,
    ) -> ContributionStream:
        """A step, or with ``evaluate`` the evaluation at the sites before step ``step``
        (mpcdp.protocol.training.evaluation; its words are in Z_2^64)."""
        ...

    def abort(self, *, session_id: bytes, reason: str) -> None: ...


class SessionFailed(RoundAborted):
    """A training session's open or step failed; nothing of that step was revealed.

    ``failed`` maps each site that failed to its exception; ``party_fault`` is True when
    every one of them is the site's own failure (mpcdp.protocol.failures.FAILURES: down,
    stopped, past the deadline, its budget spent), so the step can be re-run without them,
    and False when the run itself is at fault (every site would answer the same).
    ``uploaded`` names the sites whose upload of this attempt began to arrive: each charged
    its ledger for it, because its upload left it."""

    def __init__(
        self,
        what: str,
        cause: Exception,
        *,
        failed: Mapping[str, BaseException],
        party_fault: bool,
        uploaded: Sequence[str] = (),
    ) -> None:
        super().__init__(what, cause)
        self.failed = dict(failed)
        self.party_fault = party_fault
        self.uploaded = tuple(uploaded)

    @classmethod
    def of(cls, what: str, failed: Mapping[str, BaseException]) -> SessionFailed:
        """The failure of sites ``failed`` (site -> its error, at least one), caused by the
        first; the sites' own fault when every error says so (FAILURES)."""
        first = next(iter(failed.values()))
        cause = first if isinstance(first, Exception) else RuntimeError(str(first))
        exc = cls(
            what, cause, failed=failed, party_fault=all(party_failure(e) for e in failed.values())
        )
        exc.__cause__ = first
        return exc


#: how long past a step's deadline the coordinator waits for an in-process site that has no
#: deadline of its own (a gRPC site's call ends at the deadline itself)
_DEADLINE_SLACK_S = 1.0


@dataclass
class TrainingSession:
    """The coordinator's side of one training session over ``clients`` (one per site).

    ``step_deadline_s``: how long a step may take at a site, its upload included (None: the
    clients' own deadline); a session's first step, which also builds each site's model and
    its first pad, has the clients' own deadline. A site that misses it fails the step
    (SessionFailed, the site's fault); its late upload is never added, and the site, told by
    its call's cancellation, does not send it and is not charged for it."""

    spec: TrainSpec
    clients: Sequence[TrainingClient]
    session_id: bytes = field(default_factory=lambda: secrets.token_bytes(SESSION_ID_BYTES))
    step_deadline_s: float | None = None
    #: site -> steps of this session whose upload began to arrive (the site charged them)
    uploads: dict[str, int] = field(default_factory=dict)
    #: site -> evaluations of this session whose upload began to arrive (each charged)
    eval_uploads: dict[str, int] = field(default_factory=dict)
    _keys: list[identity.SignedKey] = field(default_factory=list)
    _keys_sent: bool = False
    _evaluated: set[int] = field(default_factory=set)
    _next: int = -1
    _pool: ThreadPoolExecutor | None = None
    budget_remaining: dict[str, float] = field(default_factory=dict)
    #: audit runs, after the last step: every site's canary inclusion bits, in party order
    #: of ``spec.parties`` (mpcdp.audit.canaries)
    audit_inclusion: dict[str, NDArray[np.bool_]] = field(default_factory=dict)

    def open(self) -> None:
        self.clients = order_clients(self.clients, self.spec.parties)
        self._pool = ThreadPoolExecutor(
            max_workers=len(self.clients), thread_name_prefix="train-step"
        )
        try:
            asked = [
                self._pool.submit(c.train_open, session_id=self.session_id, spec=self.spec)
                for c in self.clients
            ]
            # every answer is in before any abort: an abort that overtook a site's TrainOpen
            # would find no session, and the reservation that TrainOpen then makes would be
            # held until its session expired
            wait(asked)
            failed = failed_at(asked, self.clients)
            if failed:
                raise SessionFailed.of(self.spec.run_id, failed)
            proposals = [f.result() for f in asked]
            keys = signed_keys(proposals, self.spec.parties)
            for p, pid in zip(proposals, self.spec.parties, strict=True):
                if p.length != self.spec.num_params:
                    raise ProtocolError(
                        f"party {pid!r} announced {p.length} words, the run has "
                        f"{self.spec.num_params}"
                    )
        except SessionFailed as exc:
            self._abort(str(exc.cause))
            raise
        except Exception as exc:
            self._abort(str(exc))
            raise SessionFailed(self.spec.run_id, exc, failed={}, party_fault=False) from exc
        self._keys = keys
        self._next = self.spec.start_step

    def step(
        self, *, parameters: NDArray[np.float32], full: bool, out: np.ndarray | None = None
    ) -> NDArray[np.int32] | NDArray[np.int64]:
        """Run the next step; returns the decoded sum (integer units, signed; int32 in
        Z_2^32, a view of the summed words). ``out``: a C-contiguous array of
        ``num_params`` ring words (uint32 for Z_2^32, uint64 for Z_2^64) to sum into instead
        of a new one (a loop that reuses one saves an allocation of the model's size per
        step); its contents are overwritten."""
        if self._pool is None or self._next < 0:
            raise ProtocolError("open the training session first")
        if self._next >= self.spec.end_step:
            raise ProtocolError(f"the session's {self.spec.steps} steps are done")
        dtype = ring.dtype_for(self.spec.ring_bits).newbyteorder("=")
        if out is None:
            total = np.zeros(self.spec.num_params, dtype=dtype)
        else:
            if (
                not isinstance(out, np.ndarray)
                or out.dtype != dtype
                or out.shape != (self.spec.num_params,)
                or not out.flags.c_contiguous
                or not out.flags.writeable
            ):
                what = (
                    f"{out.dtype} of shape {out.shape}"
                    if isinstance(out, np.ndarray)
                    else type(out).__name__
                )
                raise ParameterError(
                    "out",
                    what,
                    f"must be a writeable C-contiguous {dtype} array of shape "
                    f"({self.spec.num_params},)",
                )
            total = out
            total.fill(0)
        step = self._next
        self._round(step, parameters=parameters, full=full, total=total, evaluate=False)
        self._next = step + 1
        return encoding.signed_view(total)

    def evaluate(self, *, parameters: NDArray[np.float32], full: bool) -> NDArray[np.int64]:
        """The evaluation at the sites before the session's next step (an evaluation point
        of the spec, once): the decoded noisy sums, signed words in integer units
        (mpcdp.protocol.training.evaluation.decode_total reads them)."""
        if self._pool is None or self._next < 0:
            raise ProtocolError("open the training session first")
        step = self._next
        if not self.spec.is_eval_point(step) or step in self._evaluated:
            raise ProtocolError(
                f"the session evaluates before every {self.spec.eval_every} steps after step "
                f"{self.spec.start_step} and after its last, once each; "
                f"not before step {step}"
            )
        total = np.zeros(
            eval_words(self.spec.loss), dtype=ring.dtype_for(EVAL_RING_BITS).newbyteorder("=")
        )
        self._evaluated.add(step)
        self._round(step, parameters=parameters, full=full, total=total, evaluate=True)
        out: NDArray[np.int64] = total.view(np.int64)  # Z_2^64 words as signed integers
        return out

    def _round(
        self,
        step: int,
        *,
        parameters: NDArray[np.float32],
        full: bool,
        total: np.ndarray,
        evaluate: bool,
    ) -> None:
        """One call at every site (a step, or an evaluation), summed into ``total``; the
        sites' remaining budgets kept in ``budget_remaining``. SessionFailed when a site
        fails (module docstring)."""
        first = not self._keys_sent
        # a session's first call also builds each site's model, runs its first-use checks and
        # makes its first pad: it has the clients' own deadline, the later ones the step's
        deadline = None if first else self.step_deadline_s
        keys = self._keys if first else []
        lock = threading.Lock()
        params = np.ascontiguousarray(parameters, dtype=np.float32)
        ring_bits = EVAL_RING_BITS if evaluate else self.spec.ring_bits
        what = f"the evaluation before step {step}" if evaluate else f"step {step}"
        counts = self.eval_uploads if evaluate else self.uploads

        last = not evaluate and step + 1 == self.spec.end_step
        reveals: dict[str, bytes] = {}
        uploaded: list[str] = []
        gave_up = threading.Event()

        def one(client: TrainingClient) -> float:
            stream = client.train_step(
                session_id=self.session_id,
                step=step,
                keys=keys,
                parameters=params,
                full=full,
                ring_bits=ring_bits,
                deadline_s=deadline,
                evaluate=evaluate,
            )
            with lock:
                uploaded.append(client.party_id)  # its header arrived: it charged the step
            reveals[client.party_id] = stream.audit_inclusion
            return accumulate(stream, total, lock, client.party_id, None, gave_up)

        assert self._pool is not None
        futures = [self._pool.submit(one, c) for c in self.clients]
        self._keys_sent = True
        timeout = None if deadline is None else deadline + _DEADLINE_SLACK_S
        wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
        try:
            failed = self._step_failures(futures, deadline)
            if failed:
                raise SessionFailed.of(f"{self.spec.run_id} {what}", failed)
            remaining = [f.result() for f in futures]
            self._check_reveals(reveals, last=last)
        except Exception as exc:
            with lock:
                gave_up.set()  # from now on no upload of this step is added
            silent = (
                {p for p, e in exc.failed.items() if no_answer(e)}
                if isinstance(exc, SessionFailed)
                else set()
            )
            self._abort(str(exc), silent=silent)
            # the sites that answer have ended their step now (sent, or refused as aborted):
            # only then is it known whose upload of this attempt left it
            wait(
                [f for f, c in zip(futures, self.clients, strict=True) if c.party_id not in silent],
                timeout=deadline,
            )
            with lock:
                counted = tuple(uploaded)
            _count(counts, counted)
            if not isinstance(exc, SessionFailed):
                failure = SessionFailed(
                    f"{self.spec.run_id} {what}", exc, failed={}, party_fault=False
                )
                failure.uploaded = counted
                raise failure from exc
            exc.uploaded = counted
            raise
        _count(counts, uploaded)
        self.budget_remaining = dict(zip(self.spec.parties, remaining, strict=True))

    def _step_failures(
        self, futures: Sequence[Future[float]], deadline: float | None
    ) -> dict[str, BaseException]:
        """Site -> why, for every site whose step failed or is still running at the
        deadline (a site that gave up on purpose is not listed)."""
        failed = failed_at(futures, self.clients)
        if failed:  # the others are still running, not late: they are given up with the step
            return {p: e for p, e in failed.items() if not isinstance(e, GaveUp)}
        for f, c in zip(futures, self.clients, strict=True):  # the deadline passed
            if not f.done():
                failed[c.party_id] = PartyError(
                    c.party_id,
                    "DEADLINE_EXCEEDED",
                    "the step's deadline passed",
                    outcome=f"did not answer within {deadline} s",
                )
        return failed

    def _check_reveals(self, reveals: Mapping[str, bytes], *, last: bool) -> None:
        """Inclusion bits come with the last step of an audit run, from every site, and
        never otherwise."""
        wanted = last and self.spec.audit_canaries > 0
        for party in self.spec.parties:
            data = reveals.get(party, b"")
            if not wanted:
                if data:
                    raise ProtocolError(f"party {party!r} revealed canary bits out of place")
                continue
            self.audit_inclusion[party] = unpack_inclusion(
                data, count=self.spec.audit_canaries, party=party
            )

    def _abort(self, reason: str, *, silent: set[str] | frozenset[str] = frozenset()) -> None:
        """Tell every site to forget the session; a site that gave no answer in time is told
        in the background, again until it takes it (waiting on a stopped site's abort would
        cost the re-run another deadline; its session expires there anyway)."""
        abort_in_background(
            [c for c in self.clients if c.party_id in silent],
            session_id=self.session_id,
            reason=reason,
        )
        abort_all(
            [c for c in self.clients if c.party_id not in silent],
            session_id=self.session_id,
            reason=reason,
        )
        self._next = self.spec.end_step  # nothing more to run or to abort
        self._evaluated.add(self.spec.end_step)

    def close(self) -> None:
        """End the session (tells sites to forget it when steps, or the evaluation after the
        last step, remain). A step still running at a site that missed its deadline is not
        waited for: its call ends at its own deadline, and its upload is never added."""
        if self._pool is not None:
            end = self.spec.end_step
            pending = self.spec.eval_every > 0 and end not in self._evaluated
            if 0 <= self._next < end or (self._next == end and pending):
                self._abort("closed by the coordinator")
            self._pool.shutdown(wait=False)
            self._pool = None


def _count(counts: dict[str, int], uploaded: Sequence[str]) -> None:
    """Count one attempt for each site whose upload of it began to arrive."""
    for p in uploaded:
        counts[p] = counts.get(p, 0) + 1
