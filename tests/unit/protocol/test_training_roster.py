"""A training run that keeps going when a site fails: the step is re-run among the others in a
fresh session, the failed site pays nothing for it, every site's ledger holds exactly the steps
whose upload left it, a site that answers again rejoins with the current model, and below
min_parties (or with no honest site) the run pauses, then stops naming each failure. The sites
are real engines with real SQLite ledgers; a site's failure is its client raising the error
gRPC would (the real-process versions are in tests/integration/test_training_dropouts.py)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from mpcdp.dp import events as ev
from mpcdp.errors import PartyError, SessionError
from mpcdp.protocol.query.round_coordinator import ContributionStream
from mpcdp.protocol.training import TrainingEngine, TrainSpec
from mpcdp.protocol.training.roster import RosterChange, RosterExhausted, TrainingRoster
from tests.conftest import PARTIES, Net
from tests.training_support import Direct, engines_of, initial, tspec


class Flaky(Direct):
    """A site whose link can be cut: while ``down``, every call fails as an unreachable gRPC
    party does (UNAVAILABLE, a failure of the site's own), before reaching the engine."""

    def __init__(self, engine: TrainingEngine) -> None:
        super().__init__(engine)
        self.down = False
        self.fail_at: int | None = None  # cut the link when this step is asked
        self.after: list[Flaky] = []  # ... once these sites' uploads of that step are made
        self.fulls: list[tuple[int, np.ndarray]] = []  # (step, parameters) of full steps
        self.deadlines: list[float | None] = []  # each step's deadline, as asked

    def _check(self) -> None:
        if self.down:
            raise PartyError(self.party_id, "UNAVAILABLE", "connection refused", outcome="is down")

    def ping(self) -> None:
        self._check()

    def train_open(self, **kw: Any) -> Any:
        self._check()
        return super().train_open(**kw)

    def train_step(self, **kw: Any) -> ContributionStream:
        if kw["step"] == self.fail_at:
            deadline = time.monotonic() + 30
            while any(len(o.uploads) <= kw["step"] for o in self.after):
                assert time.monotonic() < deadline, "the other sites never uploaded"
                time.sleep(0.001)
            self.down, self.fail_at = True, None
        self._check()
        self.deadlines.append(kw["deadline_s"])
        kw["parameters"] = np.array(kw["parameters"])  # a copy, as the wire makes one
        if kw["full"]:
            self.fulls.append((kw["step"], kw["parameters"].copy()))
        return super().train_step(**kw)

    def abort(self, *, session_id: bytes, reason: str) -> None:
        self._check()
        super().abort(session_id=session_id, reason=reason)


def _fixed(values: np.ndarray) -> Callable[[bool], np.ndarray]:
    """The model's parameters, whether the step sends all or only the trainable ones (here
    all are trainable)."""
    return lambda full: values


def _steps_charged(net: Net, party: str) -> int:
    """The steps the party's ledger holds for dataset ``ex`` (every block, settled or not)."""
    total = 0
    for c in net.nodes[party].ledger.charges("ex"):
        assert isinstance(c.event, ev.Skellam)
        total += c.event.steps
    return total


def _roster(
    spec: TrainSpec, clients: list[Flaky], **kw: Any
) -> tuple[TrainingRoster, list[TrainSpec], list[RosterChange]]:
    specs: list[TrainSpec] = []
    changes: list[RosterChange] = []

    def spec_for(roster: tuple[str, ...], first: int) -> TrainSpec:
        s = dataclasses.replace(
            spec, parties=roster, start_step=first, steps=spec.start_step + spec.steps - first
        )
        specs.append(s)
        return s

    options: dict[str, Any] = {"min_parties": 2, "colluders": 1, "rejoin_interval_s": 0.0}
    options.update(kw)
    return (
        TrainingRoster(spec_for=spec_for, clients=clients, on_change=changes.append, **options),
        specs,
        changes,
    )


def test_a_failed_site_is_left_out_and_every_ledger_holds_the_steps_that_left_it(
    sites: Net,
) -> None:
    engines = engines_of(sites)
    clients = [Flaky(engines[p]) for p in PARTIES]
    spec = tspec(steps=4, steps_per_charge=2)
    roster, specs, changes = _roster(spec, clients, min_parties=2)
    params = initial(spec)
    clients[2].fail_at = 2  # carlos goes down once the others sent step 2
    clients[2].after = clients[:2]
    try:
        outcomes = [roster.step(s, parameters=_fixed(params)) for s in range(2)]
        assert all(o.parties == PARTIES for o in outcomes)
        third = roster.step(2, parameters=_fixed(params))
    finally:
        roster.close()
    assert third.parties == ("alice", "bob")
    # the re-run is a new session over the survivors, its noise shares sized for them
    assert [s.parties for s in specs] == [PARTIES, ("alice", "bob")]
    assert specs[1].start_step == 2 and specs[1].honest == 1
    assert [(c.step, list(c.left)) for c in changes] == [(2, ["carlos"])]
    assert "is down" in changes[0].left["carlos"]
    # the masks of the fresh session cancel: the revealed sum is the survivors' uploads
    a, b = clients[0].uploads[-1], clients[1].uploads[-1]
    assert np.array_equal(third.total.view(a.dtype), a + b)
    # alice and bob sent step 2 twice (the failed attempt left them: carlos's absence does
    # not make it unreadable to a coordinator who lied about it), carlos steps 0 and 1 only
    assert roster.uploads == {"alice": 4, "bob": 4, "carlos": 2}
    assert roster.contributed == {"alice": 3, "bob": 3, "carlos": 2}
    for p in PARTIES:
        assert _steps_charged(sites, p) == roster.uploads[p], p


def test_a_site_back_rejoins_with_the_current_model(sites: Net) -> None:
    engines = engines_of(sites)
    clients = [Flaky(engines[p]) for p in PARTIES]
    spec = tspec(steps=8, steps_per_charge=3)
    roster, specs, changes = _roster(spec, clients, min_parties=2)
    clients[1].fail_at = 1
    params = [initial(spec) + np.float32(s) for s in range(8)]  # the model moves each step
    try:
        roster.step(0, parameters=_fixed(params[0]))
        roster.step(1, parameters=_fixed(params[1]))
        clients[1].down = False  # bob is back; the background check notices it
        for s in range(2, 8):
            roster.step(s, parameters=_fixed(params[s]))
    finally:
        roster.close()
    joined = [c for c in changes if c.joined]
    assert len(joined) == 1 and joined[0].joined == ("bob",)
    back = joined[0].step
    assert 2 <= back < 8
    # bob got the coordinator's model of the step it rejoined at, all of it
    step, sent = clients[1].fulls[-1]
    assert step == back and np.array_equal(sent, params[back])
    assert roster.contributed["bob"] == 1 + (8 - back)
    assert specs[-1].parties == PARTIES and specs[-1].start_step == back
    for p in PARTIES:
        assert _steps_charged(sites, p) == roster.uploads[p], p


def test_below_min_parties_the_run_pauses_then_stops_naming_each_failure(sites: Net) -> None:
    engines = engines_of(sites)
    clients = [Flaky(engines[p]) for p in PARTIES]
    spec = tspec(steps=4, steps_per_charge=2)
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    roster, _, changes = _roster(
        spec, clients, min_parties=3, max_pause_s=30.0, clock=lambda: now[0], sleep=sleep
    )
    params = initial(spec)
    clients[2].fail_at = 1
    try:
        roster.step(0, parameters=_fixed(params))
        with pytest.raises(RosterExhausted, match="min_parties=3") as err:
            roster.step(1, parameters=_fixed(params))
    finally:
        roster.close()
    assert "carlos: is down (UNAVAILABLE)" in str(err.value)
    assert isinstance(err.value.__cause__, PartyError)
    assert sum(slept) == pytest.approx(30.0)
    assert any(c.note.startswith("paused") for c in changes)
    # carlos's session ends there once an abort reaches it (or it expires)
    for e in engines.values():
        for sid in list(e._sessions):
            e.abort(session_id=sid, coordinator="analyst")
    # nothing of step 1 was revealed; each site holds exactly what left it
    for p in PARTIES:
        assert _steps_charged(sites, p) == roster.uploads[p], p
    assert roster.uploads["carlos"] == 1


def test_a_pause_ends_when_the_site_answers_again(sites: Net) -> None:
    engines = engines_of(sites)
    clients = [Flaky(engines[p]) for p in PARTIES]
    spec = tspec(steps=3, steps_per_charge=2)
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s
        if now[0] >= 5.0:
            clients[0].down = False  # alice restarts after five seconds

    roster, _, changes = _roster(
        spec, clients, min_parties=3, max_pause_s=60.0, clock=lambda: now[0], sleep=sleep
    )
    params = initial(spec)
    clients[0].fail_at = 1
    try:
        for s in range(3):
            assert roster.step(s, parameters=_fixed(params)).parties == PARTIES
    finally:
        roster.close()
    assert [c.note for c in changes if c.note] == [
        "paused: 2 parties left, min_parties=3",
        "resumed",
    ]


def test_no_honest_site_left_is_a_clear_failure_with_nothing_charged(sites: Net) -> None:
    """n' - t < 1: with colluders=1 and one site left no step may run (the one site's noise
    share would be sized for no honest site)."""
    engines = engines_of(sites)
    clients = [Flaky(engines[p]) for p in PARTIES]
    clients[1].down = clients[2].down = True
    spec = tspec(steps=2)
    roster, specs, _ = _roster(spec, clients, min_parties=1, colluders=1)
    try:
        with pytest.raises(RosterExhausted, match=r"n' - t = 0 < 1") as err:
            roster.step(0, parameters=_fixed(initial(spec)))
    finally:
        roster.close()
    assert "bob: is down" in str(err.value) and "carlos: is down" in str(err.value)
    assert specs[-1].parties == PARTIES  # tried once with everyone, never with alice alone
    for p in PARTIES:
        assert sites.nodes[p].ledger.charges("ex") == []


@pytest.mark.parametrize("late_at", ["before the charge", "after the gradient"])
def test_a_step_its_coordinator_gave_up_on_is_refused_and_not_charged(
    sites: Net, late_at: str
) -> None:
    """The site side of a straggler: a step that arrives, or is ready, after its coordinator
    gave up (the servicer's view of the call: cancelled, past its deadline, or the site was
    suspended) is never sent, and the block it charged is settled without it."""
    engines = engines_of(sites)
    spec = tspec(steps=4, steps_per_charge=2)
    roster, _, _ = _roster(spec, [Flaky(engines[p]) for p in PARTIES], min_parties=3)
    params = initial(spec)
    try:
        roster.step(0, parameters=_fixed(params))
        roster.step(1, parameters=_fixed(params))
        session = roster._session
        assert session is not None
        before = {p: _steps_charged(sites, p) for p in PARTIES}
        asked = iter([True, False] if late_at == "after the gradient" else [False])
        with pytest.raises(SessionError, match="after its coordinator gave up"):
            engines["alice"].step(
                session_id=session.session_id,
                step=2,
                keys=[],
                parameters=params,
                full=False,
                coordinator="analyst",
                in_time=lambda: next(asked),
            )
    finally:
        roster.close()
    assert _steps_charged(sites, "alice") == before["alice"] == 2
    (block,) = [c for c in sites.nodes["alice"].ledger.charges("ex")]
    assert isinstance(block.event, ev.Skellam) and block.event.steps == 2


def test_a_session_s_first_step_has_the_clients_own_deadline(sites: Net) -> None:
    """The first step of each session also builds every site's model and its first pad: it
    gets the clients' own deadline (None here), the later steps the step deadline, so a site
    is not left out for its start-up."""
    engines = engines_of(sites)
    clients = [Flaky(engines[p]) for p in PARTIES]
    spec = tspec(steps=4, steps_per_charge=2)
    roster, _, _ = _roster(spec, clients, min_parties=2, step_deadline_s=7.0)
    clients[2].fail_at = 2
    try:
        for s in range(4):
            roster.step(s, parameters=_fixed(initial(spec)))
    finally:
        roster.close()
    # step 2 is tried in the first session, then re-run as a new session's first step
    assert clients[0].deadlines == [None, 7.0, 7.0, None, 7.0]
    assert clients[2].deadlines == [None, 7.0]
