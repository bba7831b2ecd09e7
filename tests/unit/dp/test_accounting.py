"""Privacy accounting (mpcdp.dp.accountant, rdp, events): subsampled RDP bounds against
dp-accounting and exact sums, composition, calibration, strict event decoding."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Literal

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dpa

from mpcdp.dp import accountant, events, rdp
from mpcdp.errors import DecodeError, ParameterError

ORDERS = rdp.DEFAULT_ORDERS


def _dp_accounting_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = dpa.RdpAccountant(orders=list(ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta"),
    [
        (0.01, 1.1, 1000, 1e-5),
        (0.004, 0.8, 10_000, 1e-6),
        (0.1, 2.0, 50, 1e-5),
        (1.0, 5.0, 3, 1e-6),
        (0.05, 1.0, 1, 1e-3),
        (0.256, 0.6, 300, 1e-5),
    ],
)
def test_subsampled_gaussian_matches_dp_accounting(
    q: float, sigma: float, steps: int, delta: float
) -> None:
    ours = accountant.compose(
        [events.SubsampledGaussian(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=delta
    ).epsilon
    theirs = _dp_accounting_epsilon(q, sigma, steps, delta)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_subsampling_bound_dominates_both_exact_directions_for_skellam() -> None:
    """1-D Skellam(mu) against its shift by D: the exact add and remove divergences of the
    Poisson-subsampled pair, summed over the pmf, must stay below rdp.poisson_subsampled."""
    from scipy import special, stats

    mu, shift = 60.0, 4
    k = np.arange(-150, 151)  # the pmf beyond is below 1e-40: negligible in every sum here
    p = stats.skellam.pmf(k, mu / 2, mu / 2)
    qq = stats.skellam.pmf(k - shift, mu / 2, mu / 2)
    assert p.min() > 0 and qq.min() > 0
    orders = tuple(range(2, 25))
    for rate in (0.02, 0.1, 0.4):
        mix = (1 - rate) * p + rate * qq
        bound = rdp.poisson_subsampled(
            lambda a: float(
                rdp.skellam(mu=mu, l1_sensitivity=shift, l2_sensitivity=shift, orders=(a,))[0]
            ),
            sample_rate=rate,
            orders=orders,
        )
        for a, b in zip(orders, bound, strict=True):
            lp, lm = np.log(p), np.log(mix)
            add = special.logsumexp(a * lm + (1 - a) * lp) / (a - 1)
            remove = special.logsumexp(a * lp + (1 - a) * lm) / (a - 1)
            assert max(add, remove) <= b + 1e-12, (rate, a)


def _gaussian_rdp(sigma: float) -> Callable[[int], float]:
    """The Gaussian mechanism's RDP at order a, noise multiplier sigma: a / (2 sigma^2)."""
    return lambda a: a / (2 * sigma * sigma)


def test_subsampling_bound_vanishes_with_the_noise_and_is_tight_for_the_gaussian() -> None:
    # a bound with a floor (Zhu-Wang's general one) made small epsilons unreachable
    huge = rdp.poisson_subsampled(lambda a: a / (2 * 1e4**2), sample_rate=0.05)
    assert np.all(huge < 2e-6)
    for q, sigma in [(0.0445, 1.65), (0.01, 1.0), (0.1, 2.0)]:
        exact = rdp.subsampled_gaussian(sample_rate=q, noise_multiplier=sigma)
        bound = rdp.poisson_subsampled(_gaussian_rdp(sigma), sample_rate=q)
        e_exact, _ = rdp.to_epsilon(orders=ORDERS, rdp=500 * exact, delta=1e-5)
        e_bound, _ = rdp.to_epsilon(orders=ORDERS, rdp=500 * bound, delta=1e-5)
        # equal where the add direction dominates (the first two); the remove term's bound
        # costs up to ~6% at q = 0.1, z = 2
        assert e_exact <= e_bound <= 1.1 * e_exact


def test_subsampling_bound_is_valid_and_reasonably_tight_for_the_gaussian() -> None:
    for q, sigma in [(0.01, 1.0), (0.1, 2.0), (0.3, 0.9)]:
        exact = rdp.subsampled_gaussian(sample_rate=q, noise_multiplier=sigma)
        bound = rdp.poisson_subsampled(_gaussian_rdp(sigma), sample_rate=q)
        assert np.all(bound >= exact - 1e-12)
        small = ORDERS.index(8)
        assert bound[small] <= 3 * exact[small] + 1e-9
    full = rdp.poisson_subsampled(lambda a: a / 2.0, sample_rate=1.0)
    assert np.allclose(full, rdp.gaussian(noise_multiplier=1.0))


def test_skellam_matches_closed_form() -> None:
    mu, d1, d2 = 5000.0, 120.0, 40.0
    curve = rdp.skellam(mu=mu, l1_sensitivity=d1, l2_sensitivity=d2, orders=(2, 7, 33))
    for a, value in zip((2, 7, 33), curve, strict=False):
        closed = a * d2**2 / (2 * mu) + min(
            ((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu)
        )
        assert value == pytest.approx(closed, rel=1e-15)


def test_skellam_approaches_gaussian_for_large_mu() -> None:
    d2 = 1000.0
    z = 1.2
    skel = accountant.compose(
        [
            events.Skellam(
                mu=(z * d2) ** 2, l1_sensitivity=d2**2, l2_sensitivity=d2, sample_rate=1.0, steps=10
            )
        ],
        delta=1e-5,
    ).epsilon
    gauss = accountant.compose(
        [events.SubsampledGaussian(noise_multiplier=z, sample_rate=1.0, steps=10)], delta=1e-5
    ).epsilon
    assert gauss <= skel <= gauss * 1.01


def test_distributed_discrete_gaussian_with_one_share_is_gaussian() -> None:
    curve = rdp.distributed_discrete_gaussian(
        share_sigma=3.0, honest=1, l1_sensitivity=4.0, l2_sensitivity=2.0, dim=10
    )
    assert np.allclose(curve, rdp.gaussian(noise_multiplier=1.5))
    more = rdp.distributed_discrete_gaussian(
        share_sigma=3.0 / math.sqrt(2), honest=2, l1_sensitivity=4.0, l2_sensitivity=2.0, dim=10
    )
    assert np.all(more >= curve)  # tau > 0 only ever adds


def test_pure_epsilon_composes_exactly() -> None:
    spent = accountant.compose([events.PureDp(epsilon=events.exact_epsilon(0.1))] * 10, delta=1e-6)
    assert spent.pure_epsilon == Fraction(1)
    assert spent.epsilon == 1.0
    assert sum([0.1] * 10) != 1.0  # what float addition would have done


def test_mixed_composition_is_basic_composition() -> None:
    g = events.SubsampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    alone = accountant.compose([g], delta=1e-5).epsilon
    both = accountant.compose(
        [g, events.PureDp(epsilon=Fraction(1, 2)), events.Exact()], delta=1e-5
    )
    assert both.epsilon == pytest.approx(alone + 0.5)
    assert both.exact_releases == 1


def test_stateful_accountant() -> None:
    acc = accountant.Accountant()
    for _ in range(3):
        acc.record(events.SubsampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=100))
    one = events.SubsampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=300)
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(
        accountant.compose([one], delta=1e-5).epsilon
    )


@pytest.mark.parametrize("mechanism", ["gaussian", "skellam"])
@pytest.mark.parametrize(
    ("target", "q", "steps"), [(1.0, 0.01, 1000), (3.0, 0.05, 500), (8.0, 0.2, 100)]
)
def test_noise_multiplier_calibration(
    mechanism: Literal["gaussian", "skellam"], target: float, q: float, steps: int
) -> None:
    z = accountant.get_noise_multiplier(
        target_epsilon=target,
        target_delta=1e-5,
        sample_rate=q,
        steps=steps,
        mechanism=mechanism,
        l2_sensitivity=1000.0,
    )
    if mechanism == "gaussian":
        eps = _dp_accounting_epsilon(q, z, steps, 1e-5)
    else:
        eps = accountant.compose(
            [
                events.Skellam(
                    mu=(z * 1000) ** 2,
                    l1_sensitivity=1e6,
                    l2_sensitivity=1000.0,
                    sample_rate=q,
                    steps=steps,
                )
            ],
            delta=1e-5,
        ).epsilon
    assert target * 0.99 <= eps <= target


def test_calibration_errors() -> None:
    with pytest.raises(ParameterError, match="target_delta"):
        accountant.get_noise_multiplier(
            target_epsilon=1.0, target_delta=0.0, sample_rate=0.1, steps=1
        )
    with pytest.raises(ParameterError, match="mechanism"):
        accountant.get_noise_multiplier(
            target_epsilon=1.0,
            target_delta=1e-5,
            sample_rate=0.1,
            steps=1,
            mechanism="laplace",  # type: ignore[arg-type]
        )


@pytest.mark.parametrize(
    "event",
    [
        events.PureDp(epsilon=Fraction(1, 3)),
        events.SubsampledGaussian(noise_multiplier=1.1, sample_rate=0.01, steps=7),
        events.Skellam(mu=1e4, l1_sensitivity=100.0, l2_sensitivity=10.0),
        events.DistributedDiscreteGaussian(
            share_sigma=4.0, honest=3, l1_sensitivity=9.0, l2_sensitivity=3.0, dim=5
        ),
        events.Exact(),
    ],
)
def test_event_json_round_trip(event: events.Event) -> None:
    assert events.decode_event(events.encode_event(event)) == event


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"kind": "laplace", "epsilon": "1"}',
        '{"kind": "pure"}',
        '{"kind": "pure", "epsilon": "1", "extra": 1}',
        '{"kind": "pure", "epsilon": 0.5}',
        '{"kind": "skellam", "mu": -1, "l1_sensitivity": 1, "l2_sensitivity": 1,'
        ' "sample_rate": 1, "steps": 1}',
    ],
)
def test_event_decoder_is_strict(text: str) -> None:
    with pytest.raises(DecodeError):
        events.decode_event(text)


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "abc", True])
def test_epsilon_must_be_positive_finite(bad: object) -> None:
    with pytest.raises(ParameterError, match="epsilon"):
        events.exact_epsilon(bad)


def test_float_epsilons_become_their_decimal_value() -> None:
    assert events.exact_epsilon(0.1) == Fraction(1, 10)
    assert events.exact_epsilon("0.3") == Fraction(3, 10)


@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_rdp_to_epsilon_matches_dp_accounting(delta: float) -> None:
    ours_orders = list(ORDERS)
    for curve in (
        rdp.subsampled_gaussian(sample_rate=0.01, noise_multiplier=1.1) * 1000,
        rdp.skellam(mu=1e4, l1_sensitivity=300.0, l2_sensitivity=100.0),
        rdp.gaussian(noise_multiplier=50.0),  # tiny RDP: the KL branch gives 0
        np.full(len(ORDERS), 1e6),
    ):
        ours = rdp.to_epsilon(orders=ours_orders, rdp=curve, delta=delta)
        theirs = dpa.compute_epsilon(ours_orders, list(curve), delta)
        assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-12, abs=1e-12)
        assert ours[1] == theirs[1]
