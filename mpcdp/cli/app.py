"""Entry point of the ``mpcdp`` command."""

from __future__ import annotations

import logging
from typing import Any

import typer
from typer.core import TyperGroup

from mpcdp import __version__
from mpcdp.cli import (
    audit_commands,
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
from mpcdp.errors import valid_names


class _Commands(TyperGroup):
    """A command group whose "no such command" lists the valid commands (closest first)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:  # click's UsageError, as typer vendors it
            if args and hasattr(exc, "message") and args[0] not in self.commands:
                name = args[0]
                exc.message = f"No such command {name!r}; {valid_names(name, self.commands)}"
            raise


app = typer.Typer(
    cls=_Commands,
    name="mpcdp",
    help="Secure multiparty aggregation with distributed differential privacy.",
    no_args_is_help=True,
    add_completion=False,
    # click's plain help: flags without a "<bool>" metavar, paths never wrapped in a box
    rich_markup_mode=None,
)
app.add_typer(certs_commands.app, name="certs", cls=_Commands)
app.add_typer(party_commands.app, name="party", cls=_Commands)
app.add_typer(query_commands.app, name="query", cls=_Commands)
app.command("budget")(budget_commands.budget)
app.command("datasets")(datasets_commands.datasets)
app.command("health")(health_commands.health)
app.command("train")(train_commands.train)
app.command("audit")(audit_commands.audit)
app.command("check-model")(check_model_commands.check_model)
app.add_typer(demo_commands.app, name="demo", cls=_Commands)


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
