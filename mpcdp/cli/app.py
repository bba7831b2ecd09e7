"""Entry point of the ``mpcdp`` command."""

from __future__ import annotations

import logging

import typer

from mpcdp import __version__
from mpcdp.cli import budget, certs, check_model, demo, health, party, query, train

app = typer.Typer(
    name="mpcdp",
    help="Secure multiparty aggregation with distributed differential privacy.",
    no_args_is_help=True,
    add_completion=False,
    # click's plain help: flags without a "<bool>" metavar, paths never wrapped in a box
    rich_markup_mode=None,
)
app.add_typer(certs.app, name="certs")
app.add_typer(party.app, name="party")
app.add_typer(query.app, name="query")
app.command("budget")(budget.budget)
app.command("health")(health.health)
app.command("train")(train.train)
app.command("audit")(train.audit)
app.command("check-model")(check_model.check_model)
app.add_typer(demo.app, name="demo")


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
