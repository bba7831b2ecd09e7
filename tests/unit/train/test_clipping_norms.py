"""Per-sample norms of the clipper against a float64 torch.func reference: no underflow or
overflow, ghost norms as exact as instantiated ones, and fallback layers under autocast.

Book-keeping clipping (Bu, Wang, Zha, Karypis 2023, ICML) sets each example's clip factor
from a computed norm; DP-SGD's bound (Abadi et al. 2016) holds only if that norm is never
below the true one. Measures: "remove" and "replace", the largest change of the clipped sum
over C when one example is removed or replaced (at most 1 and 2); the relative error of the
norms and of the clipped sum against the float64 reference (at most 1e-5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

pytest.importorskip("torch")
import torch
import torch.nn.functional as F
from torch import nn

from mpcdp.train.clipping import PerSampleClipper, per_sample_gradients_reference
from mpcdp.train.clipping.precision import norm_margin

B = 8


def weighted_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample loss y_j * sum(output_j): every output gradient of example j is y_j."""
    return out.float().reshape(out.shape[0], -1).sum(dim=1) * y


class Seq(nn.Module):
    """A layer applied to (B, T, d) sequences."""

    def __init__(self, layer: nn.Module, t: int, d: int) -> None:
        super().__init__()
        self.layer, self.t, self.d = layer, t, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x.reshape(x.shape[0], self.t, self.d))
        return out


class Image(nn.Module):
    def __init__(self, layer: nn.Module, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.layer, self.shape = layer, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x.reshape(x.shape[0], *self.shape))
        return out


class Tokens(nn.Module):
    """An embedding of tokens derived from the input (repeated tokens in every example)."""

    def __init__(self, vocab: int, dim: int, t: int) -> None:
        super().__init__()
        self.emb, self.vocab, self.t = nn.Embedding(vocab, dim), vocab, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x[:, : self.t].abs() * 3).long() % self.vocab
        out: torch.Tensor = self.emb(idx)
        return out


class Scaled(nn.Module):
    """x * w: no closed-form rule, the torch.func fallback."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


# Every branch of the rules: (model, input width, attack). "split": the attack example's
# input is 1e-23 and its output gradients 1e18 (a product of norms whose first factor
# squares to 0 in float32), C = 1e-6; "tiny": gradients of 1e-24 (squares below float32's
# range), C = 1e-28.
BRANCHES: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "linear-t1": (lambda: nn.Linear(16, 8, bias=False), 16, "split"),
    "linear-t1-bias": (lambda: nn.Linear(16, 8), 16, "tiny"),
    "linear-ghost": (lambda: Seq(nn.Linear(64, 64, bias=False), 3, 64), 192, "split"),
    "linear-instantiated": (lambda: Seq(nn.Linear(8, 8), 16, 8), 128, "tiny"),
    "conv-ghost": (
        lambda: Image(nn.Conv2d(8, 64, 3, padding=1, bias=False), (8, 2, 2)),
        32,
        "split",
    ),
    "conv-instantiated": (lambda: Image(nn.Conv2d(1, 4, 3, padding=1), (1, 8, 8)), 64, "tiny"),
    "embedding": (lambda: Tokens(50, 16, 12), 12, "tiny"),
    "layernorm": (lambda: nn.LayerNorm(32), 32, "tiny"),
    "groupnorm": (lambda: Seq(nn.GroupNorm(2, 4), 4, 8), 32, "tiny"),
    "fallback": (lambda: Scaled(32), 32, "tiny"),
}


def _clipped(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    clipper = PerSampleClipper(model, max_grad_norm=c)
    out = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=weighted_sum)
    return out.grad_sum.double()


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_an_example_whose_norm_leaves_float32_range_moves_the_sum_by_at_most_c(
    branch: str,
) -> None:
    make, width, attack = BRANCHES[branch]
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, width, generator=gen) + 2.0
    y = torch.ones(B)
    c = 1e-6 if attack == "split" else 1e-28
    if attack == "split":
        x[3] = x[3] * 1e-23
        y[3] = 1e18
    else:
        y[3] = 1e-24
    full = _clipped(model, x, y, c)
    keep = torch.arange(B) != 3
    removed = _clipped(model, x[keep], y[keep], c)
    x2, y2 = x.clone(), y.clone()
    x2[3], y2[3] = x[4], y[4]
    replaced = _clipped(model, x2, y2, c)
    remove = float(torch.linalg.vector_norm(full - removed)) / c
    replace = float(torch.linalg.vector_norm(full - replaced)) / c
    assert remove <= 1.0, remove
    assert replace <= 2.0, replace


def test_cancelling_positions_of_a_ghost_layer_are_clipped_with_their_rounding() -> None:
    # positions 0 and 1 share the input and have output gradients g and -(1 + 2^-20) g:
    # the norm is 2^-20 of the terms' sizes, and the clipped sum must not round to more
    torch.manual_seed(0)
    model = Seq(nn.Linear(64, 64, bias=False), 3, 64)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, 64, generator=gen)
    x[:, 1] = x[:, 0]
    w = torch.tensor([1.0, -(1.0 + 2.0**-20), 0.0])

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # a constant per example keeps the loss's value away from the cancellation
        value = (out.float() * w[None, :, None] * y[:, None, None]).sum(dim=(1, 2))
        return value + 1e3 * y

    y = torch.ones(B)
    y[5] = 1e6
    c = 1e-3
    clipper = PerSampleClipper(model, max_grad_norm=c)
    full = clipper.clipped_grad_sum(inputs=x.reshape(B, -1), targets=y, loss_fn=loss)
    keep = torch.arange(B) != 5
    rest = clipper.clipped_grad_sum(inputs=x.reshape(B, -1)[keep], targets=y[keep], loss_fn=loss)
    remove = float(torch.linalg.vector_norm(full.grad_sum.double() - rest.grad_sum.double()))
    assert remove / c <= 1.0


# -- accuracy against the float64 reference ----------------------------------------------


def cnn() -> nn.Module:
    """The benchmark CNN (benchmarks/dp_step.py): three Conv2d + GroupNorm blocks, two
    Linear layers, on 3x32x32."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(),
                nn.MaxPool2d(2)]  # fmt: skip

    return nn.Sequential(
        *block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(),
        nn.Linear(128 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() > 2:
        out = out.reshape(out.shape[0], -1, out.shape[-1]).mean(dim=1)
    return F.cross_entropy(out, y, reduction="none")


class Pooled(nn.Module):
    """A wide layer over a sequence, then a linear head on the mean."""

    def __init__(self, layer: nn.Module, t: int, d: int, width: int) -> None:
        super().__init__()
        self.body = Seq(layer, t, d)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.body(x)).mean(dim=1))
        return out


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.emb(idx)).mean(dim=1))
        return out


WIDE: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
    # instantiated per-sample gradients (T (p + d) > p d / 4...)
    "linear-512-256-t256": (
        lambda: Pooled(nn.Linear(512, 256), 256, 512, 256),
        lambda g: torch.randn(4, 256 * 512, generator=g),
    ),
    # the float64 ghost branch
    "linear-1024-512-t8": (
        lambda: Pooled(nn.Linear(1024, 512), 8, 1024, 512),
        lambda g: torch.randn(4, 8 * 1024, generator=g),
    ),
    "conv-ghost": (
        lambda: nn.Sequential(
            Image(nn.Conv2d(16, 64, 3, padding=1), (16, 4, 4)), nn.Flatten(), nn.Linear(64 * 16, 4)
        ),
        lambda g: torch.randn(4, 16 * 16, generator=g),
    ),
    "embedding": (Bag, lambda g: torch.randint(0, 40, (4, 32), generator=g)),
    "cnn": (cnn, lambda g: torch.randn(4, 3, 32, 32, generator=g)),
}


@pytest.mark.parametrize("name", list(WIDE))
def test_norms_and_clipped_sum_within_1e_5_of_the_float64_reference(name: str) -> None:
    make, inputs = WIDE[name]
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(3)
    x = inputs(gen)
    y = torch.randint(0, 4, (x.shape[0],), generator=gen)
    ref_model = make()
    ref_model.load_state_dict(model.state_dict())
    ref_model.double()
    per_sample = per_sample_gradients_reference(
        ref_model, inputs=x.double() if x.is_floating_point() else x, targets=y, loss_fn=ce
    )
    norms = per_sample.norm(dim=1)
    c = float(norms.min()) / 4  # every example clipped: the factor is C' / computed norm
    target = c * (1 - norm_margin(torch.float32))
    clipper = PerSampleClipper(model, max_grad_norm=c)
    got = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum.double()
    # the factors that produced the sum, by least squares on the reference gradients
    factors = torch.linalg.lstsq(per_sample.t(), got[:, None]).solution[:, 0]
    computed = target / factors
    rel = computed / norms - 1
    assert float(rel.abs().max()) <= 1e-5, rel.tolist()
    assert bool((computed * (1 + 2.0**-13) >= norms).all()), rel.tolist()
    expected = (per_sample * (target / norms)[:, None]).sum(dim=0)
    err = float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected))
    assert err <= 1e-5, err


# -- fallback layers under autocast --------------------------------------------------------


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.c = nn.Conv1d(4, 6, 3)
        self.p = nn.PReLU()
        self.head = nn.Linear(6 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(self.a(x).reshape(x.shape[0], 4, 4))
        out: torch.Tensor = self.head(self.p(h).flatten(1))
        return out


class ConvTransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.t1 = nn.ConvTranspose1d(4, 3, 3)
        self.t2 = nn.ConvTranspose2d(1, 2, 2)
        self.head = nn.Linear(2 * 4 * 7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.t1(self.a(x).reshape(x.shape[0], 4, 4))  # (B, 3, 6)
        h = self.t2(h.reshape(x.shape[0], 1, 3, 6))  # (B, 2, 4, 7)
        out: torch.Tensor = self.head(h.flatten(1))
        return out


class Inside(nn.Module):
    """The model runs its own forward under autocast."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.dtype):
            out: torch.Tensor = self.inner(x)
        return out


@pytest.mark.parametrize("where", ["around", "inside"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("net", [Conv1dNet, ConvTransposeNet])
def test_fallback_layers_under_autocast(
    net: Callable[[], nn.Module], dtype: torch.dtype, where: str
) -> None:
    torch.manual_seed(0)
    inner = net()
    model = Inside(inner, dtype) if where == "inside" else inner
    ctx = torch.autocast("cpu", dtype=dtype) if where == "around" else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, 16, generator=gen)
    y = torch.randint(0, 4, (B,), generator=gen)
    per_sample = per_sample_gradients_reference(inner, inputs=x, targets=y, loss_fn=ce)
    c = float(per_sample.norm(dim=1).median())
    clipper = PerSampleClipper(model, max_grad_norm=c)
    with ctx:
        got = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum.double()
        x2 = x.clone()
        x2[2] = -3 * x[2]
        other = clipper.clipped_grad_sum(inputs=x2, targets=y, loss_fn=ce).grad_sum.double()
    assert bool(torch.isfinite(got).all())
    # what autocast computes is close to the float32 gradients (half precision: ~1e-2)
    norms = per_sample.double().norm(dim=1)
    target = c * (1 - norm_margin(torch.float32))
    expected = (per_sample.double() * (target / norms).clamp(max=1)[:, None]).sum(dim=0)
    err = float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected))
    assert err <= 0.05, err
    assert float(torch.linalg.vector_norm(got - other)) / c <= 2.0
