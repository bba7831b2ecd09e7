"""The device path of the fixed-rate Poisson table (mpcdp.train.gpu_noise), on CPU torch:
its law at several rates and through the tails, a Skellam share, the documented word map
(the same integers as the compiled CPU loop for the same words), and the power of the law
tests against an off-by-one table and a biased word-to-index map on this path too.

Chance failure: alpha = 1e-8 per check, fewer than 40 checks (< 1e-6 in all)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from mpcdp.dp import poisson_table as PT
from mpcdp.mpc.rng import csprng
from mpcdp.train import gpu_noise as G
from tests.stats import chi_square_pvalue
from tests.unit.dp.test_poisson import mean_var_pvalues, poisson_pvalues

N = 200_000
CHECK_ALPHA = 1e-8
CPU = torch.device("cpu")


def rng(tag: int) -> np.random.Generator:
    return csprng(key=(3000 + tag).to_bytes(16, "little"))


@pytest.mark.parametrize("lam", [0.5, 150.5, 2.0**30 + 0.5, 2.631e11])
def test_law_on_cpu_torch(lam: float) -> None:
    x = G.poisson_on_device(lam=lam, size=N, rng=rng(int(lam) % 89), device="cpu")
    assert x.dtype == torch.int64 and x.device == CPU
    pvalues = poisson_pvalues(x.numpy(), lam)
    assert min(pvalues.values()) > CHECK_ALPHA, pvalues


def test_tails_on_cpu_torch() -> None:
    lam = 150.5
    table = PT._build(lam, 1.0)
    out = torch.zeros(30_000, dtype=torch.int64)
    G._fill(G._DeviceTable(table, CPU), out, rng(1))
    x = out.numpy()
    assert float(((x < table.lo) | (x >= table.hi)).mean()) > 0.02
    assert chi_square_pvalue(x, lambda k: stats.poisson.pmf(k, lam)) > CHECK_ALPHA


def test_a_skellam_share() -> None:
    mu = 2.0e9
    x = G.skellam_share_on_device(mu=mu, size=N, rng=rng(2), device="cpu").numpy()
    assert min(mean_var_pvalues(x, 0.0, mu, 1.0 / mu)) > CHECK_ALPHA


def test_the_same_words_give_the_cpu_loops_integers() -> None:
    """Words whose acceptance bits are 0 are accepted by the squeeze on both paths (where the
    bin's squeeze is not 0): the device and the compiled loop map them to the same integer."""
    t = PT.poisson_table(2.0**30 + 0.5)
    words = PT.csprng_words(rng(3), 20_000) & ~np.uint64((1 << t.lead_bits) - 1)
    dt = G._DeviceTable(t, CPU)
    k, accept, _ = G._round(dt, torch.from_numpy(words.view(np.int64)), rng(4))
    bins = (k.numpy() - t.lo) >> t.shift
    keep = accept.numpy() & (t.squeeze_lo[np.clip(bins, 0, t.center_bins - 1)] > 0)
    assert keep.mean() > 0.9
    cpu = np.empty(int(keep.sum()), dtype=np.int64)
    pending = np.empty((4, 3), dtype=np.int64)
    done, *_ = PT._kernel()(
        np.concatenate([words[keep], np.zeros(2, np.uint64)]), cpu, 0, cpu.size, 0, 0, False,
        pending, *PT._table_args(t),
    )  # fmt: skip
    assert done == cpu.size
    assert np.array_equal(k.numpy()[keep], cpu)


def _rejected(table: PT.PoissonTable, lam: float, tag: int, bias: Any = None) -> bool:
    def words(g: np.random.Generator, n: int) -> Any:
        w = PT.csprng_words(g, n)
        return w if bias is None else bias(w)

    out = torch.zeros(N, dtype=torch.int64)
    G._fill(G._DeviceTable(table, CPU), out, rng(tag), words)
    return min(poisson_pvalues(out.numpy(), lam).values()) < CHECK_ALPHA


def test_power_against_broken_tables_and_maps() -> None:
    lam = 150.5
    good = PT.poisson_table(lam)
    assert not _rejected(good, lam, 5)
    assert _rejected(replace(good, lo=good.lo - 1), lam, 6)
    assert _rejected(good, lam, 7, lambda w: w & ~np.uint64(1 << 52))  # even columns only
    assert _rejected(good, lam, 8, lambda w: w | np.uint64(1 << 51))  # thresholds biased up
