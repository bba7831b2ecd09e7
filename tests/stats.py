"""Goodness-of-fit helpers for the distribution tests (alpha = 1e-6 throughout)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
from scipy import stats

ALPHA = 1e-6

_Array = TypeVar("_Array", bound=np.ndarray)


def total_of(shares: Iterable[_Array]) -> _Array:
    """The elementwise sum of equally shaped arrays, as ``sum()`` adds them (same dtype, same
    order of additions), typed as an array rather than ``array | 0``."""
    it = iter(shares)
    total: _Array = next(it).copy()
    for share in it:
        total += share
    return total


def chi_square_pvalue(samples: np.ndarray, pmf: Callable[[np.ndarray], np.ndarray]) -> float:
    """Chi-square p-value of integer ``samples`` against ``pmf``.

    Support points with expected count < 5 are pooled into two tail bins, so the test is
    valid; the tail bins take all the remaining probability mass.
    """
    n = samples.size
    lo, hi = int(samples.min()), int(samples.max())
    # widen the window until the pmf outside it is negligible
    width = max(hi - lo, 10)
    ks = np.arange(lo - width, hi + width + 1)
    p = pmf(ks)
    keep = p * n >= 5
    kmin, kmax = ks[keep].min(), ks[keep].max()
    inner = np.arange(kmin, kmax + 1)
    p_inner = pmf(inner)
    p_left = max(float(pmf(ks[ks < kmin]).sum()), 0.0)
    p_right = max(0.0, 1.0 - p_inner.sum() - p_left)
    counts = np.array(
        [
            np.sum(samples < kmin),
            *np.bincount(
                samples[(samples >= kmin) & (samples <= kmax)] - kmin, minlength=inner.size
            ),
            np.sum(samples > kmax),
        ]
    )
    expected = n * np.concatenate([[p_left], p_inner, [p_right]])
    use = expected > 0
    # fold empty-expectation bins (if any) into neighbours by dropping them: they must be empty
    assert counts[~use].sum() == 0, "samples outside the support"
    expected = expected[use] * (counts[use].sum() / expected[use].sum())
    return float(stats.chisquare(counts[use], expected).pvalue)


def dlap_pmf(a: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda k: (1 - a) / (1 + a) * a ** np.abs(k)


def discrete_gaussian_pmf(sigma: float) -> Callable[[np.ndarray], np.ndarray]:
    span = np.arange(-int(40 * sigma) - 40, int(40 * sigma) + 41)
    z = np.exp(-(span.astype(float) ** 2) / (2 * sigma**2)).sum()
    return lambda k: np.exp(-(k.astype(float) ** 2) / (2 * sigma**2)) / z


def assert_uniform_words(words: np.ndarray) -> None:
    """Every bit position of the words is a fair coin and the bytes are uniform (64- or
    32-bit words)."""
    n, width = words.size, words.dtype.itemsize * 8
    bits = np.unpackbits(words.view(np.uint8)).reshape(n, width)
    ones = bits.sum(axis=0)
    # per-bit frequency: two-sided binomial test, Bonferroni over the bits
    z = (ones - n / 2) / np.sqrt(n / 4)
    p_bits = 2 * stats.norm.sf(np.abs(z))
    assert p_bits.min() > ALPHA / width, p_bits.min()
    counts = np.bincount(words.view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > ALPHA
