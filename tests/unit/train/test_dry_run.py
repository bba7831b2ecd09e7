"""The dry run: the real coordinator loop and plan over simulated sites on the coordinator's
own data, nothing asked of any site and nothing charged; it shows a learning rate that
diverges before any budget is spent."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from mpcdp.errors import ParameterError
from mpcdp.federation import Federation
from mpcdp.train.dry_run import dry_run, synthetic_data
from mpcdp.train.planning import plan_training
from tests.conftest import PARTIES, build_net
from tests.training_support import MODEL, NUM_PARAMS, example_data, examples_toml

SITES = {"alice": 40, "bob": 40, "carlos": 40}
PUBLIC = (
    np.concatenate([example_data(i)[0] for i in range(3)]),
    np.concatenate([example_data(i)[1] for i in range(3)]),
)
EVAL = example_data(7, n=90)
OPTIONS: dict[str, Any] = {
    "target_epsilon": 8.0,
    "target_delta": 1e-5,
    "epochs": 4,
    "batch_size": 16,
}


def test_a_dry_run_follows_the_real_runs_plan_and_learns() -> None:
    result = dry_run(
        data=PUBLIC, examples=SITES, model=MODEL, eval_data=EVAL, learning_rate=0.05, seed=1,
        **OPTIONS,
    )  # fmt: skip
    real = plan_training(
        dataset="ex", model=MODEL, parties=tuple(SITES), examples=list(SITES.values()),
        num_params=NUM_PARAMS, target_epsilon=8.0, target_delta=1e-5, epochs=4, batch_size=16,
        max_grad_norm=1.0, colluders=1,
    )  # fmt: skip
    assert result.plan.mu == real.mu and result.plan.steps == real.steps
    assert result.plan.sample_rate == real.sample_rate
    assert result.steps_done == real.steps
    assert result.final_accuracy is not None and result.final_accuracy > 0.6  # chance: 1/3


def test_a_dry_run_shows_how_noisy_the_evaluations_at_the_sites_will_be() -> None:
    result = dry_run(
        data=PUBLIC, examples=SITES, model=MODEL, learning_rate=0.05, seed=2,
        site_eval_every=2, site_eval_epsilon=2.0, **OPTIONS,
    )  # fmt: skip
    evaluated = [r for r in result.history if r.site_loss is not None]
    assert [r.epoch for r in evaluated] == [2, 4]
    for r in evaluated:  # each simulated site holds a fifth of its examples' number
        assert r.site_examples == 3 * 8 and r.site_accuracy is not None
    assert result.evaluations_charged == dict.fromkeys(SITES, 2)


def test_a_diverging_learning_rate_shows_before_any_budget_is_spent() -> None:
    good = dry_run(
        data=PUBLIC, examples=SITES, model=MODEL, eval_data=EVAL, learning_rate=0.05, seed=2,
        **OPTIONS,
    )  # fmt: skip
    bad = dry_run(
        data=PUBLIC, examples=SITES, model=MODEL, eval_data=EVAL, learning_rate=200.0, seed=2,
        **OPTIONS,
    )  # fmt: skip
    assert good.history[-1].test_loss is not None and bad.history[-1].test_loss is not None
    worse = bad.history[-1].test_loss
    assert math.isnan(worse) or worse > 5 * good.history[-1].test_loss


def test_synthetic_data_of_the_sites_shape_is_learnable() -> None:
    rng = np.random.default_rng(3)
    x, y = synthetic_data(feature_shape=(8,), num_classes=3, count=300, rng=rng)
    assert x.shape == (300, 8) and x.dtype == np.float32 and set(np.unique(y)) <= {0, 1, 2}
    tokens, _ = synthetic_data(
        feature_shape=(5,), num_classes=2, count=4, rng=rng, integer_features=50
    )
    assert tokens.dtype == np.int64 and tokens.max() < 50
    result = dry_run(
        data=(x, y), examples=SITES, model=MODEL, eval_data=(x[:90], y[:90]),
        learning_rate=0.05, seed=4, **OPTIONS,
    )  # fmt: skip
    assert result.final_accuracy is not None and result.final_accuracy > 0.5


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"examples": {"a": 0}}, "examples"),
        ({"data": (np.zeros((3, 8)), np.zeros(2))}, "data"),
        ({"checkpoint": "run.pt"}, "checkpoint"),
        ({"audit_canaries": 10}, "audit_canaries"),
    ],
)
def test_bad_input_is_named(kw: dict[str, object], name: str) -> None:
    args: dict[str, object] = {"data": PUBLIC, "examples": SITES, "model": MODEL, **OPTIONS}
    args.update(kw)
    with pytest.raises(ParameterError) as err:
        dry_run(**args)  # type: ignore[arg-type]
    assert err.value.name == name  # type: ignore[attr-defined]
    with pytest.raises(ParameterError, match="num_classes"):
        synthetic_data(feature_shape=(2,), num_classes=1, count=3, rng=np.random.default_rng(0))


def test_a_federation_s_dry_run_asks_no_site_to_train_and_charges_nothing(tmp_path: Path) -> None:
    """From the analyst's API: the sites answer Describe (public counts, shape, classes)
    only; synthetic data of their shape stand in for theirs; no session is opened at any
    site and every ledger is untouched."""
    net = build_net(tmp_path, extra=examples_toml(tmp_path))
    opened: list[str] = []
    for p, node in net.nodes.items():  # every TrainOpen any site gets is recorded
        assert node.training is not None
        real = node.training.open

        def counted(*, _p: str = p, _real: Any = real, **kw: Any) -> Any:
            opened.append(_p)
            return _real(**kw)

        node.training.open = counted  # type: ignore[method-assign]
    try:
        with Federation.from_config(net.federation) as fed:
            result = fed.dry_run(dataset="ex", model=MODEL, learning_rate=0.05, seed=5, **OPTIONS)
        assert result.plan.parties == PARTIES and result.plan.examples == (40, 40, 40)
        assert result.final_accuracy is not None and result.final_accuracy > 0.5
        assert opened == []  # no site was asked to train
        for p in PARTIES:
            assert net.nodes[p].ledger.charges("ex") == []
        # a seed makes the dry run repeatable, its synthetic data included
        with Federation.from_config(net.federation) as fed:
            again = fed.dry_run(dataset="ex", model=MODEL, learning_rate=0.05, seed=5, **OPTIONS)
        assert again.final_accuracy == result.final_accuracy
        assert again.history[-1].test_loss == result.history[-1].test_loss
    finally:
        net.stop()


def test_mpcdp_train_dry_run_from_the_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mpcdp.cli.app import app

    net = build_net(tmp_path, extra=examples_toml(tmp_path))
    try:
        base = [
            "train", "--federation", str(net.federation), "--dataset", "ex", "--model", MODEL,
            "--epochs", "2", "--batch-size", "12", "--lr", "0.05", "--dry-run", "--seed", "3",
        ]  # fmt: skip
        out = CliRunner().invoke(app, base)
        assert out.exit_code == 0, out.output
        assert "dry run done" in out.stdout and "nothing was charged" in out.stdout
        assert "epoch   2" in out.stdout
        bad = CliRunner().invoke(app, [*base, "--checkpoint", str(tmp_path / "c.pt")])
        assert bad.exit_code == 2 and "--checkpoint" in bad.output
        for p in PARTIES:
            assert net.nodes[p].ledger.charges("ex") == []
    finally:
        net.stop()
