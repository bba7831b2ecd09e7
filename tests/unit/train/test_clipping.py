"""Per-sample clipping by book-keeping against a torch.func reference, and its error paths."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

pytest.importorskip("torch")
import torch
import torch.nn.functional as F
from torch import nn

from mpcdp.errors import ParameterError
from mpcdp.train.clipping import (
    ClippedBatch,
    ClippingMode,
    PerSampleClipper,
    per_sample_gradients_reference,
    precision,
    rules,
)
from mpcdp.train.layers import DPMultiheadAttention, replace_multihead_attention

# torch.func has no batching rule for the CPU flash-attention kernel of the reference
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

B = 8
NUM_CLASSES = 3


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross entropy; sequence outputs (B, T, K) are averaged over T first."""
    if out.dim() > 2:
        out = out.reshape(out.shape[0], -1, out.shape[-1]).mean(dim=1)
    return F.cross_entropy(out, y, reduction="none")


def reference_clipped(
    per_sample: torch.Tensor,
    c_norm: float,
    mode: ClippingMode,
    stability: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped sum as the clipper defines it, for a model of ``dtype``: factors aim at
    C (1 - kappa), kappa covering the rounding of norms computed in that precision."""
    norms = per_sample.norm(dim=1)
    target = c_norm * (1 - precision.norm_margin(dtype))
    if mode == "flat":
        factors = (target / norms).clamp(max=1.0)
    else:
        factors = target / (norms + stability)
    return (per_sample * factors[:, None]).sum(dim=0), factors


def check_against_reference(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: ClippingMode,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = ce,
    bias_only: bool = False,
) -> PerSampleClipper:
    """BK clipped sum == sum of clipped torch.func per-sample gradients (float64 model)."""
    model = model.double()
    if x.is_floating_point():
        x = x.double()
    if bias_only:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    per_sample = per_sample_gradients_reference(model, inputs=x, targets=y, loss_fn=loss_fn)
    norms = per_sample.norm(dim=1)
    c_norm = float(norms.median())  # clipping active for some samples, inactive for others
    assert bool((norms > c_norm * 1.01).any()) and bool((norms < c_norm * 0.99).any())
    expected, factors = reference_clipped(per_sample, c_norm, mode)
    # every clipped per-sample gradient has norm <= C
    assert bool(((norms * factors) <= c_norm * (1 + 1e-9)).all())

    clipper = PerSampleClipper(model, max_grad_norm=c_norm, clipping=mode, bias_only=bias_only)
    assert clipper.num_params == per_sample.shape[1]
    result = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=loss_fn)
    assert isinstance(result, ClippedBatch)
    assert result.batch_size == x.shape[0]
    assert result.grad_sum.dtype == torch.float32
    assert result.grad_sum.shape == (clipper.num_params,)
    torch.testing.assert_close(
        result.grad_sum.double(),
        expected,
        rtol=1e-5,
        atol=1e-5 * float(expected.abs().max()),
    )
    assert result.mean_norm == pytest.approx(float(norms.mean()), rel=1e-6)
    with torch.no_grad():
        assert result.loss_sum == pytest.approx(float(loss_fn(model(x), y).sum()), rel=1e-9)
    for _, p in clipper.named_parameters():
        assert p.grad is None  # BK never writes .grad
    for m in model.modules():
        assert not m._forward_hooks
    return clipper


def labels(n: int = B) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (n,))


MODES: list[ClippingMode] = ["flat", "automatic"]


def ghost_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the shape of A at every ghost-norm call (the branch really taken), on the
    checked batch and on the first-use checks' batches alike."""
    shapes: list[tuple[int, ...]] = []
    ghost = rules._ghost

    def spy(
        a: torch.Tensor | None, g: torch.Tensor, *, same: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        shapes.append(tuple(a.shape) if a is not None else ())
        return ghost(a, g, same=same)

    monkeypatch.setattr(rules, "_ghost", spy)
    return shapes


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


# -- layer types ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_linear_2d_with_inplace_activation(mode: ClippingMode) -> None:
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, NUM_CLASSES))
    check_against_reference(model, torch.randn(B, 10), labels(), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("t", "d", "p"), [(3, 24, 20), (9, 4, 5)])
def test_linear_3d_ghost_and_instantiate(
    mode: ClippingMode, t: int, d: int, p: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (3, 24, 20): instantiating, 4 p d = 1,920 B per example, would take more than the
    # ghost branch, 16 T^2 + 8 T (p + d) = 1,200 B: ghost norm; (9, 4, 5): 80 <= 1,944,
    # instantiated
    assert rules.use_ghost(t, p, d) == (t == 3)
    ghosts = ghost_calls(monkeypatch)
    model = nn.Sequential(nn.Linear(d, p), nn.Tanh(), nn.Linear(p, NUM_CLASSES))
    check_against_reference(model, torch.randn(B, t, d), labels(), mode)
    # the first layer took that branch (A of shape (B, T, d), with the first-use checks'
    # smaller batches before it) or never did
    assert ((B, t, d) in ghosts) == (t == 3)
    assert {shape[1:] for shape in ghosts} == ({(t, d)} if t == 3 else set())


@pytest.mark.parametrize("mode", MODES)
def test_linear_4d_input(mode: ClippingMode) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, NUM_CLASSES))
    check_against_reference(model, torch.randn(B, 2, 3, 4), labels(), mode)


@pytest.mark.parametrize("mode", MODES)
def test_conv2d_ghost_instantiate_and_grouped_fallback(
    mode: ClippingMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    ghosts = ghost_calls(monkeypatch)
    model = nn.Sequential(
        # 8x8 input, T = 64, D = 27, p = 4: instantiated (4pd = 432 B per example)
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        # stride 4, dilation 2: T = 4 (2x2), D = 36, p = 16: ghost (4pd = 2,304 B > 16 T^2 +
        # 8 T (p + D) = 1,920 B)
        nn.Conv2d(4, 16, 3, stride=4, padding=2, dilation=2),
        nn.Tanh(),
        # 'same' padding, T = 4, D = 144, p = 4: instantiated (2,304 B <= 4,992 B)
        nn.Conv2d(16, 4, 3, padding="same", bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, groups=2),  # grouped: torch.func fallback
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, NUM_CLASSES),
    )
    assert not rules.use_ghost(64, 4, 27)
    assert rules.use_ghost(4, 16, 36)
    assert not rules.use_ghost(4, 4, 144)
    clipper = check_against_reference(model, torch.randn(B, 3, 8, 8), labels(), mode)
    # the second convolution only (the first-use checks run smaller batches before it)
    assert (B, 4, 36) in ghosts and {shape[1:] for shape in ghosts} == {(4, 36)}
    kinds = [layer.kind for layer in clipper._layers]
    assert kinds == ["conv2d", "conv2d", "conv2d", "fallback", "linear"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("vocab", "dim"), [(50, 8), (4, 2)])
def test_embedding_with_padding_idx(mode: ClippingMode, vocab: int, dim: int) -> None:
    # T = 6: the rows of each example's own tokens, instantiated sparsely (at most T E
    # values) whether the vocabulary is larger than T or not
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, dim, padding_idx=1)
            self.head = nn.Linear(dim, NUM_CLASSES)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            result: torch.Tensor = self.head(torch.tanh(self.emb(idx)).mean(dim=1))
            return result

    tokens = torch.randint(0, min(vocab, 5), (B, 6))  # repeated tokens and padding
    tokens[0, :3] = 1
    model = Bag()
    check_against_reference(model, tokens, labels(), mode)
    # the padding row gets no gradient
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    g = clipper.clipped_grad_sum(inputs=tokens, targets=labels(), loss_fn=ce).grad_sum
    emb = g[: vocab * dim].view(vocab, dim)
    assert bool((emb[1] == 0).all())


@pytest.mark.parametrize("mode", MODES)
def test_layernorm_and_groupnorm(mode: ClippingMode) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(start_dim=2),  # (B, 4, 16)
        nn.LayerNorm(16),
        nn.Linear(16, 5),
        nn.LayerNorm([4, 5], bias=False),
        nn.Flatten(),
        nn.Linear(20, NUM_CLASSES),
    )
    clipper = check_against_reference(model, torch.randn(B, 2, 4, 4), labels(), mode)
    kinds = [layer.kind for layer in clipper._layers]
    assert kinds == ["conv2d", "groupnorm", "layernorm", "linear", "layernorm", "linear"]


class Gated(nn.Module):
    """Owns a parameter used in a non-linear way, plus a Linear child: fallback + child."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(d))
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x) * torch.sigmoid(self.gate) * scale, torch.tanh(x * self.gate)


class WithGated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Gated(6)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.block(x, scale=0.5)
        result: torch.Tensor = self.head(a + b)
        return result


@pytest.mark.parametrize("mode", MODES)
def test_custom_parameter_fallback(mode: ClippingMode) -> None:
    clipper = check_against_reference(WithGated(), torch.randn(B, 6), labels(), mode)
    assert [layer.kind for layer in clipper._layers] == ["fallback", "linear", "linear"]


class TinyBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, d)
        self.attn = DPMultiheadAttention(d, heads)
        self.norm1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, NUM_CLASSES)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        pad = idx == 0
        a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        h = self.norm1(h + a)
        h = self.norm2(h + self.ff(h))
        result: torch.Tensor = self.head(h[:, 0])
        return result


@pytest.mark.parametrize("mode", MODES)
def test_dp_multihead_attention_block(mode: ClippingMode) -> None:
    tokens = torch.randint(1, 11, (B, 5))
    tokens[:, -1] = 0  # padded key
    check_against_reference(TinyBlock(), tokens, labels(), mode)


def test_replace_multihead_attention_in_transformer_layer() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 8, NUM_CLASSES)).double()
    x = torch.randn(B, 4, 8, dtype=torch.float64)
    with pytest.raises(ParameterError, match=r"0\.self_attn.*replace_multihead_attention"):
        PerSampleClipper(model, max_grad_norm=1.0)
    before = model(x)
    mask = torch.zeros(4, 4, dtype=torch.bool).triu(1)
    before_masked = layer(x, src_mask=mask)
    assert replace_multihead_attention(model) is model
    assert isinstance(layer.self_attn, DPMultiheadAttention)
    torch.testing.assert_close(model(x), before)
    torch.testing.assert_close(layer(x, src_mask=mask), before_masked)
    model.eval()  # no fused fast path for DPMultiheadAttention, same results
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    model.train()
    check_against_reference(model, x, labels(), "flat")


def test_dp_attention_matches_torch_attention_weights_and_masks() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5).double()
    dp = replace_multihead_attention(mha)
    assert isinstance(dp, DPMultiheadAttention)
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    k = torch.randn(3, 7, 6, dtype=torch.float64)
    v = torch.randn(3, 7, 5, dtype=torch.float64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[:, -2:] = True
    kpm_float = torch.zeros(3, 7, dtype=torch.float64).masked_fill(kpm, -math.inf)
    am = torch.randn(4, 7, dtype=torch.float64)
    for kwargs in (
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": am, "key_padding_mask": kpm_float},
        {"attn_mask": am > 1.0, "key_padding_mask": kpm},
        {"need_weights": False, "attn_mask": am > 1.0},
        {"average_attn_weights": False},
    ):
        out_t, w_t = mha(q, k, v, **kwargs)
        out_d, w_d = dp(q, k, v, **kwargs)
        torch.testing.assert_close(out_d, out_t)
        if w_t is None:
            assert w_d is None
        else:
            assert w_d is not None
            torch.testing.assert_close(w_d, w_t)
    with pytest.raises(ParameterError, match="batch_first"):
        replace_multihead_attention(nn.MultiheadAttention(8, 2))


@pytest.mark.parametrize("mode", MODES)
def test_layer_reused_in_one_forward(mode: ClippingMode) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(5, 7)
            self.shared = nn.Linear(7, 7)
            self.norm = nn.LayerNorm(7)
            self.head = nn.Linear(7, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.inp(x))
            h = torch.tanh(self.shared(h))
            h = self.norm(h)
            h = torch.tanh(self.shared(h))  # second call of the same layers
            result: torch.Tensor = self.head(self.norm(h))
            return result

    check_against_reference(Twice(), torch.randn(B, 5), labels(), mode)


@pytest.mark.parametrize("mode", MODES)
def test_bias_only(mode: ClippingMode) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.GroupNorm(1, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4, 6),
        nn.Tanh(),
        nn.LayerNorm(6),
        nn.Linear(6, NUM_CLASSES),
    )
    clipper = check_against_reference(
        model, torch.randn(B, 2, 4, 4), labels(), mode, bias_only=True
    )
    names = [n for n, _ in clipper.named_parameters()]
    assert names == ["0.bias", "1.bias", "4.bias", "6.bias", "7.bias"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("weight"))
    for layer in clipper._layers:
        assert not layer.needs_input  # DP-BiTFiT: no activations stored


def test_bias_only_freezes_weights_itself() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    clipper = PerSampleClipper(model, max_grad_norm=1.0, bias_only=True)
    assert [n for n, _ in clipper.named_parameters()] == ["0.bias", "1.bias"]
    assert clipper.num_params == 6
    assert not model[0].weight.requires_grad


# -- API contract and errors -------------------------------------------------------------------


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, NUM_CLASSES))


def test_empty_batch_returns_zeros() -> None:
    clipper = PerSampleClipper(mlp(), max_grad_norm=1.0)
    out = clipper.clipped_grad_sum(
        inputs=torch.zeros(0, 4), targets=torch.zeros(0, dtype=torch.long), loss_fn=ce
    )
    assert out.batch_size == 0
    assert out.loss_sum == 0.0
    assert out.mean_norm == 0.0
    assert out.grad_sum.shape == (clipper.num_params,)
    assert bool((out.grad_sum == 0).all())


def test_flat_parameters_round_trip() -> None:
    model = mlp()
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    first, last = model[0], model[2]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    flat = clipper.flat_parameters()
    assert flat.shape == (clipper.num_params,) == (4 * 5 + 5 + 5 * 3 + 3,)
    torch.testing.assert_close(flat[:20], first.weight.detach().reshape(-1))
    clipper.load_flat_parameters(flat + 1.0)
    torch.testing.assert_close(last.bias.detach(), flat[-3:] + 1.0)
    with pytest.raises(ParameterError, match="flat"):
        clipper.load_flat_parameters(flat[:-1])
    for bad in (math.nan, math.inf, -math.inf):
        spoiled = flat.clone()
        spoiled[7] = bad
        with pytest.raises(ParameterError, match=r"flat.*non-finite"):
            clipper.load_flat_parameters(spoiled)
    torch.testing.assert_close(last.bias.detach(), flat[-3:] + 1.0)  # nothing loaded


def test_batchnorm_refused_with_module_path() -> None:
    features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2))
    model = nn.Sequential()
    model.add_module("features", features)
    with pytest.raises(ParameterError, match=r"module 'features\.3' is BatchNorm2d"):
        PerSampleClipper(model, max_grad_norm=1.0)
    with pytest.raises(ParameterError, match=r"features\.3"):
        PerSampleClipper(model, max_grad_norm=1.0, bias_only=True)
    assert features[0].weight.requires_grad  # a refused model is left as it was
    # a frozen BatchNorm in eval mode is a per-sample affine map: accepted, until train()
    features[3].eval()
    features[3].requires_grad_(False)
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    features[3].train()
    with pytest.raises(ParameterError, match=r"features\.3"):
        clipper.clipped_grad_sum(
            inputs=torch.randn(2, 1, 6, 6),
            targets=torch.zeros(2),
            loss_fn=lambda o, y: o.sum((1, 2, 3)),
        )
    for m in model.modules():
        assert not m._forward_hooks


def test_torch_multihead_attention_refused() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            result: torch.Tensor = self.mha(x, x, x)[0]
            return result

    with pytest.raises(ParameterError, match=r"'mha'.*replace_multihead_attention"):
        PerSampleClipper(Attn(), max_grad_norm=1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "1", True])
def test_bad_max_grad_norm(bad: object) -> None:
    with pytest.raises(ParameterError, match="max_grad_norm") as info:
        PerSampleClipper(mlp(), max_grad_norm=bad)  # type: ignore[arg-type]
    assert info.value.name == "max_grad_norm"


def test_bad_clipping_and_stability() -> None:
    with pytest.raises(ParameterError, match="clipping") as info:
        PerSampleClipper(mlp(), max_grad_norm=1.0, clipping="per_layer")  # type: ignore[arg-type]
    assert info.value.name == "clipping"
    with pytest.raises(ParameterError, match="stability"):
        PerSampleClipper(mlp(), max_grad_norm=1.0, clipping="automatic", stability=0.0)


def test_nan_input_and_bad_loss_shape() -> None:
    model = mlp()
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    x = torch.randn(3, 4)
    x[1, 2] = math.nan
    for bad in (math.inf, -math.inf):
        y2 = x.clone()
        y2[1, 2] = bad
        with pytest.raises(ParameterError, match="inputs"):
            clipper.clipped_grad_sum(inputs=y2, targets=torch.zeros(3, dtype=torch.long),
                                     loss_fn=ce)  # fmt: skip
    with pytest.raises(ParameterError, match="inputs") as info:
        clipper.clipped_grad_sum(inputs=x, targets=labels(3), loss_fn=ce)
    assert info.value.name == "inputs"
    with pytest.raises(ParameterError, match="loss_fn") as info:
        clipper.clipped_grad_sum(
            inputs=torch.randn(3, 4),
            targets=labels(3),
            loss_fn=lambda o, y: F.cross_entropy(o, y),  # mean, not per-sample
        )
    assert info.value.name == "loss_fn"
    with pytest.raises(ParameterError, match="targets"):
        clipper.clipped_grad_sum(inputs=torch.randn(3, 4), targets=labels(2), loss_fn=ce)
    for m in model.modules():  # hooks are removed even when the call fails
        assert not m._forward_hooks


def test_hooks_removed_and_module_usable() -> None:
    model = mlp()
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    clipper.clipped_grad_sum(inputs=torch.randn(3, 4), targets=labels(3), loss_fn=ce)
    for m in model.modules():
        assert not m._forward_hooks
    model(torch.randn(2, 4)).sum().backward()  # ordinary training still works
    assert model[0].weight.grad is not None
    for layer in clipper._layers:
        assert not layer.calls
    with clipper:
        pass
    with pytest.raises(Exception, match="closed"):
        clipper.clipped_grad_sum(inputs=torch.randn(3, 4), targets=labels(3), loss_fn=ce)


def test_no_trainable_parameters_and_weight_tying_refused() -> None:
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ParameterError, match="no trainable parameter"):
        PerSampleClipper(frozen, max_grad_norm=1.0)
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    with pytest.raises(ParameterError, match="tying"):
        PerSampleClipper(nn.Sequential(emb, head), max_grad_norm=1.0)
    with pytest.raises(ParameterError, match="max_norm"):
        PerSampleClipper(nn.Embedding(5, 4, max_norm=1.0), max_grad_norm=1.0)


def test_layer_not_batch_first_refused() -> None:
    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            result: torch.Tensor = self.lin(x.transpose(0, 1)).mean(
                dim=0
            )  # (T, B, d) into the layer
            return result

    clipper = PerSampleClipper(SeqFirst(), max_grad_norm=1.0)
    with pytest.raises(ParameterError, match=r"'lin'.*batch"):
        clipper.clipped_grad_sum(inputs=torch.randn(3, 5, 4), targets=labels(3), loss_fn=ce)


def test_unused_layer_gets_zero_gradient() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, NUM_CLASSES)
            self.unused = nn.Linear(4, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.unused(x)  # output not in the loss
            result: torch.Tensor = self.used(x)
            return result

    model = Partial().double()
    clipper = check_against_reference(model, torch.randn(B, 4), labels(), "flat")
    out = clipper.clipped_grad_sum(
        inputs=torch.randn(B, 4, dtype=torch.float64), targets=labels(), loss_fn=ce
    )
    assert bool((out.grad_sum[15:] == 0).all())


def test_fallback_failure_names_module() -> None:
    class ItemCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale + 0.0 * x.nonzero().shape[0]  # nonzero fails in vmap

    model = nn.Sequential(ItemCall(), nn.Linear(4, NUM_CLASSES))
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    with pytest.raises(ParameterError, match=r"module '0' \(ItemCall\).*torch\.func"):
        clipper.clipped_grad_sum(inputs=torch.randn(3, 4), targets=labels(3), loss_fn=ce)


def test_a_random_forward_is_refused_naming_the_module() -> None:
    """Randomness other than nn.Dropout (here functional dropout in a fallback module) makes
    the first-use check of batch independence impossible: refused, naming the module."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x * self.scale, p=0.5, training=True)

    model = nn.Sequential(Noisy(), nn.Linear(4, NUM_CLASSES))
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    with pytest.raises(ParameterError, match=r"module '0' \(Noisy\) changes between two"):
        clipper.clipped_grad_sum(inputs=torch.randn(3, 4), targets=labels(3), loss_fn=ce)


def test_float32_model_matches_float64_reference() -> None:
    """float32 parameters: sums are written in place into grad_sum (the mm out= path), from
    every branch: float64 ghost sums (Linear and Conv2d), instantiated, sparse rows."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 32)  # T = 5: sparse rows
            # T = 4 (2x2), D = 36, p = 16: ghost (4pd = 2,304 B > 16T^2 + 8T(p+D) = 1,920 B)
            self.conv = nn.Conv2d(4, 16, 3, stride=2)
            self.seq = nn.Linear(32, 32)  # T = 5: ghost (4,096 B > 2,960 B)
            self.norm = nn.LayerNorm(32)
            self.mix = nn.Linear(32, 4)  # T = 5: instantiated (512 B <= 1,840 B)
            self.head = nn.Linear(4 + 16 * 2 * 2, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            idx = x[:, :5].long().clamp(0, 19)
            img = x[:, 5:].reshape(-1, 4, 5, 5)
            h = self.mix(self.norm(torch.tanh(self.seq(self.emb(idx))))).mean(dim=1)
            c = torch.relu(self.conv(img)).flatten(1)
            result: torch.Tensor = self.head(torch.cat([h, c], dim=1))
            return result

    assert rules.use_ghost(4, 16, 36) and rules.use_ghost(5, 32, 32)
    assert not rules.use_ghost(5, 4, 32)
    model32 = Mixed()
    x = torch.cat([torch.randint(0, 20, (B, 5)).float(), torch.randn(B, 100)], dim=1)
    y = labels()
    model64 = Mixed()
    model64.load_state_dict(model32.state_dict())
    model64.double()
    per_sample = per_sample_gradients_reference(model64, inputs=x.double(), targets=y, loss_fn=ce)
    c_norm = float(per_sample.norm(dim=1).median())
    for mode in MODES:
        expected, _ = reference_clipped(per_sample, c_norm, mode, dtype=torch.float32)
        clipper = PerSampleClipper(model32, max_grad_norm=c_norm, clipping=mode)
        got = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum
        torch.testing.assert_close(
            got.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())
        )


def test_input_modified_in_place_after_layer_refused() -> None:
    class Clobber(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x * 2.0
            out = self.lin(h)
            h.mul_(3.0)  # the recorded input of self.lin changes afterwards
            result: torch.Tensor = self.head(out + h)
            return result

    clipper = PerSampleClipper(Clobber(), max_grad_norm=1.0)
    with pytest.raises(ParameterError, match=r"'lin'.*in place"):
        clipper.clipped_grad_sum(inputs=torch.randn(3, 4), targets=labels(3), loss_fn=ce)


# -- floating point: the clip factor must come from an upper bound of the true norm ----------


def _cancelling(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """One sample whose two positions' gradient terms almost cancel in <AA^T, GG^T>."""
    layer: nn.Module
    if kind == "conv":
        layer = nn.Conv2d(8, 1, 1, bias=False)
        x = torch.zeros(1, 8, 1, 2)
        x[0, 0, 0] = torch.tensor([1.0, 1.0 + 2**-20])
    else:
        layer = nn.Linear(8, 1, bias=False)
        x = torch.zeros(1, 2, 8)
        x[0, :, 0] = torch.tensor([1.0, 1.0 + 2**-20])
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight.view(-1)[0] = 1.0
    return nn.Sequential(layer, nn.Flatten()), x


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_ghost_norm_cancellation_still_clips(kind: str) -> None:
    # output gradients +1e9 / -1e9 on the two positions: the true per-sample norm is ~960,
    # but the float32 ghost norm cancels to ~0; without its error bound the sample was not
    # clipped at all (contribution 960 with C = 1)
    model, x = _cancelling(kind)

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1e9 * (out[:, 0] - out[:, 1])

    y = torch.zeros(1)
    ref = per_sample_gradients_reference(model, inputs=x, targets=y, loss_fn=loss)
    assert float(ref.norm()) > 900
    for mode in ("flat", "automatic"):
        out = PerSampleClipper(model, max_grad_norm=1.0, clipping=mode).clipped_grad_sum(
            inputs=x, targets=y, loss_fn=loss
        )
        assert float(out.grad_sum.norm()) <= 1.0
        assert out.mean_norm >= float(ref.norm())  # the norm used is an upper bound


def test_ghost_norm_bound_costs_little_on_ordinary_data() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
    x, y = torch.randn(B, 6, 16), torch.randint(0, NUM_CLASSES, (B,))
    ref = per_sample_gradients_reference(model, inputs=x, targets=y, loss_fn=ce)
    out = PerSampleClipper(model, max_grad_norm=1e6).clipped_grad_sum(
        inputs=x, targets=y, loss_fn=ce
    )
    true_mean = float(ref.norm(dim=1).mean())
    assert true_mean <= out.mean_norm <= true_mean * (1 + 1e-3)


def test_sample_with_overflowing_gradient_contributes_zero() -> None:
    # finite but huge weights: example 1's forward overflows, example 0's does not
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    with torch.no_grad():
        for layer in model:
            assert isinstance(layer, nn.Linear)
            layer.weight.fill_(1e20)
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    both = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce)
    alone = clipper.clipped_grad_sum(inputs=x[:1], targets=y[:1], loss_fn=ce)
    assert bool(torch.isfinite(both.grad_sum).all())
    assert torch.equal(both.grad_sum, alone.grad_sum) and both.batch_size == 2
    everything = clipper.clipped_grad_sum(inputs=x[1:], targets=y[1:], loss_fn=ce)
    assert not bool(everything.grad_sum.any())  # every sample non-finite: the sum is 0


def test_reduced_precision_matmul_and_autocast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
    x, y = torch.randn(B, 5, 16), torch.randint(0, NUM_CLASSES, (B,))
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    plain = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum
    with torch.autocast("cpu", dtype=torch.bfloat16):  # norms and sums stay float32
        cast = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum
    assert cast.dtype == torch.float32 and bool(torch.isfinite(cast).all())
    previous = torch.backends.mkldnn.matmul.fp32_precision  # type: ignore[attr-defined]
    try:
        # a reduced-precision setting (bf16 oneDNN, or set_float32_matmul_precision("high"))
        # is switched to IEEE for the clipping step and restored afterwards
        for setting in ("bf16", "tf32"):
            torch.backends.mkldnn.matmul.fp32_precision = setting  # type: ignore[attr-defined]
            again = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum
            assert torch.equal(again, plain)
            assert torch.backends.mkldnn.matmul.fp32_precision == setting  # type: ignore[attr-defined]
        torch.set_float32_matmul_precision("high")
        again = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum
        assert torch.equal(again, plain)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.mkldnn.matmul.fp32_precision = previous  # type: ignore[attr-defined]
    assert torch.equal(clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum, plain)


def test_the_precision_guard_is_process_wide_and_reference_counted() -> None:
    """Two sessions' clipping steps overlap: the first one out must not switch reduced
    precision back on under the second, and the last one out restores the user's setting."""
    import threading

    mm = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]
    previous = mm.fp32_precision
    mm.fp32_precision = "tf32"
    inside = threading.Event()
    leave_first = threading.Event()
    seen: list[str] = []

    def first() -> None:
        with precision.ieee_float32(torch.device("cpu")):
            inside.set()
            leave_first.wait(10)

    try:
        t = threading.Thread(target=first)
        t.start()
        assert inside.wait(10)
        with precision.ieee_float32(torch.device("cpu")):
            seen.append(mm.fp32_precision)
            leave_first.set()
            t.join(10)
            seen.append(mm.fp32_precision)  # the first guard has left; this one has not
        seen.append(mm.fp32_precision)
    finally:
        leave_first.set()
        mm.fp32_precision = previous
    assert seen == ["ieee", "ieee", "tf32"]


def test_scale_is_folded_into_the_clip_factors_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, NUM_CLASSES))
    x, y = torch.randn(B, 1, 6, 6), torch.randint(0, NUM_CLASSES, (B,))
    for mode in ("flat", "automatic"):
        clipper = PerSampleClipper(model, max_grad_norm=0.5, clipping=mode)
        plain = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum
        scaled = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce, scale=2.0**19)
        assert torch.equal(scaled.grad_sum, plain * 2.0**19)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ParameterError, match="scale"):
            clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce, scale=bad)


def test_out_receives_the_sum_also_when_empty_or_rerun() -> None:
    torch.manual_seed(0)
    clipper = PerSampleClipper(mlp(), max_grad_norm=1.0)
    x, y = torch.randn(B, 4), torch.randint(0, NUM_CLASSES, (B,))
    fresh = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce).grad_sum
    buf = torch.full((clipper.num_params,), float("nan"))
    got = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=ce, out=buf).grad_sum
    assert got is buf and torch.equal(buf, fresh)
    empty = clipper.clipped_grad_sum(
        inputs=x[:0], targets=y[:0], loss_fn=ce, out=buf
    ).grad_sum  # fmt: skip
    assert empty is buf and not bool(buf.any())
    # the rerun without non-finite samples writes into the same buffer
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    with torch.no_grad():
        for layer in model:
            assert isinstance(layer, nn.Linear)
            layer.weight.fill_(1e20)
    big = PerSampleClipper(model, max_grad_norm=1.0)
    xs, ys = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 1])
    alone = big.clipped_grad_sum(inputs=xs[:1], targets=ys[:1], loss_fn=ce).grad_sum
    buf2 = torch.full((big.num_params,), float("nan"))
    both = big.clipped_grad_sum(inputs=xs, targets=ys, loss_fn=ce, out=buf2).grad_sum
    assert both is buf2 and torch.equal(buf2, alone)


@pytest.mark.parametrize(
    ("out", "error"),
    [
        (torch.zeros(3), r"out.*shape \(3,\)"),
        ("grads", "out.*str"),
        (None, r"out.*torch\.float64"),
        (None, "out.*contiguous"),
    ],
)
def test_bad_out_is_refused_naming_it(out: object, error: str) -> None:
    clipper = PerSampleClipper(mlp(), max_grad_norm=1.0)
    n = clipper.num_params
    if out is None and "float64" in error:
        out = torch.zeros(n, dtype=torch.float64)
    elif out is None:
        out = torch.zeros(2 * n)[::2]  # right shape and dtype, not contiguous
    with pytest.raises(ParameterError, match=error):
        clipper.clipped_grad_sum(
            inputs=torch.randn(2, 4),
            targets=torch.tensor([0, 1]),
            loss_fn=ce,
            out=out,  # type: ignore[arg-type]
        )


class LstmCellLoop(nn.Module):
    """A recurrence from nn.LSTMCell: its (h, c) state is a tuple argument."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(4, 6)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 6)
        c = x.new_zeros(x.shape[0], 6)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        out: torch.Tensor = self.head(h)
        return out


@pytest.mark.parametrize("mode", MODES)
def test_lstm_cell_with_a_tuple_state_matches_the_reference(mode: ClippingMode) -> None:
    check_against_reference(LstmCellLoop(), torch.randn(B, 5, 4), labels(), mode)


@pytest.mark.parametrize(("rnn", "cell"), [(nn.LSTM, "nn.LSTMCell"), (nn.GRU, "nn.GRUCell")])
def test_fused_rnns_are_refused_with_the_cell_to_use(rnn: type[nn.Module], cell: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnn(4, 6, batch_first=True)
            self.head = nn.Linear(6, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(self.rnn(x)[0][:, -1])
            return out

    clipper = PerSampleClipper(Net(), max_grad_norm=1.0)
    with pytest.raises(ParameterError, match=f"fused recurrent kernel.*{cell}"):
        clipper.clipped_grad_sum(inputs=torch.randn(B, 5, 4), targets=labels(), loss_fn=ce)


def test_the_clipping_type_names_the_protocols_modes() -> None:
    """ClippingMode (for type checkers) spells the one list of modes, CLIPPING_MODES."""
    from typing import get_args

    from mpcdp.protocol.training import CLIPPING_MODES
    from mpcdp.train.clipping import ClippingMode

    assert get_args(ClippingMode) == CLIPPING_MODES
    with pytest.raises(ParameterError, match="must be one of"):
        PerSampleClipper(nn.Linear(2, 1), max_grad_norm=1.0, clipping="fixed")  # type: ignore[arg-type]


def test_a_refused_module_is_a_typed_error_naming_its_path() -> None:
    """Refusals are UnsupportedModuleError: still a ParameterError named "module", with the
    module's path in ``module_path`` and the message of any parameter error."""
    from mpcdp.errors import UnsupportedModuleError

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedModuleError) as err:
        PerSampleClipper(model, max_grad_norm=1.0)
    assert isinstance(err.value, ParameterError)
    assert err.value.name == "module" and err.value.module_path == err.value.value == "1"
    assert str(err.value).startswith("invalid module='1': ")


@pytest.mark.parametrize(("t", "p", "d"), [(1, 5, 7), (3, 6, 8), (9, 2, 3)])
def test_a_linear_sum_is_compared_in_factored_form(t: int, p: int, d: int) -> None:
    """The probe compares a linear layer's sum G^T X with autograd's without writing it
    (Gram matrices, one product with autograd's gradient; S itself where those would be
    larger): the same three numbers as the dense comparison, and autograd's gradient scaled
    by 1.5 is refused while the exact one passes."""
    from mpcdp.errors import UnsupportedModuleError
    from mpcdp.train.clipping import autograd_check

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(t, p, generator=gen)
    x = torch.randn(t, d, generator=gen)
    dense = g.t().mm(x)
    for autograd in (dense, dense * 1.5, None, torch.randn(p, d, generator=gen)):
        got = autograd_check.matmul_sum_stats(g, x, autograd)
        want = autograd_check.sum_stats(dense, autograd)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9)
    names = [("lin", "lin.weight")]
    autograd_check.compare_sum_stats(
        names=names, stats=[autograd_check.matmul_sum_stats(g, x, dense)]
    )
    with pytest.raises(UnsupportedModuleError, match="differs from autograd's gradient"):
        off = autograd_check.matmul_sum_stats(g, x, dense * 1.5)
        autograd_check.compare_sum_stats(names=names, stats=[off])


@pytest.mark.parametrize(
    ("g_value", "x_value"),
    [(1e-20, 1e32), (1e-13, 1e33), (1e-13, 1e-12), (1e-20, 1e-16)],
    ids=["product-overflows", "norms-overflow", "squares-underflow", "squares-underflow-deep"],
)
def test_sum_statistics_neither_overflow_nor_underflow(g_value: float, x_value: float) -> None:
    """The probe's comparison statistics at scales where float32 dots and products over- or
    underflow: the same numbers as an exact float64 reference, and a gradient off by half
    refused (a skipped or vacuous comparison would accept it)."""
    from mpcdp.errors import UnsupportedModuleError
    from mpcdp.train.clipping import autograd_check

    gen = torch.Generator().manual_seed(5)
    for t, p, d in ((1, 8, 6), (30, 4, 3)):  # the Gram branch, and S formed
        g = (1 + torch.rand(t, p, generator=gen)) * g_value
        x = (1 + torch.rand(t, d, generator=gen)) * x_value
        dense = g.double().t().mm(x.double())
        for factor in (1.0, 1.5):
            autograd = (dense * factor).float()
            got = autograd_check.matmul_sum_stats(g, x, autograd)
            s64, a64 = dense.reshape(-1), autograd.double().reshape(-1)
            want = (float(s64 @ s64), float(a64 @ a64), float(s64 @ a64))
            assert got == pytest.approx(want, rel=1e-5)
            dense_got = autograd_check.sum_stats(dense.float(), autograd)
            assert dense_got == pytest.approx(want, rel=1e-5)
            names = [("lin", "lin.weight")]
            if factor == 1.0:
                autograd_check.compare_sum_stats(names=names, stats=[got])
            else:
                for stats in (got, dense_got):
                    with pytest.raises(UnsupportedModuleError, match="differs from autograd"):
                        autograd_check.compare_sum_stats(names=names, stats=[stats])


@pytest.mark.parametrize("magnitude", [1e-30, 1e-21, 1.0, 1e20, 1e36])
@pytest.mark.parametrize("with_ratio", [False, True])
def test_a_row_that_differs_is_found_at_any_scale(magnitude: float, with_ratio: bool) -> None:
    """The probe's row comparison at magnitudes whose float32 norms over- or underflow (rows
    of 1e20 have an infinite float32 norm, rows of 1e-21 a zero one): a row off by half is
    found, equal rows are not, whatever the scale."""
    from mpcdp.train.clipping import checks

    gen = torch.Generator().manual_seed(9)
    full = (1 + torch.rand(6, 40, generator=gen)) * magnitude
    ratio = torch.full((6,), 2.0) if with_ratio else None
    same = full * 2.0 if with_ratio else full.clone()
    assert checks._first_bad_row(full, same, 2.0**-10, ratio) is None
    off = same.clone()
    off[4] *= 1.5
    assert checks._first_bad_row(full, off, 2.0**-10, ratio) == 4
