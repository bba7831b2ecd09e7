"""``mpcdp budget``: show a party's ledger (read locally; nothing is sent anywhere).

One line per query and per training run (a run's blocks grouped: mpcdp.dp.ledger_report),
saying what it paid, which coordinator spent it and when; ``--dataset`` and ``--since``
narrow what is listed, and the budget's running total is explained in one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mpcdp.dp.ledger_report import (
    RDP_NOTE,
    TOTAL_NOTE,
    DatasetReport,
    SpendLine,
    exact_decimal,
    parse_since,
    spending_lines,
)
from mpcdp.errors import MpcdpError, ParameterError, valid_names

if TYPE_CHECKING:
    from mpcdp.config.party_config import PartyConfig


def _num(x: float | None) -> float | None:
    """A float without binary noise (0.10000000000000009 -> 0.1): 12 significant digits."""
    return None if x is None else float(f"{x:.12g}")


def _utc(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _paid(line: SpendLine) -> str:
    """What a query or run paid on its own: its pure part exactly, its RDP part composed."""
    parts = []
    if line.pure_epsilon is not None:
        parts.append(exact_decimal(line.pure_epsilon))
    if line.rdp_epsilon is not None:
        parts.append(f"{line.rdp_epsilon:.6g}")
    if not parts:
        return "epsilon 0 (exact release, no DP)" if line.exact else "epsilon 0"
    return "epsilon " + " + ".join(parts) + (" + an exact release" if line.exact else "")


def _line_text(line: SpendLine) -> str:
    who = line.coordinator or "(coordinator not recorded)"
    if line.kind == "training":
        steps = f"{line.steps} steps in " if line.steps else ""
        blocks = f"{line.blocks} block{'s' if line.blocks != 1 else ''}"
        until = f", last at {line.last_at}" if line.last_at != line.first_at else ""
        head, what = f"run {line.id}", f"{line.what}, {steps}{blocks}{until}"
    else:
        head, what = f"query {line.id}", line.what
    total = (
        f" (RDP total {line.rdp_total_after:.6g} after it)"
        if line.rdp_total_after is not None
        else ""
    )
    return f"    {line.first_at}  {who}  {head}: {_paid(line)}{total}; {what}"


def budget(
    config: Path = typer.Option(..., "--config", help="The party's party.toml."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="Only this dataset's budget (a dataset of party.toml, or a shared budget's name).",
    ),
    since: str | None = typer.Option(
        None,
        "--since",
        help="Only what was charged since then: a duration back from now (90m, 12h, 7d, 2w) "
        "or a date or UTC time (2026-12-01, 2026-12-01T09:30). Totals stay the budget's.",
    ),
    backup: Path | None = typer.Option(
        None,
        "--backup",
        help="Copy the ledger to this new file (SQLite's online backup: consistent while "
        "the node runs), check the copy, and exit.",
    ),
) -> None:
    """Budget, spend and one line per query or training run (what it paid, which
    coordinator, when) per budget of this party (datasets that share a budget, party.toml
    ``budget``, are shown once, together).

    Reads the ledger locally; nothing is sent anywhere. With --backup FILE, copies the
    ledger instead; to restore, stop the party and copy the backup to the ledger's path."""
    from mpcdp.config.party_config import load_party_config
    from mpcdp.dp.ledger import BudgetLedger
    from mpcdp.dp.ledger_report import report

    since_t: float | None = None
    if since is not None:
        try:
            since_t = parse_since(since, now=time.time())
        except ParameterError as exc:
            raise typer.BadParameter(f"{since!r} {exc.reason}", param_hint="--since") from None
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
            together = ledger.total()
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    users = _users(cfg)
    if dataset is not None:
        known = {n for r in reports for n in users.get(r.dataset, [r.dataset])}
        if dataset not in known and dataset not in {r.dataset for r in reports}:
            raise typer.BadParameter(
                f"{dataset!r} is not a dataset with a budget in the ledger of party "
                f"{cfg.id!r}; {valid_names(dataset, known)}",
                param_hint="--dataset",
            )
        reports = [r for r in reports if dataset in {r.dataset, *users.get(r.dataset, [])}]
    if as_json:
        obj = _to_json(cfg.id, str(cfg.ledger), reports, users, since_t)
        obj["total_budget"] = (
            None
            if together is None
            else {
                "budget_epsilon": _num(float(together.budget_epsilon)),
                "delta": together.delta,
                "spent_epsilon": _num(together.spent_epsilon),
                "remaining_epsilon": _num(together.remaining_epsilon),
            }
        )
        typer.echo(json.dumps(obj))
        return
    typer.echo(f"party {cfg.id}, ledger {cfg.ledger}")
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
        lines = spending_lines(r)
        runs = sum(li.kind == "training" for li in lines)
        queries = f"{r.queries} {'query' if r.queries == 1 else 'queries'}"
        typer.echo(
            f"    {queries} ({r.exact_queries} exact, no DP)"
            + (f", {runs} training run{'s' if runs != 1 else ''}" if runs else "")
        )
        shown = [li for li in lines if since_t is None or li.last_time >= since_t]
        if since_t is not None:
            typer.echo(f"    since {_utc(since_t)}: {len(shown)} of {len(lines)}")
        for li in shown:
            typer.echo(_line_text(li))
    if together is not None:
        typer.echo(
            f"  all datasets together (total_budget): spent {together.spent_epsilon:.6g} of "
            f"{exact_decimal(together.budget_epsilon)} (left {together.remaining_epsilon:.6g}"
            f" at delta {together.delta:g})"
        )
    typer.echo(f"  total: {TOTAL_NOTE}")


def _users(cfg: PartyConfig) -> dict[str, list[str]]:
    """Budget name -> the datasets of ``cfg`` that draw on it (party.toml ``budget``)."""
    out: dict[str, list[str]] = {}
    for ds in cfg.datasets.values():
        out.setdefault(ds.budget, []).append(ds.name)
    return {b: sorted(names) for b, names in out.items()}


def _line_json(li: SpendLine) -> dict[str, object]:
    return {
        "kind": li.kind,
        "id": li.id,
        "coordinator": li.coordinator,
        "first_at": li.first_at,
        "last_at": li.last_at,
        "what": li.what,
        "epsilon": _num(li.epsilon),
        "pure_epsilon": None if li.pure_epsilon is None else exact_decimal(li.pure_epsilon),
        "rdp_epsilon": _num(li.rdp_epsilon),
        "exact": li.exact,
        "rdp_total_after": _num(li.rdp_total_after),
        "blocks": li.blocks,
        "steps": li.steps,
    }


def _to_json(
    party: str,
    ledger: str,
    reports: list[DatasetReport],
    users: dict[str, list[str]],
    since: float | None = None,
) -> dict[str, object]:
    def keep(at: float) -> bool:
        return since is None or at >= since

    return {
        "party": party,
        "ledger": ledger,
        "since": None if since is None else _utc(since),
        "note": RDP_NOTE,
        "total_note": TOTAL_NOTE,
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
                "runs": [_line_json(li) for li in spending_lines(r) if keep(li.last_time)],
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
                    if keep(e.time)
                ],
            }
            for r in reports
        },
    }
