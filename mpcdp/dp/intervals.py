"""What an analyst is told about a released DP mean: a value inside the public bounds, a 95%
interval that holds whatever the data, and the std of the released statistic itself.

A DP mean is released as two noisy tensors (protocol/query/plan.py): the centred sum
``S~ = sum (x - mid) + Z_S`` and the count ``N~ = N + Z_N``, each with half the budget; the
mean is ``clamp(mid + S~ / max(N~, 1), lower, upper)``. Clamping to the public bounds is free
post-processing. Everything below uses only public quantities: the released tensors, the
bounds and the noise laws the spec fixes; none of it touches data.

* :func:`mean_interval`: if ``|Z_S| <= a`` and ``|Z_N| <= b``, which holds with probability
  at least 95% when ``a`` and ``b`` are each their noise's 97.5% quantile of ``|Z|`` (union
  bound over the two; the quantiles are estimated from 200,000 draws of the exact noise law,
  within ~1%: the mechanisms' Chernoff tail bounds were 1.8x wider), then the true count lies in
  ``[N~ - b, N~ + b]`` (and is >= 1), the true centred sum in ``[S~ - a, S~ + a]``, and the
  true mean ``mid + S / N`` between the extremes of ``(S~ +- a) / N`` over that count range,
  which are at its ends; intersected with the public bounds. The interval covers the true
  mean in at least 95% of releases, unconditionally: not only when the noisy count
  happens to be large (a "std / noisy count" interval covered it 79% of the time there).
* :func:`simulated_mean_std`: the std of the released mean itself, count noise and
  clamping included, by simulating the release with the released values plugged in for the
  unknown truth (a parametric bootstrap). The simulation's randomness is not private and is
  seeded by the caller (the query id), so the same release always reports the same std.

Nothing happens at import time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp.mechanisms import DiscreteGaussian, DiscreteLaplace, Mechanism, NoNoise, Skellam
from mpcdp.errors import ParameterError

__all__ = [
    "NoiseLaw",
    "mean_interval",
    "noise_law",
    "simulated_mean_std",
    "simulated_mean_stds",
]

#: the interval's level, split evenly between the sum's and the count's noise
LEVEL = 0.95


@dataclass(frozen=True)
class NoiseLaw:
    """The total noise on one released coordinate, in real units: a sampler for simulation
    and the half-width ``tail`` that ``|Z|`` exceeds with probability (1 - LEVEL) / 2."""

    sample: Callable[[np.random.Generator, int], NDArray[np.float64]]
    tail: float


#: draws behind each tail quantile
_TAIL_DRAWS = 200_000


def noise_law(
    mechanism: Mechanism, *, n_parties: int, honest: int, frac_bits: int, seed: int
) -> NoiseLaw:
    """The law of the sum of all ``n_parties`` shares (every party following the protocol),
    scaled to real units by ``2^-frac_bits``; ``seed`` seeds the tail quantile's sample (public
    randomness: the same arguments give the same law, and are cached)."""
    return _noise_law(mechanism, n_parties, honest, frac_bits, seed)  # type: ignore[arg-type]  # frozen dataclasses


@functools.lru_cache(maxsize=64)
def _noise_law(
    mechanism: Mechanism, n_parties: int, honest: int, frac_bits: int, seed: int
) -> NoiseLaw:
    rng = np.random.default_rng(seed)
    unit = 2.0**-frac_bits
    if isinstance(mechanism, NoNoise):
        return NoiseLaw(sample=lambda rng, k: np.zeros(k), tail=0.0)
    sample = _sampler(mechanism, n_parties=n_parties, honest=honest, unit=unit)
    draws = np.abs(sample(rng, _TAIL_DRAWS))
    return NoiseLaw(sample=sample, tail=float(np.quantile(draws, 1 - (1 - LEVEL) / 2)))


def _sampler(
    mechanism: Mechanism, *, n_parties: int, honest: int, unit: float
) -> Callable[[np.random.Generator, int], NDArray[np.float64]]:
    if isinstance(mechanism, DiscreteLaplace):
        # n shares, each a difference of two Polya(1/h, a): the sum is a difference of two
        # negative binomials NB(n/h, 1 - a)
        r, p = n_parties / honest, -math.expm1(-float(mechanism.epsilon) / mechanism.l1_sensitivity)

        def dlap(rng: np.random.Generator, k: int) -> NDArray[np.float64]:
            d = rng.negative_binomial(r, p, size=k) - rng.negative_binomial(r, p, size=k)
            return d.astype(np.float64) * unit

        return dlap
    if isinstance(mechanism, Skellam):
        m = mechanism.total_variance(n_parties=n_parties, honest=honest)

        def skellam(rng: np.random.Generator, k: int) -> NDArray[np.float64]:
            d = rng.poisson(m / 2, size=k) - rng.poisson(m / 2, size=k)
            return d.astype(np.float64) * unit

        return skellam
    if isinstance(mechanism, DiscreteGaussian):
        std = math.sqrt(mechanism.total_variance(n_parties=n_parties, honest=honest)) * unit

        def gauss(rng: np.random.Generator, k: int) -> NDArray[np.float64]:
            return np.round(rng.normal(0.0, std / unit, size=k)) * unit

        return gauss
    raise ParameterError("mechanism", type(mechanism).__name__, "has no known noise law")


def _check_bounds(lower: float, upper: float) -> None:
    if not (math.isfinite(lower) and math.isfinite(upper) and lower <= upper):
        raise ParameterError("bounds", (lower, upper), "must be finite with lower <= upper")


def released_mean(*, centered_sum: float, count: float, lower: float, upper: float) -> float:
    """The mean as released: ``clamp(mid + S~ / max(N~, 1), lower, upper)``."""
    _check_bounds(lower, upper)
    mid = (lower + upper) / 2
    return min(max(mid + centered_sum / max(count, 1.0), lower), upper)


def mean_interval(
    *,
    centered_sum: float,
    count: float,
    sum_tail: float,
    count_tail: float,
    lower: float,
    upper: float,
) -> tuple[float, float]:
    """An interval that contains the true mean whenever both noises are within their tails
    (module docstring), inside ``[lower, upper]``."""
    _check_bounds(lower, upper)
    mid, half = (lower + upper) / 2, (upper - lower) / 2
    n_lo = max(1.0, count - count_tail)
    n_hi = max(n_lo, count + count_tail)
    s_lo, s_hi = centered_sum - sum_tail, centered_sum + sum_tail
    lo = min(s_lo / n_lo, s_lo / n_hi)
    hi = max(s_hi / n_lo, s_hi / n_hi)
    return mid + min(max(lo, -half), half), mid + min(max(hi, -half), half)


def simulated_mean_std(
    *,
    mean: float,
    count: float,
    sum_noise: NoiseLaw,
    count_noise: NoiseLaw,
    lower: float,
    upper: float,
    rng: np.random.Generator,
    draws: int = 4000,
) -> float:
    """Std of the released mean (count noise and clamping included), simulated with the
    released ``mean`` and ``count`` standing in for the truth."""
    return float(
        simulated_mean_stds(
            means=np.array([mean]),
            counts=np.array([count]),
            sum_noise=sum_noise,
            count_noise=count_noise,
            lower=lower,
            upper=upper,
            rng=rng,
            draws=draws,
        )[0]
    )


def simulated_mean_stds(
    *,
    means: NDArray[np.float64],
    counts: NDArray[np.float64],
    sum_noise: NoiseLaw,
    count_noise: NoiseLaw,
    lower: float,
    upper: float,
    rng: np.random.Generator,
    draws: int = 4000,
) -> NDArray[np.float64]:
    """:func:`simulated_mean_std` of many released means at once (one per cell of a
    query), in slices of cells so the simulation's memory stays small."""
    _check_bounds(lower, upper)
    mid = (lower + upper) / 2
    out = np.empty(len(means))
    step = max(1, (1 << 20) // draws)
    for a in range(0, len(means), step):
        n = np.maximum(np.round(np.asarray(counts[a : a + step], dtype=np.float64)), 1.0)
        s = n * (np.asarray(means[a : a + step], dtype=np.float64) - mid)
        k = len(n)
        sums = s[:, None] + sum_noise.sample(rng, k * draws).reshape(k, draws)
        noisy = np.maximum(n[:, None] + count_noise.sample(rng, k * draws).reshape(k, draws), 1.0)
        out[a : a + k] = np.std(np.clip(mid + sums / noisy, lower, upper), axis=1)
    return out
