"""``mpcdp demo ...``: demonstrations that run on one machine."""

from __future__ import annotations

import json
import math
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

import typer

from mpcdp.errors import MpcdpError

app = typer.Typer(help="Demonstrations.", no_args_is_help=True)

#: Public upper bound of a raise in the demo (mpcdp.demos.salary_demo.DEFAULT_BOUND; repeated here
#: so that `mpcdp --help` and `mpcdp health` need not import the demo's dependencies).
DEFAULT_BOUND = 5_000.0


@app.command("salary")
def salary_cmd(
    epsilon: float = typer.Option(1.0, help="Privacy budget of the DP mean."),
    bound: float = typer.Option(DEFAULT_BOUND, help="Public upper bound of a raise."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    local: bool = typer.Option(
        False, "--local", help="All four parties in this process (shows the seeded share table)."
    ),
) -> None:
    """The four engineers' average raise (docs/salary_example.md), exact and with DP.

    Starts four party nodes (Alice, Bob, Carlos, David) as separate processes on loopback
    with fresh certificates, runs the exact MPC mean and a DP mean, and stops them again;
    processes and temporary files are removed also on Ctrl-C.
    """
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise typer.BadParameter(
            f"epsilon={epsilon!r} must be finite and > 0", param_hint="--epsilon"
        )
    if not bound > 0 or not math.isfinite(bound):
        raise typer.BadParameter(f"bound={bound!r} must be finite and > 0", param_hint="--bound")
    from mpcdp.demos import salary_demo as salary

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="mpcdp-salary-") as tmp:
            if local:
                report = salary.run(workdir=Path(tmp), epsilon=epsilon, bound=bound)
                text, obj = salary.render(report), salary.report_json(report)
            else:
                net = salary.run_networked(workdir=Path(tmp), epsilon=epsilon, bound=bound)
                text, obj = salary.render_networked(net), salary.network_json(net)
    except KeyboardInterrupt:
        typer.echo("interrupted: party processes stopped, temporary files removed", err=True)
        raise typer.Exit(130) from None
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(obj, indent=2) if as_json else text)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@app.command("digits")
def digits_cmd(
    target_epsilon: float = typer.Option(3.0, "--target-epsilon", help="Epsilon of the run."),
    epochs: float = typer.Option(20.0, "--epochs", help="Passes over the sites' examples."),
    batch_size: int = typer.Option(64, "--batch-size", help="Expected examples per step."),
    learning_rate: float = typer.Option(0.03, "--lr", help="SGD learning rate (momentum 0.9)."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Per-example clip C."),
    clipping: str = typer.Option("flat", "--clipping", help="flat or automatic."),
    public_fraction: float = typer.Option(
        0.0, "--public-fraction", help="Share of the training data made public (warm start)."
    ),
    out: Path = typer.Option(
        Path("digits-run"), "--out", help="Folder for checkpoint.pt, metrics.json, metrics.png."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the model's initialisation."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
    audit_canaries: int = typer.Option(
        0, "--audit-canaries", help="Canaries per site: make the run a one-run audit run."
    ),
) -> None:
    """Three sites train an MLP on scikit-learn's digits with federated DP-SGD.

    Each site is a party-node process with its own slice of the data. The coordinator
    reports test accuracy per epoch, checkpoints every epoch (an existing OUT/checkpoint.pt
    is resumed), writes metrics.json and metrics.png. With --audit-canaries N the run is a
    one-run privacy audit (white-box gradient canaries; not resumable) and the audit's lower
    bound is printed next to the accountant's epsilon."""
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise typer.BadParameter(f"{target_epsilon!r} must be > 0", param_hint="--target-epsilon")
    if not 0 <= public_fraction < 1:
        raise typer.BadParameter(
            f"{public_fraction!r} not in [0, 1)", param_hint="--public-fraction"
        )
    from mpcdp.train.planning import CLIPPING_MODES  # torch-free

    if clipping not in CLIPPING_MODES:
        raise typer.BadParameter(
            f"{clipping!r} is not {' or '.join(CLIPPING_MODES)}", param_hint="--clipping"
        )
    try:
        from mpcdp.cli.run_options import audit_report
        from mpcdp.demos import digits_demo
        from mpcdp.train.federated import StepInfo, write_metrics
    except ImportError as exc:
        typer.echo(
            f"error: the digits demo needs the train extra (pip install mpcdp[train]): {exc}"
        )
        raise typer.Exit(1) from None
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        typer.echo(f"resuming from {ckpt}", err=True)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="mpcdp-digits-") as tmp,
            typer.progressbar(length=1, label="starting 3 sites", file=sys.stderr) as bar,
        ):
            shown = [0]

            def on_step(info: StepInfo) -> None:
                bar.length = info.steps
                bar.label = f"step {info.step}/{info.steps} eps {info.epsilon:.2f}"
                bar.update(info.step - shown[0])
                shown[0] = info.step

            result = digits_demo.run(
                workdir=Path(tmp),
                target_epsilon=target_epsilon,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                max_grad_norm=max_grad_norm,
                clipping=clipping,
                public_fraction=public_fraction,
                checkpoint=ckpt,
                seed=seed,
                on_step=on_step,
                audit_canaries=audit_canaries,
            )
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: sites stopped; rerun to resume from {ckpt}", err=True)
        raise typer.Exit(130) from None
    except MpcdpError as exc:
        typer.echo(f"\nerror: {exc}", err=True)
        raise typer.Exit(1) from None
    write_metrics(result, json_path=out / "metrics.json", plot_path=out / "metrics.png")
    obj = result.to_json()
    if as_json:
        typer.echo(json.dumps(obj))
        return
    typer.echo("")
    for r in result.history:
        acc = f"{r.test_accuracy:.4f}" if r.test_accuracy is not None else "n/a"
        typer.echo(
            f"epoch {r.epoch:3d}  step {r.step:5d}  epsilon {r.epsilon:6.3f}  test acc {acc}"
        )
    if result.public_accuracy is not None:
        typer.echo(f"after the public warm start: test accuracy {result.public_accuracy:.4f}")
    typer.echo(
        f"final test accuracy {result.final_accuracy:.4f} at epsilon {result.epsilon:.3f} "
        f"(delta {result.delta:g}); noise multiplier {result.plan.noise_multiplier:.3f}, "
        f"sites {', '.join(result.plan.parties)} (t={result.plan.colluders})\n"
        + (audit_report(result) + "\n" if result.audit is not None else "")
        + f"wrote {out / 'checkpoint.pt'}, {out / 'metrics.json'}, {out / 'metrics.png'}"
    )
