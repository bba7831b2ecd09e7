"""Cost of the clipper's first-use checks: a fresh clipper's first step against its next one.

Run:  python -m benchmarks.first_use_checks [--models mlp cnn transformer] [--batch-size B]
                                            [--repeat 5] [--device cpu|cuda] [--threads N]
                                            [--autocast none|bf16]

On its first batch of two or more examples, :class:`mpcdp.train.clipping.PerSampleClipper`
probes the model: its step on the whole batch is the reference, and random parts of the
batch run again with weighted losses (outputs, losses and output gradients compared row by
row, the per-layer sums against autograd's on one example, the autograd graph walked once):
see :mod:`mpcdp.train.clipping.checks`. A site pays
this once per training session. For each model of ``benchmarks.dp_step`` (same definitions
and defaults), in the same run: a new clipper's first ``clipped_grad_sum`` and the same
clipper's second one on the same batch, best of ``--repeat`` rounds. Printed: both times,
and a plain non-private step of the same model and batch (forward, mean loss, backward),
with the ratios first / next and first / plain. Absolute times are for this
machine only; the ratio is what carries over. ``--autocast bf16`` runs every call under bf16
autocast: on a GPU this is also the check that honest models pass the comparison at
half-precision tolerance (a refusal would stop the run with its message).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from benchmarks.dp_step import CLASSES, MODEL_NAMES, build
from mpcdp.train.clipping import PerSampleClipper


def _ce(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, targets, reduction="none")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(kind: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    if kind == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(
    name: str, args: argparse.Namespace, device: torch.device
) -> tuple[float, float, float]:
    model, inputs = build(name, args)
    model = model.to(device)
    x = inputs(args.batch_size).to(device)
    y = torch.randint(0, CLASSES, (args.batch_size,), device=device)
    first, after, plain = [], [], []
    for _ in range(args.repeat):
        # a plain (non-private) step: forward, mean loss, backward into .grad
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(args.autocast, device):
            model.zero_grad(set_to_none=True)
            _ce(model(x), y).mean().backward()  # type: ignore[no-untyped-call]
        _sync(device)
        plain.append(time.perf_counter() - t0)
        clipper = PerSampleClipper(model, max_grad_norm=1.0)
        times = []
        for _ in range(2):
            _sync(device)
            t0 = time.perf_counter()
            with _autocast(args.autocast, device):
                clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=_ce)
            _sync(device)
            times.append(time.perf_counter() - t0)
        first.append(times[0])
        after.append(times[1])
    model.zero_grad(set_to_none=True)
    return min(first), min(after), min(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
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
    print(
        f"device {device}, batch {args.batch_size}, best of {args.repeat}, autocast {args.autocast}"
    )
    print(
        f"{'model':<12} {'first ms':>9} {'next ms':>9} {'plain ms':>9} {'first/next':>11} "
        f"{'first/plain':>12}"
    )
    for name in args.models:
        first, after, plain = measure(name, args, device)
        print(
            f"{name:<12} {first * 1e3:>9.1f} {after * 1e3:>9.1f} {plain * 1e3:>9.1f} "
            f"{first / after:>11.2f} {first / plain:>12.2f}"
        )


if __name__ == "__main__":
    main()
