"""Noise-share sampling throughput: mpcdp's CSPRNG samplers against numpy's own.

Run:  python -m benchmarks.noise_sampling [--size 1000000] [--repeat 5]

A last line compares a Skellam share drawn in slices on one thread with the same on all the
cores a party would use (noise_pool.default_noise_threads), the baseline being one thread.

Baseline, measured in the same run: the same distribution drawn with numpy's default
generator (PCG64, not cryptographically secure, so mpcdp never uses it for noise) and numpy's
own samplers (whose Poisson is not exact at large rates, mpcdp.dp.poisson). mpcdp's Skellam
and Poisson rows take the fixed-rate table (mpcdp.dp.poisson_table: 4,096 draws or more at
one rate); benchmarks.pads compares it with the per-draw path. The ratio
mpcdp / baseline is the price of a secure stream and of exact Poisson draws; the absolute
times are for this machine only.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks._timing import best_of
from mpcdp.dp.mechanisms import DiscreteGaussian, DiscreteLaplace, Skellam
from mpcdp.dp.poisson import poisson
from mpcdp.mpc.rng import csprng
from mpcdp.protocol.noise_pool import default_noise_threads, fill_in_slices


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    d, h = args.size, 2
    secure = csprng()
    pcg = np.random.default_rng()
    mu = 2.0**20
    a = math.exp(-1.0 / 1000)
    sigma = 1000.0
    rows = [
        (
            f"Skellam share, mu/h={mu / h:g}",
            lambda: Skellam(mu=mu, l1_sensitivity=1.0, l2_sensitivity=1.0).share(
                size=d, honest=h, rng=secure
            ),
            lambda: pcg.poisson(mu / h / 2, d) - pcg.poisson(mu / h / 2, d),
        ),
        (
            "discrete Laplace share (Polya diff), h=2",
            lambda: DiscreteLaplace(epsilon=1.0, l1_sensitivity=1000).share(
                size=d, honest=h, rng=secure
            ),
            lambda: pcg.negative_binomial(1 / h, 1 - a, d) - pcg.negative_binomial(1 / h, 1 - a, d),
        ),
        (
            f"discrete Gaussian share, sigma/sqrt(h)={sigma / math.sqrt(h):.0f}",
            lambda: DiscreteGaussian(
                sigma=sigma, l1_sensitivity=1, l2_sensitivity=1, dim=d, honest=h
            ).share(size=d, honest=h, rng=secure),
            lambda: np.rint(pcg.normal(0, sigma / math.sqrt(h), d)).astype(np.int64),
        ),
        (
            "Poisson, rate 1e11 (table; numpy inexact here)",
            lambda: poisson(lam=1e11, size=d, rng=secure),
            lambda: pcg.poisson(1e11, d),
        ),
        (
            "Poisson, rate 4e12 (table; numpy inexact)",
            lambda: poisson(lam=4e12, size=d, rng=secure),
            lambda: pcg.poisson(4e12, d),
        ),
        (
            "uniform uint64 words",
            lambda: secure.integers(0, 2**64 - 1, size=d, dtype=np.uint64, endpoint=True),
            lambda: pcg.integers(0, 2**64 - 1, size=d, dtype=np.uint64, endpoint=True),
        ),
    ]
    print(f"noise sampling, d={d:,} coordinates, one core, best of {args.repeat}")
    print(f"{'what':48s} {'mpcdp s':>9s} {'numpy s':>9s} {'ratio':>7s} {'Mcoord/s':>9s}")
    for name, ours, base in rows:
        t_base = best_of(base, repeat=args.repeat)
        t_ours = best_of(ours, repeat=args.repeat)
        print(
            f"{name:48s} {t_ours:9.4f} {t_base:9.4f} {t_ours / t_base:7.2f} {d / t_ours / 1e6:9.1f}"
        )
    print("baseline for the Gaussian row is a rounded continuous Gaussian (not a discrete one)")
    # a party draws a share in 256K-coordinate slices on its cores (noise_pool.fill_in_slices)
    skellam = Skellam(mu=mu, l1_sensitivity=1.0, l2_sensitivity=1.0)
    out = np.empty(d, dtype=np.int64)

    def fill(a: int, b: int, gen: np.random.Generator) -> None:
        out[a:b] = skellam.share(size=b - a, honest=h, rng=gen)

    threads = default_noise_threads()
    with ThreadPoolExecutor(threads) as pool:

        def sliced(workers: ThreadPoolExecutor | None) -> None:
            fill_in_slices(size=d, slice_size=1 << 18, rng=secure, fill=fill, workers=workers)

        t_one = best_of(lambda: sliced(None), repeat=args.repeat)
        t_all = best_of(lambda: sliced(pool), repeat=args.repeat)
    print(
        f"Skellam share in 256K slices: one thread {t_one:.4f} s, {threads} threads "
        f"{t_all:.4f} s, speed-up {t_one / t_all:.2f}x"
    )


if __name__ == "__main__":
    main()
