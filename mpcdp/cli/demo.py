"""``mpcdp demo ...``: demonstrations that run on one machine."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import typer

from mpcdp import salary_demo as salary

app = typer.Typer(help="Demonstrations.", no_args_is_help=True)


@app.command("salary")
def salary_cmd(
    epsilon: float = typer.Option(1.0, help="Privacy budget of the DP mean."),
    bound: float = typer.Option(salary.DEFAULT_BOUND, help="Public upper bound of a raise."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The four engineers' average raise (reference/mpc_and_dp.txt), exact and with DP.

    Runs the real protocol cryptography with all four parties in this process: textbook
    shares, seeded pairwise masks, distributed discrete Laplace noise and per-party SQLite
    budget ledgers in a temporary folder that is removed afterwards.
    """
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise typer.BadParameter(
            f"epsilon={epsilon!r} must be finite and > 0", param_hint="--epsilon"
        )
    if not bound > 0 or not math.isfinite(bound):
        raise typer.BadParameter(f"bound={bound!r} must be finite and > 0", param_hint="--bound")
    with tempfile.TemporaryDirectory(prefix="mpcdp-salary-") as tmp:
        report = salary.run(workdir=Path(tmp), epsilon=epsilon, bound=bound)
    if as_json:
        typer.echo(json.dumps(salary.report_json(report), indent=2))
    else:
        typer.echo(salary.render(report))
