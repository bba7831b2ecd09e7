"""The federation walkthrough of docs/federation.md, run as written.

The shell and TOML blocks of its section "The walkthrough" are read out of the guide and run
in a fresh folder with the installed ``mpcdp`` command: three party processes on loopback and an
analyst. The only changes are the ones a reader makes on one machine: each party listens on
127.0.0.1 (a free port) instead of 0.0.0.0:50051, and the analyst's federation.toml and the
health check use those addresses instead of the example host names.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "federation.md"
PARTIES = ("alice", "bob", "carlos")
EXAMPLE_HOSTS = {
    "alice": "alice.example.org:50051",
    "bob": "10.0.0.12:50051",
    "carlos": "carlos.example.org:50051",
}


def blocks(tag: str) -> list[str]:
    """The fenced blocks of the guide's walkthrough whose info string is ``tag``, in order."""
    text = GUIDE.read_text()
    start = text.index("## The walkthrough")
    section = text[start : text.index("\n## ", start + 1)]
    found = []
    for m in re.finditer(r"^( *)```([^\n]*)\n(.*?)^\1```", section, flags=re.S | re.M):
        if m.group(2).strip() == tag:
            indent = m.group(1)
            found.append("".join(line.removeprefix(indent) for line in m.group(3).splitlines(True)))
    return found


def run_sh(script: str, cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, f"{script}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out.stdout


def test_the_federation_walkthrough_runs_as_written(tmp_path: Path) -> None:
    sh = blocks("sh walkthrough")
    (party_template,) = blocks("toml walkthrough-party")
    (federation,) = blocks("toml walkthrough-federation")
    assert len(sh) == 5, "certs, folders, data, queries, budget/health"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    certs, folders, data, queries, checks = sh
    for script in (certs, folders, data):
        run_sh(script, tmp_path, env)

    procs: dict[str, subprocess.Popen[str]] = {}
    ports: dict[str, int] = {}
    try:
        for p in PARTIES:
            toml = (
                party_template.replace('id = "alice"', f'id = "{p}"')
                .replace("certs/alice.", f"certs/{p}.")
                .replace("alice-ledger", f"{p}-ledger")
                .replace('listen = "0.0.0.0:50051"', 'listen = "127.0.0.1:0"')
            )
            (tmp_path / p / "party.toml").write_text(toml)
            run_sh(f"mpcdp party init --config {p}/party.toml", tmp_path, env)  # as the guide says
            procs[p] = subprocess.Popen(
                ["mpcdp", "party", "serve", "--config", f"{p}/party.toml", "--port-file",
                 f"{p}/port"],
                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        for p in PARTIES:
            port_file = tmp_path / p / "port"
            while not port_file.exists():
                assert procs[p].poll() is None, procs[p].communicate()[1]
                assert time.monotonic() < deadline, f"{p} did not start"
                time.sleep(0.05)
            ports[p] = int(port_file.read_text())
            stdout = procs[p].stdout
            assert stdout is not None
            assert f"serving on 127.0.0.1:{ports[p]}" in stdout.readline()

        def local(text: str) -> str:
            for p, host in EXAMPLE_HOSTS.items():
                text = text.replace(host, f"127.0.0.1:{ports[p]}")
            return text

        (tmp_path / "federation.toml").write_text(local(federation))
        out = run_sh(local(queries), tmp_path, env)
        assert "mean of raises.raise" in out and "sum of grads" in out
        histogram = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        assert set(histogram["value"]) == {"eng", "ops"}
        # the DP SQL query: one row per declared category, each with its interval
        table = out[out.rindex("\ndept") + 1 :].splitlines()
        assert table[0].split() == ["dept", "count", "avg_raise"]
        assert [row.split()[0] for row in table[1:3]] == ["eng", "ops"]
        checked = run_sh(local(checks), tmp_path, env)
        assert "raises: spent" in checked and "4 queries (0 exact, no DP)" in checked
        assert checked.rstrip().endswith("SERVING")
        # what the guide says about exact releases: refused by this template, naming the key
        exact = subprocess.run(
            ["mpcdp", "query", "count", "--federation", "federation.toml", "--dataset", "raises",
             "--mechanism", "none"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert exact.returncode == 1 and "allow_exact = false" in exact.stderr
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)
