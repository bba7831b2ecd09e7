"""Secure sum, side by side: mpcdp vs a plaintext sum over the same transport vs MPyC.

Run:  python -m benchmarks.secure_sum [--parties 3 5 10] [--sizes 1000 100000 1000000 10000000]
                                      [--repeat 3] [--mpyc-max-work 3000000] [--chunk-bytes 1048576]
                                      [--interleave 0] [--json out.json]

For each (n, d), in the same run:
- mpcdp: n party nodes as separate processes (`mpcdp party serve`), real mTLS gRPC on
  loopback; a full round of a vector sum with Skellam noise (epsilon 5, delta 1e-5; noise
  shares sized for n - 1 honest). "first": the first round of the fresh processes. "cold"
  (best of --repeat): the two-round-trip round (Propose, liveness check, Contribute, reveal)
  of a parameter set the parties have no noise prepared for (each round a new epsilon) and
  no pre-published key: every party draws its noise share on the request path. "warm" (best
  of --repeat): a round whose noise the parties generated off the request path after the
  previous round, on keys they pre-published (fetched off the clock): one Contribute per
  party, no Propose.
- plaintext: n processes with the same data, certificates and gRPC service, each sending its
  float32 vector in the clear; the coordinator adds (benchmarks/plaintext_party.py).
- MPyC: n MPyC parties as processes on loopback computing the same secure sum of fixed-point
  vectors (benchmarks/mpyc_sum.py; needs the `bench` extra), where n * d <= --mpyc-max-work.
Both mpcdp and the plaintext baseline stream their uploads in --chunk-bytes chunks (1 MiB
here, so that party and coordinator overlap; the protocol's default is 4 MiB).
Reported: wall time, bytes received per party per coordinate, peak RSS per party process
(VmHWM) relative to the size of the party's own float64 vector (8 d bytes): "RSS/vec" is the
whole process (interpreter, libraries, the loaded data and the rounds), "+round" what the
rounds added on top of the process right after start-up (data loaded); and the ratios
mpcdp/plaintext (warm and cold) and MPyC/mpcdp (warm). "propose s" is the Propose round trip
of the best cold round (until the last party's signed key came back); "warm proposes" counts
the Propose calls the warm rounds made (0: the round trip is gone). Absolute times are for
this machine only.

``--interleave K`` adds K pairs of rounds with both kinds of parties running at once: a
plaintext round, then a warm mpcdp round, back to back (then the parties' noise refill, off
the clock), so that both rounds of a pair see the same load from other work; reported: the
median of the K ratios warm / plaintext and their range ("interleaved").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import plaintext_party
from mpcdp import PROTOCOL_VERSION
from mpcdp.config.party_config import load_federation_config
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.proto import party_pb2 as pb
from mpcdp.protocol.identity import Prekey, SignedKey
from mpcdp.protocol.query.party_engine import Proposal
from mpcdp.protocol.query.plan import fit
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.query.round_coordinator import ContributionStream, WarmKeys, run_round
from mpcdp.transport import tls
from mpcdp.transport.client import GrpcPartyClient

ROOT = Path(__file__).resolve().parents[1]


def _rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _write_vectors(workdir: Path, parties: list[str], d: int) -> dict[str, str]:
    toml = {}
    for i, p in enumerate(parties):
        (workdir / p).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)  # benchmark data only
        np.save(workdir / p / "v.npy", rng.uniform(-1, 1, size=d) / np.sqrt(d))
        toml[p] = (
            '[datasets.v]\npath = "v.npy"\nepsilon = 1000000.0\ndelta = 1e-5\n'
            "allow_exact = true\nl2_bound = 1.0\n"
        )
    return toml


@dataclass
class Measure:
    first_s: float = 0.0
    cold_s: float = float("inf")
    warm_s: float = float("inf")
    propose_s: float = 0.0  # of the best cold round: until the last proposal came back
    warm_proposes: int = 0  # Propose calls made by the warm rounds
    bytes_per_party: int = 0
    peak_rss: int = 0
    idle_rss: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _spec(parties: list[str], d: int, k: int, epsilon: str = "5") -> QuerySpec:
    spec = QuerySpec(
        query_id=f"bench-{time.time_ns()}-{k}",
        dataset="v",
        column="",
        statistic=Statistic.SUM,
        mechanism="skellam",
        epsilon=epsilon,
        delta=1e-5,
        parties=tuple(parties),
        l2_bound=1.0,
    )
    return fit(spec, vector_length=d, frac_bits=None, ring_bits=None)


class _TimedPropose:
    """A party client that notes when its proposal came back (the end of the round's first
    round trip) and passes every other call through (warm rounds and the liveness check
    included)."""

    def __init__(self, client: GrpcPartyClient, done: list[float]) -> None:
        self._client, self._done = client, done

    @property
    def party_id(self) -> str:
        return self._client.party_id

    def propose(self, *, session_id: bytes, spec: QuerySpec) -> Proposal:
        out = self._client.propose(session_id=session_id, spec=spec)
        self._done.append(time.perf_counter())
        return out

    def ping(self) -> None:
        self._client.ping()

    def contribute(
        self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
    ) -> ContributionStream:
        return self._client.contribute(session_id=session_id, keys=keys, ring_bits=ring_bits)

    def prekeys(self, *, batch_id: bytes, count: int, ttl_s: int) -> list[Prekey]:
        return self._client.prekeys(batch_id=batch_id, count=count, ttl_s=ttl_s)

    def contribute_warm(
        self, *, session_id: bytes, spec: QuerySpec, keys: Sequence[Prekey], ring_bits: int = 64
    ) -> ContributionStream:
        return self._client.contribute_warm(
            session_id=session_id, spec=spec, keys=keys, ring_bits=ring_bits
        )

    def abort(self, *, session_id: bytes, reason: str) -> None:
        self._client.abort(session_id=session_id, reason=reason)


def _clients(net: LocalFederation, chunk_bytes: int) -> list[GrpcPartyClient]:
    """One mTLS client per party of ``net``, as the coordinator of its federation.toml."""
    cfg = load_federation_config(net.federation_config)
    creds = tls.load_credentials(cfg.tls)
    return [
        GrpcPartyClient(
            party_id=p.id, address=p.address, creds=creds, deadline_s=600, chunk_bytes=chunk_bytes
        )
        for p in cfg.parties
    ]


def bench_mpcdp(
    net: LocalFederation, parties: list[str], d: int, repeat: int, chunk_bytes: int
) -> Measure:
    clients = _clients(net, chunk_bytes)
    m = Measure()
    m.idle_rss = max(_rss(proc.pid)["VmHWM"] for proc in net.processes.values())
    received: dict[str, int] = {}
    pool = ThreadPoolExecutor(len(parties))

    def observe(party: str, chunk: np.ndarray) -> None:
        received[party] = received.get(party, 0) + chunk.nbytes

    proposed: list[float] = []
    timed = [_TimedPropose(c, proposed) for c in clients]
    ring = WarmKeys(batch_size=min(64, repeat + 1))

    def settle() -> None:
        _settle(len(parties), d)

    def one(spec: QuerySpec, prekeys: WarmKeys | None = None) -> float:
        received.clear()
        proposed.clear()
        t0 = time.perf_counter()
        out = run_round(spec=spec, clients=timed, observe=observe, executor=pool, prekeys=prekeys)
        dt = time.perf_counter() - t0
        assert out.tensors["vector"].size == d
        settle()
        return dt

    # the first round of the fresh processes (nothing prepared, no keys)
    m.first_s = one(_spec(parties, d, 0))
    # warm rounds: the first round's parameters (noise prepared after each round), on
    # pre-published keys fetched off the clock
    ring.refill(timed)
    for k in range(repeat):
        m.warm_s = min(m.warm_s, one(_spec(parties, d, 100 + k), ring))
        m.warm_proposes += len(proposed)
    # cold rounds: a new parameter set each (no noise prepared for it), no keys
    for k in range(1, repeat + 1):
        t0 = time.perf_counter()
        dt = one(_spec(parties, d, k, epsilon=f"5.{k:03d}"))
        if dt < m.cold_s:
            m.cold_s, m.propose_s = dt, max(proposed) - t0
    m.bytes_per_party = max(received.values())
    m.peak_rss = max(_rss(proc.pid)["VmHWM"] for proc in net.processes.values())
    pool.shutdown()
    for c in clients:
        c.close()
    return m


def bench_plaintext(
    net: LocalFederation, parties: list[str], d: int, repeat: int, chunk_bytes: int
) -> Measure:
    with plaintext_party.running(net, parties) as plain:
        stubs = plain.stubs
        m = Measure()
        m.idle_rss = max(_rss(pid)["VmHWM"] for pid in plain.pids.values())
        nbytes: dict[str, int] = {}
        request = pb.ContributeRequest(
            version=PROTOCOL_VERSION, session_id=b"p" * 16, chunk_bytes=chunk_bytes
        )

        def one(p: str, total: np.ndarray) -> None:
            off = 0
            for msg in stubs[p].Contribute(request, timeout=600):
                if msg.WhichOneof("body") == "data":
                    x = np.frombuffer(msg.data, dtype=np.float32)
                    total[off : off + x.size] += x
                    off += x.size
                    nbytes[p] = nbytes.get(p, 0) + len(msg.data)

        for k in range(repeat + 1):
            total = np.zeros(d, dtype=np.float64)
            nbytes.clear()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(parties)) as pool:
                list(pool.map(one, parties, [total] * len(parties)))
            dt = time.perf_counter() - t0
            if k == 0:
                m.cold_s = dt
            else:
                m.warm_s = min(m.warm_s, dt)
        m.bytes_per_party = max(nbytes.values())
        m.peak_rss = max(_rss(pid)["VmHWM"] for pid in plain.pids.values())
        return m


def _settle(n: int, d: int) -> None:
    """Let the parties refill their noise off the clock: each draws d Skellam coordinates
    (~120 ns each on one core here), all n of them on this machine's cores."""
    time.sleep(min(20.0, 0.5 + 2 * n * d * 120e-9 / (os.cpu_count() or 1)))


def bench_interleaved(
    net: LocalFederation, parties: list[str], d: int, pairs: int, chunk_bytes: int
) -> list[float]:
    """``pairs`` ratios warm mpcdp round / plaintext round, each pair run back to back with
    both kinds of parties up (module docstring)."""
    clients = _clients(net, chunk_bytes)
    pool = ThreadPoolExecutor(len(parties))
    ratios: list[float] = []
    with plaintext_party.running(net, parties) as plain:
        request = pb.ContributeRequest(
            version=PROTOCOL_VERSION, session_id=b"p" * 16, chunk_bytes=chunk_bytes
        )

        def plain_one(p: str, total: np.ndarray) -> None:
            off = 0
            for msg in plain.stubs[p].Contribute(request, timeout=600):
                if msg.WhichOneof("body") == "data":
                    x = np.frombuffer(msg.data, dtype=np.float32)
                    total[off : off + x.size] += x
                    off += x.size

        def plain_round() -> float:
            total = np.zeros(d, dtype=np.float64)
            t0 = time.perf_counter()
            list(pool.map(plain_one, parties, [total] * len(parties)))
            return time.perf_counter() - t0

        # the first mpcdp round (noise for these parameters prepared after it) and one
        # plaintext round, untimed
        run_round(spec=_spec(parties, d, 0), clients=clients, executor=pool)
        plain_round()
        ring = WarmKeys(batch_size=min(64, pairs + 1))
        ring.refill(clients)
        _settle(len(parties), d)
        for k in range(pairs):
            plain_s = plain_round()
            t0 = time.perf_counter()
            out = run_round(
                spec=_spec(parties, d, 500 + k), clients=clients, executor=pool, prekeys=ring
            )
            warm_s = time.perf_counter() - t0
            assert out.tensors["vector"].size == d
            ratios.append(warm_s / plain_s)
            _settle(len(parties), d)
    pool.shutdown()
    for c in clients:
        c.close()
    return ratios


def bench_mpyc(n: int, d: int, timeout: int) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.mpyc_sum",
            "--parties",
            str(n),
            "--size",
            str(d),
            "--timeout",
            str(timeout),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        return {"ok": False, "error": (proc.stderr or "no output")[-300:]}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parties", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000, 10_000_000]
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--mpyc-max-work",
        type=int,
        default=3_000_000,
        help="run MPyC only where parties * size <= this (it is ~100x slower)",
    )
    parser.add_argument("--mpyc-timeout", type=int, default=600)
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        default=1 << 20,
        help="upload chunk size for both mpcdp and the plaintext baseline (protocol default 4 MiB)",
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="pairs of back-to-back plaintext and warm rounds (module docstring); 0: none",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(
        f"{'n':>3} {'d':>10} | {'warm s':>8} {'cold s':>8} {'first s':>8} {'B/coord':>7} "
        f"{'RSS/vec':>7} {'+round':>6} | {'plain s':>8} | {'warm/plain':>10} "
        f"{'cold/plain':>10} {'propose s':>9} {'warm proposes':>13} | {'MPyC s':>8} "
        f"{'MPyC/warm':>9}"
    )
    for n in args.parties:
        for d in args.sizes:
            parties = [f"p{i}" for i in range(n)]
            with tempfile.TemporaryDirectory(prefix="mpcdp-bench-") as tmp:
                work = Path(tmp)
                net = launch(
                    workdir=work, datasets_toml=_write_vectors(work, parties, d), deadline_s=600
                )
                with net:
                    ours = bench_mpcdp(net, parties, d, args.repeat, args.chunk_bytes)
                    plain = bench_plaintext(net, parties, d, args.repeat, args.chunk_bytes)
                    pairs = (
                        bench_interleaved(net, parties, d, args.interleave, args.chunk_bytes)
                        if args.interleave
                        else []
                    )
            mp: dict[str, Any] = {"ok": False, "error": "skipped"}
            if n * d <= args.mpyc_max_work:
                mp = bench_mpyc(n, d, args.mpyc_timeout)
            mp_s = mp.get("wall_s") if mp.get("ok") else None
            row = {
                "parties": n,
                "size": d,
                "mpcdp_warm_s": ours.warm_s,
                "mpcdp_cold_s": ours.cold_s,
                "mpcdp_first_s": ours.first_s,
                "mpcdp_bytes_per_coord": ours.bytes_per_party / d,
                "mpcdp_peak_rss_mb": ours.peak_rss / 2**20,
                "mpcdp_peak_rss_over_vector": ours.peak_rss / (8 * d),
                "mpcdp_idle_rss_mb": ours.idle_rss / 2**20,
                "mpcdp_round_rss_over_vector": (ours.peak_rss - ours.idle_rss) / (8 * d),
                "plain_s": plain.warm_s,
                "plain_bytes_per_coord": plain.bytes_per_party / d,
                "plain_peak_rss_mb": plain.peak_rss / 2**20,
                "ratio_mpcdp_over_plain": ours.warm_s / plain.warm_s,
                "ratio_cold_over_plain": ours.cold_s / plain.warm_s,
                "mpcdp_propose_s": ours.propose_s,
                "mpcdp_warm_proposes": ours.warm_proposes,
                "mpyc_s": mp_s,
                "mpyc": mp,
                "ratio_mpyc_over_mpcdp": (mp_s / ours.warm_s) if mp_s else None,
                "interleaved_warm_over_plain": pairs,
            }
            rows.append(row)
            mps = f"{mp_s:8.3f}" if mp_s else f"{'n/a':>8}"
            mpr = f"{mp_s / ours.warm_s:9.1f}" if mp_s else f"{'':>9}"
            ours_cols = (
                f"{ours.warm_s:8.4f} {ours.cold_s:8.4f} {ours.first_s:8.3f} "
                f"{ours.bytes_per_party / d:7.2f} {ours.peak_rss / (8 * d):7.2f} "
                f"{(ours.peak_rss - ours.idle_rss) / (8 * d):6.2f}"
            )
            print(
                f"{n:3d} {d:10,d} | {ours_cols} | {plain.warm_s:8.4f} | "
                f"{ours.warm_s / plain.warm_s:10.2f} {ours.cold_s / plain.warm_s:10.2f} "
                f"{ours.propose_s:9.4f} {ours.warm_proposes:13d} | {mps} {mpr}",
                flush=True,
            )
            if pairs:
                print(
                    f"    interleaved warm/plain over {len(pairs)} pairs: median "
                    f"{statistics.median(pairs):.2f} (range {min(pairs):.2f}-{max(pairs):.2f})",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
