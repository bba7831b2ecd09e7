"""DP SQL utility: the relative error per cell of COUNT, AVG and MEDIAN by department as mpcdp
releases them (three real party processes), against a trusted curator's Laplace mechanism.

Run:  python -m benchmarks.sql_utility [--rows 1000000] [--reps 10] [--epsilon 1]
                                       [--tmp /tmp] [--json out.json]

The table (written by DuckDB from range(), no randomness: hashes of the row number): three
hospitals, --rows visits each, (patient, dept, cost). Every patient has 3 visits at each
hospital that treats them, in one department or (a quarter of them) two; 20% of a hospital's
patients are also patients of exactly one other hospital (same id, same departments). Five
departments of unequal size (40/25/20/10/5%); cost log-normal (median about 670, a
department factor 0.8-1.4), declared in [0, 10000] with 121 quantile edges (0, then 120
geometric from 10 to 10000). Each party declares

    privacy_unit = "patient", max_rows_per_unit = 3, max_groups_per_unit = 2,
    max_parties_per_unit = 2

the least bounds that never drop a row of this table (R = 3 visits per patient and
department, G = 2 departments per patient, P = 2 hospitals per patient), so the errors below
are the noise's alone (the exact release, mechanism none, is checked against the truth).

The query, at epsilon 1 (one third per aggregate, AVG's third halved between its sum and
its count), discrete Laplace:

    SELECT dept, COUNT(*), AVG(cost), MEDIAN(cost) FROM visits GROUP BY dept

(a) mpcdp: Federation.sql --reps times (a fresh query each: fresh noise); per cell the
    median over the repetitions of |released - true| / |true|, and the median width of the
    95% interval the release reports, over |true|. "true" is the plain SQL answer over the
    union of the three tables.
(b) a trusted curator holding the union, answering the same query with the same unit-level
    bounds and budget split: Laplace noise of scale b = Delta / epsilon_part, Delta the
    plan's L1 sensitivity (P * G * R * per-row change: R for a count or a histogram, R (hi -
    lo) / 2 for AVG's centred sum). COUNT: median |error| = b ln 2, 95% interval 2 b ln 20
    (closed form). AVG = mid + (S + Lap(b_s)) / (N + Lap(b_c)), clamped to the bounds; MEDIAN
    = the same CDF inversion of the true histogram plus Lap(b) per bin: both read off
    --draws simulated releases (no closed form), the interval as the central 95% of the
    simulated errors. "curator, no P": the same with Delta / P (a curator sees a patient's
    rows at both hospitals as one unit).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

PARTIES = ("alice", "bob", "carlos")
DEPTS = ("cardio", "onco", "ortho", "neuro", "derm")
R, G, P = 3, 2, 2
LOWER, UPPER = 0.0, 10000.0
EDGES = (0.0, *(float(round(x, 6)) for x in np.geomspace(10.0, UPPER, 120)))
QUERY = (
    "SELECT dept, COUNT(*) AS n, AVG(cost) AS avg_cost, MEDIAN(cost) AS median_cost "
    "FROM visits GROUP BY dept"
)
LABELS = ("COUNT", "AVG", "MEDIAN")


def write_hospital(path: Path, *, party: int, rows: int) -> None:
    """One hospital's visits (module docstring): row i is visit i % 3 of unit i // 3; a unit
    with u % 10 == 0 is shared with the next hospital, u % 10 == 1 with the previous one
    (the same id there), the others are this hospital's own patients."""
    import duckdb

    n = 3
    j, nxt, prv = party, (party + 1) % n, (party + 2) % n
    ahead, behind = f"s-{min(j, nxt)}-{max(j, nxt)}-", f"s-{min(j, prv)}-{max(j, prv)}-"
    pid = (
        f"CASE WHEN u % 10 = 0 THEN '{ahead}' || u // 10 "
        f"WHEN u % 10 = 1 THEN '{behind}' || u // 10 ELSE 'p{j}-' || u END"
    )
    dept = (
        "CASE WHEN h % 100 < 40 THEN 'cardio' WHEN h % 100 < 65 THEN 'onco' "
        "WHEN h % 100 < 85 THEN 'ortho' WHEN h % 100 < 95 THEN 'neuro' ELSE 'derm' END"
    )
    factor = (
        "CASE d WHEN 'cardio' THEN 1.4 WHEN 'onco' THEN 1.2 WHEN 'ortho' THEN 1.0 "
        "WHEN 'neuro' THEN 0.9 ELSE 0.8 END"
    )
    text = f"""
    COPY (
      WITH units AS (
        SELECT i, i // 3 AS u, i % 3 AS r FROM range({rows}) t(i)
      ), ids AS (
        SELECT i, r, {pid} AS patient FROM units
      ), hashed AS (
        SELECT i, r, patient, hash(patient) AS hp,
               (hash(i * 2 + {j * 7919}) % 999983 + 0.5) / 999983.0 AS u1,
               (hash(i * 2 + 1 + {j * 7919}) % 999983 + 0.5) / 999983.0 AS u2
        FROM ids
      ), depts AS (
        SELECT i, patient, u1, u2,
               CASE WHEN r = 2 AND hp % 4 = 0 THEN hp // 4 + 17 ELSE hp END AS h
        FROM hashed
      ), labelled AS (
        SELECT i, patient, u1, u2, {dept} AS d FROM depts
      )
      SELECT patient, d AS dept,
             least({UPPER}, round({factor} * exp(6.5 + 0.8 * sqrt(-2 * ln(u1))
                                  * cos(2 * pi() * u2)), 2)) AS cost
      FROM labelled ORDER BY i
    ) TO '{path}' (FORMAT parquet)
    """
    con = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "2GB"})
    try:
        con.execute(text)
    finally:
        con.close()


def _toml() -> str:
    return (
        '[datasets.visits]\npath = "visits.parquet"\nepsilon = 1000.0\nallow_exact = true\n'
        f'privacy_unit = "patient"\nmax_rows_per_unit = {R}\nmax_groups_per_unit = {G}\n'
        f"max_parties_per_unit = {P}\n"
        f"[datasets.visits.columns.dept]\ncategories = {json.dumps(list(DEPTS))}\n"
        f"[datasets.visits.columns.cost]\nlower = {LOWER}\nupper = {UPPER}\n"
        f"edges = {json.dumps(list(EDGES))}\n"
    )


def truth(files: list[Path]) -> dict[str, Any]:
    """Per department: the plain SQL answers over the union, the true histogram over EDGES
    (values clamped to [e_0, e_last], last bin closed), and the table's own maxima of the
    bounds (rows per patient and department at a hospital, departments per patient at a
    hospital, hospitals per patient)."""
    import duckdb

    union = "[" + ", ".join(f"'{f}'" for f in files) + "]"
    con = duckdb.connect(":memory:", config={"threads": 2})
    try:
        rel = f"read_parquet({union}, filename = true)"
        rows = con.execute(
            f"SELECT dept, COUNT(*), AVG(cost), MEDIAN(cost) FROM {rel} GROUP BY dept"
        ).fetchall()
        max_r = con.execute(
            f"SELECT max(c) FROM (SELECT COUNT(*) c FROM {rel} GROUP BY filename, patient, dept)"
        ).fetchone()
        max_g = con.execute(
            f"SELECT max(c) FROM (SELECT COUNT(DISTINCT dept) c FROM {rel} "
            "GROUP BY filename, patient)"
        ).fetchone()
        max_p = con.execute(
            f"SELECT max(c) FROM (SELECT COUNT(DISTINCT filename) c FROM {rel} GROUP BY patient)"
        ).fetchone()
        data = con.execute(f"SELECT dept, cost FROM {rel}").fetchnumpy()
    finally:
        con.close()
    edges = np.asarray(EDGES)
    hist = {}
    for d in DEPTS:
        v = np.clip(np.asarray(data["cost"])[np.asarray(data["dept"]) == d], edges[0], edges[-1])
        j = np.minimum(np.searchsorted(edges, v, side="right") - 1, len(edges) - 2)
        hist[d] = np.bincount(j, minlength=len(edges) - 1).astype(np.float64)
    answers = {r[0]: (float(r[1]), float(r[2]), float(r[3])) for r in rows}
    assert max_r and max_g and max_p
    return {
        "answers": answers,
        "hist": hist,
        "max_rows_per_unit": int(max_r[0]),
        "max_groups_per_unit": int(max_g[0]),
        "max_parties_per_unit": int(max_p[0]),
    }


def _invert(counts: NDArray[np.float64], edges: NDArray[np.float64], p: float) -> float:
    from mpcdp.protocol.query.sql_release import invert_histograms

    return float(invert_histograms(counts, edges, p)[0])


def curator(
    t: dict[str, Any], epsilon: float, draws: int, parties: int
) -> dict[tuple[str, str], Any]:
    """The trusted curator's errors per (dept, aggregate): (median |rel. error|, 95% width
    relative), with sensitivity P' G R (P' = ``parties``). Module docstring."""
    rng = np.random.default_rng(12345)  # benchmark simulation only
    mid, half = (LOWER + UPPER) / 2, (UPPER - LOWER) / 2
    units = parties * G * R
    b_count = units / (epsilon / 3)
    b_sum, b_cnt = units * half / (epsilon / 6), units / (epsilon / 6)
    b_bins = units / (epsilon / 3)
    edges = np.asarray(EDGES)
    out: dict[tuple[str, str], Any] = {}
    for d in DEPTS:
        n, avg, median = t["answers"][d]
        out[(d, "COUNT")] = (b_count * math.log(2) / n, 2 * b_count * math.log(20) / n)
        s = n * (avg - mid)
        sims = mid + (s + rng.laplace(0, b_sum, draws)) / np.maximum(
            n + rng.laplace(0, b_cnt, draws), 1.0
        )
        err = np.clip(sims, LOWER, UPPER) - avg
        lo, hi = np.quantile(err, [0.025, 0.975])
        out[(d, "AVG")] = (float(np.median(np.abs(err))) / avg, float(hi - lo) / avg)
        hist = t["hist"][d]
        noisy = hist[None, :] + rng.laplace(0, b_bins, (draws, hist.size))
        meds = np.array([_invert(h, edges, 0.5) for h in noisy])
        err = meds - median
        lo, hi = np.quantile(err, [0.025, 0.975])
        out[(d, "MEDIAN")] = (float(np.median(np.abs(err))) / median, float(hi - lo) / median)
        out[(d, "MEDIAN-bins")] = abs(_invert(hist, edges, 0.5) - median) / median
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000, help="visits per hospital")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=2000, help="curator simulations")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from mpcdp.federation import Federation
    from mpcdp.local.localnet import launch

    work = Path(tempfile.mkdtemp(prefix="mpcdp-sqlutil-", dir=args.tmp))
    try:
        files = []
        for k, p in enumerate(PARTIES):
            (work / p).mkdir()
            files.append(work / p / "visits.parquet")
            write_hospital(files[-1], party=k, rows=args.rows)
        t = truth(files)
        bounds = (t["max_rows_per_unit"], t["max_groups_per_unit"], t["max_parties_per_unit"])
        print(
            f"table: 3 hospitals x {args.rows:,d} visits; in the data: at most {bounds[0]} "
            f"visits per patient and department at a hospital, {bounds[1]} departments per "
            f"patient at a hospital, {bounds[2]} hospitals per patient; declared R={R}, G={G}, "
            f"P={P}",
            flush=True,
        )
        net = launch(
            workdir=work,
            datasets_toml={p: _toml() for p in PARTIES},
            deadline_s=600,
            startup_timeout_s=600,
        )
        released: list[Any] = []
        with net, Federation.from_config(net.federation_config) as fed:
            exact = fed.sql(QUERY, mechanism="none", max_parties_per_unit=P)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                released.append(fed.sql(QUERY, epsilon=args.epsilon, max_parties_per_unit=P))
            per_query = (time.perf_counter() - t0) / args.reps
        central = curator(t, args.epsilon, args.draws, P)
        no_p = curator(t, args.epsilon, args.draws, 1)
        rows = []
        pooled: dict[str, list[float]] = {label: [] for label in LABELS}
        print(
            f"\nepsilon {args.epsilon:g}, {args.reps} releases ({per_query:.1f} s each); relative "
            "errors (median over releases) and 95% interval widths, both over |true|"
        )
        print(
            f"{'dept':>7} {'agg':>6} {'true':>11} {'exact/true-1':>12} | {'mpcdp err':>9} "
            f"{'mpcdp 95%':>9} | {'cur. err':>9} {'cur. 95%':>9} | {'noP err':>9} "
            f"{'noP 95%':>9} | {'err ratio':>9} {'95% ratio':>9}"
        )
        for i, d in enumerate(DEPTS):
            for a, label in enumerate(LABELS):
                true = t["answers"][d][a]
                vals = np.array([r.cells[i][a].value for r in released])
                widths = np.array(
                    [r.cells[i][a].interval95[1] - r.cells[i][a].interval95[0] for r in released]
                )
                err = float(np.median(np.abs(vals - true))) / abs(true)
                width = float(np.median(widths)) / abs(true)
                c_err, c_w = central[(d, label)]
                n_err, n_w = no_p[(d, label)]
                bias = exact.cells[i][a].value / true - 1
                row = {
                    "dept": d,
                    "aggregate": label,
                    "true": true,
                    "exact_over_true_minus_1": bias,
                    "mpcdp_rel_err": err,
                    "mpcdp_rel_width95": width,
                    "curator_rel_err": c_err,
                    "curator_rel_width95": c_w,
                    "curator_no_p_rel_err": n_err,
                    "curator_no_p_rel_width95": n_w,
                    "err_ratio": err / c_err,
                    "width_ratio": width / c_w,
                }
                pooled[label] += list(np.abs(vals - true) / abs(true) / c_err)
                if label == "MEDIAN":
                    row["bins_only_rel_err"] = central[(d, "MEDIAN-bins")]
                rows.append(row)
                print(
                    f"{d:>7} {label:>6} {true:11.2f} {bias:12.1e} | {err:9.2e} {width:9.2e} | "
                    f"{c_err:9.2e} {c_w:9.2e} | {n_err:9.2e} {n_w:9.2e} | {err / c_err:9.2f} "
                    f"{width / c_w:9.2f}",
                    flush=True,
                )
        print(
            "MEDIAN with the true histogram and no noise (the bins' own error): "
            + ", ".join(f"{d} {central[(d, 'MEDIAN-bins')]:.1e}" for d in DEPTS)
        )
        ratios = {label: float(np.median(v)) for label, v in pooled.items()}
        print(
            "pooled over departments and releases, median of |mpcdp error| / the curator's "
            "median |error| (1 = the curator's): "
            + ", ".join(f"{label} {r:.2f}" for label, r in ratios.items())
        )
        if args.json:
            report = {
                "rows": rows,
                "pooled_err_ratio": ratios,
                "reps": args.reps,
                "seconds_per_query": per_query,
            }
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
