"""The test servers' binaries: found where Debian installs them, and a missing one is a
failure that says what to install, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import java_home, postgres_bin


def test_postgres_binaries_are_found_by_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MPCDP_PG_BIN", raising=False)
    for version in ("9", "15", "17"):
        (tmp_path / version / "bin").mkdir(parents=True)
        for tool in ("initdb", "pg_ctl"):
            (tmp_path / version / "bin" / tool).touch()
    (tmp_path / "17" / "bin" / "pg_ctl").unlink()  # an incomplete install is passed over
    assert postgres_bin(debian=tmp_path, search_path="") == tmp_path / "15" / "bin"


def test_missing_binaries_fail_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MPCDP_PG_BIN", raising=False)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install .*postgresql"):
        postgres_bin(debian=tmp_path / "none", search_path=str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install .*default-jre-headless"):
        java_home(default=tmp_path / "none", search_path=str(tmp_path))
