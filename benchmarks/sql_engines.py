"""DP SQL engines, side by side: a party's local step in DuckDB against the old in-memory CSV
loader, a 1,000-cell GROUP BY end to end against plain DuckDB, and Spark against DuckDB.

Run:  python -m benchmarks.sql_engines [--rows 1000000 10000000 100000000]
                                       [--csv-max-rows 10000000] [--federation-rows 1000000]
                                       [--federation-cells 1000]
                                       [--spark-rows 1000000 10000000] [--repeat 3]
                                       [--tmp /tmp] [--skip-federation] [--skip-spark]
                                       [--json out.json]

The synthetic tables are written by DuckDB itself (``COPY (SELECT ... FROM range(N)) TO``)
into a temporary folder under ``--tmp``, removed at the end; nothing in them is random
(hashes of the row number), so every run reads the same data.

a. The party's local step: what a party does for one SQL release
   (mpcdp.protocol.query.local_statistic.add_local_words: render, execute in the engine,
   to_matrix, contribution, encode) for ``SELECT cat, COUNT(*), SUM(x), AVG(x) FROM t GROUP BY
   cat`` (10 categories, x in [0, 1000]), over a Parquet file through DuckDB (the default
   EngineOptions: 2 threads, 2 GB) and over the same rows as CSV through DuckDB; against the
   old path, ``mpcdp.config.datasets.load_table`` (the whole CSV in memory) and numpy
   (bincount of the clamped values). Each variant runs in a process of its own and reports
   that process's peak RSS (ru_maxrss), so peaks do not mix; "bare" is a process that only
   imports the same modules (the floor). "start s" is what a party does once when it starts:
   DuckDB's schema check and its one scan of the file (check_values), or the CSV load;
   "query s" is one local step: the best of --repeat after the first ("first s"; for the CSV
   loader, the best of --repeat, the first included).
b. A 1,000-cell GROUP BY end to end: three ``mpcdp party serve`` processes (mpcdp.local
   .localnet), each holding --federation-rows rows in Parquet, and Federation.sql with
   ``SELECT cat, COUNT(*), SUM(x), AVG(x) FROM t GROUP BY cat`` and
   ``SELECT cat, MEDIAN(x) FROM t GROUP BY cat`` (64 bins) at epsilon 1 (discrete
   Laplace), against the same query in plain DuckDB (2 threads, this process) over the union
   of the three files. The parties' start-up (their scan of the file) is not counted; the
   breakdown columns time one party's local step over its own file (in this process) and the
   coordinator's post-processing answer() alone (best of --repeat). "first s" is the first
   query of each text.
c. Spark local[2] (mpcdp.data.spark_source) against DuckDB on the part-a Parquet files: the
   same compiled query through the same add_local_words, each in a process of its own.
   Spark's "start s" is its session's start (JVM, SparkSession, the schema read), counted
   apart; "first s" is the first query (the view, Spark's planning and code generation),
   "query s" the best of the next ones. Spark's peak memory is the Python driver's plus the
   JVM's (VmHWM).

All of it on the shared 2-core VM: other work on it moves absolute times; compare the ratios
of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: part a: 10 categories, x in [0, 1000]
CATS_A = tuple(f"c{i}" for i in range(10))
#: part b: 1,000 categories (--federation-cells)
CATS_B = tuple(f"k{i:03d}" for i in range(1000))
LOWER, UPPER = 0.0, 1000.0
QUERY = "SELECT cat, COUNT(*) AS n, SUM(x) AS s, AVG(x) AS a FROM t GROUP BY cat"
MEDIAN_QUERY = "SELECT cat, MEDIAN(x) AS m FROM t GROUP BY cat"


# --- data ---------------------------------------------------------------------------------


def write_table(path: Path, *, rows: int, cats: int, seed: int = 0, prefix: str = "c") -> None:
    """``rows`` rows (cat, x) written by DuckDB from range(): cat one of ``cats`` categories
    (CATS_A's "c<i>" for prefix "c", CATS_B's "k<iii>" for "k"), x in [0, 1000) with three
    decimals, both from hashes of the row number (no randomness: every run writes the same
    file)."""
    import duckdb

    width = 3 if prefix == "k" else len(str(cats - 1))
    cat = (
        f"'{prefix}' || lpad(CAST(hash(i + {seed * 1_000_000_007}) % {cats} AS VARCHAR), "
        f"{width}, '0')"
    )
    x = f"CAST(hash(2 * i + 1 + {seed}) % 1000000 AS DOUBLE) / 1000.0"
    fmt = "(FORMAT parquet)" if path.suffix == ".parquet" else "(FORMAT csv, HEADER true)"
    con = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "2GB"})
    try:
        con.execute(
            f"COPY (SELECT {cat} AS cat, {x} AS x FROM range({rows}) t(i)) TO '{path}' {fmt}"
        )
    finally:
        con.close()


def _dataset(path: Path, cats: tuple[str, ...], *, spark: bool = False) -> Any:
    from mpcdp.config.datasets import ColumnSpec
    from mpcdp.config.party_config import DatasetConfig

    return DatasetConfig(
        name="t",
        path=path,
        epsilon=1.0,
        delta=0.0,
        columns=(
            ColumnSpec(name="cat", categories=cats),
            ColumnSpec(name="x", lower=LOWER, upper=UPPER),
        ),
        source="spark" if spark else "duckdb",
        spark_master="local[2]" if spark else None,
    )


def _release(ds: Any, text: str = QUERY) -> Any:
    """The release plan a party derives for ``text`` at epsilon 1 (as Federation.sql
    proposes it)."""
    from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
    from mpcdp.protocol.query.sql_release import fit_frac_bits, release_plan, table_decl
    from mpcdp.sql.compile import compile_sql
    from mpcdp.sql.typed_plan import digest

    decl = table_decl(ds)
    q = compile_sql(text, tables={"t": decl})
    spec = QuerySpec(
        query_id=f"bench-{time.time_ns()}",
        dataset="t",
        statistic=Statistic.SQL,
        mechanism="discrete-laplace",
        epsilon="1",
        parties=("a", "b", "c"),
        sql=text,
        plan_digest=digest(q).hex(),
    )
    spec = replace(spec, frac_bits=fit_frac_bits(spec, q, decl, max_parties_per_unit=1))
    return release_plan(spec, q, decl, max_parties_per_unit=1)


def _count_of(release: Any, out: np.ndarray) -> int:
    """The rows counted by the release's COUNT(*) tensor (integer counts: the ring words)."""
    off = 0
    for t in release.tensors:
        if t.name == "0:count":
            return int(out[off : off + t.length].astype(np.int64).sum())
        off += t.length
    raise AssertionError("no count tensor")


# --- workers: one variant per process ---------------------------------------------------


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _descendants_hwm_mb() -> float:
    """Sum of VmHWM over this process's descendants (Spark's JVM), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0.0, list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024.0
        except OSError:
            continue
    return total


def worker(kind: str, path: Path, repeat: int) -> dict[str, Any]:
    from mpcdp.config.datasets import load_table
    from mpcdp.data.duckdb_source import DuckDBSource
    from mpcdp.data.table_source import open_source, validate
    from mpcdp.mpc import ring
    from mpcdp.protocol.query.local_statistic import EngineTable, add_local_words
    from mpcdp.protocol.query.sql_release import table_decl

    out: dict[str, Any] = {"kind": kind}
    if kind == "bare":
        import duckdb  # noqa: F401  (the floor: what every variant imports)

        out["peak_mb"] = _peak_mb()
        return out
    if kind == "csv-loader":
        ds = _dataset(path, CATS_A)
        t0 = time.perf_counter()
        table = load_table(path, ds.columns)
        out["start_s"] = time.perf_counter() - t0
        times = []
        mid = (LOWER + UPPER) / 2
        n = 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            idx = table.categorical["cat"]
            x = np.clip(table.numeric["x"], LOWER, UPPER)
            counts = np.bincount(idx, minlength=len(CATS_A))
            sums = np.bincount(idx, weights=x, minlength=len(CATS_A))
            centred = np.bincount(idx, weights=x - mid, minlength=len(CATS_A))
            cells = np.stack([counts, sums, centred, counts], axis=1)
            times.append(time.perf_counter() - t0)
            n = int(cells[:, 0].sum())
        out.update(first_s=times[0], query_s=min(times), rows=n, peak_mb=_peak_mb())
        return out
    spark = kind == "spark"
    ds = _dataset(path, CATS_A, spark=spark)
    t0 = time.perf_counter()
    source = open_source(ds)
    validate(source, dataset=ds)  # a schema query (Spark: starts the session)
    if isinstance(source, DuckDBSource):
        source.check_values()  # what a party does once at start (mpcdp.party.node)
    out["start_s"] = time.perf_counter() - t0
    release = _release(ds)
    data = EngineTable(source=source, table=table_decl(ds))
    times, n = [], 0
    for _ in range(repeat + 1):
        words = np.zeros(release.length, dtype=ring.dtype_for(release.spec.ring_bits))
        t0 = time.perf_counter()
        add_local_words(release, data, words, salt=os.urandom(16))
        times.append(time.perf_counter() - t0)
        n = _count_of(release, words)
    out.update(first_s=times[0], query_s=min(times[1:]), rows=n, peak_mb=_peak_mb())
    if spark:
        out["jvm_peak_mb"] = _descendants_hwm_mb()
    source.close()
    return out


def run_worker(kind: str, path: Path, repeat: int, timeout: float = 3600) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.sql_engines",
            "--worker",
            kind,
            "--path",
            str(path),
            "--repeat",
            str(repeat),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"kind": kind, "error": (proc.stderr or "no output").strip()[-400:]}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


# --- part b: a 1,000-cell GROUP BY end to end ------------------------------------------

_TOML_B = (
    '[datasets.t]\npath = "t.parquet"\nepsilon = 10000.0\nmax_epsilon_per_query = 10.0\n'
    "[datasets.t.columns.cat]\ncategories = {cats}\n"
    "[datasets.t.columns.x]\nlower = 0\nupper = 1000\n"
)


def federation(tmp: Path, rows: int, repeat: int, cells: int = 1000) -> list[dict[str, Any]]:
    """Part b, for QUERY and MEDIAN_QUERY: one row each (module docstring)."""
    import duckdb

    from mpcdp.data.table_source import open_source
    from mpcdp.federation import Federation
    from mpcdp.local.localnet import launch
    from mpcdp.mpc import ring
    from mpcdp.protocol.query.local_statistic import EngineTable, add_local_words
    from mpcdp.protocol.query.sql_release import answer, table_decl

    cats = CATS_B[:cells]
    parties = ["alice", "bob", "carlos"]
    work = tmp / "federation"
    files = []
    for i, p in enumerate(parties):
        (work / p).mkdir(parents=True)
        f = work / p / "t.parquet"
        write_table(f, rows=rows, cats=len(cats), seed=i + 1, prefix="k")
        files.append(f)
    toml = _TOML_B.format(cats=json.dumps(list(cats)))
    t0 = time.perf_counter()
    net = launch(
        workdir=work,
        datasets_toml={p: toml for p in parties},
        deadline_s=600,
        startup_timeout_s=600,
    )
    started = time.perf_counter() - t0
    union = "[" + ", ".join(f"'{f}'" for f in files) + "]"
    plain = {
        QUERY: "SELECT cat, COUNT(*), SUM(x), AVG(x)",
        MEDIAN_QUERY: "SELECT cat, median(x)",
    }
    results = []
    with net, Federation.from_config(net.federation_config) as fed:
        for text in (QUERY, MEDIAN_QUERY):
            out: dict[str, Any] = {
                "query": text,
                "rows_per_party": rows,
                "cells": len(cats),
                "parties_start_s": started,
            }
            times = []
            for _ in range(repeat + 1):
                t0 = time.perf_counter()
                fed.sql(text, epsilon=1)
                times.append(time.perf_counter() - t0)
            out.update(mpcdp_first_s=times[0], mpcdp_s=min(times[1:]))
            con = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "2GB"})
            base = []
            for _ in range(repeat + 1):
                t0 = time.perf_counter()
                got = con.execute(
                    f"{plain[text]} FROM read_parquet({union}) GROUP BY cat"
                ).fetchall()
                base.append(time.perf_counter() - t0)
            con.close()
            out.update(duckdb_s=min(base[1:]), cells_found=len(got))
            out["ratio"] = out["mpcdp_s"] / out["duckdb_s"]
            # breakdown: one party's local step over its own file, the coordinator's answer()
            ds = _dataset(files[0], cats)
            release = _release(ds, text)
            source = open_source(ds)
            data = EngineTable(source=source, table=table_decl(ds))
            local = []
            for _ in range(repeat + 1):
                words = np.zeros(release.length, dtype=ring.dtype_for(release.spec.ring_bits))
                t0 = time.perf_counter()
                add_local_words(release, data, words, salt=os.urandom(16))
                local.append(time.perf_counter() - t0)
            source.close()
            out["local_step_s"] = min(local[1:])
            assert release.query is not None
            fake = [np.full(t.length, 1000.0) for t in release.tensors]
            answers = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                answer(release, release.query, fake)
                answers.append(time.perf_counter() - t0)
            out["answer_s"] = min(answers)
            results.append(out)
    shutil.rmtree(work, ignore_errors=True)
    return results


# --- main ---------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = "8.3f") -> str:
    return format(x, spec) if isinstance(x, int | float) else f"{'-':>8}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument(
        "--csv-max-rows",
        type=int,
        default=10_000_000,
        help="the largest table the CSV loader (and DuckDB over CSV) reads",
    )
    parser.add_argument("--federation-rows", type=int, default=1_000_000)
    parser.add_argument(
        "--federation-cells", type=int, default=1000, help="categories of part b (10..1000)"
    )
    parser.add_argument("--spark-rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"))
    parser.add_argument("--skip-federation", action="store_true")
    parser.add_argument("--skip-spark", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.repeat)), flush=True)
        return

    report: dict[str, Any] = {"local": [], "spark": [], "federation": None}
    tmp = Path(tempfile.mkdtemp(prefix="mpcdp-sqlbench-", dir=args.tmp))
    try:
        need = max(args.rows) * 9 + min(max(args.rows), args.csv_max_rows) * 20
        free = shutil.disk_usage(tmp).free
        if need > free * 0.8:
            raise SystemExit(f"needs ~{need / 1e9:.1f} GB under {tmp}, {free / 1e9:.1f} GB free")
        bare = run_worker("bare", tmp, 1)
        report["bare_peak_mb"] = bare.get("peak_mb")
        print(f"bare process (imports only): peak {bare.get('peak_mb', 0):.0f} MB", flush=True)
        print(
            f"{'rows':>12} {'variant':>16} | {'start s':>8} {'first s':>8} {'query s':>8} "
            f"{'peak MB':>8} | {'query/duckdb-pq':>15} {'peak/duckdb-pq':>14}"
        )
        spark_rows = [] if args.skip_spark else list(args.spark_rows or [])
        sizes = sorted(set(args.rows) | set(spark_rows))
        for n in sizes:
            pq = tmp / f"t{n}.parquet"
            write_table(pq, rows=n, cats=10)
            rows: list[dict[str, Any]] = []
            if n in args.rows:
                rows.append(run_worker("duckdb-parquet", pq, args.repeat))
                if n <= args.csv_max_rows:
                    csv = tmp / f"t{n}.csv"
                    write_table(csv, rows=n, cats=10)
                    rows.append(run_worker("duckdb-csv", csv, args.repeat))
                    rows.append(run_worker("csv-loader", csv, args.repeat))
                    csv.unlink()
            if not args.skip_spark and n in (args.spark_rows or []):
                if not rows:
                    rows.append(run_worker("duckdb-parquet", pq, args.repeat))
                rows.append(run_worker("spark", pq, args.repeat))
            pq.unlink()
            if not rows:
                continue
            ref = rows[0]
            for r in rows:
                r["table_rows"] = n
                if "error" in r:
                    print(f"{n:12,d} {r['kind']:>16} | error: {r['error']}", flush=True)
                    continue
                if r["rows"] != n:
                    print(f"  WARNING: {r['kind']} counted {r['rows']} rows, not {n}")
                peak = r["peak_mb"] + r.get("jvm_peak_mb", 0.0)
                r["peak_total_mb"] = peak
                r["query_over_duckdb"] = r["query_s"] / ref["query_s"]
                r["peak_over_duckdb"] = peak / ref["peak_mb"]
                (report["spark"] if r["kind"] == "spark" else report["local"]).append(r)
                print(
                    f"{n:12,d} {r['kind']:>16} | {_fmt(r.get('start_s'))} {_fmt(r['first_s'])} "
                    f"{_fmt(r['query_s'])} {peak:8.0f} | {r['query_over_duckdb']:15.2f} "
                    f"{r['peak_over_duckdb']:14.2f}",
                    flush=True,
                )
        if not args.skip_federation:
            report["federation"] = federation(
                tmp, args.federation_rows, args.repeat, args.federation_cells
            )
            print(
                f"\n{args.federation_cells:,d}-cell GROUP BY, 3 parties x "
                f"{args.federation_rows:,d} rows (Parquet), epsilon 1; parties' start (not "
                "counted) "
                f"{report['federation'][0]['parties_start_s']:.1f} s"
            )
            print(
                f"{'query':>50} | {'mpcdp s':>8} {'first s':>8} {'duckdb s':>8} {'ratio':>7} | "
                f"{'1 local s':>9} {'answer s':>8}"
            )
            for fb in report["federation"]:
                print(
                    f"{fb['query'][:50]:>50} | {fb['mpcdp_s']:8.3f} {fb['mpcdp_first_s']:8.3f} "
                    f"{fb['duckdb_s']:8.3f} {fb['ratio']:7.1f} | {fb['local_step_s']:9.3f} "
                    f"{fb['answer_s']:8.3f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
