"""Chaos: a query load against real party processes while a script kills, stops (SIGSTOP),
resumes and restarts random parties (a fixed seed chooses what it does; when depends on the
machine). Afterwards every party's ledger must hold exactly the releases it took part in:
each released query at every party of its roster, each failed round where the coordinator
saw the party's charge, nothing else (a party that got a Contribute and gave no answer may
have charged: only its ledger knows, and it may hold that round or not).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mpcdp.errors import MpcdpError, RoundAborted
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.protocol.query.round_coordinator import QueryFailed
from tests.integration.test_dropouts import PARTIES, charges, datasets_toml_of, federation

pytestmark = pytest.mark.slow

SEED = 20261207
CHAOS_S = 6.0


def _chaos(net: LocalFederation, stop: threading.Event, done: list[tuple[str, str]]) -> None:
    """Kill, stop, resume and restart random parties until ``stop`` is set: mostly one
    party down at a time (a quarter of the time a second one goes down too)."""
    rng = random.Random(SEED)  # test schedule, not a secret
    state = dict.fromkeys(PARTIES, "up")
    while not stop.wait(rng.uniform(0.3, 0.9)):
        down = [q for q in PARTIES if state[q] != "up"]
        p = rng.choice(PARTIES)
        if state[p] == "up" and down and rng.random() < 0.75:
            p = rng.choice(down)  # bring one back instead
        if state[p] == "up":
            action = rng.choice(("kill", "stop"))
            if action == "kill":
                net.kill(p)
                state[p] = "dead"
            else:
                net.processes[p].send_signal(signal.SIGSTOP)
                state[p] = "stopped"
        elif state[p] == "stopped":
            action = "resume"
            net.processes[p].send_signal(signal.SIGCONT)
            state[p] = "up"
        else:
            action = "restart"
            net.restart(p)
            state[p] = "up"
        done.append((p, action))


def test_ledgers_hold_exactly_the_releases_each_party_took_part_in(tmp_path: Path) -> None:
    net = launch(workdir=tmp_path, datasets_toml=datasets_toml_of(tmp_path), deadline_s=2.0)
    released: dict[str, tuple[str, ...]] = {}
    rounds: list[dict[str, Any]] = []
    failed = 0
    actions: list[tuple[str, str]] = []
    stop = threading.Event()
    chaos = threading.Thread(target=_chaos, args=(net, stop, actions), daemon=True)
    try:
        with federation(net, min_parties=2) as fed:
            chaos.start()
            end = time.monotonic() + CHAOS_S
            i = 0
            while time.monotonic() < end:
                i += 1
                try:
                    res = fed.sum(
                        dataset="raises", column="raise", epsilon=0.01, query_id=f"chaos-{i}"
                    )
                except QueryFailed as exc:
                    failed += 1
                    rounds += [a.to_json() for a in exc.attempts]
                except RoundAborted as exc:  # a failure of the first round's query itself
                    failed += 1
                    rounds.append(
                        {
                            "query_id": exc.query_id,
                            "charged": exc.charged or {},
                            "unknown": list(exc.unknown),
                        }
                    )
                except MpcdpError:  # e.g. no party answered Describe
                    failed += 1
                else:
                    released[res.query_id] = res.parties
                    rounds += list(res.failed_rounds)
        stop.set()
        chaos.join(timeout=60)
        # everyone back: the stopped read what waited for them (and refuse it)
        for p, proc in net.processes.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            else:
                net.restart(p)
        with federation(net) as fed:
            fed.describe()
        time.sleep(0.5)
        ledgers = {p: charges(net, p) for p in PARTIES}
    finally:
        stop.set()
        for proc in net.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        net.stop()
    assert {a for _, a in actions} >= {"kill", "stop"}, actions
    assert released, (failed, actions)
    for p in PARTIES:
        ledger = ledgers[p]
        took_part = {q for q, roster in released.items() if p in roster}
        reported = {r["query_id"] for r in rounds if p in r["charged"]}
        maybe = {r["query_id"] for r in rounds if p in r["unknown"]}
        assert took_part | reported <= set(ledger), (p, took_part | reported - set(ledger))
        assert set(ledger) <= took_part | reported | maybe, (p, set(ledger) - took_part)
        for q in took_part:  # each release notes its roster
            assert ledger[q].endswith(f"[parties {','.join(released[q])}]") or (
                f"[parties {','.join(released[q])}; re-run" in ledger[q]
            )
