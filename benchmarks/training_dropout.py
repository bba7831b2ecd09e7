"""What one site's failure adds to a federated DP-SGD step, against the no-fault steps of the
same run; and the accuracy a run reaches without faults (the chaos test's reference).

Run:  python -m benchmarks.training_dropout [--sites 4] [--repeat 3] [--deadline 2]
      python -m benchmarks.training_dropout --reference 20

``--sites`` ``mpcdp party serve`` processes on loopback (mTLS), each with the training tests'
40 examples (tests/training_support.py: 8 features, 3 classes), the model ``mlp:8,6,3``, and
a federation with ``min_parties`` = sites - 1. Each repetition trains 3 epochs (30 steps),
once without faults and once for each fault below, and reports per step:

- ``no fault``: the median step (the baseline);
- ``killed``: the step at which a site is killed (connection refused): the failed attempt,
  the other sites' health checks, a new session over the others and the re-run;
- ``stopped``: the step at which a site is stopped (SIGSTOP): the same, after the step's
  deadline (``--deadline``, the run's step_deadline_s) has passed;
- ``rejoin``: the step at which the killed site, restarted, rejoins: a new session over all
  sites, its first step carrying every parameter.

Prints the median over repetitions of each, and its added time over the no-fault step of the
same run. ``--reference N`` instead trains the chaos test's configuration N times without
faults and prints the final accuracies (mean, min). Timing is informative only (every site
shares this machine's cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mpcdp.config.party_config import load_federation_config
from mpcdp.federation import Federation
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.train.federated import StepInfo
from tests.training_support import MODEL, example_data

EVAL = example_data(7, n=90)


def _sites(workdir: Path, n: int) -> dict[str, str]:
    out = {}
    for i in range(n):
        p = f"site{i}"
        (workdir / p).mkdir(parents=True, exist_ok=True)
        x, y = example_data(i)
        np.savez(workdir / p / "ex.npz", x=x, y=y)
        out[p] = (
            '[datasets.ex]\npath = "ex.npz"\nnum_classes = 3\nepsilon = 100000.0\n'
            "delta = 1e-5\n[limits]\nsession_ttl_s = 5.0\n"
        )
    return out


def _federation(net: LocalFederation, min_parties: int) -> Federation:
    config = load_federation_config(net.federation_config)
    return Federation(dataclasses.replace(config, min_parties=min_parties))


def _run(
    net: LocalFederation,
    *,
    fault: str,
    epochs: int,
    deadline_s: float,
    epsilon: float = 8.0,
) -> tuple[list[float], float | None]:
    """Per-step seconds of one run (and its final accuracy), with ``fault`` at step 10 and,
    for a kill, the site restarted at step 15."""
    victim = sorted(net.processes)[-1]
    ends: list[float] = []

    def on_step(info: StepInfo) -> None:
        ends.append(time.perf_counter())
        if info.step == 10 and fault == "killed":
            net.kill(victim)
        elif info.step == 10 and fault == "stopped":
            net.processes[victim].send_signal(signal.SIGSTOP)
        elif info.step == 15 and fault == "killed":
            net.restart(victim)
        elif info.step == 15 and fault == "stopped":
            net.processes[victim].send_signal(signal.SIGCONT)

    with _federation(net, len(net.processes) - 1) as fed:
        t0 = time.perf_counter()
        result = fed.train(
            dataset="ex", model=MODEL, target_epsilon=epsilon, target_delta=1e-5,
            epochs=epochs, batch_size=16, learning_rate=0.05, eval_data=EVAL,
            step_deadline_s=deadline_s, rejoin_interval_s=0.2, on_step=on_step,
        )  # fmt: skip
    steps = [b - a for a, b in zip([t0, *ends[:-1]], ends, strict=True)]
    return steps, result.final_accuracy


def bench(*, sites: int, repeat: int, deadline_s: float) -> dict[str, Any]:
    rows: dict[str, list[float]] = {k: [] for k in ("no fault", "killed", "stopped", "rejoin")}
    with tempfile.TemporaryDirectory() as tmp:
        net = launch(workdir=Path(tmp), datasets_toml=_sites(Path(tmp), sites), deadline_s=30.0)
        try:
            for _ in range(repeat):
                base, _ = _run(net, fault="none", epochs=3, deadline_s=deadline_s)
                rows["no fault"].append(statistics.median(base[1:]))
                killed, _ = _run(net, fault="killed", epochs=3, deadline_s=deadline_s)
                rows["killed"].append(killed[10])
                # the rejoin step: the slowest after the restart (its session is new)
                rows["rejoin"].append(max(killed[16:]))
                stopped, _ = _run(net, fault="stopped", epochs=3, deadline_s=deadline_s)
                rows["stopped"].append(stopped[10])
                for proc in net.processes.values():
                    proc.send_signal(signal.SIGCONT)
        finally:
            net.stop()
    baseline = statistics.median(rows["no fault"])
    return {
        kind: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "added_s": statistics.median(v) - baseline,
            "ratio": statistics.median(v) / baseline,
        }
        for kind, v in rows.items()
    }


def reference(*, runs: int, epsilon: float) -> dict[str, Any]:
    accuracies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        net = launch(workdir=Path(tmp), datasets_toml=_sites(Path(tmp), 4), deadline_s=30.0)
        try:
            for _ in range(runs):
                _, acc = _run(net, fault="none", epochs=6, deadline_s=5.0, epsilon=epsilon)
                assert acc is not None
                accuracies.append(acc)
        finally:
            net.stop()
    return {
        "runs": runs,
        "mean": statistics.fmean(accuracies),
        "sd": statistics.stdev(accuracies),
        "min": min(accuracies),
        "max": max(accuracies),
        "accuracies": accuracies,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=2.0, help="the run's step_deadline_s")
    ap.add_argument("--reference", type=int, default=0, help="no-fault accuracy runs")
    ap.add_argument("--epsilon", type=float, default=30.0, help="target epsilon of --reference")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.reference:
        out = reference(runs=args.reference, epsilon=args.epsilon)
        sys.stdout.write(
            f"final accuracy over {out['runs']} no-fault runs at epsilon {args.epsilon:g}: "
            f"mean {out['mean']:.3f}, sd {out['sd']:.3f}, min {out['min']:.3f}, "
            f"max {out['max']:.3f}\n"
        )
    else:
        out = bench(sites=args.sites, repeat=args.repeat, deadline_s=args.deadline)
        sys.stdout.write(f"{'step':<10} {'median s':>9} {'min s':>7} {'added s':>8} {'ratio':>6}\n")
        for kind, r in out.items():
            sys.stdout.write(
                f"{kind:<10} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['added_s']:8.3f} "
                f"{r['ratio']:6.1f}\n"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
