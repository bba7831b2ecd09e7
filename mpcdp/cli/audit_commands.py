"""``mpcdp audit``: a one-run privacy audit (Steinke, Nasr and Jagielski 2023; docs/audit.md).

It runs an audit run (a training run of its own, checked and charged like any other, with
canaries at every site: mpcdp.train.audit_run) and prints the accountant's epsilon next to
the audit's lower bound. It needs the ``train`` extra (torch), imported only when it runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from mpcdp.cli.messages import refusal_text
from mpcdp.cli.run_options import (
    ALLOW_UNTESTABLE,
    BATCH_SIZE,
    DATASET,
    EPOCHS,
    FEDERATION,
    LEARNING_RATE,
    LOSS,
    MAX_GRAD_NORM,
    MODEL,
    MODEL_OPTION,
    PYTHON_PATH,
    TARGET_DELTA,
    TARGET_EPSILON,
    PlannedRun,
    audit_preflight,
    audit_report,
    check_audit_options,
    check_names,
    model_options,
    names_from,
)
from mpcdp.errors import MpcdpError

__all__ = ["audit"]


def audit(
    federation: Path = FEDERATION,
    dataset: str = DATASET,
    model: str = MODEL,
    python_path: list[Path] = PYTHON_PATH,
    model_option: list[str] = MODEL_OPTION,
    loss: str = LOSS,
    target_epsilon: float = TARGET_EPSILON,
    target_delta: float = TARGET_DELTA,
    epochs: float = EPOCHS,
    max_grad_norm: float = MAX_GRAD_NORM,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    canaries: int = typer.Option(1000, "--canaries", help="Canaries per site (>= 1)."),
    kind: str = typer.Option("white-box", "--kind", help="white-box or black-box."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence of the bound."),
    audit_delta: float | None = typer.Option(
        None, "--audit-delta", help="delta audited (default: --target-delta)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the model's initialisation."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    allow_untestable: bool = ALLOW_UNTESTABLE,
) -> None:
    """One-run privacy audit: an audit run with canaries at every site, and a statistically
    valid lower bound on its epsilon next to the accountant's.

    The run is declared to every site, checked and charged like any training run. Each site
    includes each of its canaries with probability 1/2 (its secret until the run ends); the
    bound holds with the given confidence over those coin flips. A bound above the claimed
    epsilon means the implementation releases more than it claims. No site data is needed.

    Before the run it prints the audit's ceiling (the bound if every guess were right) and
    refuses, charging nothing, when the claimed epsilon is at or above it (such an audit
    cannot fail), saying how many canaries or which --audit-delta would make it testable."""
    if canaries < 1:
        raise typer.BadParameter(f"{canaries!r} must be >= 1", param_hint="--canaries")
    check_names(model=model, loss=loss)
    options = model_options(model_option)
    check_audit_options(
        canaries, kind, confidence, audit_delta, ("--canaries", "--kind", "--confidence")
    )
    for name, value in (("--target-epsilon", target_epsilon), ("--epochs", epochs)):
        if not value > 0 or not math.isfinite(value):
            raise typer.BadParameter(f"{value!r} must be finite and > 0", param_hint=name)
    try:
        import mpcdp.train.federated  # noqa: F401
    except ImportError as exc:
        typer.echo(f"error: the audit needs the train extra (pip install mpcdp[train]): {exc}")
        raise typer.Exit(1) from None
    from mpcdp.federation import Federation

    run = PlannedRun(
        dataset=dataset,
        model=model,
        python_path=python_path,
        model_options=options or None,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        epochs=epochs,
        batch_size=batch_size,
        max_grad_norm=max_grad_norm,
        audit_canaries=canaries,
        audit_kind=kind,
    )
    try:
        with Federation.from_config(federation) as fed, names_from(fed):
            audit_preflight(
                fed,
                run,
                allow_untestable=allow_untestable,
                delta=audit_delta,
                confidence=confidence,
            )
            result = fed.train(
                **run.options(),
                loss=loss,
                learning_rate=learning_rate,
                seed=seed,
                audit_confidence=confidence,
                audit_delta=audit_delta,
                allow_untestable=True,  # checked and printed above (audit_preflight)
            )
    except MpcdpError as exc:
        typer.echo(f"error: {refusal_text(exc)}", err=True)
        raise typer.Exit(1) from None
    if result.audit is None:  # pragma: no cover - a finished audit run always has one
        typer.echo("error: the audit run revealed no canaries", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(result.to_json()["audit"]))
        return
    typer.echo(audit_report(result))
