"""A party refuses a call its coordinator already gave up, before anything is charged: one
that is cancelled, past (or at) its deadline, or read after the party process stalled for
longer than the call's time left since its session's Propose; a shorter stall refuses
nothing. (A real SIGSTOP: tests/integration/test_dropouts.py.)"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpcdp.errors import SessionError
from mpcdp.transport import call_guard
from mpcdp.transport import server as srv
from tests.conftest import Net, build_net
from tests.unit.protocol.test_query_protocol import spec


class _Context:
    """The two things the check asks of a gRPC call."""

    def __init__(self, *, active: bool = True, left: float | None = 10.0) -> None:
        self.active, self.left = active, left

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> float | None:
        return self.left


def _quiet_suspensions(stalls: list[tuple[float, float]]) -> call_guard.Suspensions:
    """A watcher with the given stalls (end, length) and no thread of its own."""
    watcher = object.__new__(call_guard.Suspensions)
    watcher._lock = threading.Lock()
    watcher._last_tick = time.monotonic()
    watcher._stalls = deque(stalls)
    return watcher


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = build_net(tmp_path, start=False)
    try:
        yield n
    finally:
        n.stop()


def _proposed(net: Net, servicer: srv.PartyServicer) -> bytes:
    sid = secrets.token_bytes(16)
    net.nodes["alice"].engine.propose(session_id=sid, spec=spec(), coordinator="analyst")
    servicer._proposed[sid] = time.monotonic()
    return sid


@pytest.mark.parametrize(
    ("context", "stall_s", "late"),
    [
        (_Context(), 0.0, False),
        (_Context(), 3.0, False),  # a stall shorter than the 10 s left
        (_Context(), 12.0, True),  # longer: the coordinator has given the call up
        (_Context(active=False), 0.0, True),  # cancelled
        (_Context(left=0.01), 0.0, True),  # at its deadline
        (_Context(left=None), 12.0, False),  # no deadline: never late
    ],
)
def test_a_late_contribute_is_refused_and_charges_nothing(
    net: Net, context: _Context, stall_s: float, late: bool
) -> None:
    node = net.nodes["alice"]
    servicer = srv.PartyServicer(
        node.engine, coordinators=frozenset({"analyst"}), describe=node.describe
    )
    sid = _proposed(net, servicer)
    stalls = [(time.monotonic() + 1, stall_s)] if stall_s else []
    servicer._suspensions = _quiet_suspensions(stalls)
    if not late:
        servicer._check_in_time(context, "Contribute", session_id=sid, caller="analyst")  # type: ignore[arg-type]
        assert node.ledger.reserved_epsilon("raises") > 0  # still pending
        return
    with pytest.raises(SessionError, match="after its deadline"):
        servicer._check_in_time(context, "Contribute", session_id=sid, caller="analyst")  # type: ignore[arg-type]
    # nothing charged, the reservation released, the session closed
    assert node.ledger.charges("raises") == [] and node.ledger.reserved_epsilon("raises") == 0
    with pytest.raises(SessionError, match="closed"):
        node.engine.contribute(session_id=sid, keys=[], coordinator="analyst")


def test_a_contribute_stopped_between_its_check_and_its_charge_charges_nothing(
    net: Net,
) -> None:
    """Under load a SIGSTOP reaches a multi-threaded party late: its gRPC threads may read a
    Contribute and pass the first check before the process stops. The check is asked again
    right before the charge: a party resumed past the call's deadline refuses then."""
    node = net.nodes["alice"]
    servicer = srv.PartyServicer(
        node.engine, coordinators=frozenset({"analyst"}), describe=node.describe
    )
    sid = secrets.token_bytes(16)
    query = spec()
    keys = [
        net.nodes[p].engine.propose(session_id=sid, spec=query, coordinator="analyst").key
        for p in query.parties
    ]
    servicer._proposed[sid] = time.monotonic()
    servicer._suspensions = _quiet_suspensions([])
    context = _Context(left=2.0)
    in_time = servicer._check_in_time(context, "Contribute", session_id=sid, caller="analyst")  # type: ignore[arg-type]
    # then the process is stopped for longer than the call had left, and resumed
    servicer._suspensions = _quiet_suspensions([(time.monotonic() + 1, 3.2)])
    with pytest.raises(SessionError, match="before its charge"):
        node.engine.contribute(session_id=sid, keys=keys, coordinator="analyst", in_time=in_time)
    assert node.ledger.charges("raises") == [] and node.ledger.reserved_epsilon("raises") == 0


def test_after_private_work_only_a_stall_refuses_never_the_deadline(net: Net) -> None:
    """The check asked again after the party worked on private data must not refuse because
    the deadline passed or the call was cancelled meanwhile: that free refusal's moment would
    tell the coordinator how long the work took (a timing oracle on the data). Only a stall
    of this process longer than the time the call had left refuses."""
    node = net.nodes["alice"]
    servicer = srv.PartyServicer(
        node.engine, coordinators=frozenset({"analyst"}), describe=node.describe
    )
    sid = _proposed(net, servicer)
    servicer._suspensions = _quiet_suspensions([])
    context = _Context(left=2.0)
    again = servicer._check_in_time(context, "Contribute", session_id=sid, caller="analyst")  # type: ignore[arg-type]
    context.active, context.left = False, -1.0  # cancelled, past its deadline: still asked
    assert again()
    servicer._suspensions = _quiet_suspensions([(time.monotonic() + 1, 1.5)])
    assert again()  # a stall shorter than the 2 s the call had
    servicer._suspensions = _quiet_suspensions([(time.monotonic() + 1, 2.5)])
    assert not again()


@pytest.mark.parametrize(
    ("stall_end_s", "stall_s", "late"),
    [
        (+1.0, 12.0, True),  # stalled after the session's last exchange, longer than 10 s left
        (+1.0, 3.0, False),  # a stall shorter than the time left
        (-5.0, 12.0, False),  # the stall ended before the session's last exchange
    ],
)
def test_a_training_step_that_waited_out_a_stall_is_late(
    net: Net, stall_end_s: float, stall_s: float, late: bool
) -> None:
    """A TrainStep read after this party was stopped looks fresh to gRPC (its deadline runs
    from when the party reads it): it is late when the party stalled, since the session's
    previous exchange (TrainOpen, or the end of the previous step), for longer than the time
    the call has left; the engine then refuses it before the charge and before the upload
    (tests/unit/protocol/test_training_roster.py)."""
    node = net.nodes["alice"]
    servicer = srv.PartyServicer(
        node.engine, coordinators=frozenset({"analyst"}), describe=node.describe
    )
    sid = secrets.token_bytes(16)
    now = time.monotonic()
    servicer._remember(sid)  # the session's last exchange: now
    servicer._suspensions = _quiet_suspensions([(now + stall_end_s, stall_s)])
    since = servicer._proposed[sid]
    assert servicer._in_time(_Context(left=10.0), since=since) is not late  # type: ignore[arg-type]
