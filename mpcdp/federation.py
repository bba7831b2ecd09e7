"""The analyst's API: ask a federation of party nodes for a DP statistic.

    fed = Federation.from_config("federation.toml")
    res = fed.mean(dataset="raises", column="raise", epsilon=1.0)
    res.value, res.noise_std, res.interval95, res.epsilon_spent, res.budget_remaining

Bounds and categories are public: when not given, they are read from the parties' Describe
answers, and all parties must declare the same. Each call is one round with a fresh query id
and session; a failed round raises :class:`~mpcdp.errors.RoundAborted` and reveals nothing.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.config.party_config import FederationConfig, load_federation_config
from mpcdp.dp import intervals
from mpcdp.errors import ParameterError
from mpcdp.protocol.catalog import ColumnInfo, DatasetInfo, PartyDescription
from mpcdp.protocol.query.plan import ReleasePlan, fit
from mpcdp.protocol.query.query_spec import DEFAULT_FRAC_BITS, QuerySpec, Statistic
from mpcdp.protocol.query.round_coordinator import Observer, RoundOutcome, run_round
from mpcdp.transport import tls
from mpcdp.transport.client import GrpcPartyClient

if TYPE_CHECKING:
    from mpcdp.train.federated import TrainingResult

__all__ = ["Federation", "QueryResult"]

_Z95 = 1.959963984540054
DEFAULT_DELTA = 1e-6


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
        }


def _half_width(std: float, mechanism: str) -> float:
    if mechanism == "discrete-laplace":
        return std / math.sqrt(2) * math.log(20)  # Laplace with this std: P(|X| > b ln 20) = 5%
    return _Z95 * std


def _result(outcome: RoundOutcome) -> QueryResult:
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
        half = _half_width(std, spec.mechanism)
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
    )


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
    # the simulations are public post-processing: seeded by the query id, reproducible
    seed = int.from_bytes(hashlib.sha256(spec.query_id.encode()).digest()[:8], "big")
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


class Federation:
    """The parties of one federation, reached over mTLS gRPC."""

    def __init__(self, config: FederationConfig) -> None:
        self.config = config
        self._creds = tls.load_credentials(config.tls)
        self._pool = ThreadPoolExecutor(
            max_workers=len(config.parties), thread_name_prefix="federation"
        )
        self._clients = [
            GrpcPartyClient(
                party_id=p.id, address=p.address, creds=self._creds, deadline_s=config.deadline_s
            )
            for p in config.parties
        ]

    @classmethod
    def from_config(cls, path: str | Path) -> Federation:
        return cls(load_federation_config(path))

    @property
    def parties(self) -> tuple[str, ...]:
        return tuple(c.party_id for c in self._clients)

    @property
    def clients(self) -> tuple[GrpcPartyClient, ...]:
        """One mTLS gRPC client per party, in federation order (for the protocol-level APIs:
        protocol.query.round_coordinator.run_round, protocol.training.TrainingSession,
        train.train)."""
        return tuple(self._clients)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for c in self._clients:
            c.close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, PartyDescription]:
        """Every party's public dataset metadata (bounds, categories, budget left, and this
        coordinator's share and what it may still spend: :meth:`budget_left`)."""
        answers = self._pool.map(lambda c: c.describe(), self._clients)  # in parallel
        return dict(zip(self.parties, answers, strict=True))

    def budget_left(self, dataset: str) -> dict[str, float]:
        """What this coordinator may still spend of ``dataset`` at each party (epsilon at
        the dataset's delta): its own share there less what it has charged and holds
        reserved, and at most what the dataset has left (Describe's
        coordinator_remaining_epsilon)."""
        out: dict[str, float] = {}
        for party, resp in self.describe().items():
            ds = next((d for d in resp.datasets if d.name == dataset), None)
            if ds is None:
                raise ParameterError("dataset", dataset, f"is not a dataset of party {party!r}")
            out[party] = float(ds.coordinator_remaining_epsilon)
        return out

    def examples(self, dataset: str) -> dict[str, int]:
        """Each site's number of examples of the example dataset ``dataset`` (public)."""
        out: dict[str, int] = {}
        for party, resp in self.describe().items():
            ds = next((d for d in resp.datasets if d.name == dataset), None)
            if ds is None or ds.kind != "examples":
                raise ParameterError(
                    "dataset", dataset, f"is not an example dataset of party {party!r}"
                )
            out[party] = int(ds.length)
        return out

    def train(self, *, dataset: str, model: str, **options: Any) -> TrainingResult:
        """Federated DP-SGD on every party's example dataset ``dataset`` (needs the
        ``train`` extra). ``options`` are those of :func:`mpcdp.train.federated.train`:
        ``target_epsilon``, ``target_delta``, ``epochs``, ``max_grad_norm``,
        ``batch_size``, ``learning_rate``, ``clipping``, ``bias_only``, ``eval_data``,
        ``public_data``, ``checkpoint``, ``on_step``, ``audit_canaries``, ``audit_kind``,
        ...; ``colluders`` defaults to the federation's."""
        from mpcdp.train.federated import train

        options.setdefault("colluders", self.config.colluders)
        if options.get("audit_canaries") and options.get("audit_kind") == "black-box":
            # input canaries take the shape and classes every site declares (public)
            shapes = {
                (tuple(d.feature_shape), int(d.num_classes))
                for resp in self.describe().values()
                for d in resp.datasets
                if d.name == dataset
            }
            if len(shapes) != 1:
                raise ParameterError(
                    "dataset", dataset, f"sites declare different shapes/classes: {shapes}"
                )
            shape, classes = shapes.pop()
            options.setdefault("feature_shape", shape)
            options.setdefault("num_classes", classes)
        return train(
            clients=self._clients,
            dataset=dataset,
            model=model,
            examples=self.examples(dataset),
            **options,
        )

    def _public(self, dataset: str, column: str) -> tuple[DatasetInfo, ColumnInfo | None]:
        seen: dict[str, tuple[Any, ...]] = {}
        info: DatasetInfo | None = None
        col: ColumnInfo | None = None
        for party, resp in self.describe().items():
            ds = next((d for d in resp.datasets if d.name == dataset), None)
            if ds is None:
                raise ParameterError("dataset", dataset, f"is not offered by party {party!r}")
            c = next((c for c in ds.columns if c.name == column), None)
            if column and c is None:
                raise ParameterError(
                    "column", column, f"is not a column of {dataset!r} at {party!r}"
                )
            seen[party] = (
                ds.kind,
                ds.l2_bound,
                ds.length,
                (c.lower, c.upper, tuple(c.categories)) if c is not None else None,
            )
            info, col = ds, c
        if len(set(seen.values())) != 1:
            raise ParameterError(
                "dataset", dataset, f"parties declare different public metadata: {seen}"
            )
        assert info is not None
        return info, col

    def query(
        self,
        *,
        statistic: Statistic | str,
        dataset: str,
        column: str = "",
        epsilon: float | str = 1.0,
        mechanism: str = "discrete-laplace",
        delta: float | None = None,
        frac_bits: int | None = None,
        ring_bits: int | None = None,
        lower: float | None = None,
        upper: float | None = None,
        categories: Sequence[str] | None = None,
        colluders: int | None = None,
        query_id: str | None = None,
        observe: Observer | None = None,
    ) -> QueryResult:
        """One round of any statistic; the named methods below are the usual entry points."""
        stat = Statistic(statistic)
        info, col = self._public(dataset, column)
        if col is not None:
            lower = col.lower if lower is None else lower
            upper = col.upper if upper is None else upper
            categories = tuple(col.categories) if categories is None else categories
            if stat is Statistic.HISTOGRAM and not categories:
                raise ParameterError(
                    "column",
                    column,
                    f"is numeric (bounds [{col.lower:g}, {col.upper:g}]), not categorical: a "
                    "histogram needs a column the parties declare with categories = [...]",
                )
        if mechanism in ("skellam", "discrete-gaussian") and delta is None:
            delta = info.delta if info.delta > 0 else DEFAULT_DELTA
        spec = QuerySpec(
            query_id=query_id or f"q-{secrets.token_hex(8)}",
            dataset=dataset,
            column=column,
            statistic=stat,
            mechanism=mechanism,
            epsilon="0" if mechanism == "none" else str(epsilon),
            delta=0.0 if delta is None else delta,
            frac_bits=DEFAULT_FRAC_BITS if frac_bits is None else frac_bits,
            parties=self.parties,
            colluders=self.config.colluders if colluders is None else colluders,
            lower=0.0 if lower is None else lower,
            upper=0.0 if upper is None else upper,
            categories=tuple(categories or ()) if stat is Statistic.HISTOGRAM else (),
            l2_bound=info.l2_bound if info.kind == "vector" else 0.0,
        )
        length = int(info.length) if info.kind == "vector" else None
        spec = fit(spec, vector_length=length, frac_bits=frac_bits, ring_bits=ring_bits)
        return _result(
            run_round(spec=spec, clients=self._clients, observe=observe, executor=self._pool)
        )

    def sum(
        self,
        *,
        dataset: str,
        column: str = "",
        epsilon: float | str = 1.0,
        mechanism: str = "discrete-laplace",
        **kw: Any,
    ) -> QueryResult:
        return self.query(
            statistic=Statistic.SUM,
            dataset=dataset,
            column=column,
            epsilon=epsilon,
            mechanism=mechanism,
            **kw,
        )

    def mean(
        self,
        *,
        dataset: str,
        column: str,
        epsilon: float | str = 1.0,
        mechanism: str = "discrete-laplace",
        **kw: Any,
    ) -> QueryResult:
        return self.query(
            statistic=Statistic.MEAN,
            dataset=dataset,
            column=column,
            epsilon=epsilon,
            mechanism=mechanism,
            **kw,
        )

    def count(
        self,
        *,
        dataset: str,
        epsilon: float | str = 1.0,
        mechanism: str = "discrete-laplace",
        **kw: Any,
    ) -> QueryResult:
        return self.query(
            statistic=Statistic.COUNT, dataset=dataset, epsilon=epsilon, mechanism=mechanism, **kw
        )

    def histogram(
        self,
        *,
        dataset: str,
        column: str,
        epsilon: float | str = 1.0,
        mechanism: str = "discrete-laplace",
        **kw: Any,
    ) -> QueryResult:
        return self.query(
            statistic=Statistic.HISTOGRAM,
            dataset=dataset,
            column=column,
            epsilon=epsilon,
            mechanism=mechanism,
            **kw,
        )
