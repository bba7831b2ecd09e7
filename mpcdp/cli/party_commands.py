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
    create_ledger: bool = typer.Option(
        False,
        "--create-ledger",
        help="First start only: create the party's ledger (refused when the file exists). "
        "Without it the ledger must exist (`mpcdp party init` creates it).",
    ),
) -> None:
    """Serve this party's datasets to the federation's coordinators until SIGINT/SIGTERM.

    The ledger must exist and be whole: a missing, empty or corrupt ledger stops the node
    with a message that says how to restore it (it is never silently started over).

    Under torchrun (WORLD_SIZE > 1), rank 0 is the party node and the other ranks train its
    steps with it: `torchrun --nproc-per-node 2 --max-restarts 3 -m mpcdp party serve --config
    party.toml` (torchrun then restarts every rank when one fails)."""
    from mpcdp.party import node

    def ready(party: node.PartyNode) -> None:
        cfg = party.config
        host = cfg.listen.rsplit(":", 1)[0]
        typer.echo(f"party {cfg.id} serving on {host}:{party.port} (mutual TLS); Ctrl-C stops it")
        typer.echo(f"  ledger {cfg.ledger}; coordinators allowed: {', '.join(cfg.coordinators)}")
        for name, problem in party.dataset_states().items():
            state = "ok" if problem is None else "UNAVAILABLE (see the log above)"
            typer.echo(f"  dataset {name}: {state}")
        ranks = node.torchrun_rank()
        if ranks is not None:
            typer.echo(
                f"  training on {ranks[1]} ranks: this process is rank 0 (the party node), "
                f"ranks 1-{ranks[1] - 1} are its workers"
            )

    try:
        if node.torchrun_rank() is not None:  # a site on several ranks (torchrun)
            node.serve_site_rank(
                config, port_file=port_file, on_ready=ready, create_ledger=create_ledger
            )
        else:
            node.serve(config, port_file=port_file, on_ready=ready, create_ledger=create_ledger)
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("init")
def init(
    config: Path = typer.Option(..., "--config", help="The party's party.toml."),
) -> None:
    """Create this party's budget ledger (once, before its first `serve`), with each
    dataset's budget from the config. Refused when the ledger file exists: a ledger is
    never overwritten (restore a lost one from a backup: `mpcdp budget --backup`)."""
    from mpcdp.config.party_config import load_party_config
    from mpcdp.party.node import init_ledger

    try:
        path = init_ledger(load_party_config(config))
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"created ledger {path}; back it up with `mpcdp budget --config {config} --backup FILE`"
    )


@app.command("check")
def check(
    config: Path = typer.Option(..., "--config", help="The party's party.toml."),
) -> None:
    """Validate this party's config, TLS files, ledger and datasets locally, as `serve`
    would load them.

    TLS: the certificate is for this party and verifies against its CA file. Ledger: it
    exists and every row is consistent (read-only: safe while the node runs). Prints each
    dataset's problem in full (file, row, column, value): a coordinator is only ever told
    that a dataset is unavailable. Exits 1 when anything cannot be used.
    """
    from mpcdp.config.party_config import load_party_config
    from mpcdp.party.node import check_datasets, check_ledger, check_tls

    try:
        cfg = load_party_config(config)
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    failed = False
    for what, probe in (("tls", check_tls), ("ledger", check_ledger)):
        try:
            typer.echo(f"{what}: ok ({probe(cfg)})")
        except MpcdpError as exc:
            typer.echo(f"{what}: PROBLEM: {exc}")
            failed = True
    try:
        results = check_datasets(cfg)
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for name, problem in results.items():
        typer.echo(f"{name}: {'ok' if problem is None else 'UNAVAILABLE: ' + problem}")
    if failed or any(p is not None for p in results.values()):
        raise typer.Exit(1)
