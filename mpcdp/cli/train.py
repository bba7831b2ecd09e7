"""``mpcdp train`` and ``mpcdp audit``: federated DP-SGD and its empirical privacy audit.

Both need the ``train`` extra (torch); they import it only when they run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import typer

from mpcdp.errors import MpcdpError, ParameterError


def _npz(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    from mpcdp.datasets import load_examples

    try:
        ex = load_examples(path, num_classes=1 << 20)
    except MpcdpError as exc:
        raise typer.BadParameter(str(exc), param_hint=what) from None
    return ex.x, ex.y


def train(
    federation: Path = typer.Option(..., "--federation", help="The analyst's federation.toml."),
    dataset: str = typer.Option(..., "--dataset", help="Example dataset (.npz) at every site."),
    model: str = typer.Option("mlp:64,128,10", "--model", help="Architecture, e.g. mlp:64,128,10."),
    target_epsilon: float = typer.Option(3.0, "--target-epsilon", help="Epsilon of the run."),
    target_delta: float = typer.Option(1e-5, "--target-delta", help="delta of the run."),
    epochs: float = typer.Option(20.0, "--epochs", help="Passes over all sites' examples."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Per-example clip C."),
    batch_size: int = typer.Option(64, "--batch-size", help="Expected examples per step."),
    learning_rate: float = typer.Option(0.03, "--lr", help="Learning rate."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9) or adam."),
    clipping: str = typer.Option("flat", "--clipping", help="flat or automatic."),
    bias_only: bool = typer.Option(False, "--bias-only", help="DP-BiTFiT: train biases only."),
    eval_data: Path | None = typer.Option(None, "--eval", help="Test .npz (x, y) to evaluate."),
    public_data: Path | None = typer.Option(
        None, "--public", help="Public .npz (x, y) for a non-private warm start."
    ),
    public_epochs: int = typer.Option(30, "--public-epochs", help="Warm-start epochs."),
    public_mixing: float = typer.Option(
        1.0, "--public-mixing", help="Weight of a public batch's gradient in every DP step."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Saved every epoch; an existing one is resumed."
    ),
    metrics: Path | None = typer.Option(None, "--metrics", help="Write the metrics JSON here."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of accuracy/epsilon."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the model's initialisation."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Train a model on every site's examples with federated DP-SGD.

    Every step is a secure aggregation of the sites' clipped, quantized, Skellam-noised
    gradient sums; the noise is calibrated for the target epsilon by the accountant."""
    for name, value in (("--target-epsilon", target_epsilon), ("--epochs", epochs)):
        if not value > 0 or not math.isfinite(value):
            raise typer.BadParameter(f"{value!r} must be finite and > 0", param_hint=name)
    if optimizer not in ("sgd", "adam"):
        raise typer.BadParameter(f"{optimizer!r} is not sgd or adam", param_hint="--optimizer")
    if clipping not in ("flat", "automatic"):
        raise typer.BadParameter(f"{clipping!r} is not flat or automatic", param_hint="--clipping")
    try:
        from mpcdp.train.federated import StepInfo, write_metrics
    except ImportError as exc:
        typer.echo(f"error: training needs the train extra (pip install mpcdp[train]): {exc}")
        raise typer.Exit(1) from None
    from mpcdp.federation import Federation

    ev = _npz(eval_data, "--eval") if eval_data else None
    pub = _npz(public_data, "--public") if public_data else None
    with typer.progressbar(length=1, label="training", file=sys.stderr) as bar:
        state: dict[str, Any] = {"shown": 0}

        def on_step(info: StepInfo) -> None:
            if bar.length != info.steps:
                bar.length = info.steps
            bar.label = f"step {info.step}/{info.steps}  eps {info.epsilon:.2f}"
            bar.update(info.step - state["shown"])
            state["shown"] = info.step

        try:
            with Federation.from_config(federation) as fed:
                result = fed.train(
                    dataset=dataset,
                    model=model,
                    target_epsilon=target_epsilon,
                    target_delta=target_delta,
                    epochs=epochs,
                    max_grad_norm=max_grad_norm,
                    batch_size=batch_size,
                    learning_rate=learning_rate,
                    optimizer=optimizer,
                    clipping=clipping,
                    bias_only=bias_only,
                    eval_data=ev,
                    public_data=pub,
                    public_epochs=public_epochs if pub is not None else 0,
                    public_mixing=public_mixing,
                    checkpoint=checkpoint,
                    seed=seed,
                    on_step=on_step,
                )
        except MpcdpError as exc:
            typer.echo(f"\nerror: {exc}", err=True)
            raise typer.Exit(1) from None
    if metrics is not None:
        write_metrics(result, json_path=metrics, plot_path=plot)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    for r in result.history:
        acc = f"{r.test_accuracy:.4f}" if r.test_accuracy is not None else "n/a"
        typer.echo(f"epoch {r.epoch:3d}  step {r.step:5d}  eps {r.epsilon:6.3f}  acc {acc}")
    p = result.plan
    typer.echo(
        f"done: {result.steps_done} steps, epsilon {result.epsilon:.3f} (delta {result.delta:g}),"
        f" noise multiplier {p.noise_multiplier:.3f}, sample rate {p.sample_rate:.4f},"
        f" {len(p.parties)} sites, t={p.colluders}"
    )


def audit(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint of mpcdp train."),
    members: Path = typer.Option(..., "--members", help=".npz of training examples."),
    non_members: Path = typer.Option(..., "--non-members", help=".npz of held-out examples."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence of the bound."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Membership-inference audit: an empirical lower bound on epsilon.

    Printed next to the accountant's epsilon; a bound above it would mean a bug."""
    try:
        import torch

        from mpcdp.train.audit import audit_model
        from mpcdp.train.federated import load_checkpoint
    except ImportError as exc:
        typer.echo(f"error: the audit needs the train extra (pip install mpcdp[train]): {exc}")
        raise typer.Exit(1) from None
    try:
        net, plan, steps = load_checkpoint(checkpoint)
        mx, my = _npz(members, "--members")
        nx, ny = _npz(non_members, "--non-members")
        result = audit_model(
            model=net,
            members=(torch.from_numpy(mx), torch.from_numpy(my)),
            non_members=(torch.from_numpy(nx), torch.from_numpy(ny)),
            delta=plan.target_delta,
            confidence=confidence,
        )
    except (MpcdpError, ParameterError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    accountant_eps = plan.epsilon_after(steps)
    obj = {
        "empirical_epsilon_lower_bound": result.epsilon_lower_bound,
        "accountant_epsilon": accountant_eps,
        "delta": plan.target_delta,
        "confidence": confidence,
        "tpr": result.tpr,
        "fpr": result.fpr,
        "members": result.members,
        "non_members": result.non_members,
        "steps": steps,
    }
    if as_json:
        typer.echo(json.dumps(obj))
        return
    typer.echo(
        f"empirical epsilon lower bound {result.epsilon_lower_bound:.3f} "
        f"({confidence:.0%} confidence, loss-threshold attack, {result.members} members / "
        f"{result.non_members} non-members evaluated)\n"
        f"accountant's epsilon          {accountant_eps:.3f} (delta {plan.target_delta:g}, "
        f"{steps} steps)"
    )
