"""Poisson draws at one fixed rate from a table built once per rate, exact in law.

A site's noise share is millions of Poisson draws at one rate (mpcdp.dp.poisson draws each
with its own transformed-rejection test). For a fixed rate this module builds a table once
and then spends one 64-bit word of the party's CSPRNG per trial (numba-compiled, GIL
released), with the same law.

The method: rejection from a piecewise-constant hat chosen by an alias table (Walker 1977;
Vose 1991; Devroye 1986, "Non-Uniform Random Variate Generation", Sec. III.4 and VIII.2).

- The integers [lo, hi) around the rate (lo = lam - 10 sqrt(lam), or 0) are cut into at most
  4,094 bins of w = 2^s integers each; beyond them two tails, k >= hi and k < lo.
- One word X of the CSPRNG makes one trial: its top 12 bits pick a column of the alias table
  (4,096 columns), the next 16 bits pick the column's own outcome or its alias (integer
  thresholds), the next s bits the offset j in the bin (k = lo + b w + j, uniform), and the
  low m = 36 - s bits are the leading bits of the acceptance uniform U.
- The proposal law is computed *from the integer table itself*: outcome b is proposed with
  probability n_b / 2^28, where n_b counts its units over all columns, so the rounding of
  the alias table changes the speed, never the law. Every bin and both tails get n_b >= 1.
- k in bin b is accepted iff U < p(k) w 2^28 / (c n_b), with c >= max_k of p(k) w 2^28 / n_b
  (p's maximum over a bin is at an edge or the mode: p is log-concave). A squeeze decides
  from the m leading bits alone when they fall below the bin's smallest acceptance or above
  its largest (bounds widened by e^(1e-9), far above the 1e-13 error of log p); otherwise
  log p(k) is evaluated (Loader 2000, as in mpcdp.dp.poisson) and one more word extends U.
- Tails: k = hi + G or lo - 1 - G, G geometric with ratio e^-theta >= the pmf's ratio there
  (lam / (hi + 1) above, (lo - 1) / lam below, so the hat dominates p), drawn from the
  Generator's exponential (unbounded), acceptance by a Bernoulli(exp(log a)) that reads as
  many bits as log a needs. A tail is proposed with probability about 2^-28, so this runs
  in Python, outside the compiled loop, without truncating anything.

The output law is p(k) as computed by log p(k) in float64 (relative error ~1e-13), with no
truncation: nothing is added to delta. The words are AES-256-CTR keystream under a key of
32 bytes drawn from the injected Generator (a CSPRNG, mpcdp.mpc.rng), a fresh key per batch
of 64K draws: the Generator's own construction, through OpenSSL. The range is the Poisson sampler's,
[0, POISSON_SPLIT_MAX_LAM], checked by :func:`mpcdp.dp.poisson.check_rate` before any draw.
tests/unit/dp/test_poisson_table.py checks the law at the edges of the range and shows
that the same checks reject an off-by-one table and a biased word-to-index map.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp.poisson import _log_pmf, check_rate
from mpcdp.errors import ParameterError
from mpcdp.mpc import prg
from mpcdp.mpc.rng import ensure_rng

__all__ = [
    "PoissonTable",
    "csprng_words",
    "fill_poisson",
    "poisson_table",
    "realized_counts",
]

#: alias-table columns (2^12) and threshold bits per column (2^16): 2^28 units in all
COLUMN_BITS = 12
THRESHOLD_BITS = 16
_UNITS_LOG2 = COLUMN_BITS + THRESHOLD_BITS
#: bins of the hat; the two last outcomes are the tails
_CENTER_BINS = (1 << COLUMN_BITS) - 2
#: the bins cover lam +- TAIL_SIGMAS sqrt(lam); the geometric tails cover the rest
TAIL_SIGMAS = 10.0
#: widening of the squeeze bounds and of c, in log space (log p is accurate to ~1e-13)
_LOG_MARGIN = 1e-9
#: draws per batch of CSPRNG words (64K words, 512 KiB: they stay in cache while used)
_CHUNK_DRAWS = 1 << 16
#: pending tail proposals held before the compiled loop hands back
_PENDING_CAP = 256


@dataclass(frozen=True)
class PoissonTable:
    """The alias table and the hat of Poisson(lam) (module docstring); arrays read-only."""

    lam: float
    lo: int
    hi: int
    shift: int  # s: bins of 2^s integers
    lead_bits: int  # m: leading bits of the acceptance uniform in the trial's word
    threshold: NDArray[np.uint64]  # per column: units kept by the column's own outcome
    alias: NDArray[np.int64]  # per column: the other outcome
    columns: NDArray[np.uint32]  # per column, packed for the compiled loop: threshold << 12 | alias
    counts: NDArray[np.int64]  # per outcome: n_b, its units in the whole table
    base: NDArray[np.int64]  # per bin: its first integer
    log_hat: NDArray[np.float64]  # per bin: log(c n_b / (w 2^28))
    squeeze_lo: NDArray[np.uint64]  # per bin: accept when the leading bits are below this
    squeeze_hi: NDArray[np.uint64]  # per bin: reject when they are at or above this
    log_c: float
    upper_theta: float
    lower_theta: float  # 0.0: no lower tail (lo == 0)

    @property
    def center_bins(self) -> int:
        return int(self.base.size)

    @property
    def acceptance(self) -> float:
        """The probability that one trial is accepted: 1 / c."""
        return math.exp(-self.log_c)

    def tail_log_hat(self, upper: bool) -> float:
        """log of the hat's mass at the first integer of a tail (c n_T / 2^28 (1 - e^-theta))."""
        theta = self.upper_theta if upper else self.lower_theta
        n = int(self.counts[self.center_bins + (0 if upper else 1)])
        return (
            self.log_c + math.log(n) - _UNITS_LOG2 * math.log(2.0) + math.log(-math.expm1(-theta))
        )


def _log_p(k: NDArray[np.int64], lam: float) -> NDArray[np.float64]:
    """log p(k) of Poisson(lam) (mpcdp.dp.poisson's Loader form), exact k - lam."""
    whole = math.floor(lam)
    frac_off = (k - whole).astype(np.float64) - (lam - whole)
    out: NDArray[np.float64] = _log_pmf(k, np.full(k.shape, lam), frac_off)
    return out


def _alias(counts: NDArray[np.int64]) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Vose's alias table over 2^COLUMN_BITS columns of 2^THRESHOLD_BITS units, in integers:
    outcome i is column i's own; ``counts`` must sum to 2^28 (the compiled construction,
    mpcdp.dp.poisson_kernel.alias; its result is checked against ``counts`` by
    :func:`realized_counts` in :func:`_build`)."""
    if int(counts.sum()) != 1 << _UNITS_LOG2 or counts.size != 1 << COLUMN_BITS:
        raise ParameterError(
            "counts",
            int(counts.sum()),
            f"must be 2^{COLUMN_BITS} counts summing to 2^{_UNITS_LOG2}",
        )
    threshold, alias = _alias_kernel()(
        np.ascontiguousarray(counts, dtype=np.int64), 1 << THRESHOLD_BITS
    )
    return threshold, alias


def realized_counts(threshold: NDArray[np.uint64], alias: NDArray[np.int64]) -> NDArray[np.int64]:
    """Units of each outcome in an alias table: what the trials really propose."""
    cap = 1 << THRESHOLD_BITS
    own = threshold.astype(np.int64)
    out: NDArray[np.int64] = own.copy()
    np.add.at(out, alias, cap - own)
    return out


@functools.lru_cache(maxsize=32)
def poisson_table(lam: float) -> PoissonTable:
    """The table of Poisson(lam), 0 < lam <= POISSON_SPLIT_MAX_LAM (built once per rate)."""
    return _build(check_rate(lam), TAIL_SIGMAS)


def _build(lam: float, sigmas: float) -> PoissonTable:
    """The table whose bins cover lam +- ``sigmas`` sqrt(lam) (tests narrow it so that the
    tails carry real mass)."""
    if lam == 0.0:
        raise ParameterError("lam", lam, "must be > 0 for a table (the law is 0)")
    sigma = math.sqrt(lam)
    low = math.floor(lam - sigmas * sigma)
    lo = low if low >= 2 else 0
    need = max(math.ceil(lam + sigmas * sigma) + 2, lo + 16) - lo
    shift = max(0, math.ceil(math.log2(need / _CENTER_BINS)))
    width = 1 << shift
    bins = -(-need // width)
    hi = lo + bins * width
    lead_bits = 64 - _UNITS_LOG2 - shift
    if lead_bits < 16:  # pragma: no cover - lam <= 2^46 gives shift <= 14
        raise ParameterError("lam", lam, "is too large for the table's word layout")
    base = lo + width * np.arange(bins, dtype=np.int64)
    first, last = _log_p(base, lam), _log_p(base + (width - 1), lam)
    mode = math.floor(lam)
    top = np.maximum(first, last)
    inside = (base <= mode) & (mode <= base + width - 1)
    top[inside] = float(_log_p(np.array([mode], dtype=np.int64), lam)[0])
    bottom = np.minimum(first, last)
    # tails: geometric ratios that dominate the pmf's own
    upper_theta = -math.log(lam / (hi + 1)) * (1.0 - 1e-9)
    lower_theta = -math.log((lo - 1) / lam) * (1.0 - 1e-9) if lo else 0.0
    log_edge_hi = float(_log_p(np.array([hi], dtype=np.int64), lam)[0])
    log_edge_lo = float(_log_p(np.array([lo - 1], dtype=np.int64), lam)[0]) if lo else -math.inf
    units = 1 << _UNITS_LOG2
    # a tail's units: enough that c n_T (1 - e^-theta) / 2^28 >= p(edge) with c >= 1
    n_upper = max(1, math.ceil(math.exp(log_edge_hi) * units / -math.expm1(-upper_theta)))
    n_lower = (
        max(1, math.ceil(math.exp(log_edge_lo) * units / -math.expm1(-lower_theta))) if lo else 0
    )
    target = width * np.exp(top - top.max())
    spare = units - bins - 2 - n_upper - n_lower
    center = np.maximum(1, np.ceil(target * (spare / target.sum()))).astype(np.int64)
    center[int(np.argmax(target))] += units - n_upper - n_lower - int(center.sum())
    counts = np.zeros(1 << COLUMN_BITS, dtype=np.int64)
    counts[:bins] = center
    counts[bins] = n_upper
    counts[bins + 1] = n_lower
    threshold, alias = _alias(counts)
    realized = realized_counts(threshold, alias)
    if not np.array_equal(realized, counts):  # pragma: no cover - Vose's construction is exact
        raise AssertionError("the alias table does not realise its counts")
    log_units = _UNITS_LOG2 * math.log(2.0)
    log_n = np.log(center.astype(np.float64))
    log_c = (
        max(
            float(np.max(top + shift * math.log(2.0) - (log_n - log_units))),
            log_edge_hi - (math.log(n_upper) - log_units) - math.log(-math.expm1(-upper_theta)),
            (
                log_edge_lo - (math.log(n_lower) - log_units) - math.log(-math.expm1(-lower_theta))
                if lo
                else -math.inf
            ),
        )
        + 2 * _LOG_MARGIN
    )
    log_hat = log_c + (log_n - log_units) - shift * math.log(2.0)
    scale = float(1 << lead_bits)
    squeeze_lo = np.floor(np.exp(bottom - log_hat - _LOG_MARGIN) * scale)
    squeeze_hi = np.minimum(np.ceil(np.exp(top - log_hat + _LOG_MARGIN) * scale), scale)
    columns = ((threshold << np.uint64(COLUMN_BITS)) | alias.astype(np.uint64)).astype(np.uint32)
    arrays: list[np.ndarray] = [threshold, alias, columns, counts, base, log_hat]
    lo_u, hi_u = squeeze_lo.astype(np.uint64), squeeze_hi.astype(np.uint64)
    for arr in (*arrays, lo_u, hi_u):
        arr.flags.writeable = False
    return PoissonTable(
        lam=lam,
        lo=lo,
        hi=hi,
        shift=shift,
        lead_bits=lead_bits,
        threshold=threshold,
        alias=alias,
        columns=columns,
        counts=counts,
        base=base,
        log_hat=log_hat,
        squeeze_lo=lo_u,
        squeeze_hi=hi_u,
        log_c=log_c,
        upper_theta=upper_theta,
        lower_theta=lower_theta,
    )


# ---------------------------------------------------------------------------------------------
# The compiled loop (numba, compiled on first use and cached on disk; nothing at import time)


@functools.cache
def _kernel() -> Any:
    """The compiled loop (mpcdp.dp.poisson_kernel), imported on first use."""
    from mpcdp.dp import poisson_kernel

    return poisson_kernel.fill


@functools.cache
def _alias_kernel() -> Any:
    """The compiled alias construction (mpcdp.dp.poisson_kernel), imported on first use."""
    from mpcdp.dp import poisson_kernel

    return poisson_kernel.alias


def _table_args(table: PoissonTable) -> tuple[Any, ...]:
    return (
        table.columns,
        table.log_hat,
        table.squeeze_lo,
        table.squeeze_hi,
        table.lam,
        table.lo,
        table.shift,
        table.lead_bits,
    )


def _bernoulli_exp(log_a: float, gen: np.random.Generator) -> bool:
    """Bernoulli(exp(log_a)) for log_a <= 0, however small: 2^-e by e zero bits, then a
    uniform below exp(log_a + e log 2) in [1/2, 1]."""
    if log_a >= 0.0:
        return True
    if not math.isfinite(log_a):
        return False
    e = math.floor(-log_a / math.log(2.0))
    bits = e
    raw = gen.bit_generator.random_raw
    while bits >= 64:
        if int(raw()) != 0:
            return False
        bits -= 64
    if bits and int(raw()) >> (64 - bits):
        return False
    return bool(gen.random() < math.exp(log_a + e * math.log(2.0)))


def _tail_trial(table: PoissonTable, code: int, gen: np.random.Generator) -> int | None:
    """The rest of a trial that proposed a tail: the integer if accepted, else None."""
    upper = code == -1
    theta = table.upper_theta if upper else table.lower_theta
    g = math.floor(float(gen.standard_exponential()) / theta)
    if g > 1 << 52:  # the pmf there is 0 in float64 (below e^-2^40)
        return None
    k = table.hi + g if upper else table.lo - 1 - g
    if k < 0:
        return None
    log_a = float(_log_p(np.array([k], dtype=np.int64), table.lam)[0])
    log_a -= table.tail_log_hat(upper) - g * theta
    return k if _bernoulli_exp(log_a, gen) else None


def _complete(table: PoissonTable, code: int, gen: np.random.Generator) -> int:
    """A draw whose trial proposed a tail (``code``), finished: the tail's trial, then fresh
    trials until one is accepted."""
    fill = _kernel()
    args = _table_args(table)
    one = np.zeros(1, dtype=np.int64)
    pending = np.empty((1, 3), dtype=np.int64)
    while True:
        k = _tail_trial(table, code, gen)
        if k is not None:
            return k
        done = npend = 0
        while not (done or npend):
            done, _, _, npend = fill(
                gen.bit_generator.random_raw(64), one, 0, 1, 0, 0, False, pending, *args
            )
        if not npend:
            return int(one[0])
        code = int(pending[0, 2])


def fill_poisson(
    out: NDArray[Any], *, lam: float, rng: np.random.Generator | None, pair: bool = False
) -> None:
    """Fill ``out`` (int64, or a ring's uint32/uint64 words: values wrap) with Poisson(lam)
    draws, or with differences of two (``pair``: one Skellam share's coordinate each), words
    from ``rng``'s bit generator (a CSPRNG, mpcdp.mpc.rng.ensure_rng)."""
    lam = check_rate(lam)
    gen = ensure_rng(rng)
    if not isinstance(out, np.ndarray) or out.ndim != 1:
        raise ParameterError("out", type(out).__name__, "must be a 1-d numpy array")
    if out.dtype not in (np.int64, np.uint32, np.uint64):
        raise ParameterError("out", str(out.dtype), "must be int64, uint32 or uint64")
    if lam == 0.0 or out.size == 0:
        out[:] = 0
        return
    _fill(poisson_table(lam), out, gen, pair)


def csprng_words(gen: np.random.Generator, size: int) -> NDArray[np.uint64]:
    """``size`` words of AES-256-CTR keyed with 32 fresh bytes of ``gen`` (a CSPRNG): the
    same construction as ``gen``'s own AES-CTR bit generator, at OpenSSL's speed (about 3x
    randomgen's raw words here)."""
    out = np.empty(size + 2, dtype=np.uint64)  # the cipher wants 15 bytes of room
    enc = prg.stream_cipher(gen.bytes(prg.KEY_BYTES), round_id=0, tensor_id=0)
    prg.fill_keystream(enc, out.view(np.uint8), 8 * size)
    return out[:size]


def _fill(
    table: PoissonTable,
    out: NDArray[Any],
    gen: np.random.Generator,
    pair: bool,
    words_of: Callable[[np.random.Generator, int], NDArray[np.uint64]] = csprng_words,
) -> None:
    """:func:`fill_poisson` with a given table and no checks (tests give it broken tables
    and biased words to show that the law tests see them)."""
    size = out.size
    fill = _kernel()
    args = _table_args(table)
    per = 2 if pair else 1
    pending = np.empty((_PENDING_CAP, 3), dtype=np.int64)
    proposed_tails: list[list[int]] = []
    i, phase, first = 0, 0, 0
    while i < size:
        todo = min((size - i) * per, _CHUNK_DRAWS)
        words = words_of(gen, int(todo / table.acceptance * 1.01) + 64)
        i, phase, first, npend = fill(words, out, i, size, phase, first, pair, pending, *args)
        proposed_tails.extend(pending[:npend].tolist())
    # after every coordinate is written: finish the draws whose trial proposed a tail
    modulus = 1 << (8 * out.dtype.itemsize)
    for idx, sign, code in proposed_tails:
        value = sign * _complete(table, code, gen)
        if out.dtype == np.int64:
            out[idx] += value
        else:
            out[idx] = (int(out[idx]) + value) % modulus
