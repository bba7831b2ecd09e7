"""What an analyst is told about a single-statistic release: the value, its noise std and a
95% interval (a DP mean's from mpcdp.dp.intervals), the budget spent and left, who
contributed and who was left out. Everything here is post-processing of released tensors and
public quantities."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.dp import intervals
from mpcdp.protocol.query.plan import ReleasePlan
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.query.round_coordinator import RoundOutcome

__all__ = [
    "QueryResult",
    "failed_rounds",
    "half_width",
    "mean_release",
    "query_result",
    "release_seed",
]

_Z95 = 1.959963984540054


@dataclass(frozen=True)
class QueryResult:
    """A revealed statistic. ``value`` is a float (sum, mean, count), a dict category ->
    count (histogram) or an array (vector sum)."""

    statistic: str
    dataset: str
    column: str
    value: float | dict[str, float] | NDArray[np.float64]
    noise_std: float
    interval95: tuple[float, float] | None
    mechanism: str
    epsilon_spent: float
    delta_spent: float
    budget_remaining: dict[str, float]
    parties: tuple[str, ...]
    query_id: str
    #: parties left out of the release (they failed), each with why
    dropped: dict[str, str] = field(default_factory=dict)
    #: the failed rounds before the one released: query id, roster, who failed, and what
    #: each party reported it charged in it (mpcdp.protocol.query.round_coordinator.Attempt)
    failed_rounds: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        value: Any = self.value
        if isinstance(value, np.ndarray):
            value = value.tolist()
        return {
            "statistic": self.statistic,
            "dataset": self.dataset,
            "column": self.column,
            "value": value,
            "noise_scale": self.noise_std,
            "noise_std": self.noise_std,
            "interval95": list(self.interval95) if self.interval95 else None,
            "mechanism": self.mechanism,
            "epsilon_spent": self.epsilon_spent,
            "delta_spent": self.delta_spent,
            "budget_remaining": self.budget_remaining,
            "parties": list(self.parties),
            "query_id": self.query_id,
            "dropped": dict(self.dropped),
            "failed_rounds": list(self.failed_rounds),
        }


def release_seed(spec: QuerySpec) -> int:
    """The seed of a release's simulations (its std, its intervals): public post-processing,
    seeded by the query id, so the same release always reports the same numbers."""
    return int.from_bytes(hashlib.sha256(spec.query_id.encode()).digest()[:8], "big")


def half_width(std: float, mechanism: str) -> float:
    """Half the width of a 95% interval for noise of this std under ``mechanism``."""
    if mechanism == "discrete-laplace":
        return std / math.sqrt(2) * math.log(20)  # Laplace with this std: P(|X| > b ln 20) = 5%
    return _Z95 * std


def query_result(outcome: RoundOutcome) -> QueryResult:
    """The analyst's view of a finished round of a single statistic."""
    spec, release = outcome.spec, outcome.plan
    n, h = len(spec.parties), spec.honest
    t = outcome.tensors
    std = release.tensors[0].noise_std(n_parties=n, honest=h)
    value: float | dict[str, float] | NDArray[np.float64]
    interval: tuple[float, float] | None = None
    if spec.statistic is Statistic.HISTOGRAM:
        value = {c: float(v) for c, v in zip(spec.categories, t["histogram"], strict=True)}
    elif "vector" in t:
        value = t["vector"]
    elif spec.statistic is Statistic.MEAN:
        value, std, interval = mean_release(
            spec=spec,
            plan=release,
            centered_sum=float(t["centered_sum"][0]),
            count=float(t["count"][0]),
        )
    else:
        value = float(t[release.tensors[0].name][0])
    if isinstance(value, float) and interval is None:
        half = half_width(std, spec.mechanism)
        interval = (value - half, value + half)
    return QueryResult(
        statistic=spec.statistic.value,
        dataset=spec.dataset,
        column=spec.column,
        value=value,
        noise_std=std,
        interval95=interval,
        mechanism=spec.mechanism,
        epsilon_spent=float(Fraction(spec.epsilon)),
        delta_spent=spec.delta,
        budget_remaining=outcome.budget_remaining,
        parties=spec.parties,
        query_id=spec.query_id,
        dropped=outcome.dropped,
        failed_rounds=failed_rounds(outcome),
    )


def failed_rounds(outcome: RoundOutcome) -> tuple[dict[str, Any], ...]:
    """Each failed round of ``outcome``: its id, roster and who charged."""
    return tuple(a.to_json() for a in outcome.attempts if a.query_id)


def mean_release(
    *,
    spec: QuerySpec,
    plan: ReleasePlan,
    centered_sum: float,
    count: float,
) -> tuple[float, float, tuple[float, float]]:
    """The released mean, its std and its 95% interval (mpcdp.dp.intervals), from the two
    revealed tensors and public quantities only."""
    n, h = len(spec.parties), spec.honest
    seed = release_seed(spec)
    rng = np.random.default_rng(seed)
    laws = {
        tp.name: intervals.noise_law(
            tp.mechanism, n_parties=n, honest=h, frac_bits=tp.frac_bits, seed=seed
        )
        for tp in plan.tensors
    }
    value = intervals.released_mean(
        centered_sum=centered_sum, count=count, lower=spec.lower, upper=spec.upper
    )
    interval = intervals.mean_interval(
        centered_sum=centered_sum,
        count=count,
        sum_tail=laws["centered_sum"].tail,
        count_tail=laws["count"].tail,
        lower=spec.lower,
        upper=spec.upper,
    )
    std = intervals.simulated_mean_std(
        mean=value,
        count=count,
        sum_noise=laws["centered_sum"],
        count_noise=laws["count"],
        lower=spec.lower,
        upper=spec.upper,
        rng=rng,
    )
    return value, std, interval
