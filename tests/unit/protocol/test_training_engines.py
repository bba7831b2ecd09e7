"""The training protocol in-process (TrainingEngine at each site, TrainingSession at the
coordinator): noisy sums of clipped gradients, uniform uploads, per-block charges, order and
policy refusals, failures mid-run."""

from __future__ import annotations

import dataclasses
import math
import secrets
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from mpcdp.dp import accountant
from mpcdp.errors import (
    AuthError,
    BudgetExceededError,
    HeadroomError,
    ParameterError,
    PolicyError,
    ProtocolError,
    RoundAborted,
    SessionError,
)
from mpcdp.mpc import encoding
from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.query.round_coordinator import ContributionStream
from mpcdp.protocol.training import (
    TrainingEngine,
    TrainingSession,
    TrainSpec,
)
from mpcdp.train.models import build_model
from tests.conftest import Net, build_net
from tests.stats import assert_uniform_words
from tests.training_support import (
    MODEL,
    NUM_PARAMS,
    Direct,
    dither_threads,
    engines_of,
    example_data,
    examples_toml,
    initial,
    tspec,
)


def test_steps_reveal_the_noisy_sum_of_clipped_gradients(sites: Net) -> None:
    engines = engines_of(sites)
    clients = [Direct(e) for e in engines.values()]
    s = tspec(sample_rate=1.0, steps=3, steps_per_charge=3)
    session = TrainingSession(spec=s, clients=clients)
    session.open()
    params = initial(s)
    totals = [session.step(parameters=params, full=True)]
    sources = [e._sessions[session.session_id].source for e in engines.values()]
    trainable = params  # no bias_only: trainable == all
    totals += [session.step(parameters=trainable, full=False) for _ in range(2)]
    session.close()
    assert not dither_threads()  # finished sessions stopped their sources' threads
    assert len(sources) == 3  # held until here: only close() could stop them
    # the exact sum of every site's clipped gradients (q = 1: every example, every step)
    from mpcdp.train.clipping import PerSampleClipper
    from mpcdp.train.gradient_source import cross_entropy_per_example

    exact = torch.zeros(NUM_PARAMS)
    for i in range(3):
        net = build_model(MODEL)
        torch.nn.utils.vector_to_parameters(torch.from_numpy(params), net.parameters())
        x, y = example_data(i)
        exact += (
            PerSampleClipper(net, max_grad_norm=1.0)
            .clipped_grad_sum(
                inputs=torch.from_numpy(x),
                targets=torch.from_numpy(y),
                loss_fn=cross_entropy_per_example,
            )
            .grad_sum
        )
    scale = 2.0**s.scale_bits
    noise_std = math.sqrt(s.mu * 3 / 2)
    for total in totals:
        diff = total / scale - exact.numpy()
        # Skellam noise plus rounding, per coordinate: 6 standard deviations
        assert np.all(np.abs(diff) <= (6 * noise_std + 3) / scale)
        assert np.std(diff) == pytest.approx(noise_std / scale, rel=0.35)


def test_a_step_sums_into_the_callers_buffer_and_a_bad_one_loses_nothing(sites: Net) -> None:
    engines = engines_of(sites)
    clients = [Direct(e) for e in engines.values()]
    s = tspec(sample_rate=1.0, steps=2, steps_per_charge=2)
    session = TrainingSession(spec=s, clients=clients)
    session.open()
    params = initial(s)
    for bad, error in [
        (np.zeros(NUM_PARAMS, dtype=np.int32), "out.*int32"),
        (np.zeros(NUM_PARAMS + 1, dtype=np.uint32), r"out.*\(76,\)"),
        (np.zeros(2 * NUM_PARAMS, dtype=np.uint32)[::2], "out.*C-contiguous"),
        ([0] * NUM_PARAMS, "out.*list"),
    ]:
        with pytest.raises(ParameterError, match=error):
            session.step(parameters=params, full=True, out=bad)  # type: ignore[arg-type]
    assert all(not c.uploads for c in clients)  # refused before any site was asked
    buf = np.full(NUM_PARAMS, 0xDEADBEEF, dtype=np.uint32)  # overwritten, not added to
    total = session.step(parameters=params, full=True, out=buf)
    assert np.shares_memory(total, buf) and total.dtype == np.int32
    noise_std = math.sqrt(s.mu * 3 / 2)
    # the clipped sums (norm <= 3 * 40 examples * C 2^k) are small against 0xDEADBEEF
    assert np.all(np.abs(total.astype(np.float64)) <= 6 * noise_std + 120 * 2**s.scale_bits)
    again = session.step(parameters=params, full=False, out=buf)  # reused: the next step
    assert np.shares_memory(again, buf)
    session.close()


def test_what_the_coordinator_receives_from_a_site_is_uniform(sites: Net) -> None:
    """Zero parameters: every site's gradient is the same small vector, the uploads must
    still be indistinguishable from uniform words (bits and bytes)."""
    engines = engines_of(sites)
    clients = [Direct(e) for e in engines.values()]
    mu = (4 * (1 + math.sqrt(NUM_PARAMS))) ** 2
    s = tspec(steps=60, steps_per_charge=60, mu=mu, scale_bits=0)
    session = TrainingSession(spec=s, clients=clients)
    session.open()
    zeros = np.zeros(NUM_PARAMS, dtype=np.float32)
    session.step(parameters=zeros, full=True)
    for _ in range(59):
        session.step(parameters=zeros, full=False)
    for c in clients:
        words = np.concatenate(c.uploads)
        assert words.dtype == np.uint32 and words.size == 60 * NUM_PARAMS
        assert_uniform_words(words)


def test_the_ledger_is_charged_per_block_before_release(sites: Net) -> None:
    engines = engines_of(sites)
    s = tspec(steps=5, steps_per_charge=2)
    session = TrainingSession(spec=s, clients=[Direct(e) for e in engines.values()])
    session.open()
    ledger = sites.nodes["alice"].ledger
    assert ledger.charges("ex") == []
    params = initial(s)
    session.step(parameters=params, full=True)
    assert [c.event.steps for c in ledger.charges("ex")] == [2]  # type: ignore[union-attr]
    session.step(parameters=params, full=False)
    session.step(parameters=params, full=False)
    assert [c.event.steps for c in ledger.charges("ex")] == [2, 2]  # type: ignore[union-attr]
    session.step(parameters=params, full=False)
    session.step(parameters=params, full=False)
    charges = ledger.charges("ex")
    assert [c.event.steps for c in charges] == [2, 2, 1]  # type: ignore[union-attr]
    assert len({c.query_id for c in charges}) == 3
    spent = ledger.status("ex").spent_epsilon
    assert spent == pytest.approx(
        accountant.compose([c.event for c in charges], delta=1e-5).epsilon
    )
    with pytest.raises(ProtocolError, match="done"):
        session.step(parameters=params, full=False)


def _open(engines: dict[str, TrainingEngine], s: TrainSpec, sid: bytes) -> list[SignedKey]:
    return [e.open(session_id=sid, spec=s, coordinator="analyst").key for e in engines.values()]


def test_step_order_keys_and_sessions_are_enforced(sites: Net) -> None:
    engines = engines_of(sites)
    alice = engines["alice"]
    s = tspec()
    params = initial(s)
    sid = secrets.token_bytes(16)
    keys = _open(engines, s, sid)
    kw = dict(session_id=sid, parameters=params, full=True, coordinator="analyst")
    with pytest.raises(ProtocolError, match="relay every signed key"):
        alice.step(step=0, keys=[], **kw)  # type: ignore[arg-type]
    # a failed step ends the session: never answered twice
    with pytest.raises(SessionError, match="closed"):
        alice.step(step=0, keys=keys, **kw)  # type: ignore[arg-type]

    sid = secrets.token_bytes(16)
    keys = _open(engines, s, sid)
    kw["session_id"] = sid
    with pytest.raises(ProtocolError, match="expects step 0"):
        alice.step(step=1, keys=keys, **kw)  # type: ignore[arg-type]

    sid = secrets.token_bytes(16)
    keys = _open(engines, s, sid)
    kw["session_id"] = sid
    with pytest.raises(SessionError, match="belongs to coordinator"):
        alice.step(step=0, keys=keys, **{**kw, "coordinator": "other"})  # type: ignore[arg-type]
    alice.step(step=0, keys=keys, **kw)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="expects step 1"):
        alice.step(step=0, keys=[], **kw)  # type: ignore[arg-type]

    sid = secrets.token_bytes(16)
    keys = _open(engines, s, sid)
    forged = dataclasses.replace(keys[1], public_key=bytes(32))
    with pytest.raises((AuthError, ProtocolError)):
        alice.step(step=0, keys=[keys[0], forged, keys[2]], **{**kw, "session_id": sid})  # type: ignore[arg-type]

    with pytest.raises(SessionError, match="already used"):
        alice.open(session_id=sid, spec=s, coordinator="analyst")


@pytest.mark.parametrize(
    ("params", "full", "error"),
    [
        (np.full(NUM_PARAMS, np.nan, dtype=np.float32), True, "parameters"),
        (np.zeros(NUM_PARAMS - 1, dtype=np.float32), True, "expected 75"),
    ],
)
def test_bad_parameters_are_refused(sites: Net, params: np.ndarray, full: bool, error: str) -> None:
    engines = engines_of(sites)
    s = tspec()
    sid = secrets.token_bytes(16)
    keys = _open(engines, s, sid)
    with pytest.raises((ParameterError, ProtocolError), match=error):
        engines["alice"].step(
            session_id=sid, step=0, keys=keys, parameters=params, full=full, coordinator="analyst"
        )
    assert engines["alice"].ledger.charges("ex") == []  # refused before any charge


def test_policy_refusals_at_open(sites: Net) -> None:
    alice = engines_of(sites)["alice"]

    def sid() -> bytes:
        return secrets.token_bytes(16)

    with pytest.raises(PolicyError, match="unknown example dataset 'nope'"):
        alice.open(session_id=sid(), spec=tspec(dataset="nope"), coordinator="analyst")
    with pytest.raises(PolicyError, match="min_colluders"):
        alice.open(session_id=sid(), spec=tspec(colluders=0), coordinator="analyst")
    with pytest.raises(PolicyError, match="unknown party 'mallory'"):
        alice.open(
            session_id=sid(),
            spec=tspec(parties=("alice", "bob", "mallory")),
            coordinator="analyst",
        )
    with pytest.raises(PolicyError, match="num_params=74"):
        alice.open(session_id=sid(), spec=tspec(num_params=74), coordinator="analyst")
    with pytest.raises(HeadroomError, match="overflow"):
        alice.open(session_id=sid(), spec=tspec(scale_bits=30), coordinator="analyst")
    with pytest.raises(BudgetExceededError):
        alice.open(session_id=sid(), spec=tspec(mu=1e6, steps=1000), coordinator="analyst")
    assert alice.ledger.charges("ex") == []


def test_max_epsilon_per_query_caps_a_session(tmp_path: Path) -> None:
    n = build_net(tmp_path, start=False, extra=examples_toml(tmp_path, cap=0.5))
    try:
        with pytest.raises(PolicyError, match=r"max_epsilon_per_query=0\.5"):
            engines_of(n)["bob"].open(
                session_id=secrets.token_bytes(16), spec=tspec(steps=200), coordinator="analyst"
            )
    finally:
        n.stop()


def test_bias_only_uploads_only_biases(sites: Net) -> None:
    engines = engines_of(sites)
    s = tspec(bias_only=True, num_params=6 + 3)
    session = TrainingSession(spec=s, clients=[Direct(e) for e in engines.values()])
    session.open()
    total = session.step(parameters=initial(s), full=True)
    assert total.shape == (9,)
    session.step(parameters=np.zeros(9, dtype=np.float32), full=False)
    session.close()


def test_a_site_failing_mid_run_aborts_the_step_and_reveals_nothing(sites: Net) -> None:
    engines = engines_of(sites)
    clients = [Direct(e) for e in engines.values()]
    s = tspec()
    session = TrainingSession(spec=s, clients=clients)
    session.open()
    params = initial(s)
    session.step(parameters=params, full=True)

    def dead(**kw: object) -> ContributionStream:
        raise ConnectionError("site-c is gone")

    assert dither_threads()  # sites draw their next dither in the background
    # held here, so that only close() (not garbage collection) can stop their threads
    sources = [e._sessions[session.session_id].source for e in engines.values()]
    clients[2].train_step = dead  # type: ignore[method-assign]
    with pytest.raises(RoundAborted, match="step 1"):
        session.step(parameters=params, full=False)
    assert not dither_threads()  # the aborted sessions stopped their sources' threads
    assert len(sources) == 3
    # the others forgot the session
    with pytest.raises(SessionError):
        engines["alice"].step(
            session_id=session.session_id,
            step=1,
            keys=[],
            parameters=params,
            full=False,
            coordinator="analyst",
        )


def test_encoding_of_negative_sums_wraps_back() -> None:
    ints = np.array([-5, 7, -(2**30)], dtype=np.int64)
    assert list(encoding.decode_int(encoding.to_ring(ints, ring_bits=32))) == list(ints)


def test_an_empty_poisson_batch_still_sends_a_noise_share(sites: Net) -> None:
    engines = engines_of(sites)
    clients = [Direct(e) for e in engines.values()]
    s = tspec(sample_rate=1e-9, steps=2)
    session = TrainingSession(spec=s, clients=clients)
    session.open()
    total = session.step(parameters=initial(s), full=True)
    session.close()
    # no example was sampled anywhere: what is revealed is pure noise, with its variance
    noise_std = math.sqrt(s.mu * 3 / 2)
    assert np.any(total != 0)
    assert np.std(total) == pytest.approx(noise_std, rel=0.35)
    assert all(c.uploads and c.uploads[0].size == NUM_PARAMS for c in clients)


def test_an_open_refused_by_one_site_leaves_nothing_reserved_at_a_slower_one(
    sites: Net,
) -> None:
    """The coordinator waits for every TrainOpen before it aborts: an abort that overtook a
    slow site's TrainOpen would find no session there, and the reservation that TrainOpen
    then made would be held until it expired."""
    import threading
    import time

    engines = engines_of(sites)
    clients = [Direct(e) for e in engines.values()]
    done = threading.Event()
    real_open = clients[2].train_open

    def refuse(**kw: object) -> object:
        raise PolicyError("alice refuses this run")

    def slow(**kw: object) -> object:
        time.sleep(0.3)  # the refusal at alice comes first, whatever the machine's load
        try:
            return real_open(**kw)  # type: ignore[arg-type]
        finally:
            done.set()

    clients[0].train_open = refuse  # type: ignore[method-assign,assignment]
    clients[2].train_open = slow  # type: ignore[method-assign,assignment]
    with pytest.raises(RoundAborted, match="alice refuses"):
        TrainingSession(spec=tspec(), clients=clients).open()
    assert done.wait(30)
    for name in ("bob", "carlos"):
        assert sites.nodes[name].ledger.reserved_epsilon("ex") == 0
