"""The fixed-rate Poisson table (mpcdp.dp.poisson_table): its law at the edges of the range,
through its tails, as Skellam shares in ring words, and the power of the same law tests
against an off-by-one table and a biased word-to-index map.

Chance failure: every check uses alpha = 1e-8 and the module makes fewer than 60 checks, so
it fails by chance with probability below 6e-7 (< 1e-6). The power checks assert p-values
below 1e-8 where the injected fault moves the mean by many standard errors.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from scipy import stats

from mpcdp.dp import poisson as P
from mpcdp.dp import poisson_table as PT
from mpcdp.dp.poisson import POISSON_SPLIT_MAX_LAM
from mpcdp.errors import ParameterError
from mpcdp.mpc import encoding
from mpcdp.mpc.rng import csprng
from tests.stats import chi_square_pvalue
from tests.unit.dp.test_poisson import mean_var_pvalues, poisson_pvalues

N = 200_000
CHECK_ALPHA = 1e-8
#: the Skellam rate of one share of the digits plan's 9.4M-parameter pad (benchmarks.pads)
DIGITS_PAD_LAM = 2.631e11


def rng(tag: int) -> np.random.Generator:
    return csprng(key=(1000 + tag).to_bytes(16, "little"))


@pytest.mark.parametrize(
    "lam", [1e-3, 0.5, 9.999, 10.0, 150.5, 1e4 + 0.3, 2.0**30 + 0.5, DIGITS_PAD_LAM]
)
def test_law_inside_the_range(lam: float) -> None:
    out = np.empty(N, dtype=np.int64)
    PT.fill_poisson(out, lam=lam, rng=rng(int(lam) % 97))
    pvalues = poisson_pvalues(out, lam)
    assert min(pvalues.values()) > CHECK_ALPHA, pvalues


def test_law_at_the_top_of_the_range() -> None:
    out = np.empty(N, dtype=np.int64)
    PT.fill_poisson(out, lam=POISSON_SPLIT_MAX_LAM, rng=rng(1))
    pvalues = poisson_pvalues(out, POISSON_SPLIT_MAX_LAM)
    assert min(pvalues.values()) > CHECK_ALPHA, pvalues


@pytest.mark.parametrize("lam", [5.0, 150.5, 1e4 + 0.3])
def test_tails_carry_their_mass(lam: float) -> None:
    """Bins over lam +- 1 sqrt(lam) only: about a third of the draws come through the
    geometric tails (the Python path), and the law is still Poisson."""
    table = PT._build(lam, 1.0)
    out = np.empty(30_000, dtype=np.int64)
    PT._fill(table, out, rng(2), False)
    outside = float(((out < table.lo) | (out >= table.hi)).mean())
    assert outside > 0.02
    assert chi_square_pvalue(out, lambda k: stats.poisson.pmf(k, lam)) > CHECK_ALPHA


@pytest.mark.parametrize("lam", [0.7, 40.5, DIGITS_PAD_LAM])
def test_skellam_pairs_in_ring_words(lam: float) -> None:
    """pair=True into uint32 words: Poisson(lam) - Poisson(lam) mod 2^32, the law of a
    Skellam(2 lam) share; the same stream into int64 gives the same integers."""
    words = np.empty(N, dtype=np.uint32)
    PT.fill_poisson(words, lam=lam, rng=rng(3), pair=True)
    ints = np.empty(N, dtype=np.int64)
    PT.fill_poisson(ints, lam=lam, rng=rng(3), pair=True)
    assert np.array_equal(encoding.to_ring(ints, ring_bits=32), words)
    wide = np.empty(N, dtype=np.uint64)
    PT.fill_poisson(wide, lam=lam, rng=rng(3), pair=True)
    assert np.array_equal(encoding.decode_int(wide), ints)
    x = encoding.decode_int(words)
    p_mean, p_var = mean_var_pvalues(x, 0.0, 2 * lam, 1.0 / (2 * lam))
    assert min(p_mean, p_var) > CHECK_ALPHA
    if lam < 100:
        p = chi_square_pvalue(x, lambda k: stats.skellam.pmf(k, lam, lam))
        assert p > CHECK_ALPHA


def test_tables_are_exact_and_efficient() -> None:
    for lam in (1e-3, 9.999, 150.5, 2.0**30 + 0.5, DIGITS_PAD_LAM, POISSON_SPLIT_MAX_LAM):
        t = PT.poisson_table(lam)
        assert int(t.counts.sum()) == 1 << 28
        assert (t.counts[: t.center_bins] >= 1).all() and t.counts[t.center_bins] >= 1
        assert np.array_equal(PT.realized_counts(t.threshold, t.alias), t.counts)
        assert 0.99 < t.acceptance <= 1.0
        assert (t.squeeze_lo <= t.squeeze_hi).all()
        assert t.hi >= lam + PT.TAIL_SIGMAS * math.sqrt(lam)
        assert t.lo == 0 or t.lo <= lam - PT.TAIL_SIGMAS * math.sqrt(lam)


def _vose_reference(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's construction written plainly in Python (the table's reference)."""
    cap = 1 << PT.THRESHOLD_BITS
    left = [int(c) for c in counts]
    threshold = np.full(len(left), cap, dtype=np.uint64)
    alias = np.arange(len(left), dtype=np.int64)
    small = [i for i, c in enumerate(left) if c < cap]
    large = [i for i, c in enumerate(left) if c >= cap]
    while small and large:
        s, g = small.pop(), large[-1]
        threshold[s] = left[s]
        alias[s] = g
        left[g] -= cap - left[s]
        if left[g] < cap:
            small.append(large.pop())
    return threshold, alias


def test_the_compiled_alias_table_is_the_reference_one() -> None:
    """The compiled construction gives the reference construction's table, entry by entry,
    on real tables and on random and extreme count vectors; bad counts are refused."""
    gen = np.random.default_rng(5)  # test data only: count vectors, not noise
    cases = [PT.poisson_table(lam).counts for lam in (1e-3, 150.5, DIGITS_PAD_LAM)]
    for _ in range(5):
        raw = gen.integers(1, 1 << 17, size=1 << PT.COLUMN_BITS)
        raw = (raw * (((1 << 28) - raw.size) / raw.sum())).astype(np.int64) + 1
        raw[-1] += (1 << 28) - int(raw.sum())
        cases.append(raw)
    one_hot = np.ones(1 << PT.COLUMN_BITS, dtype=np.int64)
    one_hot[7] += (1 << 28) - int(one_hot.sum())
    cases.append(one_hot)
    for counts in cases:
        threshold, alias = PT._alias(np.asarray(counts, dtype=np.int64))
        ref_t, ref_a = _vose_reference(counts)
        assert threshold.dtype == np.uint64 and alias.dtype == np.int64
        assert np.array_equal(threshold, ref_t) and np.array_equal(alias, ref_a)
        assert np.array_equal(PT.realized_counts(threshold, alias), counts)
    with pytest.raises(ParameterError, match="counts"):
        PT._alias(np.ones(1 << PT.COLUMN_BITS, dtype=np.int64))


def test_the_kernel_reads_words_as_documented() -> None:
    """A word whose acceptance bits are 0 is accepted by the squeeze; its integer must be
    lo + (b << s | offset), b the column's own outcome or alias by the 16 threshold bits."""
    t = PT.poisson_table(2.0**30 + 0.5)
    words = PT.csprng_words(rng(4), 50_000)
    words &= ~np.uint64((1 << t.lead_bits) - 1)
    col = (words >> np.uint64(52)).astype(np.int64)
    field = (words >> np.uint64(36)) & np.uint64(0xFFFF)
    b = np.where(field < t.threshold[col], col, t.alias[col])
    keep = (b < t.center_bins) & (t.squeeze_lo[np.minimum(b, t.center_bins - 1)] > 0)
    words, b = words[keep], b[keep]
    offset = ((words >> np.uint64(t.lead_bits)) & np.uint64((1 << t.shift) - 1)).astype(np.int64)
    expected = t.lo + (b << t.shift) + offset
    out = np.empty(words.size, dtype=np.int64)
    pending = np.empty((4, 3), dtype=np.int64)
    done, *_ = PT._kernel()(
        np.concatenate([words, np.zeros(2, np.uint64)]),
        out,
        0,
        out.size,
        0,
        0,
        False,
        pending,
        *PT._table_args(t),
    )
    assert done == out.size
    assert np.array_equal(out, expected)


def _law_rejected(
    lam: float, table: PT.PoissonTable, gen: np.random.Generator, bias: Any = None
) -> bool:
    """Whether the law tests reject draws made with ``table`` from words passed through
    ``bias`` (an injected fault)."""

    def words(g: np.random.Generator, n: int) -> Any:
        w = PT.csprng_words(g, n)
        return w if bias is None else bias(w)

    out = np.empty(N, dtype=np.int64)
    PT._fill(table, out, gen, False, words)
    return min(poisson_pvalues(out, lam).values()) < CHECK_ALPHA


def test_power_against_an_off_by_one_table() -> None:
    lam = 150.5
    good = PT.poisson_table(lam)
    assert not _law_rejected(lam, good, rng(5))
    shifted = replace(good, lo=good.lo + 1)
    assert _law_rejected(lam, shifted, rng(6))
    # every alias pointing at its neighbour bin
    neighbour = ((good.threshold << np.uint64(12)) | (good.alias + 1).astype(np.uint64)).astype(
        np.uint32
    )
    assert _law_rejected(lam, replace(good, columns=neighbour), rng(7))


def test_power_against_a_biased_word_to_index_map() -> None:
    lam = 150.5
    table = PT.poisson_table(lam)

    def even_columns(w: Any) -> Any:  # the column's lowest bit lost
        return w & ~np.uint64(1 << 52)

    def low_thresholds(w: Any) -> Any:  # the threshold field's top bit lost
        return w & ~np.uint64(1 << 51)

    def modulo_columns(w: Any) -> Any:  # 12 bits reduced mod 4000 (a modulo bias)
        col = (w >> np.uint64(52)) % np.uint64(4000)
        return (w & np.uint64((1 << 52) - 1)) | (col << np.uint64(52))

    for k, bias in enumerate((even_columns, low_thresholds, modulo_columns)):
        assert _law_rejected(lam, table, rng(8 + k), bias), bias.__name__


def test_refusals() -> None:
    out = np.empty(4, dtype=np.int64)
    with pytest.raises(ParameterError, match="lam"):
        PT.fill_poisson(out, lam=POISSON_SPLIT_MAX_LAM * 2, rng=rng(0))
    with pytest.raises(ParameterError, match="lam"):
        PT.fill_poisson(out, lam=-1.0, rng=rng(0))
    with pytest.raises(ParameterError, match="out"):
        PT.fill_poisson(np.empty(4, dtype=np.float64), lam=3.0, rng=rng(0))
    with pytest.raises(ParameterError, match="out"):
        PT.fill_poisson(np.empty((2, 2), dtype=np.int64), lam=3.0, rng=rng(0))
    with pytest.raises(ParameterError, match="rng"):
        PT.fill_poisson(out, lam=3.0, rng=np.random.default_rng(0))
    with pytest.raises(ParameterError, match="lam"):
        PT.poisson_table(0.0)
    PT.fill_poisson(out, lam=0.0, rng=rng(0))
    assert not out.any()


@pytest.mark.parametrize("lam", [9.999, 10.0, 2.0**40, 2.0**40 * 1.5])
def test_the_per_draw_path_keeps_its_law(lam: float) -> None:
    """Short vectors (and per-draw rates) still take inversion / PTRS / summed PTRS: the same
    edge checks on that path, at full length."""
    x = P._per_draw(lam, N, rng(20))
    pvalues = poisson_pvalues(x, lam)
    assert min(pvalues.values()) > CHECK_ALPHA, pvalues
