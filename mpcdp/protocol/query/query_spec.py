"""The query specification and its canonical digest.

A :class:`QuerySpec` is what the analyst asks every party. Parties sign their ephemeral keys
over ``digest(spec)``, so a coordinator that shows different parties different queries is
caught when the signed keys are relayed (each party checks the others' signatures against the
digest of the spec *it* received).

A DP SQL query (statistic ``sql``) carries its text, the analyst's public options (key lists,
quantile bins, budget weights), the privacy-unit bounds R, G and P, and the digest of the plan
the coordinator compiled. Each party compiles the text itself against its own declaration and
refuses unless its plan has that digest (mpcdp.protocol.query.party_engine): the coordinator's
plan is only a proposal, and the digest makes every party's layout of the contribution vector
the same.

Canonical encoding for the digest (version 2): the JSON object of all fields with sorted keys,
no whitespace, top-level floats as ``repr`` strings, UTF-8; digest = SHA-256 of
``b"mpcdp query spec v2\\n" + that``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum

from mpcdp.config.names import check_identity
from mpcdp.dp.events import exact_epsilon
from mpcdp.dp.mechanisms import MECHANISMS
from mpcdp.errors import ParameterError
from mpcdp.mpc.encoding import MAX_FRAC_BITS

__all__ = [
    "DEFAULT_FRAC_BITS",
    "DEFAULT_MAX_ROWS",
    "MAX_QUERY_EPSILON",
    "MAX_QUERY_ID_CHARS",
    "MIN_DELTA",
    "QuerySpec",
    "Statistic",
    "digest",
    "validate_parties",
]

DEFAULT_FRAC_BITS = 16
DEFAULT_MAX_ROWS = 10**9
#: The longest query id (a re-run's id adds ".r<k>" to its first round's)
MAX_QUERY_ID_CHARS = 128
#: One query spends at most this epsilon (beyond it a release protects nothing).
MAX_QUERY_EPSILON = 100
#: The smallest delta a query may ask for (the calibration's RDP orders reach no further).
MIN_DELTA = 1e-30
_SPEC_LABEL = b"mpcdp query spec v2\n"
#: Caps of the SQL fields (characters or entries)
MAX_SQL_CHARS = 1 << 16
MAX_UNIT_BOUND = 1 << 20


class Statistic(str, Enum):
    SUM = "sum"
    MEAN = "mean"
    COUNT = "count"
    HISTOGRAM = "histogram"
    SQL = "sql"


@dataclass(frozen=True)
class QuerySpec:
    """One query. ``parties`` fixes the party indices; ``colluders`` is t."""

    query_id: str
    dataset: str
    statistic: Statistic
    mechanism: str
    epsilon: str
    parties: tuple[str, ...]
    column: str = ""
    delta: float = 0.0
    frac_bits: int = DEFAULT_FRAC_BITS
    colluders: int = 1
    lower: float = 0.0
    upper: float = 0.0
    categories: tuple[str, ...] = field(default_factory=tuple)
    max_rows: int = DEFAULT_MAX_ROWS
    l2_bound: float = 0.0
    ring_bits: int = 64
    sql: str = ""
    keys: tuple[tuple[str, tuple[str, ...]], ...] = ()
    bins: int = 0
    weights: tuple[float, ...] = ()
    max_parties_per_unit: int = 1
    max_rows_per_unit: int = 1
    max_groups_per_unit: int = 1
    plan_digest: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.query_id, str) or not 1 <= len(self.query_id) <= MAX_QUERY_ID_CHARS:
            raise ParameterError(
                "query_id", self.query_id, f"must be 1..{MAX_QUERY_ID_CHARS} characters"
            )
        if not self.query_id.isprintable():
            raise ParameterError("query_id", self.query_id, "must be printable")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ParameterError("dataset", self.dataset, "must be a non-empty string")
        try:
            object.__setattr__(self, "statistic", Statistic(self.statistic))
        except ValueError:
            raise ParameterError(
                "statistic", self.statistic, f"must be one of {[s.value for s in Statistic]}"
            ) from None
        if self.mechanism not in MECHANISMS:
            raise ParameterError("mechanism", self.mechanism, f"must be one of {list(MECHANISMS)}")
        if self.mechanism == "none":
            if self.epsilon not in ("", "0"):
                raise ParameterError("epsilon", self.epsilon, "must be 0 with mechanism none")
            object.__setattr__(self, "epsilon", "0")
        else:
            eps = exact_epsilon(self.epsilon)
            if eps > MAX_QUERY_EPSILON:
                raise ParameterError(
                    "epsilon", self.epsilon, f"must be <= {MAX_QUERY_EPSILON} for one query"
                )
            object.__setattr__(self, "epsilon", str(eps))
        needs_delta = self.mechanism in ("skellam", "discrete-gaussian")
        if needs_delta and not (
            isinstance(self.delta, int | float) and MIN_DELTA <= self.delta < 1
        ):
            raise ParameterError(
                "delta", self.delta, f"must be in [{MIN_DELTA:g}, 1) for {self.mechanism}"
            )
        if not needs_delta and self.delta != 0:
            raise ParameterError("delta", self.delta, f"must be 0 for {self.mechanism}")
        object.__setattr__(self, "parties", validate_parties(self.parties, self.colluders))
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= MAX_FRAC_BITS:
            raise ParameterError("frac_bits", self.frac_bits, f"must be in [0, {MAX_FRAC_BITS}]")
        for name in ("lower", "upper", "l2_bound"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise ParameterError(name, v, "must be a finite number")
            object.__setattr__(self, name, float(v))
        if self.lower > self.upper:
            raise ParameterError("lower", self.lower, f"must be <= upper={self.upper}")
        if self.l2_bound < 0:
            raise ParameterError("l2_bound", self.l2_bound, "must be >= 0")
        object.__setattr__(self, "categories", tuple(self.categories))
        if self.statistic is Statistic.HISTOGRAM and not self.categories:
            raise ParameterError("categories", [], "a histogram needs its categories")
        if len(set(self.categories)) != len(self.categories):
            raise ParameterError("categories", list(self.categories), "must be distinct")
        if self.ring_bits not in (32, 64):
            raise ParameterError("ring_bits", self.ring_bits, "must be 32 or 64")
        if not isinstance(self.max_rows, int) or not 1 <= self.max_rows < 2**63:
            raise ParameterError("max_rows", self.max_rows, "must be an int in [1, 2^63)")
        self._check_sql()

    def _check_sql(self) -> None:
        is_sql = self.statistic is Statistic.SQL
        if is_sql != bool(self.sql):
            raise ParameterError(
                "sql", self.sql[:64], "is given exactly when the statistic is 'sql'"
            )
        if len(self.sql) > MAX_SQL_CHARS:
            raise ParameterError("sql", f"{len(self.sql)} characters", f"at most {MAX_SQL_CHARS}")
        keys = tuple((str(c), tuple(v)) for c, v in self.keys)
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if any(not (math.isfinite(w) and w > 0) for w in self.weights):
            raise ParameterError("weights", list(self.weights), "must be finite and > 0")
        for name in ("bins", "max_parties_per_unit", "max_rows_per_unit", "max_groups_per_unit"):
            v = getattr(self, name)
            low = 0 if name == "bins" else 1
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= MAX_UNIT_BOUND:
                raise ParameterError(name, v, f"must be an int in [{low}, {MAX_UNIT_BOUND}]")
        if not is_sql and (keys or self.bins or self.weights or self.plan_digest):
            raise ParameterError("keys", list(keys), "keys, bins, weights: SQL queries only")
        if is_sql and (len(self.plan_digest) != 64 or not _is_hex(self.plan_digest)):
            raise ParameterError("plan_digest", self.plan_digest, "must be 64 hex digits")

    @property
    def honest(self) -> int:
        return len(self.parties) - self.colluders

    def index_of(self, party: str) -> int:
        try:
            return self.parties.index(party)
        except ValueError:
            raise ParameterError(
                "parties", list(self.parties), f"does not include {party!r}"
            ) from None


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def validate_parties(parties: Sequence[str], colluders: int) -> tuple[str, ...]:
    """The parties of a round or a training session: >= 2 distinct valid identities, and
    t = colluders in [0, n - 1]. Returns them as a tuple."""
    out = tuple(parties)
    for p in out:
        check_identity(p, what="parties")
    if len(out) < 2 or len(set(out)) != len(out):
        raise ParameterError("parties", list(out), "need >= 2 distinct parties")
    if isinstance(colluders, bool) or not isinstance(colluders, int):
        raise ParameterError("colluders", colluders, "must be an int")
    if not 0 <= colluders < len(out):
        raise ParameterError("colluders", colluders, f"must be in [0, {len(out) - 1}]")
    return out


def canonical_json(spec: QuerySpec) -> bytes:
    obj = asdict(spec)
    obj["statistic"] = spec.statistic.value
    for k, v in obj.items():
        if isinstance(v, float):
            obj[k] = repr(v)
        elif isinstance(v, tuple):
            obj[k] = list(v)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(spec: QuerySpec) -> bytes:
    """SHA-256 over the canonical encoding (module docstring)."""
    return hashlib.sha256(_SPEC_LABEL + canonical_json(spec)).digest()
