"""The answer to a DP SQL query as the analyst reads it: one row per public cell (the GROUP BY
keys), and for each aggregate its released value, the std of its noise and a 95% interval.

Every cell of the public key set is present, whatever the data: a missing row would tell that
a group has no member, which only the noised counts may say (the parties contribute every
cell, empty or not). Output forms: a pandas DataFrame (:meth:`SqlResult.to_pandas`), aligned
text (:meth:`SqlResult.to_text`), JSON (:meth:`SqlResult.to_json`) and CSV
(:meth:`SqlResult.to_csv`). Everything here is post-processing of released values.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SqlCell", "SqlResult"]


@dataclass(frozen=True)
class SqlCell:
    """One aggregate of one cell: the released value, its noise std and a 95% interval."""

    value: float
    noise_std: float
    interval95: tuple[float, float]


@dataclass(frozen=True)
class SqlResult:
    """A released DP SQL answer (module docstring)."""

    sql: str
    table: str
    group_by: tuple[str, ...]
    labels: tuple[str, ...]  # the aggregates' output names, in SELECT order
    keys: tuple[tuple[str, ...], ...]  # one per row: the cell's GROUP BY values
    cells: tuple[tuple[SqlCell, ...], ...]  # one per row, one per aggregate
    mechanism: str
    epsilon_spent: float
    delta_spent: float
    budget_remaining: dict[str, float]
    parties: tuple[str, ...]  # the parties that contributed
    query_id: str
    #: parties left out of the release (they failed), each with why
    dropped: dict[str, str] = field(default_factory=dict)
    #: the failed rounds before the one released (mpcdp.federation.QueryResult's)
    failed_rounds: tuple[dict[str, Any], ...] = ()

    def columns(self) -> list[str]:
        """Column names of the flat table: group columns, then per aggregate its value,
        ``<label>_std``, ``<label>_lo`` and ``<label>_hi``."""
        out = list(self.group_by)
        for label in self.labels:
            out += [label, f"{label}_std", f"{label}_lo", f"{label}_hi"]
        return out

    def rows(self) -> list[list[Any]]:
        out: list[list[Any]] = []
        for key, cells in zip(self.keys, self.cells, strict=True):
            row: list[Any] = list(key)
            for c in cells:
                row += [c.value, c.noise_std, c.interval95[0], c.interval95[1]]
            out.append(row)
        return out

    def to_pandas(self) -> pd.DataFrame:
        """The answer as a DataFrame (columns as :meth:`columns`)."""
        import pandas as pd

        frame: pd.DataFrame = pd.DataFrame(self.rows(), columns=self.columns())
        return frame

    def to_json(self) -> dict[str, Any]:
        return {
            "sql": self.sql,
            "table": self.table,
            "group_by": list(self.group_by),
            "rows": [
                {
                    **dict(zip(self.group_by, key, strict=True)),
                    **{
                        label: {
                            "value": c.value,
                            "noise_std": c.noise_std,
                            "interval95": list(c.interval95),
                        }
                        for label, c in zip(self.labels, cells, strict=True)
                    },
                }
                for key, cells in zip(self.keys, self.cells, strict=True)
            ],
            "mechanism": self.mechanism,
            "epsilon_spent": self.epsilon_spent,
            "delta_spent": self.delta_spent,
            "budget_remaining": self.budget_remaining,
            "parties": list(self.parties),
            "query_id": self.query_id,
            "dropped": dict(self.dropped),
            "failed_rounds": list(self.failed_rounds),
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns())
        for row in self.rows():
            w.writerow([repr(v) if isinstance(v, float) else v for v in row])
        return buf.getvalue()

    def to_text(self) -> str:
        """Aligned columns: each aggregate as ``value ± half-width`` of its interval."""
        head = [*self.group_by, *self.labels]
        body: list[list[str]] = []
        for key, cells in zip(self.keys, self.cells, strict=True):
            body.append(
                [
                    *key,
                    *(
                        f"{c.value:.6g} [{c.interval95[0]:.6g}, {c.interval95[1]:.6g}]"
                        for c in cells
                    ),
                ]
            )
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
        lines += [
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in body
        ]
        return "\n".join(lines)
