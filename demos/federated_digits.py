"""Federated DP-SGD on scikit-learn's digits: three sites, one model, one accountant.

Run:  python demos/federated_digits.py [--target-epsilon 3] [--epochs 20] [--public-fraction 0]
                                       [--out digits-run]

Three sites (site-a, site-b, site-c) each run a party node (`mpcdp party serve`, a separate
process with its own certificate, SQLite ledger and slice of the bundled digits data; nothing
is downloaded) on loopback. The coordinator trains an MLP 64-128-10 with them: every step,
each site Poisson-samples its examples, clips per-example gradients, quantizes their sum, adds
its Skellam noise share and its pairwise mask; the coordinator only sees the noisy total. It
prints test accuracy and the epsilon spent per epoch, checkpoints to OUT/checkpoint.pt (rerun
to resume), writes OUT/metrics.json and OUT/metrics.png, and audits the final model with a
membership-inference attack. Needs the `train` extra: pip install -e '.[train]'.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mpcdp.demos import digits_demo
from mpcdp.train.federated import EpochRecord, write_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-epsilon", type=float, default=3.0)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--public-fraction", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=Path("digits-run"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def on_epoch(r: EpochRecord) -> None:
        print(
            f"epoch {r.epoch:3d}  step {r.step:4d}  epsilon {r.epsilon:5.2f}  "
            f"test accuracy {r.test_accuracy:.4f}",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="mpcdp-digits-") as tmp:
        result = digits_demo.run(
            workdir=Path(tmp),
            target_epsilon=args.target_epsilon,
            epochs=args.epochs,
            public_fraction=args.public_fraction,
            checkpoint=args.out / "checkpoint.pt",
            on_epoch=on_epoch,
        )
    write_metrics(result, json_path=args.out / "metrics.json", plot_path=args.out / "metrics.png")
    print(
        f"final test accuracy {result.final_accuracy:.4f} at epsilon {result.epsilon:.3f} "
        f"(delta {result.delta:g}); wrote {args.out}/metrics.json and metrics.png"
    )


if __name__ == "__main__":
    main()
