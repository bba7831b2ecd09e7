"""Distribution tests at alpha = 1e-6 for every sampler and for sums of h simulated shares."""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from mpcdp.dp import mechanisms, randomized_response, samplers
from mpcdp.errors import ParameterError
from mpcdp.mpc.rng import csprng
from tests.stats import ALPHA, chi_square_pvalue, discrete_gaussian_pmf, dlap_pmf, total_of

N = 200_000


def rng(tag: int) -> np.random.Generator:
    return csprng(key=tag.to_bytes(16, "little"))


def decay(scale: float) -> float:
    return math.exp(-1 / scale)


@pytest.mark.parametrize("scale", [1 / math.log(1 / 0.3), 1 / math.log(1 / 0.8), 20.0])
def test_discrete_laplace(scale: float) -> None:
    x = samplers.discrete_laplace(scale=scale, size=N, rng=rng(1))
    assert chi_square_pvalue(x, dlap_pmf(decay(scale))) > ALPHA


@pytest.mark.parametrize(("r", "scale"), [(1.0, 1 / math.log(2)), (1 / 3, 9.49), (0.2, 99.5)])
def test_polya_is_negative_binomial(r: float, scale: float) -> None:
    x = samplers.polya(r=r, scale=scale, size=N, rng=rng(2))
    p = -math.expm1(-1 / scale)
    assert chi_square_pvalue(x, lambda k: stats.nbinom.pmf(k, r, p)) > ALPHA


@pytest.mark.parametrize("h", [1, 2, 3, 5])
@pytest.mark.parametrize("scale", [1 / math.log(2), 10.0])
def test_sum_of_h_polya_shares_is_discrete_laplace(h: int, scale: float) -> None:
    g = rng(3)
    total = total_of(
        samplers.discrete_laplace_share(scale=scale, honest=h, size=N, rng=g) for _ in range(h)
    )
    assert chi_square_pvalue(total, dlap_pmf(decay(scale))) > ALPHA


def test_distribution_test_has_power_against_shares_sized_for_n() -> None:
    """Shares sized for n = 5 instead of h = 3: three of them must fail the DLap test."""
    g = rng(4)
    total = total_of(
        samplers.discrete_laplace_share(scale=10.0, honest=5, size=N, rng=g) for _ in range(3)
    )
    assert chi_square_pvalue(total, dlap_pmf(decay(10.0))) < ALPHA


@pytest.mark.parametrize("mu", [0.5, 10.0, 400.0])
def test_skellam(mu: float) -> None:
    x = samplers.skellam(mu=mu, size=N, rng=rng(5))
    assert chi_square_pvalue(x, lambda k: stats.skellam.pmf(k, mu / 2, mu / 2)) > ALPHA


@pytest.mark.parametrize("h", [2, 3, 7])
def test_sum_of_h_skellam_shares_is_skellam_mu(h: int) -> None:
    mu = 300.0
    mech = mechanisms.Skellam(mu=mu, l1_sensitivity=10.0, l2_sensitivity=10.0)
    g = rng(6)
    total = total_of(mech.share(size=N, honest=h, rng=g) for _ in range(h))
    assert chi_square_pvalue(total, lambda k: stats.skellam.pmf(k, mu / 2, mu / 2)) > ALPHA
    # and a wrong mu is rejected
    assert chi_square_pvalue(total, lambda k: stats.skellam.pmf(k, mu / 2.4, mu / 2.4)) < ALPHA


@pytest.mark.parametrize("sigma", [0.7, 3.0, 25.5])
def test_discrete_gaussian_vectorised(sigma: float) -> None:
    x = samplers.discrete_gaussian(sigma=sigma, size=N, rng=rng(7))
    assert chi_square_pvalue(x, discrete_gaussian_pmf(sigma)) > ALPHA


@pytest.mark.parametrize("sigma2", [Fraction(1, 2), Fraction(9), Fraction(401, 4)])
def test_discrete_gaussian_exact_scalar(sigma2: Fraction) -> None:
    g = rng(8)
    x = np.array([samplers.discrete_gaussian_exact(sigma2=sigma2, rng=g) for _ in range(5000)])
    assert chi_square_pvalue(x, discrete_gaussian_pmf(math.sqrt(sigma2))) > ALPHA


def test_exact_sampler_handles_huge_variance() -> None:
    x = samplers.discrete_gaussian_exact(sigma2=10**40, rng=rng(9))
    assert abs(x) < 10**22


def test_sum_of_discrete_gaussian_shares_has_target_variance() -> None:
    mech = mechanisms.DiscreteGaussian(
        sigma=12.0, l1_sensitivity=1, l2_sensitivity=1, dim=1, honest=3
    )
    g = rng(10)
    total = total_of(mech.share(size=N, honest=3, rng=g) for _ in range(3))
    # KLS21: the sum is close to N_Z(0, 144); compare with the exact law by chi-square
    assert chi_square_pvalue(total, discrete_gaussian_pmf(12.0)) > ALPHA
    with pytest.raises(ParameterError, match="share std"):
        mechanisms.DiscreteGaussian(sigma=3.0, l1_sensitivity=1, l2_sensitivity=1, dim=1, honest=3)


def test_randomized_response_matches_article_and_debiases() -> None:
    eps = math.log(3)  # the two-fair-coins poll of the article
    assert randomized_response.truth_probability(epsilon=eps) == pytest.approx(0.5)
    p = 0.3
    n = 400_000
    g = rng(11)
    bits = (g.random(n) < p).astype(np.uint8)
    reports = randomized_response.randomize(bits, epsilon=eps, rng=g)
    ones = int(reports.sum())
    # E[N/n] = p/2 + 1/4
    assert stats.binomtest(ones, n, p=bits.mean() / 2 + 0.25).pvalue > ALPHA
    est = randomized_response.estimate(ones=ones, respondents=n, epsilon=eps)
    assert est.fraction == pytest.approx(2 * ones / n - 0.5)
    assert abs(est.fraction - bits.mean()) < 5 * est.std_error
    with pytest.raises(ParameterError, match="bits"):
        randomized_response.randomize([0, 1, 2], epsilon=1.0)
    with pytest.raises(ParameterError, match="ones"):
        randomized_response.estimate(ones=5, respondents=4, epsilon=1.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: samplers.skellam(mu=-1.0, size=3),
        lambda: samplers.skellam(mu=math.nan, size=3),
        lambda: samplers.discrete_laplace(scale=math.inf, size=3),
        lambda: samplers.discrete_laplace(scale=2.0**21, size=3),
        lambda: samplers.polya(r=0.0, scale=1.0, size=3),
        lambda: samplers.polya(r=0.5, scale=2.0**41, size=3),
        lambda: samplers.skellam(mu=2.0**48, size=3),
        lambda: samplers.discrete_gaussian(sigma=2.0**21, size=3),
        lambda: samplers.discrete_gaussian(sigma=0.0, size=3),
        lambda: samplers.discrete_gaussian_exact(sigma2=0),
        lambda: samplers.skellam(mu=1.0, size=-1),
        lambda: samplers.discrete_laplace_share(scale=1.0, honest=0, size=3),
    ],
)
def test_sampler_parameter_errors(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError):
        call()


def test_tail_bounds_cover_the_simulated_total() -> None:
    g = rng(12)
    for mech in (
        mechanisms.DiscreteLaplace(epsilon=0.5, l1_sensitivity=100),
        mechanisms.Skellam(mu=1e6, l1_sensitivity=1.0, l2_sensitivity=1.0),
        mechanisms.DiscreteGaussian(
            sigma=50.0, l1_sensitivity=1, l2_sensitivity=1, dim=1, honest=4
        ),
    ):
        h = 4
        total = total_of(mech.share(size=N, honest=h, rng=g) for _ in range(5))
        tail = mech.tail_bound(n_parties=5, honest=h)
        sd = math.sqrt(mech.total_variance(n_parties=5, honest=h))
        assert np.abs(total).max() < tail
        assert abs(total.std() / sd - 1) < 0.02
        # 2^-64 tails are some 9-10 standard deviations out; the bound must not be absurd
        assert tail < 40 * sd


def test_shares_drawn_in_parallel_slices_keep_the_law_and_do_not_depend_on_scheduling() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mpcdp.protocol.noise_pool import fill_in_slices

    mu, h = 300.0, 3
    mech = mechanisms.Skellam(mu=mu, l1_sensitivity=10.0, l2_sensitivity=10.0)

    def share(g: np.random.Generator, workers: ThreadPoolExecutor | None) -> np.ndarray:
        out = np.empty(N, dtype=np.int64)

        def fill(a: int, b: int, gen: np.random.Generator) -> None:
            out[a:b] = mech.share(size=b - a, honest=h, rng=gen)

        fill_in_slices(size=N, slice_size=N // 7 + 1, rng=g, fill=fill, workers=workers)
        return out

    with ThreadPoolExecutor(4) as pool:
        parallel = [share(rng(7 + i), pool) for i in range(h)]
    serial = [share(rng(7 + i), None) for i in range(h)]
    assert all(np.array_equal(p, s) for p, s in zip(parallel, serial, strict=True))
    total = total_of(parallel)
    assert chi_square_pvalue(total, lambda k: stats.skellam.pmf(k, mu / 2, mu / 2)) > ALPHA
    # the slices are independent streams, not copies of one
    assert not np.array_equal(parallel[0][: N // 7], parallel[0][N // 7 + 1 : 2 * (N // 7) + 1])


def test_noise_threads_follow_the_cores_and_omp_num_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mpcdp.protocol.noise_pool import default_noise_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_noise_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= default_noise_threads() <= 8


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_background_builds_run_at_lower_priority_and_misses_do_not() -> None:
    """What a pool builds ahead runs below the request path (module docstring of
    noise_pool); a miss, built for a waiting request, does not."""
    import os
    import threading
    from concurrent.futures import Executor

    from mpcdp.protocol.noise_pool import BACKGROUND_NICE, NoisePool

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice()
    seen: dict[str, list[int]] = {"bg": [], "fg": []}

    def builder(label: str) -> object:
        def build(g: np.random.Generator, workers: Executor) -> np.ndarray:
            seen[label].append(nice())
            seen[label].extend(workers.map(lambda _: nice(), range(4)))
            return np.zeros(4, dtype=np.uint64)

        return build

    pool = NoisePool(rng=rng(1), threads=2)
    try:
        pool.prepare("k", builder("bg"), nbytes=32)  # type: ignore[arg-type]
        pool._ready["k"][1].result()  # built in the background (a take now would help it)
        assert pool.take("k", builder("unused")).size == 4  # type: ignore[arg-type]
        assert pool.take("other", builder("fg")).size == 4  # type: ignore[arg-type]
    finally:
        pool.close()
    assert pool.hits == 1 and pool.misses == 1
    assert seen["bg"] == [min(19, base + BACKGROUND_NICE)] * 5
    assert seen["fg"] == [base] * 5
