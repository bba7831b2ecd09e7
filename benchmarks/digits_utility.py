"""Utility on digits: mpcdp federated DP-SGD against Opacus central DP-SGD and non-private.

Run:  python -m benchmarks.digits_utility [--seeds 3] [--epsilons 1 3] [--epochs 20]
                                          [--opacus-accountant prv] [--quick] [--json out.json]

Data: scikit-learn's digits, the fixed 80/20 split of
:func:`mpcdp.demos.digits_demo.load_digits_split` (1,438 training and 359 test examples),
model ``mlp:64,128,10`` (9,610 parameters), delta 1e-5, accuracy on the test split. For
every seed (0 .. --seeds - 1), in the same run:

- non-private, central: the same MLP, SGD momentum 0.9, lr --nonprivate-lr, batch 64,
  --nonprivate-epochs epochs over all training examples: the reference;
- mpcdp, federated: :func:`mpcdp.demos.digits_demo.run` at each --epsilons: three party-node
  processes (mTLS gRPC) holding a third of the training examples each, Poisson sampling,
  expected total batch 64, --epochs epochs, lr 0.03, momentum 0.9, C = 1, Skellam noise
  sized so that any 2 honest sites of 3 suffice (mpcdp's defaults);
- Opacus, central: ``PrivacyEngine.make_private_with_epsilon`` with the same
  hyper-parameters (Poisson sampling, expected batch 64, --epochs epochs, lr 0.03, momentum
  0.9, C = 1) on the union of the three sites' examples, at each --epsilons. Opacus sets its
  sample rate to 1 / len(data loader) = 1/23 (mpcdp: 64/1438 = 1/22.5), so it runs 23 steps
  per epoch where mpcdp runs 22.5;
- warm start: :func:`mpcdp.demos.digits_demo.run` with ``public_fraction`` 0.05 (72 training
  examples public, held by the coordinator for a non-private warm start; the sites share
  the rest) at --warm-epsilon, against the run without public data at the same epsilon.

Printed: accuracy mean ± std (over seeds) per configuration; the gap federated − Opacus in
percentage points; the noise each side adds (std of the noise on the sum of clipped
gradients, over C) and where mpcdp's extra comes from (the factor sqrt(n/h) = sqrt(3/2) of
shares sized for 2 honest of 3 sites, the integer quantization of the gradients, and the
Skellam accountant's general subsampling bound against the Gaussian one); the error increase
of DP over non-private with and without the warm start, and their ratio. Everything goes to
--json. One federated run takes 15-60 s on a 2-core machine (much of it starting the party
processes); the default configuration runs 9 of them, about 3-10 minutes in all.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mpcdp.demos import digits_demo
from mpcdp.dp import accountant
from mpcdp.protocol.training import sensitivities
from mpcdp.train.federated import evaluate, pretrain_public
from mpcdp.train.models import build_model

MODEL = "mlp:64,128,10"
DELTA = 1e-5
BATCH = 64
LR = 0.03
MAX_GRAD_NORM = 1.0


@dataclass
class Run:
    """One training run; the fields that do not apply stay None."""

    config: str
    seed: int
    epsilon: float | None
    accuracy: float
    seconds: float
    epsilon_spent: float | None = None
    public_accuracy: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    noise_multiplier: float | None = None  # the accountant's z
    noise_std_over_c: float | None = None  # std of the noise on the gradient sum, over C
    extra: dict[str, Any] = field(default_factory=dict)


# -- the three trainers ------------------------------------------------------------------


def nonprivate(split: digits_demo.DigitsSplit, seed: int, *, epochs: int, lr: float) -> Run:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = build_model(MODEL)
    pretrain_public(
        net,
        split.train,
        epochs=epochs,
        learning_rate=lr,
        batch_size=BATCH,
        generator=torch.Generator().manual_seed(seed),
    )
    acc, _ = evaluate(net, split.test)
    return Run("non-private", seed, None, acc, time.perf_counter() - t0)


def opacus_central(
    split: digits_demo.DigitsSplit, seed: int, *, epsilon: float, epochs: int, accountant: str
) -> Run:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = build_model(MODEL)
    x = torch.as_tensor(np.asarray(split.train[0], dtype=np.float32))
    y = torch.as_tensor(np.asarray(split.train[1], dtype=np.int64))
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode=False and the like
        engine = PrivacyEngine(accountant=accountant)
        gsm, dp_opt, loader = engine.make_private_with_epsilon(
            module=net,
            optimizer=opt,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
            target_epsilon=epsilon,
            target_delta=DELTA,
            epochs=epochs,
            max_grad_norm=MAX_GRAD_NORM,
            poisson_sampling=True,
        )
        steps = 0
        for _ in range(epochs):
            for xb, yb in loader:
                if len(yb) == 0:  # probability (1 - 1/23)^1438 ~ 1e-28
                    continue
                dp_opt.zero_grad(set_to_none=True)
                F.cross_entropy(gsm(xb), yb).backward()  # type: ignore[no-untyped-call]
                dp_opt.step()
                steps += 1
        spent = float(engine.get_epsilon(DELTA))
    acc, _ = evaluate(net, split.test)
    z = float(dp_opt.noise_multiplier)
    return Run(
        "opacus",
        seed,
        epsilon,
        acc,
        time.perf_counter() - t0,
        epsilon_spent=spent,
        sample_rate=1 / len(loader),
        steps=steps,
        noise_multiplier=z,
        noise_std_over_c=z,
        extra={"accountant": accountant, "expected_batch_size": dp_opt.expected_batch_size},
    )


def federated(
    seed: int, *, epsilon: float, epochs: int, public_fraction: float, public_epochs: int
) -> Run:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mpcdp-digits-") as tmp:
        res = digits_demo.run(
            workdir=Path(tmp),
            target_epsilon=epsilon,
            target_delta=DELTA,
            epochs=float(epochs),
            batch_size=BATCH,
            learning_rate=LR,
            max_grad_norm=MAX_GRAD_NORM,
            public_fraction=public_fraction,
            public_epochs=public_epochs,
            seed=seed,
        )
    plan = res.plan
    l2, _ = sensitivities(
        max_grad_norm=plan.max_grad_norm, scale_bits=plan.scale_bits, num_params=plan.num_params
    )
    scaled_c = plan.max_grad_norm * 2.0**plan.scale_bits
    return Run(
        "mpcdp-warm" if public_fraction > 0 else "mpcdp",
        seed,
        epsilon,
        float(res.final_accuracy),
        time.perf_counter() - t0,
        epsilon_spent=res.epsilon,
        public_accuracy=res.public_accuracy,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        noise_multiplier=plan.noise_multiplier,
        noise_std_over_c=plan.noise_std / plan.max_grad_norm,
        extra={
            "scale_bits": plan.scale_bits,
            "quantization_factor": l2 / scaled_c,  # Delta_2 / (C 2^k)
            "honest_factor": math.sqrt(len(plan.parties) / plan.honest),
            "examples": list(plan.examples),
            "public_fraction": public_fraction,
        },
    )


# -- noise comparison ----------------------------------------------------------------------


def noise_breakdown(fed: Run, opacus_run: Run | None, epsilon: float) -> dict[str, Any]:
    """The noise multipliers of both sides, and the Gaussian ones at mpcdp's (q, T)."""
    q, steps = fed.sample_rate, fed.steps
    assert q is not None and steps is not None and fed.noise_multiplier is not None
    out: dict[str, Any] = {
        "epsilon": epsilon,
        "mpcdp_sample_rate": q,
        "mpcdp_steps": steps,
        "mpcdp_skellam_z": fed.noise_multiplier,
        "mpcdp_quantization_factor": fed.extra["quantization_factor"],
        "mpcdp_honest_factor": fed.extra["honest_factor"],
        "mpcdp_total_std_over_c": fed.noise_std_over_c,
        # the noise of the honest sites only: what the accountant charges for
        "mpcdp_honest_std_over_c": fed.noise_multiplier * fed.extra["quantization_factor"],
        "mpcdp_gaussian_z": accountant.get_noise_multiplier(
            target_epsilon=epsilon, target_delta=DELTA, sample_rate=q, steps=steps
        ),
    }
    out["skellam_over_gaussian"] = fed.noise_multiplier / out["mpcdp_gaussian_z"]
    try:
        from opacus.accountants.utils import get_noise_multiplier

        for acc in ("rdp", "prv"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "optimal order is the largest alpha"
                out[f"opacus_{acc}_z_at_mpcdp_q_T"] = get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=DELTA,
                    sample_rate=q,
                    steps=steps,
                    accountant=acc,
                )
    except ImportError:
        pass
    if opacus_run is not None:
        out["opacus_z"] = opacus_run.noise_multiplier
        out["opacus_sample_rate"] = opacus_run.sample_rate
        out["opacus_steps"] = opacus_run.steps
        # noise on the averaged gradient: std / (C * expected batch)
        assert fed.noise_std_over_c is not None and opacus_run.noise_multiplier is not None
        ours = fed.noise_std_over_c / (q * sum(fed.extra["examples"]))
        theirs = opacus_run.noise_multiplier / opacus_run.extra["expected_batch_size"]
        out["mean_grad_noise_ratio_mpcdp_over_opacus"] = ours / theirs
    return out


# -- report --------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _acc(runs: list[Run]) -> str:
    m, s = _mean_std([r.accuracy for r in runs])
    return f"{100 * m:6.2f} ± {100 * s:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--epochs", type=int, default=None, help="DP epochs (default 20)")
    parser.add_argument("--nonprivate-epochs", type=int, default=None, help="default 30")
    parser.add_argument("--nonprivate-lr", type=float, default=0.1)
    parser.add_argument("--warm-epsilon", type=float, default=3.0)
    parser.add_argument("--public-fraction", type=float, default=0.05)
    parser.add_argument("--public-epochs", type=int, default=None, help="default 30")
    parser.add_argument("--no-warm-start", action="store_true", help="skip the warm-start runs")
    parser.add_argument(
        "--opacus-accountant", default="prv", choices=["prv", "rdp"], help="Opacus' default: prv"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 seed, 2 DP epochs, 5 non-private and public epochs",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    def pick(value: int | None, quick: int, full: int) -> int:
        return value if value is not None else (quick if args.quick else full)

    seeds = list(range(pick(args.seeds, 1, 3)))
    epochs = pick(args.epochs, 2, 20)
    np_epochs = pick(args.nonprivate_epochs, 5, 30)
    public_epochs = pick(args.public_epochs, 5, 30)
    try:
        import opacus

        have_opacus = True
        opacus_version = opacus.__version__
    except ImportError:
        print("Opacus is not installed: the Opacus rows are skipped (pip install opacus)")
        have_opacus, opacus_version = False, None
    split = digits_demo.load_digits_split()
    print(
        f"digits: {len(split.train[1])} train / {len(split.test[1])} test, {MODEL}, "
        f"delta {DELTA:g}, seeds {seeds}, DP epochs {epochs}, non-private epochs {np_epochs}, "
        f"opacus {opacus_version or 'n/a'} (accountant {args.opacus_accountant})",
        flush=True,
    )

    runs: list[Run] = []

    def record(run: Run) -> None:
        runs.append(run)
        eps = "" if run.epsilon is None else f" eps {run.epsilon:g}"
        z = "" if run.noise_multiplier is None else f", noise std/C {run.noise_std_over_c:.3f}"
        warm = (
            "" if run.public_accuracy is None else f", after warm start {run.public_accuracy:.4f}"
        )
        print(
            f"  [{run.config}{eps} seed {run.seed}] accuracy {run.accuracy:.4f}{warm}{z} "
            f"({run.seconds:.0f} s)",
            flush=True,
        )

    for seed in seeds:
        record(nonprivate(split, seed, epochs=np_epochs, lr=args.nonprivate_lr))
        for eps in args.epsilons:
            if have_opacus:
                record(
                    opacus_central(
                        split, seed, epsilon=eps, epochs=epochs, accountant=args.opacus_accountant
                    )
                )
            record(
                federated(seed, epsilon=eps, epochs=epochs, public_fraction=0.0, public_epochs=0)
            )
        if not args.no_warm_start:
            if args.warm_epsilon not in args.epsilons:
                record(
                    federated(
                        seed,
                        epsilon=args.warm_epsilon,
                        epochs=epochs,
                        public_fraction=0.0,
                        public_epochs=0,
                    )
                )
            record(
                federated(
                    seed,
                    epsilon=args.warm_epsilon,
                    epochs=epochs,
                    public_fraction=args.public_fraction,
                    public_epochs=public_epochs,
                )
            )

    def select(config: str, eps: float | None = None) -> list[Run]:
        return [r for r in runs if r.config == config and (eps is None or r.epsilon == eps)]

    summary: dict[str, Any] = {"accuracy": {}, "gaps_pp": {}, "noise": {}, "warm_start": None}
    print()
    header = f"{'configuration':<44} {'eps':>4} {'accuracy % (mean ± std)':>24} {'gap pp':>8}"
    print(header)
    print("-" * len(header))
    base = select("non-private")
    print(f"{f'non-private, central ({np_epochs} epochs)':<44} {'-':>4} {_acc(base):>24}")
    summary["accuracy"]["non-private"] = _mean_std([r.accuracy for r in base])
    all_eps = sorted({*args.epsilons, args.warm_epsilon})
    for eps in all_eps:
        ours, theirs = select("mpcdp", eps), select("opacus", eps)
        if theirs:
            label = f"Opacus central DP-SGD ({args.opacus_accountant})"
            print(f"{label:<44} {eps:>4g} {_acc(theirs):>24}")
            summary["accuracy"][f"opacus eps={eps:g}"] = _mean_std([r.accuracy for r in theirs])
        if ours:
            gap = ""
            if theirs:
                g = 100 * (
                    statistics.fmean(r.accuracy for r in ours)
                    - statistics.fmean(r.accuracy for r in theirs)
                )
                summary["gaps_pp"][f"eps={eps:g}"] = g
                gap = f"{g:+8.2f}"
            label = "mpcdp federated, 3 sites (2 honest)"
            print(f"{label:<44} {eps:>4g} {_acc(ours):>24} {gap}")
            summary["accuracy"][f"mpcdp eps={eps:g}"] = _mean_std([r.accuracy for r in ours])
            summary["noise"][f"eps={eps:g}"] = noise_breakdown(
                ours[0], theirs[0] if theirs else None, eps
            )
        warm = select("mpcdp-warm", eps)
        if warm:
            label = f"mpcdp federated + warm start ({args.public_fraction:g} public)"
            print(f"{label:<44} {eps:>4g} {_acc(warm):>24}")
            summary["accuracy"][f"mpcdp-warm eps={eps:g}"] = _mean_std([r.accuracy for r in warm])
    print("gap pp: mpcdp federated minus Opacus central, percentage points of test accuracy")

    if summary["noise"]:
        print()
        print("noise on the sum of clipped gradients, std / C (noise multipliers):")
        cols = (
            f"{'eps':>4} | {'mpcdp std/C':>11} = {'sqrt(n/h)':>9} x {'Skellam z':>9} x "
            f"{'quant':>7} | {'Gauss z':>7} {'Skellam/Gauss':>13} | {'Opacus RDP z':>12} "
            f"{'PRV z':>6} {'run z':>6} | {'noise ratio mpcdp/Opacus':>24}"
        )
        print(cols)
        print("-" * len(cols))

        def f(v: float | None, w: int) -> str:
            return f"{'n/a':>{w}}" if v is None else f"{v:{w}.3f}"

        for key, n in summary["noise"].items():
            eps = float(key.split("=")[1])
            print(
                f"{eps:>4g} | {n['mpcdp_total_std_over_c']:11.3f} = "
                f"{n['mpcdp_honest_factor']:9.3f} x {n['mpcdp_skellam_z']:9.3f} x "
                f"{n['mpcdp_quantization_factor']:7.5f} | {n['mpcdp_gaussian_z']:7.3f} "
                f"{n['skellam_over_gaussian']:13.2f} | "
                f"{f(n.get('opacus_rdp_z_at_mpcdp_q_T'), 12)} "
                f"{f(n.get('opacus_prv_z_at_mpcdp_q_T'), 6)} {f(n.get('opacus_z'), 6)} | "
                f"{f(n.get('mean_grad_noise_ratio_mpcdp_over_opacus'), 24)}"
            )
        print(
            "Skellam z: mpcdp's accountant (subsampled Skellam, mpcdp.dp.rdp) for the "
            "2 honest sites' noise;\nquant: Delta_2 / (C 2^k), the rounding's sensitivity "
            "overhead; Gauss z: mpcdp's subsampled-Gaussian RDP\naccountant at the same sample "
            "rate and steps; Opacus RDP / PRV z: Opacus' accountants at the same rate and steps;"
            "\nrun z: what Opacus used (q = 1/23, 23 steps/epoch); noise ratio: noise std on the "
            "averaged gradient,\nmpcdp (std / (q N)) over Opacus (z C / its expected batch)"
        )

    warm_runs = select("mpcdp-warm", args.warm_epsilon)
    cold_runs = select("mpcdp", args.warm_epsilon)
    if warm_runs and cold_runs:
        err_np = 1 - statistics.fmean(r.accuracy for r in base)
        inc_cold = (1 - statistics.fmean(r.accuracy for r in cold_runs)) - err_np
        inc_warm = (1 - statistics.fmean(r.accuracy for r in warm_runs)) - err_np
        ratio = inc_warm / inc_cold if inc_cold > 0 else math.nan
        pub = [r.public_accuracy for r in warm_runs if r.public_accuracy is not None]
        summary["warm_start"] = {
            "epsilon": args.warm_epsilon,
            "public_fraction": args.public_fraction,
            "public_epochs": public_epochs,
            "nonprivate_error": err_np,
            "error_increase_without": inc_cold,
            "error_increase_with": inc_warm,
            "ratio_with_over_without": ratio,
            "accuracy_after_warm_start_only": statistics.fmean(pub) if pub else None,
        }
        print()
        print(
            f"warm start at eps {args.warm_epsilon:g} ({args.public_fraction:g} of the training "
            f"examples public, {public_epochs} non-private epochs on them; accuracy after the "
            f"warm start alone {100 * statistics.fmean(pub) if pub else math.nan:.2f}%):"
        )
        print(
            f"  error increase of DP over non-private: without warm start {100 * inc_cold:+.2f} "
            f"pp, with {100 * inc_warm:+.2f} pp; ratio with/without {ratio:.2f} "
            f"({'meets' if ratio <= 0.5 else 'misses'} the target <= 0.50)"
        )

    if args.json:
        payload = {
            "model": MODEL,
            "delta": DELTA,
            "seeds": seeds,
            "epsilons": args.epsilons,
            "epochs": epochs,
            "nonprivate_epochs": np_epochs,
            "nonprivate_lr": args.nonprivate_lr,
            "opacus": opacus_version,
            "opacus_accountant": args.opacus_accountant,
            "summary": summary,
            "runs": [asdict(r) for r in runs],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
