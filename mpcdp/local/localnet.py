"""A federation of party-node processes on loopback, with fresh certificates.

Used by ``mpcdp demo salary``, the integration tests and the benchmarks: every party is a
separate ``mpcdp party serve`` process with its own mTLS certificate, ledger and data, exactly
as in a deployment, only all on 127.0.0.1. :meth:`LocalFederation.stop` (also on Ctrl-C, via
the context manager) terminates every process.

Layout under ``workdir``::

    certs/            ca.pem, NAME.pem, NAME.key
    NAME/party.toml   listen 127.0.0.1:0; the bound port is written to NAME/port
    NAME/...          the party's data files and ledger (created on the party's first
                      start: ``mpcdp party serve --create-ledger``; a restart opens it)
    federation.toml   the coordinator's view
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpcdp.errors import MpcdpError
from mpcdp.transport.cert_files import init_federation

__all__ = ["LocalFederation", "launch"]


@dataclass
class LocalFederation:
    workdir: Path
    federation_config: Path
    party_configs: dict[str, Path]
    ports: dict[str, int]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: RLIMIT_NOFILE of every party process (None: inherited)
    max_open_files: int | None = None

    def log(self, party: str) -> str:
        return (self.workdir / party / "node.log").read_text(errors="replace")

    def kill(self, party: str, sig: int = signal.SIGKILL) -> None:
        """Kill one party's process (fault injection)."""
        proc = self.processes[party]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def restart(self, party: str, *, timeout_s: float = 30.0) -> None:
        """Start a stopped party again on the same port, with the same ledger."""
        if self.processes[party].poll() is None:
            raise MpcdpError(f"party {party!r} is still running")
        self.processes[party] = _spawn(
            self.workdir / party,
            self.party_configs[party],
            _threads(len(self.party_configs)),
            max_open_files=self.max_open_files,
        )
        _wait_port(self.workdir / party, self.processes[party], timeout_s)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _party_toml(
    party: str, peers: Sequence[str], coordinators: Sequence[str], datasets_toml: str, ledger: str
) -> str:
    return (
        f'id = "{party}"\n'
        'listen = "127.0.0.1:0"\n'
        f"ledger = {json.dumps(ledger)}\n"
        "[tls]\n"
        'ca = "../certs/ca.pem"\n'
        f'cert = "../certs/{party}.pem"\n'
        f'key = "../certs/{party}.key"\n'
        f"coordinators = {json.dumps(list(coordinators))}\n"
        f"peers = {json.dumps(list(peers))}\n"
        f"{datasets_toml}\n"
    )


#: sets RLIMIT_NOFILE to argv[1], then becomes argv[2:]. A small process of its own rather
#: than Popen's ``preexec_fn``: a ``preexec_fn`` makes Popen fork() instead of vfork(), and in
#: a process whose gRPC is running, gRPC's fork handler restarts its poller thread in the
#: child, where Popen's close_fds then closes that poller's epoll descriptor before exec; the
#: child aborts ("epoll_wait error: Bad file descriptor") in about 1 of 60 launches.
_LIMITED_EXEC = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"
)


def _spawn(
    folder: Path,
    config: Path,
    threads: int,
    *,
    create_ledger: bool = False,
    max_open_files: int | None = None,
) -> subprocess.Popen[bytes]:
    port_file = folder / "port"
    port_file.unlink(missing_ok=True)
    log = (folder / "node.log").open("ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # all parties share this machine's cores: without a cap, each one's torch/BLAS pool would
    # take every core and the pools would thrash (4x slower training steps on 2 cores)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [
        sys.executable,
        "-m",
        "mpcdp.cli",
        "party",
        "serve",
        "--config",
        str(config),
        "--port-file",
        str(port_file),
        *(["--create-ledger"] if create_ledger else []),
    ]
    if max_open_files is not None:
        cmd = [sys.executable, "-c", _LIMITED_EXEC, str(max_open_files), *cmd]
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    finally:
        log.close()


def _threads(n_parties: int) -> int:
    return max(1, (os.cpu_count() or 1) // n_parties)


def _wait_port(folder: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    port_file = folder / "port"
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if proc.poll() is not None:
            log = (folder / "node.log").read_text(errors="replace")
            raise MpcdpError(
                f"party node in {folder} exited with {proc.returncode}:\n{log[-2000:]}"
            )
        time.sleep(0.05)
    raise MpcdpError(f"party node in {folder} did not start within {timeout_s:g} s")


def launch(
    *,
    workdir: Path,
    datasets_toml: Mapping[str, str],
    coordinator: str = "analyst",
    other_coordinators: Sequence[str] = (),
    colluders: int = 1,
    deadline_s: float = 30.0,
    startup_timeout_s: float = 60.0,
    ledgers: Mapping[str, Path] | None = None,
    max_open_files: int | None = None,
) -> LocalFederation:
    """Start one party process per key of ``datasets_toml`` (its ``[datasets...]`` TOML).

    Data files named in that TOML are relative to ``workdir/PARTY/``; write them first.
    Each party creates its ledger on its first start, at ``workdir/PARTY/ledger.sqlite`` or
    at ``ledgers[PARTY]`` (a file that must not exist yet). ``coordinator`` is
    federation.toml's; every party also admits ``other_coordinators`` (their certificates
    are made too). ``max_open_files``: each party process's RLIMIT_NOFILE (None: this
    process's).
    """
    if max_open_files is not None and (
        isinstance(max_open_files, bool)
        or not isinstance(max_open_files, int)
        or max_open_files < 64
    ):
        raise MpcdpError(f"invalid max_open_files={max_open_files!r}: must be an integer >= 64")
    parties = list(datasets_toml)
    coordinators = [coordinator, *other_coordinators]
    init_federation(out=workdir / "certs", parties=parties, coordinators=coordinators)
    fed = LocalFederation(
        workdir=workdir,
        federation_config=workdir / "federation.toml",
        party_configs={},
        ports={},
        max_open_files=max_open_files,
    )
    try:
        for p in parties:
            folder = workdir / p
            folder.mkdir(parents=True, exist_ok=True)
            cfg = folder / "party.toml"
            peers = [q for q in parties if q != p]
            ledger = str((ledgers or {}).get(p, "ledger.sqlite"))
            cfg.write_text(_party_toml(p, peers, coordinators, datasets_toml[p], ledger))
            fed.party_configs[p] = cfg
            fed.processes[p] = _spawn(
                folder,
                cfg,
                _threads(len(parties)),
                create_ledger=True,
                max_open_files=max_open_files,
            )
        for p in parties:
            fed.ports[p] = _wait_port(workdir / p, fed.processes[p], startup_timeout_s)
            # pin the port so a restart binds the same one
            cfg = fed.party_configs[p]
            cfg.write_text(
                cfg.read_text().replace(
                    'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{fed.ports[p]}"'
                )
            )
    except BaseException:
        fed.stop()
        raise
    fed.federation_config.write_text(
        f'coordinator = "{coordinator}"\n'
        f"colluders = {colluders}\n"
        f"deadline_s = {deadline_s}\n"
        "[tls]\n"
        'ca = "certs/ca.pem"\n'
        f'cert = "certs/{coordinator}.pem"\n'
        f'key = "certs/{coordinator}.key"\n'
        + "".join(
            f'[[parties]]\nid = "{p}"\naddress = "127.0.0.1:{fed.ports[p]}"\n' for p in parties
        )
    )
    return fed
