"""``mpcdp train``: federated DP-SGD over the sites' declared datasets (docs/training.md).

``mpcdp train --audit-canaries N`` also audits the run, as ``mpcdp audit`` does
(mpcdp.cli.audit_commands) for a run whose model is not wanted. It needs the ``train`` extra
(torch), imported only when it runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import typer

from mpcdp.cli.messages import refusal_text, said_here
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
from mpcdp.errors import MpcdpError, ParameterError

if TYPE_CHECKING:
    from mpcdp.train.results import EpochRecord

#: the logger that warns of a roster change: `mpcdp train` prints each change itself
_ROSTER = "mpcdp.protocol.training.roster"


def _npz(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    from mpcdp.config.datasets import load_examples

    try:
        ex = load_examples(path, num_classes=1 << 20)
    except MpcdpError as exc:
        raise typer.BadParameter(str(exc), param_hint=what) from None
    return ex.x, ex.y


def _eval_npz(path: Path, loss: str) -> tuple[np.ndarray, np.ndarray]:
    """--eval: labels for a classification loss, float targets for loss mse."""
    if loss != "mse":
        return _npz(path, "--eval")
    from mpcdp.config.datasets import load_examples

    try:
        ex = load_examples(path, num_classes=0, regression=True)
    except MpcdpError as exc:
        raise typer.BadParameter(str(exc), param_hint="--eval") from None
    return ex.x, ex.y


def train(
    federation: Path = FEDERATION,
    dataset: str = DATASET,
    model: str = MODEL,
    python_path: list[Path] = PYTHON_PATH,
    model_option: list[str] = MODEL_OPTION,
    loss: str = LOSS,
    metric: str = typer.Option(
        "",
        "--metric",
        help="Your metric on --eval after every epoch: pkg.module:fn, fn(outputs, targets) "
        "-> number (searched in --python-path).",
    ),
    target_epsilon: float = TARGET_EPSILON,
    target_delta: float = TARGET_DELTA,
    epochs: float = EPOCHS,
    max_grad_norm: float = MAX_GRAD_NORM,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9) or adam."),
    clipping: str = typer.Option("flat", "--clipping", help="flat or automatic."),
    bias_only: bool = typer.Option(False, "--bias-only", help="DP-BiTFiT: train biases only."),
    eval_data: Path | None = typer.Option(
        None,
        "--eval",
        help="Test .npz (x, y) to evaluate after every epoch; checked with the run's model "
        "before any site is asked (integer x, e.g. token ids, stays integer).",
    ),
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
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a PNG of test accuracy (or loss) and epsilon per epoch."
    ),
    save_model: Path | None = typer.Option(
        None,
        "--save-model",
        help="Write the trained weights here as a plain state_dict "
        "(torch.load + model.load_state_dict).",
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the model's initialisation."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    audit_canaries: int = typer.Option(
        0, "--audit-canaries", help="Canaries per site: makes this a one-run audit run."
    ),
    audit_kind: str = typer.Option("white-box", "--audit-kind", help="white-box or black-box."),
    audit_confidence: float = typer.Option(0.95, "--audit-confidence", help="In (0, 1)."),
    audit_delta: float | None = typer.Option(
        None, "--audit-delta", help="delta audited (default: --target-delta)."
    ),
    allow_untestable: bool = ALLOW_UNTESTABLE,
    step_deadline: float | None = typer.Option(
        None,
        "--step-deadline",
        help="Seconds a site has for one step before the step is re-run without it "
        "(default: the federation's deadline).",
    ),
    max_pause: float | None = typer.Option(
        None,
        "--max-pause",
        help="Seconds the run waits, paused, for enough sites to answer again before it "
        "stops (the checkpoint keeps every step done; default 300).",
    ),
    site_eval_every: int = typer.Option(
        0,
        "--site-eval-every",
        help="Every N epochs (and after the last), each site scores the model on its own "
        "held-out split (party.toml eval_path) and only the noisy total is revealed; "
        "charged (0: never).",
    ),
    site_eval_epsilon: float | None = typer.Option(
        None,
        "--site-eval-epsilon",
        help="The part of --target-epsilon the evaluations at the sites may spend "
        "(default a tenth); the steps get the rest.",
    ),
    site_eval_loss_bound: float = typer.Option(
        4.0,
        "--site-eval-loss-bound",
        help="Each held-out example's loss is clipped to [0, this] before it is summed "
        "(larger: less clipping, more noise on the loss).",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Try the configuration first: the real plan and loop over simulated sites "
        "holding --public examples (else synthetic ones of the sites' shape); no site "
        "trains and nothing is charged.",
    ),
) -> None:
    """Train a model on every site's examples with federated DP-SGD.

    Every step is a secure aggregation of the sites' clipped, quantized, Skellam-noised
    gradient sums; the noise is calibrated for the target epsilon by the accountant."""
    check_audit_options(audit_canaries, audit_kind, audit_confidence, audit_delta)
    check_names(model=model, loss=loss)
    if dry_run:
        for flag, given in (
            ("--audit-canaries", audit_canaries),
            ("--checkpoint", checkpoint),
            ("--save-model", save_model),
        ):
            if given:
                raise typer.BadParameter(f"{given} is not taken by --dry-run", param_hint=flag)
    options = model_options(model_option)
    for name, value in (
        ("--target-epsilon", target_epsilon),
        ("--epochs", epochs),
        ("--step-deadline", 1.0 if step_deadline is None else step_deadline),
        ("--max-pause", 1.0 if max_pause is None else max_pause),
        ("--site-eval-loss-bound", site_eval_loss_bound),
        ("--site-eval-epsilon", 1.0 if site_eval_epsilon is None else site_eval_epsilon),
    ):
        if not value > 0 or not math.isfinite(value):
            raise typer.BadParameter(f"{value!r} must be finite and > 0", param_hint=name)
    if site_eval_every < 0:
        raise typer.BadParameter(
            f"{site_eval_every} must be a number of epochs >= 0", param_hint="--site-eval-every"
        )
    if site_eval_every and audit_canaries:
        raise typer.BadParameter(
            "an audit run makes no evaluation at the sites (its bound is about its steps)",
            param_hint="--site-eval-every",
        )
    if site_eval_epsilon is not None and not site_eval_every:
        raise typer.BadParameter(
            "needs --site-eval-every N (N >= 1)", param_hint="--site-eval-epsilon"
        )
    if optimizer not in ("sgd", "adam"):
        raise typer.BadParameter(f"{optimizer!r} is not sgd or adam", param_hint="--optimizer")
    from mpcdp.train.planning import CLIPPING_MODES  # torch-free

    if clipping not in CLIPPING_MODES:
        raise typer.BadParameter(
            f"{clipping!r} is not {' or '.join(CLIPPING_MODES)}", param_hint="--clipping"
        )
    try:
        from mpcdp.train.federated import StepInfo, write_metrics
    except ImportError as exc:
        typer.echo(f"error: training needs the train extra (pip install mpcdp[train]): {exc}")
        raise typer.Exit(1) from None
    from mpcdp.federation import Federation

    ev = _eval_npz(eval_data, loss) if eval_data else None
    pub = _npz(public_data, "--public") if public_data else None
    # a progress bar only on a terminal: piped, the output is one line per epoch
    live = sys.stderr.isatty()
    bar_context: Any = (
        typer.progressbar(length=1, label="training", file=sys.stderr)
        if live
        else contextlib.nullcontext(None)
    )
    with bar_context as bar:
        state: dict[str, Any] = {"shown": 0, "step": 0}

        def on_step(info: StepInfo) -> None:
            state["step"] = info.step
            if bar is None:
                return
            if bar.length != info.steps:
                bar.length = info.steps
            bar.label = f"step {info.step}/{info.steps}  eps {info.epsilon:.2f}"
            bar.update(info.step - state["shown"])
            state["shown"] = info.step

        def on_epoch(record: EpochRecord) -> None:
            # once, as the epoch ends: on stdout (on stderr with --json, which keeps stdout
            # for the one object); on a terminal the bar's line is cleared first
            if live:
                typer.echo("\r\033[K", err=True, nl=False)
            typer.echo(_epoch_line(record), err=as_json)

        def on_resume(run: str, step: int, steps: int) -> None:
            state["shown"] = step
            typer.echo(f"resuming run {run} from {checkpoint} at step {step} of {steps}", err=True)

        def on_roster_change(change: _RosterChange) -> None:
            if live:
                typer.echo("\r\033[K", err=True, nl=False)
            typer.echo(f"roster: {refusal_text(change.text())}", err=True)

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
            audit_canaries=audit_canaries,
            audit_kind=audit_kind,
            clipping=clipping,
            bias_only=bias_only,
        )
        evaluation: dict[str, Any] = (
            {
                "site_eval_every": site_eval_every,
                "site_eval_epsilon": site_eval_epsilon,
                "site_eval_loss_bound": site_eval_loss_bound,
            }
            if site_eval_every
            else {}
        )
        # not given: the training loop's own default
        pause: dict[str, Any] = {} if max_pause is None else {"max_pause_s": max_pause}
        try:
            with Federation.from_config(federation) as fed, names_from(fed), said_here(_ROSTER):
                if audit_canaries:
                    audit_preflight(
                        fed,
                        run,
                        allow_untestable=allow_untestable,
                        delta=audit_delta,
                        confidence=audit_confidence,
                    )
                if dry_run:
                    result = fed.dry_run(
                        **run.options(),
                        data=pub,
                        learning_rate=learning_rate,
                        optimizer=optimizer,
                        eval_data=ev,
                        loss=loss,
                        metric=metric,
                        seed=seed,
                        on_step=on_step,
                        on_epoch=on_epoch,
                        **evaluation,
                    )
                    typer.echo(
                        f"dry run done: {result.steps_done} steps over {len(result.plan.parties)}"
                        " simulated sites on "
                        + ("the --public examples" if pub is not None else "synthetic examples")
                        + "; no site trained and nothing was charged"
                    )
                    if metrics is not None or plot is not None:
                        write_metrics(result, json_path=metrics, plot_path=plot, metric_name=metric)
                    return
                result = fed.train(
                    **run.options(),
                    learning_rate=learning_rate,
                    optimizer=optimizer,
                    eval_data=ev,
                    loss=loss,
                    metric=metric,
                    public_data=pub,
                    public_epochs=public_epochs if pub is not None else 0,
                    public_mixing=public_mixing,
                    checkpoint=checkpoint,
                    seed=seed,
                    on_step=on_step,
                    on_epoch=on_epoch,
                    on_resume=on_resume,
                    on_roster_change=on_roster_change,
                    step_deadline_s=step_deadline,
                    **pause,
                    audit_confidence=audit_confidence,
                    audit_delta=audit_delta,
                    allow_untestable=True,  # checked and printed above (audit_preflight)
                    **evaluation,
                )
        except ParameterError as exc:
            if exc.name != "eval_data":
                typer.echo(f"\nerror: {refusal_text(exc)}", err=True)
                raise typer.Exit(1) from None
            # checked at the coordinator before any site was asked (Federation.train)
            typer.echo(f"\nerror: --eval {eval_data}: {refusal_text(exc.reason)}", err=True)
            raise typer.Exit(2) from None
        except MpcdpError as exc:
            typer.echo(f"\nerror: {refusal_text(exc)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            where = (
                f"every step done is in {checkpoint}; run the same command again to resume"
                if checkpoint is not None
                else "no --checkpoint was given, so the progress is lost"
            )
            typer.echo(f"\ninterrupted at step {state['step']}: {where}", err=True)
            raise typer.Exit(130) from None
    if metrics is not None or plot is not None:
        write_metrics(result, json_path=metrics, plot_path=plot, metric_name=metric)
    if save_model is not None:
        import torch

        torch.save(result.state_dict, save_model)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    p = result.plan
    typer.echo(
        f"done: {result.steps_done} steps, epsilon {result.epsilon:.3f} (delta {result.delta:g}),"
        f" noise multiplier {p.noise_multiplier:.3f}, sample rate {p.sample_rate:.4f},"
        f" {len(p.parties)} sites, t={p.colluders}"
    )
    if p.eval_every:
        made = max(result.evaluations_charged.values(), default=0)
        typer.echo(
            f"evaluations at the sites: {made} of {p.evaluations} planned, noise multiplier "
            f"{p.eval_noise_multiplier:.3f} (std "
            f"{p.eval_noise_multiplier * math.sqrt(p.eval_words):.1f} examples on each sum), "
            "included in the epsilon above"
        )
    if save_model is not None:
        typer.echo(
            f"weights: {save_model} (model.load_state_dict(torch.load({str(save_model)!r})))"
        )
    if result.audit is not None:
        typer.echo(audit_report(result))


class _RosterChange(Protocol):
    """What the CLI uses of mpcdp.protocol.training.roster.RosterChange (cli/ reaches the
    protocol only through the analyst API)."""

    def text(self) -> str: ...


def _epoch_line(r: EpochRecord) -> str:
    """One epoch: its step, epsilon and test figures, then each site's steps in it and its
    epsilon so far (when the run reports them)."""
    acc = f"acc {r.test_accuracy:.4f}" if r.test_accuracy is not None else ""
    loss = f"test loss {r.test_loss:.4f}" if r.test_loss is not None else ""
    metric = f"metric {r.test_metric:.6g}" if r.test_metric is not None else ""
    at_sites = ""
    if r.site_loss is not None:
        site_acc = f"acc {r.site_accuracy:.4f} " if r.site_accuracy is not None else ""
        at_sites = (
            f"at the sites: {site_acc}loss {r.site_loss:.4f} on {r.site_examples} held-out "
            "examples (noisy)"
        )
    line = "  ".join(
        part
        for part in (
            f"epoch {r.epoch:3d}",
            f"step {r.step:5d}",
            f"eps {r.epsilon:6.3f}",
            acc,
            loss,
            metric,
            at_sites,
        )
        if part
    )
    sites = []
    for site in dict.fromkeys([*r.participation, *r.site_epsilon]):
        took = f" {r.participation[site]} steps" if site in r.participation else ""
        eps = f" eps {r.site_epsilon[site]:.3f}" if site in r.site_epsilon else ""
        sites.append(f"{site}{took}{eps}")
    return line + (f"  sites: {', '.join(sites)}" if sites else "")
