"""The four engineers' average raise (docs/salary_example.md), exact and with DP.

Alice, Bob, Carlos and David (raises 3800, 2514, 2982, 3390) want their average raise
(3171.5) without anyone learning another's raise.

- :func:`run_networked` (``mpcdp demo salary``): four party-node processes on loopback with
  real certificates and mTLS gRPC, an analyst asking for the exact MPC mean (mechanism none)
  and a DP mean; it shows what the coordinator receives (masked words only), the results, the
  error and every party's budget.
- :func:`run` (``mpcdp demo salary --local``): the same cryptography in one process, which can
  also print the seeded share table (in the networked run nobody can: that is the point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpcdp.dp.ledger import BudgetLedger, BudgetStatus
from mpcdp.dp.mechanisms import NoNoise
from mpcdp.local.simulation import simulate_sum
from mpcdp.mpc import encoding, sharing
from mpcdp.protocol.query.plan import fit, plan
from mpcdp.protocol.query.query_result import QueryResult, mean_release
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic

__all__ = [
    "NAMES",
    "RAISES",
    "NetworkReport",
    "SalaryReport",
    "network_json",
    "render",
    "render_networked",
    "report_json",
    "run",
    "run_networked",
    "summary_json",
]

NAMES = ("Alice", "Bob", "Carlos", "David")
RAISES = (3800, 2514, 2982, 3390)
DATASET = "raises"
FRAC_BITS = 8
BUDGET_EPSILON = 2.0
#: Public bound on one raise: the DP mean must hide any raise in [0, DEFAULT_BOUND].
DEFAULT_BOUND = 5_000.0


@dataclass(frozen=True)
class SalaryReport:
    textbook_shares: tuple[tuple[int, ...], ...]
    seeded_table: tuple[tuple[int, ...], ...]
    uploads_hex: tuple[str, ...]
    exact_mean: float
    true_mean: float
    epsilon: float
    bound: float
    #: the DP mean as the networked demo releases it (the same plan, noise and result)
    dp: QueryResult
    budgets: tuple[BudgetStatus, ...]


def run(*, workdir: Path, epsilon: float = 1.0, bound: float = DEFAULT_BOUND) -> SalaryReport:
    """Run the demo; ledgers are created in ``workdir``."""
    n = len(NAMES)
    inputs = [np.array([float(r)]) for r in RAISES]
    textbook = sharing.split(encoding.encode_int(np.array(RAISES, dtype=np.int64)), n=n)
    # each party's ledger, created on purpose for this run (refused if one is there)
    ledgers = [BudgetLedger.create(workdir / f"{name.lower()}.sqlite") for name in NAMES]
    try:
        for ledger in ledgers:
            ledger.set_budget(DATASET, epsilon=BUDGET_EPSILON, delta=1e-6)
        exact = simulate_sum(
            inputs,
            bound=bound,
            frac_bits=FRAC_BITS,
            mechanism=NoNoise(),
            ledgers=ledgers,
            dataset=DATASET,
            query_id="salary-exact-mean",
        )
        table = sharing.share_table(list(RAISES), pair_keys=exact.pair_keys)
        dp = _local_dp_mean(ledgers=ledgers, epsilon=epsilon, bound=bound)
        budgets = tuple(ledger.status(DATASET) for ledger in ledgers)
    finally:
        for ledger in ledgers:
            ledger.close()
    return SalaryReport(
        textbook_shares=tuple(tuple(int(v) for v in row) for row in textbook.T.view(np.int64)),
        seeded_table=tuple(tuple(int(v) for v in row) for row in table),
        uploads_hex=tuple(u.tobytes().hex() for u in exact.uploads),
        exact_mean=float(exact.value[0]) / n,
        true_mean=sum(RAISES) / n,
        epsilon=epsilon,
        bound=bound,
        dp=dp,
        budgets=budgets,
    )


def _local_dp_mean(*, ledgers: list[BudgetLedger], epsilon: float, bound: float) -> QueryResult:
    """The DP mean as a federation releases it (protocol/query/plan.py: a centred sum and a count,
    each with half the budget, distributed discrete Laplace), all four parties in this
    process: one charge per party for the query, one secure sum per tensor."""
    parties = tuple(name.lower() for name in NAMES)
    spec = fit(
        QuerySpec(
            query_id="salary-dp-mean",
            dataset=DATASET,
            statistic=Statistic.MEAN,
            mechanism="discrete-laplace",
            epsilon=str(epsilon),
            parties=parties,
            column="raise",
            lower=0.0,
            upper=bound,
        ),
        vector_length=None,
        frac_bits=None,
        ring_bits=None,
    )
    release = plan(spec)
    for ledger in ledgers:
        ledger.charge(dataset=DATASET, query_id=spec.query_id, event=release.event)
    mid = (spec.lower + spec.upper) / 2
    local = {
        "centered_sum": [np.array([float(r) - mid]) for r in RAISES],
        "count": [np.array([1.0]) for _ in RAISES],
    }
    revealed = {}
    for tp in release.tensors:
        revealed[tp.name] = float(
            simulate_sum(
                local[tp.name], bound=tp.max_abs, frac_bits=tp.frac_bits, mechanism=tp.mechanism
            ).value[0]
        )
    value, std, interval = mean_release(
        spec=spec, plan=release, centered_sum=revealed["centered_sum"], count=revealed["count"]
    )
    return QueryResult(
        statistic=spec.statistic.value,
        dataset=DATASET,
        column=spec.column,
        value=value,
        noise_std=std,
        interval95=interval,
        mechanism=spec.mechanism,
        epsilon_spent=epsilon,
        delta_spent=0.0,
        budget_remaining={
            p: ledger.status(DATASET).remaining_epsilon
            for p, ledger in zip(parties, ledgers, strict=True)
        },
        parties=parties,
        query_id=spec.query_id,
    )


def _dp_lines(dp: QueryResult, true_mean: float) -> list[str]:
    """The DP mean as both variants print it."""
    lo, hi = dp.interval95 or (math.nan, math.nan)
    value = float(dp.value)  # type: ignore[arg-type]  # a mean is a float
    return [
        f"   {value:.2f}  error {value - true_mean:+.2f}  noise std {dp.noise_std:.1f}"
        f"  95% interval [{lo:.1f}, {hi:.1f}]",
        "   (the std and the interval are those of the released mean, noisy count and the",
        "   public bounds included; the interval covers the true mean in at least 95% of runs)",
    ]


def summary_json(
    *, exact_mean: float, true_mean: float, dp: QueryResult, observed: dict[str, str]
) -> dict[str, Any]:
    """One JSON object, the same for ``--local`` and the networked run."""
    return {
        "exact_mean": exact_mean,
        "true_mean": true_mean,
        "dp": dp.to_json(),
        "observed_words": observed,
        "budget_remaining": dp.budget_remaining,
    }


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows
    )


def render(report: SalaryReport) -> str:
    """Human-readable report."""
    n = len(NAMES)
    head = ["", *(f"to {name}" for name in NAMES), "raise"]
    textbook = [head] + [
        [name, *(str(v) for v in report.textbook_shares[i]), str(RAISES[i])]
        for i, name in enumerate(NAMES)
    ]
    seeded = [head] + [
        [
            name,
            *(str(v) if j <= i else "-" for j, v in enumerate(report.seeded_table[i])),
            str(RAISES[i]),
        ]
        for i, name in enumerate(NAMES)
    ]
    budgets = [["party", "spent", "left", "queries", "exact releases"]] + [
        [
            name,
            f"{b.spent_epsilon:g}",
            f"{b.remaining_epsilon:g}",
            str(b.queries),
            str(b.exact_releases),
        ]
        for name, b in zip(NAMES, report.budgets, strict=True)
    ]
    lines = [
        "mpcdp salary demo: four engineers, one average, nobody's raise revealed",
        "",
        "1. Textbook additive sharing in Z_2^64: each raise split into four random shares",
        "   (shown as signed 64-bit integers); any three of a row look uniformly random.",
        _table(textbook),
        "",
        "2. Seeded sharing (what mpcdp sends): each pair agrees on an X25519 key and expands the",
        "   share one gives the other from AES-CTR; row = whose raise, column = who holds it.",
        _table(seeded),
        "",
        "   Each party uploads one masked word (indistinguishable from uniform):",
        *(f"   {name:>7}: {h}" for name, h in zip(NAMES, report.uploads_hex, strict=True)),
        "",
        f"3. Exact MPC mean (mechanism none): {report.exact_mean:.2f}"
        f"  (true mean {report.true_mean:.2f}; exact, so NOT differentially private)",
        "",
        f"4. DP mean at epsilon={report.epsilon:g} (distributed discrete Laplace, raises bounded "
        f"by {report.bound:g}; noise shares sized for {n - 1} honest of {n}):",
        *_dp_lines(report.dp, report.true_mean),
        "   With four people the noise must hide any one raise of up to the bound, so it is of",
        "   that order: DP pays off with many contributors (and exact MPC reveals the rest).",
        "",
        "5. Budget ledgers (each party enforces its own; budget "
        f"epsilon={BUDGET_EPSILON:g} per dataset):",
        _table(budgets),
    ]
    return "\n".join(lines)


def report_json(report: SalaryReport) -> dict[str, Any]:
    """The local report as one JSON-ready object (the networked run's schema)."""
    return summary_json(
        exact_mean=report.exact_mean,
        true_mean=report.true_mean,
        dp=report.dp,
        observed={name.lower(): h[:16] for name, h in zip(NAMES, report.uploads_hex, strict=True)},
    )


def network_json(report: NetworkReport) -> dict[str, Any]:
    """The networked report as one JSON-ready object."""
    return summary_json(
        exact_mean=float(report.exact.value),  # type: ignore[arg-type]  # a mean is a float
        true_mean=report.true_mean,
        dp=report.dp,
        observed=report.observed,
    )


# ------------------------------------------------------------------------------ networked


@dataclass(frozen=True)
class NetworkReport:
    textbook_shares: tuple[tuple[int, ...], ...]
    ports: dict[str, int]
    observed: dict[str, str]  # first masked word the coordinator received from each party
    exact: QueryResult
    dp: QueryResult
    true_mean: float


def _party_datasets(workdir: Path, bound: float) -> dict[str, str]:
    out = {}
    for name, raise_ in zip(NAMES, RAISES, strict=True):
        pid = name.lower()
        (workdir / pid).mkdir(parents=True, exist_ok=True)
        (workdir / pid / "raises.csv").write_text(f"raise\n{raise_}\n")
        out[pid] = (
            f"[datasets.{DATASET}]\n"
            'path = "raises.csv"\n'
            f"epsilon = {BUDGET_EPSILON}\n"
            "delta = 1e-6\n"
            "allow_exact = true\n"
            f"[datasets.{DATASET}.columns.raise]\n"
            "lower = 0\n"
            f"upper = {bound}\n"
        )
    return out


def run_networked(
    *, workdir: Path, epsilon: float = 1.0, bound: float = DEFAULT_BOUND
) -> NetworkReport:
    """Start four party processes in ``workdir``, run both queries, stop the processes."""
    from mpcdp.federation import Federation
    from mpcdp.local.localnet import launch

    textbook = sharing.split(encoding.encode_int(np.array(RAISES, dtype=np.int64)), n=len(NAMES))
    observed: dict[str, str] = {}

    def observe(party: str, chunk: np.ndarray) -> None:
        observed.setdefault(party, chunk[:1].tobytes().hex())

    with launch(workdir=workdir, datasets_toml=_party_datasets(workdir, bound)) as net:
        with Federation.from_config(net.federation_config) as fed:
            exact = fed.mean(dataset=DATASET, column="raise", mechanism="none", observe=observe)
            dp = fed.mean(dataset=DATASET, column="raise", epsilon=epsilon)
        ports = dict(net.ports)
    return NetworkReport(
        textbook_shares=tuple(tuple(int(v) for v in row) for row in textbook.T.view(np.int64)),
        ports=ports,
        observed=observed,
        exact=exact,
        dp=dp,
        true_mean=sum(RAISES) / len(RAISES),
    )


def render_networked(report: NetworkReport) -> str:
    head = ["", *(f"to {name}" for name in NAMES), "raise"]
    textbook = [head] + [
        [name, *(str(v) for v in report.textbook_shares[i]), str(RAISES[i])]
        for i, name in enumerate(NAMES)
    ]
    budgets = [["party", "port", "budget left"]] + [
        [p, str(report.ports[p]), f"{left:g}"] for p, left in report.dp.budget_remaining.items()
    ]
    return "\n".join(
        [
            "mpcdp salary demo: four party nodes (separate processes, mTLS gRPC on loopback)",
            "",
            "1. Textbook additive sharing in Z_2^64 (the article's table with real random shares):",
            _table(textbook),
            "",
            "2. What mpcdp sends instead: each pair of parties agrees on a signed X25519 key, and",
            "   each party uploads its raise plus AES-CTR pairwise masks. The coordinator received",
            "   these masked words (uniformly random on their own):",
            *(f"   {p:>7}: {report.observed[p]}" for p in (n.lower() for n in NAMES)),
            "",
            f"3. Exact MPC mean (mechanism none): {report.exact.value:.2f}"
            f"  (true mean {report.true_mean:.2f}; exact, so NOT differentially private)",
            "",
            f"4. DP mean at epsilon={report.dp.epsilon_spent:g} (distributed discrete Laplace,"
            f" shares sized for {len(NAMES) - 1} honest of {len(NAMES)}):",
            *_dp_lines(report.dp, report.true_mean),
            "   With four people the noise must hide any one raise up to the public bound, so it",
            "   is of that order: DP pays off with many contributors.",
            "",
            f"5. Budgets (each party's own SQLite ledger; budget epsilon={BUDGET_EPSILON:g}):",
            _table(budgets),
        ]
    )
