"""What a party tells coordinators about its datasets (the Describe call): public metadata
only, as frozen dataclasses. The party builds them (mpcdp.party.node), the analyst reads them
(mpcdp.federation); mpcdp.transport.codec maps them onto the wire. Field names follow the
wire's (mpcdp/proto/party.proto); nothing happens at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ColumnInfo", "DatasetInfo", "PartyDescription"]


@dataclass(frozen=True)
class ColumnInfo:
    """A declared column: its bounds (numeric) or its categories (categorical)."""

    name: str
    lower: float = 0.0
    upper: float = 0.0
    categories: tuple[str, ...] = ()
    edges: tuple[float, ...] = ()  # declared quantile bin edges (numeric columns)


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's public metadata at one party, with its budget as the asking coordinator
    sees it (0 where a field does not apply to the dataset's kind)."""

    name: str
    kind: str  # "table" (CSV), "vector" (.npy) or "examples" (training)
    columns: tuple[ColumnInfo, ...] = ()
    length: int = 0  # vector datasets: coordinates; example datasets: examples
    l2_bound: float = 0.0  # vector datasets
    budget_epsilon: float = 0.0
    remaining_epsilon: float = 0.0
    delta: float = 0.0
    allow_exact: bool = False
    feature_shape: tuple[int, ...] = ()  # example datasets: the shape of one example
    num_classes: int = 0  # example datasets: labels are 0..num_classes-1
    #: the asking coordinator's share of the budget (0: none declared) and what it may
    #: still spend (its share less its charges and reservations, at most what is left)
    coordinator_share: float = 0.0
    coordinator_remaining_epsilon: float = 0.0
    #: table datasets: the column naming a person ("": one row is one unit) and the public
    #: bounds of what one unit contributes (DP SQL, mpcdp.protocol.query.sql_release)
    privacy_unit: str = ""
    max_rows_per_unit: int = 1
    max_groups_per_unit: int = 1
    max_parties_per_unit: int = 1
    #: example datasets: the examples of the held-out split the site evaluates a run's model
    #: on (0: none); public on purpose, like ``length`` (an evaluation's time grows with it)
    held_out: int = 0


@dataclass(frozen=True)
class PartyDescription:
    """One party's answer to Describe: its id and its datasets."""

    party_id: str
    datasets: tuple[DatasetInfo, ...] = ()
