"""Queries that go on when a party fails, against real party processes (mpcdp party serve)
on loopback with mTLS: killed, stopped (SIGSTOP) and resumed, restarted.

Each test proves what it claims from the parties' own ledgers (read from their files).
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpcdp.config.party_config import load_federation_config
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.federation import Federation
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.protocol.query.query_spec import QuerySpec
from mpcdp.protocol.query.round_coordinator import ContributionStream, QueryFailed
from mpcdp.protocol.session import Proposal
from mpcdp.transport.client import GrpcPartyClient
from tests.conftest import stop_process

pytestmark = pytest.mark.slow

PARTIES = ("alice", "bob", "carlos")
DEADLINE_S = 2.0
SESSION_TTL_S = 4.0


def datasets_toml_of(workdir: Path) -> dict[str, str]:
    out = {}
    for i, p in enumerate(PARTIES):
        (workdir / p).mkdir(parents=True, exist_ok=True)
        (workdir / p / "raises.csv").write_text(f"raise\n{1000 * (i + 1)}\n{500 + i}\n")
        out[p] = (
            '[datasets.raises]\npath = "raises.csv"\nepsilon = 10.0\ndelta = 1e-6\n'
            "allow_exact = true\n[datasets.raises.columns.raise]\nlower = 0\nupper = 5000\n"
            # a session (and its reservation) a stopped party never hears the abort of
            # expires soon
            f"[limits]\nsession_ttl_s = {SESSION_TTL_S}\n"
        )
    return out


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("dropouts")
    fed = launch(workdir=workdir, datasets_toml=datasets_toml_of(workdir), deadline_s=DEADLINE_S)
    try:
        yield fed
    finally:
        for proc in fed.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        fed.stop()


def all_up(net: LocalFederation) -> None:
    """Every party running and answering (restart the dead, resume the stopped)."""
    for p, proc in net.processes.items():
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        else:
            net.restart(p)


def federation(net: LocalFederation, *, min_parties: int | None = None) -> Federation:
    """A federation client of ``net``, with ``min_parties`` (default: federation.toml's)."""
    config = load_federation_config(net.federation_config)
    if min_parties is not None:
        config = dataclasses.replace(config, min_parties=min_parties)
    return Federation(config)


def hook(fed: Federation, party: str, cls: type[GrpcPartyClient]) -> None:
    """Replace ``party``'s client in ``fed`` by one of class ``cls`` (fault injection)."""
    i = fed.parties.index(party)
    old = fed.clients[i]
    fed._clients[i] = cls(
        party_id=party, address=old.address, creds=fed._creds, deadline_s=DEADLINE_S
    )


def charges(net: LocalFederation, party: str) -> dict[str, str]:
    """query id -> note of every charge in ``party``'s ledger file."""
    with BudgetLedger(net.workdir / party / "ledger.sqlite") as ledger:
        return {c.query_id: c.note for c in ledger.charges("raises")}


def reserved(net: LocalFederation, party: str) -> float:
    """What ``party``'s ledger holds reserved for the analyst (its Describe: what the
    analyst may still spend, against what is left)."""
    with federation(net) as fed:
        info = next(d for d in fed.clients[PARTIES.index(party)].describe().datasets)
    return info.remaining_epsilon - info.coordinator_remaining_epsilon


def kill_after_propose(net: LocalFederation, party: str) -> type[GrpcPartyClient]:
    class Killed(GrpcPartyClient):
        def propose(self, *, session_id: bytes, spec: QuerySpec) -> Proposal:
            answer = super().propose(session_id=session_id, spec=spec)
            if len(spec.parties) == len(PARTIES):  # the first round only
                net.kill(party)  # it accepted (and reserved), then died
            return answer

    return Killed


def test_a_party_killed_mid_query_is_left_out_and_charged_nothing(net: LocalFederation) -> None:
    all_up(net)
    before = {p: charges(net, p) for p in PARTIES}
    with federation(net, min_parties=2) as fed:
        hook(fed, "carlos", kill_after_propose(net, "carlos"))
        res = fed.sum(dataset="raises", column="raise", epsilon=0.5, query_id="killed")
    assert res.parties == ("alice", "bob") and res.query_id == "killed.r1"
    assert list(res.dropped) == ["carlos"] and "UNAVAILABLE" in res.dropped["carlos"]
    assert res.failed_rounds[0]["query_id"] == "killed" and res.failed_rounds[0]["charged"] == {}
    assert res.budget_remaining == pytest.approx({"alice": 9.5, "bob": 9.5})
    # the ledgers: one charge at each contributing party, its note naming the roster and the
    # first round; nothing at carlos (its reservation died with it)
    for p in ("alice", "bob"):
        new = {q: n for q, n in charges(net, p).items() if q not in before[p]}
        assert list(new) == ["killed.r1"]
        assert new["killed.r1"].endswith("[parties alice,bob; re-run 1 of killed]")
    assert charges(net, "carlos") == before["carlos"]
    # carlos is still down: with min_parties = all (the default) the query fails before any
    # round, naming carlos and why, and charges nothing
    with federation(net) as fed, pytest.raises(QueryFailed) as info:
        fed.sum(dataset="raises", column="raise", epsilon=0.5, query_id="all-or-none")
    text = str(info.value)
    assert "min_parties=3" in text and "carlos" in text and "unreachable" in text
    assert "nothing was charged" in text
    for p in ("alice", "bob"):
        assert "all-or-none" not in charges(net, p)
    # federation.toml's min_parties, through the command line: answered by the others, and
    # the analyst is told who was left out and why
    toml = net.workdir / "federation-2.toml"
    toml.write_text("min_parties = 2\n" + net.federation_config.read_text())
    out = subprocess.run(
        [
            *(sys.executable, "-m", "mpcdp.cli", "query", "sum", "--federation", str(toml)),
            *("--dataset", "raises", "--column", "raise", "--epsilon", "0.5"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=net.workdir,
    ).stdout
    assert "budget left at alice: 9" in out and "budget left at carlos" not in out
    assert "left out: carlos (party 'carlos' is unreachable" in out


def test_no_honest_share_left_fails_and_charges_nothing(net: LocalFederation) -> None:
    all_up(net)
    before = {p: charges(net, p) for p in PARTIES}
    with federation(net, min_parties=2) as fed:
        hook(fed, "bob", kill_after_propose(net, "bob"))
        with pytest.raises(QueryFailed) as info:
            fed.sum(dataset="raises", column="raise", epsilon=0.5, colluders=2, query_id="t2")
    text = str(info.value)
    assert "n' - t = 0 < 1" in text and "bob: party 'bob' is unreachable" in text
    assert "nothing was charged" in text
    # the ledgers prove it: no charge anywhere, and the reservations of alice and carlos
    # were released by the abort
    for p in PARTIES:
        assert charges(net, p) == before[p]
    for p in ("alice", "carlos"):
        assert reserved(net, p) == pytest.approx(0.0)


def test_a_stopped_party_is_left_out_and_its_late_contribute_refused(
    net: LocalFederation,
) -> None:
    all_up(net)
    before = {p: charges(net, p) for p in PARTIES}

    class StopBeforeContribute(GrpcPartyClient):
        def contribute(self, **kw: object) -> ContributionStream:
            stop_process(net.processes["carlos"])  # alive, but answers no more
            return super().contribute(**kw)  # type: ignore[arg-type]

    with federation(net, min_parties=2) as fed:
        hook(fed, "carlos", StopBeforeContribute)
        # a DP SQL query: re-run and re-planned like any statistic
        res = fed.sql("SELECT SUM(raise) FROM raises", epsilon=0.5, query_id="stopped")
    try:
        assert res.parties == ("alice", "bob") and res.query_id == "stopped.r1"
        assert "DEADLINE_EXCEEDED" in res.dropped["carlos"]
        # alice and bob had charged the first round (their uploads left) before carlos was
        # found silent: the result reports it, and so do their ledgers
        assert res.failed_rounds[0]["charged"] == {"alice": "1/2", "bob": "1/2"}
        for p in ("alice", "bob"):
            new = set(charges(net, p)) - set(before[p])
            assert new == {"stopped", "stopped.r1"}
    finally:
        time.sleep(DEADLINE_S / 2)  # stopped well past the Contribute's deadline
        net.processes["carlos"].send_signal(signal.SIGCONT)
    # carlos now reads its Contribute, long past its deadline: refused (or dropped with its
    # cancelled call), nothing charged; its reservation is released by the coordinator's
    # abort, retried until carlos takes it, or else by its session's expiry
    with federation(net) as fed:
        fed.clients[PARTIES.index("carlos")].describe()  # it answers again
    deadline = time.monotonic() + 2 * SESSION_TTL_S
    while reserved(net, "carlos") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert charges(net, "carlos") == before["carlos"]
