"""Faults with real party processes (mpcdp party serve) on loopback with mTLS."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from mpcdp.config.party_config import load_federation_config
from mpcdp.errors import PartyError, RoundAborted
from mpcdp.federation import Federation
from mpcdp.local.localnet import LocalFederation, launch
from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.protocol.query.round_coordinator import ContributionStream, run_round
from mpcdp.transport import tls
from mpcdp.transport.client import GrpcPartyClient
from tests.conftest import stop_process
from tests.stats import assert_uniform_words

pytestmark = pytest.mark.slow

PARTIES = ("alice", "bob", "carlos")


def _table(workdir: Path, budget: float = 3.0) -> dict[str, str]:
    out = {}
    for i, p in enumerate(PARTIES):
        (workdir / p).mkdir(parents=True, exist_ok=True)
        (workdir / p / "raises.csv").write_text(f"raise\n{1000 * (i + 1)}\n{500 + i}\n")
        out[p] = (
            f'[datasets.raises]\npath = "raises.csv"\nepsilon = {budget}\ndelta = 1e-6\n'
            "allow_exact = true\n[datasets.raises.columns.raise]\nlower = 0\nupper = 5000\n"
        )
    return out


def _vectors(workdir: Path, d: int, *, zeros: bool = False) -> dict[str, str]:
    out = {}
    rng = np.random.default_rng(3)  # test data only
    for p in PARTIES:
        (workdir / p).mkdir(parents=True, exist_ok=True)
        v = np.zeros(d) if zeros else rng.uniform(-1, 1, size=d) / np.sqrt(d)
        np.save(workdir / p / "v.npy", v)
        out[p] = (
            '[datasets.v]\npath = "v.npy"\nepsilon = 10.0\ndelta = 1e-5\n'
            "allow_exact = true\nl2_bound = 1.0\n"
        )
    return out


@pytest.fixture
def table_net(tmp_path: Path) -> Iterator[LocalFederation]:
    net = launch(workdir=tmp_path, datasets_toml=_table(tmp_path), deadline_s=10)
    try:
        yield net
    finally:
        net.stop()


def _clients(
    net: LocalFederation,
    *,
    deadline_s: float = 10,
    chunk_bytes: int = 0,
    special: dict[str, type[GrpcPartyClient]] | None = None,
) -> list[GrpcPartyClient]:
    cfg = load_federation_config(net.federation_config)
    creds = tls.load_credentials(cfg.tls)
    return [
        (special or {}).get(p.id, GrpcPartyClient)(
            party_id=p.id,
            address=p.address,
            creds=creds,
            deadline_s=deadline_s,
            chunk_bytes=chunk_bytes,
        )
        for p in cfg.parties
    ]


def _spec(**kw: object) -> QuerySpec:
    base: dict[str, object] = dict(
        query_id=f"q-{time.monotonic_ns()}",
        dataset="raises",
        column="raise",
        statistic=Statistic.SUM,
        mechanism="discrete-laplace",
        epsilon="0.5",
        parties=PARTIES,
        lower=0,
        upper=5000,
        frac_bits=8,
    )
    base.update(kw)
    return QuerySpec(**base)  # type: ignore[arg-type]


def test_party_killed_before_contribute(table_net: LocalFederation) -> None:
    class KillFirst(GrpcPartyClient):
        def contribute(
            self, *, session_id: bytes, keys: Sequence[SignedKey], ring_bits: int = 64
        ) -> ContributionStream:
            table_net.kill("alice")  # dies after Propose, before Contribute
            return super().contribute(session_id=session_id, keys=keys, ring_bits=ring_bits)

    with pytest.raises(RoundAborted) as info:
        run_round(spec=_spec(), clients=_clients(table_net, special={"alice": KillFirst}))
    cause = info.value.cause
    assert isinstance(cause, PartyError) and cause.party == "alice" and cause.code == "UNAVAILABLE"
    assert "nothing was revealed" in str(info.value)


def test_party_killed_during_contribute_reveals_nothing(tmp_path: Path) -> None:
    d = 2_000_000
    net = launch(workdir=tmp_path, datasets_toml=_vectors(tmp_path, d, zeros=True), deadline_s=30)
    try:
        seen: dict[str, list[np.ndarray]] = {p: [] for p in PARTIES}

        def observe(party: str, chunk: np.ndarray) -> None:
            seen[party].append(chunk.copy())
            if party == "bob" and len(seen["bob"]) == 1:
                net.kill("bob")

        spec = _spec(
            dataset="v", column="", mechanism="none", epsilon="0", l2_bound=1.0, lower=0, upper=0
        )
        with pytest.raises(RoundAborted) as info:
            run_round(
                spec=spec,
                clients=_clients(net, deadline_s=30, chunk_bytes=1 << 16),
                observe=observe,
            )
        cause = info.value.cause
        assert "bob" in str(cause)
        # what the coordinator did get is masked: uniformly random even though every input is 0
        for party in ("alice", "carlos"):
            got = np.concatenate(seen[party]) if seen[party] else np.zeros(0, dtype=np.uint64)
            if got.size >= 1 << 14:
                assert_uniform_words(got[: 1 << 16])
    finally:
        net.stop()


def test_party_that_never_answers_hits_the_deadline(table_net: LocalFederation) -> None:
    stop_process(table_net.processes["carlos"])  # alive, but never answers
    try:
        t0 = time.monotonic()
        with pytest.raises(RoundAborted) as info:
            run_round(spec=_spec(), clients=_clients(table_net, deadline_s=2))
        assert time.monotonic() - t0 < 30
        cause = info.value.cause
        assert (
            isinstance(cause, PartyError)
            and cause.party == "carlos"
            and cause.code == "DEADLINE_EXCEEDED"
        )
    finally:
        table_net.processes["carlos"].send_signal(signal.SIGCONT)


def test_restart_between_queries_keeps_the_ledger(table_net: LocalFederation) -> None:
    with Federation.from_config(table_net.federation_config) as fed:
        first = fed.sum(dataset="raises", column="raise", epsilon=0.5)
        assert first.budget_remaining["bob"] == pytest.approx(2.5)
    table_net.kill("bob", signal.SIGTERM)
    table_net.restart("bob")
    with Federation.from_config(table_net.federation_config) as fed:
        second = fed.sum(dataset="raises", column="raise", epsilon=0.5)
    assert second.budget_remaining == pytest.approx({"alice": 2.0, "bob": 2.0, "carlos": 2.0})
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpcdp.cli",
            "budget",
            "--config",
            str(table_net.party_configs["bob"]),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    raises = json.loads(out.stdout)["datasets"]["raises"]
    assert raises["queries"] == 2 and raises["remaining_epsilon"] == pytest.approx(2.0)


def test_ten_million_coordinate_aggregate(tmp_path: Path) -> None:
    d = 10_000_000
    net = launch(workdir=tmp_path, datasets_toml=_vectors(tmp_path, d), deadline_s=300)
    try:
        with Federation.from_config(net.federation_config) as fed:
            res = fed.sum(dataset="v", epsilon=5.0, mechanism="skellam")
        value = np.asarray(res.value)
        assert value.shape == (d,)
        truth = sum(np.load(tmp_path / p / "v.npy") for p in PARTIES)
        err = value - truth
        assert abs(err.std() / res.noise_std - 1) < 0.05
    finally:
        net.stop()
