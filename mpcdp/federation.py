"""The analyst's API: ask a federation of party nodes for a DP statistic.

    fed = Federation.from_config("federation.toml")
    res = fed.mean(dataset="raises", column="raise", epsilon=1.0)
    res.value, res.noise_std, res.interval95, res.epsilon_spent, res.budget_remaining

Bounds and categories are public: when not given, they are read from the parties' Describe
answers, and all parties must declare the same. Each call is one round with a fresh query id
and session. When parties fail (unreachable, stopped, past the deadline, or refusing for a
reason of their own), the query is re-run without them as long as federation.toml's
``min_parties`` remain and h' = n' - t >= 1 (mpcdp.protocol.query.round_coordinator.run_query;
docs/queries.md, "When a party fails"); the result's ``parties`` are those that contributed
and ``dropped`` says who was left out and why. A query that cannot be answered raises
:class:`~mpcdp.errors.RoundAborted` and reveals nothing.

``warm_queries=True`` (off by default) runs a query in one round trip when the parties have
pre-published keys for this federation (fetched in the background after a query): the
Propose round trip and the liveness check are gone, at the price that a party that refuses
or fails in such a round leaves the others' charges standing (docs/queries.md, "Warm queries
in one round trip").
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpcdp.config.federation_config import FederationConfig, load_federation_config
from mpcdp.errors import ParameterError, PartyError, valid_names
from mpcdp.protocol.catalog import ColumnInfo, DatasetInfo, PartyDescription
from mpcdp.protocol.query.plan import ReleasePlan, fit
from mpcdp.protocol.query.query_result import (
    QueryResult,
    failed_rounds,
    query_result,
)
from mpcdp.protocol.query.query_spec import (
    DEFAULT_FRAC_BITS,
    DEFAULT_MAX_ROWS,
    QuerySpec,
    Statistic,
)
from mpcdp.protocol.query.round_coordinator import (
    FAILURES,
    Observer,
    WarmKeys,
    check_roster,
    run_query,
)
from mpcdp.transport import tls
from mpcdp.transport.client import GrpcPartyClient

if TYPE_CHECKING:
    from mpcdp.sql.result import SqlResult
    from mpcdp.train.federated import TrainingResult

__all__ = ["Federation", "QueryResult"]

DEFAULT_DELTA = 1e-6


class Federation:
    """The parties of one federation, reached over mTLS gRPC."""

    def __init__(self, config: FederationConfig, *, warm_queries: bool = False) -> None:
        """``warm_queries``: answer queries in one round trip on pre-published keys when
        the parties have given some (module docstring)."""
        if not isinstance(warm_queries, bool):
            raise ParameterError("warm_queries", warm_queries, "must be True or False")
        self.config = config
        self._prekeys = WarmKeys() if warm_queries else None
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
    def from_config(cls, path: str | Path, *, warm_queries: bool = False) -> Federation:
        return cls(load_federation_config(path), warm_queries=warm_queries)

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

    def describe_each(self) -> tuple[dict[str, PartyDescription], dict[str, PartyError]]:
        """Every party's Describe answer, in parallel, and the parties that failed it with a
        party failure (round_coordinator.FAILURES: unreachable, stopped, busy), each with
        its error; any other failure is raised."""

        def one(c: GrpcPartyClient) -> PartyDescription | PartyError:
            try:
                return c.describe()
            except PartyError as exc:
                if FAILURES.get(exc.code) != "party":
                    raise
                return exc

        answers: dict[str, PartyDescription] = {}
        failed: dict[str, PartyError] = {}
        for party, got in zip(self.parties, self._pool.map(one, self._clients), strict=True):
            if isinstance(got, PartyError):
                failed[party] = got
            else:
                answers[party] = got
        return answers, failed

    def _live(self, query_id: str) -> tuple[dict[str, PartyDescription], dict[str, PartyError]]:
        """:meth:`describe_each`, for query ``query_id``: the parties that failed are left
        out from its first round; QueryFailed when no party answered."""
        answers, failed = self.describe_each()
        if not answers:
            check_roster(query_id, (), quorum=self.config.quorum, colluders=0, left_out=failed)
        return answers, failed

    def _roster(
        self,
        query_id: str,
        live: Mapping[str, PartyDescription],
        left_out: Mapping[str, PartyError],
        colluders: int,
    ) -> tuple[str, ...]:
        """The parties of a query's first round: those that answered Describe (in
        federation order); raises QueryFailed when they are too few."""
        roster = tuple(p for p in self.parties if p in live)
        check_roster(
            query_id, roster, quorum=self.config.quorum, colluders=colluders, left_out=left_out
        )
        return roster

    def budget_left(self, dataset: str) -> dict[str, float]:
        """What this coordinator may still spend of ``dataset`` at each party (epsilon at
        the dataset's delta): its own share there less what it has charged and holds
        reserved, and at most what the dataset has left (Describe's
        coordinator_remaining_epsilon)."""
        out: dict[str, float] = {}
        for party, resp in self.describe().items():
            ds = next((d for d in resp.datasets if d.name == dataset), None)
            if ds is None:
                raise ParameterError(
                    "dataset",
                    dataset,
                    f"is not a dataset of party {party!r} "
                    f"({valid_names(dataset, (d.name for d in resp.datasets))})",
                )
            out[party] = float(ds.coordinator_remaining_epsilon)
        return out

    def examples(self, dataset: str) -> dict[str, int]:
        """Each site's number of examples of the example dataset ``dataset`` (public)."""
        return self._examples(dataset, self.describe())

    @staticmethod
    def _examples(dataset: str, answers: Mapping[str, PartyDescription]) -> dict[str, int]:
        out: dict[str, int] = {}
        for party, resp in answers.items():
            ds = next((d for d in resp.datasets if d.name == dataset), None)
            if ds is None or ds.kind != "examples":
                offered = (d.name for d in resp.datasets if d.kind == "examples")
                raise ParameterError(
                    "dataset",
                    dataset,
                    f"is not an example dataset of party {party!r} "
                    f"({valid_names(dataset, offered)})",
                )
            out[party] = int(ds.length)
        return out

    def train(self, *, dataset: str, model: str, **options: Any) -> TrainingResult:
        """Federated DP-SGD on every party's example dataset ``dataset`` (needs the
        ``train`` extra). ``options`` are those of :func:`mpcdp.train.federated.train`:
        ``target_epsilon``, ``target_delta``, ``epochs``, ``max_grad_norm``,
        ``batch_size``, ``learning_rate``, ``clipping``, ``bias_only``, ``eval_data``,
        ``public_data``, ``checkpoint``, ``on_step``, ``audit_canaries``, ``audit_kind``,
        ...; ``colluders`` and ``min_parties`` default to the federation's. A site that
        fails or misses ``step_deadline_s`` is left out of that step, which is re-run among
        the others while ``min_parties`` remain; it rejoins when it answers again
        (``rejoin_interval_s``, ``max_pause_s``, ``on_roster_change``: see ``train``)."""
        from mpcdp.train.federated import train

        options.setdefault("colluders", self.config.colluders)
        options.setdefault("min_parties", self.config.quorum)
        answers = self.describe()  # once: every public number below comes from it
        examples = self._examples(dataset, answers)
        if options.get("site_eval_every"):
            options.setdefault("held_out", self._held_out(dataset, answers))
        if options.get("audit_canaries") and options.get("audit_kind") == "black-box":
            # input canaries take the shape and classes every site declares (public)
            shape, classes = self._declared_shape(dataset, answers)
            options.setdefault("feature_shape", shape)
            options.setdefault("num_classes", classes)
        return train(
            clients=self._clients, dataset=dataset, model=model, examples=examples, **options
        )

    @staticmethod
    def _held_out(dataset: str, answers: Mapping[str, PartyDescription]) -> dict[str, int]:
        """Each site's held-out examples of ``dataset`` (Describe, public), before any site
        is asked to train: ParameterError naming ``site_eval_every`` when one has none."""
        counts = {
            party: max([d.held_out for d in resp.datasets if d.name == dataset], default=0)
            for party, resp in answers.items()
        }
        missing = [party for party, n in counts.items() if n == 0]
        if missing:
            raise ParameterError(
                "site_eval_every",
                "set",
                f"sites {missing} declare no held-out split for {dataset!r} (party.toml: "
                "eval_path, or eval_data_paths / eval_data_options); nothing was charged",
            )
        return counts

    @staticmethod
    def _declared_shape(
        dataset: str, answers: Mapping[str, PartyDescription]
    ) -> tuple[tuple[int, ...], int]:
        """The feature shape and number of classes every site declares for the example
        dataset ``dataset`` (public), refused when they differ."""
        shapes = {
            (tuple(d.feature_shape), int(d.num_classes))
            for resp in answers.values()
            for d in resp.datasets
            if d.name == dataset
        }
        if len(shapes) != 1:
            raise ParameterError(
                "dataset", dataset, f"sites declare different shapes/classes: {shapes}"
            )
        return shapes.pop()

    def dry_run(
        self,
        *,
        dataset: str,
        model: str,
        data: tuple[Any, Any] | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> TrainingResult:
        """Try a training configuration without asking any site or spending any budget
        (mpcdp.train.dry_run): the plan of the real run (from the sites' public example
        counts), the same coordinator loop and update, and simulated sites holding ``data``
        (the coordinator's own public examples (x, y)) or, when None, synthetic examples of
        the sites' declared feature shape and classes. ``options`` are ``train``'s."""
        import hashlib

        import numpy as np

        from mpcdp.mpc.rng import csprng
        from mpcdp.train.dry_run import dry_run, synthetic_data

        answers = self.describe()
        examples = self._examples(dataset, answers)
        options.setdefault("colluders", self.config.colluders)
        if data is None:
            shape, classes = self._declared_shape(dataset, answers)
            data = synthetic_data(
                feature_shape=shape,
                num_classes=classes,
                count=max(sum(examples.values()), 2 * classes),
                # a seed makes the whole dry run repeatable, its synthetic data included
                rng=csprng(
                    key=None
                    if seed is None
                    else hashlib.sha256(b"synthetic %d" % seed).digest()[:16]
                ),
            )
            options.setdefault("eval_data", (np.asarray(data[0]), np.asarray(data[1])))
        return dry_run(
            data=data, examples=examples, model=model, dataset=dataset, seed=seed, **options
        )

    def _public(
        self,
        dataset: str,
        column: str,
        answers: Mapping[str, PartyDescription] | None = None,
    ) -> tuple[DatasetInfo, ColumnInfo | None]:
        seen: dict[str, tuple[Any, ...]] = {}
        info: DatasetInfo | None = None
        col: ColumnInfo | None = None
        for party, resp in (self.describe() if answers is None else answers).items():
            ds = next((d for d in resp.datasets if d.name == dataset), None)
            if ds is None:
                raise ParameterError(
                    "dataset",
                    dataset,
                    f"is not offered by party {party!r} "
                    f"({valid_names(dataset, (d.name for d in resp.datasets))})",
                )
            c = next((c for c in ds.columns if c.name == column), None)
            if column and c is None:
                raise ParameterError(
                    "column",
                    column,
                    f"is not a column of {dataset!r} at {party!r} "
                    f"({valid_names(column, (c.name for c in ds.columns))})",
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

    def sql(
        self,
        query: str,
        *,
        epsilon: float | str | None = None,
        mechanism: str = "discrete-laplace",
        delta: float | None = None,
        keys: Mapping[str, Sequence[str]] | None = None,
        bins: int | None = None,
        weights: Sequence[float] | None = None,
        max_parties_per_unit: int | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
        frac_bits: int | None = None,
        colluders: int | None = None,
        query_id: str | None = None,
        observe: Observer | None = None,
    ) -> SqlResult:
        """One DP SQL query (docs/queries.md): every party compiles ``query`` itself against
        its own declaration, runs it where its data lives and contributes every cell.

        Args:
            query: SELECT [group columns,] aggregates FROM table [WHERE ...] [GROUP BY ...].
            epsilon: the budget the query spends at every party (split across aggregates by
                ``weights``, equal by default).
            keys: public key lists of GROUP BY columns (default: their declared categories).
            bins: quantile bins, uniform over a column's bounds (default: its declared edges).
            max_parties_per_unit: how many parties one privacy unit may appear at (default:
                federation.toml's ``max_parties_per_unit``).
        """
        from mpcdp.protocol.query.sql_release import (
            answer,
            fit_frac_bits,
            release_plan,
            tables_from,
        )
        from mpcdp.sql.compile import compile_sql
        from mpcdp.sql.result import SqlCell, SqlResult
        from mpcdp.sql.typed_plan import digest

        if mechanism != "none" and epsilon is None:
            raise ParameterError("epsilon", epsilon, "is required (except with mechanism none)")
        qid = query_id or f"q-{secrets.token_hex(8)}"
        live, left_out = self._live(qid)
        t = self.config.colluders if colluders is None else colluders
        tables, disagree = tables_from(live.values())
        q = compile_sql(query, tables=tables, keys=keys, bins=bins, weights=weights)
        if q.table in disagree:
            raise ParameterError(
                "dataset",
                q.table,
                f"parties declare different public metadata: {disagree[q.table]}",
            )
        decl = tables[q.table]
        info = self._public(q.table, "", live)[0]
        if mechanism in ("skellam", "discrete-gaussian") and delta is None:
            delta = info.delta if info.delta > 0 else DEFAULT_DELTA
        p = (
            self.config.max_parties_per_unit
            if max_parties_per_unit is None
            else max_parties_per_unit
        )
        spec = QuerySpec(
            query_id=qid,
            dataset=q.table,
            statistic=Statistic.SQL,
            mechanism=mechanism,
            epsilon="0" if mechanism == "none" else str(epsilon),
            delta=0.0 if delta is None else delta,
            frac_bits=DEFAULT_FRAC_BITS if frac_bits is None else frac_bits,
            parties=self._roster(qid, live, left_out, t),
            colluders=t,
            max_rows=max_rows,
            sql=query,
            keys=tuple((c, tuple(v)) for c, v in (keys or {}).items()),
            bins=bins or 0,
            weights=tuple(weights or ()),
            max_parties_per_unit=p,
            max_rows_per_unit=decl.max_rows_per_unit if decl.privacy_unit else 1,
            max_groups_per_unit=decl.max_groups_per_unit if decl.privacy_unit else 1,
            plan_digest=digest(q).hex(),
        )

        def prepare(s: QuerySpec) -> tuple[QuerySpec, ReleasePlan]:
            """The spec and plan of a round over ``s.parties`` (re-fitted for the roster)."""
            f = (
                fit_frac_bits(s, q, decl, max_parties_per_unit=p)
                if frac_bits is None
                else frac_bits
            )
            s = replace(s, frac_bits=f)
            release = release_plan(s, q, decl, max_parties_per_unit=p)
            release.check_headroom()
            return s, release

        outcome = run_query(
            spec=spec,
            clients=self._clients,
            min_parties=self.config.quorum,
            prepare=prepare,
            left_out=left_out,
            observe=observe,
            executor=self._pool,
            prekeys=self._prekeys,
        )
        spec, release = outcome.spec, outcome.plan
        released = [outcome.tensors[t.name] for t in release.tensors]
        per_cell = answer(release, q, released)
        return SqlResult(
            sql=query,
            table=q.table,
            group_by=q.group_by,
            labels=tuple(a.label for a in q.aggregates),
            keys=q.cells(),
            cells=tuple(
                tuple(
                    SqlCell(value=c.value, noise_std=c.noise_std, interval95=c.interval95)
                    for c in row
                )
                for row in per_cell
            ),
            mechanism=mechanism,
            epsilon_spent=float(Fraction(spec.epsilon)),
            delta_spent=spec.delta,
            budget_remaining=outcome.budget_remaining,
            parties=spec.parties,
            query_id=spec.query_id,
            dropped=outcome.dropped,
            failed_rounds=failed_rounds(outcome),
        )

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
        qid = query_id or f"q-{secrets.token_hex(8)}"
        live, left_out = self._live(qid)
        t = self.config.colluders if colluders is None else colluders
        info, col = self._public(dataset, column, live)
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
            query_id=qid,
            dataset=dataset,
            column=column,
            statistic=stat,
            mechanism=mechanism,
            epsilon="0" if mechanism == "none" else str(epsilon),
            delta=0.0 if delta is None else delta,
            frac_bits=DEFAULT_FRAC_BITS if frac_bits is None else frac_bits,
            parties=self._roster(qid, live, left_out, t),
            colluders=t,
            lower=0.0 if lower is None else lower,
            upper=0.0 if upper is None else upper,
            categories=tuple(categories or ()) if stat is Statistic.HISTOGRAM else (),
            l2_bound=info.l2_bound if info.kind == "vector" else 0.0,
        )
        length = int(info.length) if info.kind == "vector" else None

        def prepare(s: QuerySpec) -> tuple[QuerySpec, None]:
            """The spec of a round over ``s.parties`` (ring and fixed point fitted to it)."""
            return fit(s, vector_length=length, frac_bits=frac_bits, ring_bits=ring_bits), None

        return query_result(
            run_query(
                spec=spec,
                clients=self._clients,
                min_parties=self.config.quorum,
                prepare=prepare,
                left_out=left_out,
                observe=observe,
                executor=self._pool,
                prekeys=self._prekeys,
            )
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
