"""The one-run audit inside real federated training (mpcdp.train.audit_run): the audit fields of
the TrainSpec, the sites' secret inclusion bits revealed with the last step of an audit run
only, white-box and black-box canaries over real mTLS gRPC party nodes, and the acceptance
pair: an honest run's bound stays below the claimed epsilon, a run whose noise is broken
(test-only hook) is caught."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mpcdp.audit.canaries import gradient_coordinates, input_canaries  # noqa: E402
from mpcdp.errors import ParameterError, RoundAborted  # noqa: E402
from mpcdp.federation import Federation  # noqa: E402
from mpcdp.mpc.rng import csprng  # noqa: E402
from mpcdp.protocol.query.round_coordinator import ContributionStream  # noqa: E402
from mpcdp.protocol.training import TrainingSession  # noqa: E402
from mpcdp.transport import codec  # noqa: E402
from tests.conftest import PARTIES, build_net  # noqa: E402
from tests.training_support import (  # noqa: E402
    NUM_PARAMS,
    Direct,
    engines_of,
    examples_toml,
    initial,
    tspec,
)

#: 3075 trainable parameters: room for 3 x 300 distinct gradient canaries
MODEL = "mlp:8,256,3"


def audit_spec(**kw: object) -> Any:
    base: dict[str, object] = dict(audit_canaries=5, audit_kind="white-box")
    base.update(kw)
    return tspec(**base)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        (dict(audit_canaries=-1), "audit_canaries"),
        (dict(audit_canaries=True), "audit_canaries"),
        (dict(audit_canaries=1 << 21), "audit_canaries"),
        (dict(audit_kind="grey-box"), "audit_kind"),
        (dict(audit_canaries=0, audit_kind="white-box"), "audit_kind"),
        (dict(start_step=1), "start_step"),
        (dict(audit_canaries=NUM_PARAMS // 3 + 1), "audit_canaries"),
    ],
)
def test_audit_fields_of_the_spec_are_checked(kw: dict[str, object], name: str) -> None:
    with pytest.raises(ParameterError, match=name):
        audit_spec(**kw)


def test_audit_fields_travel_and_are_signed() -> None:
    spec = audit_spec(audit_kind="black-box", audit_canaries=7)
    assert codec.train_spec_from_pb(codec.train_spec_to_pb(spec)) == spec
    from mpcdp.protocol.training import digest

    assert digest(spec) != digest(dataclasses.replace(spec, audit_canaries=8))
    assert digest(spec) != digest(dataclasses.replace(spec, audit_kind="white-box"))


def test_canary_content_is_public_and_distinct() -> None:
    a = gradient_coordinates(run_id="r", num_params=1000, sites=3, per_site=100)
    assert a.shape == (3, 100) and np.unique(a).size == 300
    assert np.array_equal(
        a, gradient_coordinates(run_id="r", num_params=1000, sites=3, per_site=100)
    )
    assert not np.array_equal(
        a, gradient_coordinates(run_id="s", num_params=1000, sites=3, per_site=100)
    )
    x, y = input_canaries(run_id="r", site_index=1, count=4, feature_shape=(8,), num_classes=3)
    assert x.shape == (4, 8) and x.dtype == np.float32 and set(y) <= {0, 1, 2}
    with pytest.raises(ParameterError, match="audit_canaries"):
        gradient_coordinates(run_id="r", num_params=10, sites=3, per_site=4)


def run_direct(clients: list[Direct], spec: Any) -> tuple[TrainingSession, list[bytes]]:
    """Every step of ``spec``; returns the session and the bits each step's streams carried."""
    seen: list[bytes] = []

    class Spy(Direct):
        def train_step(self, **kw: Any) -> ContributionStream:
            stream = super().train_step(**kw)
            seen.append(stream.audit_inclusion)
            return stream

    spies = [Spy(c.engine) for c in clients]
    session = TrainingSession(spec=spec, clients=spies)
    session.open()
    params = initial(spec)
    for s in range(spec.steps):
        session.step(parameters=params if s == 0 else params[:NUM_PARAMS], full=s == 0)
    session.close()
    return session, seen


def test_bits_are_revealed_with_the_last_step_of_an_audit_run_only(sites: Any) -> None:
    engines = engines_of(sites)
    clients = [Direct(engines[p]) for p in PARTIES]
    spec = audit_spec(steps=3, steps_per_charge=3, audit_canaries=9)
    session, seen = run_direct(clients, spec)
    assert seen[:6] == [b""] * 6  # steps 0 and 1 of three sites: nothing revealed
    assert all(len(b) == 2 for b in seen[6:])
    assert set(session.audit_inclusion) == set(PARTIES)
    assert all(v.shape == (9,) and v.dtype == np.bool_ for v in session.audit_inclusion.values())
    # an ordinary run reveals nothing, not even at its last step
    plain = tspec(run_id="run-2", steps=2, steps_per_charge=2)
    session, seen = run_direct(clients, plain)
    assert seen == [b""] * 6 and session.audit_inclusion == {}


def test_coordinator_refuses_bits_out_of_place(sites: Any) -> None:
    engines = engines_of(sites)

    class Early(Direct):
        def train_step(self, **kw: Any) -> ContributionStream:
            return dataclasses.replace(super().train_step(**kw), audit_inclusion=b"\x00")

    session = TrainingSession(
        spec=audit_spec(steps=2), clients=[Early(engines[p]) for p in PARTIES]
    )
    session.open()
    with pytest.raises(RoundAborted, match="out of place"):
        session.step(parameters=initial(session.spec), full=True)
    session.close()


def test_inclusion_bits_come_from_the_site_s_generator(sites: Any) -> None:
    """The bits are drawn from the engine's injected generator (seeded here, a test only):
    the same key gives the same bits, and they are fair coins (2000 bits: |ones - 1000| <
    5.5 std = 123, chance failure < 1e-7). Black-box canaries join the site's examples."""
    engine = engines_of(sites)["alice"]
    spec = audit_spec(audit_kind="black-box", audit_canaries=2000, steps=1)
    drawn = []
    for i in range(2):
        engine._rng = csprng(key=bytes(16))
        sid = bytes([i]) * 16
        engine.open(session_id=sid, spec=spec, coordinator="analyst")
        session = engine._sessions[sid]
        bits = session.canaries_in
        assert bits is not None and bits.size == 2000
        assert session.source._n == 40 + int(bits.sum())  # type: ignore[attr-defined]
        drawn.append(bits)
        engine.abort(session_id=sid, coordinator="analyst")
    assert np.array_equal(drawn[0], drawn[1])
    assert abs(int(drawn[0].sum()) - 1000) < 5.5 * math.sqrt(500)


# -- over real party nodes (mTLS gRPC on loopback) ---------------------------------------------


def example_data(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 8)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y


def audit_run(root: Path, *, divisor: float, kind: str = "white-box", **kw: Any) -> Any:
    extra = {}
    for i, p in enumerate(PARTIES):
        x, y = example_data(i)
        np.savez(root / f"{p}-ex.npz", x=x, y=y)
        extra[p] = (
            f'\n[datasets.ex]\npath = "{p}-ex.npz"\nnum_classes = 3\nepsilon = 50\ndelta = 1e-5\n'
        )
    net = build_net(root, extra=extra, node_options={"test_only_noise_divisor": divisor})
    options: dict[str, Any] = dict(
        dataset="ex",
        model=MODEL,
        target_epsilon=1.0,
        target_delta=1e-12,
        epochs=5,
        batch_size=18,
        audit_canaries=300,
        audit_kind=kind,
        audit_confidence=1 - 1e-7,
        audit_delta=1e-12,
        seed=1,
    )
    options.update(kw)
    try:
        with Federation.from_config(net.federation) as fed:
            return fed.train(**options)
    finally:
        net.stop()


@pytest.mark.slow
def test_white_box_audit_of_an_honest_run_stays_below_the_claim(tmp_path: Path) -> None:
    """Claimed epsilon 1 at delta 1e-12; the bound holds at confidence 1 - 1e-7 (the
    paper's theorem: a chance failure <= 1e-7; 2 m delta / v < 1e-8 keeps the delta term
    negligible)."""
    result = audit_run(tmp_path, divisor=1.0)
    a = result.audit
    assert a is not None and a.m == 900 and a.confidence == 1 - 1e-7 and a.delta == 1e-12
    assert a.claimed_epsilon == pytest.approx(
        result.plan.epsilon_after(result.steps_done, delta=1e-12)
    )
    assert a.claimed_epsilon <= 1.0
    assert 0.0 <= a.epsilon_lower_bound <= a.claimed_epsilon
    assert result.to_json()["audit"]["kind"] == "white-box"


@pytest.mark.slow
def test_white_box_audit_catches_broken_noise(tmp_path: Path) -> None:
    """The sites add no noise (test-only hook) while the accountant claims epsilon 1 (at
    delta 1e-12): the bound must exceed 1. Measured in three runs: 395, 397 and 397 of 400
    guesses correct (the spike-count score), bounds 2.48-2.63. The bound exceeds 1 from 345
    correct of 400 on (confidence 1 - 1e-7 over 26 candidates). The errors are included
    canaries the Poisson sampling never picked (0.9^50 = 0.5%) and real-gradient jumps on
    the canaries' coordinates, about 4 of 400 (1%): 56 errors would be more than 25 binomial
    standard deviations away, so a chance failure is far below 1e-6."""
    result = audit_run(tmp_path, divisor=math.inf)
    a = result.audit
    assert a is not None and a.claimed_epsilon is not None and a.claimed_epsilon <= 1.0
    assert a.epsilon_lower_bound > 1.0


@pytest.mark.slow
def test_black_box_audit_runs_end_to_end(tmp_path: Path) -> None:
    """Input canaries join the sites' data; the final model's losses order them; an honest
    run's bound stays below the claim (confidence 1 - 1e-7)."""
    result = audit_run(tmp_path, divisor=1.0, kind="black-box", audit_canaries=100)
    a = result.audit
    assert a is not None and a.m == 300 and result.plan.audit_kind == "black-box"
    assert 0.0 <= a.epsilon_lower_bound <= a.claimed_epsilon


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        (dict(audit_canaries=-1), "audit_canaries"),
        (dict(audit_canaries=1.5), "audit_canaries"),
        (dict(audit_kind="grey-box"), "audit_kind"),
        (dict(audit_confidence=1.0), "audit_confidence"),
        (dict(audit_delta=0.0), "audit_delta"),
        (dict(stop_after=3), "stop_after"),
        (dict(audit_kind="black-box"), "feature_shape"),
    ],
)
def test_train_refuses_bad_audit_options(kw: dict[str, object], name: str) -> None:
    from mpcdp.train.federated import train

    args: dict[str, Any] = dict(
        clients=[],
        dataset="ex",
        model=MODEL,
        examples={},
        target_epsilon=1.0,
        target_delta=1e-5,
        epochs=1,
        audit_canaries=10,
    )
    args.update(kw)
    with pytest.raises(ParameterError, match=name):
        train(**args)


def test_an_audit_run_is_never_resumed(tmp_path: Path) -> None:
    from mpcdp.train.federated import train

    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ParameterError, match="never resumed"):
        train(
            clients=[],
            dataset="ex",
            model=MODEL,
            examples={},
            target_epsilon=1.0,
            target_delta=1e-5,
            epochs=1,
            audit_canaries=10,
            checkpoint=ckpt,
        )


def test_noise_hook_is_refused_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="test_only_noise_divisor"):
        build_net(
            tmp_path,
            start=False,
            extra=examples_toml(tmp_path),
            node_options={"test_only_noise_divisor": 0.5},
        )


def test_noise_hook_is_not_reachable_from_party_toml(tmp_path: Path) -> None:
    from mpcdp.config.party_config import load_party_config
    from tests.conftest import party_toml

    init = build_net(tmp_path, start=False)
    init.stop()
    cfg = tmp_path / "x.toml"
    cfg.write_text(party_toml("alice", PARTIES) + "\ntest_only_noise_divisor = 10\n")
    with pytest.raises(Exception, match="test_only_noise_divisor"):
        load_party_config(cfg)


def test_no_noise_is_caught_at_a_claim_the_old_audit_could_not_refute(tmp_path: Path) -> None:
    """The key test of the audit's power. The sites add no noise (test-only hook) while the
    accountant claims epsilon 3 at delta 1e-12 (3 sites x 300 canaries, 100 steps). The
    audit is testable there (ceiling 3.79 > 3) and must put its bound above 3. The previous
    audit (equal-weight grid, plain spike count) reached 2.63 and 2.85 in two runs of this
    configuration: not caught. Measured with the scaled spike count: 0, 2 and 0 of 780 wide
    guesses wrong (bounds 3.63-3.79); the bound stays above 3.0 up to 9 wrong, so at the
    measured rate (under 1 in 700) a chance failure is far below 1e-6."""
    result = audit_run(tmp_path, divisor=math.inf, target_epsilon=3.0, epochs=10)
    a = result.audit
    assert a is not None and a.claimed_epsilon is not None
    assert 2.9 < a.claimed_epsilon <= 3.0 and a.testable
    assert a.ceiling > 3.7
    assert a.epsilon_lower_bound > a.claimed_epsilon


def _plan(**kw: Any) -> Any:
    from mpcdp.train.planning import plan_training

    args: dict[str, Any] = dict(
        dataset="digits",
        model="mlp:64,128,10",
        parties=PARTIES,
        examples=[479, 479, 480],
        num_params=9610,
        target_epsilon=8.0,
        target_delta=1e-5,
        epochs=20,
        batch_size=64,
        max_grad_norm=1.0,
        audit_canaries=1000,
        audit_kind="white-box",
    )
    args.update(kw)
    return plan_training(**args)


def test_preflight_refuses_to_call_a_claim_of_8_testable_and_says_what_would_be() -> None:
    """The digits audit of the benchmark at claimed epsilon 8 (1,000 canaries per site,
    delta 1e-5, 95%): ceiling 6.27 < 7.96, known before any site is asked; the advice names
    a smaller audited delta and the canaries needed there, more than this model's 9,610
    coordinates allow (no canary count at all helps at 1e-5: the delta term caps it)."""
    from mpcdp.train.audit_run import preflight

    check = preflight(plan=_plan(), delta=None, confidence=0.95)
    assert check.m == 3000 and not check.testable
    assert 6.2 < check.ceiling < 6.35 and 7.9 < check.claimed_epsilon <= 8.0
    text = check.text()
    assert "audit ceiling 6.2" in text and "UNTESTABLE" in text
    advice = check.advice
    assert advice.delta is not None and advice.delta < 1e-5
    assert advice.claimed_at_delta is not None and advice.claimed_at_delta > 8.0
    assert f"audit delta {advice.delta:g}" in text and "per site" in text
    assert advice.delta_canaries is not None and advice.delta_canaries > 9610
    assert "the model has 9610 trainable parameters" in text
    easy = preflight(plan=_plan(target_epsilon=1.0), delta=None, confidence=0.95)
    assert easy.testable and "UNTESTABLE" not in easy.text()
    with pytest.raises(ParameterError, match="plan"):
        preflight(plan=_plan(audit_canaries=0, audit_kind=""), delta=None, confidence=0.95)
    with pytest.raises(ParameterError, match="confidence"):
        preflight(plan=_plan(), delta=None, confidence=1.0)


def test_cli_prints_the_ceiling_and_refuses_an_untestable_audit(tmp_path: Path) -> None:
    """`mpcdp audit` at claimed epsilon 8 with 300 canaries per site: the ceiling and the
    advice are printed before the run, exit 2, and no site charged anything."""
    from typer.testing import CliRunner

    from mpcdp.cli.app import app

    extra = {}
    for i, p in enumerate(PARTIES):
        x, y = example_data(i)
        np.savez(tmp_path / f"{p}-ex.npz", x=x, y=y)
        extra[p] = (
            f'\n[datasets.ex]\npath = "{p}-ex.npz"\nnum_classes = 3\nepsilon = 50\ndelta = 1e-5\n'
        )
    net = build_net(tmp_path, extra=extra)
    try:
        args = [
            "audit", "--federation", str(net.federation), "--dataset", "ex", "--model", MODEL,
            "--canaries", "300", "--epochs", "2", "--batch-size", "18",
        ]  # fmt: skip
        out = CliRunner().invoke(app, [*args, "--target-epsilon", "8"])
        assert out.exit_code == 2, out.output
        assert "audit ceiling" in out.output and "UNTESTABLE" in out.output
        assert "refused before the run" in out.output and "--allow-untestable" in out.output
        for node in net.nodes.values():
            assert node.ledger.status("ex").remaining_epsilon == 50
        ok = CliRunner().invoke(app, [*args, "--target-epsilon", "1", "--json"])
        assert ok.exit_code == 0, ok.output
        assert "audit ceiling" in ok.output and "UNTESTABLE" not in ok.output
    finally:
        net.stop()


def test_python_train_refuses_an_untestable_audit_before_anything_is_charged(
    tmp_path: Path,
) -> None:
    """fed.train, as `mpcdp audit`: claimed epsilon 8 with 300 canaries per site is above
    the audit's ceiling, so the run is refused before any site is asked (every ledger as it
    was); allow_untestable=True runs it anyway, and its result says it was untestable."""
    from mpcdp.train.federated import UntestableAuditError

    extra = {}
    for i, p in enumerate(PARTIES):
        x, y = example_data(i)
        np.savez(tmp_path / f"{p}-ex.npz", x=x, y=y)
        extra[p] = (
            f'\n[datasets.ex]\npath = "{p}-ex.npz"\nnum_classes = 3\nepsilon = 50\ndelta = 1e-5\n'
        )
    net = build_net(tmp_path, extra=extra)
    options: dict[str, Any] = dict(
        dataset="ex",
        model=MODEL,
        target_epsilon=8.0,
        target_delta=1e-5,
        epochs=2,
        batch_size=18,
        audit_canaries=300,
        seed=1,
    )
    try:
        with Federation.from_config(net.federation) as fed:
            with pytest.raises(UntestableAuditError) as info:
                fed.train(**options)
            err = info.value
            assert isinstance(err, ParameterError) and err.name == "audit_canaries"
            assert err.value == 300 and not err.check.testable
            assert err.check.claimed_epsilon >= err.check.ceiling and err.check.m == 900
            assert "audit ceiling" in str(err) and "UNTESTABLE" in str(err)
            assert "nothing was charged" in str(err) and "allow_untestable=True" in str(err)
            for node in net.nodes.values():
                status = node.ledger.status("ex")
                assert status.remaining_epsilon == 50 and status.queries == 0
            result = fed.train(**options, allow_untestable=True)
        a = result.audit
        assert a is not None and a.testable is False and a.m == 900
        for node in net.nodes.values():
            assert node.ledger.status("ex").remaining_epsilon < 50
    finally:
        net.stop()
