"""What the clipper's first-use probe refuses, and what it cannot see, measured.

Run:  python -m benchmarks.probe_limits [--batch 16] [--probes 200]

For each model below, two numbers:

* ``refused``: the fraction of ``--probes`` fresh clippers (each with its own probe drawn from
  the CSPRNG) that refuse the model on its first batch (:mod:`mpcdp.train.clipping.checks`);
* ``remove`` and ``replace``: the largest change of the clipped sum, over ``C`` (1 and 10),
  when one
  example of a batch is removed or replaced by a large one (``x * 8``), measured with a
  clipper whose checks already passed (a model that behaves only after the check) or whose
  probe missed it. The bounds of per-sample clipping are 1 and 2.

The first rows are attacks the probe must refuse (refused = 1.00). The last rows are what no
first-use check can see: behaviour that changes after the check (a step counter), a branch
on values a synthetic batch does not have, and interactions or batch-size effects below the
probe's tolerances. Their ``remove`` / ``replace`` are what such a model gains, and are the
numbers the README quotes. CPU, float32; absolute times do not matter here.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpcdp.errors import ParameterError
from mpcdp.train.clipping import PerSampleClipper

#: clipping norms measured: with C = 1 most examples of these small models are clipped,
#: with C = 10 most are not (what a model does to an unclipped example shows in full)
NORMS = (1.0, 10.0)


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.body(x))))


class BackwardMean(Body):
    def mix(self, h: torch.Tensor) -> torch.Tensor:
        m = h.mean(dim=0, keepdim=True) * 20
        return h + (m - m.detach())


class Neighbours(Body):
    def mix(self, h: torch.Tensor) -> torch.Tensor:
        pair = (torch.arange(h.shape[0]) ^ 1).clamp(max=h.shape[0] - 1)
        return h + 2 * h[pair]


class TopK(Body):
    def mix(self, h: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(h.shape[0], 1)
        keep[h.norm(dim=1).topk(max(1, h.shape[0] // 2)).indices] = 1.0
        return h * keep


class SmallMix(Body):
    """Centring by 2^-11 of the batch mean, detached (so the backward does not mix): below
    the forward tolerance of 2^-10."""

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        return h - 2.0**-11 * h.mean(dim=0).detach()


class SizeScaled(Body):
    """A backward that scales rows by 1.2 for batches above 8: below the 25% tolerance."""

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        if h.requires_grad and h.shape[0] > 8:
            h.register_hook(lambda g: g * 1.2)
        return h


class StepCounter(Body):
    """Honest for its first calls (the probe's), centring by the batch mean afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return h - h.mean(dim=0) * 4 if self.calls > 20 else h


class ValueBranch(Body):
    """Centres the batch when any input exceeds 5: never on uniform [0, 1) synthetic data."""

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        return h - h.mean(dim=0) * 4 if self.triggered else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.triggered = bool(x.abs().max() > 5)
        return super().forward(x)


def by_position(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ce(out, y) * (1 + 3 * (torch.arange(out.shape[0]) % 2))


CASES: list[tuple[str, Callable[[], nn.Module], Callable[..., torch.Tensor], bool]] = [
    # name, model, loss, probed on the real batch (False: on a synthetic one, as a site does)
    ("backward: m - m.detach()", BackwardMean, ce, True),
    ("forward: neighbours 2k, 2k+1", Neighbours, ce, True),
    ("forward: top half by norm", TopK, ce, True),
    ("loss: weight by position", Body, by_position, True),
    ("below tolerance: 2^-11 of the mean", SmallMix, ce, True),
    ("below tolerance: backward x1.2 if B > 8", SizeScaled, ce, True),
    ("after the check: step counter", StepCounter, ce, False),
    ("data value absent from the probe", ValueBranch, ce, False),
]


def influence(
    model: nn.Module,
    loss: Callable[..., torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    c: float,
) -> tuple[float, float]:
    """(remove, replace) over C = c on this batch, with a clipper whose checks passed."""
    clipper = PerSampleClipper(model, max_grad_norm=c)
    clipper._checked = True  # measure the gradient path alone

    def total(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return clipper.clipped_grad_sum(inputs=xs, targets=ys, loss_fn=loss).grad_sum.double()

    full = total(x, y)
    remove = replace = 0.0
    for j in range(x.shape[0]):
        keep = torch.arange(x.shape[0]) != j
        remove = max(remove, float(torch.linalg.vector_norm(full - total(x[keep], y[keep]))))
        x2 = x.clone()
        x2[j] = x[j] * 8
        replace = max(replace, float(torch.linalg.vector_norm(full - total(x2, y))))
    return remove / c, replace / c


def refused_fraction(
    build: Callable[[], nn.Module],
    loss: Callable[..., torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    probes: int,
    real: bool,
) -> float:
    n = 0
    for _ in range(probes):
        clipper = PerSampleClipper(build(), max_grad_norm=1.0)
        try:
            if real:
                clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=loss)
            else:  # as a site does at session open: a public synthetic batch
                synthetic = torch.rand(x.shape)
                clipper.check_model(inputs=synthetic, targets=y, loss_fn=loss)
        except ParameterError:
            n += 1
    return n / probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(secrets.randbits(31))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(args.batch, 6, generator=g)
    y = torch.randint(0, 3, (args.batch,), generator=g)
    print(f"batch {args.batch}, {args.probes} probes per model; remove / replace over C")
    head = "".join(f"{f'C = {c:g}':>17}" for c in NORMS)
    print(f"{'model':42} {'refused':>8}{head}")
    for name, build, loss, real in CASES:
        rate = refused_fraction(build, loss, x, y, args.probes, real)
        cells = ""
        for c in NORMS:
            torch.manual_seed(0)
            model = build()
            if isinstance(model, StepCounter):
                model.calls = 1000  # past its honest phase
            x_case = x.clone()
            if isinstance(model, ValueBranch):
                x_case[0] = 9.0  # one example triggers the branch for its whole batch
            remove, replace = influence(model, loss, x_case, y, c)
            cells += f"{remove:8.2f} {replace:8.2f}"
        print(f"{name:42} {rate:8.2f}{cells}")


if __name__ == "__main__":
    main()
