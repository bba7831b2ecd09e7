"""Training tasks declared in party.toml: model, data, loss and collate by
import path, loaded when the node starts; the architecture fingerprint every site checks at
TrainOpen; and the DataLoader path's Poisson sampling. Real party nodes over loopback mTLS,
real SQLite ledgers, real torch on the CPU; the user's code is tests/fixtures/usercode,
copied into each test's folder and reached through python_path."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from scipy import stats

from mpcdp.config.party_config import load_party_config
from mpcdp.errors import ConfigError, ParameterError, RoundAborted
from mpcdp.federation import Federation
from mpcdp.party.node import check_datasets
from mpcdp.protocol.training import TrainSpec
from mpcdp.protocol.training.fingerprint import (
    fingerprint,
    first_difference,
)
from mpcdp.train.declared import import_object, load_data
from mpcdp.train.federated import train
from mpcdp.train.gradient_source import TorchGradientSource
from tests.conftest import PARTIES, Net, build_net
from tests.stats import chi_square_pvalue

USERCODE = Path(__file__).resolve().parents[1] / "fixtures" / "usercode"
MODELS = "mpcdp_fixture_models"
DATA = "mpcdp_fixture_data"


def user_code(root: Path) -> Path:
    """The user's project folder next to the party.toml files (python_path = "code")."""
    code = root / "code"
    if not code.exists():
        shutil.copytree(USERCODE, code, ignore=shutil.ignore_patterns("__pycache__"))
    return code


def dataset_toml(name: str, body: str, *, tables: str = "", epsilon: float = 50.0) -> str:
    """``[datasets.NAME]`` with ``body``'s keys, python_path, a budget, then ``tables``."""
    return (
        f'\n[datasets.{name}]\npython_path = "code"\n{body}\nepsilon = {epsilon}\n'
        f"delta = 1e-5\n{tables}\n"
    )


def party_file(root: Path, datasets: str) -> Path:
    """A standalone party.toml of alice (no certificates needed to check datasets)."""
    user_code(root)
    cfg = root / "alice.toml"
    cfg.write_text(
        'id = "alice"\nlisten = "127.0.0.1:0"\nledger = "alice.sqlite"\n'
        '[tls]\nca = "ca.pem"\ncert = "alice.pem"\nkey = "alice.key"\n'
        'coordinators = ["analyst"]\npeers = ["bob"]\n' + datasets
    )
    return cfg


# -- loading --------------------------------------------------------------------------------


GOOD = f'model = "{MODELS}:make"\ndata = "{DATA}:blobs"\nnum_classes = 3'


@pytest.mark.parametrize(
    ("body", "key", "value", "problem"),
    [
        ('model = "nope_pkg.models:make"\ndata = "{D}:blobs"', "model", "nope_pkg.models:make",
         "cannot import module 'nope_pkg.models'"),
        ('model = "{M}:missing"\ndata = "{D}:blobs"', "model", "{M}:missing", "has no 'missing'"),
        ('model = "{M}:raising"\ndata = "{D}:blobs"', "model", "{M}:raising",
         "the factory raised RuntimeError: boom"),
        ('model = "{M}:not_a_module"\ndata = "{D}:blobs"', "model", "{M}:not_a_module",
         "returned int, not a torch.nn.Module"),
        ('model = "{M}:make"\ndata = "{D}:raising"', "data", "{D}:raising",
         "the factory raised OSError: the scans folder is not mounted"),
        ('model = "{M}:make"\ndata = "{D}:not_a_dataset"', "data", "{D}:not_a_dataset",
         "not a map-style Dataset"),
        ('model = "{M}:make"\ndata = "{D}:singles"', "data", "{D}:singles",
         "not a (features, target) pair"),
        ('model = "{M}:make"\ndata = "{D}:ragged"', "data", "{D}:ragged",
         "item 3 has features (9,) and target (); item 0 has (8,)"),
        ('model = "{M}:make"\ndata = "{D}:with_nan"', "data", "{D}:with_nan",
         "item 0 has a non-finite feature"),
        ('model = "{M}:make"\ndata = "{D}:word_labels"', "data", "{D}:word_labels",
         "target is str, not a number"),
        ('model = "{M}:make"\ndata = "{D}:big_labels"\nnum_classes = 3', "data",
         "{D}:big_labels", "label 7, outside [0, num_classes=3)"),
        ('model = "{M}:make"\ndata = "{D}:empty"', "data", "{D}:empty", "the Dataset is empty"),
        ('model = "{M}:make"\ndata = "{D}:blobs"\nloss = "{M}:no_loss"', "loss", "{M}:no_loss",
         "has no 'no_loss'"),
        ('model = "{M}:make"\ndata = "{D}:blobs"\ncollate = "{D}:nothing"', "collate",
         "{D}:nothing", "has no 'nothing'"),
    ],
)  # fmt: skip
def test_a_bad_declaration_makes_the_task_unavailable_naming_site_key_and_value(
    tmp_path: Path, body: str, key: str, value: str, problem: str
) -> None:
    fill = {"M": MODELS, "D": DATA}
    cfg = party_file(
        tmp_path,
        # the same Dataset (blobs) twice: one budget
        dataset_toml("good", GOOD) + dataset_toml("bad", body.format(**fill) + '\nbudget = "good"'),
    )
    states = check_datasets(load_party_config(cfg))
    assert states["good"] is None
    error = states["bad"]
    assert error is not None
    assert f"site 'alice': datasets.bad.{key} = {value.format(**fill)!r}" in error
    assert problem in error


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('model = "not an import path"\ndata = "d:x"', "datasets.t.model: 'not an import path' "
         "is not an import path"),
        ('data = "d:x"\nloss = "hinge"', "datasets.t.loss: must be 'cross_entropy', 'mse'"),
        ('data = "d:x"\npython_path = "nowhere"', "datasets.t.python_path: "),
        ('data = "d:x"\npath = "a.npz"', "datasets.t.path: give either path"),
        ('path = "a.npz"\nnum_classes = 3\ncollate = "d:c"', "datasets.t.collate: applies to data"),
        ('data = "d:x"\nloss = "mse"\nnum_classes = 3', "datasets.t.num_classes: must be 0"),
        ('data = "d:x"\nmax_physical_batch = 0', "datasets.t.max_physical_batch: must be in"),
        ('data = "d:x"\nnum_workers = -1', "datasets.t.num_workers: must be in [0, 256]"),
        ('data = "d:x"\npin_memory = "yes"', "datasets.t.pin_memory: has the wrong type"),
        ('path = "a.csv"\nmodel = "m:f"', "datasets.t.model: is a training key"),
    ],
)  # fmt: skip
def test_party_toml_refuses_malformed_training_keys(
    tmp_path: Path, body: str, message: str
) -> None:
    cfg = party_file(tmp_path, f"\n[datasets.t]\n{body}\nepsilon = 1.0\ndelta = 1e-5\n")
    with pytest.raises(ConfigError) as exc:
        load_party_config(cfg)
    assert message in str(exc.value)


def test_a_declared_dataset_is_probed_at_start_and_read_whole_by_party_check(
    tmp_path: Path,
) -> None:
    """The node reads 16 items spread over the Dataset; `mpcdp party check` reads every one
    (a NaN at an item the probe skips shows only there)."""
    code = user_code(tmp_path)
    (code / "late_nan.py").write_text(
        "import numpy as np\n"
        "def make():\n"
        "    x = np.zeros((100, 8), np.float32)\n"
        "    x[37, 2] = float('nan')\n"
        "    return [(x[i], i % 3) for i in range(100)]\n"
    )
    cfg = load_party_config(party_file(tmp_path, dataset_toml("t", 'data = "late_nan:make"')))
    decl = cfg.datasets["t"].training
    assert decl is not None
    loaded = load_data(decl, where="site 'alice': datasets.t", num_classes=0)
    assert loaded.count == 100 and loaded.feature_shape == (8,) and loaded.integer_targets
    error = check_datasets(cfg)["t"]
    assert error is not None and "item 37 has a non-finite feature" in error


# -- fingerprint ----------------------------------------------------------------------------


def test_first_difference_names_the_parameter_and_the_attribute() -> None:
    a = ("parameter fc.weight shape=(10,64) dtype=float32 requires_grad=True",)
    b = ("parameter fc.weight shape=(10,32) dtype=float32 requires_grad=True",)
    assert first_difference(a, b) == (
        "parameter 'fc.weight' has shape (10,64) here, (10,32) at the coordinator"
    )
    c = ("parameter head.weight shape=(10,64) dtype=float32 requires_grad=True",)
    assert first_difference(a, c) == (
        "entry 0 is parameter 'fc.weight' here, parameter 'head.weight' at the coordinator"
    )
    extra = (*a, "buffer pos shape=(4,) dtype=float32")
    assert first_difference(extra, a) == "buffer 'pos' exists here only (entry 1)"
    assert first_difference(a, extra) == "buffer 'pos' exists at the coordinator only (entry 1)"
    assert first_difference(a, a) == ""


def test_a_spec_s_fingerprint_must_hash_its_architecture() -> None:
    entries = ("parameter w shape=(3,) dtype=float32 requires_grad=True",)
    base = dict(
        run_id="r", dataset="d", model="m", parties=PARTIES, sample_rate=0.1, steps=1,
        max_grad_norm=1.0, scale_bits=8, mu=100.0, num_params=3,
    )  # fmt: skip
    TrainSpec(**base, architecture=entries, fingerprint=fingerprint(entries))  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="fingerprint"):
        TrainSpec(**base, architecture=entries, fingerprint="0" * 64)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="architecture"):
        TrainSpec(**base, architecture=("a\nb",), fingerprint=fingerprint(("a\nb",)))  # type: ignore[arg-type]


def blobs_extra(model: str = "make", options: dict[str, str] | None = None) -> dict[str, str]:
    """Each site's [datasets.ex]: ``model``, 40 blobs of its own seed."""
    out = {}
    for i, p in enumerate(PARTIES):
        tables = f"[datasets.ex.data_options]\nseed = {i}\n"
        if options and p in options:
            tables += f"[datasets.ex.model_options]\n{options[p]}\n"
        body = f'model = "{MODELS}:{model}"\ndata = "{DATA}:blobs"\nnum_classes = 3'
        out[p] = dataset_toml("ex", body, tables=tables)
    return out


@pytest.fixture
def blobs_net(tmp_path: Path) -> Iterator[Net]:
    user_code(tmp_path)
    net = build_net(tmp_path, extra=blobs_extra(options={"carlos": "width = 5"}))
    try:
        yield net
    finally:
        net.stop()


def spent(net: Net) -> dict[str, float]:
    return {p: float(n.ledger.status("ex").spent_epsilon) for p, n in net.nodes.items()}


def refused_before_any_charge(net: Net, model: str, **options: Any) -> str:
    """Train ``model`` for one small epoch, expecting the sites to refuse it: the refusal's
    text, after checking that no site spent anything."""
    with Federation.from_config(net.federation) as fed:
        with pytest.raises(RoundAborted) as exc:
            fed.train(
                dataset="ex", model=model, target_epsilon=5.0, target_delta=1e-5, epochs=1,
                batch_size=10, **options,
            )  # fmt: skip
    assert spent(net) == {p: 0.0 for p in PARTIES}
    return str(exc.value)


def test_a_different_architecture_is_refused_naming_the_difference_and_nothing_is_charged(
    blobs_net: Net,
) -> None:
    """carlos declares the same factory with width = 5: same kind of model, other shapes."""
    text = refused_before_any_charge(
        blobs_net, f"{MODELS}:make", python_path=blobs_net.root / "code", seed=1
    )
    assert "site 'carlos'" in text
    assert "parameter '0.weight' has shape (5,8) here, (6,8) at the coordinator" in text
    # and a run naming another model than the one a site declared is refused before any charge
    text = refused_before_any_charge(blobs_net, "mlp:8,6,3")
    assert "trains model 'mpcdp_fixture_models:make' here" in text


def test_models_whose_buffers_training_changes_are_refused(tmp_path: Path) -> None:
    """A buffer changed by the forward pass is refused by every site at TrainOpen (nothing
    charged); BatchNorm's running statistics are refused by the fingerprint's description
    (and already by the coordinator's clipper)."""
    from mpcdp.train.architecture import describe_architecture

    code = user_code(tmp_path)
    batchnorm = import_object(f"{MODELS}:batchnorm", python_path=[code], where="test")
    with pytest.raises(ParameterError, match="updates its running statistics"):
        describe_architecture(batchnorm("x"))
    net = build_net(tmp_path, extra=blobs_extra(model="counting"))
    try:
        text = refused_before_any_charge(net, f"{MODELS}:counting", python_path=net.root / "code")
        assert re.search(r"buffer 'calls'.*changed in a forward pass", text)
    finally:
        net.stop()


def test_an_unavailable_declared_task_tells_the_coordinator_nothing_more(tmp_path: Path) -> None:
    user_code(tmp_path)
    extra = blobs_extra()
    extra["bob"] = extra["bob"].replace(f"{MODELS}:make", f"{MODELS}:raising")
    net = build_net(tmp_path, extra=extra)
    try:
        assert "the factory raised RuntimeError" in (net.nodes["bob"].dataset_states()["ex"] or "")
        with Federation.from_config(net.federation) as fed:
            assert fed.examples("ex")["bob"] == 0  # Describe says no more
            with pytest.raises(RoundAborted) as exc:
                train(
                    clients=fed.clients,
                    dataset="ex",
                    model=f"{MODELS}:make",
                    examples={p: 40 for p in PARTIES},
                    python_path=net.root / "code",
                    target_epsilon=5.0,
                    target_delta=1e-5,
                    epochs=1,
                    batch_size=10,
                )
        assert "'ex' is unavailable at party 'bob'" in str(exc.value)
        assert "boom" not in str(exc.value) and "raising" not in str(exc.value)
    finally:
        net.stop()


# -- regression -----------------------------------------------------------------------------


def test_regression_with_mse_trains_across_three_sites_and_reports_loss(tmp_path: Path) -> None:
    user_code(tmp_path)
    extra = {}
    for i, p in enumerate(PARTIES):
        extra[p] = dataset_toml(
            "reg",
            f'model = "{MODELS}:regressor"\ndata = "{DATA}:regression"\nloss = "mse"\n'
            "max_physical_batch = 16",
            # a held-out split through the same factory: only its arguments differ
            tables=f"[datasets.reg.data_options]\nseed = {i}\nn = 120\n"
            f"[datasets.reg.eval_data_options]\nseed = {100 + i}\nn = 50",
        )
    net = build_net(tmp_path, extra=extra)
    import sys

    sys.path.insert(0, str(net.root / "code"))
    try:
        from mpcdp_fixture_data import regression

        test = regression(seed=99, n=200)
        with Federation.from_config(net.federation) as fed:
            result = fed.train(
                dataset="reg",
                model=f"{MODELS}:regressor",
                python_path=[net.root / "code"],
                loss="mse",
                target_epsilon=20.0,
                target_delta=1e-5,
                epochs=8,
                batch_size=36,
                learning_rate=0.05,
                max_grad_norm=5.0,
                eval_data=test,
                seed=3,
                site_eval_every=4,
                site_eval_epsilon=2.0,
                site_eval_loss_bound=100.0,
            )
    finally:
        sys.path.remove(str(net.root / "code"))
        net.stop()
    # the sites scored the model on their declared splits (DataLoader path) after epochs 4, 8
    evaluated = [r for r in result.history if r.site_loss is not None]
    assert [r.epoch for r in evaluated] == [4, 8]
    assert result.plan.eval_words == 1  # mse: the loss alone
    for r in evaluated:
        assert r.site_accuracy is None and r.site_examples == 150
        assert r.site_loss is not None and 0.0 <= r.site_loss <= 100.0
    losses = [r.test_loss for r in result.history]
    assert all(r.test_accuracy is None for r in result.history)
    assert all(v is not None for v in losses)
    baseline = float(np.mean(test.y**2))  # predicting 0: about 31.25
    assert losses[0] is not None and losses[-1] is not None
    assert losses[-1] < losses[0] and losses[-1] < 0.1 * baseline
    assert result.epsilon <= 20.0


# -- the DataLoader path's Poisson sampling -------------------------------------------------


def _source(
    tmp_path: Path, *, n: int, q: float, physical: int, workers: int = 0
) -> tuple[TorchGradientSource, object]:
    code = user_code(tmp_path)
    (code / "recording_data.py").write_text(
        "from mpcdp_fixture_data import Recording\n"
        f"DATASET = Recording({n})\n"
        "def make():\n    return DATASET\n"
    )
    cfg = load_party_config(
        party_file(tmp_path, dataset_toml("t", 'data = "recording_data:make"\nnum_classes = 3'))
    )
    decl = cfg.datasets["t"].training
    assert decl is not None
    data = load_data(decl, where="t", num_classes=3)
    model = torch.nn.Linear(8, 3)
    spec = TrainSpec(
        run_id="r", dataset="t", model="m", parties=PARTIES, sample_rate=q, steps=1,
        max_grad_norm=1.0, scale_bits=10, mu=1e6, num_params=27,
    )  # fmt: skip
    source = TorchGradientSource(
        model=model, spec=spec, data=data, device="cpu", max_physical_batch=physical,
        num_workers=workers,
    )  # fmt: skip
    return source, data.dataset


def test_the_dataloader_path_samples_each_item_independently_with_rate_q(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """400 steps over 400 items at q = 0.05: every step's batch size is Binomial(400, q)
    (chi-square), every item's count over the steps Binomial(400, q) (chi-square over the
    items), each at alpha 1e-7; micro-batches hold at most max_physical_batch items, only
    the sampled items are read, and no sampled index is logged."""
    n, q, steps, physical = 400, 0.05, 400, 7
    source, dataset = _source(tmp_path, n=n, q=q, physical=physical)
    sizes_seen: list[int] = []
    source.model.register_forward_hook(lambda m, i, o: sizes_seen.append(int(i[0].shape[0])))
    rng = np.random.default_rng(2024)
    sizes = np.empty(steps, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    with caplog.at_level(logging.DEBUG):
        for s in range(steps):
            dataset.reads.clear()  # type: ignore[attr-defined]
            source.quantized_gradient(rng=rng)
            reads = np.asarray(dataset.reads, dtype=np.int64)  # type: ignore[attr-defined]
            assert np.unique(reads).size == reads.size  # each sampled item read once
            sizes[s] = reads.size
            counts[reads] += 1
    source.close()
    p_sizes = chi_square_pvalue(sizes, lambda k: stats.binom.pmf(k, n, q))
    assert p_sizes > 1e-7, p_sizes
    expected = steps * q
    chi2 = float(((counts - expected) ** 2 / (expected * (1 - q))).sum())
    assert stats.chi2.sf(chi2, df=n) > 1e-7 and stats.chi2.cdf(chi2, df=n) > 1e-7, chi2
    assert sizes_seen and max(sizes_seen) <= physical
    assert sum(sizes_seen) >= sizes.sum()  # (the hook came after the check batch at open)
    text = " ".join(r.getMessage() for r in caplog.records)
    numbers = {int(t) for t in re.findall(r"\d+", text)}
    assert not numbers & {int(i) for i in np.flatnonzero(counts) if i >= 100}


def test_dataloader_workers_give_the_same_gradients(tmp_path: Path) -> None:
    """Two worker processes read the same sampled items as the site's own process: the same
    rng gives bit-identical words."""
    a, _ = _source(tmp_path / "a", n=60, q=0.3, physical=5)
    b, _ = _source(tmp_path / "b", n=60, q=0.3, physical=5, workers=2)
    b.model.load_state_dict(a.model.state_dict())
    try:
        for seed in range(3):
            wa = a.quantized_gradient(rng=np.random.default_rng(seed)).copy()
            wb = b.quantized_gradient(rng=np.random.default_rng(seed)).copy()
            assert np.array_equal(wa, wb)
    finally:
        a.close()
        b.close()


def test_the_dataloader_source_refuses_bad_arguments(tmp_path: Path) -> None:
    source, _ = _source(tmp_path, n=10, q=0.5, physical=4)
    source.close()
    spec = TrainSpec(
        run_id="r", dataset="t", model="m", parties=PARTIES, sample_rate=0.5, steps=1,
        max_grad_norm=1.0, scale_bits=10, mu=1e6, num_params=27,
    )  # fmt: skip
    with pytest.raises(ParameterError, match="exactly one"):
        TorchGradientSource(model=torch.nn.Linear(8, 3), spec=spec, device="cpu")
    with pytest.raises(ParameterError, match="max_physical_batch"):
        _source(tmp_path / "b", n=10, q=0.5, physical=0)


# -- the command line -----------------------------------------------------------------------


@pytest.mark.slow
def test_mpcdp_train_trains_a_model_named_by_import_path(tmp_path: Path) -> None:
    """As a user runs it: three `mpcdp party serve` processes, each with the user's code in
    its folder and a party.toml declaring the factory, and the installed
    `mpcdp train --model pkg.mod:factory --python-path DIR` at the coordinator."""
    import json
    import subprocess
    import sys

    from typer.testing import CliRunner

    from mpcdp.cli.app import app
    from mpcdp.local.localnet import launch

    code = user_code(tmp_path)
    for p in PARTIES:
        shutil.copytree(code, tmp_path / p / "code")
    blobs = import_object(f"{DATA}:blobs", python_path=[code], where="test")
    test = blobs(seed=99, n=300)
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    exe = str(Path(sys.executable).parent / "mpcdp")
    with launch(workdir=tmp_path, datasets_toml=blobs_extra()) as local:
        args = [
            exe, "train", "--federation", str(local.federation_config), "--dataset", "ex",
            "--model", f"{MODELS}:make", "--python-path", str(code),
            "--target-epsilon", "40", "--epochs", "4", "--batch-size", "12", "--lr", "0.1",
            "--eval", str(tmp_path / "test.npz"), "--metrics", str(tmp_path / "m.json"),
            "--seed", "4",
        ]  # fmt: skip
        out = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "done:" in out.stdout
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert metrics["plan"]["model"] == f"{MODELS}:make"
        assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3, 4]
        # chance is 1/3; the noise at epsilon 40 is small against 120 examples
        assert max(r["test_accuracy"] for r in metrics["history"]) > 0.5
        for p in PARTIES:  # each site's ledger, read by the same app in this process
            budget = CliRunner().invoke(
                app, ["budget", "--config", str(local.party_configs[p]), "--json"]
            )
            assert budget.exit_code == 0, budget.stderr
            assert '"ex"' in budget.stdout and "training" in budget.stdout, budget.stdout
        # the same command without the factory's folder says what is missing (a process of
        # its own: this one may have imported the factory's module already)
        bad = subprocess.run(args[:8] + args[10:], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1
        assert f"model = '{MODELS}:make': cannot import module '{MODELS}'" in bad.stderr


def test_a_site_without_a_declared_model_says_so_for_an_import_path(tmp_path: Path) -> None:
    """A site whose dataset is an .npz with no `model = ...` refuses a run naming an import
    path, with the hint, before any charge."""
    user_code(tmp_path)
    extra = {}
    for i, p in enumerate(PARTIES):
        x = np.random.default_rng(i).normal(size=(30, 8)).astype(np.float32)
        np.savez(tmp_path / f"{p}-ex.npz", x=x, y=np.arange(30) % 3)
        extra[p] = (
            f'\n[datasets.ex]\npath = "{p}-ex.npz"\nnum_classes = 3\nepsilon = 9.0\ndelta = 1e-5\n'
        )
    net = build_net(tmp_path, extra=extra)
    try:
        text = refused_before_any_charge(net, f"{MODELS}:make", python_path=net.root / "code")
        assert "declares no model = 'mpcdp_fixture_models" in text
    finally:
        net.stop()


def _words_with_and_without_the_bad_item(
    tmp_path: Path, data: str, caplog: pytest.LogCaptureFixture
) -> list[np.ndarray]:
    """One step's words of a Dataset task (``data``, a factory taking ``bad``) with the bad
    item (bad = true) and without it (bad = false): the same model, sample and dither."""
    spec = TrainSpec(
        run_id="r", dataset="t", model="m", parties=PARTIES, sample_rate=1.0, steps=1,
        max_grad_norm=1.0, scale_bits=10, mu=1e6, num_params=27,
    )  # fmt: skip
    words = []
    for bad in ("true", "false"):
        cfg = load_party_config(
            party_file(
                tmp_path,
                dataset_toml(
                    "t", f'data = "{data}"', tables=f"[datasets.t.data_options]\nbad = {bad}"
                ),
            )
        )
        decl = cfg.datasets["t"].training
        assert decl is not None
        torch.manual_seed(0)
        source = TorchGradientSource(
            model=torch.nn.Linear(8, 3),
            spec=spec,
            data=load_data(decl, where="t", num_classes=3),
            device="cpu",
        )
        with caplog.at_level(logging.WARNING):
            words.append(source.quantized_gradient(rng=np.random.default_rng(1)).copy())
        source.close()
    return words


def test_a_sampled_item_with_nan_features_contributes_zero_and_the_step_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 37 is NaN, past the probe at start: when sampled it is dropped from its batch
    (only a count in the site's log), so the step's words equal those of the same batch
    without it, and nothing fails where a coordinator could see it."""
    code = user_code(tmp_path)
    (code / "nan_at_37.py").write_text(
        "import numpy as np\n"
        "def make(bad: bool = True):\n"
        "    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)\n"
        "    if bad:\n"
        "        x[37, 2] = float('nan')\n"
        "    return [(x[i], i % 3) for i in range(60)] if bad else "
        "[(x[i], i % 3) for i in range(60) if i != 37]\n"
    )
    words = _words_with_and_without_the_bad_item(tmp_path, "nan_at_37:make", caplog)
    assert "1 sampled item(s) with non-finite features contribute 0" in caplog.text
    # the same rounding dither (same rng), the same 59 finite items: within one unit
    assert np.abs(words[0].astype(np.int64) - words[1].astype(np.int64)).max() <= 1


def test_a_sampled_item_that_cannot_be_read_contributes_zero_and_the_step_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 41's __getitem__ raises, past the probe at start: when sampled it is dropped (a
    count in the site's log), so the step succeeds with the words of the same batch without
    it; before, the step failed, and the coordinator learnt that a sampled item was bad."""
    code = user_code(tmp_path)
    (code / "raises_at_41.py").write_text(
        "import numpy as np\n"
        "class Items:\n"
        "    def __init__(self, bad):\n"
        "        self.x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)\n"
        "        self.keep = [i for i in range(60) if bad or i != 41]\n"
        "        self.bad = bad\n"
        "    def __len__(self):\n"
        "        return len(self.keep)\n"
        "    def __getitem__(self, j):\n"
        "        i = self.keep[j]\n"
        "        if self.bad and i == 41:\n"
        "            raise OSError('disk error reading item 41')\n"
        "        return self.x[i], i % 3\n"
        "def make(bad: bool = True):\n"
        "    return Items(bad)\n"
    )
    words = _words_with_and_without_the_bad_item(tmp_path, "raises_at_41:make", caplog)
    assert "1 sampled item(s) could not be read: they contribute 0" in caplog.text
    assert "41" not in caplog.text and "disk error" not in caplog.text
    assert np.abs(words[0].astype(np.int64) - words[1].astype(np.int64)).max() <= 1


def test_an_npz_task_with_a_declared_model_and_a_loss_by_import_path(tmp_path: Path) -> None:
    """`model` and `loss` also apply to the .npz form; the coordinator evaluates with the same
    loss (no accuracy for a loss other than cross-entropy)."""
    user_code(tmp_path)
    extra = {}
    for i, p in enumerate(PARTIES):
        rng = np.random.default_rng(i)
        y = np.arange(30) % 3
        np.savez(tmp_path / f"{p}.npz", x=rng.normal(size=(30, 8)).astype(np.float32), y=y)
        extra[p] = dataset_toml(
            "ex",
            f'path = "{p}.npz"\nnum_classes = 3\nmodel = "{MODELS}:make"\n'
            f'loss = "{MODELS}:abs_error"',
        )
    net = build_net(tmp_path, extra=extra)
    try:
        x = np.random.default_rng(5).normal(size=(20, 8)).astype(np.float32)
        with Federation.from_config(net.federation) as fed:
            result = fed.train(
                dataset="ex",
                model=f"{MODELS}:make",
                python_path=net.root / "code",
                loss=f"{MODELS}:abs_error",
                target_epsilon=5.0,
                target_delta=1e-5,
                epochs=1,
                batch_size=10,
                eval_data=(x, np.arange(20) % 3),
            )
            assert result.history[-1].test_accuracy is None
            assert result.history[-1].test_loss is not None
            with pytest.raises(RoundAborted, match="is trained with loss 'mpcdp_fixture_models"):
                fed.train(
                    dataset="ex",
                    model=f"{MODELS}:make",
                    python_path=net.root / "code",
                    target_epsilon=5.0,
                    target_delta=1e-5,
                    epochs=1,
                    batch_size=10,
                )
    finally:
        net.stop()


def test_the_declared_collate_builds_the_batches(tmp_path: Path) -> None:
    code = user_code(tmp_path)
    cfg = load_party_config(
        party_file(
            tmp_path,
            dataset_toml(
                "t", f'data = "{DATA}:blobs"\ncollate = "{DATA}:counting_collate"\nnum_classes = 3'
            ),
        )
    )
    decl = cfg.datasets["t"].training
    assert decl is not None
    data = load_data(decl, where="t", num_classes=3)
    collated = import_object(f"{DATA}:COLLATED", python_path=[code], where="t")
    spec = TrainSpec(
        run_id="r", dataset="t", model="m", parties=PARTIES, sample_rate=1.0, steps=1,
        max_grad_norm=1.0, scale_bits=10, mu=1e6, num_params=27,
    )  # fmt: skip
    source = TorchGradientSource(
        model=torch.nn.Linear(8, 3), spec=spec, data=data, device="cpu", max_physical_batch=16
    )
    before = len(collated)
    source.quantized_gradient(rng=np.random.default_rng(0))
    source.close()
    assert collated[before:] == [16, 16, 8]  # 40 items, all sampled at q = 1


@pytest.mark.slow
def test_mpcdp_party_check_prints_a_declaration_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = party_file(
        tmp_path,
        dataset_toml("good", GOOD)
        + dataset_toml(
            "bad", f'model = "{MODELS}:raising"\ndata = "{DATA}:blobs"\nbudget = "good"'
        ),
    )
    exe = Path(sys.executable).parent / "mpcdp"
    out = subprocess.run(
        [str(exe), "party", "check", "--config", str(cfg)], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "good: ok" in out.stdout
    assert (
        f"bad: UNAVAILABLE: site 'alice': datasets.bad.model = '{MODELS}:raising': the factory "
        "raised RuntimeError: boom" in out.stdout
    )
