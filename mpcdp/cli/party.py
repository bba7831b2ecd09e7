"""``mpcdp party ...``: run a party node."""

from __future__ import annotations

from pathlib import Path

import typer

from mpcdp.errors import MpcdpError

app = typer.Typer(help="Party nodes.", no_args_is_help=True)


@app.command("serve")
def serve(
    config: Path = typer.Option(..., "--config", help="The party's party.toml."),
    port_file: Path | None = typer.Option(
        None, "--port-file", help="Write the bound port here once serving (for scripts)."
    ),
) -> None:
    """Serve this party's datasets to the federation's coordinators until SIGINT/SIGTERM."""
    from mpcdp import node

    try:
        node.serve(config, port_file=port_file)
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
