"""Pairwise-mask throughput: seeded AES-CTR masks against textbook sharing and a plain add.

Run:  python -m benchmarks.masking [--sizes 1000000 10000000] [--parties 3 5 10]

For each (n, d) it times, in the same run:
- mask: one party's y = x + sum_{j>i} PRG(k_ij) - sum_{j<i} PRG(k_ij), i.e. n - 1 AES-CTR
  streams (what mpcdp computes per upload);
- textbook: split(x, n) with the CSPRNG, i.e. n - 1 uniform vectors plus their sum (what a
  textbook party computes before sending n - 1 of them);
- plain add: x + y of two uint64 vectors (the floor: the coordinator must at least add).
It prints seconds, GB/s of keystream for the mask, and the ratios.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks._timing import best_of
from mpcdp.local.simulation import pair_keys_for
from mpcdp.mpc import sharing
from mpcdp.mpc.rng import csprng


def _row(n: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, repeat: int) -> str:
    keys = pair_keys_for(n, session_id=b"bench")
    mine = {j: keys[(0, j)] for j in range(1, n)}
    t_add = best_of(lambda: np.add(x, y), repeat=repeat)
    t_text = best_of(lambda: sharing.split(x, n=n, rng=rng), repeat=repeat)
    t_mask = best_of(
        lambda: sharing.mask(x, party=0, pair_keys=mine, round_id=0, tensor_id=0), repeat=repeat
    )
    gbs = (n - 1) * x.size * 8 / t_mask / 1e9
    return (
        f"{n:3d} {x.size:11,d} {t_mask:8.4f} {gbs:6.2f} {t_text:10.4f} {t_add:8.4f} "
        f"{t_mask / t_text:13.2f} {t_mask / t_add:9.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--parties", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = csprng()
    print(f"masking one upload, one core, best of {args.repeat}")
    print(
        f"{'n':>3s} {'d':>11s} {'mask s':>8s} {'GB/s':>6s} {'textbook s':>10s} "
        f"{'add s':>8s} {'mask/textbook':>13s} {'mask/add':>9s}"
    )
    for d in args.sizes:
        x = rng.integers(0, 2**64 - 1, size=d, dtype=np.uint64, endpoint=True)
        for n in args.parties:
            print(_row(n, x, x.copy(), rng, args.repeat))


if __name__ == "__main__":
    main()
