"""The attacker's tests of per-sample clipping: models and batches built to make one example
move the clipped sum by more than the bound, or to get gradients silently wrong (issue 13)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mpcdp.errors import ParameterError  # noqa: E402
from mpcdp.train.clipping import PerSampleClipper, per_sample_gradients_reference  # noqa: E402


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().reshape(out.shape[0], -1).sum(1)


# -- section 6: the clipping bound is strict -------------------------------------------------


def _strict_bound_models() -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    cases = []
    # T = 1 ghost branch: ||a|| ||g|| from two long float32 reductions
    lin = nn.Linear(6000, 3)
    cases.append(("linear", lin, torch.randn(64, 6000, generator=g) * 30, torch.zeros(64, 3)))
    # instantiated per-sample gradients (T large, small layer): one long reduction per row
    seq = nn.Sequential(nn.Linear(40, 40), nn.Flatten(), nn.Linear(40 * 90, 2))
    cases.append(("sequence", seq, torch.randn(64, 90, 40, generator=g) * 10, torch.zeros(64, 2)))
    return cases


@pytest.mark.parametrize("mode", ["flat", "automatic"])
@pytest.mark.parametrize("case", [0, 1])
def test_no_example_contributes_more_than_the_bound(mode: str, case: int) -> None:
    """Each example alone (a batch of one) with C set just under, at and just over its float64
    gradient norm: the float64 norm of what it contributes never exceeds C. An absolute margin
    (C / (||g|| + 1e-6)) fails this for norms of ~1e3, where float32's relative error of
    ~1e-7 is far larger than 1e-6 / ||g||."""
    name, model, x, y = _strict_bound_models()[case]
    model = model.double()
    ref = per_sample_gradients_reference(model, inputs=x.double(), targets=y.double(), loss_fn=mse)
    norms = torch.linalg.vector_norm(ref, dim=1)
    model = model.float()
    worst = 0.0
    for j in range(x.shape[0]):
        for rel in (-3e-7, -1e-7, 0.0, 1e-7, 3e-7):
            c = float(norms[j]) * (1 + rel)
            clipper = PerSampleClipper(model, max_grad_norm=c, clipping=mode)  # type: ignore[arg-type]
            out = clipper.clipped_grad_sum(inputs=x[j : j + 1], targets=y[j : j + 1], loss_fn=mse)
            got = float(torch.linalg.vector_norm(out.grad_sum.double()))
            worst = max(worst, got / c)
    assert worst <= 1.0, f"{name}: an example contributed {worst!r} C"
    assert worst > 1 - 1e-3  # and the margin costs almost nothing
