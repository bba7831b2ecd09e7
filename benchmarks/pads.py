"""One site's pad (noise share + pairwise masks) for a 9.4M-parameter model, old path against
the one-pass path, side by side in one run.

Run:  python -m benchmarks.pads [--params 9400000] [--repeat 5] [--threads 2] [--mu MU]

The rate is the digits plan's for this model (mpcdp.train.federated.plan_training: 3 sites,
epsilon 3, delta 1e-5, 20 epochs, the budget and length of the digits demo, as
benchmarks.federation_overhead sizes its pads), unless ``--mu`` is given; shares sized for
h = 2 honest sites, two peers' masks, Z_2^32.

Baseline, measured in the same run: the path the site engine took before the one-pass pads
(mpcdp.protocol.training.site_engine._pad_builder): the noise share drawn in 64K slices with
a transformed-rejection test per draw (mpcdp.dp.poisson._per_draw), encoded, then the
masks applied over the whole vector in a second pass; on one thread, and with its slices on
``--threads`` threads. Each row prints its time over the baseline on the same threads.
Also: the Poisson sampler alone at a few rates, the table against the per-draw path and
against numpy's (inexact above ~1e12) sampler, one thread.

``--device cuda`` (benchmarks/gpu_check.sh): the same share made by mpcdp.train.gpu_noise
(CSPRNG words on the CPU, the transform on the device), its words alone, and the one-pass CPU
pad, next to one DP step of benchmarks.dp_step's MLP (batch 64) on the same device.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from benchmarks._timing import best_of
from mpcdp.dp import poisson as P
from mpcdp.dp.mechanisms import Skellam
from mpcdp.dp.poisson_table import fill_poisson, poisson_table
from mpcdp.mpc import encoding, sharing
from mpcdp.mpc.rng import csprng
from mpcdp.protocol.noise_pool import fill_in_slices
from mpcdp.protocol.pads import build_pad

KEYS = {1: bytes(range(32)), 2: bytes(range(7, 39))}
SLICE = 1 << 16


def digits_plan_mu(num_params: int) -> float:
    """The Skellam mu of the digits demo's budget and length for a model of this size."""
    from mpcdp.train.federated import plan_training

    sites = ("site-a", "site-b", "site-c")
    plan = plan_training(
        dataset="ex", model="m", parties=sites, examples=[256] * 3, num_params=num_params,
        target_epsilon=3.0, target_delta=1e-5, epochs=20, batch_size=48, max_grad_norm=1.0,
    )  # fmt: skip
    return float(plan.mu)


def old_pad(size: int, lam: float, gen: np.random.Generator, workers: Executor | None) -> None:
    pad = np.empty(size, dtype=np.uint32)

    def fill(a: int, b: int, g: np.random.Generator) -> None:
        share = P._per_draw(lam, b - a, g)
        share -= P._per_draw(lam, b - a, g)
        pad[a:b] = encoding.to_ring(share, ring_bits=32)

    fill_in_slices(size=size, slice_size=SLICE, rng=gen, fill=fill, workers=workers)
    sharing.MaskStream(party=0, pair_keys=KEYS, round_id=1, tensor_id=0, ring_bits=32).apply(pad)


def wall_and_cpu(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Least wall time and least process CPU time over ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=9_400_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mu", type=float, default=None)
    ap.add_argument("--device", default=None, help="measure the device path (e.g. cuda)")
    args = ap.parse_args()
    d, h = args.params, 2
    mu = args.mu if args.mu is not None else digits_plan_mu(d)
    lam = mu / h / 2
    if args.device is not None:
        device_rows(d, mu, h, args.device, args.repeat, args.threads)
        return
    noise = Skellam(mu=mu, l1_sensitivity=1.0, l2_sensitivity=1.0)
    gen = csprng()
    table = poisson_table(lam)
    print(
        f"pad: {d:,} parameters, mu {mu:.4g} (Poisson rate {lam:.4g} per draw, h = {h}), "
        f"2 peers, Z_2^32; cores available {len(os.sched_getaffinity(0))}; best of {args.repeat}"
    )
    print(f"table: {table.center_bins} bins of 2^{table.shift}, acceptance {table.acceptance:.5f}")

    def new(workers: Executor | None) -> None:
        build_pad(size=d, ring_bits=32, noise=noise, honest=h, party=0, pair_keys=KEYS,
                  round_id=1, rng=gen, workers=workers)  # fmt: skip

    new(None)  # compiles (or loads) the loop
    rows: list[tuple[str, float, float, float, float]] = []
    with ThreadPoolExecutor(args.threads) as pool:
        for label, workers in (("1 thread", None), (f"{args.threads} threads", pool)):
            t_old, c_old = wall_and_cpu(lambda w=workers: old_pad(d, lam, gen, w), args.repeat)
            t_new, c_new = wall_and_cpu(lambda w=workers: new(w), args.repeat)
            rows.append((label, t_old, t_new, c_old, c_new))
    base_one = rows[0][1]
    print("wall s: best of the repeats; cpu s: the process's CPU time (all threads), least of them")
    print(f"{'threads':12s} {'old s':>8s} {'one-pass s':>11s} {'new/old':>8s} {'new/old@1':>10s} "
          f"{'Mcoord/s':>9s} {'old cpu s':>10s} {'new cpu s':>10s}")  # fmt: skip
    for label, t_old, t_new, c_old, c_new in rows:
        print(
            f"{label:12s} {t_old:8.3f} {t_new:11.3f} {t_new / t_old:8.3f} {t_new / base_one:10.3f}"
            f" {d / t_new / 1e6:9.1f} {c_old:10.3f} {c_new:10.3f}"
        )
    print(f"load average after the pads: {os.getloadavg()[0]:.1f}")
    n = 1_000_000
    pcg = np.random.default_rng()
    print(f"Poisson draws, one rate, {n:,} draws, one thread (numpy: PCG64, inexact above ~1e12)")
    print(f"{'rate':>10s} {'table s':>8s} {'per-draw s':>10s} {'numpy s':>8s} {'table/per':>9s} "
          f"{'table/numpy':>11s}")  # fmt: skip
    out = np.empty(n, dtype=np.int64)
    for rate in (10.0, 1e6, lam, 2.0**40, 2.0**44, 2.0**46):
        fill_poisson(out, lam=rate, rng=gen)  # builds the table
        t_tab = best_of(lambda r=rate: fill_poisson(out, lam=r, rng=gen), repeat=args.repeat)
        t_per = best_of(lambda r=rate: P._per_draw(r, n, gen), repeat=max(1, args.repeat // 2))
        t_np = best_of(lambda r=rate: pcg.poisson(r, n), repeat=args.repeat)
        print(f"{rate:10.3g} {t_tab:8.4f} {t_per:10.4f} {t_np:8.4f} {t_tab / t_per:9.3f} "
              f"{t_tab / t_np:11.2f}")  # fmt: skip


def device_rows(d: int, mu: float, h: int, device: str, repeat: int, threads: int) -> None:
    """The device path's share, next to a DP step on the same device (module docstring)."""
    import torch

    from benchmarks import dp_step
    from mpcdp.dp.poisson_table import csprng_words
    from mpcdp.train.gpu_noise import skellam_share_on_device

    dev = torch.device(device)
    gen = csprng()

    def timed(fn: object) -> float:
        def run() -> None:
            fn()  # type: ignore[operator]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        run()
        return best_of(run, repeat=repeat)

    t_share = timed(lambda: skellam_share_on_device(mu=mu / h, size=d, rng=gen, device=dev))
    t_words = timed(lambda: csprng_words(gen, int(2 * d * 1.01)))
    noise = Skellam(mu=mu, l1_sensitivity=1.0, l2_sensitivity=1.0)
    with ThreadPoolExecutor(threads) as pool:
        t_cpu = timed(
            lambda: build_pad(size=d, ring_bits=32, noise=noise, honest=h, party=0,
                              pair_keys=KEYS, round_id=1, rng=gen, workers=pool)
        )  # fmt: skip
    ns = argparse.Namespace(mlp_widths=[2048, 1536, 512])
    model, inputs = dp_step.build("mlp", ns)
    model = model.to(dev)
    x = inputs(64).to(dev)
    y = torch.randint(0, dp_step.CLASSES, (64,)).to(dev)
    step = dp_step.mpcdp_step(model, x, y)
    for _ in range(2):
        step()
    t_step = min(dp_step._timed(step, dev) for _ in range(repeat))
    n_step = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {dev} ({name}), {time.strftime('%Y-%m-%d')}; share of {d:,} coordinates, "
          f"mu/h {mu / h:.4g}")  # fmt: skip
    print(f"{'what':58s} {'s':>8s} {'/ DP step':>9s}")
    for label, t in (
        (f"DP step, MLP {n_step:,} parameters, batch 64 (dp_step)", t_step),
        ("Skellam share on the device (words on the CPU)", t_share),
        ("  of it: the CSPRNG words alone (CPU, one thread)", t_words),
        (f"one-pass CPU pad (share + 2 masks), {threads} threads", t_cpu),
    ):
        print(f"{label:58s} {t:8.4f} {t / t_step:9.2f}")


if __name__ == "__main__":
    main()
