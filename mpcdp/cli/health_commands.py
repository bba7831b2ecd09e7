"""``mpcdp health``: is a party serving? (exit 0 when it answers SERVING over mTLS)"""

from __future__ import annotations

from pathlib import Path

import typer


def health(
    address: str = typer.Option(..., "--address", help="HOST:PORT of the party."),
    name: str = typer.Option(..., "--name", help="The party id its certificate must carry."),
    ca: Path = typer.Option(..., "--ca", help="The federation's CA certificate (ca.pem)."),
    cert: Path = typer.Option(..., "--cert", help="Your certificate (e.g. analyst.pem)."),
    key: Path = typer.Option(..., "--key", help="Your private key (e.g. analyst.key)."),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the answer."),
) -> None:
    """Check a party's health service over mutual TLS.

    Prints SERVING (exit 0), or what went wrong and what to check (exit 1): nothing listening,
    a TLS handshake refused by either side, a certificate for another name, no answer."""
    from mpcdp.config.tls_config import TlsConfig
    from mpcdp.errors import MpcdpError
    from mpcdp.transport import tls
    from mpcdp.transport.client import check_health

    try:
        creds = tls.load_credentials(TlsConfig(ca=ca, cert=cert, key=key))
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    result = check_health(address=address, creds=creds, party_id=name, timeout_s=timeout)
    if result.serving:
        typer.echo("SERVING")
        raise typer.Exit(0)
    typer.echo(f"NOT SERVING ({result.status}): {result.reason}")
    raise typer.Exit(1)
