"""Integer noise samplers over a cryptographically secure stream.

All samplers take an injected ``numpy.random.Generator`` (see mpcdp.rng; a fresh AES-CTR
CSPRNG when None) and return int64 arrays. Vectorised paths use numpy's C samplers, which
draw their uniform bits from that secure bit generator.

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

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import ParameterError
from mpcdp.rng import ensure_rng

__all__ = [
    "discrete_gaussian",
    "discrete_gaussian_exact",
    "discrete_laplace",
    "discrete_laplace_share",
    "polya",
    "skellam",
]

IntArray = NDArray[np.int64]

# numpy's Poisson sampler refuses lam above about 9.2e18.
_MAX_POISSON_LAM = 1e18


def _check_size(size: int) -> None:
    if not isinstance(size, int | np.integer) or size < 0:
        raise ParameterError("size", size, "must be an int >= 0")


def _check_decay(a: float) -> None:
    if not (isinstance(a, float | int) and 0 < a < 1):
        raise ParameterError("a", a, "decay must be in (0, 1)")


def polya(*, r: float, a: float, size: int, rng: np.random.Generator | None = None) -> IntArray:
    """Polya(r, a) draws: failures before ``r`` successes of probability 1 - a."""
    _check_size(size)
    _check_decay(a)
    if not r > 0 or not math.isfinite(r):
        raise ParameterError("r", r, "must be finite and > 0")
    if r * a / (1 - a) > _MAX_POISSON_LAM:
        raise ParameterError("a", a, "noise scale too large for this sampler")
    gen = ensure_rng(rng)
    return gen.negative_binomial(r, 1.0 - a, size=size).astype(np.int64)


def discrete_laplace_share(
    *, a: float, honest: int, size: int, rng: np.random.Generator | None = None
) -> IntArray:
    """One party's share: Polya(1/h, a) - Polya(1/h, a); h shares sum to DLap(a)."""
    if not isinstance(honest, int) or honest < 1:
        raise ParameterError("honest", honest, "must be an int >= 1")
    gen = ensure_rng(rng)
    r = 1.0 / honest
    return polya(r=r, a=a, size=size, rng=gen) - polya(r=r, a=a, size=size, rng=gen)


def discrete_laplace(*, a: float, size: int, rng: np.random.Generator | None = None) -> IntArray:
    """DLap(a): pmf (1-a)/(1+a) * a^|k|, as a difference of two geometric variables."""
    _check_size(size)
    _check_decay(a)
    gen = ensure_rng(rng)
    p = 1.0 - a
    return gen.geometric(p, size=size).astype(np.int64) - gen.geometric(p, size=size).astype(
        np.int64
    )


def skellam(*, mu: float, size: int, rng: np.random.Generator | None = None) -> IntArray:
    """Skellam(mu): Poisson(mu/2) - Poisson(mu/2), variance mu."""
    _check_size(size)
    if not mu >= 0 or not math.isfinite(mu) or mu / 2 > _MAX_POISSON_LAM:
        raise ParameterError("mu", mu, "must be finite, >= 0 and <= 2e18")
    gen = ensure_rng(rng)
    half = mu / 2.0
    # numpy's Poisson sampler yields int64 already; one buffer, subtract in place.
    out = gen.poisson(half, size=size)
    out -= gen.poisson(half, size=size)
    return out


def discrete_gaussian(
    *, sigma: float, size: int, rng: np.random.Generator | None = None
) -> IntArray:
    """N_Z(0, sigma^2) vectorised: CKS20 Algorithm 3 in float64, rejected entries redrawn."""
    _check_size(size)
    if not sigma > 0 or not math.isfinite(sigma):
        raise ParameterError("sigma", sigma, "must be finite and > 0")
    gen = ensure_rng(rng)
    s2 = sigma * sigma
    t = math.floor(sigma) + 1
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        y = discrete_laplace(a=math.exp(-1.0 / t), size=todo.size, rng=gen)
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
