"""Key and certificate files on disk: modes, links and umask.

`mpcdp certs init` writes private keys 0600 and certificates 0644 whatever the umask, into a
0700 folder, never keeps an old wider mode on --force and never writes through a link; a
party or coordinator whose tls.key is open to others is warned at start.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mpcdp.config.party_config import TlsConfig
from mpcdp.errors import ParameterError
from mpcdp.transport.cert_files import init_federation
from mpcdp.transport.tls import load_credentials

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")

MPCDP = Path(sys.executable).parent / "mpcdp"  # the installed console script


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _cli_init(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI; stderr comes back without rich's box, one line."""
    args = ["certs", "init", "--out", str(out), "--parties", "a,b", "--coordinators", "z"]
    res = subprocess.run(
        [str(MPCDP), *args, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "1000"},
    )
    res.stderr = " ".join(re.sub("[│╭╮╰╯─]", " ", res.stderr).split())
    return res


def _init(out: Path, *, overwrite: bool = False) -> None:
    init_federation(out=out, parties=["a", "b"], coordinators=["z"], overwrite=overwrite)


def _assert_modes(out: Path) -> None:
    assert _mode(out) == 0o700
    for name in ("ca", "a", "b", "z"):
        assert _mode(out / f"{name}.key") == 0o600, name
        assert _mode(out / f"{name}.pem") == 0o644, name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files


# ---- 5. modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=lambda m: f"umask{m:03o}")
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, mask: int) -> None:
    with _umask(mask):
        _init(tmp_path / "fn")
        cli = _cli_init(tmp_path / "cli")
    assert cli.returncode == 0, cli.stderr
    _assert_modes(tmp_path / "fn")
    _assert_modes(tmp_path / "cli")


def test_an_existing_open_folder_of_ours_is_set_to_0700(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    out.chmod(0o777)
    with _umask(0):
        _init(out)
    _assert_modes(out)


@pytest.mark.parametrize("how", ["function", "cli"])
def test_force_rewrites_a_0644_key_as_0600(tmp_path: Path, how: str) -> None:
    out = tmp_path / "c"
    _init(out)
    key = out / "a.key"
    old = key.read_bytes()
    key.chmod(0o644)
    (out / "a.pem").chmod(0o600)
    if how == "function":
        _init(out, overwrite=True)
    else:
        res = _cli_init(out, "--force")
        assert res.returncode == 0, res.stderr
    assert key.read_bytes() != old  # a new key, not the old file
    _assert_modes(out)


@pytest.mark.parametrize("how", ["function", "cli"])
@pytest.mark.parametrize("name", ["a.key", "ca.key", "b.pem"])
def test_a_symlinked_key_path_is_not_followed(tmp_path: Path, how: str, name: str) -> None:
    out = tmp_path / "c"
    _init(out)
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch\n")
    victim.chmod(0o644)
    link = out / name
    link.unlink()
    link.symlink_to(victim)
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()}
    if how == "function":
        with pytest.raises(ParameterError, match=f"{re.escape(name)} is a symbolic link") as info:
            _init(out, overwrite=True)
        assert info.value.name == "out" and info.value.value == str(out)
    else:
        res = _cli_init(out, "--force")
        assert res.returncode == 2 and f"{name} is a symbolic link" in res.stderr
        assert "Traceback" not in res.stderr
    assert victim.read_text() == "do not touch\n" and _mode(victim) == 0o644
    assert link.is_symlink() and os.readlink(link) == str(victim)
    # refused before anything was written: the rest of the federation is untouched
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()} == before


def test_a_dangling_symlink_is_refused_too(tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "a.key").symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(ParameterError, match=r"a\.key is a symbolic link"):
        _init(out)
    assert not (tmp_path / "created-through-the-link").exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(ParameterError, match="cannot use it as a folder"):
        _init(out)
    res = _cli_init(out)
    assert res.returncode == 2 and "cannot use it as a folder" in res.stderr
    assert "Traceback" not in res.stderr


# ---- 6. the CLI names its own flag ----------------------------------------------------------


def test_an_existing_ca_is_kept_and_the_cli_names_force(tmp_path: Path) -> None:
    out = tmp_path / "c"
    _init(out)
    ca = (out / "ca.pem").read_bytes()
    with pytest.raises(ParameterError, match=r"already holds a CA \(ca.pem\); pass overwrite=True"):
        _init(out)
    res = _cli_init(out)
    assert res.returncode == 2
    assert "already holds a CA" in res.stderr and "pass --force to replace it" in res.stderr
    assert "overwrite" not in res.stderr
    assert (out / "ca.pem").read_bytes() == ca


# ---- 4. a private key open to others is warned about ----------------------------------------


def _tls(out: Path, name: str = "a") -> TlsConfig:
    return TlsConfig(ca=out / "ca.pem", cert=out / f"{name}.pem", key=out / f"{name}.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601], ids=lambda m: f"{m:04o}")
def test_an_open_private_key_logs_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    out = tmp_path / "c"
    _init(out)
    key = out / "a.key"
    key.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="mpcdp.transport.tls"):
        creds = load_credentials(_tls(out))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "mpcdp.transport.tls"
    text = warnings[0].getMessage()
    assert str(key) in text and f"{mode:04o}" in text and "chmod 600" in text
    assert "PRIVATE KEY" not in caplog.text and creds.key_pem.decode() not in caplog.text


def test_a_0600_key_and_open_certificates_log_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "c"
    _init(out)
    (out / "a.pem").chmod(0o644)
    (out / "ca.pem").chmod(0o644)
    with caplog.at_level(logging.DEBUG, logger="mpcdp.transport.tls"):
        load_credentials(_tls(out))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_mode_checked_is_the_key_files_behind_a_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "c"
    _init(out)
    (out / "a.key").chmod(0o644)
    link = tmp_path / "link.key"
    link.symlink_to(out / "a.key")
    tls = TlsConfig(ca=out / "ca.pem", cert=out / "a.pem", key=link)
    with caplog.at_level(logging.WARNING, logger="mpcdp.transport.tls"):
        load_credentials(tls)
    assert "0644" in caplog.text and str(link) in caplog.text
