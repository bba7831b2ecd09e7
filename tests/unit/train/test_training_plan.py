"""The accountant of a training run (mpcdp.train.federated.plan_training): the planned
noise meets the target epsilon and matches dp-accounting; bad parameters are refused."""

from __future__ import annotations

import dataclasses
import math

import pytest

pytest.importorskip("torch")


from mpcdp.dp import accountant, rdp
from mpcdp.errors import (
    ParameterError,
)
from mpcdp.protocol.training import (
    sensitivities,
    step_event,
)
from mpcdp.train.federated import plan_training
from tests.conftest import PARTIES
from tests.training_support import MODEL


def test_plan_meets_the_target_epsilon_and_matches_dp_accounting() -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    plan = plan_training(
        dataset="ex",
        model="mlp:64,128,10",
        parties=PARTIES,
        examples=[480, 479, 479],
        num_params=9610,
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=20,
        batch_size=64,
        max_grad_norm=1.0,
    )
    eps = plan.epsilon_after(plan.steps)
    assert 3.0 * 0.99 <= eps <= 3.0
    assert eps == pytest.approx(
        accountant.compose(
            [step_event(plan.spec(run_id="r", start_step=0, steps=plan.steps), steps=plan.steps)],
            delta=1e-5,
        ).epsilon,
        rel=1e-9,
    )
    # At this scale Skellam(mu) is a Gaussian of std sqrt(mu) per Delta_2 = z. dp-accounting
    # knows the Gaussian: without subsampling the two accountants agree to 0.5%; with Poisson
    # subsampling ours applies a bound for a general mechanism (mpcdp.dp.rdp), so it may only be
    # above dp-accounting's exact subsampled-Gaussian value (never below: that would be a bug).
    l2, _ = sensitivities(max_grad_norm=1.0, scale_bits=plan.scale_bits, num_params=9610)
    z = math.sqrt(plan.mu) / l2
    orders = [float(a) for a in rdp.DEFAULT_ORDERS]
    full = dp_accounting.rdp.RdpAccountant(orders)
    full.compose(dp_accounting.GaussianDpEvent(z), 40)
    ours_full = accountant.compose(
        [
            step_event(
                dataclasses.replace(plan.spec(run_id="r", start_step=0, steps=1), sample_rate=1.0),
                steps=40,
            )
        ],
        delta=1e-5,
    ).epsilon
    assert ours_full == pytest.approx(full.get_epsilon(1e-5), rel=5e-3)
    sampled = dp_accounting.rdp.RdpAccountant(orders)
    sampled.compose(
        dp_accounting.PoissonSampledDpEvent(plan.sample_rate, dp_accounting.GaussianDpEvent(z)),
        plan.steps,
    )
    assert sampled.get_epsilon(1e-5) <= eps
    assert plan.noise_multiplier == pytest.approx(z)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_epsilon", 0.0),
        ("target_delta", 1.0),
        ("epochs", -1.0),
        ("batch_size", 0),
        ("batch_size", 10_000),
        ("max_grad_norm", float("inf")),
    ],
)
def test_plan_refuses_bad_parameters(field: str, value: object) -> None:
    kw: dict[str, object] = dict(
        dataset="ex",
        model=MODEL,
        parties=PARTIES,
        examples=[40, 40, 40],
        num_params=75,
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=2,
        batch_size=10,
        max_grad_norm=1.0,
    )
    kw[field] = value
    with pytest.raises(ParameterError, match=field):
        plan_training(**kw)  # type: ignore[arg-type]
