"""A site's Skellam noise share drawn on its GPU: the CSPRNG's words made on the CPU, the
fixed-rate Poisson table's transform on the device.

The law is mpcdp.dp.poisson_table's, trial for trial: every trial reads one 64-bit word of
AES-256-CTR keyed from the party's Generator (:func:`mpcdp.dp.poisson_table.csprng_words`,
on the CPU, so no device random number generator is involved; torch's and curand's Poisson
samplers are never used: curand rounds a normal draw above rate 4,000), and the device does
the alias lookup, the offset, the squeeze and, for the ~0.5% of trials the squeeze cannot
decide, Loader's log p(k) in float64 with a second word extending the acceptance uniform.
Draws run in rounds over the tensor: the accepted ones are kept, the rejected ones drawn
again with fresh words. A trial that proposes a tail (probability ~2^-28) is finished on
the CPU by the table's exact tail path.

Runs on any torch device; the tests check the law on CPU torch (tests/unit/train/
test_gpu_noise.py). benchmarks/gpu_check.sh measures it on a GPU next to the DP step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from numpy.typing import NDArray

from mpcdp.dp import poisson_table as PT
from mpcdp.dp.poisson import check_rate
from mpcdp.mpc.rng import ensure_rng

__all__ = ["poisson_on_device", "skellam_share_on_device"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_STIRLERR_SMALL = [0.0] + [
    math.lgamma(n + 1.0) - (n + 0.5) * math.log(n) + n - _HALF_LOG_2PI for n in range(1, 16)
]


def _log_p(k: torch.Tensor, lam: float) -> torch.Tensor:
    """log p(k) of Poisson(lam) in float64, Loader's form as in mpcdp.dp.poisson."""
    x = k.to(torch.float64).clamp(min=1.0)
    small = torch.tensor(_STIRLERR_SMALL, dtype=torch.float64, device=k.device)
    inv2 = 1.0 / (x * x)
    s = 1.0 / 1680.0 - inv2 / 1188.0
    s = 1.0 / 1260.0 - s * inv2
    s = 1.0 / 360.0 - s * inv2
    s = 1.0 / 12.0 - s * inv2
    st = torch.where(k < 16, small[k.clamp(0, 15)], s / x)
    whole = math.floor(lam)
    d = (k - whole).to(torch.float64) - (lam - whole)  # k - lam, exactly
    v = d / (x + lam)
    v2 = v * v
    ej = 2.0 * x * v
    near = d * v
    for j in range(1, 10):
        ej = ej * v2
        near = near + ej / (2 * j + 1)
    far = x * torch.log(x / lam) + lam - x
    bd = torch.where(d.abs() < 0.1 * (x + lam), near, far)
    out = -st - bd - (_HALF_LOG_2PI + 0.5 * torch.log(x))
    return torch.where(k == 0, torch.full_like(out, -lam), out)


class _DeviceTable:
    def __init__(self, table: PT.PoissonTable, device: torch.device) -> None:
        self.table = table
        self.columns = torch.from_numpy(table.columns.astype(np.int64)).to(device)
        self.sq_lo = torch.from_numpy(table.squeeze_lo.astype(np.int64)).to(device)
        self.sq_hi = torch.from_numpy(table.squeeze_hi.astype(np.int64)).to(device)
        self.log_hat = torch.from_numpy(table.log_hat.copy()).to(device)


def _words(gen: np.random.Generator, n: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(PT.csprng_words(gen, n).view(np.int64)).to(device)


def _round(
    dt: _DeviceTable, x: torch.Tensor, gen: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One trial per word: (k, accepted, tail code: 0 none, -1 upper, -2 lower)."""
    t = dt.table
    bins = t.center_bins
    col = (x >> 52) & 0xFFF
    entry = dt.columns[col]
    b = torch.where(((x >> 36) & 0xFFFF) < (entry >> 12), col, entry & 0xFFF)
    code = torch.where(b == bins, -1, torch.where(b > bins, -2, 0))
    bc = b.clamp(max=bins - 1)
    k = t.lo + ((bc << t.shift) | ((x >> t.lead_bits) & ((1 << t.shift) - 1)))
    lead = x & ((1 << t.lead_bits) - 1)
    accept = lead < dt.sq_lo[bc]
    slow = ~accept & (lead < dt.sq_hi[bc]) & (code == 0)
    idx = torch.nonzero(slow).flatten()
    if idx.numel():
        y = torch.exp(_log_p(k[idx], t.lam) - dt.log_hat[bc[idx]]) * float(1 << t.lead_bits)
        y = y - lead[idx].to(torch.float64)
        u = (_words(gen, idx.numel(), x.device) >> 11).to(torch.float64) * 2.0**-53
        accept[idx] = u < y  # y >= 1 accepts and y <= 0 rejects for every u in [0, 1)
    accept &= code == 0
    return k, accept, code


def poisson_on_device(
    *, lam: float, size: int, rng: np.random.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """``size`` Poisson(lam) draws (int64) on ``device``, the law of mpcdp.dp.poisson_table."""
    lam = check_rate(lam)
    gen = ensure_rng(rng)
    dev = torch.device(device)
    out = torch.zeros(size, dtype=torch.int64, device=dev)
    if lam == 0.0 or size == 0:
        return out
    _fill(_DeviceTable(PT.poisson_table(lam), dev), out, gen)
    return out


def _fill(
    dt: _DeviceTable,
    out: torch.Tensor,
    gen: np.random.Generator,
    words_of: Callable[[np.random.Generator, int], NDArray[np.uint64]] = PT.csprng_words,
) -> None:
    """out := draws from ``dt``'s table (tests give it broken tables and biased words)."""
    dev = out.device
    todo = torch.arange(out.numel(), device=dev)
    tails: list[tuple[int, int]] = []
    while todo.numel():
        x = torch.from_numpy(words_of(gen, todo.numel()).view(np.int64)).to(dev)
        k, accept, code = _round(dt, x, gen)
        out[todo[accept]] = k[accept]
        tail = code != 0
        if bool(tail.any()):
            tails.extend(zip(todo[tail].tolist(), code[tail].tolist(), strict=True))
        todo = todo[~accept & ~tail]
    for i, c in tails:  # finished by the table's exact tail path, on the CPU
        out[i] = PT._complete(dt.table, int(c), gen)


def skellam_share_on_device(
    *, mu: float, size: int, rng: np.random.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """One Skellam(mu) share of ``size`` coordinates (int64) on ``device``:
    Poisson(mu/2) - Poisson(mu/2), as mpcdp.dp.samplers.skellam_into draws it on the CPU."""
    from mpcdp.dp.samplers import check_skellam_mu

    half = check_skellam_mu(mu) / 2.0
    both = poisson_on_device(lam=half, size=2 * size, rng=rng, device=device)
    return both[:size] - both[size:]
