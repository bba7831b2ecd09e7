"""The training plot a person reads (mpcdp.train.plot, through write_metrics): accuracy on
its own auto-scaled axis, the test loss and the user's metric when present, epsilon on its
own labelled axis with the target on it, whole epochs on the ticks."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
torch = pytest.importorskip("torch")

from mpcdp.train.planning import TrainingPlan  # noqa: E402
from mpcdp.train.plot import metrics_figure  # noqa: E402
from mpcdp.train.results import EpochRecord, TrainingResult, write_metrics  # noqa: E402


def _result(*, epochs: int = 7, metric: bool = True, accuracy: bool = True) -> TrainingResult:
    plan = TrainingPlan(
        dataset="digits", model="mlp:64,128,10", parties=("a", "b", "c"), examples=(400,) * 3,
        colluders=1, sample_rate=0.05, steps=20 * epochs, steps_per_epoch=20, max_grad_norm=1.0,
        clipping="flat", bias_only=False, noise_multiplier=1.1, scale_bits=10, mu=1e4,
        num_params=9610, target_epsilon=3.0, target_delta=1e-5,
    )  # fmt: skip
    history = tuple(
        EpochRecord(
            epoch=e,
            step=20 * e,
            epsilon=3.0 * (e / epochs) ** 0.6,
            test_accuracy=0.90 + 0.01 * e if accuracy else None,
            test_loss=0.5 - 0.03 * e,
            seconds=1.0,
            test_metric=0.8 + 0.02 * e if metric else None,
        )
        for e in range(1, epochs + 1)
    )
    return TrainingResult(
        plan=plan, run_id="train-1", steps_done=20 * epochs, epsilon=history[-1].epsilon,
        delta=1e-5, history=history, final_accuracy=history[-1].test_accuracy,
        public_accuracy=None, state_dict={},
    )  # fmt: skip


def test_each_quantity_on_its_own_axis() -> None:
    import matplotlib.pyplot as plt

    fig = metrics_figure(_result(), metric_name="f1")
    try:
        acc, loss, metric, eps = fig.axes
        assert len(fig.axes) == 4
        assert [a.get_ylabel() for a in (acc, loss, metric)] == ["test accuracy", "test loss", "f1"]
        low, high = acc.get_ylim()
        assert 0.85 < low < 0.91 and 0.97 < high < 1.0  # auto-scaled: 0.91-0.97 is a slope
        assert "epsilon" in eps.get_ylabel() and "delta = 1e-05" in eps.get_ylabel()
        assert eps.get_ylim()[0] == 0 and eps.get_ylim()[1] > 3.0
        labels = eps.get_legend_handles_labels()[1]
        assert labels == ["epsilon spent", "target epsilon 3"]
        assert eps.get_xlabel() == "epoch"
        ticks = [t for t in eps.get_xticks() if 1 <= t <= 7]
        assert ticks and all(float(t).is_integer() for t in ticks)
    finally:
        plt.close(fig)


def test_a_regression_run_shows_the_loss_and_no_missing_metric() -> None:
    import matplotlib.pyplot as plt

    fig = metrics_figure(_result(epochs=3, metric=False, accuracy=False))
    try:
        assert [a.get_ylabel() for a in fig.axes[:-1]] == ["test loss"]
        ticks = [t for t in fig.axes[-1].get_xticks() if 1 <= t <= 3]
        assert [float(t) for t in ticks] == [1.0, 2.0, 3.0]
    finally:
        plt.close(fig)


def test_write_metrics_draws_the_png(tmp_path: Path) -> None:
    write_metrics(_result(), json_path=tmp_path / "m.json", plot_path=tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "m.json").exists()
