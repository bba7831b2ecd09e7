"""What one party's dropout adds to a query, against the no-fault query of the same run.

Run:  python -m benchmarks.dropout [--parties 3] [--repeat 5] [--deadline 2] [--json FILE]

``--parties`` ``mpcdp party serve`` processes on loopback (mTLS), one small table each, and a
federation with ``min_parties`` = n - 1. Each repetition runs, on a fresh federation client,
one query of every kind below, interleaved, and restarts or resumes the party that failed
(not timed):

- ``no fault``: every party answers (the baseline);
- ``down before``: the last party is dead when the query starts (it fails Describe and is
  left out of the first round: nothing to re-run);
- ``killed mid-query``: the last party accepts the query (Propose) and is then killed; the
  coordinator's liveness check before the Contributes finds it (connection refused), aborts
  the round and re-runs it over the others;
- ``stopped mid-query``: the same with SIGSTOP instead of a kill: the liveness check waits
  for its deadline (the abort deadline, min(5 s, ``--deadline``)) before the re-run;
- ``liveness check``: the check alone (every party's health check, in parallel), which every
  query pays (it is part of ``no fault``).

Prints the median and the minimum of each, and each one's added time over the no-fault
query of the same run. Timing is informative only (everything shares this machine's cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpcdp.config.party_config import load_federation_config
from mpcdp.errors import MpcdpError
from mpcdp.federation import Federation
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.protocol.query.query_spec import QuerySpec
from mpcdp.protocol.session import Proposal
from mpcdp.transport.client import GrpcPartyClient

KINDS = ("no fault", "down before", "killed mid-query", "stopped mid-query", "liveness check")


def _datasets(workdir: Path, parties: list[str]) -> dict[str, str]:
    out = {}
    for i, p in enumerate(parties):
        (workdir / p).mkdir(parents=True, exist_ok=True)
        (workdir / p / "raises.csv").write_text(f"raise\n{1000 * (i + 1)}\n{500 + i}\n")
        out[p] = (
            '[datasets.raises]\npath = "raises.csv"\nepsilon = 1000.0\ndelta = 1e-6\n'
            "[datasets.raises.columns.raise]\nlower = 0\nupper = 5000\n"
        )
    return out


def _failing_after_propose(
    net: LocalFederation, party: str, fail: Callable[[], None]
) -> type[GrpcPartyClient]:
    class Failing(GrpcPartyClient):
        def propose(self, *, session_id: bytes, spec: QuerySpec) -> Proposal:
            answer = super().propose(session_id=session_id, spec=spec)
            if party in spec.parties and len(spec.parties) == len(net.processes):
                fail()  # it accepted the query, then failed
            return answer

    return Failing


def _timed(fed: Federation) -> float:
    t0 = time.perf_counter()
    res = fed.sum(dataset="raises", column="raise", epsilon=0.01)
    elapsed = time.perf_counter() - t0
    if len(res.parties) < len(fed.parties) - 1:  # pragma: no cover - a benchmark check
        raise SystemExit(f"answered by {res.parties} only")
    return elapsed


def run(*, parties: int, repeat: int, deadline_s: float) -> dict[str, Any]:
    names = [f"p{i}" for i in range(parties)]
    last = names[-1]
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        net = launch(
            workdir=workdir, datasets_toml=_datasets(workdir, names), deadline_s=deadline_s
        )
        config = dataclasses.replace(
            load_federation_config(net.federation_config), min_parties=parties - 1
        )
        proc = net.processes

        def fresh() -> Federation:
            fed = Federation(config)
            for c in fed.clients:  # channels and TLS sessions up before anything is timed
                try:
                    c.describe()
                except MpcdpError:
                    pass  # the party that is down
            return fed

        def hooked(fail: Callable[[], None]) -> Federation:
            fed = fresh()
            i = fed.parties.index(last)
            fed._clients[i] = _failing_after_propose(net, last, fail)(
                party_id=last,
                address=fed.clients[i].address,
                creds=fed._creds,
                deadline_s=deadline_s,
            )
            return fed

        try:
            for _ in range(repeat):
                with fresh() as fed:
                    _timed(fed)  # warm
                    times["no fault"].append(_timed(fed))
                    t0 = time.perf_counter()
                    list(fed._pool.map(lambda c: c.ping(), fed.clients))
                    times["liveness check"].append(time.perf_counter() - t0)
                with hooked(lambda: net.kill(last)) as fed:
                    times["killed mid-query"].append(_timed(fed))
                with fresh() as fed:  # the last party is still dead
                    times["down before"].append(_timed(fed))
                net.restart(last)
                with hooked(lambda: proc[last].send_signal(signal.SIGSTOP)) as fed:
                    times["stopped mid-query"].append(_timed(fed))
                proc[last].send_signal(signal.SIGCONT)
                time.sleep(1.5)  # a resumed party refuses new rounds for a second
        finally:
            for p in proc.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
            net.stop()
    base = statistics.median(times["no fault"])
    return {
        "parties": parties,
        "repeat": repeat,
        "deadline_s": deadline_s,
        "abort_deadline_s": min(5.0, deadline_s),
        "ms": {
            k: {
                "median": 1000 * statistics.median(v),
                "min": 1000 * min(v),
                "added_median": 1000 * (statistics.median(v) - base),
            }
            for k, v in times.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parties", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=2.0, help="federation deadline_s")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = run(parties=args.parties, repeat=args.repeat, deadline_s=args.deadline)
    for kind, m in out["ms"].items():
        sys.stdout.write(
            f"{kind:>18}: median {m['median']:8.1f} ms, min {m['min']:8.1f} ms, "
            f"added {m['added_median']:+8.1f} ms\n"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
