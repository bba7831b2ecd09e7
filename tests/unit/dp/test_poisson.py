"""The Poisson sampler (mpcdp.dp.poisson) and the samplers built on it, at the edges of their
stated exact ranges, and the power of the same tests against numpy's Poisson sampler where
it is known to fail (variance at 3.6e14, a lattice of multiples of 128 above 2^53).

Chance failure: every check uses alpha = 1e-8 and no test makes more than 20 checks, so a
test fails by chance with probability below 2e-7 (< 1e-6). The power checks assert p-values
below 1e-8 where the measured effect gives p < 1e-100.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mpcdp.dp import poisson as P
from mpcdp.dp import samplers
from mpcdp.errors import ParameterError
from mpcdp.mpc.rng import csprng
from tests.stats import chi_square_pvalue, total_of

N = 200_000
CHECK_ALPHA = 1e-8


def rng(tag: int) -> np.random.Generator:
    return csprng(key=tag.to_bytes(16, "little"))


def mean_var_pvalues(
    x: np.ndarray, mean: float, var: float, excess_kurtosis: float
) -> tuple[float, float]:
    """Two-sided p-values of the sample mean and variance (normal approximations: the sample
    variance's std is var * sqrt((2 + excess kurtosis) / n))."""
    n = x.size
    xf = x.astype(np.float64)
    m = float(xf.mean())
    z_mean = (m - mean) / math.sqrt(var / n)
    v = float(((xf - m) ** 2).mean())
    z_var = (v / var - 1.0) / math.sqrt((2.0 + excess_kurtosis) / n)
    return float(2 * stats.norm.sf(abs(z_mean))), float(2 * stats.norm.sf(abs(z_var)))


def lattice_pvalue(x: np.ndarray, modulus: int = 128) -> float:
    """Chi-square of x mod 128 against uniform: a sampler that returns multiples of 2^j (or
    favours residues) fails it; a law with std >> 128 passes it."""
    counts = np.bincount(np.mod(x, modulus), minlength=modulus)
    return float(stats.chisquare(counts).pvalue)


def ks_pvalue(x: np.ndarray, cdf: object) -> float:
    """KS against a (near-continuous) cdf; ties make it conservative, never anti-conservative."""
    return float(stats.kstest(x, cdf).pvalue)  # type: ignore[arg-type]


def poisson_pvalues(x: np.ndarray, lam: float) -> dict[str, float]:
    p_mean, p_var = mean_var_pvalues(x, lam, lam, 1.0 / lam)
    out = {"mean": p_mean, "var": p_var}
    if lam < 1e4:
        out["law"] = chi_square_pvalue(x, lambda k: stats.poisson.pmf(k, lam))
    else:
        out["law"] = ks_pvalue(x, lambda k: stats.poisson.cdf(k, lam))
    if lam >= 1e5:
        out["lattice"] = lattice_pvalue(x)
    return out


EDGES = [
    0.0,
    1e-3,
    0.5,
    9.999,  # last rate of the inversion branch
    10.0,  # first rate of PTRS
    11.7,
    150.5,
    1e4 + 0.3,
    2.0**30 + 0.5,
    P.POISSON_MAX_LAM,  # top of one PTRS draw
    P.POISSON_MAX_LAM * 1.5,  # two summed draws
]


@pytest.mark.parametrize("lam", EDGES)
def test_poisson_law_inside_the_range(lam: float) -> None:
    x = P.poisson(lam=lam, size=N, rng=rng(int(lam * 7) % 1000 + 1))
    assert x.dtype == np.int64 and x.shape == (N,)
    if lam == 0.0:
        assert not x.any()
        return
    pvalues = poisson_pvalues(x, lam)
    assert min(pvalues.values()) > CHECK_ALPHA, pvalues


def test_poisson_law_at_the_top_of_the_range() -> None:
    """2^46: 64 summed draws of 2^40 each."""
    lam = P.POISSON_SPLIT_MAX_LAM
    x = P.poisson(lam=lam, size=N, rng=rng(2))
    pvalues = poisson_pvalues(x, lam)
    assert min(pvalues.values()) > CHECK_ALPHA, pvalues


def test_the_law_test_has_power_where_numpy_fails() -> None:
    """The same checks reject numpy's sampler at the rates the review measured: the variance
    at 3.588e14 and the lattice above 2^53 (each p < 1e-100 here)."""
    g = rng(3)
    bad_variance = poisson_pvalues(g.poisson(3.588e14, N), 3.588e14)
    assert bad_variance["var"] < CHECK_ALPHA and bad_variance["law"] < CHECK_ALPHA
    lattice = g.poisson(2.0**55, N)
    assert lattice_pvalue(lattice) < CHECK_ALPHA
    # ours, at the same rate, refuses instead
    with pytest.raises(ParameterError, match="exact range"):
        P.poisson(lam=3.588e14, size=3, rng=g)


@pytest.mark.sweep
def test_the_law_test_detects_numpy_at_1e13_and_ours_passes() -> None:
    """The review's subtlest failure (variance 1.0018 lam at 1e13): KS over 4e6 draws sees
    numpy's distortion (p ~ 1e-11 measured) and not ours (ten summed draws of 1e12)."""
    g = rng(4)
    n = 4_000_000
    cdf = lambda k: stats.poisson.cdf(k, 1e13)  # noqa: E731
    assert ks_pvalue(g.poisson(1e13, n), cdf) < 1e-6
    assert ks_pvalue(P.poisson(lam=1e13, size=n, rng=g), cdf) > CHECK_ALPHA


def test_per_draw_rates_follow_their_own_laws() -> None:
    """An array of rates (the Polya path): each draw has its own rate; the standardised
    draws are N(0, 1) and rates above 2^40 take the summed path."""
    g = rng(5)
    rates = np.concatenate(
        [np.full(N // 4, 3.5), np.full(N // 4, 42.0), np.full(N // 4, 2.0**33), [2.0**41] * 8]
    )
    x = P.poisson(lam=rates, size=rates.size, rng=g)
    for lo, hi, lam in [(0, N // 4, 3.5), (N // 4, N // 2, 42.0), (N // 2, 3 * N // 4, 2.0**33)]:
        p = poisson_pvalues(x[lo:hi], lam)
        assert min(p.values()) > CHECK_ALPHA, (lam, p)
    z = (x[-8:] - 2.0**41) / math.sqrt(2.0**41)
    assert np.all(np.abs(z) < 7)


@pytest.mark.parametrize(
    "lam", [-1.0, math.nan, math.inf, P.POISSON_SPLIT_MAX_LAM * 1.0001, 2.0**55]
)
def test_rates_outside_the_range_are_refused(lam: float) -> None:
    with pytest.raises(ParameterError, match="lam"):
        P.poisson(lam=lam, size=3, rng=rng(6))
    with pytest.raises(ParameterError, match="lam"):
        P.poisson(lam=np.array([1.0, lam]), size=2, rng=rng(6))
    with pytest.raises(ParameterError, match="size"):
        P.poisson(lam=1.0, size=-1)
    with pytest.raises(ParameterError, match="shape"):
        P.poisson(lam=np.ones(3), size=2)


def test_skellam_at_the_top_of_its_range() -> None:
    mu = samplers.SKELLAM_MAX_MU / 64  # one PTRS draw per Poisson: 2^41 / 2 = 2^40
    x = samplers.skellam(mu=mu, size=N, rng=rng(7))
    p_mean, p_var = mean_var_pvalues(x, 0.0, mu, 1.0 / mu)
    assert p_mean > CHECK_ALPHA and p_var > CHECK_ALPHA
    # Skellam(2^41) is normal to within its excess kurtosis 1/mu
    assert ks_pvalue(x / math.sqrt(mu), stats.norm.cdf) > CHECK_ALPHA
    assert lattice_pvalue(x) > CHECK_ALPHA
    with pytest.raises(ParameterError, match="exact range"):
        samplers.skellam(mu=samplers.SKELLAM_MAX_MU * 1.01, size=3)


def dlap_cdf(scale: float) -> object:
    """CDF of DLap(scale) (pmf proportional to a^|k|, a = exp(-1/scale)), without
    cancellation."""
    s = 1.0 / scale
    one_plus_a = 1.0 + math.exp(-s)

    def cdf(k: np.ndarray) -> np.ndarray:
        k = np.floor(np.asarray(k, dtype=np.float64))
        pos = 1.0 - np.exp(-s * (k + 1)) / one_plus_a
        neg = np.exp(-s * (-k)) / one_plus_a
        out: np.ndarray = np.where(k >= 0, pos, neg)
        return out

    return cdf


@pytest.mark.parametrize("h", [1, 2, 3])
def test_discrete_laplace_shares_at_the_top_of_their_range(h: int) -> None:
    """h Polya shares of scale 2^40 sum to DLap(2^40); no 1 - a cancellation (with a
    rounded to 1 - 2^-53 the law would be far wider or narrower)."""
    scale = samplers.DLAP_SHARE_MAX_SCALE
    g = rng(8 + h)
    total = total_of(
        samplers.discrete_laplace_share(scale=scale, honest=h, size=N, rng=g) for _ in range(h)
    )
    assert ks_pvalue(total, dlap_cdf(scale)) > CHECK_ALPHA
    # DLap(t): variance 2a / (1 - a)^2 ~ 2 t^2, excess kurtosis ~3 (Laplace)
    p_mean, p_var = mean_var_pvalues(total, 0.0, 2 * scale * scale, 3.0)
    assert p_mean > CHECK_ALPHA
    assert p_var > CHECK_ALPHA
    assert lattice_pvalue(total) > CHECK_ALPHA


def test_discrete_laplace_and_gaussian_at_the_top_of_their_ranges() -> None:
    g = rng(12)
    scale = samplers.DLAP_MAX_SCALE
    x = samplers.discrete_laplace(scale=scale, size=N, rng=g)
    assert ks_pvalue(x, dlap_cdf(scale)) > CHECK_ALPHA
    assert lattice_pvalue(x) > CHECK_ALPHA
    sigma = samplers.DGAUSS_MAX_SIGMA * (1 - 1e-9)
    y = samplers.discrete_gaussian(sigma=sigma, size=N, rng=g)
    assert ks_pvalue(y / sigma, stats.norm.cdf) > CHECK_ALPHA
    assert lattice_pvalue(y) > CHECK_ALPHA
