"""Fixtures: real party nodes (in-process gRPC servers with mTLS) and their certificates."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mpcdp.config.party_config import TlsConfig, load_federation_config, load_party_config
from mpcdp.party.node import PartyNode
from mpcdp.proto import party_pb2_grpc as pb_grpc
from mpcdp.protocol.query.query_spec import QuerySpec, Statistic
from mpcdp.transport import tls
from mpcdp.transport.cert_files import init_federation
from mpcdp.transport.client import GrpcPartyClient

PARTIES = ("alice", "bob", "carlos")
ROWS = {"alice": [3800.0, 100.0], "bob": [2514.0], "carlos": [2982.0, 3390.0]}
DEPTS = {"alice": ["eng", "ops"], "bob": ["ops"], "carlos": ["eng", "eng"]}


@dataclass
class Net:
    root: Path
    nodes: dict[str, PartyNode]
    federation: Path

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop(0)


def party_toml(
    p: str,
    parties: tuple[str, ...],
    *,
    budget: float = 3.0,
    extra: str = "",
    allow_exact: bool = True,
    cap: float | None = None,
) -> str:
    peers = [q for q in parties if q != p]
    return (
        textwrap.dedent(
            f"""
        id = "{p}"
        listen = "127.0.0.1:0"
        ledger = "{p}.sqlite"
        [tls]
        ca = "certs/ca.pem"
        cert = "certs/{p}.pem"
        key = "certs/{p}.key"
        coordinators = ["analyst", "other"]
        peers = {json.dumps(peers)}
        [datasets.raises]
        path = "{p}.csv"
        epsilon = {budget}
        delta = 1e-6
        allow_exact = {str(allow_exact).lower()}
        {"" if cap is None else f"max_epsilon_per_query = {cap}"}
        [datasets.raises.columns.raise]
        lower = 0
        upper = 5000
        [datasets.raises.columns.dept]
        categories = ["eng", "ops"]
        """
        )
        + extra
    )


def vector_datasets(
    root: Path, name: str, vectors: dict[str, np.ndarray], *, epsilon: float = 5.0
) -> dict[str, str]:
    """Save each party's vector as ROOT/PARTY-NAME.npy; return the `extra` TOML for build_net."""
    extra = {}
    for p, v in vectors.items():
        np.save(root / f"{p}-{name}.npy", v)
        extra[p] = (
            f'\n[datasets.{name}]\npath = "{p}-{name}.npy"\nepsilon = {epsilon}\n'
            "delta = 1e-5\nallow_exact = true\nl2_bound = 1.0\n"
        )
    return extra


def localnet_vectors(workdir: Path, d: int, *, extra: str = "") -> dict[str, str]:
    """Each of PARTIES' dataset 'v', d zeros at WORKDIR/PARTY/v.npy, as localnet.launch's
    ``datasets_toml`` (each party's TOML followed by ``extra``)."""
    out = {}
    for p in PARTIES:
        (workdir / p).mkdir(parents=True, exist_ok=True)
        np.save(workdir / p / "v.npy", np.zeros(d))
        out[p] = (
            '[datasets.v]\npath = "v.npy"\nepsilon = 10.0\ndelta = 1e-5\n'
            "allow_exact = true\nl2_bound = 1.0\n" + extra
        )
    return out


def exact_vector_spec(query_id: str) -> QuerySpec:
    """An exact (mechanism none) sum of PARTIES' vector dataset 'v': the query the transport
    tests propose where only the session, its slot and its upload matter."""
    return QuerySpec(
        query_id=query_id,
        dataset="v",
        column="",
        statistic=Statistic.SUM,
        mechanism="none",
        epsilon="0",
        parties=PARTIES,
        l2_bound=1.0,
        lower=0,
        upper=0,
    )


def coordinator_creds(root: Path, name: str = "analyst") -> tls.Credentials:
    """The mTLS credentials of coordinator ``name`` from ROOT/certs."""
    return tls.load_credentials(
        TlsConfig(
            ca=root / "certs/ca.pem",
            cert=root / f"certs/{name}.pem",
            key=root / f"certs/{name}.key",
        )
    )


def raw_stub(
    root: Path, port: int, *, party: str = "alice", coordinator: str = "analyst"
) -> tuple[pb_grpc.PartyStub, grpc.Channel]:
    """A Party stub over mTLS as ``coordinator``, for tests that speak the proto directly."""
    ch = tls.channel(
        f"127.0.0.1:{port}", creds=coordinator_creds(root, coordinator), server_name=party
    )
    return pb_grpc.PartyStub(ch), ch


def unread_channel(root: Path, port: int, party: str, coordinator: str = "analyst") -> grpc.Channel:
    """A channel to ``party`` as ``coordinator`` whose receive window stays at HTTP/2's 64 KiB
    (no BDP probing): an upload its caller does not read stays in flight at the party."""
    creds = coordinator_creds(root, coordinator)
    cc = grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem, private_key=creds.key_pem, certificate_chain=creds.cert_pem
    )
    options = [
        *tls.GRPC_OPTIONS,
        ("grpc.ssl_target_name_override", party),
        ("grpc.http2.bdp_probe", 0),
    ]
    return grpc.secure_channel(f"127.0.0.1:{port}", cc, options=options)


def write_federation(
    root: Path, ports: dict[str, int], *, coordinator: str = "analyst", deadline: float = 20
) -> Path:
    path = root / f"federation-{coordinator}.toml"
    path.write_text(
        f'coordinator = "{coordinator}"\ncolluders = 1\ndeadline_s = {deadline}\n[tls]\n'
        f'ca = "certs/ca.pem"\ncert = "certs/{coordinator}.pem"\nkey = "certs/{coordinator}.key"\n'
        + "".join(
            f'[[parties]]\nid = "{p}"\naddress = "127.0.0.1:{port}"\n' for p, port in ports.items()
        )
    )
    return path


def build_net(
    root: Path,
    *,
    budgets: dict[str, float] | None = None,
    extra: dict[str, str] | None = None,
    csv_override: dict[str, str] | None = None,
    allow_exact: dict[str, bool] | None = None,
    cap: dict[str, float] | None = None,
    start: bool = True,
    model_factory: Any = None,
    node_options: dict[str, Any] | None = None,
) -> Net:
    init_federation(out=root / "certs", parties=list(PARTIES), coordinators=["analyst", "other"])
    nodes = {}
    for p in PARTIES:
        text = "raise,dept\n" + "".join(
            f"{r},{d}\n" for r, d in zip(ROWS[p], DEPTS[p], strict=True)
        )
        (root / f"{p}.csv").write_text((csv_override or {}).get(p, text))
        cfg = root / f"{p}.toml"
        cfg.write_text(
            party_toml(
                p,
                PARTIES,
                budget=(budgets or {}).get(p, 3.0),
                extra=(extra or {}).get(p, ""),
                allow_exact=(allow_exact or {}).get(p, True),
                cap=(cap or {}).get(p),
            )
        )
        node = PartyNode(
            load_party_config(cfg),
            model_factory=model_factory,
            create_ledger=True,
            **(node_options or {}),
        )
        if start:
            node.start()
        nodes[p] = node
    ports = {p: n.port or 0 for p, n in nodes.items()}
    return Net(root=root, nodes=nodes, federation=write_federation(root, ports))  # type: ignore[arg-type]


def pytest_configure(config: pytest.Config) -> None:
    """One OpenMP/torch thread per process, for the test processes and every process they
    start (party nodes, demos, the command line), unless the caller set OMP_NUM_THREADS.
    The suite already runs one test process per core (pytest -n auto); with torch's default,
    a thread pool on every core in every process, the pools oversubscribe the cores and spin
    waiting for each other (measured on 2 cores: a micro-batched clipping step 10-25x
    slower, the CNN demo's run 95 s instead of 43 s)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = build_net(tmp_path)
    try:
        yield n
    finally:
        n.stop()


def coordinator_clients(
    federation_config: Path, workdir: Path, name: str, *, deadline_s: float
) -> list[GrpcPartyClient]:
    """One client per party of ``federation_config``, calling as ``name``."""
    creds = coordinator_creds(workdir, name)
    return [
        GrpcPartyClient(party_id=p.id, address=p.address, creds=creds, deadline_s=deadline_s)
        for p in load_federation_config(federation_config).parties
    ]


def with_default_sigint(cmd: list[str]) -> list[str]:
    """``cmd`` run by a small Python process that first gives SIGINT its default disposition,
    unblocked, whatever this test process inherited or a library set (an ignored or blocked
    SIGINT is inherited across exec; the child would never see it), then becomes ``cmd``.
    Not Popen's ``preexec_fn``: that makes Popen fork() in a process whose gRPC is running,
    and gRPC's fork handler can abort the child before exec (see mpcdp.local.localnet)."""
    code = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
        "os.execvp(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code, *cmd]


def stop_process(proc: Any, *, timeout_s: float = 10.0) -> None:
    """SIGSTOP ``proc`` (a Popen) and wait until every one of its threads is stopped. The
    signal alone is not enough: it stops a multi-threaded process only once one of its
    threads takes it, and under load the others may run on for tens of milliseconds (and,
    say, read a request sent after the signal)."""
    import signal
    import time

    proc.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{proc.pid}/task")
    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for task in tasks.iterdir():
            try:  # "pid (comm) S ...": the state follows the last ')'
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue  # a thread that ended meanwhile
        if states and all(state in ("T", "t") for state in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {proc.pid} not stopped after {timeout_s} s: {states}")
        time.sleep(0.001)


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Net]:
    """Three training sites' nodes, not serving (their engines are called in-process), each
    with the training tests' examples as dataset ``ex``."""
    from tests.training_support import examples_toml  # training_support imports this module

    n = build_net(tmp_path, start=False, extra=examples_toml(tmp_path))
    try:
        yield n
    finally:
        n.stop()
