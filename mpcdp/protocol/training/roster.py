"""The coordinator's roster of a federated DP-SGD run: a step that a site fails, or misses its
deadline, is re-run among the other sites; a site that answers again rejoins; the run pauses
while fewer than ``min_parties`` sites answer (docs/training.md, "When a site fails").

One roster, one session. A session's pairwise masks cancel only when every site of its
roster uploads, so a step cannot go on without a site: the step is re-run in a *new* session
over the sites left, with a new session id, so fresh ephemeral keys and fresh masks at every
site (nothing of the failed attempt is reused), and a spec whose ``parties`` is the new roster,
so every site sizes its noise share for h' = n' - t honest sites: the Skellam noise of the
honest sites still adds up to mu, and each step stays exactly as private as the plan says,
for every site, whatever the roster (the plan's per-step event does not depend on n). The
new session's first step carries all parameters: a site rejoining gets the coordinator's
current model. A rejoin likewise closes the session and opens one over the larger roster.

What each site pays (its own ledger decides; mpcdp.protocol.training.site_engine): the
steps whose upload left it. A site that failed before its upload left pays nothing for that
step (a site whose coordinator gave up on a step refuses to send it, and the block it
charged is settled without it); a site whose upload of the failed attempt left it pays for
that attempt as well as for the re-run, because the coordinator could have kept that upload
(a coordinator that falsely claims a site failed, and later completes the first attempt's
sum with that site's late upload, learns nothing the sites did not pay for). The coordinator
counts the uploads it saw begin to arrive (:attr:`TrainingRoster.uploads`); the sites'
ledgers hold the same, except that a site left out with a step in flight (its upload left
as the deadline passed) may hold that step more, and a site killed in the middle of a block
holds the rest of the block (after a crash it cannot know which of its steps left it). The
ledgers never hold less.

Pause: a roster below ``min_parties``, or with no honest site (n' - t < 1), runs nothing;
the coordinator asks the absent sites every ``rejoin_interval_s`` and resumes as soon as
enough answer, or gives up after ``max_pause_s`` with :class:`RosterExhausted`, naming every
site that failed and why. A site's return is noticed by a health check in the background
(never on the step's critical path). Nothing happens at import time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import MpcdpError, ParameterError, PartyError, RoundAborted
from mpcdp.protocol.failures import Pingable, roster_shortfall
from mpcdp.protocol.training.train_spec import TrainSpec
from mpcdp.protocol.training.training_session import (
    SessionFailed,
    TrainingClient,
    TrainingSession,
)

__all__ = [
    "RosterChange",
    "RosterEvaluation",
    "RosterExhausted",
    "RosterStep",
    "TrainingRoster",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RosterChange:
    """The roster changed before step ``step``: ``left`` maps each site left out to why,
    ``joined`` lists the sites back. ``note`` says when the run paused or resumed."""

    step: int
    left: dict[str, str] = field(default_factory=dict)
    joined: tuple[str, ...] = ()
    note: str = ""

    def text(self) -> str:
        parts = [f"{p} left out ({why})" for p, why in self.left.items()]
        if self.joined:
            parts.append(f"{', '.join(self.joined)} back")
        if self.note:
            parts.append(self.note)
        return f"step {self.step}: " + "; ".join(parts)


@dataclass(frozen=True)
class RosterStep:
    """One step's revealed sum and the sites whose gradient it holds."""

    total: NDArray[np.int32] | NDArray[np.int64]
    parties: tuple[str, ...]
    #: the step was the first of a new session (each site charged a new block for it)
    new_session: bool = False


@dataclass(frozen=True)
class RosterEvaluation:
    """The revealed evaluation at the sites before a step (three signed words, integer units:
    mpcdp.protocol.training.evaluation) and the sites whose held-out split it holds."""

    total: NDArray[np.int64]
    parties: tuple[str, ...]


class RosterExhausted(RoundAborted):
    """Too few sites answer (before any step ran, or for longer than the run may pause):
    nothing of the step was revealed. ``failures`` maps each site left out to why; the
    exception's ``__cause__`` is the first site's own error."""

    def __init__(
        self, run_id: str, step: int, short: str, failures: Mapping[str, str], waited_s: float
    ) -> None:
        self.step = step
        self.failures = dict(failures)
        named = "; ".join(f"{p}: {why}" for p, why in failures.items()) or "none"
        waited = f" after waiting {waited_s:.0f} s" if waited_s > 0 else ""
        super().__init__(
            f"{run_id} step {step}",
            MpcdpError(f"too few sites answer ({short}){waited}; sites that failed: {named}"),
        )


#: Builds the spec of a session over ``roster`` (federation order) from step ``start``.
SpecFor = Callable[[tuple[str, ...], int], TrainSpec]


class TrainingRoster:
    """Runs a training run's steps over whichever sites answer (module docstring).

    ``spec_for(roster, start)``: the session spec for that roster from that step.
    ``min_parties``: the fewest sites a step may run over (at least 1); ``tolerate``: False
    makes any site's failure end the run, as before rosters existed (audit runs: their
    canaries need one session). ``step_deadline_s``: a step's deadline at each site (None:
    the clients' own). ``on_change`` is told of every roster change as it happens."""

    def __init__(
        self,
        *,
        spec_for: SpecFor,
        clients: Sequence[TrainingClient],
        min_parties: int,
        colluders: int,
        tolerate: bool = True,
        step_deadline_s: float | None = None,
        rejoin_interval_s: float = 10.0,
        max_pause_s: float = 300.0,
        on_change: Callable[[RosterChange], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clients = {c.party_id: c for c in clients}
        if len(self._clients) != len(clients):
            raise ParameterError("clients", [c.party_id for c in clients], "must be one per site")
        self._order = tuple(c.party_id for c in clients)
        if isinstance(min_parties, bool) or not isinstance(min_parties, int):
            raise ParameterError("min_parties", min_parties, "must be an integer")
        if not 1 <= min_parties <= len(clients):
            raise ParameterError(
                "min_parties", min_parties, f"must be in [1, {len(clients)}] (the sites)"
            )
        for name, value in (("rejoin_interval_s", rejoin_interval_s), ("max_pause_s", max_pause_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ParameterError(name, value, "must be a number of seconds >= 0")
        if step_deadline_s is not None and (
            isinstance(step_deadline_s, bool)
            or not isinstance(step_deadline_s, int | float)
            or not step_deadline_s > 0
        ):
            raise ParameterError("step_deadline_s", step_deadline_s, "must be seconds > 0")
        self._spec_for = spec_for
        self._quorum = min_parties
        self._colluders = colluders
        self._tolerate = tolerate
        self._deadline = None if step_deadline_s is None else float(step_deadline_s)
        self._interval = float(rejoin_interval_s)
        self._max_pause = float(max_pause_s)
        self._on_change = on_change
        self._clock = clock
        self._sleep = sleep
        self._present = set(self._order)
        self._why: dict[str, str] = {}  # site left out -> why
        self._errors: dict[str, BaseException] = {}  # site left out -> its error
        self._run_id = ""
        self._session: TrainingSession | None = None
        self._fresh = True  # the session's next step is its first (carries all parameters)
        self._probe: Future[set[str]] | None = None
        self._fails: dict[str, int] = {}  # site -> failures in a row
        self._paused_since: float | None = None  # since when no step could run
        self._progress = False  # a step has run: a shortfall pauses rather than fails
        self._retry_at: dict[str, float] = {}  # site left out -> when it is asked again
        self._prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roster-probe")
        self._lock = threading.Lock()
        #: site -> step attempts whose upload began to arrive (each site charged them)
        self.uploads: dict[str, int] = dict.fromkeys(self._order, 0)
        #: site -> steps whose revealed sum holds its gradient
        self.contributed: dict[str, int] = dict.fromkeys(self._order, 0)
        #: site -> evaluations whose upload began to arrive (each site charged them)
        self.eval_uploads: dict[str, int] = dict.fromkeys(self._order, 0)
        self.changes: list[RosterChange] = []

    @property
    def roster(self) -> tuple[str, ...]:
        """The sites the next step runs over (federation order)."""
        return tuple(p for p in self._order if p in self._present)

    @property
    def audit_inclusion(self) -> dict[str, NDArray[np.bool_]]:
        return {} if self._session is None else dict(self._session.audit_inclusion)

    def step(
        self,
        step: int,
        *,
        parameters: Callable[[bool], NDArray[np.float32]],
        out: np.ndarray | None = None,
    ) -> RosterStep:
        """Run step ``step`` over the sites that answer; ``parameters(full)`` gives the model's
        parameters (all of them when ``full``: a new session's first step)."""
        while True:
            self._rejoin(step)
            if self._session is None:
                self._open(step)
            session = self._session
            assert session is not None
            full = self._fresh
            try:
                total = session.step(parameters=parameters(full), full=full, out=out)
            except SessionFailed as exc:
                self._failed(session, step, exc)
                continue
            self._count(session)
            self._fresh = False
            self._progress = True
            self._paused_since = None
            roster = tuple(session.spec.parties)
            for p in roster:
                self.contributed[p] += 1
                self._fails.pop(p, None)
            return RosterStep(total=total, parties=roster, new_session=full)

    def evaluate(
        self, step: int, *, parameters: Callable[[bool], NDArray[np.float32]]
    ) -> RosterEvaluation | None:
        """The evaluation at the sites before step ``step`` in the current session, when it
        has one and ``step`` is one of its evaluation points; else None. A site that fails
        it is left out as for a step, and the evaluation is skipped, not re-run (None): the
        next step goes on without that site, and the sites whose upload of it left them paid
        for it (:attr:`eval_uploads`)."""
        session = self._session
        if session is None or not session.spec.is_eval_point(step):
            return None
        full = self._fresh
        try:
            total = session.evaluate(parameters=parameters(full), full=full)
        except SessionFailed as exc:
            self._failed(session, step, exc)
            log.warning("training step %d: the evaluation at the sites is skipped", step)
            return None
        self._count(session)
        self._fresh = False
        return RosterEvaluation(total=total, parties=tuple(session.spec.parties))

    def _failed(self, session: TrainingSession, step: int, exc: SessionFailed) -> None:
        """After a failed step or evaluation: its uploads counted; the sites at fault left
        out and the session dropped, or ``exc`` raised when the run cannot go on without
        them (not tolerated, or the run's own fault)."""
        self._count(session)
        if not (self._tolerate and exc.party_fault and exc.failed):
            raise exc
        self._leave(step, exc.failed)
        self._drop_session()

    def close(self) -> None:
        self._drop_session()
        self._prober.shutdown(wait=False, cancel_futures=True)

    # -- sessions ---------------------------------------------------------------------------

    def _open(self, step: int) -> None:
        """A session over the sites present from ``step``; sites that fail to open it are
        left out (when tolerated), and the run pauses while the roster is too small."""
        while True:
            roster = self.roster
            short = roster_shortfall(roster, quorum=self._quorum, colluders=self._colluders)
            if short:
                self._pause(step, short)
                continue
            if self._progress:
                # a re-run: a site that stopped with the one that failed is found by its
                # health check's short deadline, not by TrainOpen's full one
                silent = _not_answering([self._clients[p] for p in roster])
                if silent:
                    self._leave(step, silent)
                    continue
            spec = self._spec_for(roster, step)
            self._run_id = spec.run_id
            session = TrainingSession(
                spec=spec,
                clients=[self._clients[p] for p in roster],
                step_deadline_s=self._deadline,
            )
            try:
                session.open()
            except SessionFailed as exc:
                if not (self._tolerate and exc.party_fault and exc.failed):
                    raise
                self._leave(step, exc.failed)
                continue
            self._session = session
            self._fresh = True
            log.info("training step %d: session over %s", step, ", ".join(roster))
            return

    def _drop_session(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            self._count(session)
            session.close()

    def _count(self, session: TrainingSession) -> None:
        """Fold the session's upload counts into the run's (each counted once)."""
        for p, n in session.uploads.items():
            self.uploads[p] += n
        session.uploads.clear()
        for p, n in session.eval_uploads.items():
            self.eval_uploads[p] += n
        session.eval_uploads.clear()

    def _leave(self, step: int, failed: Mapping[str, BaseException]) -> None:
        left = {p: _why(e) for p, e in failed.items() if p in self._present}
        if not left:
            return
        self._errors.update((p, e) for p, e in failed.items() if p in left)
        self._present -= set(left)
        self._why.update(left)
        now = self._clock()
        for p in left:  # asked again after the interval, doubled at each failure in a row
            self._fails[p] = self._fails.get(p, 0) + 1
            self._retry_at[p] = now + self._interval * 2.0 ** min(self._fails[p] - 1, 6)
        self._changed(RosterChange(step=step, left=left))
        for p, why in left.items():
            log.warning("training step %d: site %s left out (%s)", step, p, why)

    def _exhausted(self, step: int, short: str, waited: float) -> RosterExhausted:
        run = self._run_id or "training"
        exc = RosterExhausted(run, step, short, self._why, waited)
        first = next((e for p, e in self._errors.items() if p not in self._present), None)
        exc.__cause__ = first
        return exc

    def _changed(self, change: RosterChange) -> None:
        self.changes.append(change)
        if self._on_change is not None:
            self._on_change(change)

    # -- rejoin and pause -------------------------------------------------------------------

    def _rejoin(self, step: int) -> None:
        """Bring back the absent sites that answered the last background check; start a new
        check when one is due. Never waits on a site."""
        if not self._tolerate or len(self._present) == len(self._order):
            return
        back: set[str] = set()
        if self._probe is not None and self._probe.done():
            back = self._probe.result() & (set(self._order) - self._present)
            self._probe = None
        now = self._clock()
        due = [
            self._clients[p]
            for p in self._order
            if p not in self._present and self._retry_at.get(p, 0.0) <= now
        ]
        if self._probe is None and due:
            self._probe = self._prober.submit(_answering, due)
        if back:
            self._join(step, back)

    def _join(self, step: int, back: set[str]) -> None:
        self._present |= back
        for p in back:
            self._why.pop(p, None)
        self._drop_session()  # the next step opens a session over the larger roster
        joined = tuple(p for p in self._order if p in back)
        self._changed(RosterChange(step=step, joined=joined))
        log.info("training step %d: site(s) %s back", step, ", ".join(joined))

    def _pause(self, step: int, short: str) -> None:
        """Wait for absent sites until the roster can run a step, or give up. A run that has
        not made a step yet fails at once (nothing to keep going); a pause lasts until a step
        runs again, across sites that come back and fail again (each asked after its own
        back-off), at most ``max_pause_s`` in all."""
        if not (self._tolerate and self._progress):
            raise self._exhausted(step, short, 0.0)
        if self._paused_since is None:
            self._paused_since = self._clock()
            self._changed(RosterChange(step=step, note=f"paused: {short}"))
        while True:
            now = self._clock()
            due = [
                self._clients[p]
                for p in self._order
                if p not in self._present and self._retry_at.get(p, 0.0) <= now
            ]
            back = _answering(due) if due else set()
            if back:
                self._join(step, back)
                if not roster_shortfall(
                    self.roster, quorum=self._quorum, colluders=self._colluders
                ):
                    self._changed(RosterChange(step=step, note="resumed"))
                    return
            waited = self._clock() - self._paused_since
            if waited >= self._max_pause:
                raise self._exhausted(step, short, waited)
            wake = min(
                [self._retry_at.get(p, now) for p in self._order if p not in self._present]
                + [now + self._interval]
            )
            self._sleep(max(0.01, min(wake - now, self._paused_since + self._max_pause - now)))


def _answering(clients: Sequence[TrainingClient]) -> set[str]:
    """The sites among ``clients`` that answer a health check now (a client without one is
    taken to answer: opening a session asks it)."""
    silent = _not_answering(clients)
    return {c.party_id for c in clients if c.party_id not in silent}


def _not_answering(clients: Sequence[TrainingClient]) -> dict[str, BaseException]:
    """Site -> its failure, for the sites among ``clients`` whose health check fails (all
    asked at once; a client without one is taken to answer)."""
    pingable = [c for c in clients if isinstance(c, Pingable)]
    if not pingable:
        return {}

    def one(c: Pingable) -> BaseException | None:
        try:
            c.ping()
        except Exception as exc:  # the site's failure, whatever it is
            return exc
        return None

    with ThreadPoolExecutor(max_workers=len(pingable), thread_name_prefix="roster-ping") as pool:
        outcomes = list(pool.map(one, pingable))
    return {c.party_id: e for c, e in zip(pingable, outcomes, strict=True) if e is not None}


def _why(exc: BaseException) -> str:
    if isinstance(exc, PartyError):
        return f"{exc.outcome} ({exc.code})" + (
            f": {exc.message[:200]}" if exc.outcome == "refused" else ""
        )
    return f"{type(exc).__name__}: {str(exc)[:200]}"
