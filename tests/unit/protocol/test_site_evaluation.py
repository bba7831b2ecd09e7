"""Evaluation at the sites (mpcdp.protocol.training.evaluation): where a session may evaluate,
the spec's evaluation fields, the sites' noisy totals through the secure sum (exact without
noise, within the noise with it), what each evaluation costs in the ledgers, and what a
coordinator speaking the engine's API is refused: an evaluation off the schedule, twice at
one step, on a session without evaluation, late, or at a site without a held-out split."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from mpcdp.dp import accountant
from mpcdp.errors import ParameterError, PolicyError, ProtocolError, SessionError
from mpcdp.protocol.training import TrainingEngine, TrainingSession, TrainSpec, run_event
from mpcdp.protocol.training.evaluation import (
    EVAL_SCALE,
    decode_total,
    eval_count,
    eval_event,
    eval_mu_for,
    eval_points,
    is_eval_point,
)
from mpcdp.train.gradient_source import cross_entropy_per_example
from mpcdp.train.models import build_model
from mpcdp.transport import codec
from tests.conftest import PARTIES, Net, build_net
from tests.training_support import (
    MODEL,
    Direct,
    engines_of,
    example_data,
    examples_toml,
    initial,
    tspec,
)

HELD_OUT = 20


def _espec(**kw: object) -> TrainSpec:
    base: dict[str, object] = dict(
        eval_every=2,
        eval_mu=eval_mu_for(0.5, words=2),
        eval_loss_bound=5.0,
        steps=4,
        sample_rate=1.0,
    )
    base.update(kw)
    return tspec(**base)


def _net(root: Path, **node_options: object) -> Net:
    return build_net(
        root,
        start=False,
        extra=examples_toml(root, held_out=HELD_OUT),
        node_options=dict(node_options) or None,
    )


def _truth(params: np.ndarray, bound: float) -> tuple[int, float]:
    """Correct predictions and clipped loss sum of every site's held-out split."""
    net = build_model(MODEL)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(params), net.parameters())
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(len(PARTIES)):
            x, y = example_data(100 + i, n=HELD_OUT)
            out = net(torch.from_numpy(x))
            target = torch.from_numpy(y)
            correct += int((out.argmax(dim=1) == target).sum())
            loss += float(cross_entropy_per_example(out, target).clamp(0, bound).sum())
    return correct, loss


# -- where and what ------------------------------------------------------------------------------


def test_evaluation_points() -> None:
    assert eval_points(eval_every=2, start_step=0, end_step=5) == (2, 4, 5)
    assert eval_points(eval_every=2, start_step=2, end_step=6) == (4, 6)
    assert eval_points(eval_every=3, start_step=1, end_step=3) == (3,)
    assert eval_points(eval_every=10, start_step=0, end_step=4) == (4,)
    assert eval_points(eval_every=0, start_step=0, end_step=4) == ()
    for every in range(1, 6):
        for start in range(0, 7):
            for end in range(start + 1, 12):
                points = eval_points(eval_every=every, start_step=start, end_step=end)
                assert start not in points and end in points
                assert eval_count(eval_every=every, start_step=start, end_step=end) == len(points)
                for s in range(0, 14):
                    assert is_eval_point(
                        eval_every=every, start_step=start, end_step=end, step=s
                    ) == (s in points)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"eval_every": 2, "eval_mu": 0.0, "eval_loss_bound": 1.0}, "eval_mu"),
        ({"eval_every": 2, "eval_mu": 9.0, "eval_loss_bound": math.inf}, "eval_loss_bound"),
        ({"eval_every": 0, "eval_mu": 9.0}, "eval_mu"),
        ({"eval_every": -1}, "eval_every"),
        ({"eval_every": True, "eval_mu": 9.0, "eval_loss_bound": 1.0}, "eval_every"),
        (
            {"eval_every": 2, "eval_mu": 9.0, "eval_loss_bound": 1.0, "audit_canaries": 4,
             "audit_kind": "white-box"},
            "eval_every",
        ),
    ],
)  # fmt: skip
def test_spec_refuses_bad_evaluation_fields(fields: dict[str, object], name: str) -> None:
    with pytest.raises(ParameterError, match=name):
        tspec(**fields)


def test_the_session_event_counts_its_evaluations_and_the_wire_carries_them() -> None:
    s = _espec(steps=5)
    assert s.evaluations == 3 and [t for t in range(8) if s.is_eval_point(t)] == [2, 4, 5]
    # counted, never listed: a signed spec of 2^40 steps, one evaluation each, costs nothing
    huge = _espec(steps=2**40, eval_every=1, eval_mu=eval_mu_for(50.0, words=2))
    assert huge.evaluations == 2**40 and huge.is_eval_point(2**39)
    composed = accountant.compose([run_event(s)], delta=1e-5).epsilon
    steps_only = accountant.compose([run_event(_espec(steps=5, eval_every=0, eval_mu=0.0,
                                                      eval_loss_bound=0.0))],
                                    delta=1e-5).epsilon  # fmt: skip
    with_three = accountant.compose(
        [run_event(dataclasses.replace(s, eval_every=0, eval_mu=0.0, eval_loss_bound=0.0)),
         eval_event(s.eval_mu, words=2, count=3)],
        delta=1e-5,
    ).epsilon  # fmt: skip
    assert composed == pytest.approx(with_three) and composed > steps_only
    assert codec.train_spec_from_pb(codec.train_spec_to_pb(s)) == s
    sid = secrets.token_bytes(16)
    requests = codec.encode_step_requests(
        session_id=sid, step=2, keys=[], parameters=np.zeros(3, np.float32), full=False,
        evaluate=True,
    )  # fmt: skip
    _, header, _, _ = codec.decode_step_requests(requests, max_values=lambda _: 3)
    assert header.evaluate and header.step == 2


def test_decoding_divides_by_the_public_count_and_clamps_what_noise_pushes_out() -> None:
    total = np.array([-3 * EVAL_SCALE, 40 * EVAL_SCALE], dtype=np.int64)
    t = decode_total(total, eval_loss_bound=2.0, loss="cross_entropy", examples=10)
    assert (t.correct, t.loss_sum, t.examples) == (-3.0, 80.0, 10)
    assert t.accuracy() == 0.0 and t.mean_loss(bound=2.0) == 2.0
    one = decode_total(
        np.array([5 * EVAL_SCALE], dtype=np.int64), eval_loss_bound=2.0, loss="mse", examples=20
    )
    assert one.accuracy() is None and one.mean_loss(bound=2.0) == 0.5
    with pytest.raises(ParameterError, match="total"):
        decode_total(total, eval_loss_bound=2.0, loss="mse", examples=10)


# -- the sites' totals ---------------------------------------------------------------------------


def test_without_noise_the_sites_totals_are_exact(tmp_path: Path) -> None:
    net = _net(tmp_path, test_only_noise_divisor=math.inf)
    try:
        engines = engines_of(net)
        s = _espec()
        session = TrainingSession(spec=s, clients=[Direct(e) for e in engines.values()])
        session.open()
        params = initial(s)
        session.step(parameters=params, full=True)
        session.step(parameters=params, full=False)
        total = session.evaluate(parameters=params, full=False)
        assert total.shape == (2,)  # accuracy and loss: the count is public, not released
        t = decode_total(
            total, eval_loss_bound=s.eval_loss_bound, loss=s.loss, examples=3 * HELD_OUT
        )
        correct, loss = _truth(params, s.eval_loss_bound)
        assert t.correct == correct  # S * 0 or S * 1: exact
        # the loss terms are rounded up or down by one unit each
        assert abs(t.loss_sum - loss) <= 3 * HELD_OUT * s.eval_loss_bound / EVAL_SCALE
        session.close()
    finally:
        net.stop()


def test_with_noise_the_totals_are_within_it_and_one_site_upload_hides_its_terms(
    sites_with_splits: Net,
) -> None:
    engines = engines_of(sites_with_splits)
    clients = [Direct(e) for e in engines.values()]
    s = _espec(steps=2)
    session = TrainingSession(spec=s, clients=clients)
    session.open()
    params = initial(s)
    session.step(parameters=params, full=True)
    session.step(parameters=params, full=False)
    assert session.evaluate(parameters=params, full=False).shape == (2,)  # the final one
    summed = np.zeros(2, dtype=np.uint64)
    for c in clients:
        summed += c.uploads[-1]
    total = decode_total(
        summed.view(np.int64), eval_loss_bound=s.eval_loss_bound, loss=s.loss,
        examples=3 * HELD_OUT,
    )  # fmt: skip
    # Skellam(eval_mu) in all: std 0.5 sqrt(2) ~ 0.71 examples; 12 std is below 1e-30
    std = math.sqrt(s.eval_mu) / EVAL_SCALE
    correct, loss = _truth(params, s.eval_loss_bound)
    assert total.correct is not None and abs(total.correct - correct) <= 12 * std
    assert abs(total.loss_sum - loss) <= (12 * std + 3 * HELD_OUT / EVAL_SCALE) * 5.0
    for c in clients:  # each upload is masked: far from any count of 20 examples
        words = c.uploads[-1].view(np.int64)
        assert words.dtype == np.int64 and np.abs(words).max() > 2**40
    session.close()


def test_each_evaluation_is_charged_once_and_the_ledger_composes_it(
    sites_with_splits: Net,
) -> None:
    engines = engines_of(sites_with_splits)
    s = _espec(steps=3, steps_per_charge=3)
    session = TrainingSession(spec=s, clients=[Direct(e) for e in engines.values()])
    session.open()
    params = initial(s)
    ledger = sites_with_splits.nodes["alice"].ledger
    session.step(parameters=params, full=True)
    session.step(parameters=params, full=False)
    before = len(ledger.charges("ex"))
    session.evaluate(parameters=params, full=False)
    charges = ledger.charges("ex")
    assert len(charges) == before + 1
    assert charges[-1].event == eval_event(s.eval_mu, words=2)
    assert "evaluation" in charges[-1].note
    session.step(parameters=params, full=False)
    session.evaluate(parameters=params, full=False)  # after the last step: ends the session
    events = [c.event for c in ledger.charges("ex")]
    assert len(events) == 3  # one block of three steps, two evaluations
    assert ledger.status("ex").spent_epsilon == pytest.approx(
        accountant.compose(events, delta=1e-5).epsilon
    )
    assert not engines["alice"]._sessions  # finished
    session.close()


# -- what a coordinator is refused ------------------------------------------------------------


def _started(
    engines: dict[str, TrainingEngine],
    s: TrainSpec,
    *,
    steps: int = 1,  # type: ignore[type-arg]
) -> tuple[bytes, np.ndarray]:
    """A session opened at every engine, and its first ``steps`` steps run."""
    sid = secrets.token_bytes(16)
    keys = [e.open(session_id=sid, spec=s, coordinator="analyst").key for e in engines.values()]
    params = initial(s)
    for step in range(steps):
        for e in engines.values():
            e.step(session_id=sid, step=step, keys=[] if step else keys, parameters=params,
                   full=step == 0, coordinator="analyst")  # fmt: skip
    return sid, params


@pytest.mark.parametrize(
    ("spec", "step", "error"),
    [
        ({}, 1, "not an evaluation point"),  # the session is at step 1, eval_every 2
        ({}, 3, "is at step 1"),  # not the session's current step
        ({"eval_every": 0, "eval_mu": 0.0, "eval_loss_bound": 0.0}, 1, "evaluates nothing"),
    ],
)
def test_evaluations_off_the_schedule_are_refused_before_any_charge(
    sites_with_splits: Net, spec: dict[str, object], step: int, error: str
) -> None:
    engines = engines_of(sites_with_splits)
    s = _espec(**spec)
    sid, params = _started(engines, s)
    alice = engines["alice"]
    before = alice.ledger.charges("ex")
    with pytest.raises(ProtocolError, match=error):
        alice.evaluate(session_id=sid, step=step, keys=[], parameters=params, full=False,
                       coordinator="analyst")  # fmt: skip
    after = alice.ledger.charges("ex")
    # nothing charged for it (the refusal ends the session, whose block is settled)
    assert [c.query_id for c in after] == [c.query_id for c in before]
    assert sid not in alice._sessions


def test_a_second_evaluation_at_one_step_is_refused(sites_with_splits: Net) -> None:
    """Two masked vectors under the same masks would reveal one site's difference with only
    its own noise share: an evaluation's masks are used once."""
    engines = engines_of(sites_with_splits)
    s = _espec()
    sid, params = _started(engines, s, steps=2)
    alice = engines["alice"]
    alice.evaluate(session_id=sid, step=2, keys=[], parameters=params, full=False,
                   coordinator="analyst")  # fmt: skip
    charged = alice.ledger.charges("ex")
    with pytest.raises(ProtocolError, match="used once"):
        alice.evaluate(session_id=sid, step=2, keys=[], parameters=params, full=False,
                       coordinator="analyst")  # fmt: skip
    assert [c.query_id for c in alice.ledger.charges("ex")] == [c.query_id for c in charged]


def test_a_late_evaluation_is_neither_sent_nor_charged(sites_with_splits: Net) -> None:
    engines = engines_of(sites_with_splits)
    s = _espec()
    sid, params = _started(engines, s, steps=2)
    alice = engines["alice"]
    charged = alice.ledger.charges("ex")
    answers = iter([True, False])  # in time when asked first, given up once it is ready
    with pytest.raises(SessionError, match="gave up"):
        alice.evaluate(session_id=sid, step=2, keys=[], parameters=params, full=False,
                       coordinator="analyst", in_time=lambda: next(answers))  # fmt: skip
    assert [c.query_id for c in alice.ledger.charges("ex")] == [c.query_id for c in charged]
    assert alice.ledger.reserved_epsilon("ex") == 0.0  # its reservation released


def test_a_site_without_a_held_out_split_refuses_at_open(sites: Net) -> None:
    engines = engines_of(sites)
    alice = engines["alice"]
    with pytest.raises(PolicyError, match="held-out split"):
        alice.open(session_id=secrets.token_bytes(16), spec=_espec(), coordinator="analyst")
    assert alice.ledger.charges("ex") == [] and alice.ledger.reserved_epsilon("ex") == 0.0


def test_the_cap_per_query_counts_the_evaluations(tmp_path: Path) -> None:
    s = _espec(steps=4, eval_every=1, eval_mu=eval_mu_for(0.3, words=2))
    steps_only = accountant.compose(
        [run_event(dataclasses.replace(s, eval_every=0, eval_mu=0.0, eval_loss_bound=0.0))],
        delta=1e-5,
    ).epsilon
    cap = steps_only * 1.01  # the steps fit; with four evaluations they do not
    extra = examples_toml(tmp_path, cap=cap, held_out=HELD_OUT)
    net = build_net(tmp_path, start=False, extra=extra)
    try:
        with pytest.raises(PolicyError, match="max_epsilon_per_query"):
            engines_of(net)["alice"].open(
                session_id=secrets.token_bytes(16), spec=s, coordinator="analyst"
            )
    finally:
        net.stop()


@pytest.fixture
def sites_with_splits(tmp_path: Path) -> Iterator[Net]:
    net = _net(tmp_path)
    try:
        yield net
    finally:
        net.stop()
