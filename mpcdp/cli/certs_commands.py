"""``mpcdp certs ...``: make the federation's CA and certificates."""

from __future__ import annotations

from pathlib import Path

import typer

from mpcdp.errors import ParameterError
from mpcdp.transport.cert_files import init_federation

app = typer.Typer(help="Certificates for mutual TLS.", no_args_is_help=True)


def _names(value: str, option: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise typer.BadParameter(f"{option}={value!r} names nobody", param_hint=option)
    return names


@app.command("init")
def init(
    out: Path = typer.Option(..., "--out", help="Folder to write ca.pem and NAME.pem/.key into."),
    parties: str = typer.Option(..., "--parties", help="Comma-separated party ids."),
    coordinators: str = typer.Option(
        ..., "--coordinators", help="Comma-separated coordinator ids."
    ),
    host: list[str] = typer.Option(
        [], "--host", help="Extra host name or IP for a certificate: NAME=HOST (repeatable)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA in --out."),
) -> None:
    """Create a CA and one certificate + key per party and per coordinator."""
    hosts: dict[str, list[str]] = {}
    for h in host:
        name, sep, value = h.partition("=")
        if not sep or not name or not value:
            raise typer.BadParameter(f"--host={h!r} must look like NAME=HOST", param_hint="--host")
        hosts.setdefault(name, []).append(value)
    try:
        files = init_federation(
            out=out,
            parties=_names(parties, "--parties"),
            coordinators=_names(coordinators, "--coordinators"),
            hosts=hosts,
            overwrite=force,
        )
    except ParameterError as exc:
        if exc.name == "overwrite":  # the library's advice names its argument, not the flag
            # one plain line (a rich box would wrap a long path mid-sentence)
            typer.echo(f"error: {out} already holds a CA (ca.pem); pass --force to replace it",
                       err=True)  # fmt: skip
            raise typer.Exit(2) from None
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"CA: {files.ca_cert} (keep {files.ca_key} offline)")
    for name, path in files.certs.items():
        typer.echo(f"{name}: {path} {files.keys[name]}")
