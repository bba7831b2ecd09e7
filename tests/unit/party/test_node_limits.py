"""party.toml ``[limits]`` reaches the servicer and the server: the per-caller allowance of
short calls, the longest call, the connection cap and the TLS handshake deadline, and the
upload limit per coordinator (the engine's pending sessions per coordinator). Bad values
are refused at load, naming the key and the value."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import pytest

from mpcdp.config.party_config import LimitsConfig, load_party_config
from mpcdp.errors import ConfigError
from mpcdp.party.node import PartyNode, raise_open_files_limit
from mpcdp.transport import server as srv
from mpcdp.transport.cert_files import init_federation

PARTY = """
id = "alice"
listen = "127.0.0.1:0"
ledger = "ledger.sqlite"
[tls]
ca = "certs/ca.pem"
cert = "certs/alice.pem"
key = "certs/alice.key"
coordinators = ["analyst"]
peers = ["bob"]
[datasets.raises]
path = "raises.csv"
epsilon = 1.0
delta = 1e-6
[datasets.raises.columns.raise]
lower = 0
upper = 5000
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "party.toml"
    p.write_text(text)
    return p


def test_defaults_are_the_servers() -> None:
    limits = LimitsConfig()
    assert limits.short_calls_per_caller == srv.DEFAULT_MAX_SHORT_CALLS_PER_CALLER
    assert limits.call_s == srv.DEFAULT_MAX_CALL_S
    assert limits.connections == srv.DEFAULT_MAX_CONNECTIONS
    assert limits.handshake_timeout_s == srv.DEFAULT_HANDSHAKE_TIMEOUT_S
    assert limits.pending_sessions_per_coordinator == srv.DEFAULT_MAX_UPLOADS_PER_COORDINATOR


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("short_calls_per_caller = 0", "limits.short_calls_per_caller: must be an integer in"),
        ("short_calls_per_caller = 2.5", "limits.short_calls_per_caller"),
        ("call_s = 0", "limits.call_s: must be in (0, 604800] seconds, got 0"),
        ("call_s = inf", "limits.call_s: must be finite, got inf"),
        ("call_s = 700000", "limits.call_s: must be in (0, 604800] seconds, got 700000"),
        ("connections = 0", "limits.connections: must be an integer in [1, 1048576], got 0"),
        ("connections = true", "limits.connections: must be int, got True"),
        ("handshake_timeout_s = -1", "limits.handshake_timeout_s: must be in (0, 300]"),
        ("handshake_timeout_s = 301", "got 301"),
    ],
)
def test_bad_limits_name_the_key_and_the_value(tmp_path: Path, line: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_party_config(_write(tmp_path, PARTY + f"[limits]\n{line}\n"))
    assert needle in str(info.value)
    assert str(tmp_path / "party.toml") in str(info.value)


def test_limits_reach_the_servicer_and_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init_federation(out=tmp_path / "certs", parties=["alice", "bob"], coordinators=["analyst"])
    (tmp_path / "raises.csv").write_text("raise\n1\n")
    text = PARTY + (
        "[limits]\npending_sessions = 20\npending_sessions_per_coordinator = 5\n"
        "short_calls_per_caller = 3\ncall_s = 120\nconnections = 50\n"
        "handshake_timeout_s = 2.5\n"
    )
    cfg = load_party_config(_write(tmp_path, text))
    seen: dict[str, Any] = {}
    real = srv.start_server

    def spy(servicer: srv.PartyServicer, **kwargs: Any) -> Any:
        seen.update(kwargs, servicer=servicer)
        return real(servicer, **kwargs)

    monkeypatch.setattr(srv, "start_server", spy)
    node = PartyNode(cfg, create_ledger=True)
    try:
        node.start()
        servicer = seen["servicer"]
        assert (seen["max_connections"], seen["handshake_timeout_s"]) == (50, 2.5)
        assert servicer._short_calls.per_coordinator == 3
        assert servicer._max_call_s == 120.0
        assert (servicer._uploads.total, servicer._uploads.per_coordinator) == (20, 5)
    finally:
        node.stop()


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 128:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        assert raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
