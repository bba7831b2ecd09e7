"""What ``mpcdp train`` and ``mpcdp audit`` share (an audit is a training run): their common
options and checks, the plan that fixes an audit's ceiling, the preflight that prints it
before any site is asked (mpcdp.train.audit_run), and the audit's report. Nothing here
imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from mpcdp.cli.messages import with_valid_names
from mpcdp.errors import ParameterError, valid_names

__all__ = [
    "ALLOW_UNTESTABLE",
    "BATCH_SIZE",
    "DATASET",
    "EPOCHS",
    "FEDERATION",
    "LEARNING_RATE",
    "LOSS",
    "MAX_GRAD_NORM",
    "MODEL",
    "MODEL_OPTION",
    "PYTHON_PATH",
    "TARGET_DELTA",
    "TARGET_EPSILON",
    "PlannedRun",
    "audit_preflight",
    "audit_report",
    "check_audit_options",
    "check_names",
    "model_options",
    "names_from",
]

# the options `mpcdp train` and `mpcdp audit` share (an audit is a training run)
FEDERATION = typer.Option(..., "--federation", help="The analyst's federation.toml.")
DATASET = typer.Option(..., "--dataset", help="The training dataset, as every site declares it.")
MODEL = typer.Option(
    "mlp:64,128,10",
    "--model",
    help="Architecture: mlp:64,128,10 (built in) or the import path of a model factory, "
    "pkg.module:factory, which every site declares in party.toml.",
)
PYTHON_PATH = typer.Option(
    [], "--python-path", help="Folder searched first for --model/--loss code (repeatable)."
)
MODEL_OPTION = typer.Option(
    [],
    "--model-option",
    help="KEY=VALUE passed to the --model factory (repeatable; VALUE read as JSON when it "
    "parses, else as a string), as the sites' [datasets.NAME.model_options].",
)
LOSS = typer.Option(
    "cross_entropy", "--loss", help="cross_entropy, mse or pkg.module:fn (as the sites)."
)
TARGET_EPSILON = typer.Option(3.0, "--target-epsilon", help="Epsilon of the run.")
TARGET_DELTA = typer.Option(1e-5, "--target-delta", help="delta of the run.")
EPOCHS = typer.Option(20.0, "--epochs", help="Passes over all sites' examples.")
MAX_GRAD_NORM = typer.Option(1.0, "--max-grad-norm", help="Per-example clip C.")
BATCH_SIZE = typer.Option(64, "--batch-size", help="Expected examples per step.")
LEARNING_RATE = typer.Option(0.03, "--lr", help="Learning rate.")

ALLOW_UNTESTABLE = typer.Option(
    False,
    "--allow-untestable",
    help="Run an audit whose ceiling is at or below the claimed epsilon (it cannot fail).",
)


def model_options(values: list[str]) -> dict[str, Any]:
    """``--model-option KEY=VALUE`` pairs as a dict (VALUE as JSON when it parses)."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise typer.BadParameter(
                f"{item!r} must look like KEY=VALUE", param_hint="--model-option"
            )
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@contextlib.contextmanager
def names_from(fed: Any) -> Iterator[None]:
    """An unknown dataset raised inside says which example datasets the sites offer."""
    try:
        yield
    except ParameterError as exc:
        raise with_valid_names(fed, exc, training=True) from None


def check_names(*, model: str, loss: str) -> None:
    """--loss before any site is asked: a misspelled built-in loss is told the valid names
    (an import path is checked when it is imported; --model by mpcdp.train.models)."""
    from mpcdp.config.training_config import BUILTIN_LOSSES, is_import_path

    if loss not in BUILTIN_LOSSES and not is_import_path(loss):
        raise typer.BadParameter(
            f"{loss!r} is neither a built-in loss nor an import path pkg.module:fn; "
            f"{valid_names(loss, BUILTIN_LOSSES)}",
            param_hint="--loss",
        )


def check_audit_options(
    canaries: int,
    kind: str,
    confidence: float,
    delta: float | None,
    hints: tuple[str, str, str] = ("--audit-canaries", "--audit-kind", "--audit-confidence"),
) -> None:
    if canaries < 0:
        raise typer.BadParameter(f"{canaries!r} must be >= 0", param_hint=hints[0])
    if kind not in ("white-box", "black-box"):
        raise typer.BadParameter(f"{kind!r} is not white-box or black-box", param_hint=hints[1])
    if not 0 < confidence < 1:
        raise typer.BadParameter(f"{confidence!r} not in (0, 1)", param_hint=hints[2])
    if delta is not None and not 0 < delta < 1:
        raise typer.BadParameter(f"{delta!r} not in (0, 1)", param_hint="--audit-delta")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """The options that fix a run's plan, and so its audit's ceiling: given alike to the
    preflight's plan (mpcdp.train.audit_run.audit_plan) and to ``Federation.train``, so the
    ceiling printed before the run is that of the run the sites are asked for."""

    dataset: str
    model: str
    python_path: list[Path]
    model_options: dict[str, Any] | None
    target_epsilon: float
    target_delta: float
    epochs: float
    batch_size: int
    max_grad_norm: float
    audit_canaries: int
    audit_kind: str
    clipping: str = "flat"
    bias_only: bool = False

    def options(self) -> dict[str, Any]:
        """The fields as keyword arguments (of audit_plan and of Federation.train)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def audit_preflight(
    fed: Any,
    run: PlannedRun,
    *,
    allow_untestable: bool,
    delta: float | None,
    confidence: float,
) -> None:
    """Before any site is asked: the audit's ceiling against the claim (mpcdp.train.audit_run).
    Prints it; refuses an untestable audit (exit 2) unless ``allow_untestable``."""
    from mpcdp.train.audit_run import audit_plan, preflight

    check = preflight(
        plan=audit_plan(
            examples=fed.examples(run.dataset), colluders=fed.config.colluders, **run.options()
        ),
        delta=delta,
        confidence=confidence,
    )
    typer.echo(check.text(), err=True)
    if not check.testable and not allow_untestable:
        typer.echo(
            "error: refused before the run (nothing was charged); --allow-untestable runs it "
            "anyway",
            err=True,
        )
        raise typer.Exit(2)


def audit_report(result: Any) -> str:
    """The audit's lines: claimed epsilon, lower bound, fraction, confidence, m, guesses."""
    a = result.audit
    fraction = a.fraction_reached
    return (
        f"one-run audit ({result.plan.audit_kind}, Steinke-Nasr-Jagielski 2023):\n"
        f"  claimed epsilon (accountant)  {a.claimed_epsilon:.4f} (delta {a.delta:g})\n"
        f"  audit lower bound             {a.epsilon_lower_bound:.4f}\n"
        f"  fraction reached              "
        f"{'n/a' if fraction is None else f'{fraction:.1%}'}\n"
        f"  confidence                    {a.confidence:g}\n"
        f"  canaries m                    {a.m}\n"
        f"  guesses (in/out), correct     {a.guesses} ({a.k_plus}/{a.k_minus}), {a.correct}\n"
        f"  ceiling (every guess right)   {a.ceiling:.4f}"
        + (
            "\n  UNTESTABLE: the claim is at or above the ceiling; no run, however broken, "
            "could have put the bound above it (mpcdp audit prints what would)"
            if a.testable is False
            else ""
        )
    )
