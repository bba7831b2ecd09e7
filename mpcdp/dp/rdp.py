"""Rényi-DP curves of the mechanisms mpcdp releases with, at integer orders.

Pure functions: each returns eps(alpha) for every alpha in ``orders`` as a float64 array.

- Gaussian, sensitivity 1, noise multiplier z: eps(alpha) = alpha / (2 z^2) (Mironov 2017,
  Prop. 7).
- Poisson-subsampled Gaussian, exact at integer alpha: eps(alpha) = log(A_alpha)/(alpha - 1),
  A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 z^2))
  (Mironov-Talwar-Zhang 2019, Sec. 3.3; the value dp-accounting's RdpAccountant computes).
- Skellam with variance mu, sensitivities D1, D2 in integer units (Agarwal-Kairouz-Liu 2021,
  Cor. 3.6), integer alpha > 1:
  eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)).
- Distributed discrete Gaussian, sum of h shares N_Z(0, s^2) (Kairouz-Liu-Steinke 2021,
  Thm. 1 and Prop. 14): with tau = 10 sum_{k=1}^{h-1} exp(-2 pi^2 s^2 k/(k+1)),
  r2 = D2/(sqrt(h) s), r1 = D1/(sqrt(h) s):
  eps(alpha) = min(alpha r2^2/2 + tau d, alpha (r2^2 + 2 r1 tau + tau^2 d)/2,
                   alpha (r2 + sqrt(d) tau)^2 / 2).
- Poisson subsampling of any mechanism M whose RDP eps(.) bounds both directions of every
  neighbouring pair at integer orders, under add/remove adjacency. With P the output law
  without the added example, Q with it (each a mixture over the rest of the batch, so
  E_P[(Q/P)^k] <= exp((k-1) eps(k)) by joint convexity), the subsampled pair is
  (A, P) and (P, A) with A = (1-q) P + q Q; X = 1 - q + q L, L = Q/P, has E_P[X] = 1 and
  X >= 1 - q. Then at integer alpha >= 2:
  * add:    E_P[X^alpha] = sum_k C(alpha,k) (1-q)^(alpha-k) q^k E_P[L^k]
            <= sum_k C(alpha,k) (1-q)^(alpha-k) q^k exp((k-1) eps(k))
    (the binomial expansion of Mironov-Talwar-Zhang 2019, Sec. 3; exact for the Gaussian);
  * remove: E_A[(P/A)^alpha] = E_P[X^(1-alpha)]. Taylor's theorem with integral remainder
    around 1: x^(1-alpha) = 1 + (1-alpha)(x-1) + (x-1)^2 h(x), where
    h(x) = int_0^1 (1-t) phi''(1 + t(x-1)) dt with phi''(y) = alpha(alpha-1) y^(-alpha-1)
    decreasing, so h is decreasing and h(x) <= h(1-q) on x >= 1-q. Taking E_P (the linear
    term vanishes): E_P[X^(1-alpha)] <= 1 + q^2 h(1-q) E_P[(L-1)^2]
    = 1 + ((1-q)^(1-alpha) - 1 - (alpha-1) q) (exp(eps(2)) - 1).
  eps'(alpha) = log(max(add, remove)) / (alpha - 1), capped by eps(alpha) (no
  amplification). Both terms tend to 1 as the noise grows, unlike Zhu & Wang 2019's general
  bound (its factor 3 leaves a floor that made small epsilons unreachable over many steps);
  for the Gaussian it equals the exact value wherever the add term dominates (checked
  against dp-accounting in tests/unit/dp/test_accounting.py, and both directions against exact sums
  for the Skellam pmf).
- RDP -> (eps, delta): the conversion of Canonne-Kamath-Steinke 2020 (Prop. 12; also
  Asoodeh et al. 2020, Eq. 20), eps = min_alpha rdp(alpha) + log(1 - 1/alpha)
  - log(delta * alpha) / (alpha - 1), with eps = 0 wherever delta^2 >= 1 - exp(-rdp(alpha))
  (the KL bound). It is the conversion dp_accounting's ``compute_epsilon`` performs;
  tests/unit/dp/test_accounting.py checks the two agree. It is computed here because importing
  dp_accounting costs every party process about 3 s and 100 MB (it pulls in scipy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import ParameterError

__all__ = [
    "DEFAULT_ORDERS",
    "distributed_discrete_gaussian",
    "gaussian",
    "poisson_subsampled",
    "skellam",
    "subsampled_gaussian",
    "to_epsilon",
]

#: Integer orders: the closed forms and the subsampling bound hold at integer alpha.
DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 224, 256)

FloatArray = NDArray[np.float64]


def _orders(orders: Sequence[int]) -> list[int]:
    out = [int(a) for a in orders]
    if not out or any(a != o or a < 2 for a, o in zip(out, orders, strict=True)):
        raise ParameterError("orders", list(orders), "must be integers >= 2")
    return out


def _check_rate(sample_rate: float) -> None:
    if not 0 <= sample_rate <= 1:
        raise ParameterError("sample_rate", sample_rate, "must be in [0, 1]")


def _check_positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ParameterError(name, value, "must be finite and > 0")


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _logsumexp(terms: list[float]) -> float:
    m = max(terms)
    if m == -math.inf:
        return -math.inf
    return m + math.log(math.fsum(math.exp(t - m) for t in terms))


def gaussian(*, noise_multiplier: float, orders: Sequence[int] = DEFAULT_ORDERS) -> FloatArray:
    """Gaussian mechanism with sensitivity 1 and std ``noise_multiplier``."""
    _check_positive("noise_multiplier", noise_multiplier)
    return np.array([a / (2 * noise_multiplier**2) for a in _orders(orders)])


def subsampled_gaussian(
    *, sample_rate: float, noise_multiplier: float, orders: Sequence[int] = DEFAULT_ORDERS
) -> FloatArray:
    """Poisson-subsampled Gaussian, exact at integer orders (Mironov-Talwar-Zhang 2019)."""
    _check_rate(sample_rate)
    _check_positive("noise_multiplier", noise_multiplier)
    q, z2 = sample_rate, noise_multiplier**2
    if q == 0:
        return np.zeros(len(orders))
    if q == 1:
        return gaussian(noise_multiplier=noise_multiplier, orders=orders)
    out = []
    for a in _orders(orders):
        terms = [
            _log_comb(a, k) + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * z2)
            for k in range(a + 1)
        ]
        out.append(max(_logsumexp(terms), 0.0) / (a - 1))
    return np.array(out)


def skellam(
    *,
    mu: float,
    l1_sensitivity: float,
    l2_sensitivity: float,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> FloatArray:
    """Skellam(mu) added to an integer query with the given sensitivities (AKL21 Cor. 3.6)."""
    _check_positive("mu", mu)
    if l1_sensitivity < 0 or l2_sensitivity < 0:
        raise ParameterError("sensitivity", (l1_sensitivity, l2_sensitivity), "must be >= 0")
    d1, d2 = l1_sensitivity, l2_sensitivity
    return np.array(
        [
            a * d2 * d2 / (2 * mu)
            + min(((2 * a - 1) * d2 * d2 + 6 * d1) / (4 * mu * mu), 3 * d1 / (2 * mu))
            for a in _orders(orders)
        ]
    )


def distributed_discrete_gaussian(
    *,
    share_sigma: float,
    honest: int,
    l1_sensitivity: float,
    l2_sensitivity: float,
    dim: int,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> FloatArray:
    """Sum of ``honest`` shares N_Z(0, share_sigma^2) on a ``dim``-vector (KLS21 Prop. 14)."""
    _check_positive("share_sigma", share_sigma)
    if honest < 1:
        raise ParameterError("honest", honest, "must be >= 1")
    if dim < 1:
        raise ParameterError("dim", dim, "must be >= 1")
    tau = 10 * math.fsum(
        math.exp(-2 * math.pi**2 * share_sigma**2 * k / (k + 1)) for k in range(1, honest)
    )
    central = math.sqrt(honest) * share_sigma
    r1, r2 = l1_sensitivity / central, l2_sensitivity / central
    return np.array(
        [
            min(
                a * r2 * r2 / 2 + tau * dim,
                a * (r2 * r2 + 2 * r1 * tau + tau * tau * dim) / 2,
                a * (r2 + math.sqrt(dim) * tau) ** 2 / 2,
            )
            for a in _orders(orders)
        ]
    )


def poisson_subsampled(
    rdp_at: Callable[[int], float],
    *,
    sample_rate: float,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> FloatArray:
    """RDP of the Poisson-subsampled mechanism (module docstring: add and remove terms),
    capped by the unsampled curve."""
    _check_rate(sample_rate)
    q = sample_rate
    ords = _orders(orders)
    if q == 0:
        return np.zeros(len(ords))
    if q == 1:
        return np.array([rdp_at(a) for a in ords])
    log_q, log_1q = math.log(q), math.log1p(-q)
    base = {k: rdp_at(k) for k in range(2, max(ords) + 1)}
    out = []
    for a in ords:
        # add direction: the binomial expansion (k = 0 and 1 contribute (1-q)^a + a q (1-q)^(a-1))
        terms = [(a - 1) * log_1q + math.log1p(a * q - q)]
        terms += [
            _log_comb(a, k) + (a - k) * log_1q + k * log_q + (k - 1) * base[k]
            for k in range(2, a + 1)
        ]
        add = _logsumexp(terms)
        # remove direction: 1 + ((1-q)^(1-a) - 1 - (a-1) q) (e^eps(2) - 1)
        coef = math.expm1(-(a - 1) * log_1q) - (a - 1) * q
        b2 = base[2]
        if b2 < 30:
            remove = math.log1p(coef * math.expm1(b2))
        else:  # log(1 + coef (e^b2 - 1)) <= log(coef) + b2 + log1p(e^-b2 / coef), no overflow
            remove = math.log(coef) + b2 + math.log1p(math.exp(-b2) / coef)
        out.append(min(max(add, remove, 0.0) / (a - 1), base[a]))
    return np.array(out)


def to_epsilon(
    *, orders: Sequence[int], rdp: Sequence[float] | FloatArray, delta: float
) -> tuple[float, float]:
    """(epsilon, optimal order) of an RDP curve at ``delta`` (module docstring)."""
    if not 0 < delta < 1:
        raise ParameterError("delta", delta, "must be in (0, 1)")
    if len(orders) != len(rdp):
        raise ParameterError("rdp", len(rdp), f"needs one value per order ({len(orders)})")
    best, best_order = math.inf, float(orders[0])
    for a, r in zip(orders, rdp, strict=True):
        if a < 1:
            raise ParameterError("orders", a, "RDP orders must be >= 1")
        r = float(r)
        if r < 0 or delta * delta + math.expm1(-r) > 0:
            eps = 0.0
        elif a > 1.01:
            eps = r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        else:
            eps = math.inf
        if eps < best:
            best, best_order = eps, float(a)
    return max(0.0, best), best_order
