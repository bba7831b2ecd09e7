"""``mpcdp budget``: show a party's ledger (read locally; nothing is sent anywhere)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mpcdp.dp.ledger_report import RDP_NOTE, DatasetReport, Entry, exact_decimal
from mpcdp.errors import MpcdpError

if TYPE_CHECKING:
    from mpcdp.config.party_config import PartyConfig


def _num(x: float | None) -> float | None:
    """A float without binary noise (0.10000000000000009 -> 0.1): 12 significant digits."""
    return None if x is None else float(f"{x:.12g}")


def _eps_text(e: Entry) -> str:
    if e.note:
        who = f"{e.coordinator}: " if e.coordinator else ""
        what = e.note if e.kind == "training" else f"{e.note} [{who}{e.query_id}]"
    elif e.kind == "training":
        what = f"training {e.run_id} block {e.block}" + (f" ({e.steps} steps)" if e.steps else "")
    else:
        what = f"query {e.query_id} ({e.mechanism})"
    spent = []
    if e.pure_epsilon is not None:
        spent.append(f"epsilon {exact_decimal(e.pure_epsilon)}")
    if e.rdp_epsilon_alone is not None:
        spent.append(
            f"epsilon {e.rdp_epsilon_alone:.6g} alone, RDP total {e.rdp_total_after:.6g} after it"
        )
    if e.exact:
        spent.append("exact release, no DP (epsilon 0)")
    return f"    {e.at}  {what:<52} {'; '.join(spent)}"


def budget(
    config: Path = typer.Option(..., "--config", help="The party's party.toml."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    backup: Path | None = typer.Option(
        None,
        "--backup",
        help="Copy the ledger to this new file (SQLite's online backup: consistent while "
        "the node runs), check the copy, and exit.",
    ),
) -> None:
    """Budget, spend and every charge (query or training block) per budget of this party
    (datasets that share a budget, party.toml ``budget``, are shown once, together).

    Reads the ledger locally; nothing is sent anywhere. With --backup FILE, copies the
    ledger instead; to restore, stop the party and copy the backup to the ledger's path."""
    from mpcdp.config.party_config import load_party_config
    from mpcdp.dp.ledger import BudgetLedger
    from mpcdp.dp.ledger_report import report

    try:
        cfg = load_party_config(config)
        if backup is not None:
            with BudgetLedger(cfg.ledger) as ledger:
                ledger.backup(backup)
            typer.echo(f"ledger {cfg.ledger} backed up to {backup} (checked)")
            return
        with BudgetLedger(cfg.ledger) as ledger:
            reports = [
                report(status=ledger.status(name), charges=ledger.charges(name))
                for name in ledger.datasets()
            ]
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(_to_json(cfg.id, str(cfg.ledger), reports, _users(cfg))))
        return
    typer.echo(f"party {cfg.id}, ledger {cfg.ledger}")
    any_rdp = False
    users = _users(cfg)
    for r in reports:
        shared = users.get(r.dataset, [r.dataset])
        name = (
            r.dataset
            if shared == [r.dataset]
            else f"budget {r.dataset} (datasets {', '.join(shared)})"
        )
        typer.echo(
            f"  {name}: spent {r.spent:.6g} of {exact_decimal(r.budget_epsilon)} "
            f"(left {r.remaining:.6g}; pure {exact_decimal(r.pure_spent)} + RDP "
            f"{r.rdp_spent:.6g} at delta {r.delta:g})"
        )
        runs = ", ".join(f"{run}: {n} blocks" for run, n in r.training_blocks.items())
        queries = f"{r.queries} {'query' if r.queries == 1 else 'queries'}"
        typer.echo(
            f"    {queries} ({r.exact_queries} exact, no DP)"
            + (f"; training {runs}" if runs else "")
        )
        for e in r.entries:
            typer.echo(_eps_text(e))
            any_rdp = any_rdp or e.rdp_epsilon_alone is not None
    if any_rdp:
        typer.echo(f"  note: {RDP_NOTE}")


def _users(cfg: PartyConfig) -> dict[str, list[str]]:
    """Budget name -> the datasets of ``cfg`` that draw on it (party.toml ``budget``)."""
    out: dict[str, list[str]] = {}
    for ds in cfg.datasets.values():
        out.setdefault(ds.budget, []).append(ds.name)
    return {b: sorted(names) for b, names in out.items()}


def _to_json(
    party: str, ledger: str, reports: list[DatasetReport], users: dict[str, list[str]]
) -> dict[str, object]:
    return {
        "party": party,
        "ledger": ledger,
        "note": RDP_NOTE,
        "datasets": {
            r.dataset: {
                "datasets": users.get(r.dataset, [r.dataset]),
                "budget_epsilon": _num(float(r.budget_epsilon)),
                "budget_epsilon_exact": exact_decimal(r.budget_epsilon),
                "delta": r.delta,
                "spent_epsilon": _num(r.spent),
                "pure_epsilon_spent": exact_decimal(r.pure_spent),
                "rdp_epsilon_spent": _num(r.rdp_spent),
                "remaining_epsilon": _num(r.remaining),
                "queries": r.queries,
                "exact_queries": r.exact_queries,
                "training_blocks": r.training_blocks,
                "entries": [
                    {
                        "kind": e.kind,
                        "query_id": e.query_id,
                        "coordinator": e.coordinator,
                        "run_id": e.run_id,
                        "block": e.block,
                        "at": e.at,
                        "mechanism": e.mechanism,
                        "pure_epsilon": (
                            None if e.pure_epsilon is None else exact_decimal(e.pure_epsilon)
                        ),
                        "exact": e.exact,
                        "rdp_epsilon_alone": _num(e.rdp_epsilon_alone),
                        "rdp_total_after": _num(e.rdp_total_after),
                        "steps": e.steps,
                        "note": e.note,
                    }
                    for e in r.entries
                ],
            }
            for r in reports
        },
    }
