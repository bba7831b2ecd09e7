"""The command line as a user runs it: certs, party serve (via localnet), query, budget, health."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mpcdp.cli.app import app
from mpcdp.local.localnet import LocalFederation, launch

pytestmark = pytest.mark.slow


#: the installed console script, as a user runs it (pip install -e . puts it beside python)
MPCDP = str(Path(sys.executable).parent / "mpcdp")


def mpcdp(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MPCDP, *args], capture_output=True, text=True, check=check)


def test_the_command_and_python_m_mpcdp_and_plain_help() -> None:
    assert mpcdp("--version").stdout.startswith("mpcdp ")
    as_module = subprocess.run(
        [sys.executable, "-m", "mpcdp", "--version"], capture_output=True, text=True, check=True
    )
    assert as_module.stdout.startswith("mpcdp ")
    # the help texts: the same app in this process (a new process for each adds nothing)
    helps = {}
    for cmd in (["query", "mean"], ["budget"], ["health"], ["certs", "init"], ["party", "serve"]):
        shown = CliRunner().invoke(app, [*cmd, "--help"])
        assert shown.exit_code == 0, shown.output
        helps[cmd[0]] = shown.stdout
        assert "<bool>" not in shown.stdout, cmd  # flags take no value
        assert "--help" in shown.stdout
    health_help = helps["health"]
    for flag in ("--ca", "--cert", "--key", "--timeout"):
        line = next(li for li in health_help.splitlines() if li.strip().startswith(flag))
        assert len(line.split()) > 2, line  # each has a help text


def test_certs_init(tmp_path: Path) -> None:
    out = mpcdp(
        "certs",
        "init",
        "--out",
        str(tmp_path / "c"),
        "--parties",
        "a,b",
        "--coordinators",
        "z",
        "--host",
        "a=a.example.org",
    )
    assert "CA:" in out.stdout
    for name in ("ca", "a", "b", "z"):
        assert (tmp_path / "c" / f"{name}.pem").exists()
        assert stat.S_IMODE(os.stat(tmp_path / "c" / f"{name}.key").st_mode) == 0o600
    again = mpcdp(
        "certs",
        "init",
        "--out",
        str(tmp_path / "c"),
        "--parties",
        "a",
        "--coordinators",
        "z",
        check=False,
    )
    assert again.returncode == 2 and "already holds a CA" in again.stderr
    assert "--force" in again.stderr
    bad = mpcdp(
        "certs",
        "init",
        "--out",
        str(tmp_path / "d"),
        "--parties",
        "Bad_Name",
        "--coordinators",
        "z",
        check=False,
    )
    assert bad.returncode == 2 and "Bad_Name" in bad.stderr


def _launch_t(root: Path) -> LocalFederation:
    """Three party processes with a small table 't' (columns raise and team)."""
    toml = {}
    for i, p in enumerate(("alice", "bob", "carlos")):
        (root / p).mkdir()
        (root / p / "t.csv").write_text(f"raise,team\n{1000 + i},red\n{2000 + i},blue\n")
        toml[p] = (
            '[datasets.t]\npath = "t.csv"\nepsilon = 2.0\ndelta = 1e-6\nallow_exact = true\n'
            "[datasets.t.columns.raise]\nlower = 0\nupper = 5000\n"
            '[datasets.t.columns.team]\ncategories = ["red", "blue"]\n'
        )
    return launch(workdir=root, datasets_toml=toml)


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[LocalFederation]:
    """A federation of its own for each test (they spend budget and stop parties)."""
    with _launch_t(tmp_path) as net:
        yield net


@pytest.fixture(scope="module")
def untouched_fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """One federation for the tests whose queries are refused before any party is asked."""
    with _launch_t(tmp_path_factory.mktemp("untouched")) as net:
        yield net


def test_query_commands_json(fed: LocalFederation) -> None:
    f = str(fed.federation_config)
    exact = json.loads(
        mpcdp(
            "query",
            "mean",
            "--federation",
            f,
            "--dataset",
            "t",
            "--column",
            "raise",
            "--mechanism",
            "none",
            "--json",
        ).stdout
    )
    assert exact["value"] == pytest.approx((3003 + 6003) / 6)
    assert set(exact) >= {"value", "epsilon_spent", "noise_scale", "parties", "budget_remaining"}
    dp = json.loads(
        mpcdp(
            "query",
            "sum",
            "--federation",
            f,
            "--dataset",
            "t",
            "--column",
            "raise",
            "--epsilon",
            "0.5",
            "--json",
        ).stdout
    )
    assert dp["epsilon_spent"] == 0.5 and dp["budget_remaining"] == {
        "alice": 1.5,
        "bob": 1.5,
        "carlos": 1.5,
    }
    hist = json.loads(
        mpcdp(
            "query",
            "histogram",
            "--federation",
            f,
            "--dataset",
            "t",
            "--column",
            "team",
            "--epsilon",
            "0.5",
            "--json",
        ).stdout
    )
    assert set(hist["value"]) == {"red", "blue"}
    cnt = mpcdp(
        "query",
        "count",
        "--federation",
        f,
        "--dataset",
        "t",
        "--epsilon",
        "0.5",
        "--mechanism",
        "skellam",
    )
    assert "count of t.* =" in cnt.stdout and "budget left at bob" in cnt.stdout


def test_query_errors_are_clear(fed: LocalFederation) -> None:
    f = str(fed.federation_config)
    over = mpcdp(
        "query",
        "sum",
        "--federation",
        f,
        "--dataset",
        "t",
        "--column",
        "raise",
        "--epsilon",
        "5",
        check=False,
    )
    assert over.returncode == 1 and "privacy budget exceeded for dataset='t'" in over.stderr
    bad = mpcdp(
        "query",
        "sum",
        "--federation",
        f,
        "--dataset",
        "t",
        "--column",
        "raise",
        "--mechanism",
        "laplace",
        check=False,
    )
    assert bad.returncode == 2 and "laplace" in bad.stderr
    missing = mpcdp(
        "query",
        "sum",
        "--federation",
        str(fed.workdir / "nope.toml"),
        "--dataset",
        "t",
        "--epsilon",
        "1",
        check=False,
    )
    assert missing.returncode == 1 and "nope.toml: cannot read" in missing.stderr
    numeric = mpcdp("query", "histogram", "--federation", f, "--dataset", "t", "--column",
                    "raise", "--epsilon", "0.5", check=False)  # fmt: skip
    assert numeric.returncode == 1 and "is numeric" in numeric.stderr
    assert "not categorical" in numeric.stderr
    # a query never spends a budget the analyst did not name
    unnamed = mpcdp(
        "query", "mean", "--federation", f, "--dataset", "t", "--column", "raise", check=False
    )  # fmt: skip
    assert unnamed.returncode == 2 and "--epsilon" in unnamed.stderr
    assert "is required" in unnamed.stderr


def test_budget_and_health_commands(fed: LocalFederation) -> None:
    f = str(fed.federation_config)
    # the queries that fill the ledger, through the query command's app in this process
    # (the query commands as processes: test_query_commands_json)
    runs = [
        *[["sum", "--epsilon", "0.1"]] * 3,
        ["mean", "--mechanism", "none"],
        *[["sum", "--mechanism", "skellam", "--epsilon", "0.5"]] * 2,
    ]
    for statistic, *options in runs:
        ran = CliRunner().invoke(
            app,
            ["query", statistic, "--federation", f, "--dataset", "t", "--column", "raise",
             *options],
        )  # fmt: skip
        assert ran.exit_code == 0, ran.output
    out = json.loads(mpcdp("budget", "--config", str(fed.party_configs["alice"]), "--json").stdout)
    t = out["party"] == "alice" and out["datasets"]["t"]
    assert t["pure_epsilon_spent"] == "0.3"  # three 0.1s, exactly
    assert t["queries"] == 6 and t["exact_queries"] == 1  # the exact mean is one query
    entries = t["entries"]
    assert [e["mechanism"] for e in entries] == ["pure DP"] * 3 + ["exact (no DP)"] + [
        "skellam"
    ] * 2
    s1, s2 = entries[4], entries[5]
    assert s2["rdp_total_after"] < s1["rdp_epsilon_alone"] + s2["rdp_epsilon_alone"]
    assert t["spent_epsilon"] == pytest.approx(0.3 + s2["rdp_total_after"], rel=1e-9)
    text = mpcdp("budget", "--config", str(fed.party_configs["alice"])).stdout
    assert "6 queries (1 exact, no DP)" in text and "epsilon 0.1" in text
    assert "sum of raise (discrete-laplace)" in text and "mean of raise (none)" in text
    assert "RDP charges compose" in text and "0.30000000000000004" not in text
    certs = fed.workdir / "certs"
    mpcdp("certs", "init", "--out", str(fed.workdir / "other"), "--parties", "bob",
          "--coordinators", "analyst")  # fmt: skip
    other = fed.workdir / "other"

    def health(port: int, name: str, ca: Path, mine: Path) -> subprocess.CompletedProcess[str]:
        return mpcdp(
            "health", "--address", f"127.0.0.1:{port}", "--name", name, "--ca", str(ca),
            "--cert", str(mine / "analyst.pem"), "--key", str(mine / "analyst.key"),
            "--timeout", "5", check=False,
        )  # fmt: skip

    bob = fed.ports["bob"]
    ok = health(bob, "bob", certs / "ca.pem", certs)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    wrong_name = health(bob, "carlos", certs / "ca.pem", certs)
    assert wrong_name.returncode == 1 and "NOT SERVING (NAME)" in wrong_name.stdout
    assert "not 'carlos''s" in wrong_name.stdout
    their_ca = health(bob, "bob", other / "ca.pem", other)
    assert their_ca.returncode == 1 and "NOT SERVING (TLS)" in their_ca.stdout
    assert "not signed by your CA" in their_ca.stdout
    our_cert = health(bob, "bob", certs / "ca.pem", other)
    assert our_cert.returncode == 1 and "did not accept your certificate" in our_cert.stdout
    # an analyst whose certificate comes from another CA is told so, not "Socket closed"
    stranger = fed.workdir / "stranger.toml"
    stranger.write_text(
        fed.federation_config.read_text()
        .replace('"certs/analyst.', '"other/analyst.')
        .replace("'certs/analyst.", "'other/analyst.")
    )
    refused = mpcdp("query", "sum", "--federation", str(stranger), "--dataset", "t",
                    "--column", "raise", "--epsilon", "0.1", check=False)  # fmt: skip
    assert refused.returncode == 1 and "TLS handshake" in refused.stderr, refused.stderr
    assert "did not accept your certificate" in refused.stderr
    fed.kill("bob")
    down = health(bob, "bob", certs / "ca.pem", certs)
    assert down.returncode == 1 and "NOT SERVING (REFUSED)" in down.stdout
    assert "nothing listens" in down.stdout


def test_party_serve_refuses_a_broken_config(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('id = "alice"\nlisten = "127.0.0.1:0"\n')
    out = mpcdp("party", "serve", "--config", str(cfg), check=False)
    assert out.returncode == 1 and "p.toml: tls: is required" in out.stderr
    cfg.write_text("id = [")
    out = mpcdp("party", "serve", "--config", str(cfg), check=False)
    assert out.returncode == 1 and "not valid TOML" in out.stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--epsilon", "1e-300"], "exact range"),
        (["--epsilon", "1e9"], "must be <= 100"),
        (["--mechanism", "skellam", "--epsilon", "1e-300"], "exact range"),
    ],
)
def test_query_parameters_outside_the_samplers_range_are_clear_errors(
    untouched_fed: LocalFederation, extra: list[str], needle: str
) -> None:
    """Refused at the analyst, before any party is asked (was a ZeroDivisionError
    traceback for 1e-300); the parties' ledgers stay empty."""
    f = str(untouched_fed.federation_config)
    out = mpcdp(
        "query", "sum", "--federation", f, "--dataset", "t", "--column", "raise", *extra,
        check=False,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    for config in untouched_fed.party_configs.values():
        ledger = CliRunner().invoke(app, ["budget", "--config", str(config), "--json"])
        assert json.loads(ledger.stdout)["datasets"]["t"]["queries"] == 0


def test_party_check_shows_the_owner_what_the_coordinator_is_not_told(tmp_path: Path) -> None:
    from tests.conftest import build_net

    net = build_net(tmp_path, start=False, csv_override={"bob": "raise,dept\n9000,eng\n"})
    net.stop()
    good = mpcdp("party", "check", "--config", str(tmp_path / "alice.toml"))
    assert good.returncode == 0 and "raises: ok" in good.stdout
    # by default an out-of-bounds value is clipped: the dataset is usable, the log counts it
    clipped = mpcdp("party", "check", "--config", str(tmp_path / "bob.toml"))
    assert clipped.returncode == 0 and "raises: ok" in clipped.stdout
    assert "9000" not in clipped.stdout + clipped.stderr
    # the owner's policy "error" refuses the file instead, and says why to the owner only
    bob = tmp_path / "bob.toml"
    toml = bob.read_text()
    assert toml.count("upper = 5000\n") == 1
    bob.write_text(toml.replace("upper = 5000\n", 'upper = 5000\nout_of_bounds = "error"\n'))
    bad = mpcdp("party", "check", "--config", str(tmp_path / "bob.toml"), check=False)
    assert bad.returncode == 1
    assert (
        "raises: UNAVAILABLE" in bad.stdout and "9000 is outside the declared bounds" in bad.stdout
    )
    assert "bob.csv" in bad.stdout
    broken = mpcdp("party", "check", "--config", str(tmp_path / "nope.toml"), check=False)
    assert broken.returncode == 1 and "cannot read" in broken.stderr


def test_party_serve_says_where_it_serves(tmp_path: Path) -> None:
    from tests.conftest import build_net

    net = build_net(tmp_path, start=False, csv_override={"bob": "raise,dept\nnan,eng\n"})
    net.stop()
    port_file = tmp_path / "bob.port"
    proc = subprocess.Popen(
        [MPCDP, "party", "serve", "--config", str(tmp_path / "bob.toml"),
         "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        port = port_file.read_text().strip()
        assert first.startswith(f"party bob serving on 127.0.0.1:{port} (mutual TLS)"), first
        rest = [proc.stdout.readline() for _ in range(2)]
        assert "ledger" in rest[0] and "analyst" in rest[0]
        # the owner sees that a dataset is unusable; the details stay in the log (stderr)
        assert "dataset raises: UNAVAILABLE" in rest[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
