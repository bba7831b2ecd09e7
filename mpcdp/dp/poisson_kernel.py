"""The compiled loops of mpcdp.dp.poisson_table (numba, GIL released, cached on disk): the
trials, and the alias table's construction.

Imported by mpcdp.dp.poisson_table on first use only: importing numba takes ~0.3 s, which
no importer of mpcdp.dp should pay. The loop is one function: numba keeps the array
arguments out of the per-trial work only when no inner function takes them (an inner
function taking the tables made every trial ~10x slower); log p(k) takes scalars only.
See mpcdp.dp.poisson_table for the method and the word layout.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

__all__ = ["alias", "fill", "log_p"]


def _compiled(fn: Any) -> Any:
    """``fn`` compiled without the GIL, cached on disk where numba finds a writable cache
    directory (the package's __pycache__, the user's cache, NUMBA_CACHE_DIR), else compiled
    in memory at first use (a read-only install with no writable home)."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


u64 = np.uint64
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@_compiled
def log_p(k: int, lam: float) -> float:
    """log p(k) of Poisson(lam), Loader's form as in mpcdp.dp.poisson (scalars only)."""
    if k == 0:
        return -lam
    x = float(k)
    if k < 16:
        st = math.lgamma(x + 1.0) - (x + 0.5) * math.log(x) + x - _HALF_LOG_2PI
    else:
        inv2 = 1.0 / (x * x)
        s = 1.0 / 1188.0
        s = 1.0 / 1680.0 - s * inv2
        s = 1.0 / 1260.0 - s * inv2
        s = 1.0 / 360.0 - s * inv2
        s = 1.0 / 12.0 - s * inv2
        st = s / x
    whole = math.floor(lam)
    d = float(k - np.int64(whole)) - (lam - whole)  # k - lam, exactly
    if abs(d) < 0.1 * (x + lam):
        v = d / (x + lam)
        bd = d * v
        ej = 2.0 * x * v
        v2 = v * v
        for j in range(1, 10):
            ej *= v2
            bd += ej / (2 * j + 1)
    else:
        bd = x * math.log(x / lam) + lam - x
    out: float = -st - bd - (_HALF_LOG_2PI + 0.5 * math.log(x))
    return out


@_compiled
def fill(
    words: Any,
    out: Any,
    i: int,
    stop: int,
    phase: int,
    first: int,
    pair: bool,
    pending: Any,
    columns: Any,
    log_hat: Any,
    sq_lo: Any,
    sq_hi: Any,
    lam: float,
    lo: int,
    shift: int,
    lead_bits: int,
) -> tuple[int, int, int, int]:
    """out[i:stop] = draws (pair: first draw minus second, each coordinate), cast to
    out's dtype (ring words wrap). A trial that proposes a tail ends its draw: it is
    recorded in ``pending`` as (coordinate, sign, -1 upper | -2 lower) and counted as
    0. A trial starts only with two words left. Returns (i, phase, first, npend) where
    it stopped (out of words, or ``pending`` full)."""
    n = words.shape[0]
    bins = log_hat.shape[0]
    col_shift = u64(64 - 12)
    thr_shift = u64(64 - 28)
    thr_mask = u64(0xFFFF)
    off_shift = u64(lead_bits)
    off_mask = u64((1 << shift) - 1)
    bin_shift = np.int64(shift)
    lead_mask = u64((1 << lead_bits) - 1)
    scale = float(1 << lead_bits)
    pos = 0
    npend = 0
    k = np.int64(0)
    while i < stop and npend < pending.shape[0]:
        # one draw: trials until one is accepted or proposes a tail
        while True:
            if pos + 2 > n:
                return i, phase, first, npend
            x = words[pos]
            pos += 1
            col = np.int64(x >> col_shift)
            entry = columns[col]
            if ((x >> thr_shift) & thr_mask) < u64(entry >> np.uint32(12)):
                b = col
            else:
                b = np.int64(entry & np.uint32(0xFFF))
            if b >= bins:
                pending[npend, 0] = i
                pending[npend, 1] = -1 if (pair and phase == 1) else 1
                pending[npend, 2] = -1 if b == bins else -2
                npend += 1
                k = np.int64(0)
                break
            k = lo + ((b << bin_shift) | np.int64((x >> off_shift) & off_mask))
            lead = x & lead_mask
            if lead < sq_lo[b]:
                break
            if lead >= sq_hi[b]:
                continue
            y = math.exp(log_p(k, lam) - log_hat[b]) * scale - float(lead)
            if y >= 1.0:
                break
            if y <= 0.0:
                continue
            u = float(words[pos] >> u64(11)) * (1.0 / 9007199254740992.0)
            pos += 1
            if u < y:
                break
        if pair and phase == 0:
            first = k
            phase = 1
            continue
        out[i] = (first - k) if pair else k
        phase = 0
        i += 1
    return i, phase, first, npend


@_compiled
def alias(counts: Any, cap: int) -> tuple[Any, Any]:
    """Vose's alias table in integers (mpcdp.dp.poisson_table._alias, which checks the
    arguments): per column the units its own outcome keeps (uint64) and its alias (int64).
    The stacks are worked in the order of the reference construction, so the table is the
    same whichever way it is built; compiled because a new rate (every cold query round)
    builds one on the request path, and the loop in Python took ~3.5 ms of the ~4.5."""
    n = counts.shape[0]
    left = counts.copy()
    threshold = np.full(n, cap, dtype=np.uint64)
    out = np.arange(n)
    small = np.empty(n, dtype=np.int64)
    large = np.empty(n, dtype=np.int64)
    ns = 0
    nl = 0
    for i in range(n):
        if left[i] < cap:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        g = large[nl - 1]
        threshold[s] = u64(left[s])
        out[s] = g
        left[g] -= cap - left[s]
        if left[g] < cap:
            nl -= 1
            small[ns] = large[nl]
            ns += 1
    return threshold, out
