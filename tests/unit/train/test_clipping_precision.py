"""Per-sample clipping under mixed precision: whatever the model's
dtype or autocast, one example moves the clipped sum by at most its bound.

The measure is the replace-one sensitivity ||S(D) - S(D')|| / C of neighbouring batches that
differ in one example (at most 2 for replace-one). With norms and sums computed in bf16, the
rounding of a 4096-example sum alone moved it by several C (8.35 C measured with autocast
around the call); with float32 arithmetic it moves it by ~1e-3 C. The bound checked here,
2.05 C, leaves room for float32 rounding and none for bf16's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

pytest.importorskip("torch")
import torch
import torch.nn.functional as F
from torch import nn

from mpcdp.train.clipping import PerSampleClipper

B = 4096
C = 1.0
BOUND = 2.05


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), y, reduction="none")


class Seq(nn.Module):
    """Linear layers on a sequence (ghost branch: 2 T^2 <= p d) and a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.a(x.reshape(x.shape[0], 4, 16)).relu()
        result: torch.Tensor = self.b(h.mean(1))
        return result


class Norms(nn.Module):
    """LayerNorm and GroupNorm (instantiated per-sample gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.ln = nn.LayerNorm(32)
        self.gn = nn.GroupNorm(4, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.a(x))
        h = self.gn(h)
        out: torch.Tensor = self.b(h)
        return out


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x.reshape(x.shape[0], 1, 8, 8)).relu()
        out: torch.Tensor = self.fc(h.flatten(1))
        return out


class ConvGhost(nn.Module):
    """A Conv2d on the ghost branch (2 T^2 <= p d: T = 16, p = 16, d = 36): its clipped
    weight sum comes from the native weight-gradient kernel on c-scaled output gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x.reshape(x.shape[0], 4, 4, 4)).relu()
        out: torch.Tensor = self.fc(h.mean(dim=(2, 3)))
        return out


class Scaled(nn.Module):
    """A parameter used in its own module's forward: the torch.func fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class Fallback(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = Scaled()
        self.b = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.s(x))
        return out


class Emb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(50, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x[:, :6].abs() * 10).long().clamp(max=49)
        out: torch.Tensor = self.b(self.e(idx).mean(1))
        return out


class AutocastInside(nn.Module):
    """The model runs its own forward under bf16 autocast (a common training setup)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out: torch.Tensor = self.inner(x)
        return out


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp-ghost-seq": Seq,
    "norms": Norms,
    "conv": Conv,
    "conv-ghost": ConvGhost,
    "fallback": Fallback,
    "embedding": Emb,
}


def _setting(
    kind: str, model: nn.Module
) -> tuple[nn.Module, contextlib.AbstractContextManager[None]]:
    if kind == "autocast-around":
        return model, torch.autocast("cpu", dtype=torch.bfloat16)
    if kind == "autocast-inside":
        return AutocastInside(model), contextlib.nullcontext()
    if kind in ("bf16-params", "fp16-params"):
        dtype = torch.bfloat16 if kind == "bf16-params" else torch.float16
        return model.to(dtype), contextlib.nullcontext()
    return model, contextlib.nullcontext()


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearly identical examples of one class: their clipped gradients align, so the sum
    has norm ~B C and a low-precision sum's rounding is worth several C."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, generator=g) * 3 + 0.01 * torch.randn(B, 64, generator=g)
    y = torch.zeros(B, dtype=torch.long)
    return x.to(dtype), y


@pytest.mark.parametrize("setting", ["autocast-around", "autocast-inside", "bf16-params",
                                     "fp16-params"])  # fmt: skip
@pytest.mark.parametrize("name", list(MODELS))
def test_one_example_moves_the_sum_by_at_most_its_bound(name: str, setting: str) -> None:
    torch.manual_seed(0)
    model, ctx = _setting(setting, MODELS[name]())
    dtype = next(model.parameters()).dtype
    x, y = _data(dtype if setting.endswith("params") else torch.float32)
    clipper = PerSampleClipper(model, max_grad_norm=C)
    with ctx:
        s1 = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum.clone()
        x2 = x.clone()
        x2[17] = x2[17] * -5 + 1  # replace one example
        y2 = y.clone()
        y2[17] = (y2[17] + 1) % 4
        s2 = clipper.clipped_grad_sum(inputs=x2, targets=y2, loss_fn=ce).grad_sum
    assert s1.dtype == torch.float32 and s2.dtype == torch.float32
    assert torch.isfinite(s1).all() and torch.isfinite(s2).all()
    sensitivity = float(torch.linalg.vector_norm((s1 - s2).double())) / C
    assert sensitivity <= BOUND, sensitivity
