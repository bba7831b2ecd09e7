"""The metrics plot of a training run (``mpcdp train --plot``, ``write_metrics``): one
panel per quantity, sharing the epoch axis, so that no two scales share an axis:

- test accuracy, auto-scaled to its own range (0.90-0.97 is a slope, not a flat line at the
  top of 0-1);
- the test loss, when the run has one;
- the user's metric (``metric=``), when given;
- the epsilon spent after each epoch, on its own axis labelled with the delta, and the
  target epsilon as a labelled line on that axis only.

Epochs are whole numbers on the ticks. Needs matplotlib (the ``train`` extra), imported
when a plot is drawn; nothing happens at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mpcdp.train.results import EpochRecord, TrainingResult

__all__ = ["metrics_figure", "plot_metrics"]


def _series(history: Sequence[EpochRecord], field: str) -> list[float] | None:
    """The field's values per epoch (NaN where missing), or None when no epoch has one."""
    values = [getattr(r, field) for r in history]
    if all(v is None for v in values):
        return None
    return [float("nan") if v is None else float(v) for v in values]


def plot_metrics(result: TrainingResult, *, path: Path, metric_name: str = "") -> None:
    """Write ``result``'s plot to ``path`` (PNG; the format follows the suffix).
    ``metric_name`` labels the user's metric (default: "your metric")."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(result, metric_name=metric_name)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)


def metrics_figure(result: TrainingResult, *, metric_name: str = "") -> Figure:
    """The figure of :func:`plot_metrics` (open: the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = result.history
    epochs = [r.epoch for r in history]
    panels: list[tuple[str, list[float], str]] = []
    for field, label, color in (
        ("test_accuracy", "test accuracy", "tab:blue"),
        ("test_loss", "test loss", "tab:orange"),
        ("test_metric", metric_name or "your metric", "tab:green"),
    ):
        values = _series(history, field)
        if values is not None:
            panels.append((label, values, color))
    rows = len(panels) + 1
    fig, axes = plt.subplots(
        rows,
        1,
        sharex=True,
        figsize=(7.0, 1.9 + 1.6 * rows),
        dpi=110,
        gridspec_kw={"height_ratios": [1.0] * len(panels) + [0.8]},
        squeeze=False,
    )
    axs: list[Any] = [a for row in axes for a in row]
    for ax, (label, values, color) in zip(axs, panels, strict=False):
        ax.plot(epochs, values, "o-", color=color, label=label)
        ax.set_ylabel(label)
        ax.margins(y=0.15)
        ax.grid(True, alpha=0.3)
    eps_ax = axs[-1]
    eps_ax.plot(epochs, [r.epsilon for r in history], "s-", color="tab:red", label="epsilon spent")
    target = result.plan.target_epsilon
    eps_ax.axhline(target, color="tab:red", linestyle=":", label=f"target epsilon {target:g}")
    eps_ax.set_ylim(0, 1.15 * max([target, *(r.epsilon for r in history)]))
    eps_ax.set_ylabel(f"epsilon\n(delta = {result.delta:g})")
    eps_ax.legend(loc="lower right", fontsize=8)
    eps_ax.grid(True, alpha=0.3)
    eps_ax.set_xlabel("epoch")
    eps_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs:
        eps_ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    axs[0].set_title(
        f"{result.plan.model} on {len(result.plan.parties)} sites: epsilon "
        f"{result.epsilon:.3g} of {target:g} spent (delta {result.delta:g})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
