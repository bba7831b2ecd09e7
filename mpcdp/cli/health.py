"""``mpcdp health``: is a party serving? (exit 0 when it answers SERVING over mTLS)"""

from __future__ import annotations

from pathlib import Path

import typer


def health(
    address: str = typer.Option(..., "--address", help="HOST:PORT of the party."),
    name: str = typer.Option(..., "--name", help="The party id its certificate must carry."),
    ca: Path = typer.Option(..., "--ca"),
    cert: Path = typer.Option(..., "--cert"),
    key: Path = typer.Option(..., "--key"),
    timeout: float = typer.Option(5.0, "--timeout"),
) -> None:
    """Check a party's health service over mutual TLS."""
    from mpcdp.config import TlsConfig
    from mpcdp.errors import MpcdpError
    from mpcdp.transport import tls
    from mpcdp.transport.client import check_health

    try:
        creds = tls.load_credentials(TlsConfig(ca=ca, cert=cert, key=key))
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    ok = check_health(address=address, creds=creds, party_id=name, timeout_s=timeout)
    typer.echo("SERVING" if ok else "NOT SERVING")
    raise typer.Exit(0 if ok else 1)
