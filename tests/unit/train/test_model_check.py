"""`mpcdp check-model` and mpcdp.train.model_check: what the clipper does with each layer, the
fixes, the memory estimate, the import-path loading and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from typer.testing import CliRunner

from mpcdp.cli.app import app
from mpcdp.errors import ParameterError
from mpcdp.train.clipping import PerSampleClipper, per_sample_gradients_reference
from mpcdp.train.clipping.rules import use_ghost
from mpcdp.train.layers import DPMultiheadAttention
from mpcdp.train.model_check import (
    ModelReport,
    _ghost_bytes,
    check_model,
    default_loss,
    fix_model,
    load_model,
    synthetic_batch,
)


def report_of(
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    input_dtype: torch.dtype = torch.float32,
    vocab: int | None = None,
    batch_size: int = 64,
    bias_only: bool = False,
) -> ModelReport:
    inputs, targets = synthetic_batch(
        input_shape=shape, num_classes=10, input_dtype=input_dtype, vocab=vocab
    )
    return check_model(
        model, inputs=inputs, targets=targets, batch_size=batch_size, bias_only=bias_only
    )


def methods(report: ModelReport) -> dict[str, str]:
    return {r.path: r.method for r in report.layers}


def clipper_accepts(model: nn.Module, shape: tuple[int, ...]) -> bool:
    inputs, targets = synthetic_batch(input_shape=shape, num_classes=10, batch=6, seed=3)
    with PerSampleClipper(model, max_grad_norm=1.0) as clipper:
        out = clipper.clipped_grad_sum(inputs=inputs, targets=targets, loss_fn=default_loss)
    return bool(torch.isfinite(out.grad_sum).all())


def cnn(norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        # 8x8: T=64, p=8, d=9: 4pd = 288 B <= 16T^2 + 8T(p+d) = 74,240 B -> instantiated
        nn.Conv2d(1, 8, 3, padding=1),
        norm,
        nn.ReLU(),
        # 2x2: T=4, p=16, d=72: 4pd = 4,608 B > 16T^2 + 8T(p+d) = 3,072 B -> ghost
        nn.Conv2d(8, 16, 3, stride=4, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4, 10),  # T=1 -> ghost
    )


class Centre(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.emb(x).mean(dim=1))
        return out


class Scale(nn.Module):
    """A custom layer with parameters of its own: the torch.func fallback."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.b = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w + self.b)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h, _ = self.att(h, h, h)
        out: torch.Tensor = self.head(h.mean(dim=1))
        return out


class Lstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.rnn(x)[0][:, -1])
        return out


# -- what the clipper does with each layer -------------------------------------------------


def test_mlp_is_all_ghost_and_accepted() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    report = report_of(model, (64,))
    assert report.ok and report.refusal is None
    assert methods(report) == {"1": "ghost", "3": "ghost"}
    assert all(r.positions == 1 for r in report.layers)
    assert report.trainable_params == report.total_params == 64 * 32 + 32 + 32 * 10 + 10
    assert report.to_json()["ok"] is True and report.to_json()["memory"]["estimate"] is True


def test_cnn_with_groupnorm_mixes_ghost_and_instantiated() -> None:
    report = report_of(cnn(nn.GroupNorm(4, 8)), (1, 8, 8))
    assert report.ok, report.refusal
    assert methods(report) == {
        "0": "instantiated",
        "1": "closed-form",
        "3": "ghost",
        "6": "ghost",
    }
    by = {r.path: r for r in report.layers}
    assert (by["0"].positions, by["0"].p, by["0"].d) == (64, 8, 9)
    assert (by["3"].positions, by["3"].p, by["3"].d) == (4, 16, 72)
    for r in report.layers:  # the clipper's own rule on the measured T, p, d
        if r.kind == "conv2d":
            assert r.positions is not None and r.p is not None and r.d is not None
            assert (r.method == "ghost") == use_ghost(r.positions, r.p, r.d)
    # the report states the rule as implemented, in bytes per example
    assert by["3"].per_example_bytes == 16 * 4**2 + 8 * 4 * (16 + 72) == 3072
    assert by["3"].note == "ghost: 16T^2+8T(p+d)=3072 B < 4pd=4608 B per example"
    assert by["0"].per_example_bytes == 4 * 8 * 9
    assert by["0"].note == "instantiated: 4pd=288 B <= 16T^2+8T(p+d)=74240 B per example"
    # and the clipper takes those branches: instantiated (B, p, d) only for layer "0"
    x, y = synthetic_batch(input_shape=(1, 8, 8), num_classes=10)
    model = cnn(nn.GroupNorm(4, 8))
    ref = per_sample_gradients_reference(model, inputs=x, targets=y, loss_fn=default_loss)
    with PerSampleClipper(model, max_grad_norm=1e9) as clipper:
        out = clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=default_loss)
    torch.testing.assert_close(out.grad_sum, ref.sum(dim=0), rtol=1e-5, atol=1e-6)


def test_the_reported_bytes_are_those_the_rule_compares() -> None:
    """The note's ghost/instantiated bytes are what use_ghost weighs, on either side."""
    for t in (2, 3, 4, 9, 16, 64):
        for p in (1, 4, 16, 64, 256):
            for d in (1, 9, 72, 300):
                assert use_ghost(t, p, d) == (4 * p * d > _ghost_bytes(t, p, d))


def test_batchnorm_is_refused_and_fix_model_makes_it_pass() -> None:
    model = cnn(nn.BatchNorm2d(8))
    report = report_of(model, (1, 8, 8))
    assert not report.ok and report.refused_module == "1"
    assert "BatchNorm2d" in (report.refusal or "") and methods(report)["1"] == "refused"
    assert [(f.path, f.after, f.applied) for f in report.fixes] == [("1", "GroupNorm(8, 8)", True)]
    assert isinstance(model[1], nn.BatchNorm2d)  # the check changed nothing
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    fixed, changes = fix_model(model)
    assert fixed is model and len(changes) == 1
    gn = model[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 8
    assert torch.equal(gn.weight, torch.full((8,), 2.0))  # affine weights kept
    assert report_of(model, (1, 8, 8)).ok
    assert clipper_accepts(model, (1, 8, 8))


def test_batchnorm1d_fix_keeps_two_channels_per_group() -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Linear(12, 10))
    fixed, changes = fix_model(model)
    assert changes[0].after == "GroupNorm(6, 12)"
    assert clipper_accepts(fixed, (6,))
    root, root_changes = fix_model(nn.BatchNorm2d(48))
    assert isinstance(root, nn.GroupNorm) and root.num_groups == 24 and root_changes[0].path == ""


def test_multihead_attention_is_refused_then_replaced() -> None:
    model = Attention().eval()
    report = report_of(model, (12,), input_dtype=torch.long, vocab=30)
    assert not report.ok and report.refused_module == "att"
    assert methods(report)["att"] == "refused" and methods(report)["att.out_proj"] == "refused"
    assert [f.after for f in report.fixes] == ["DPMultiheadAttention(16, 2)"]
    assert "set its dropout" not in report.fixes[0].advice
    x = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(1))
    before = model(x)
    fix_model(model)
    assert torch.allclose(model(x), before, atol=1e-6)
    after = report_of(model.train(), (12,), input_dtype=torch.long, vocab=30)
    assert after.ok, after.refusal
    assert {methods(after)[f"att.{n}_proj"] for n in "qkv"} <= {"ghost", "instantiated"}


def test_transformer_layer_fix_keeps_attention_dropout() -> None:
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True), nn.Linear(16, 10)
    )
    report = report_of(model, (6, 16))
    assert not report.ok and report.refused_module == "0.self_attn"
    fixed, changes = fix_model(model)
    assert fixed is model and changes[0].after == "DPMultiheadAttention(16, 2, dropout=0.1)"
    after = report_of(model, (6, 16))
    # attention dropout is an nn.Dropout module in DPMultiheadAttention: accepted, as are
    # the layer's other nn.Dropout modules
    assert after.ok, after.refusal
    attention = model[0].self_attn
    assert isinstance(attention, DPMultiheadAttention) and attention.attn_dropout.p == 0.1
    assert isinstance(model[0].dropout1, nn.Dropout) and model[0].dropout1.p == 0.1


def test_sequence_first_attention_cannot_be_fixed_and_says_why() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2))  # batch_first=False
    fixed, changes = fix_model(model)
    assert fixed is model and isinstance(model[0], nn.MultiheadAttention)
    assert [(c.path, c.applied) for c in changes] == [("0", False)]
    assert "batch_first=True" in changes[0].advice


def test_centring_by_the_batch_mean_is_refused_naming_the_module() -> None:
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(5, 5))
    model.add_module("centre", Centre())
    model.add_module("head", nn.Linear(5, 10))
    report = report_of(model, (5,))
    assert not report.ok and report.refused_module == "centre"
    assert "examples interact" in (report.refusal or "")
    assert report.fixes == ()


def test_tied_weights_are_refused() -> None:
    report = report_of(Tied(), (7,), input_dtype=torch.long, vocab=20)
    assert not report.ok and "weight tying" in (report.refusal or "")
    assert methods(report) == {"emb": "instantiated", "head": "refused"}
    emb = report.layers[0]
    # sparse rows of the example's own tokens: at most T*E values (T=7, E=8), not E*V
    assert (emb.positions, emb.p, emb.d) == (7, 8, 20)
    assert emb.per_example_bytes == 7 * 8 * 4 and "at most T*E=56 values" in emb.note
    assert report.trainable_params == 20 * 8  # counted once


def test_custom_module_uses_the_fallback_and_it_works() -> None:
    model = nn.Sequential(nn.Linear(6, 6), Scale(6), nn.Linear(6, 10))
    report = report_of(model, (6,))
    assert report.ok, report.refusal
    assert methods(report)["1"] == "fallback" and "works" in report.layers[1].note
    assert report.layers[1].per_example_bytes == 12 * 4


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_fused_lstm_is_refused_with_the_cell_advice() -> None:
    report = report_of(Lstm(), (5, 4))
    assert not report.ok and report.refused_module == "rnn"
    assert "nn.LSTMCell" in (report.refusal or "")


def test_bias_only_reports_bias_rules() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    report = report_of(model, (8,), bias_only=True)
    assert report.ok and methods(report) == {"0": "bias", "2": "bias"}
    assert report.trainable_params == 18 and report.total_params == 8 * 8 + 8 + 8 * 10 + 10
    assert all(p.requires_grad for p in model.parameters())  # the user's model is untouched


# -- the memory estimate -------------------------------------------------------------------


def _saved_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """What autograd saves in a forward at this batch, measured."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs)
    return sum(seen.values())


def test_activation_estimate_matches_a_measured_forward_at_the_batch() -> None:
    model = cnn(nn.GroupNorm(4, 8))
    report = report_of(model, (1, 8, 8), batch_size=32)
    assert report.memory is not None
    measured = _saved_bytes(model, torch.randn(32, 1, 8, 8))
    assert 0.5 * measured <= report.memory.activations <= 2.0 * measured


def test_instantiated_layers_dominate_where_expected() -> None:
    model = SeqMix()
    report = report_of(model, (128, 64), batch_size=16)
    assert methods(report) == {"mix": "instantiated", "head": "ghost"}
    memory = report.memory
    assert memory is not None
    # measured: the per-sample gradients of the instantiated layer, as the reference forms them
    x, y = synthetic_batch(input_shape=(128, 64), num_classes=10, batch=16)
    ref = per_sample_gradients_reference(model, inputs=x, targets=y, loss_fn=default_loss)
    mix_bytes = ref[:, : 64 * 64 + 64].numel() * ref.element_size()
    assert mix_bytes <= memory.per_sample_grads <= 1.1 * mix_bytes
    assert memory.per_sample_grads > max(memory.transient, memory.parameters)
    assert memory.total > memory.per_sample_grads + memory.activations


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it untyped
    """The peak of the bytes held by tensors that ops create while the mode is on, measured:
    a storage counts from its first tensor until its last one is freed."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensors]
        self.now = self.peak = 0

    def _free(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.refs[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr == 0:
                    continue
                if ptr not in self.refs:
                    self.refs[ptr] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.refs[ptr][1] += 1
                weakref.finalize(t, self._free, ptr)
        return out


class SeqMix(nn.Module):
    """Linear(64, 64) over T=128 positions: 4pd <= 16T^2 + 8T(p+d), so instantiated."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(F.relu(self.mix(x)).mean(dim=1))
        return out


@pytest.mark.parametrize(
    ("model", "shape"), [(cnn(nn.GroupNorm(4, 8)), (1, 8, 8)), (SeqMix(), (128, 64))]
)
def test_memory_estimate_is_near_the_measured_peak_of_a_step(
    model: nn.Module, shape: tuple[int, ...]
) -> None:
    batch = 32
    memory = report_of(model, shape, batch_size=batch).memory
    assert memory is not None
    x, y = synthetic_batch(input_shape=shape, num_classes=10, batch=batch)
    with PerSampleClipper(model, max_grad_norm=1.0) as clipper:
        clipper.check_model(inputs=x, targets=y, loss_fn=default_loss)
        with LiveBytes() as live:
            clipper.clipped_grad_sum(inputs=x, targets=y, loss_fn=default_loss)
    measured = live.peak + memory.parameters  # the parameters existed before the step
    assert 0.5 * measured <= memory.total <= 2.0 * measured


# -- loading -------------------------------------------------------------------------------


def write_module(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


NETS = """
    from torch import nn

    def build(name):
        if name == "mlp":
            return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        if name == "bn":
            return nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
            )
        raise ValueError(f"no model called {name!r}")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(x)

    instance = Net()
    def needs_dep(name):
        import surely_missing_dep_xyz  # noqa: F401
    number = 3
    def not_a_module(name):
        return 42
"""


@pytest.fixture
def user_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> tuple[Path, str]:
    """A folder with a model module of a name unique to the test; sys.path restored after."""
    name = f"nets_{request.node.name.replace('[', '_').replace(']', '_').replace('-', '_')}"
    write_module(tmp_path / "code", name, NETS)
    write_module(tmp_path / "code", f"{name}_dep", "import surely_missing_dep_xyz\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path / "code", name


def test_load_model_accepts_factories_classes_and_instances(user_code: tuple[Path, str]) -> None:
    folder, mod = user_code
    mlp = load_model(f"{mod}:build", name="mlp", python_path=[folder])
    assert isinstance(mlp, nn.Sequential)
    assert isinstance(load_model(f"{mod}:Net"), nn.Module)
    assert isinstance(load_model(f"{mod}:instance"), nn.Module)


@pytest.mark.parametrize(
    ("target", "name", "words"),
    [
        ("no_colon", None, "must be an import path"),
        ("surely_missing_pkg_xyz:build", None, "'surely_missing_pkg_xyz' was not found"),
        ("{mod}:missing", None, "has no attribute 'missing'"),
        ("{mod}:build", "resnet", "build('resnet') raised ValueError: no model called 'resnet'"),
        ("{mod}:number", None, "is a int, not a factory"),
        ("{mod}:needs_dep", "x", "needs_dep('x') raised ModuleNotFoundError"),
        ("{mod}_dep:f", None, "it imports 'surely_missing_dep_xyz', which was not found"),
        ("{mod}:not_a_module", "x", "returned a int, not a torch.nn.Module"),
    ],
)
def test_load_model_errors_name_the_value(
    user_code: tuple[Path, str], target: str, name: str | None, words: str
) -> None:
    folder, mod = user_code
    target = target.format(mod=mod)
    with pytest.raises(ParameterError) as err:
        load_model(target, name=name, python_path=[folder])
    assert err.value.name == "model" and err.value.value == target
    assert words in str(err.value)


def test_load_model_refuses_a_python_path_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match=r"python_path.*is not a directory"):
        load_model("x:y", python_path=[tmp_path / "nowhere"])


# -- the command ---------------------------------------------------------------------------


def test_command_reports_ok_and_usage_errors(user_code: tuple[Path, str]) -> None:
    folder, mod = user_code
    runner = CliRunner()
    common = ["check-model", "--python-path", str(folder)]
    ok = runner.invoke(app, [*common, f"{mod}:build", "--name", "mlp"])
    assert ok.exit_code == 0, ok.output
    assert "ghost" in ok.output and "accepts" in ok.output and "an estimate" in ok.output
    raising = runner.invoke(app, [*common, f"{mod}:build", "--name", "vgg"])
    assert raising.exit_code == 2 and "build('vgg') raised ValueError" in raising.output
    missing = runner.invoke(app, [*common, f"{mod}:nothing"])
    assert missing.exit_code == 2 and "has no attribute 'nothing'" in missing.output
    shape = runner.invoke(app, [*common, f"{mod}:build", "--name", "mlp", "--input-shape", "3"])
    assert shape.exit_code == 2 and "--input-shape" not in shape.output
    assert "forward failed on the synthetic batch" in shape.output
    conv = runner.invoke(app, [*common, f"{mod}:build", "--name", "bn"])
    assert conv.exit_code == 2 and "--input-shape" in conv.output
    bad = runner.invoke(app, [*common, f"{mod}:build", "--input-shape", "1,x"])
    assert bad.exit_code == 2 and "1,x" in bad.output


@pytest.mark.slow
def test_installed_command_refuses_batchnorm_and_writes_the_fixed_factory(
    user_code: tuple[Path, str],
) -> None:
    folder, mod = user_code
    exe = Path(sys.executable).parent / "mpcdp"
    fixed_py = folder / f"fixed_{mod}.py"
    args = [
        str(exe), "check-model", f"{mod}:build", "--name", "bn", "--python-path", str(folder),
        "--input-shape", "1,6,6", "--batch-size", "32", "--fix-out", str(fixed_py), "--json",
    ]  # fmt: skip
    run = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=folder.parent)
    assert run.returncode == 1, run.stderr
    out = json.loads(run.stdout)
    assert out["ok"] is False and out["report"]["refused_module"] == "1"
    assert out["report"]["fixes"][0]["after"] == "GroupNorm(4, 4)"
    assert out["fixed"]["ok"] is True and out["report"]["memory"]["batch_size"] == 32
    # the written factory applies the fix: the model it builds is accepted
    again = CliRunner().invoke(
        app,
        ["check-model", f"fixed_{mod}:build", "--name", "bn", "--python-path", str(folder),
         "--input-shape", "1,6,6"],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "GroupNorm" in again.output and "closed-form" in again.output
