"""Cost of the clipper's first-use checks: a fresh clipper's first step against its next one.

Run:  python -m benchmarks.first_use_checks [--models mlp cnn transformer] [--batch-size B]
                                            [--repeat 5] [--device cpu|cuda] [--threads N]
                                            [--autocast none|bf16] [--before DIR] [--rounds R]
                                            [--clock wall|cpu]

On its first batch of two or more examples, :class:`mpcdp.train.clipping.PerSampleClipper`
probes the model: its step on the whole batch is the reference, and random parts of the
batch run again with weighted losses (outputs, losses and output gradients compared row by
row, the per-layer sums against autograd's on one example, the autograd graph walked once):
see :mod:`mpcdp.train.clipping.checks`. A site pays
this once per training session. For each model of ``benchmarks.dp_step`` (same definitions
and defaults), in the same run: a new clipper's first ``clipped_grad_sum`` and the same
clipper's second one on the same batch, best of ``--repeat`` rounds. Printed: both times,
and a plain non-private step of the same model and batch (forward, mean loss, backward),
with the ratios first / next and first / plain, and the median and range of first / plain
over the rounds (each round's plain step runs just before its first step, so a machine
shared with other work moves both alike; its gradients are freed, untimed, before the
clipper's steps, which run as in a DP session, without them). Absolute times are for this
machine only; the ratio is what carries over. ``--autocast bf16`` runs every call under bf16
autocast: on a GPU this is also the check that honest models pass the comparison at
half-precision tolerance (a refusal would stop the run with its message).

``--before DIR`` (a copy of the repository, e.g. ``git archive``) measures that tree too, in
worker processes that alternate with this tree's ``--rounds`` times, so both see the same
load; every time printed is then the best of all the rounds. ``--clock cpu`` times the
process's CPU time (user and system, page faults included) instead of the wall clock: with
``--threads 1`` that is one thread's work, which other processes on a shared machine move
far less than the wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.dp_step import CLASSES, MODEL_NAMES, build
from mpcdp.train.clipping import PerSampleClipper

#: per measure ("first", "next", "plain"): seconds, one per round
Times = dict[str, list[float]]


def _ce(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, targets, reduction="none")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(kind: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    if kind == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(name: str, args: argparse.Namespace, device: torch.device) -> Times:
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, inputs = build(name, args)
    model = model.to(device)
    x = inputs(args.batch_size).to(device)
    y = torch.randint(0, CLASSES, (args.batch_size,), device=device)
    times: Times = {"first": [], "next": [], "plain": []}
    for _ in range(args.repeat):
        # a plain (non-private) step: forward, mean loss, backward into .grad
        _sync(device)
        t0 = clock()
        with _autocast(args.autocast, device):
            model.zero_grad(set_to_none=True)
            _ce(model(x), y).mean().backward()  # type: ignore[no-untyped-call]
        _sync(device)
        times["plain"].append(clock() - t0)
        # a DP session has no non-private step's gradients alive (untimed)
        model.zero_grad(set_to_none=True)
        clipper = PerSampleClipper(model, max_grad_norm=1.0)
        for key in ("first", "next"):
            _sync(device)
            t0 = clock()
            with _autocast(args.autocast, device):
                clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=_ce)
            _sync(device)
            times[key].append(clock() - t0)
    model.zero_grad(set_to_none=True)
    return times


def _in_worker(tree: Path, argv: list[str]) -> dict[str, Times]:
    """This script's measures of ``tree``'s package (its ``mpcdp`` and ``benchmarks``
    first on the path) in a process of its own."""
    here = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys([str(tree), str(here)])))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker"]
    out = subprocess.run(cmd, env=env, cwd=tree, check=True, capture_output=True, text=True)
    result: dict[str, Times] = json.loads(out.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # the model sizes of benchmarks.dp_step's defaults
    args.mlp_widths, args.vocab, args.seq_len, args.dim, args.layers = (
        [2048, 1536, 512],
        8192,
        64,
        256,
        2,
    )
    device = torch.device(args.device)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 64
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps({name: measure(name, args, device) for name in args.models}))
        return
    here = Path(__file__).resolve().parent.parent
    trees = {"this": here} if args.before is None else {"before": args.before, "this": here}
    results: dict[str, dict[str, Times]] = {tree: {} for tree in trees}
    if args.before is None and args.rounds == 1:
        results["this"] = {name: measure(name, args, device) for name in args.models}
    else:
        argv = ["--models", *args.models, "--device", args.device]
        argv += ["--batch-size", str(args.batch_size), "--repeat", str(args.repeat)]
        argv += ["--autocast", args.autocast, "--clock", args.clock]
        argv += ["--threads", str(args.threads)] if args.threads is not None else []
        for _ in range(args.rounds):
            for tree, path in trees.items():
                for name, times in _in_worker(path.resolve(), argv).items():
                    kept = results[tree].setdefault(name, {"first": [], "next": [], "plain": []})
                    for key, values in times.items():
                        kept[key] += values
    rounds = args.repeat * args.rounds
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device {device}, batch {args.batch_size}, best of {rounds}, autocast", end=" ")
    print(f"{args.autocast}, clock {args.clock}{load}")
    print(
        f"{'model':<18} {'tree':<6} {'first ms':>9} {'next ms':>9} {'plain ms':>9} "
        f"{'first/next':>11} {'first/plain':>12}  per round: median [min, max]"
    )
    for name in args.models:
        for tree in trees:
            t = results[tree][name]
            first, after, plain = min(t["first"]), min(t["next"]), min(t["plain"])
            ratios = [f / p for f, p in zip(t["first"], t["plain"], strict=True)]
            print(
                f"{name:<18} {tree:<6} {first * 1e3:>9.1f} {after * 1e3:>9.1f} "
                f"{plain * 1e3:>9.1f} {first / after:>11.2f} {first / plain:>12.2f}  "
                f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"
            )


if __name__ == "__main__":
    main()
