"""What a DP SQL query releases: one tensor per aggregate part, its sensitivity at the level of
a privacy unit, the party's local vector from its engine's cells, and the answer read back.

The typed query (mpcdp.sql.typed_plan) fixes the cells (the cartesian product of the public keys of
the GROUP BY columns) and the measures each party computes per cell in its own engine
(mpcdp.sql.render). Party and coordinator both build the same :class:`ReleasePlan` from the
query and the spec, so they agree on every noise parameter without sending any.

Adjacency: add or remove one privacy unit (one person) everywhere at once. The engine keeps
at most R = ``max_rows_per_unit`` rows per (unit, cell) and at most G = ``max_groups_per_unit``
cells per unit (one cell without GROUP BY), and one unit appears at no more than P =
``max_parties_per_unit`` parties (the federation's public bound). Without a declared unit a
row is a unit (R = G = 1). Per party and cell, a unit moves a measure by at most R c in real
units, c the measure's per-row bound (1 for counts and bins; max(|lo|, |hi|) for a clamped
sum; (hi - lo) / 2 for a centred sum), so by at most ``ceil(R c 2^f) + 1`` ring units once
each party rounds its cell (for integer counts, R exactly). Over the tensor of one aggregate
(every cell; for quantiles every bin of every cell, where R rows move an L1 and an L2 of at
most R within a cell) the change is a sum over at most P parties of vectors supported on at
most G_eff = min(G, cells) cells:

    L1 = P * G_eff * per-cell,      L2 = P * sqrt(G_eff) * per-cell

(triangle inequality across parties; Cauchy-Schwarz across cells). These are the sensitivities
the mechanisms of mpcdp.protocol.query.plan are calibrated with, so the distributed noise and
its accounting are unchanged from the single-statistic queries.

Budget: the query's epsilon (and delta) split across aggregates by their public weights
(mpcdp.sql.typed_plan.Aggregate.weight, normalised), an AVG's share split again in half between its
centred sum and its count, as the DP mean does. Each part is rounded *down* to a float, so
the parts never spend more than the spec's epsilon; the ledger charges the spec's exact
epsilon for discrete Laplace (basic composition) and the composition of the parts' RDP
curves otherwise.

The answer (:func:`answer`) is post-processing of the released tensors with public
quantities only: counts and sums with their noise std and a 95% interval; an AVG per cell as
the DP mean (mpcdp.dp.intervals); a quantile by inverting the noisy CDF of its public bins
(negative counts floored at 0, linear interpolation inside a bin), its std and 95% interval
by simulating the release from the noise law (a parametric bootstrap seeded by the query id,
public randomness, so the same release always reports the same numbers). The quantile's
interval is approximate: it treats the released histogram as the truth, and the bin width
bounds its resolution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

from mpcdp.config.datasets import ColumnSpec
from mpcdp.config.party_config import DatasetConfig
from mpcdp.dp import events, intervals
from mpcdp.errors import ParameterError, PolicyError
from mpcdp.protocol.catalog import PartyDescription
from mpcdp.protocol.query.plan import (
    ReleasePlan,
    TensorPlan,
    check_sampler_range,
    first_fitting,
    frac_bits_for,
    mechanism_for,
)
from mpcdp.protocol.query.query_result import half_width, release_seed
from mpcdp.protocol.query.query_spec import QuerySpec
from mpcdp.sql.compile import compile_sql
from mpcdp.sql.typed_plan import Aggregate, SqlQuery, TableDecl, digest

__all__ = [
    "CellAnswer",
    "SqlRelease",
    "answer",
    "contribution",
    "fit_frac_bits",
    "invert_histograms",
    "party_release",
    "release_plan",
    "table_decl",
    "tables_from",
]

#: simulated releases behind each quantile's std and interval, and each AVG cell's std
_QUANTILE_DRAWS = 400
_AVG_DRAWS = 1000
#: the interval's level
_LEVEL = 0.95


def _down(x: Fraction) -> float:
    """The largest float <= x (a budget part never rounds up)."""
    f = float(x)
    return math.nextafter(f, -math.inf) if Fraction(f) > x else f


def _shares(q: SqlQuery) -> list[Fraction]:
    """Each aggregate's share of the budget: its weight over the sum of weights, exactly."""
    ws = [Fraction(repr(float(a.weight))) for a in q.aggregates]
    total = sum(ws, Fraction(0))
    if total <= 0 or any(w <= 0 for w in ws):
        raise ParameterError("weights", [a.weight for a in q.aggregates], "must be > 0")
    return [w / total for w in ws]


@dataclass(frozen=True)
class _Part:
    """One released tensor of one aggregate: ``columns`` of the engine's cell matrix."""

    name: str
    aggregate: int
    columns: tuple[int, ...]
    frac_bits: int
    per_row: float  # real units, one row
    share: Fraction  # of the query's budget


def _parts(q: SqlQuery, frac_bits: int) -> list[_Part]:
    measures = q.measures()
    shares = _shares(q)
    out: list[_Part] = []
    for i, agg in enumerate(q.aggregates):
        cols = [j for j, m in enumerate(measures) if m.aggregate == i]
        kinds = {measures[j].kind: j for j in cols}
        if agg.kind == "avg":
            s, c = kinds.get("centered_sum"), kinds.get("values")
            if s is None or c is None:
                raise ParameterError("aggregates", agg.label, "an AVG needs a sum and a count")
            half = shares[i] / 2
            out.append(_Part(f"{i}:sum", i, (s,), frac_bits, measures[s].per_row, half))
            out.append(_Part(f"{i}:count", i, (c,), 0, 1.0, half))
        elif agg.kind == "quantile":
            out.append(_Part(f"{i}:bins", i, tuple(cols), 0, 1.0, shares[i]))
        elif agg.kind == "sum":
            (j,) = cols
            out.append(_Part(f"{i}:sum", i, (j,), frac_bits, measures[j].per_row, shares[i]))
        else:  # count
            (j,) = cols
            out.append(_Part(f"{i}:count", i, (j,), 0, 1.0, shares[i]))
    return out


@dataclass(frozen=True)
class SqlRelease(ReleasePlan):
    """The release plan of a SQL query, with the compiled query and the table declaration it
    was compiled against (what the party's engine runs)."""

    query: SqlQuery | None = field(default=None)
    table: TableDecl | None = field(default=None)


def release_plan(
    spec: QuerySpec, query: SqlQuery, table: TableDecl, *, max_parties_per_unit: int
) -> SqlRelease:
    """The release plan of a SQL query (module docstring): the same for every party and the
    coordinator, given the same spec, query and public table declaration."""
    if max_parties_per_unit < 1:
        raise ParameterError("max_parties_per_unit", max_parties_per_unit, "must be >= 1")
    unit = table.privacy_unit is not None
    r = table.max_rows_per_unit if unit else 1
    cells = query.n_cells
    g = min(table.max_groups_per_unit if unit else 1, cells) if query.group_by else 1
    p = max_parties_per_unit
    eps, delta = (
        events.exact_epsilon(spec.epsilon) if spec.mechanism != "none" else None,
        spec.delta,
    )
    tensors: list[TensorPlan] = []
    for part in _parts(query, spec.frac_bits):
        width = len(part.columns)
        scale = float(1 << part.frac_bits)
        if part.frac_bits == 0 and part.per_row == 1.0:
            per_cell = float(r)  # integer counts: no rounding
        else:
            per_cell = float(math.ceil(r * part.per_row * scale) + 1)
        l1 = p * g * per_cell
        l2 = p * math.sqrt(g) * per_cell
        mech = mechanism_for(
            spec,
            epsilon=_down(eps * part.share) if eps is not None else 0.0,
            delta=float(Fraction(delta) * part.share) if delta else 0.0,
            l1=l1,
            l2=l2,
            dim=cells * width,
        )
        tensor = TensorPlan(
            name=part.name,
            length=cells * width,
            frac_bits=part.frac_bits,
            mechanism=mech,
            max_abs=part.per_row * spec.max_rows,
        )
        check_sampler_range(spec, tensor)  # a share outside its sampler's exact range: refused
        tensors.append(tensor)
    event: events.Event
    if spec.mechanism == "discrete-laplace":
        event = events.PureDp(epsilon=events.exact_epsilon(spec.epsilon))
    else:
        event = events.Composite(parts=tuple(t.mechanism.event() for t in tensors))
    return SqlRelease(spec=spec, tensors=tuple(tensors), event=event, query=query, table=table)


def fit_frac_bits(
    spec: QuerySpec, query: SqlQuery, table: TableDecl, *, max_parties_per_unit: int
) -> int:
    """The planner's fixed point for a SQL query: the fewest fractional bits with which
    rounding adds at most 1% to each clamped sum's per-cell bound (the most any sum needs),
    lowered while the round does not fit the ring (as plan.choose_frac_bits does)."""
    if spec.mechanism == "none":
        need = spec.frac_bits  # no noise to size against: as precise as it fits
    else:
        sums = [m.per_row for m in query.measures() if m.kind in ("sum", "centered_sum")]
        need = max((frac_bits_for(bound=b, rounding=1.0) for b in sums), default=0)
    return first_fitting(
        min(need, spec.frac_bits),
        lambda f: release_plan(
            replace(spec, frac_bits=f), query, table, max_parties_per_unit=max_parties_per_unit
        ),
        what=spec.query_id,
    )


def contribution(
    release: ReleasePlan, query: SqlQuery, cells: NDArray[np.float64]
) -> list[NDArray[np.float64]]:
    """The party's local tensors in plan order, from its engine's cell matrix (cells x
    measures, mpcdp.sql.render.to_matrix). Not yet clamped to max_abs nor encoded."""
    n = query.n_cells
    parts = _parts(query, release.spec.frac_bits)
    if cells.shape != (n, len(query.measures())):
        raise ParameterError("cells", cells.shape, f"expected ({n}, {len(query.measures())})")
    return [np.ascontiguousarray(cells[:, list(p.columns)]).reshape(-1) for p in parts]


@dataclass(frozen=True)
class CellAnswer:
    """One aggregate of one cell as released: the value, its noise std and a 95% interval."""

    value: float
    noise_std: float
    interval95: tuple[float, float]


def answer(
    release: ReleasePlan, query: SqlQuery, tensors: Sequence[NDArray[np.float64]]
) -> list[list[CellAnswer]]:
    """Per cell (in query.cells() order), per aggregate: the released answer (module
    docstring). ``tensors`` are the revealed tensors in plan order, in real units."""
    spec = release.spec
    n, h = len(spec.parties), spec.honest
    seed = release_seed(spec)
    rng = np.random.default_rng(seed)
    cells = query.n_cells
    by_name = {t.name: (t, v) for t, v in zip(release.tensors, tensors, strict=True)}
    out: list[list[CellAnswer]] = [[] for _ in range(cells)]
    for i, agg in enumerate(query.aggregates):
        if agg.kind == "avg":
            sum_plan, sums = by_name[f"{i}:sum"]
            cnt_plan, counts = by_name[f"{i}:count"]
            sum_law = intervals.noise_law(
                sum_plan.mechanism, n_parties=n, honest=h, frac_bits=sum_plan.frac_bits, seed=seed
            )
            cnt_law = intervals.noise_law(
                cnt_plan.mechanism, n_parties=n, honest=h, frac_bits=0, seed=seed
            )
            lo, hi = _bounds(query, agg)
            means = np.array(
                [
                    intervals.released_mean(
                        centered_sum=float(sums[c]), count=float(counts[c]), lower=lo, upper=hi
                    )
                    for c in range(cells)
                ]
            )
            stds = intervals.simulated_mean_stds(
                means=means,
                counts=np.asarray(counts, dtype=np.float64),
                sum_noise=sum_law,
                count_noise=cnt_law,
                lower=lo,
                upper=hi,
                rng=rng,
                draws=_AVG_DRAWS,
            )
            for c in range(cells):
                interval = intervals.mean_interval(
                    centered_sum=float(sums[c]),
                    count=float(counts[c]),
                    sum_tail=sum_law.tail,
                    count_tail=cnt_law.tail,
                    lower=lo,
                    upper=hi,
                )
                out[c].append(
                    CellAnswer(value=float(means[c]), noise_std=float(stds[c]), interval95=interval)
                )
        elif agg.kind == "quantile":
            plan_, hist = by_name[f"{i}:bins"]
            law = intervals.noise_law(
                plan_.mechanism, n_parties=n, honest=h, frac_bits=0, seed=seed
            )
            edges = np.asarray(agg.edges, dtype=np.float64)
            bins = len(edges) - 1
            p = float(agg.p if agg.p is not None else 0.5)
            released = np.asarray(hist, dtype=np.float64).reshape(cells, bins)
            values = invert_histograms(released, edges, p)
            # every cell's noise has the same law: one block of simulated noise serves each
            # cell's own simulation (its marginal law is exact; cells are not combined)
            noise = law.sample(rng, _QUANTILE_DRAWS * bins).reshape(_QUANTILE_DRAWS, bins)
            for c in range(cells):
                draws = invert_histograms(released[c][None, :] + noise, edges, p)
                lo_q, hi_q = np.quantile(draws, [(1 - _LEVEL) / 2, 1 - (1 - _LEVEL) / 2])
                v = float(values[c])
                out[c].append(
                    CellAnswer(
                        value=v,
                        noise_std=float(np.std(draws)),
                        interval95=(float(min(lo_q, v)), float(max(hi_q, v))),
                    )
                )
        else:
            plan_, values = by_name[f"{i}:{'sum' if agg.kind == 'sum' else 'count'}"]
            std = plan_.noise_std(n_parties=n, honest=h)
            half = half_width(std, spec.mechanism)
            for c in range(cells):
                v = float(values[c])
                out[c].append(CellAnswer(value=v, noise_std=std, interval95=(v - half, v + half)))
    return out


def _bounds(query: SqlQuery, agg: Aggregate) -> tuple[float, float]:
    for m in query.measures():
        if query.aggregates[m.aggregate] is agg and m.kind == "centered_sum":
            return m.lower, m.upper
    raise ParameterError("aggregates", agg.label, "has no clamp bounds")


def invert_histograms(
    counts: NDArray[np.float64], edges: NDArray[np.float64], p: float
) -> NDArray[np.float64]:
    """The p-quantile of each row of noisy histograms (rows x bins): negative counts floored
    at 0, the first bin where the cumulative count reaches p of the total, linear inside
    it; the middle of the range for a row with nothing left."""
    c = np.maximum(np.atleast_2d(np.asarray(counts, dtype=np.float64)), 0.0)
    total = c.sum(axis=1)
    target = p * total
    cum = np.cumsum(c, axis=1)
    j = np.minimum(np.argmax(cum >= target[:, None], axis=1), c.shape[1] - 1)
    rows = np.arange(c.shape[0])
    before = np.where(j > 0, cum[rows, np.maximum(j - 1, 0)], 0.0)
    inside = c[rows, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(inside > 0, np.clip((target - before) / inside, 0.0, 1.0), 0.0)
    value = edges[j] + frac * (edges[j + 1] - edges[j])
    middle = (edges[0] + edges[-1]) / 2
    out: NDArray[np.float64] = np.where(total > 0, value, middle)
    return out


def table_decl(cfg: DatasetConfig) -> TableDecl:
    """A party's own declaration of a table, as its SQL compiler sees it."""
    return TableDecl(
        name=cfg.name,
        columns=cfg.columns,
        privacy_unit=cfg.privacy_unit,
        max_rows_per_unit=cfg.max_rows_per_unit,
        max_groups_per_unit=cfg.max_groups_per_unit,
    )


def party_release(spec: QuerySpec, cfg: DatasetConfig) -> SqlRelease:
    """The party's own plan of a SQL spec: compiled from the spec's *text* against this
    party's declaration of the table, refused (PolicyError, before any charge) unless it is
    the plan the coordinator proposed (same digest), the privacy-unit bounds are this party's
    own, and the spec's P is at least the least this party accepts."""
    decl = table_decl(cfg)
    unit_r = decl.max_rows_per_unit if decl.privacy_unit else 1
    unit_g = decl.max_groups_per_unit if decl.privacy_unit else 1
    for name, asked, own in (
        ("max_rows_per_unit", spec.max_rows_per_unit, unit_r),
        ("max_groups_per_unit", spec.max_groups_per_unit, unit_g),
    ):
        if asked != own:
            raise PolicyError(
                f"{name}={asked} differs from this party's declaration ({own}) of dataset "
                f"{cfg.name!r}"
            )
    if spec.max_parties_per_unit < cfg.max_parties_per_unit:
        raise PolicyError(
            f"max_parties_per_unit={spec.max_parties_per_unit} is below "
            f"{cfg.max_parties_per_unit}, the least this party accepts for dataset {cfg.name!r}"
        )
    query = compile_sql(
        spec.sql,
        tables={cfg.name: decl},
        keys={c: v for c, v in spec.keys} or None,
        bins=spec.bins or None,
        weights=spec.weights or None,
    )
    if query.table != spec.dataset:
        raise PolicyError(f"the query reads table {query.table!r}, the spec names {spec.dataset!r}")
    if digest(query).hex() != spec.plan_digest:
        raise PolicyError(
            "the plan this party compiled from the query text and its own declaration differs "
            "from the plan the coordinator proposed (plan_digest)"
        )
    return release_plan(spec, query, decl, max_parties_per_unit=spec.max_parties_per_unit)


def tables_from(
    descriptions: Iterable[PartyDescription],
) -> tuple[dict[str, TableDecl], dict[str, list[TableDecl]]]:
    """The tables the parties declare, as the analyst's SQL compiler sees them (public
    metadata from their Describe answers): name -> declaration where every party that offers
    the table declares the same, and name -> the differing declarations where they do not
    (the first of them is in the tables too, so that a query naming it compiles and can be
    refused by name; a disagreement on another table does not stop the query)."""
    seen: dict[str, list[TableDecl]] = {}
    for resp in descriptions:
        for ds in resp.datasets:
            if ds.kind != "table":
                continue
            decl = TableDecl(
                name=ds.name,
                columns=tuple(
                    ColumnSpec(
                        name=c.name,
                        lower=c.lower,
                        upper=c.upper,
                        categories=tuple(c.categories),
                        edges=tuple(c.edges),
                    )
                    for c in ds.columns
                ),
                privacy_unit=ds.privacy_unit or None,
                max_rows_per_unit=ds.max_rows_per_unit,
                max_groups_per_unit=ds.max_groups_per_unit,
            )
            known = seen.setdefault(ds.name, [])
            if decl not in known:
                known.append(decl)
    tables = {name: decls[0] for name, decls in seen.items()}
    disagree = {name: decls for name, decls in seen.items() if len(decls) > 1}
    return tables, disagree
