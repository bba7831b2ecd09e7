"""``mpcdp datasets``: what a federation offers, party by party: each dataset's kind, its
public columns (bounds or categories), its shape for training, and the budget this
coordinator may still spend there.

Everything shown is the public metadata each party answers to Describe (the analyst API's
:meth:`mpcdp.federation.Federation.describe`); no query is run and nothing is charged.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from mpcdp.errors import MpcdpError

# the Describe answers are mpcdp.protocol.catalog's dataclasses (PartyDescription,
# DatasetInfo, ColumnInfo), typed Any here: cli/ reaches the protocol only through the
# analyst API (tests/project/test_boundaries.py)


def _column(c: Any) -> str:
    if c.categories:
        return f"{c.name} {{{', '.join(c.categories)}}}"
    return f"{c.name} [{c.lower:g}, {c.upper:g}]"


def _what(d: Any) -> str:
    if d.kind == "examples":
        shape = "x".join(str(n) for n in d.feature_shape) or "?"
        classes = f", {d.num_classes} classes" if d.num_classes else ", float targets"
        held_out = f", {d.held_out} held out" if d.held_out else ""
        return f"{d.length} examples of shape {shape}{classes}{held_out}"
    if d.kind == "vector":
        return f"vector of {d.length} coordinates, L2 bound {d.l2_bound:g}"
    cols = ", ".join(_column(c) for c in d.columns) or "no public columns"
    unit = f"; one person is a {d.privacy_unit!r}" if d.privacy_unit else ""
    exact = "; exact (no-DP) answers allowed" if d.allow_exact else ""
    return f"columns {cols}{unit}{exact}"


def _budget(d: Any) -> str:
    return (
        f"budget {d.budget_epsilon:g} at delta {d.delta:g}, left {d.remaining_epsilon:g}, "
        f"yours to spend {d.coordinator_remaining_epsilon:g}"
    )


def datasets(
    federation: Path = typer.Option(..., "--federation", help="The analyst's federation.toml."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List every party's datasets: kind, public columns (bounds or categories) or
    training shape, and the budget this coordinator may still spend. Runs no query and
    charges nothing. A party that does not answer is listed as such; the command fails
    only when none answers."""
    from mpcdp.federation import Federation

    try:
        with Federation.from_config(federation) as fed:
            answers, failed = fed.describe_each()
    except MpcdpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        obj: dict[str, Any] = {p: [asdict(d) for d in a.datasets] for p, a in answers.items()}
        obj.update({p: {"error": f"{e.outcome} ({e.code})"} for p, e in failed.items()})
        typer.echo(json.dumps(obj))
    else:
        lines = describe_text(answers)
        lines += [f"{p}: did not answer: {e.outcome} ({e.code})" for p, e in failed.items()]
        typer.echo("\n".join(lines))
    if not answers:
        typer.echo("error: no party answered", err=True)
        raise typer.Exit(1)


def describe_text(answers: dict[str, Any]) -> list[str]:
    """The lines of ``mpcdp datasets``: party by party, then the datasets that some parties
    do not offer (a query or run on them cannot include those parties)."""
    out = []
    for party, answer in answers.items():
        out.append(f"{party}:" if answer.datasets else f"{party}: no datasets")
        for d in answer.datasets:
            out.append(f"  {d.name} ({d.kind}): {_what(d)}; {_budget(d)}")
    where: dict[str, list[str]] = {}
    for party, answer in answers.items():
        for d in answer.datasets:
            where.setdefault(d.name, []).append(party)
    for name, parties in sorted(where.items()):
        if len(parties) != len(answers):
            missing = [p for p in answers if p not in parties]
            out.append(f"note: {name} is not offered by {', '.join(missing)}")
    return out
