"""Per-sample norms of the clipper: accuracy against a float64 torch.func reference, and the
CPU time of ``clipped_grad_sum``, for this tree and (``--before DIR``) another copy of the
``mpcdp`` package, side by side in one run (worker processes interleaved round by round).

Run:  python -m benchmarks.clip_norms [--before /tmp/before] [--rounds 3] [--batch 64]

Accuracy (batch of 8, every example clipped): the computed norms are recovered from the
clipped sum by least squares on the reference per-sample gradients (flat clipping: factor =
C (1 - 2^-12) / computed norm); "norm err" is the largest relative error of a norm, "sum err"
the relative error of the clipped sum. Time: best ``clipped_grad_sum`` of ``--repeat`` calls
per round at ``--batch``, best over rounds. Book-keeping clipping: Bu, Wang, Zha, Karypis
2023, "Differentially private optimization on large model at small cost" (ICML).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

MODELS = ("cnn", "linear-512-256-t256", "transformer")


def _model(name: str) -> tuple[Callable[[], Any], Callable[[int, Any], Any]]:
    import torch
    from torch import nn

    from benchmarks import dp_step

    if name == "cnn":
        return dp_step.cnn, lambda b, g: torch.randn(b, 3, 32, 32, generator=g)
    if name == "transformer":

        def tf() -> nn.Module:
            return dp_step.TinyTransformer(vocab=8192, seq_len=64, dim=256, heads=4, layers=2)

        return tf, lambda b, g: torch.randint(0, 8192, (b, 64), generator=g)

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(512, 256)
            self.head = nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(torch.tanh(self.a(x)).mean(dim=1))
            return out

    return Pooled, lambda b, g: torch.randn(b, 256, 512, generator=g)


def _worker(names: list[str], batch: int, repeat: int, accuracy: bool) -> dict[str, object]:
    import torch
    import torch.nn.functional as F

    from mpcdp.train.clipping import PerSampleClipper, per_sample_gradients_reference

    def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    result: dict[str, object] = {}
    for name in names:
        make, inputs = _model(name)
        torch.manual_seed(0)
        model = make()
        gen = torch.Generator().manual_seed(1)
        row: dict[str, float] = {}
        if accuracy and name != "transformer":
            x = inputs(8, gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            ref = make()
            ref.load_state_dict(model.state_dict())
            per = per_sample_gradients_reference(
                ref.double(),
                inputs=x.double(),
                targets=y,
                loss_fn=ce,
            )
            norms = per.norm(dim=1)
            c = float(norms.min()) / 4
            target = c * (1 - 2.0**-12)
            clipper = PerSampleClipper(model, max_grad_norm=c)
            got = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum.double()
            factors = torch.linalg.lstsq(per.t(), got[:, None]).solution[:, 0]
            row["norm_err"] = float((target / factors / norms - 1).abs().max())
            expected = (per * (target / norms)[:, None]).sum(0)
            row["sum_err"] = float((got - expected).norm() / expected.norm())
        x = inputs(batch, gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        clipper = PerSampleClipper(model, max_grad_norm=1.0)
        out = torch.empty(clipper.num_params)
        clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce, out=out)
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce, out=out)
            best = min(best, time.perf_counter() - start)
        row["ms"] = best * 1e3
        result[name] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        res = _worker(args.models, args.batch, args.repeat, args.accuracy)
        sys.stdout.write(json.dumps(res) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    here = Path(__file__).resolve().parent.parent
    trees = {"after": here}
    if args.before is not None:
        trees = {"before": args.before.resolve(), "after": here}
    rows: dict[str, dict[str, dict[str, float]]] = {t: {} for t in trees}
    for r in range(args.rounds):
        for tree, path in trees.items():
            env = dict(os.environ, PYTHONPATH=f"{path}{os.pathsep}{here}")
            cmd = [sys.executable, "-m", "benchmarks.clip_norms", "--worker", "--models"]
            cmd += [*args.models, "--batch", str(args.batch), "--repeat", str(args.repeat)]
            if r == 0:
                cmd.append("--accuracy")
            out = subprocess.run(cmd, env=env, cwd=path, check=True, capture_output=True, text=True)
            for name, row in json.loads(out.stdout.splitlines()[-1]).items():
                kept = rows[tree].setdefault(name, {})
                for key, value in row.items():
                    kept[key] = min(kept.get(key, value), value) if key == "ms" else value
    _log.info("%-22s %-7s %10s %10s %9s", "model", "tree", "norm err", "sum err", "ms")
    for name in args.models:
        for tree in trees:
            row = rows[tree][name]
            _log.info(
                "%-22s %-7s %10s %10s %9.1f",
                name,
                tree,
                f"{row['norm_err']:.1e}" if "norm_err" in row else "-",
                f"{row['sum_err']:.1e}" if "sum_err" in row else "-",
                row["ms"],
            )


if __name__ == "__main__":
    main()
