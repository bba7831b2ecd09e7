"""Budget agreement under load: many analysts query one federation until its budget runs out.

Run:  python -m benchmarks.budget_load [--queries 1000] [--processes 4] [--threads 8]
                                       [--budget 20] [--epsilon 0.1]

Three `mpcdp party serve` processes on loopback (mTLS), each with the same budget on one
table; ``--processes`` analyst processes of ``--threads`` threads each send ``--queries``
discrete-Laplace sums of ``--epsilon`` between them, as fast as they can, well past the
point where the budget runs out. Afterwards every party's ledger must hold exactly the
charges of the queries that were revealed, the three ledgers must agree, and nobody may
have spent more than its budget (before reservations, 32 queries in flight left parties
charged for rounds that were never revealed).

Prints the counts and the throughput (revealed and refused rounds per second); exits 1 when
an invariant fails. Timing is informative only (everything shares this machine's cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import MpcdpError
from mpcdp.federation import Federation
from mpcdp.local.localnet import launch

PARTIES = ("alice", "bob", "carlos")


@dataclass(frozen=True)
class LoadResult:
    queries: int
    revealed: int
    refused: int
    seconds: float
    charged: dict[str, int]  # per party
    spent: dict[str, Fraction]  # pure epsilon per party
    ledgers_agree: bool  # every ledger == the revealed query ids
    within_budget: bool
    errors: dict[str, int]  # why rounds failed, by first words of the cause


def _analyst(args: tuple[str, int, int, str, int]) -> dict[str, object]:
    """One analyst process: ``threads`` threads share ``count`` queries."""
    config, count, threads, epsilon, offset = args
    revealed: list[str] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    todo = iter(range(count))

    def worker() -> None:
        with Federation.from_config(config) as fed:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                qid = f"load-{offset + i}"
                try:
                    fed.sum(dataset="raises", column="raise", epsilon=epsilon, query_id=qid)
                except MpcdpError as exc:
                    text = str(exc)
                    # a round some party charged: keep its whole report (who charged what)
                    key = (
                        text[:300] if "; charged:" in text else str(getattr(exc, "cause", exc))[:60]
                    )
                    with lock:
                        errors[key] = errors.get(key, 0) + 1
                    continue
                with lock:
                    revealed.append(qid)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"revealed": revealed, "errors": errors}


def run(
    *,
    workdir: Path,
    queries: int,
    processes: int,
    threads: int,
    budget: str,
    epsilon: str,
) -> LoadResult:
    toml = {}
    for i, p in enumerate(PARTIES):
        (workdir / p).mkdir(parents=True, exist_ok=True)
        (workdir / p / "raises.csv").write_text(f"raise\n{1000 + i}\n{2000 + i}\n")
        toml[p] = (
            f'[datasets.raises]\npath = "raises.csv"\nepsilon = {budget}\ndelta = 1e-6\n'
            "[datasets.raises.columns.raise]\nlower = 0\nupper = 5000\n"
        )
    per = [queries // processes + (k < queries % processes) for k in range(processes)]
    offsets = [sum(per[:k]) for k in range(processes)]
    with launch(workdir=workdir, datasets_toml=toml, deadline_s=60) as net:
        config = str(net.federation_config)
        start = time.perf_counter()
        with mp.get_context("spawn").Pool(processes) as pool:
            outs = pool.map(
                _analyst,
                [(config, per[k], threads, epsilon, offsets[k]) for k in range(processes)],
            )
        seconds = time.perf_counter() - start
    revealed = {q for o in outs for q in o["revealed"]}  # type: ignore[attr-defined]
    errors: dict[str, int] = {}
    for o in outs:
        for k, v in o["errors"].items():  # type: ignore[attr-defined]
            errors[k] = errors.get(k, 0) + v
    charged: dict[str, int] = {}
    spent: dict[str, Fraction] = {}
    agree = True
    within = True
    for p in PARTIES:
        with BudgetLedger(workdir / p / "ledger.sqlite") as led:
            ids = {c.query_id for c in led.charges("raises")}
            status = led.status("raises")
        charged[p] = len(ids)
        spent[p] = status.pure_epsilon_spent
        agree = agree and ids == revealed
        within = within and status.pure_epsilon_spent <= Fraction(budget)
    return LoadResult(
        queries=queries,
        revealed=len(revealed),
        refused=queries - len(revealed),
        seconds=seconds,
        charged=charged,
        spent=spent,
        ledgers_agree=agree,
        within_budget=within,
        errors=errors,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--budget", default="20")
    parser.add_argument("--epsilon", default="0.1")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mpcdp-load-") as tmp:
        res = run(
            workdir=Path(tmp),
            queries=args.queries,
            processes=args.processes,
            threads=args.threads,
            budget=args.budget,
            epsilon=args.epsilon,
        )
    fits = int(Fraction(args.budget) / Fraction(args.epsilon))
    if args.json:
        obj = {k: v for k, v in res.__dict__.items() if k != "spent"}
        obj["spent"] = {p: str(v) for p, v in res.spent.items()}
        print(json.dumps(obj))
    else:
        print(
            f"budget load: {res.queries} queries of epsilon {args.epsilon} from "
            f"{args.processes} processes x {args.threads} threads, budget {args.budget} "
            f"({fits} queries fit)"
        )
        print(
            f"revealed {res.revealed}, refused or aborted {res.refused}, in {res.seconds:.1f} s "
            f"({res.queries / res.seconds:.1f} rounds/s)"
        )
        spent = {p: str(v) for p, v in res.spent.items()}
        print(f"charged per party: {res.charged}; epsilon spent: {spent}")
        print(f"ledgers equal the revealed queries and agree: {res.ledgers_agree}")
        print(f"every party within its budget: {res.within_budget}")
        for why, n in sorted(res.errors.items(), key=lambda kv: -kv[1])[:6]:
            print(f"  {n:5d} x {why}")
    return 0 if res.ledgers_agree and res.within_budget else 1


if __name__ == "__main__":
    sys.exit(main())
