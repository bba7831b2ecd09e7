"""The user's own metric at the coordinator: an import path computed on
the evaluation data after every epoch, checked before any site is asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from mpcdp.errors import ConfigError, ParameterError
from mpcdp.federation import Federation
from tests.conftest import build_net
from tests.training_support import MODEL, example_data, examples_toml

METRICS = """
import torch

def error_rate(outputs, targets):
    return float((outputs.argmax(dim=1) != targets).float().mean())

def not_a_number(outputs, targets):
    return "good"
"""


def test_a_metric_by_import_path_is_computed_every_epoch_and_checked_first(
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "usermetrics.py").write_text(METRICS)
    n = build_net(tmp_path, extra=examples_toml(tmp_path))
    eval_data = example_data(7, n=90)
    common = dict(
        dataset="ex", model=MODEL, target_epsilon=8.0, target_delta=1e-5, batch_size=30,
        learning_rate=0.1, eval_data=eval_data, python_path=code, seed=2,
    )  # fmt: skip
    try:
        with Federation.from_config(n.federation) as fed:
            for bad, error in (
                ("usermetrics:missing", ConfigError),
                ("nosuchmodule:fn", ConfigError),
                ("usermetrics:not_a_number", ParameterError),
            ):
                with pytest.raises(error, match="metric"):
                    fed.train(epochs=1, metric=bad, **common)  # type: ignore[arg-type]
            for node in n.nodes.values():  # refused before any site was asked
                assert node.ledger.charges("ex") == []
            result = fed.train(epochs=2, metric="usermetrics:error_rate", **common)  # type: ignore[arg-type]
    finally:
        n.stop()
    assert len(result.history) == 2
    for record in result.history:
        assert record.test_metric is not None and record.test_accuracy is not None
        assert record.test_metric == pytest.approx(1 - record.test_accuracy, abs=1e-6)
    assert np.isfinite(result.to_json()["history"][-1]["test_metric"])


def test_model_options_on_the_command_line() -> None:
    import typer

    from mpcdp.cli.run_options import model_options

    assert model_options(["width=64", "act=relu", "dims=[1, 2]", "on=true"]) == {
        "width": 64,
        "act": "relu",
        "dims": [1, 2],
        "on": True,
    }
    assert model_options([]) == {}
    for bad in ("width", "=3", "two words=1"):
        with pytest.raises(typer.BadParameter, match="KEY=VALUE"):
            model_options([bad])
