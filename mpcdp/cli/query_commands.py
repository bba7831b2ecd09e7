"""``mpcdp query {sql,sum,mean,count,histogram}``: ask the federation a DP SQL query or one
DP statistic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mpcdp.cli.messages import refusal_text, said_here, with_valid_names
from mpcdp.dp.mechanisms import MECHANISMS
from mpcdp.errors import MpcdpError, ParameterError, valid_names

app = typer.Typer(help="Query a federation.", no_args_is_help=True)

FEDERATION = typer.Option(..., "--federation", help="The analyst's federation.toml.")
DATASET = typer.Option(..., "--dataset", help="Dataset name, as the parties declare it.")
EPSILON = typer.Option(
    None,
    "--epsilon",
    help="Privacy budget this query spends at every party (required, except with "
    "--mechanism none).",
)
MECHANISM = typer.Option(
    "discrete-laplace", "--mechanism", help=f"Noise: one of {', '.join(MECHANISMS)}."
)
DELTA = typer.Option(None, "--delta", help="delta for skellam / discrete-gaussian.")
AS_JSON = typer.Option(False, "--json", help="Print one JSON object.")
#: the logger that warns of a party left out of a query: the command prints it itself
_ROUNDS = "mpcdp.protocol.query.round_coordinator"


def _check_noise(kw: dict[str, Any]) -> None:
    """--mechanism and --epsilon, checked before any party is asked."""
    if kw["mechanism"] not in MECHANISMS:
        raise typer.BadParameter(
            f"mechanism={kw['mechanism']!r}: {valid_names(kw['mechanism'], MECHANISMS)}",
            param_hint="--mechanism",
        )
    if kw["mechanism"] != "none" and kw["epsilon"] is None:
        raise typer.BadParameter(
            "is required: the privacy budget this query spends at every party "
            "(e.g. --epsilon 1); only --mechanism none (exact, no DP) spends none",
            param_hint="--epsilon",
        )
    if kw["mechanism"] == "none":
        kw["epsilon"] = 0.0
        typer.echo(
            "warning: mechanism none releases the exact value (no differential privacy)", err=True
        )


def _run(statistic: str, federation: Path, as_json: bool, **kw: Any) -> None:
    from mpcdp.federation import Federation

    _check_noise(kw)
    try:
        with Federation.from_config(federation) as fed, said_here(_ROUNDS):
            try:
                result = fed.query(statistic=statistic, **kw)
            except ParameterError as exc:
                raise with_valid_names(
                    fed, exc, training=False, dataset=kw.get("dataset", "")
                ) from None
    except MpcdpError as exc:
        typer.echo(f"error: {refusal_text(exc)}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    value = result.value
    if isinstance(value, dict):
        shown = ", ".join(f"{k}: {v:g}" for k, v in value.items())
    elif isinstance(value, float):
        shown = f"{value:.6g}"
    else:
        shown = f"vector of {len(value)} (use --json)"
    typer.echo(f"{result.statistic} of {result.dataset}.{result.column or '*'} = {shown}")
    if result.interval95:
        lo, hi = result.interval95
        typer.echo(f"  95% interval ~[{lo:.6g}, {hi:.6g}], noise std {result.noise_std:.4g}")
    typer.echo(
        f"  mechanism {result.mechanism}, epsilon spent {result.epsilon_spent:g}"
        + (f", delta {result.delta_spent:g}" if result.delta_spent else "")
    )
    for party, left in result.budget_remaining.items():
        typer.echo(f"  budget left at {party}: {left:g}")
    for party, why in result.dropped.items():
        typer.echo(f"  left out: {party} ({why})")


def _keys(values: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in values:
        column, sep, rest = v.partition("=")
        if not sep or not column or not rest:
            raise typer.BadParameter(f"{v!r} is not COLUMN=KEY1,KEY2,...", param_hint="--keys")
        if column in out:
            raise typer.BadParameter(f"column {column!r} is given twice", param_hint="--keys")
        out[column] = rest.split(",")
    return out


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of numbers", param_hint="--weights"
        ) from None


@app.command("sql")
def sql(
    query: str = typer.Argument(
        ...,
        help="SELECT [group columns,] COUNT/SUM/AVG/MEDIAN/QUANTILE(...) FROM table "
        "[WHERE ...] [GROUP BY ...]  (docs/queries.md lists the subset)",
    ),
    federation: Path = FEDERATION,
    epsilon: float | None = EPSILON,
    mechanism: str = MECHANISM,
    delta: float | None = DELTA,
    keys: list[str] = typer.Option(
        [],
        "--keys",
        help="Public keys of a GROUP BY column, COLUMN=KEY1,KEY2 (repeat per column; "
        "default: its declared categories).",
    ),
    bins: int | None = typer.Option(
        None, "--bins", help="Quantile bins, uniform over the bounds (default: declared edges)."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Budget weights, one per aggregate, e.g. 2,1,1 (default: equal)."
    ),
    max_parties_per_unit: int | None = typer.Option(
        None,
        "--max-parties-per-unit",
        help="Parties one privacy unit may appear at (default: federation.toml's).",
    ),
    as_json: bool = AS_JSON,
    as_csv: bool = typer.Option(False, "--csv", help="Print the table as CSV."),
) -> None:
    """A DP SQL query: every cell of every aggregate, with its noise std and 95% interval."""
    from mpcdp.federation import Federation

    kw: dict[str, Any] = {"mechanism": mechanism, "epsilon": epsilon}
    _check_noise(kw)
    try:
        with Federation.from_config(federation) as fed, said_here(_ROUNDS):
            result = fed.sql(
                query,
                epsilon=kw["epsilon"],
                mechanism=mechanism,
                delta=delta,
                keys=_keys(keys) or None,
                bins=bins,
                weights=_weights(weights),
                max_parties_per_unit=max_parties_per_unit,
            )
    except MpcdpError as exc:
        typer.echo(f"error: {refusal_text(exc)}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    if as_csv:
        typer.echo(result.to_csv(), nl=False)
        return
    typer.echo(result.to_text())
    typer.echo(
        f"  values with their 95% intervals; mechanism {result.mechanism}, epsilon spent "
        f"{result.epsilon_spent:g}"
        + (f", delta {result.delta_spent:g}" if result.delta_spent else "")
    )
    for party, left in result.budget_remaining.items():
        typer.echo(f"  budget left at {party}: {left:g}")
    for party, why in result.dropped.items():
        typer.echo(f"  left out: {party} ({why})")


@app.command("sum")
def sum_(
    federation: Path = FEDERATION,
    dataset: str = DATASET,
    column: str = typer.Option("", "--column", help="Column (omit for vector datasets)."),
    epsilon: float | None = EPSILON,
    mechanism: str = MECHANISM,
    delta: float | None = DELTA,
    ring_bits: int | None = typer.Option(
        None, "--ring-bits", help="32 or 64; default: 32 for vectors when it fits, else 64."
    ),
    as_json: bool = AS_JSON,
) -> None:
    """DP sum of a column (or of parties' vectors)."""
    if ring_bits not in (None, 32, 64):
        raise typer.BadParameter(
            f"ring_bits={ring_bits} must be 32 or 64", param_hint="--ring-bits"
        )
    _run(
        "sum",
        federation,
        as_json,
        dataset=dataset,
        column=column,
        epsilon=epsilon,
        mechanism=mechanism,
        delta=delta,
        ring_bits=ring_bits,
    )


@app.command("mean")
def mean(
    federation: Path = FEDERATION,
    dataset: str = DATASET,
    column: str = typer.Option(..., "--column", help="Column name, as the parties declare it."),
    epsilon: float | None = EPSILON,
    mechanism: str = MECHANISM,
    delta: float | None = DELTA,
    as_json: bool = AS_JSON,
) -> None:
    """DP mean of a column (sum and count, each with half the budget)."""
    _run(
        "mean",
        federation,
        as_json,
        dataset=dataset,
        column=column,
        epsilon=epsilon,
        mechanism=mechanism,
        delta=delta,
    )


@app.command("count")
def count(
    federation: Path = FEDERATION,
    dataset: str = DATASET,
    column: str = typer.Option("", "--column", help="Ignored: counts rows."),
    epsilon: float | None = EPSILON,
    mechanism: str = MECHANISM,
    delta: float | None = DELTA,
    as_json: bool = AS_JSON,
) -> None:
    """DP count of rows."""
    _run(
        "count",
        federation,
        as_json,
        dataset=dataset,
        epsilon=epsilon,
        mechanism=mechanism,
        delta=delta,
    )


@app.command("histogram")
def histogram(
    federation: Path = FEDERATION,
    dataset: str = DATASET,
    column: str = typer.Option(..., "--column", help="Column name, as the parties declare it."),
    epsilon: float | None = EPSILON,
    mechanism: str = MECHANISM,
    delta: float | None = DELTA,
    as_json: bool = AS_JSON,
) -> None:
    """DP histogram of a categorical column."""
    _run(
        "histogram",
        federation,
        as_json,
        dataset=dataset,
        column=column,
        epsilon=epsilon,
        mechanism=mechanism,
        delta=delta,
    )
