"""``mpcdp demo ...``: demonstrations that run on one machine."""

from __future__ import annotations

import json
import math
import signal
import tempfile
from pathlib import Path
from types import FrameType

import typer

from mpcdp.errors import MpcdpError

app = typer.Typer(help="Demonstrations.", no_args_is_help=True)

#: Public upper bound of a raise in the demo (mpcdp.salary_demo.DEFAULT_BOUND; repeated here
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
    """The four engineers' average raise (reference/mpc_and_dp.txt), exact and with DP.

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
    from mpcdp import salary_demo as salary

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="mpcdp-salary-") as tmp:
            if local:
                report = salary.run(workdir=Path(tmp), epsilon=epsilon, bound=bound)
                text, obj = salary.render(report), salary.report_json(report)
            else:
                net = salary.run_networked(workdir=Path(tmp), epsilon=epsilon, bound=bound)
                text = salary.render_networked(net)
                obj = {
                    "exact_mean": net.exact.value,
                    "true_mean": net.true_mean,
                    "dp": net.dp.to_json(),
                    "observed_words": net.observed,
                    "budget_remaining": net.dp.budget_remaining,
                }
    except KeyboardInterrupt:
        typer.echo("interrupted: party processes stopped, temporary files removed", err=True)
        raise typer.Exit(130) from None
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(obj, indent=2) if as_json else text)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
