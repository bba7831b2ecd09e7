"""What secure aggregation + distributed noise add to a DP-SGD step, for a ~10M-parameter model.

Run:  python -m benchmarks.federation_overhead [--model mlp:2048,2048,2048,512,10]
                                               [--examples 256] [--batch-size 48]
                                               [--steps 8] [--repeat 3] [--json out.json]

In the same run, on this machine:
- local: one process computes a DP-SGD step on a batch of ``--batch-size`` examples
  (book-keeping per-example clipping, randomized rounding, SGD update) — the work a site
  does anyway, without any federation;
- federated: three site processes (`mpcdp party serve`, real mTLS gRPC on loopback), each
  with ``--examples`` examples, train the same model with an expected total batch of
  ``--batch-size`` (sample rate batch / (3 * examples)); per step the coordinator sends the
  parameters, every site computes its clipped gradient sum, adds its Skellam share and its
  pairwise masks (built in the background during the previous step) and uploads; the
  coordinator sums, decodes and applies SGD. Reported: median wall time per step after
  ``--warmup`` steps.
- pad: the time one site needs to build the noise share + masks of one step for this model
  (it runs off the critical path, in parallel slices; on a machine with few cores it
  competes with the gradient for the CPU).
The ratio federated/local is the federation's overhead (target <= 1.15). On a machine whose
cores are shared by all three sites and the coordinator (CI: 2 cores) the sites' gradients
also compete with each other, so the ratio is pessimistic there; BENCHMARKS.md says which
machine produced each number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._timing import best_of
from mpcdp.federation import Federation
from mpcdp.localnet import launch
from mpcdp.protocol.training import TrainingSession
from mpcdp.train.clipping import PerSampleClipper
from mpcdp.train.federated import plan_training
from mpcdp.train.models import build_model, check_model_spec

SITES = ("site-a", "site-b", "site-c")


def _data(n: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, size=n)


def local_step_time(model: str, batch: int, repeat: int) -> tuple[float, int]:
    _, widths = check_model_spec(model)
    net = build_model(model)
    clipper = PerSampleClipper(net, max_grad_norm=1.0)
    params = [p for _, p in clipper.named_parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x, y = _data(batch, widths[0], widths[-1], 0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> None:
        out = clipper.clipped_grad_sum(
            inputs=xt, targets=yt, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none")
        )
        scaled = out.grad_sum.mul_(2.0**16)  # the site's exact float32 rounding
        low = torch.floor(scaled)
        frac = scaled.sub_(low)
        g = low.add_(torch.rand_like(frac).lt_(frac).to(low.dtype)).div_(2.0**16 * batch)
        offset = 0
        for p in params:
            p.grad = g[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        opt.step()

    step()
    return best_of(step, repeat=repeat), clipper.num_params


def pad_time(num_params: int, repeat: int) -> float:
    """One site's noise share + masks for one step (what the background thread builds)."""
    from mpcdp import encoding, sharing
    from mpcdp.dp.mechanisms import Skellam
    from mpcdp.rng import csprng

    noise = Skellam(mu=1e13, l1_sensitivity=1.0, l2_sensitivity=1.0)
    keys = {1: bytes(32), 2: bytes(range(32))}
    rng = csprng()

    def build() -> None:
        pad = encoding.to_ring(noise.share(size=num_params, honest=2, rng=rng), ring_bits=32)
        sharing.MaskStream(party=0, pair_keys=keys, round_id=1, tensor_id=0, ring_bits=32).apply(
            pad
        )

    return best_of(build, repeat=repeat)


def federated_step_time(
    model: str, examples: int, batch: int, steps: int, warmup: int
) -> tuple[float, list[float]]:
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
                    epochs=(steps + warmup + 1) * batch / (3 * examples), batch_size=batch,
                    max_grad_norm=1.0,
                )  # fmt: skip
                session = TrainingSession(
                    spec=plan.spec(run_id="bench", start_step=0, steps=plan.steps),
                    clients=fed.clients,
                )
                session.open()
                params = [p for _, p in clipper.named_parameters()]
                opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
                times = []
                full = True
                for _ in range(min(plan.steps, steps + warmup)):
                    t0 = time.perf_counter()
                    flat = torch.nn.utils.parameters_to_vector(params).detach().numpy()
                    total = session.step(parameters=flat, full=full)
                    full = False
                    g = torch.from_numpy(total / 2.0**plan.scale_bits / plan.expected_batch_size)
                    offset = 0
                    for p in params:
                        p.grad = g[offset : offset + p.numel()].view_as(p).float()
                        offset += p.numel()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                session.close()
    return statistics.median(times[warmup:]), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp:2048,2048,2048,512,10")
    ap.add_argument("--examples", type=int, default=256, help="examples per site")
    ap.add_argument("--batch-size", type=int, default=48, help="expected total batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    local, num_params = local_step_time(args.model, args.batch_size, args.repeat)
    pad = pad_time(num_params, args.repeat)
    fed, all_times = federated_step_time(
        args.model, args.examples, args.batch_size, args.steps, args.warmup
    )
    print(f"model {args.model}: {num_params:,} parameters, expected batch {args.batch_size}")
    print(f"{'local DP step':>28}: {local * 1e3:9.1f} ms")
    print(f"{'federated step (3 sites)':>28}: {fed * 1e3:9.1f} ms  (median after warm-up)")
    print(f"{'one site pad (off path)':>28}: {pad * 1e3:9.1f} ms")
    print(f"ratio federated/local: {fed / local:.2f}x  (target <= 1.15)")
    if args.json:
        out: dict[str, Any] = {
            "model": args.model,
            "num_params": num_params,
            "batch_size": args.batch_size,
            "local_s": local,
            "federated_s": fed,
            "federated_steps_s": all_times,
            "pad_s": pad,
            "ratio": fed / local,
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
