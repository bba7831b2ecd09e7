"""What secure aggregation + distributed noise add to a DP-SGD step, for a ~10M-parameter model.

Run:  python -m benchmarks.federation_overhead [--model mlp:2048,2048,2048,512,10]
                                               [--examples 256] [--batch-size 48]
                                               [--steps 8] [--warmup 2] [--repeat 3]
                                               [--settle auto] [--json out.json]

In the same run, on this machine:
- local: one process computes a DP-SGD step on a batch of ``--batch-size`` examples
  (book-keeping per-example clipping, randomized rounding, SGD update) — the work a site
  does anyway, without any federation;
- 3 local at once: three processes, started together, each computing that local step on a
  third of the batch with the thread count a party process gets here
  (mpcdp.local.localnet: cores / parties, at least 1): the same gradient work as the federated
  step, on the same shared cores, without the federation;
- federated: three site processes (`mpcdp party serve`, real mTLS gRPC on loopback), each
  with ``--examples`` examples, train the same model with an expected total batch of
  ``--batch-size`` (sample rate batch / (3 * examples)); per step the coordinator sends the
  parameters, every site computes its clipped gradient sum, adds its Skellam share and its
  pairwise masks (built in the background after its previous upload) and uploads; the
  coordinator sums, decodes and applies SGD. Two timings, median per step after
  ``--warmup`` steps: back to back (the next step starts at once, so on a machine with few
  cores the sites' background noise competes with the gradients), and "pads ready": the
  coordinator waits ``--settle`` seconds before each timed step so that every site's noise
  share and masks are built, which is what a site with spare cores (or a GPU doing the
  gradients) gets; the wait is not timed;
- pad: the time one site needs to build the noise share + masks of one step for this model
  at the mu of a realistic plan (epsilon 3, 20 epochs; one core; it runs off the critical
  path, in parallel 1M-coordinate slices);
- plaintext federated: the same sites' examples served by benchmarks/plaintext_party.py over
  the same mTLS gRPC, clipped sums in the clear, central noise at the coordinator; and
  transport only: the same, but the sites send zeros without computing a gradient (what
  moving parameters down and sums up costs, with the coordinator's loop).
Ratios: federated back to back / local, and federated with pads ready / 3 local at once:
what the federation adds to the same gradient work on the same cores (the target is <= 1.15
for the federation overhead). BENCHMARKS.md says which machine produced each number.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import plaintext_party
from benchmarks._timing import best_of
from benchmarks.dp_step import client_step
from mpcdp.federation import Federation
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.protocol.training import TrainingSession
from mpcdp.train.clipping import PerSampleClipper
from mpcdp.train.federated import plan_training, set_flat_gradients
from mpcdp.train.models import build_model, check_model_spec
from mpcdp.transport import codec

SITES = ("site-a", "site-b", "site-c")


def _data(n: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, size=n)


def _local_step(model: str, batch: int, seed: int) -> tuple[Callable[[], None], int]:
    """One local DP-SGD step of ``model`` on ``batch`` random examples (a site's own work:
    benchmarks.dp_step's client step), and the number of parameters it trains."""
    _, widths = check_model_spec(model)
    net = build_model(model)
    x, y = _data(batch, widths[0], widths[-1], seed)
    step = client_step(net, torch.from_numpy(x), torch.from_numpy(y))
    return step, sum(p.numel() for p in net.parameters() if p.requires_grad)


def local_step_time(model: str, batch: int, repeat: int) -> tuple[float, int]:
    step, num_params = _local_step(model, batch, 0)
    step()
    return best_of(step, repeat=repeat), num_params


def _concurrent_worker(
    model: str, batch: int, threads: int, steps: int, start: Any, out: Any, seed: int
) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    step, _ = _local_step(model, batch, seed)
    step()  # warm-up, before the common start
    start.wait()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out.put(times)


def concurrent_local_step_time(model: str, batch: int, sites: int, steps: int) -> float:
    """Median over steps of the slowest of ``sites`` processes, each running the local DP
    step on ``batch / sites`` examples with a party process's thread count, all at once."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(sites), ctx.Queue()
    threads = max(
        1, (os.cpu_count() or 1) // sites
    )  # as mpcdp.local.localnet gives party processes
    per_site = max(1, round(batch / sites))
    procs = [
        ctx.Process(
            target=_concurrent_worker, args=(model, per_site, threads, steps, start, out, i)
        )
        for i in range(sites)
    ]
    for pr in procs:
        pr.start()
    runs = [out.get(timeout=1800) for _ in procs]
    for pr in procs:
        pr.join()
    return statistics.median(max(r[k] for r in runs) for k in range(steps))


def pad_mu(num_params: int, examples: int, batch: int) -> float:
    """The Skellam mu of a realistic plan for this model: epsilon 3, delta 1e-5, 20 epochs
    over the three sites' examples (the digits demo's budget and length)."""
    plan = plan_training(
        dataset="ex", model="m", parties=SITES, examples=[examples] * len(SITES),
        num_params=num_params, target_epsilon=3.0, target_delta=1e-5, epochs=20,
        batch_size=batch, max_grad_norm=1.0,
    )  # fmt: skip
    return plan.mu


def pad_time(num_params: int, mu: float, repeat: int) -> float:
    """One site's noise share + masks for one step (what the background thread builds)."""
    from mpcdp.dp.mechanisms import Skellam
    from mpcdp.mpc import encoding, sharing
    from mpcdp.mpc.rng import csprng

    noise = Skellam(mu=mu, l1_sensitivity=1.0, l2_sensitivity=1.0)
    keys = {1: bytes(32), 2: bytes(range(32))}
    rng = csprng()

    def build() -> None:
        pad = encoding.to_ring(noise.share(size=num_params, honest=2, rng=rng), ring_bits=32)
        sharing.MaskStream(party=0, pair_keys=keys, round_id=1, tensor_id=0, ring_bits=32).apply(
            pad
        )

    return best_of(build, repeat=repeat)


def plaintext_step_times(
    net: LocalFederation,
    model: str,
    sample_rate: float,
    batch: int,
    steps: int,
    *,
    transport_only: bool = False,
) -> list[float]:
    """Plaintext federated DP-SGD over the same transport: the same three sites' examples,
    each served by benchmarks/plaintext_party.py (clipped gradient sums in the clear, float32,
    no rounding, noise share or mask); the coordinator adds central Gaussian noise (std C:
    its cost, not its value, matters here) and applies SGD. ``transport_only``: the sites
    send zeros instead of computing a gradient (the transport and the coordinator's loop)."""
    threads = max(1, (os.cpu_count() or 1) // len(SITES))  # as localnet's party processes
    args: tuple[str, ...] = ("--train-model", model, "--sample-rate", str(sample_rate))
    if transport_only:
        args += ("--transport-only",)
    with plaintext_party.running(net, SITES, *args, threads=threads) as plain:
        stubs = plain.stubs
        module = build_model(model)
        params = list(module.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        times = []
        n = sum(p.numel() for p in params)
        sent, noise = torch.empty(n), torch.empty(n)  # reused, as the federated loop does
        total = np.empty(n, dtype=np.float32)
        with ThreadPoolExecutor(len(SITES)) as pool:
            for k in range(steps):
                t0 = time.perf_counter()
                flat = torch.cat([p.detach().reshape(-1) for p in params], out=sent).numpy()
                total.fill(0)
                lock = threading.Lock()

                def one(
                    site: str,
                    step: int = k,
                    values: np.ndarray = flat,
                    total: np.ndarray = total,
                    lock: threading.Lock = lock,
                ) -> None:
                    requests = codec.encode_step_requests(
                        session_id=b"p" * 16, step=step, keys=[], parameters=values,
                        full=step == 0,
                    )  # fmt: skip
                    offset = 0
                    for msg in stubs[site].TrainStep(requests, timeout=600):
                        if msg.WhichOneof("body") == "data":
                            x = np.frombuffer(msg.data, dtype=np.float32)
                            with lock:
                                total[offset : offset + x.size] += x
                            offset += x.size

                list(pool.map(one, SITES))
                g = torch.from_numpy(total).add_(torch.randn(n, out=noise)).div_(float(batch))
                set_flat_gradients(params, g)
                opt.step()
                times.append(time.perf_counter() - t0)
        return times


def federated_step_time(
    model: str, examples: int, batch: int, steps: int, warmup: int, settle: float
) -> tuple[float, float, list[float], list[float], list[float], list[float]]:
    """Median step time back to back and with pads ready (``settle`` s untimed before each
    step), every step's time of both phases, the plaintext federated steps' times and the
    transport-only steps' times."""
    _, widths = check_model_spec(model)
    with tempfile.TemporaryDirectory(prefix="mpcdp-bench-") as tmp:
        root = Path(tmp)
        toml = {}
        for i, site in enumerate(SITES):
            (root / site).mkdir()
            x, y = _data(examples, widths[0], widths[-1], i + 1)
            np.savez(root / site / "ex.npz", x=x, y=y)
            toml[site] = (
                f'[datasets.ex]\npath = "ex.npz"\nnum_classes = {widths[-1]}\n'
                "epsilon = 1000.0\ndelta = 1e-5\n"
            )
        with launch(workdir=root, datasets_toml=toml, deadline_s=600.0) as net:
            with Federation.from_config(net.federation_config) as fed:
                torch.manual_seed(0)
                module = build_model(model)
                clipper = PerSampleClipper(module, max_grad_norm=1.0)
                plan = plan_training(
                    dataset="ex", model=model, parties=SITES, examples=[examples] * 3,
                    num_params=clipper.num_params, target_epsilon=100.0, target_delta=1e-5,
                    epochs=(2 * steps + warmup + 1) * batch / (3 * examples), batch_size=batch,
                    max_grad_norm=1.0,
                )  # fmt: skip
                session = TrainingSession(
                    spec=plan.spec(run_id="bench", start_step=0, steps=plan.steps),
                    clients=fed.clients,
                )
                session.open()
                params = [p for _, p in clipper.named_parameters()]
                opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
                back, ready = [], []
                full = True
                # the buffers mpcdp.train.federated.train reuses
                sent = torch.empty(clipper.num_params)
                words = np.empty(clipper.num_params, dtype=np.uint32)
                grad = torch.empty(clipper.num_params)
                scale = 1.0 / (2.0**plan.scale_bits * plan.expected_batch_size)
                for k in range(min(plan.steps, 2 * steps + warmup)):
                    if k >= steps + warmup:
                        time.sleep(settle)  # let every site finish its pad (not timed)
                    t0 = time.perf_counter()
                    torch.cat([p.detach().reshape(-1) for p in params], out=sent)
                    total = session.step(parameters=sent.numpy(), full=full, out=words)
                    full = False
                    set_flat_gradients(params, grad.copy_(torch.from_numpy(total)).mul_(scale))
                    opt.step()
                    (back if k < steps + warmup else ready).append(time.perf_counter() - t0)
                session.close()
            plain = plaintext_step_times(net, model, plan.sample_rate, batch, steps + warmup)
            wire = plaintext_step_times(
                net, model, plan.sample_rate, batch, steps + warmup, transport_only=True
            )
    return statistics.median(back[warmup:]), statistics.median(ready), back, ready, plain, wire


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp:2048,2048,2048,512,10")
    ap.add_argument("--examples", type=int, default=256, help="examples per site")
    ap.add_argument("--batch-size", type=int, default=48, help="expected total batch")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per federated phase")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--settle",
        default="auto",
        help="untimed seconds before each 'pads ready' step (auto: 2 x the pad time x sites "
        "/ cores, at least 0.2)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    local, num_params = local_step_time(args.model, args.batch_size, args.repeat)
    together = concurrent_local_step_time(args.model, args.batch_size, len(SITES), args.steps)
    mu = pad_mu(num_params, args.examples, args.batch_size)
    pad = pad_time(num_params, mu, args.repeat)
    cores = os.cpu_count() or 1
    settle = max(0.2, 2 * pad * len(SITES) / cores) if args.settle == "auto" else float(args.settle)
    fed, fed_ready, back, ready, plain_steps, wire_steps = federated_step_time(
        args.model, args.examples, args.batch_size, args.steps, args.warmup, settle
    )
    plain = statistics.median(plain_steps[args.warmup :])
    wire = statistics.median(wire_steps[args.warmup :])
    per_site = max(1, round(args.batch_size / len(SITES)))
    threads = max(1, cores // len(SITES))
    print(f"model {args.model}: {num_params:,} parameters, expected batch {args.batch_size}")
    print(f"{cores} cores; local: 1 process, {torch.get_num_threads()} threads")
    rows = [
        ("local DP step", local, f"batch {args.batch_size}"),
        (
            "3 local DP steps at once",
            together,
            f"3 processes x batch {per_site}, {threads} thread(s) each",
        ),
        ("federated, back to back", fed, "median after warm-up"),
        ("federated, pads ready", fed_ready, f"median; {settle:.2f} s untimed before each"),
        (
            "one site pad (off path)",
            pad,
            f"noise share + masks, one core; mu {mu:.3g} (epsilon 3, 20 epochs), "
            f"Poisson rate {mu / 4:.3g}",
        ),
        ("plaintext federated", plain, "same sites and transport, sums in the clear"),
        ("transport only", wire, "the same, sites send zeros instead of a gradient"),
    ]
    for name, value, note in rows:
        print(f"{name:>28}: {value * 1e3:9.1f} ms  ({note})")
    print(f"ratio federated back to back / local: {fed / local:.2f}x")
    print(
        f"ratio federated with pads ready / 3 local at once: {fed_ready / together:.2f}x "
        "(target <= 1.15)"
    )
    print(
        f"ratio federated with pads ready / plaintext federated: {fed_ready / plain:.2f}x "
        "(what secure aggregation and distributed noise add to federated DP-SGD)"
    )
    print(
        f"transport only / federated with pads ready: {wire / fed_ready:.0%} of the step is "
        "moving parameters and sums (and the coordinator's loop)"
    )
    if args.json:
        out: dict[str, Any] = {
            "model": args.model,
            "num_params": num_params,
            "batch_size": args.batch_size,
            "cores": cores,
            "local_s": local,
            "local_together_s": together,
            "federated_s": fed,
            "federated_ready_s": fed_ready,
            "settle_s": settle,
            "federated_steps_s": back,
            "federated_ready_steps_s": ready,
            "pad_s": pad,
            "pad_mu": mu,
            "ratio": fed / local,
            "ratio_ready_over_together": fed_ready / together,
            "plaintext_s": plain,
            "plaintext_steps_s": plain_steps,
            "ratio_ready_over_plaintext": fed_ready / plain,
            "transport_only_s": wire,
            "transport_only_steps_s": wire_steps,
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
