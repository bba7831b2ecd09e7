"""A party's ledger is never silently lost, reset or split from the others' (real
``mpcdp party serve`` processes and the command line, as an operator runs them).

- a full disk under one party's ledger: no party charges, or all do (the reservation is
  written at Propose, and Contribute turns it into the charge in place);
- a ledger is created on purpose only: a missing, empty (0-byte) or content-corrupt
  ledger stops the node with a message that says how to restore it, and nothing is reset;
- ``mpcdp budget --backup`` makes a copy that restores the ledger whole;
- party.toml mistakes (a NUL in a path, the wrong CA file) are clear errors, not
  tracebacks or a silent "ok".
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import MpcdpError
from mpcdp.federation import Federation
from mpcdp.local.localnet import launch
from mpcdp.transport.cert_files import init_federation
from tests.conftest import PARTIES, party_toml

MPCDP = [sys.executable, "-m", "mpcdp.cli"]


def _mpcdp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MPCDP, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs the test mounts (the tests run as root), unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"this test needs to mount a small tmpfs (as root) to fill a disk under a "
            f"ledger, and could not: {done.stderr.strip() or done.returncode}"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    with (folder / "filler").open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass  # no space left on the device


def _charges(path: Path) -> int:
    with BudgetLedger(path) as led:
        return led.status("raises").queries


@pytest.mark.slow
def test_a_full_disk_under_one_ledger_never_splits_the_ledgers(
    tmp_path: Path, small_disk: Path
) -> None:
    datasets = {}
    for i, p in enumerate(PARTIES):
        (tmp_path / p).mkdir()
        (tmp_path / p / "raises.csv").write_text(f"raise\n{1000 * (i + 1)}\n")
        datasets[p] = (
            '[datasets.raises]\npath = "raises.csv"\nepsilon = 100.0\ndelta = 1e-6\n'
            "[datasets.raises.columns.raise]\nlower = 0\nupper = 5000\n"
        )
    ledger = small_disk / "ledger.sqlite"
    net = launch(workdir=tmp_path, datasets_toml=datasets, deadline_s=20, ledgers={"alice": ledger})
    ledgers = {p: tmp_path / p / "ledger.sqlite" for p in PARTIES} | {"alice": ledger}
    refused = answered = 0
    try:
        _fill(small_disk)
        with Federation.from_config(net.federation_config) as fed:
            # until alice's disk refuses (the rows fit its ledger's free pages first), then more
            for _ in range(200):
                try:
                    fed.sum(dataset="raises", column="raise", epsilon=0.01)
                    answered += 1
                except MpcdpError:
                    refused += 1
                    if refused == 3:
                        break
    finally:
        net.stop()
    counts = {p: _charges(path) for p, path in ledgers.items()}
    assert refused == 3, "alice's full disk never refused a query: the test filled nothing"
    assert set(counts.values()) == {answered}, (counts, answered)
    assert "nothing was reserved or charged" in net.log("alice") or refused


def _party(root: Path, name: str = "alice") -> Path:
    """ROOT/NAME.toml as conftest's parties, with certificates and data (no ledger)."""
    if not (root / "certs").exists():
        init_federation(out=root / "certs", parties=list(PARTIES), coordinators=["analyst"])
    (root / f"{name}.csv").write_text("raise,dept\n3800,eng\n")
    cfg = root / f"{name}.toml"
    cfg.write_text(party_toml(name, PARTIES))
    return cfg


def test_a_missing_ledger_is_created_on_purpose_only(tmp_path: Path) -> None:
    cfg = _party(tmp_path)
    out = _mpcdp("party", "serve", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1 and "does not exist" in out.stderr and "party init" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "alice.sqlite").exists()
    out = _mpcdp("party", "init", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    again = _mpcdp("party", "init", "--config", str(cfg), cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr


def _spent_ledger(root: Path) -> tuple[Path, Path]:
    cfg = _party(root)
    assert _mpcdp("party", "init", "--config", str(cfg), cwd=root).returncode == 0
    from mpcdp.dp import events as ev

    with BudgetLedger(root / "alice.sqlite") as led:
        led.charge(
            dataset="raises",
            query_id="q1",
            event=ev.PureDp(epsilon=Fraction(1)),
            coordinator="analyst",
        )
    return cfg, root / "alice.sqlite"


def test_an_empty_ledger_is_refused_at_start_and_nothing_is_reset(tmp_path: Path) -> None:
    cfg, ledger = _spent_ledger(tmp_path)
    ledger.write_bytes(b"")  # truncated to 0 bytes
    out = _mpcdp("party", "serve", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    assert "empty (0 bytes)" in out.stderr and "backup" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert ledger.stat().st_size == 0  # nothing was written over it
    check = _mpcdp("party", "check", "--config", str(cfg), cwd=tmp_path)
    assert check.returncode == 1 and "ledger: PROBLEM" in check.stdout


def test_a_content_corrupt_ledger_is_refused_at_start(tmp_path: Path) -> None:
    cfg, ledger = _spent_ledger(tmp_path)
    with sqlite3.connect(ledger) as db:  # a valid SQLite file with one bad value
        db.execute("UPDATE budgets SET epsilon='three' WHERE dataset='raises'")
    db.close()
    out = _mpcdp("party", "serve", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    assert "is corrupt" in out.stderr and "epsilon='three'" in out.stderr, out.stderr
    assert "restore" in out.stderr and "Traceback" not in out.stderr
    with sqlite3.connect(ledger) as db:  # untouched: the bad value and the charge are kept
        assert db.execute("SELECT epsilon FROM budgets").fetchall() == [("three",)]
        assert db.execute("SELECT count(*) FROM charges").fetchone() == (1,)
    db.close()


def test_a_backup_restores_the_ledger(tmp_path: Path) -> None:
    cfg, ledger = _spent_ledger(tmp_path)
    before = _mpcdp("budget", "--config", str(cfg), "--json", cwd=tmp_path)
    backup = tmp_path / "backup.sqlite"
    out = _mpcdp("budget", "--config", str(cfg), "--backup", str(backup), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    again = _mpcdp("budget", "--config", str(cfg), "--backup", str(backup), cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    ledger.write_bytes(b"")  # lost
    shutil.copyfile(backup, ledger)  # restored, as the refusal says
    after = _mpcdp("budget", "--config", str(cfg), "--json", cwd=tmp_path)
    assert after.returncode == 0 and after.stdout == before.stdout
    assert '"remaining_epsilon": 2.0' in after.stdout


def test_a_nul_in_a_path_is_a_clear_error(tmp_path: Path) -> None:
    cfg = _party(tmp_path)
    cfg.write_text(cfg.read_text().replace('ledger = "alice.sqlite"', 'ledger = "al\\u0000ice"'))
    for cmd in (["party", "serve"], ["party", "check"], ["party", "init"]):
        out = _mpcdp(*cmd, "--config", str(cfg), cwd=tmp_path)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "ledger" in out.stderr and "NUL" in out.stderr, out.stderr


def test_party_check_checks_the_tls_files_and_the_ledger(tmp_path: Path) -> None:
    cfg = _party(tmp_path)
    out = _mpcdp("party", "check", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1 and "tls: ok" in out.stdout
    assert "ledger: PROBLEM" in out.stdout and "does not exist" in out.stdout
    assert _mpcdp("party", "init", "--config", str(cfg), cwd=tmp_path).returncode == 0
    out = _mpcdp("party", "check", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 0 and "ledger: ok" in out.stdout, out.stdout
    # another federation's CA file: the party's own certificate does not verify against it
    init_federation(out=tmp_path / "other", parties=["alice"], coordinators=["analyst"])
    cfg.write_text(cfg.read_text().replace('ca = "certs/ca.pem"', 'ca = "other/ca.pem"'))
    out = _mpcdp("party", "check", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1 and "tls: PROBLEM" in out.stdout
    assert "does not verify against tls.ca" in out.stdout
    serve = _mpcdp("party", "serve", "--config", str(cfg), cwd=tmp_path)
    assert serve.returncode == 1 and "does not verify against tls.ca" in serve.stderr
