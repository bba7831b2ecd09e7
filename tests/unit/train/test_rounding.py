"""Randomized rounding (mpcdp.train.rounding) and the site's reuse of its buffers."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from mpcdp.config.datasets import Examples
from mpcdp.errors import ParameterError
from mpcdp.protocol.training import TrainSpec
from mpcdp.train.clipping import PerSampleClipper
from mpcdp.train.gradient_source import TorchGradientSource, cross_entropy_per_example
from mpcdp.train.models import build_model
from mpcdp.train.rounding import randomized_round_


def _round(x: torch.Tensor, u: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=dtype)
    return randomized_round_(x.clone(), dither=u, low=torch.empty_like(x), out=out)


def _values(n: int, seed: int) -> torch.Tensor:
    """float32 values of every magnitude from 2^-40 to 2^30, both signs, with integers."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 70 - 40)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x = (mag * sign).to(torch.float32)
    x[: n // 10] = x[: n // 10].round()  # some integers
    return x


def test_the_rule_is_computed_exactly() -> None:
    """floor(x) + [u < x - floor(x)], evaluated in float64 (exact for float32 x and u), for
    values of every magnitude; the only allowed difference is x in (-1, 0) with u within
    2^-25 of 1 + x, where float32 rounds 1 + x (the module docstring)."""
    x = _values(200_000, 1)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    u[:1000] = 0.0
    u[1000:2000] = 1.0 - 2.0**-24  # the largest float32 below 1
    got = _round(x, u, torch.int64).numpy()
    xd, ud = x.double().numpy(), u.double().numpy()
    low = np.floor(xd)
    want = low + (ud < xd - low)
    near = (xd > -1) & (xd < 0) & (np.abs(ud - (1 + xd)) <= 2.0**-25)
    assert np.array_equal(got[~near], want[~near].astype(np.int64))
    assert np.all((got == low) | (got == low + 1))  # always floor or floor + 1


def test_rounding_is_unbiased() -> None:
    n = 1_000_000
    for value in (0.3, -2.7, 1000.125, -0.001):
        x = torch.full((n,), value, dtype=torch.float32)
        u = torch.rand(n, generator=torch.Generator().manual_seed(3))
        mean = float(_round(x, u).double().mean())
        frac = value - math.floor(value)
        sd = math.sqrt(frac * (1 - frac) / n)
        assert abs(mean - float(np.float32(value))) <= 6 * sd + 1e-7


def test_bad_arguments_are_refused_naming_them() -> None:
    x = torch.zeros(4)
    u, low, out = torch.rand(4), torch.empty(4), torch.empty(4, dtype=torch.int32)
    with pytest.raises(ParameterError, match=r"dither.*shape \(3,\)"):
        randomized_round_(x, dither=torch.rand(3), low=low, out=out)
    with pytest.raises(ParameterError, match=r"low.*torch\.float64"):
        randomized_round_(x, dither=u, low=low.double(), out=out)
    with pytest.raises(ParameterError, match=r"out.*torch\.float32"):
        randomized_round_(x, dither=u, low=low, out=torch.empty(4))
    with pytest.raises(ParameterError, match=r"scaled.*torch\.float64"):
        randomized_round_(x.double(), dither=u.double(), low=low, out=out)


MODEL = "mlp:8,6,3"
NUM_PARAMS = 8 * 6 + 6 + 6 * 3 + 3


def _spec(**kw: object) -> TrainSpec:
    base: dict[str, object] = dict(
        run_id="r",
        dataset="ex",
        model=MODEL,
        parties=("a", "b", "c"),
        sample_rate=1.0,
        steps=10,
        max_grad_norm=1.0,
        scale_bits=10,
        mu=1e6,
        num_params=NUM_PARAMS,
    )
    base.update(kw)
    return TrainSpec(**base)  # type: ignore[arg-type]


def _examples(n: int = 30) -> Examples:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return Examples(path=__import__("pathlib").Path("ex.npz"), x=x, y=y, num_classes=3)


@pytest.mark.parametrize("physical", [1024, 7])
def test_the_site_rounds_its_clipped_sum_and_reuses_its_buffers(physical: int) -> None:
    """q = 1: every step rounds the same clipped sum (in micro-batches of ``physical``), so
    each word is floor or floor + 1 of it, and the mean over steps approaches it; the
    returned array is the source's buffer, valid until the next step."""
    torch.manual_seed(0)
    model = build_model(MODEL)
    spec = _spec()
    ex = _examples()
    ref = PerSampleClipper(build_model(MODEL), max_grad_norm=1.0)
    ref.load_flat_parameters(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    exact = (
        ref.clipped_grad_sum(
            inputs=torch.from_numpy(ex.x),
            targets=torch.from_numpy(ex.y),
            loss_fn=cross_entropy_per_example,
            scale=2.0**spec.scale_bits,
        )
        .grad_sum.double()
        .numpy()
    )
    # one micro-batch: the site's float32 sum is the reference's, bit for bit; in several,
    # float32 additions in another order
    tol = 0.0 if physical >= ex.count else 1e-5 * float(np.abs(exact).max())
    source = TorchGradientSource(
        model=model, examples=ex, spec=spec, device="cpu", max_physical_batch=physical
    )
    rng = np.random.default_rng(5)
    steps = []
    for k in range(200):
        steps.append(source.quantized_gradient(rng=rng))
        if k % 2:  # the dither drawn ahead in the background, or not
            source.prepare_next()
    assert all(s.dtype == np.int32 for s in steps)
    assert all(np.shares_memory(steps[0], s) for s in steps[1:])  # one buffer
    words = []
    for _ in range(200):
        w = source.quantized_gradient(rng=rng).astype(np.float64)
        assert np.all((w >= np.floor(exact - tol)) & (w <= np.floor(exact + tol) + 1))
        words.append(w)
    mean = np.mean(words, axis=0)  # each word: +-1/2 around its mean, so sd <= 0.5/sqrt(200)
    assert np.all(np.abs(mean - exact) <= 6 * 0.5 / math.sqrt(200) + tol)
    assert np.any(np.abs(exact - np.round(exact)) > 0.1)  # the test rounds something
    source.prepare_next()
    source.close()
    assert source._dither_thread is None
    source.prepare_next()  # closed: nothing starts, and a step still works
    assert source._dither_thread is None and source.quantized_gradient(rng=rng).size


class _LargeBatchBranch(torch.nn.Module):
    """Centres by the batch mean only for batches of more than 32: a site that checked a
    batch of 16 and then trained with 33 would not see it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if x.shape[0] > 32:
            h = h - h.mean(dim=0)
        out: torch.Tensor = self.head(torch.tanh(h))
        return out


def test_the_site_checks_the_model_at_its_largest_micro_batch() -> None:
    """At session open the site probes a synthetic batch of max_physical_batch examples (its
    largest micro-batch), so a branch on large batches is refused before any step; with
    micro-batches of at most 32 the branch never runs, and the model is accepted."""
    with pytest.raises(ParameterError, match=r"examples interact|other modules"):
        TorchGradientSource(
            model=_LargeBatchBranch(), examples=_examples(), spec=_spec(), device="cpu",
            max_physical_batch=64,
        )  # fmt: skip
    TorchGradientSource(
        model=_LargeBatchBranch(), examples=_examples(), spec=_spec(), device="cpu",
        max_physical_batch=32,
    )  # fmt: skip
