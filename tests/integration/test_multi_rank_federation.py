"""A site that trains on two ranks, in a real federation.

Alice runs as two processes started the way torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT; gloo on the CPU): rank 0 is her party node, rank 1 its worker.
Bob and Carlos are ordinary single-process nodes. Every party is a real `mpcdp party serve`
process on loopback mTLS."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import RoundAborted
from mpcdp.federation import Federation
from tests.conftest import PARTIES, build_net, write_federation
from tests.training_support import MODEL, example_data, examples_toml

pytestmark = pytest.mark.slow

MPCDP = str(Path(sys.executable).parent / "mpcdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(path: Path, proc: subprocess.Popen[str], deadline: float) -> int:
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return int(path.read_text())


def test_a_two_rank_site_trains_with_the_others_and_a_dead_rank_aborts(tmp_path: Path) -> None:
    build_net(tmp_path, extra=examples_toml(tmp_path), start=False).stop()  # certs, configs
    env = dict(os.environ)
    procs: dict[str, subprocess.Popen[str]] = {}
    ranks = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")

    def start(name: str, config: str, extra_env: dict[str, str], port: bool) -> None:
        args = [MPCDP, "party", "serve", "--config", str(tmp_path / config)]
        if port:
            args += ["--port-file", str(tmp_path / f"{config}.port")]
        procs[name] = subprocess.Popen(
            args, env=extra_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    try:
        start("alice-rank1", "alice.toml", dict(ranks, RANK="1", LOCAL_RANK="1"), port=False)
        start("alice", "alice.toml", dict(ranks, RANK="0", LOCAL_RANK="0"), port=True)
        for p in PARTIES[1:]:
            start(p, f"{p}.toml", env, port=True)
        deadline = time.monotonic() + 90
        ports = {p: _wait_port(tmp_path / f"{p}.toml.port", procs[p], deadline) for p in PARTIES}
        federation = write_federation(tmp_path, ports, deadline=60)
        with Federation.from_config(federation) as fed:
            result = fed.train(
                dataset="ex", model=MODEL, target_epsilon=8.0, target_delta=1e-5, epochs=2,
                batch_size=30, learning_rate=0.1, eval_data=example_data(7, n=90), seed=2,
            )  # fmt: skip
            assert result.final_accuracy is not None and result.final_accuracy > 0.34
            # the worker dies: the next round aborts, nothing is revealed
            procs["alice-rank1"].kill()
            procs["alice-rank1"].wait()
            with pytest.raises(RoundAborted, match="worker rank"):
                fed.train(
                    dataset="ex", model=MODEL, target_epsilon=8.0, target_delta=1e-5,
                    epochs=1, batch_size=30,
                )  # fmt: skip
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    # Alice's ledger was charged block by block like the single-process sites: one charge
    # per block of the completed run (the aborted run's charges are the same at every site
    # that got that far; compare the completed run's blocks)
    charges = {}
    for p in PARTIES:
        with BudgetLedger(tmp_path / f"{p}.sqlite") as ledger:
            charges[p] = [c.query_id.split("/")[-1] for c in ledger.charges("ex")]
    assert charges["alice"][: len(charges["bob"])] == charges["bob"][: len(charges["alice"])]
    assert len(charges["alice"]) >= 2
