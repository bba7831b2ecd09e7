"""One-run privacy audit of federated DP-SGD on digits.

Run:  python -m benchmarks.one_run_audit [--canaries 1000] [--epsilons 1 3 8]
                                         [--broken inf 10] [--broken-epsilon 1]
                                         [--kind white-box] [--confidence 0.95] [--seed 0]
                                         [--repeats 1] [--epochs 20] [--allow-untestable]
                                         [--json out.json]

Three party nodes (in-process gRPC servers, each with its own mTLS certificate, ledger and a
third of scikit-learn's digits training split: mpcdp.demos.digits_demo) train ``mlp:64,128,10``
with federated DP-SGD exactly as ``mpcdp demo digits`` does (expected batch 64, 20 epochs,
lr 0.03, C = 1, delta 1e-5, t = 1 of 3), each run an audit run with ``--canaries`` canaries
per site (Steinke, Nasr, Jagielski 2023; mpcdp.train.audit_run). In-process nodes rather than
processes because the broken-noise rows need the test-only hook
(``PartyNode(test_only_noise_divisor=...)``), which nothing outside Python code can set.

Rows: one honest run per ``--epsilons`` value, then one run per ``--broken`` divisor of the
sites' noise std (inf: no noise) at ``--broken-epsilon``. Printed per row: the accountant's
claimed epsilon, the audit's ceiling (the bound if every guess were right: no outcome can
show more), the audit's lower bound (confidence ``--confidence``, delta 1e-5, guess counts
chosen by mpcdp.audit.bound's weighted schedule), the fraction of the claim reached, m,
guesses, correct, test accuracy and wall time; with ``--repeats`` each configuration runs
that many times (seeds --seed, --seed + 1, ...; the sites' noise and coins are fresh every
run) and a summary gives the mean, min and max bound. An honest row must stay below its
claim (exit 1 otherwise); a broken row should be above it. A claim at or above the ceiling
cannot be refuted by any run: ``fed.train`` refuses it before the sites are asked
(mpcdp.train.federated.UntestableAuditError), and it is printed as refused with the advice,
unless ``--allow-untestable`` runs it anyway.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpcdp.config.party_config import load_party_config
from mpcdp.demos import digits_demo
from mpcdp.federation import Federation
from mpcdp.party.node import PartyNode
from mpcdp.train.federated import UntestableAuditError
from mpcdp.transport.cert_files import init_federation

DELTA = 1e-5


@dataclass(frozen=True)
class Row:
    noise: str
    claimed_epsilon: float
    ceiling: float
    lower_bound: float
    fraction: float
    confidence: float
    m: int
    guesses: int
    correct: int
    accuracy: float | None
    seconds: float


def _sites(root: Path, divisor: float) -> tuple[list[PartyNode], Path]:
    sites = digits_demo.SITES
    init_federation(out=root / "certs", parties=list(sites), coordinators=["analyst"])
    split = digits_demo.load_digits_split()
    toml = digits_demo.write_sites(root, split, budget=1000.0, delta=DELTA)
    nodes = []
    for name in sites:
        peers = [p for p in sites if p != name]
        cfg = root / name / "party.toml"
        cfg.write_text(
            f'id = "{name}"\nlisten = "127.0.0.1:0"\nledger = "ledger.sqlite"\n[tls]\n'
            f'ca = "../certs/ca.pem"\ncert = "../certs/{name}.pem"\nkey = "../certs/{name}.key"\n'
            f'coordinators = ["analyst"]\npeers = {json.dumps(peers)}\n{toml[name]}\n'
        )
        config = load_party_config(cfg)
        node = PartyNode(
            config, test_only_noise_divisor=divisor, create_ledger=not config.ledger.exists()
        )
        node.start()
        nodes.append(node)
    fed = root / "federation.toml"
    fed.write_text(
        'coordinator = "analyst"\ncolluders = 1\ndeadline_s = 120\n[tls]\n'
        'ca = "certs/ca.pem"\ncert = "certs/analyst.pem"\nkey = "certs/analyst.key"\n'
        + "".join(
            f'[[parties]]\nid = "{n}"\naddress = "127.0.0.1:{node.port}"\n'
            for n, node in zip(sites, nodes, strict=True)
        )
    )
    return nodes, fed


def one_run(
    *,
    epsilon: float,
    divisor: float,
    canaries: int,
    kind: str,
    confidence: float,
    seed: int,
    epochs: float = 20.0,
    allow_untestable: bool = False,
) -> Row:
    """One audit run on fresh sites. Raises UntestableAuditError (before the sites are
    asked) for a claim at or above the ceiling unless ``allow_untestable``."""
    split = digits_demo.load_digits_split()
    with tempfile.TemporaryDirectory(prefix="mpcdp-audit-") as tmp:
        nodes, fed_path = _sites(Path(tmp), divisor)
        try:
            t0 = time.perf_counter()
            with Federation.from_config(fed_path) as fed:
                result = fed.train(
                    dataset="digits",
                    model="mlp:64,128,10",
                    target_epsilon=epsilon,
                    target_delta=DELTA,
                    epochs=epochs,
                    batch_size=64,
                    learning_rate=0.03,
                    max_grad_norm=1.0,
                    eval_data=split.test,
                    seed=seed,
                    audit_canaries=canaries,
                    audit_kind=kind,
                    audit_confidence=confidence,
                    allow_untestable=allow_untestable,
                )
            seconds = time.perf_counter() - t0
        finally:
            for node in nodes:
                node.stop(0)
    a = result.audit
    assert a is not None and a.claimed_epsilon is not None
    return Row(
        noise="honest" if divisor == 1 else ("none" if math.isinf(divisor) else f"std/{divisor:g}"),
        claimed_epsilon=a.claimed_epsilon,
        ceiling=a.ceiling,
        lower_bound=a.epsilon_lower_bound,
        fraction=a.epsilon_lower_bound / a.claimed_epsilon,
        confidence=a.confidence,
        m=a.m,
        guesses=a.guesses,
        correct=a.correct,
        accuracy=result.final_accuracy,
        seconds=seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=1000, help="per site")
    ap.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    ap.add_argument("--broken", type=float, nargs="*", default=[math.inf, 10.0])
    ap.add_argument("--broken-epsilon", type=float, default=1.0)
    ap.add_argument("--kind", default="white-box", choices=["white-box", "black-box"])
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--allow-untestable", action="store_true", help="run untestable claims")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    runs = [(e, 1.0) for e in args.epsilons] + [(args.broken_epsilon, d) for d in args.broken]
    rows: list[Row] = []
    print(
        f"{args.kind} one-run audit on digits, {args.canaries} canaries per site x 3 sites, "
        f"delta {DELTA:g}, confidence {args.confidence:g}"
    )
    print(
        f"{'noise':>8} {'claimed eps':>11} {'ceiling':>7} {'audit lb':>9} {'fraction':>8} "
        f"{'m':>5} {'guesses':>7} {'correct':>7} {'test acc':>8} {'seconds':>7}"
    )
    groups: list[list[Row]] = []
    refused: list[dict[str, Any]] = []
    for eps, divisor in runs:
        group = []
        for rep in range(args.repeats):
            try:
                row = one_run(
                    epsilon=eps,
                    divisor=divisor,
                    canaries=args.canaries,
                    kind=args.kind,
                    confidence=args.confidence,
                    seed=args.seed + rep,
                    epochs=args.epochs,
                    allow_untestable=args.allow_untestable,
                )
            except UntestableAuditError as exc:
                c = exc.check
                refused.append(
                    {"target_epsilon": eps, "divisor": divisor} | asdict(c) | {"text": c.text()}
                )
                print(
                    f"{'-':>8} {c.claimed_epsilon:11.3f} {c.ceiling:7.3f}  refused before the "
                    f"run, untestable: {c.advice.text(sites=c.sites)}",
                    flush=True,
                )
                break  # the same claim is refused at every repeat
            group.append(row)
            acc = f"{row.accuracy:.4f}" if row.accuracy is not None else "n/a"
            print(
                f"{row.noise:>8} {row.claimed_epsilon:11.3f} {row.ceiling:7.3f} "
                f"{row.lower_bound:9.3f} {row.fraction:8.1%} {row.m:5d} {row.guesses:7d} "
                f"{row.correct:7d} {acc:>8} {row.seconds:7.1f}",
                flush=True,
            )
        if group:
            rows.extend(group)
            groups.append(group)
    if args.repeats > 1:
        print(f"\nover {args.repeats} runs each: audit lower bound mean [min, max], fraction")
        for group in groups:
            lbs = [r.lower_bound for r in group]
            mean = sum(lbs) / len(lbs)
            claim = group[0].claimed_epsilon
            print(
                f"{group[0].noise:>8} claimed {claim:6.3f}: {mean:6.3f} "
                f"[{min(lbs):.3f}, {max(lbs):.3f}]  {mean / claim:6.1%}"
            )
    honest_ok = all(r.lower_bound <= r.claimed_epsilon for r in rows if r.noise == "honest")
    print(f"honest rows below their claim: {honest_ok}")
    if args.json is not None:
        out: dict[str, Any] = {"args": vars(args) | {"json": str(args.json)}}
        out["rows"] = [asdict(r) for r in rows]
        out["refused"] = refused
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0 if honest_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
