"""Key and certificate files on disk (issue 12, section 5).

A party or coordinator whose tls.key is open to others is warned at start.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from mpcdp.certs import init_federation
from mpcdp.config import TlsConfig
from mpcdp.transport.tls import load_credentials

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _init(out: Path, *, overwrite: bool = False) -> None:
    init_federation(out=out, parties=["a", "b"], coordinators=["z"], overwrite=overwrite)


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
