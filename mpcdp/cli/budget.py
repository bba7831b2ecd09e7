"""``mpcdp budget``: show a party's ledger (read locally; nothing is sent anywhere)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mpcdp.errors import MpcdpError


def budget(
    config: Path = typer.Option(..., "--config", help="The party's party.toml."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Budget, spend and queries per dataset of this party."""
    from mpcdp.config import load_party_config
    from mpcdp.dp.ledger import BudgetLedger

    try:
        cfg = load_party_config(config)
        if not cfg.ledger.exists():
            raise MpcdpError(f"ledger {cfg.ledger} does not exist yet (the node creates it)")
        with BudgetLedger(cfg.ledger) as ledger:
            statuses = {name: ledger.status(name) for name in ledger.datasets()}
            charges = {name: ledger.charges(name) for name in statuses}
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    obj = {
        "party": cfg.id,
        "ledger": str(cfg.ledger),
        "datasets": {
            name: {
                "budget_epsilon": float(s.budget_epsilon),
                "delta": s.delta,
                "spent_epsilon": s.spent_epsilon,
                "remaining_epsilon": s.remaining_epsilon,
                "queries": s.queries,
                "exact_releases": s.exact_releases,
                "charges": [
                    {"query_id": c.query_id, "kind": c.event.kind, "at": c.created_at}
                    for c in charges[name]
                ],
            }
            for name, s in statuses.items()
        },
    }
    if as_json:
        typer.echo(json.dumps(obj))
        return
    typer.echo(f"party {cfg.id}, ledger {cfg.ledger}")
    for name, d in obj["datasets"].items():  # type: ignore[attr-defined]
        typer.echo(
            f"  {name}: spent {d['spent_epsilon']:g} of {d['budget_epsilon']:g} "
            f"(left {d['remaining_epsilon']:g}, delta {d['delta']:g}), {d['queries']} queries, "
            f"{d['exact_releases']} exact releases"
        )
