"""The attacker's tests of per-sample clipping: models and batches built to make one example
move the clipped sum by more than the bound, or to get gradients silently wrong."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("torch")
import torch
import torch.nn.functional as F
from torch import nn

from mpcdp.errors import ParameterError
from mpcdp.train.clipping import PerSampleClipper, per_sample_gradients_reference

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().reshape(out.shape[0], -1).sum(1)


# -- section 6: the clipping bound is strict -------------------------------------------------


def _strict_bound_models() -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    cases: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
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


# -- section 2: a batch dimension by coincidence ---------------------------------------------

B = 8


def _refused(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=ce) -> ParameterError:  # type: ignore[no-untyped-def]
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    with pytest.raises(ParameterError) as info:
        clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=loss_fn)
    return info.value


class SequenceFirst(nn.Module):
    """Runs its Linear on (T, B, F): correct only if the clipper knew dim 1 is the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, F)
        h = self.proj(x.transpose(0, 1))  # (T, B, F)
        result: torch.Tensor = self.head(torch.tanh(h).mean(dim=0))
        return result


class Positional(nn.Module):
    """A positional table indexed by arange(T): shared by every example."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.t = t
        self.pos = nn.Embedding(t, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 4)
        p = self.pos(torch.arange(self.t))  # (T, 4): dim 0 is T, not the batch
        result: torch.Tensor = self.head((x + p).mean(dim=1))
        return result


class SharedArgument(nn.Module):
    """A fallback module called with a tensor shared across the batch."""

    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            return x * self.w + table.sum(0)

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.mix = self.Mix()
        self.register_buffer("table", torch.randn(rows, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(self.mix(x, self.table))
        return result


def test_sequence_first_linear_with_t_equal_to_b_is_refused() -> None:
    err = _refused(SequenceFirst(), torch.randn(B, B, 4), torch.randint(0, 3, (B,)))
    assert err.value == "proj" and "coincidence" in str(err)
    # T != B was refused before and still is
    err = _refused(SequenceFirst(), torch.randn(B, 5, 4), torch.randint(0, 3, (B,)))
    assert err.value == "proj" and "not the batch size" in str(err)


def test_positional_embedding_of_arange_b_is_refused() -> None:
    err = _refused(Positional(B), torch.randn(B, B, 4), torch.randint(0, 3, (B,)))
    assert err.value == "pos" and "coincidence" in str(err)


def test_fallback_with_a_shared_argument_of_length_b_is_refused() -> None:
    err = _refused(SharedArgument(B), torch.randn(B, 4), torch.randint(0, 3, (B,)))
    assert err.value == "mix" and "coincidence" in str(err)


# -- section 3: examples that interact -------------------------------------------------------


class Centred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        result: torch.Tensor = self.head(
            torch.tanh(h - h.mean(dim=0))
        )  # centring by the batch mean
        return result


class FunctionalBatchNorm(Centred):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.batch_norm(self.body(x), None, None, training=True)
        result: torch.Tensor = self.head(torch.tanh(h))
        return result


class BatchStats(nn.Module):
    """A custom layer that standardises by batch statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / (x.std(0) + 1e-3)


class Branch(Centred):
    """Amplifies everything when any example of the batch is large."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.tanh(self.body(x)))
        result: torch.Tensor = out * 100 if bool(x.abs().max() > 5) else out
        return result


def info_nce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = F.normalize(out, dim=1)
    return -F.log_softmax(z @ z.t() / 0.1, dim=1).diagonal()


def relative_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    losses = ce(out, y)
    return losses / losses.mean().detach()


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(
    ("model", "where"),
    [
        (Centred(), ""),
        (FunctionalBatchNorm(), ""),
        (nn.Sequential(nn.Linear(6, 8), BatchStats(), nn.Linear(8, 3)), "1"),
    ],
    ids=["centred", "functional-batch-norm", "batch-stats-layer"],
)
def test_examples_interacting_in_the_forward_are_refused(model: nn.Module, where: str) -> None:
    x, y = _data()
    err = _refused(model, x, y)
    assert "examples interact" in str(err)
    if where:
        assert err.value == where


def test_a_branch_on_the_batch_is_refused_on_the_batch_that_triggers_it() -> None:
    x, y = _data()
    x[11] = 9.0  # one crafted example flips the branch for its whole batch
    err = _refused(Branch(), x, y)
    assert "examples interact" in str(err) or "other modules" in str(err)


@pytest.mark.parametrize("loss_fn", [info_nce, relative_loss])
def test_losses_that_mix_examples_are_refused(loss_fn) -> None:  # type: ignore[no-untyped-def]
    x, y = _data()
    err = _refused(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), x, y, loss_fn)
    assert err.name == "loss_fn" and loss_fn.__name__ in str(err)


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        result: torch.Tensor = self.net(x)
        return result


def test_independent_examples_pass_once_with_dropout_and_frozen_batchnorm() -> None:
    """An honest model in training mode (nn.Dropout on, a frozen BatchNorm in eval mode) is
    checked once, on its first batch of two or more (the batch and its parts), not after."""
    model = Counting()
    model.train()
    bn = nn.BatchNorm1d(6).eval()
    for p in bn.parameters():
        p.requires_grad_(False)
    full = nn.Sequential(bn, model)
    clipper = PerSampleClipper(full, max_grad_norm=1.0)
    x, y = _data()
    clipper.clipped_grad_sum(inputs=x[:1], targets=y[:1], loss_fn=ce)
    assert model.calls == 1  # a batch of one cannot interact: nothing to check yet
    clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce)
    # of 16 examples: five parts (three of one, an odd part and the rest), forwarded, one of
    # those of one example also backpropagated (not forwarded again)
    probe = 5
    assert model.calls == 1 + 1 + probe
    clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce)
    assert model.calls == 1 + 1 + probe + 1
    assert model.net[1].training  # dropout is back on


# -- section 4: parameters used outside their module -----------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(self.emb(idx)))
        return F.linear(h, self.emb.weight)  # decoder tied to the embedding, outside it


class ParentReads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = (
            self.fc(x) + x @ self.fc.weight.t()
        )  # the parent reads its child's weight
        return result


def test_a_tied_weight_used_outside_its_module_is_refused() -> None:
    idx = torch.randint(0, 10, (B,))
    err = _refused(Tied(), idx, torch.randint(0, 10, (B,)))
    assert err.value == "emb" and "'emb.weight' is used outside" in str(err)


def test_a_parent_reading_a_childs_weight_is_refused() -> None:
    x, y = _data(B)
    err = _refused(ParentReads(), x, y)
    assert err.value == "fc" and "'fc.weight' is used outside" in str(err)


# -- the checks on a synthetic batch, before any private data is seen -------------------------


def test_check_model_runs_the_checks_without_private_data_and_only_once() -> None:
    """A site checks the model at session open on a synthetic batch: a refusal then depends
    on no private data, and real batches are not checked again."""
    model = Counting()
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    synthetic = torch.randn(16, 6)
    clipper.check_model(inputs=synthetic, targets=torch.zeros(16, dtype=torch.long), loss_fn=ce)
    assert model.calls == 1 + 5  # the whole batch and five parts (one also backpropagated)
    x, y = _data()
    clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce)
    assert model.calls == 7
    with pytest.raises(ParameterError, match="examples interact"):
        PerSampleClipper(Centred(), max_grad_norm=1.0).check_model(
            inputs=synthetic, targets=torch.zeros(16, dtype=torch.long), loss_fn=ce
        )
    with pytest.raises(ParameterError, match=r"'emb\.weight' is used outside"):
        PerSampleClipper(Tied(), max_grad_norm=1.0).check_model(
            inputs=torch.randint(0, 10, (4,)), targets=torch.zeros(4, dtype=torch.long), loss_fn=ce
        )
    with pytest.raises(ParameterError, match="at least 2") as info:
        clipper.check_model(inputs=synthetic[:1], targets=y[:1], loss_fn=ce)
    assert info.value.name == "inputs"


def test_a_transformer_layer_with_attention_dropout_trains_in_training_mode() -> None:
    """torch's TransformerEncoderLayer (dropout 0.1 by default) after
    replace_multihead_attention: attention dropout is an nn.Dropout module, so the first-use
    check switches it off and accepts the model (functional dropout was refused as random)."""
    from mpcdp.train.layers import replace_multihead_attention

    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 5, 3))
    replace_multihead_attention(model)
    model.train()
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    out = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce)
    assert out.batch_size == 6 and bool(torch.isfinite(out.grad_sum).all())


# -- the probe: both passes, random parts, as in the step ------------------------------------
#
# Each model below was accepted by a check that compared the forward pass of fixed halves of
# the batch, without gradients and with nn.Dropout switched off, while one of its examples
# moved the clipped sum by several times the bound. Each is refused for every probe drawn
# (PROBES generators), so no arrangement of the parts lets it through.

PROBES = range(12)


def _refused_by_every_probe(
    build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = ce
) -> list[ParameterError]:
    errors = []
    for seed in PROBES:
        clipper = PerSampleClipper(
            build(), max_grad_norm=1.0, probe_generator=torch.Generator().manual_seed(seed)
        )
        with pytest.raises(ParameterError) as info:
            clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=loss_fn)
        errors.append(info.value)
    return errors


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)


class StraightThroughMean(_Body):
    """Forward values per example; the backward adds every example's gradient to the others."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        m = h.mean(dim=0, keepdim=True)
        result: torch.Tensor = self.head(torch.tanh(h + (m - m.detach())))
        return result


class _MixBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor) -> torch.Tensor:
        return h.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g + g.mean(dim=0, keepdim=True) * 20


class CustomFunction(_Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed: torch.Tensor = _MixBackward.apply(self.body(x))  # type: ignore[no-untyped-call]
        result: torch.Tensor = self.head(torch.tanh(mixed))
        return result


class TensorHook(_Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.requires_grad:
            h.register_hook(lambda g: g + g.sum(dim=0, keepdim=True))
        result: torch.Tensor = self.head(torch.tanh(h))
        return result


def _mix_grad_input(m: nn.Module, gin: Any, gout: Any) -> tuple[torch.Tensor, ...]:
    return (gin[0] + gin[0].sum(dim=0, keepdim=True),)


class ModuleBackwardHook(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 3)
        self.act.register_full_backward_hook(_mix_grad_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(self.act(self.body(x)))
        return result


@pytest.mark.parametrize(
    "build",
    [StraightThroughMean, CustomFunction, TensorHook, ModuleBackwardHook],
    ids=["m-minus-detached-m", "autograd-function", "tensor-hook", "module-backward-hook"],
)
def test_examples_interacting_only_in_the_backward_pass_are_refused(
    build: Callable[[], nn.Module],
) -> None:
    x, y = _data()
    for err in _refused_by_every_probe(build, x, y):
        assert err.value == "body" and "the backward pass mixes examples" in str(err)


class Neighbours(_Body):
    """Each example mixed with its neighbour 2k <-> 2k + 1: never across fixed halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        pair = (torch.arange(x.shape[0]) ^ 1).clamp(max=x.shape[0] - 1)
        result: torch.Tensor = self.head(h + 2 * h[pair])
        return result


class TopK(_Body):
    """Keeps the half of the batch with the largest activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        k = max(1, x.shape[0] // 2)
        keep = torch.zeros(x.shape[0], 1)
        keep[h.norm(dim=1).topk(k).indices] = 1.0
        result: torch.Tensor = self.head(h * keep)
        return result


def by_position(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ce(out, y) * (1 + 3 * (torch.arange(out.shape[0]) % 2))


@pytest.mark.parametrize("build", [Neighbours, TopK], ids=["neighbours", "top-k"])
def test_interactions_that_fixed_halves_cannot_see_are_refused(
    build: Callable[[], nn.Module],
) -> None:
    x, y = _data()
    for err in _refused_by_every_probe(build, x, y):
        assert "examples interact" in str(err)


def test_a_loss_weighted_by_position_in_the_batch_is_refused() -> None:
    x, y = _data()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    for err in _refused_by_every_probe(lambda: model, x, y, by_position):
        assert err.name == "loss_fn" and "by_position" in str(err)


class GradModeBranch(_Body):
    """Centres by the batch mean only when gradients are enabled (as in a training step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if torch.is_grad_enabled():
            h = h - h.mean(dim=0)
        result: torch.Tensor = self.head(torch.tanh(h))
        return result


class DropoutFlagBranch(_Body):
    """Centres by the batch mean only while its Dropout is in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.body(x))
        if self.drop.training:
            h = h - h.mean(dim=0)
        result: torch.Tensor = self.head(torch.tanh(h))
        return result


class OddBatchBranch(_Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if x.shape[0] % 2 == 1:
            h = h * 10
        result: torch.Tensor = self.head(torch.tanh(h))
        return result


@pytest.mark.parametrize(
    "build",
    [GradModeBranch, DropoutFlagBranch, OddBatchBranch],
    ids=["grad-enabled", "dropout-training-flag", "odd-batch-size"],
)
def test_branches_the_step_takes_are_probed_as_in_the_step(build: Callable[[], nn.Module]) -> None:
    x, y = _data()
    for err in _refused_by_every_probe(build, x, y):
        assert "examples interact" in str(err) or "other modules" in str(err)


class ScaledOutput(_Body):
    """A forward hook, registered by the user, that scales the body's output by 3."""

    def __init__(self) -> None:
        super().__init__()
        self.body.register_forward_hook(lambda m, a, o: o * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(torch.tanh(self.body(x)))
        return result


class DerivedTie(nn.Module):
    """A weight tied through a tensor computed inside its owner's forward and reused by the
    parent: the parent's use reaches the weight through the owner's own node."""

    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 6) / 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.w = self.weight * 1.0
            return F.linear(x, self.w)

    def __init__(self) -> None:
        super().__init__()
        self.owner = self.Owner()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.owner(x))
        result: torch.Tensor = self.head(F.linear(h, self.owner.w))
        return result


class ScaledOutputAtExtremeScale(nn.Module):
    """:class:`ScaledOutput` at scales where the probe's float32 statistics over- or
    underflow while the step's float64 norms do not: inputs of ~1e32 with a weight of
    ``weight_scale`` (1e-12: X A^T above float32's range; 1e-19: ||S||^2 and ||A||^2 too),
    so that a comparison computed in float32 alone would be skipped as non-finite."""

    def __init__(self, weight_scale: float, out_scale: float) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8, bias=False)
        with torch.no_grad():
            self.body.weight.mul_(weight_scale)
        self.head = nn.Linear(8, 3)
        self.out_scale = out_scale
        self.body.register_forward_hook(lambda m, a, o: o * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(torch.tanh(self.body(x * 1e32) * self.out_scale))
        return result


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (ScaledOutput, "body"),
        (DerivedTie, "owner"),
        (lambda: ScaledOutputAtExtremeScale(1e-12, 1e-20), "body"),
        (lambda: ScaledOutputAtExtremeScale(1e-19, 1e-13), "body"),
    ],
    ids=[
        "forward-hook-scales-output",
        "tie-through-derived-tensor",
        "hook-with-a-product-above-float32",
        "hook-with-norms-above-float32",
    ],
)
def test_gradients_the_layers_cannot_see_are_refused(
    build: Callable[[], nn.Module], where: str
) -> None:
    x, y = _data()
    for err in _refused_by_every_probe(build, x, y):
        assert err.value == where and "differs from autograd's gradient" in str(err)


class RunningMean(_Body):
    running: torch.Tensor

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        with torch.no_grad():
            self.running.mul_(1 - self.momentum).add_(self.momentum * h.mean(0))
        result: torch.Tensor = self.head(torch.tanh(h - self.running))
        return result


class WritesData(_Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.body.weight.data.mul_(0.999)
        result: torch.Tensor = self.head(torch.tanh(self.body(x)))
        return result


class ScalesInputInPlace(_Body):
    inplace = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mul_(2) if self.inplace else x * 2
        result: torch.Tensor = self.head(torch.tanh(self.body(x)))
        return result


def test_each_refusal_names_its_real_cause() -> None:
    """A buffer updated in forward (even with momentum 1e-6) and a write through .data are
    refused for what they are, not as randomness; an in-place change of the model's own
    input is harmless to the probe and accepted."""
    x, y = _data()
    for momentum in (0.1, 1e-6):
        for err in _refused_by_every_probe(functools.partial(RunningMean, momentum), x, y):
            assert err.value == "buffer 'running'" and "changed in a forward pass" in str(err)
    for err in _refused_by_every_probe(WritesData, x, y):
        assert err.value == "parameter 'body.weight'" and ".data" in str(err)
    model = ScalesInputInPlace()
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    got = clipper.clipped_grad_sum(inputs=x.clone(), targets=y, loss_fn=ce).grad_sum
    model.inplace = False
    ref = per_sample_gradients_reference(model, inputs=x, targets=y, loss_fn=ce)
    norms = torch.linalg.vector_norm(ref, dim=1, keepdim=True)
    want = (ref * (1 / norms).clamp(max=1.0)).sum(0)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)  # the 2^-12 clipping margin


class NudgesWeight(nn.Module):
    """Moves one weight by one unit in the last place in every forward: too little to change
    an output beyond the comparisons' tolerance, so only the check of the state sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lin.weight.data
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
        result: torch.Tensor = self.lin(x)
        return result


@pytest.mark.parametrize("out", ["none", "own", "the weight's memory"])
def test_a_write_of_one_bit_is_refused_wherever_the_sum_goes(out: str) -> None:
    """The snapshot of the parameters lives in the step's output buffer: a write of one unit
    in the last place is refused whether the caller gives that buffer or not, and an ``out``
    that is the model's own memory (a misuse) does not blind the check."""
    x, y = _data()
    model = NudgesWeight()
    buffers = {
        "none": None,
        "own": torch.empty(18),
        "the weight's memory": model.lin.weight.data.view(-1),
    }
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    with pytest.raises(ParameterError) as info:
        clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce, out=buffers[out])
    assert info.value.value == "parameter 'lin.weight'" and ".data" in str(info.value)


class SignsOfZeros(_Body):
    """Carries one bit per example into later steps in the signs of a buffer of zeros: equal
    values before and after, other bits."""

    bits: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bits", torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            n = x.shape[0]
            self.bits[:n] = torch.where(x[:, 0] > 0, 0.0, -0.0)
        result: torch.Tensor = self.head(torch.tanh(self.body(x)))
        return result


def test_a_buffer_that_changes_only_the_signs_of_zeros_is_refused() -> None:
    x, y = _data()
    x[:, 0] = -1.0
    for err in _refused_by_every_probe(SignsOfZeros, x, y):
        assert err.value == "buffer 'bits'" and "changed in a forward pass" in str(err)


class SizeScaledBackward(_Body):
    """No mixing, but every row of the backward is scaled by the batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.requires_grad:
            h.register_hook(lambda g: g * g.shape[0])
        result: torch.Tensor = self.head(torch.tanh(h))
        return result


def test_a_backward_that_depends_on_the_batch_size_is_refused() -> None:
    x, y = _data()
    for err in _refused_by_every_probe(SizeScaledBackward, x, y):
        assert err.value == "body" and "depends on the batch" in str(err)


def test_an_ill_conditioned_honest_backward_is_accepted_by_every_probe() -> None:
    """A GroupNorm over two channels (what check-model's fix makes of a BatchNorm1d of 12)
    amplifies rounding differences between batch sizes by orders of magnitude in the
    backward pass; the probe must not take them for interactions."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, 6, generator=g) * 4 - 2
    y = torch.randint(0, 10, (64,), generator=g)
    for seed in range(30):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 12), nn.GroupNorm(6, 12), nn.Linear(12, 10))
        clipper = PerSampleClipper(
            model, max_grad_norm=1.0, probe_generator=torch.Generator().manual_seed(seed)
        )
        clipper.check_model(inputs=x, targets=y, loss_fn=ce)
