"""Poisson variates over a secure stream, with a stated range in which they are exact.

Every Skellam share (mpcdp.dp.samplers.skellam) and every Polya share of the distributed
discrete Laplace is a Poisson draw, so this sampler decides whether a release is as private
as the ledger says. numpy's own ``Generator.poisson`` is not good enough at the rates mpcdp
needs: its transformed-rejection test compares ``-lam + k log(lam) - lgamma(k + 1)``, three
float64 terms of size ``lam log(lam)`` whose difference is O(1), so its acceptance
probabilities carry an absolute error of about ``1e-16 lam log(lam)``: measured variance
1.0018 lam at 1e13, 0.922 lam at 3.6e14, and above 2^53 every draw is a multiple of 128 (the
proposal adds ``lam`` in float64). This module keeps the algorithm and removes both errors.

Algorithms
- ``lam < 10``: inversion by sequential search (Devroye 1986, "Non-Uniform Random Variate
  Generation", Sec. X.3.3): the smallest k with U < F(k), F summed from p(0) = exp(-lam) by
  the recurrence p(k) = p(k-1) lam / k. Float error ~ k 2^-53 per term.
- ``10 <= lam <= POISSON_MAX_LAM``: Hoermann 1993, "The transformed rejection method for
  generating Poisson random variables" (PTRS; the algorithm behind numpy's), with two
  changes that make its float64 error independent of lam:
  1. the proposal ``k = floor(lam + 0.43 + (2a/us + b) U)`` is computed as
     ``floor(lam) + floor(frac(lam) + 0.43 + (2a/us + b) U)`` in integer arithmetic (the
     same integer, no lattice);
  2. the acceptance test uses log p(k) in Loader's saddle-point form (Loader 2000, "Fast and
     accurate computation of binomial probabilities", the form behind R's dpois):
     ``log p(k) = -stirlerr(k) - bd0(k, lam) - log(2 pi k) / 2``, where every term is
     O(1) to O(100) for the k that reach the test, so its absolute error is ~1e-13.
  What is left is the 53-bit resolution of the uniforms: the proposal maps U onto k with
  slope at most ~12 sqrt(lam), so each k's proposal mass is exact up to a relative
  ~1.4e-15 sqrt(lam), at most 1.5e-9 at the top of the range.
- ``POISSON_MAX_LAM < lam <= POISSON_SPLIT_MAX_LAM``: Poisson laws add, so Poisson(lam) is
  the sum of m = ceil(lam / POISSON_MAX_LAM) independent Poisson(lam / m) draws, each inside
  the range above (exact, m times the cost).
- One rate for a whole vector of at least TABLE_MIN_SIZE draws, any rate in the range:
  mpcdp.dp.poisson_table, rejection from an alias-table hat built once per rate, one 64-bit
  word of the CSPRNG per trial, no truncation (its law's error: a relative ~1e-13, that of
  float64 log p(k); 5-20x faster than the paths above).

Above POISSON_SPLIT_MAX_LAM (or for a non-finite or negative rate) the sampler refuses with a
ParameterError; parties check their parameters against :func:`check_rate` before any charge.
A statistical test with power at both edges of the range (and at numpy's failures) is in
tests/unit/dp/test_poisson.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import ParameterError
from mpcdp.mpc.rng import ensure_rng

__all__ = [
    "POISSON_MAX_LAM",
    "POISSON_SPLIT_MAX_LAM",
    "TABLE_MIN_SIZE",
    "check_rate",
    "poisson",
]

#: Largest rate drawn in one PTRS draw (2^40 ~ 1.1e12).
POISSON_MAX_LAM = float(1 << 40)
#: Largest rate accepted at all (2^46 ~ 7.0e13): up to 64 summed draws.
POISSON_SPLIT_MAX_LAM = float(1 << 46)
#: From this many draws at one rate: the table of mpcdp.dp.poisson_table (built once per rate,
#: about 3 ms).
TABLE_MIN_SIZE = 1 << 12
#: Below this rate: inversion; from it: PTRS (valid for lam >= 10).
_PTRS_MIN_LAM = 10.0
#: Inversion searches at most this many terms (P(Poisson(10) > 200) < 1e-150); a uniform
#: above the float64 sum of the pmf (probability ~1e-16) is redrawn.
_INVERSION_TERMS = 200

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
#: stirlerr(n) = log(n!) - (n + 1/2) log(n) + n - log(2 pi)/2 for n = 0..15 (exact table:
#: Loader uses it below 16, where the asymptotic series is not accurate enough)
_STIRLERR_TABLE = np.array(
    [0.0]
    + [math.lgamma(n + 1.0) - (n + 0.5) * math.log(n) + n - _HALF_LOG_2PI for n in range(1, 16)]
)
# 0.0 for n = 0 is never used: log p(0) = -lam is computed directly


def check_rate(lam: float, *, name: str = "lam") -> float:
    """``lam`` as a float if it is inside the sampler's range [0, POISSON_SPLIT_MAX_LAM];
    otherwise a ParameterError naming ``name``, its value and the range."""
    if isinstance(lam, bool) or not isinstance(lam, int | float | np.floating | np.integer):
        raise ParameterError(name, lam, "must be a number")
    value = float(lam)
    if not (math.isfinite(value) and 0.0 <= value <= POISSON_SPLIT_MAX_LAM):
        raise ParameterError(
            name,
            value,
            f"is outside the Poisson sampler's exact range [0, {POISSON_SPLIT_MAX_LAM:.6g}] "
            "(2^46; numpy's Poisson loses accuracy above ~1e12 and is a lattice above 2^53)",
        )
    return value


def poisson(
    *, lam: float | NDArray[np.float64], size: int, rng: np.random.Generator | None = None
) -> NDArray[np.int64]:
    """``size`` Poisson draws (int64): rate ``lam`` (a scalar, or one rate per draw as a float
    array of shape (size,)), each in [0, POISSON_SPLIT_MAX_LAM]."""
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
        raise ParameterError("size", size, "must be an int >= 0")
    gen = ensure_rng(rng)
    size = int(size)
    if np.ndim(lam) == 0:
        return _poisson_scalar(check_rate(float(lam)), size, gen)  # type: ignore[arg-type]
    rates = np.asarray(lam, dtype=np.float64)
    if rates.shape != (size,):
        raise ParameterError("lam", f"shape {rates.shape}", f"must be a scalar or ({size},)")
    if rates.size and not (
        np.isfinite(rates).all() and rates.min() >= 0 and rates.max() <= POISSON_SPLIT_MAX_LAM
    ):
        bad = rates[~(np.isfinite(rates) & (rates >= 0) & (rates <= POISSON_SPLIT_MAX_LAM))]
        check_rate(float(bad[0]))
    out = np.empty(size, dtype=np.int64)
    small = rates < _PTRS_MIN_LAM
    big = rates > POISSON_MAX_LAM
    mid = ~(small | big)
    if small.any():
        out[small] = _inversion(rates[small], int(small.sum()), gen)
    if mid.any():
        out[mid] = _ptrs(rates[mid], int(mid.sum()), gen)
    if big.any():  # rates above 2^40: m = ceil(rate / 2^40) summed draws, grouped by m
        idx = np.flatnonzero(big)
        parts = np.ceil(rates[idx] / POISSON_MAX_LAM).astype(np.int64)
        for m in np.unique(parts):
            sel = idx[parts == m]
            out[sel] = _summed(rates[sel], int(m), sel.size, gen)
    return out


def _summed(
    lam: float | NDArray[np.float64], parts: int, size: int, gen: np.random.Generator
) -> NDArray[np.int64]:
    """Poisson(lam) as the sum of ``parts`` independent Poisson(lam / parts) PTRS draws."""
    share = lam / parts
    out = _ptrs(share, size, gen)
    for _ in range(parts - 1):
        out += _ptrs(share, size, gen)
    return out


def _poisson_scalar(lam: float, size: int, gen: np.random.Generator) -> NDArray[np.int64]:
    if size == 0 or lam == 0.0:
        return np.zeros(size, dtype=np.int64)
    if size >= TABLE_MIN_SIZE:
        from mpcdp.dp.poisson_table import fill_poisson  # it imports this module

        out = np.empty(size, dtype=np.int64)
        fill_poisson(out, lam=lam, rng=gen)
        return out
    return _per_draw(lam, size, gen)


def _per_draw(lam: float, size: int, gen: np.random.Generator) -> NDArray[np.int64]:
    """One rate, drawn without the table: inversion, PTRS or summed PTRS (the path of short
    vectors, and the baseline of benchmarks.pads)."""
    if size == 0 or lam == 0.0:
        return np.zeros(size, dtype=np.int64)
    if lam < _PTRS_MIN_LAM:
        return _inversion(lam, size, gen)
    if lam <= POISSON_MAX_LAM:
        return _ptrs(lam, size, gen)
    return _summed(lam, math.ceil(lam / POISSON_MAX_LAM), size, gen)


def _inversion(
    lam: float | NDArray[np.float64], size: int, gen: np.random.Generator
) -> NDArray[np.int64]:
    """Sequential search (module docstring) for rates below 10."""
    out = np.zeros(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        rate = lam if np.ndim(lam) == 0 else lam[todo]  # type: ignore[index]
        u = gen.random(todo.size)
        p = np.exp(-np.asarray(rate, dtype=np.float64)) * np.ones(todo.size)
        cdf = p.copy()
        k = np.zeros(todo.size, dtype=np.int64)
        active = u >= cdf
        for j in range(1, _INVERSION_TERMS + 1):
            if not active.any():
                break
            p *= rate
            p /= j
            cdf += p
            k += active
            active &= u >= cdf
        done = ~active  # still active: u above the float sum of the pmf; redraw
        out[todo[done]] = k[done]
        todo = todo[active]
    return out


def _stirlerr(n: NDArray[np.float64]) -> NDArray[np.float64]:
    """log(n!) - (n + 1/2) log n + n - log(2 pi)/2 for integers n >= 1 (Loader 2000)."""
    out = np.empty_like(n)
    low = n < 16
    if low.any():
        out[low] = _STIRLERR_TABLE[n[low].astype(np.int64)]
    hi = ~low
    if hi.any():
        x = n[hi]
        inv2 = 1.0 / (x * x)
        # 1/12n - 1/360n^3 + 1/1260n^5 - 1/1680n^7 + 1/1188n^9: < 1e-17 relative for n >= 16
        s: Any = 1.0 / 1188.0
        s = 1.0 / 1680.0 - s * inv2
        s = 1.0 / 1260.0 - s * inv2
        s = 1.0 / 360.0 - s * inv2
        s = 1.0 / 12.0 - s * inv2
        out[hi] = s / x
    return out


def _bd0(x: NDArray[np.float64], lam: NDArray[np.float64], diff: NDArray[np.float64]) -> Any:
    """x log(x / lam) + lam - x, accurately (Loader 2000); ``diff`` = x - lam computed
    without cancellation by the caller."""
    out = np.empty_like(x)
    near = np.abs(diff) < 0.1 * (x + lam)
    if near.any():
        d, xs = diff[near], x[near]
        v = d / (xs + lam[near])
        s = d * v
        ej = 2.0 * xs * v
        v2 = v * v
        # |v| < 0.1: each term is < 1/100 of the last; 9 terms reach below 2^-60 relative
        for j in range(1, 10):
            ej *= v2
            s += ej / (2 * j + 1)
        out[near] = s
    far = ~near
    if far.any():
        xf, lf = x[far], lam[far]
        out[far] = xf * np.log(xf / lf) + lf - xf
    return out


def _log_pmf(k: NDArray[np.int64], lam: NDArray[np.float64], frac_off: Any) -> Any:
    """log p(k) of Poisson(lam) for k >= 0 in Loader's form; ``frac_off`` = k - lam computed
    exactly from k - floor(lam) and frac(lam)."""
    out = np.empty(k.shape, dtype=np.float64)
    zero = k == 0
    out[zero] = -lam[zero]
    pos = ~zero
    if pos.any():
        kf = k[pos].astype(np.float64)
        out[pos] = (
            -_stirlerr(kf) - _bd0(kf, lam[pos], frac_off[pos]) - (_HALF_LOG_2PI + 0.5 * np.log(kf))
        )
    return out


def _ptrs(
    lam: float | NDArray[np.float64], size: int, gen: np.random.Generator
) -> NDArray[np.int64]:
    """Hoermann's PTRS with the two changes of the module docstring (10 <= lam <= 2^40):
    one vectorised round over every draw, then rounds over the rejected ones only."""
    out, accept = _ptrs_round(lam, size, gen)
    todo = np.flatnonzero(~accept)
    while todo.size:
        rate = lam if np.ndim(lam) == 0 else lam[todo]  # type: ignore[index]
        k, accept = _ptrs_round(rate, todo.size, gen)
        out[todo[accept]] = k[accept]
        todo = todo[~accept]
    return out


def _ptrs_round(
    lam: float | NDArray[np.float64], n: int, gen: np.random.Generator
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """One proposal per draw and whether it is accepted."""
    scalar = np.ndim(lam) == 0
    rate: Any = float(lam) if scalar else lam  # type: ignore[arg-type]
    whole = np.floor(rate)
    frac = rate - whole  # exact: rate < 2^52
    b = 0.931 + 2.53 * np.sqrt(rate)
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    u = gen.random(n)
    u -= 0.5
    v = gen.random(n)
    us = np.abs(u)
    np.subtract(0.5, us, out=us)
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.divide(2.0 * a, us)
        offset += b
        offset *= u
        offset += frac + 0.43
    # us == 0 (U = -1/2, probability 2^-53) gives an infinite offset: the algorithm rejects
    # it anyway (us < 0.013 and V > us unless V == 0); huge offsets likewise
    ok = np.abs(offset) < 2.0**62  # False for inf and nan
    if not ok.all():
        offset[~ok] = 0.0
    np.floor(offset, out=offset)
    k = offset.astype(np.int64)  # k - floor(lam) for now
    accept = us >= 0.07
    accept &= v <= vr
    accept &= ok
    rest = ~accept
    rest &= ok
    rest &= k >= -np.asarray(whole).astype(np.int64)  # k >= 0
    rest &= (us >= 0.013) | (v <= us)
    idx = np.flatnonzero(rest)
    if idx.size:
        jt, ut, vt = k[idx], us[idx], v[idx]
        at, bt = (a, b) if scalar else (a[idx], b[idx])
        rt = np.full(idx.size, rate) if scalar else rate[idx]
        wt = whole if scalar else whole[idx]
        inv_alpha = 1.1239 + 1.1328 / (bt - 3.4)
        with np.errstate(divide="ignore"):
            lhs = np.log(vt * inv_alpha / (at / (ut * ut) + bt))
        diff = jt - (frac if scalar else frac[idx])  # k - lam, exactly
        kt = jt + np.asarray(wt).astype(np.int64)
        accept[idx] = lhs <= _log_pmf(kt, rt, diff)
    k += np.asarray(whole).astype(np.int64)
    return k, accept
