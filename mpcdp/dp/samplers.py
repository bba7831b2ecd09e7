"""Integer noise samplers over a cryptographically secure stream, each with a stated range.

All samplers take an injected ``numpy.random.Generator`` (see mpcdp.mpc.rng; a fresh AES-CTR
CSPRNG when None) and return int64 arrays. Vectorised paths use numpy's C samplers for
uniforms, exponentials and gammas, which draw their bits from that secure bit generator, and
mpcdp.dp.poisson for every Poisson draw.

Discrete Laplace laws are given by their scale t: pmf proportional to exp(-|k| / t), i.e.
decay a = exp(-1/t). Code that needs 1 - a or a / (1 - a) computes them as -expm1(-1/t) and
1 / expm1(1/t): with ``1.0 - a`` a scale of 2^41 would round a to 1 - 2^-53 and the noise to
half its claimed width.

| sampler                               | law                                | exact range      |
| polya(r, scale)                       | Poisson(Gamma(r, 1 / expm1(1/t)))  | 0 < r <= 1,      |
|                                       |                                    | 0 < t <= 2^40    |
| discrete_laplace_share(scale, honest) | Polya(1/h, a) - Polya(1/h, a)      | as polya         |
| discrete_laplace(scale)               | Geometric - Geometric              | 0 < t <= 2^20    |
| skellam(mu), skellam_into(out, mu)    | Poisson(mu/2) - Poisson(mu/2)      | 0 <= mu <= 2^47  |
| discrete_gaussian(sigma)              | N_Z(0, sigma^2), CKS20 in float64  | 0 < sigma < 2^20 |
| discrete_gaussian_exact(sigma2)       | N_Z(0, sigma2), rational, exact    | any sigma2 > 0   |

(DLAP_SHARE_MAX_SCALE, DLAP_MAX_SCALE, SKELLAM_MAX_MU, DGAUSS_MAX_SIGMA.) Outside its range
a sampler refuses with a ParameterError before drawing anything.

Why these ranges: Poisson draws are exact to float64 rounding up to rate 2^46
(mpcdp.dp.poisson); a Polya share's Poisson rate is Gamma(r) / expm1(1/t), which exceeds
2^46 = 64 * 2^40 only when Gamma(r <= 1) > 64, probability < 2^-90 (the draw then fails with a
ParameterError rather than leave the range). numpy's geometric sampler inverts a float64
exponential, so the mass of each integer k is off by a relative ~k 2^-53: below 2^-28 for
the k < 2^25 that a scale below 2^20 produces.

- Polya(r, a): negative binomial with pmf C(k+r-1, k) a^k (1-a)^r. The difference of two
  Polya(1/h, a) is the 1/h-th root of the discrete Laplace law (infinite divisibility), so the
  sum of h such shares is exactly DLap(a), pmf proportional to a^|k| (Goryczka-Xiong 2017,
  Sec. 4; Balle et al. 2020).
- Skellam(mu): Poisson(mu/2) - Poisson(mu/2); Skellam laws add: the sum of h shares of
  Skellam(mu/h) is Skellam(mu) (Agarwal-Kairouz-Liu 2021, Sec. 3).
- Discrete Gaussian N_Z(0, sigma^2): Canonne-Kamath-Steinke 2020, Algorithms 1-3. The scalar
  sampler is exact (rational arithmetic, integer uniforms only); the vector sampler runs the
  same rejection scheme in float64 (acceptance probabilities rounded to ~1e-16).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp.poisson import POISSON_SPLIT_MAX_LAM, TABLE_MIN_SIZE, poisson
from mpcdp.dp.poisson_table import fill_poisson
from mpcdp.errors import ParameterError
from mpcdp.mpc.rng import ensure_rng

__all__ = [
    "DGAUSS_MAX_SIGMA",
    "DLAP_MAX_SCALE",
    "DLAP_SHARE_MAX_SCALE",
    "SKELLAM_MAX_MU",
    "check_dlap_share_scale",
    "check_skellam_mu",
    "discrete_gaussian",
    "discrete_gaussian_exact",
    "discrete_laplace",
    "discrete_laplace_share",
    "polya",
    "skellam",
    "skellam_into",
]

IntArray = NDArray[np.int64]

#: Largest discrete Laplace scale t of a Polya share (2^40).
DLAP_SHARE_MAX_SCALE = float(1 << 40)
#: Largest scale of the geometric-difference sampler (2^20).
DLAP_MAX_SCALE = float(1 << 20)
#: Largest Skellam variance: two Poisson draws of rate mu/2 <= 2^46.
SKELLAM_MAX_MU = 2.0 * POISSON_SPLIT_MAX_LAM
#: The vector discrete Gaussian sampler's proposal has scale floor(sigma) + 1 <= 2^20.
DGAUSS_MAX_SIGMA = float(1 << 20)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
        raise ParameterError("size", size, "must be an int >= 0")


def _check_scale(scale: float, top: float, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ParameterError("scale", scale, "must be a number")
    t = float(scale)
    if not (math.isfinite(t) and 0 < t <= top):
        raise ParameterError(
            "scale", t, f"is outside the exact range (0, {top:.6g}] of the {what} sampler"
        )
    return t


def check_dlap_share_scale(scale: float) -> float:
    """``scale`` if a Polya share of DLap(scale) is inside its exact range, else a
    ParameterError naming it and the range."""
    return _check_scale(scale, DLAP_SHARE_MAX_SCALE, "Polya (discrete Laplace share)")


def check_skellam_mu(mu: float, *, name: str = "mu") -> float:
    """``mu`` if Skellam(mu) is inside its exact range [0, SKELLAM_MAX_MU], else a
    ParameterError naming ``name``, the value and the range."""
    if isinstance(mu, bool) or not isinstance(mu, int | float):
        raise ParameterError(name, mu, "must be a number")
    if not (math.isfinite(mu) and 0 <= mu <= SKELLAM_MAX_MU):
        raise ParameterError(
            name,
            mu,
            f"is outside the Skellam sampler's exact range [0, {SKELLAM_MAX_MU:.6g}] (2^47: "
            "two Poisson draws of rate mu/2 <= 2^46)",
        )
    return float(mu)


def polya(*, r: float, scale: float, size: int, rng: np.random.Generator | None = None) -> IntArray:
    """Polya(r, a) draws, a = exp(-1/scale): failures before ``r`` successes of probability
    1 - a, drawn as Poisson(Gamma(r, a / (1 - a)))."""
    _check_size(size)
    t = check_dlap_share_scale(scale)
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1:
        raise ParameterError("r", r, "must be in (0, 1]")
    gen = ensure_rng(rng)
    odds = 1.0 / math.expm1(1.0 / t)  # a / (1 - a), without cancellation
    if odds == 0.0:  # a underflows: the law is the point mass at 0
        return np.zeros(size, dtype=np.int64)
    rates = gen.gamma(float(r), odds, size=size)
    return poisson(lam=rates, size=size, rng=gen)


def discrete_laplace_share(
    *, scale: float, honest: int, size: int, rng: np.random.Generator | None = None
) -> IntArray:
    """One party's share: Polya(1/h, a) - Polya(1/h, a); h shares sum to DLap(scale)."""
    if isinstance(honest, bool) or not isinstance(honest, int) or honest < 1:
        raise ParameterError("honest", honest, "must be an int >= 1")
    gen = ensure_rng(rng)
    r = 1.0 / honest
    out = polya(r=r, scale=scale, size=size, rng=gen)
    out -= polya(r=r, scale=scale, size=size, rng=gen)
    return out


def discrete_laplace(
    *, scale: float, size: int, rng: np.random.Generator | None = None
) -> IntArray:
    """DLap(scale): pmf proportional to exp(-|k| / scale), as a difference of two geometric
    variables."""
    _check_size(size)
    t = _check_scale(scale, DLAP_MAX_SCALE, "discrete Laplace")
    gen = ensure_rng(rng)
    p = -math.expm1(-1.0 / t)  # 1 - a, without cancellation
    out = gen.geometric(p, size=size).astype(np.int64)
    out -= gen.geometric(p, size=size)
    return out


def skellam(*, mu: float, size: int, rng: np.random.Generator | None = None) -> IntArray:
    """Skellam(mu): Poisson(mu/2) - Poisson(mu/2), variance mu."""
    _check_size(size)
    half = check_skellam_mu(mu) / 2.0
    gen = ensure_rng(rng)
    if size >= TABLE_MIN_SIZE:
        out = np.empty(size, dtype=np.int64)
        fill_poisson(out, lam=half, rng=gen, pair=True)
        return out
    out = poisson(lam=half, size=size, rng=gen)
    out -= poisson(lam=half, size=size, rng=gen)
    return out


def skellam_into(out: NDArray[Any], *, mu: float, rng: np.random.Generator | None = None) -> None:
    """Fill ``out`` with Skellam(mu) draws in one pass: int64, or the words of a ring
    (uint32 / uint64, each draw taken mod 2^bits), as a pad needs them
    (mpcdp.protocol.pads)."""
    half = check_skellam_mu(mu) / 2.0
    gen = ensure_rng(rng)
    if not isinstance(out, np.ndarray) or out.ndim != 1:
        raise ParameterError("out", type(out).__name__, "must be a 1-d numpy array")
    if out.dtype not in (np.int64, np.uint32, np.uint64):
        raise ParameterError("out", str(out.dtype), "must be int64, uint32 or uint64")
    fill_poisson(out, lam=half, rng=gen, pair=True)


def discrete_gaussian(
    *, sigma: float, size: int, rng: np.random.Generator | None = None
) -> IntArray:
    """N_Z(0, sigma^2) vectorised: CKS20 Algorithm 3 in float64, rejected entries redrawn."""
    _check_size(size)
    if isinstance(sigma, bool) or not isinstance(sigma, int | float):
        raise ParameterError("sigma", sigma, "must be a number")
    if not (math.isfinite(sigma) and 0 < sigma < DGAUSS_MAX_SIGMA):
        raise ParameterError(
            "sigma",
            sigma,
            f"is outside the vector discrete Gaussian sampler's range (0, {DGAUSS_MAX_SIGMA:.6g})",
        )
    gen = ensure_rng(rng)
    s2 = sigma * sigma
    t = math.floor(sigma) + 1
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        y = discrete_laplace(scale=float(t), size=todo.size, rng=gen)
        accept = gen.random(todo.size) < np.exp(-((np.abs(y) - s2 / t) ** 2) / (2.0 * s2))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


# ---------------------------------------------------------------------------------------------
# Exact scalar sampler (CKS20): rational arithmetic, integer uniforms only.


def _randbelow(gen: np.random.Generator, n: int) -> int:
    """Uniform integer in [0, n) for any positive Python int n."""
    if n <= 1 << 62:
        return int(gen.integers(0, n))
    bits = n.bit_length()
    words = (bits + 63) // 64
    while True:
        raw = gen.integers(0, 1 << 64, size=words, dtype=np.uint64)
        value = int.from_bytes(raw.tobytes(), "little") >> (64 * words - bits)
        if value < n:
            return value


def _bernoulli(gen: np.random.Generator, p: Fraction) -> bool:
    return _randbelow(gen, p.denominator) < p.numerator


def _bernoulli_exp_neg(gen: np.random.Generator, gamma: Fraction) -> bool:
    """Bernoulli(exp(-gamma)) for rational gamma >= 0 (CKS20 Algorithm 1)."""
    while gamma > 1:
        if not _bernoulli_exp_neg(gen, Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gen, gamma / k):
        k += 1
    return k % 2 == 1


def _discrete_laplace_exact(gen: np.random.Generator, t: int) -> int:
    """DLap with pmf proportional to exp(-|k|/t), integer t >= 1 (CKS20 Algorithm 2)."""
    while True:
        u = _randbelow(gen, t)
        if not _bernoulli_exp_neg(gen, Fraction(u, t)):
            continue
        v = 0
        while _bernoulli_exp_neg(gen, Fraction(1)):
            v += 1
        x = u + t * v
        negative = _randbelow(gen, 2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def discrete_gaussian_exact(
    *, sigma2: Fraction | int | str, rng: np.random.Generator | None = None
) -> int:
    """One exact draw of N_Z(0, sigma2) for a rational variance (CKS20 Algorithm 3)."""
    s2 = Fraction(sigma2)
    if s2 <= 0:
        raise ParameterError("sigma2", str(sigma2), "must be > 0")
    gen = ensure_rng(rng)
    t = math.isqrt(s2.numerator // s2.denominator) + 1
    while True:
        y = _discrete_laplace_exact(gen, t)
        gamma = (abs(y) - s2 / t) ** 2 / (2 * s2)
        if _bernoulli_exp_neg(gen, gamma):
            return y
