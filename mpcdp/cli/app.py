"""Entry point of the ``mpcdp`` command."""

from __future__ import annotations

import logging

import typer

from mpcdp import __version__
from mpcdp.cli import (
    budget_commands,
    certs_commands,
    check_model_commands,
    datasets_commands,
    demo_commands,
    health_commands,
    party_commands,
    query_commands,
    train_commands,
)

app = typer.Typer(
    name="mpcdp",
    help="Secure multiparty aggregation with distributed differential privacy.",
    no_args_is_help=True,
    add_completion=False,
    # click's plain help: flags without a "<bool>" metavar, paths never wrapped in a box
    rich_markup_mode=None,
)
app.add_typer(certs_commands.app, name="certs")
app.add_typer(party_commands.app, name="party")
app.add_typer(query_commands.app, name="query")
app.command("budget")(budget_commands.budget)
app.command("datasets")(datasets_commands.datasets)
app.command("health")(health_commands.health)
app.command("train")(train_commands.train)
app.command("audit")(train_commands.audit)
app.command("check-model")(check_model_commands.check_model)
app.add_typer(demo_commands.app, name="demo")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mpcdp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    app()
