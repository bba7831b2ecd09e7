"""party.toml / federation.toml values that used to load silently: a clear ConfigError at load.

Every error names the file, the key and the value.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mpcdp.config.party_config import load_federation_config, load_party_config
from mpcdp.errors import ConfigError

PARTY = """
id = "alice"
listen = "127.0.0.1:0"
ledger = "l.sqlite"
[tls]
ca = "ca.pem"
cert = "alice.pem"
key = "alice.key"
coordinators = ["analyst"]
[datasets.raises]
path = "raises.csv"
epsilon = 1.0
delta = 1e-6
[datasets.raises.columns.raise]
lower = 0
upper = 5000
"""

FEDERATION = """
coordinator = "analyst"
colluders = 1
deadline_s = 30
[tls]
ca = "ca.pem"
cert = "analyst.pem"
key = "analyst.key"
[[parties]]
id = "alice"
address = "127.0.0.1:50051"
[[parties]]
id = "bob"
address = "127.0.0.1:50052"
"""


def _write(tmp_path: Path, text: str, name: str = "party.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _party_error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_party_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


def _federation_error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text, "federation.toml")
    with pytest.raises(ConfigError) as info:
        load_federation_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


# ---- 1. ledger ------------------------------------------------------------------------------


def test_ledger_in_a_missing_folder_is_refused_and_no_folder_is_created(tmp_path: Path) -> None:
    msg = _party_error(tmp_path, PARTY.replace('"l.sqlite"', '"no/such/dir/l.sqlite"'))
    assert "ledger:" in msg and str(tmp_path / "no/such/dir/l.sqlite") in msg
    assert "does not exist" in msg
    assert not (tmp_path / "no").exists()


def test_ledger_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ledgers").mkdir()
    msg = _party_error(tmp_path, PARTY.replace('"l.sqlite"', '"ledgers"'))
    assert "ledger:" in msg and str(tmp_path / "ledgers") in msg and "is a directory" in msg


def test_ledger_in_an_existing_folder_loads(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    cfg = load_party_config(_write(tmp_path, PARTY.replace('"l.sqlite"', '"state/l.sqlite"')))
    assert cfg.ledger == tmp_path / "state" / "l.sqlite"
    absolute = PARTY.replace('"l.sqlite"', f'"{tmp_path / "abs.sqlite"}"')
    assert load_party_config(_write(tmp_path, absolute)).ledger == tmp_path / "abs.sqlite"


# ---- 2. listen / address --------------------------------------------------------------------

GOOD_ADDRESSES = [
    "0.0.0.0:50051",
    "127.0.0.1:65535",
    "localhost:50051",
    "party-a:50051",
    "alice.example.org:443",
    "compose_alice_1:50051",
    "[::1]:50051",
    "[::]:50051",
    "[2001:db8::1]:8443",
]

BAD_ADDRESSES = [
    ("not-an-address", "has no ':PORT'"),
    ("127.0.0.1", "has no ':PORT'"),
    (":50051", "has no host"),
    ("localhost:", "has port ''"),
    ("localhost:http", "has port 'http'"),
    ("localhost:65536", "has port '65536'"),
    ("localhost:-1", "has port '-1'"),
    ("localhost:050051", "has port '050051'"),
    ("localhost:50051 ", "has port '50051 '"),
    ("300.1.1.1:50051", "has '300.1.1.1', not an IPv4 address"),
    ("1.2.3:50051", "has '1.2.3', not an IPv4 address"),
    ("::1:50051", "has an IPv6 host without brackets"),
    ("[::1]50051", "is not [IPv6]:PORT"),
    ("[nope]:50051", "has 'nope', not an IPv6 address"),
    ("[127.0.0.1]:50051", "has '127.0.0.1', not an IPv6 address"),
    ("party a:50051", "has 'party a', not a host name"),
    ("-alice:50051", "has '-alice', not a host name"),
    ("a..b:50051", "has 'a..b', not a host name"),
    ("dns:///alice:50051", "has 'dns:///alice', not a host name"),
    ("unix:/tmp/node.sock", "has port '/tmp/node.sock'"),
    ("http://alice:50051", "has 'http://alice', not a host name"),
]


@pytest.mark.parametrize("address", [*GOOD_ADDRESSES, "127.0.0.1:0", "[::1]:0"])
def test_listen_accepts_host_port(tmp_path: Path, address: str) -> None:
    text = PARTY.replace('"127.0.0.1:0"', f'"{address}"')
    assert load_party_config(_write(tmp_path, text)).listen == address


@pytest.mark.parametrize(("address", "reason"), BAD_ADDRESSES)
def test_listen_refuses_anything_else(tmp_path: Path, address: str, reason: str) -> None:
    msg = _party_error(tmp_path, PARTY.replace('"127.0.0.1:0"', f'"{address}"'))
    assert f"listen: {address!r} {reason}" in msg
    assert "expected HOST:PORT with PORT in 0..65535" in msg and "'[::1]:50051'" in msg


def test_listen_of_the_wrong_type(tmp_path: Path) -> None:
    msg = _party_error(tmp_path, PARTY.replace('"127.0.0.1:0"', "50051"))
    assert "listen: has the wrong type (int: 50051)" in msg


@pytest.mark.parametrize("address", GOOD_ADDRESSES)
def test_federation_address_accepts_host_port(tmp_path: Path, address: str) -> None:
    text = FEDERATION.replace('"127.0.0.1:50052"', f'"{address}"')
    cfg = load_federation_config(_write(tmp_path, text, "federation.toml"))
    assert cfg.parties[1].address == address


@pytest.mark.parametrize(("address", "reason"), [*BAD_ADDRESSES, ("alice:0", "has port '0'")])
def test_federation_address_refuses_anything_else(
    tmp_path: Path, address: str, reason: str
) -> None:
    msg = _federation_error(tmp_path, FEDERATION.replace('"127.0.0.1:50052"', f'"{address}"'))
    assert f"parties[1].address: {address!r} {reason}" in msg
    assert "expected HOST:PORT with PORT in 1..65535" in msg


def test_party_serve_reports_a_bad_listen_without_a_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, PARTY.replace('"127.0.0.1:0"', '"not-an-address"'))
    out = subprocess.run(
        [sys.executable, "-m", "mpcdp.cli", "party", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert f"{path}: listen: 'not-an-address' has no ':PORT'" in out.stderr
    assert "Traceback" not in out.stderr


# ---- 3. numbers -----------------------------------------------------------------------------

DS = "datasets.raises."


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("nan", "must be finite, got nan"),  # used to compare False with every request: no cap
        ("inf", "must be finite, got inf"),
        ("-inf", "must be finite, got -inf"),
        ("-1", "must be > 0, got -1"),
        ("0", "must be > 0, got 0"),
        ("0.0", "must be > 0, got 0.0"),
        ("-0.0", "must be > 0, got -0.0"),
        ('"1"', "has the wrong type (str: '1')"),
        ("true", "must be int or float, got True"),
    ],
)
def test_max_epsilon_per_query_must_be_finite_and_positive(
    tmp_path: Path, value: str, needle: str
) -> None:
    text = PARTY.replace("delta = 1e-6", f"delta = 1e-6\nmax_epsilon_per_query = {value}")
    assert f"{DS}max_epsilon_per_query: {needle}" in _party_error(tmp_path, text)


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("epsilon = 1.0", "epsilon = nan", "epsilon: must be finite, got nan"),
        ("epsilon = 1.0", "epsilon = inf", "epsilon: must be finite, got inf"),
        ("epsilon = 1.0", "epsilon = 0", "epsilon: must be > 0, got 0"),
        ("epsilon = 1.0", "epsilon = -0.5", "epsilon: must be > 0, got -0.5"),
        ("epsilon = 1.0", "epsilon = true", "epsilon: must be int or float, got True"),
        ("delta = 1e-6", "delta = nan", "delta: must be finite, got nan"),
        ("delta = 1e-6", "delta = -1e-6", "delta: must be in [0, 1), got -1e-06"),
        ("delta = 1e-6", "delta = 1", "delta: must be in [0, 1), got 1"),
        ("lower = 0", "lower = nan", "columns.raise.lower: must be finite, got nan"),
        ("upper = 5000", "upper = inf", "columns.raise.upper: must be finite, got inf"),
        ("lower = 0", "lower = -inf", "columns.raise.lower: must be finite, got -inf"),
        # a negative l2_bound or num_classes on a table used to load
        ("delta = 1e-6", "delta = 1e-6\nl2_bound = -1.0", "l2_bound: must be >= 0, got -1.0"),
        ("delta = 1e-6", "delta = 1e-6\nl2_bound = nan", "l2_bound: must be finite, got nan"),
        ("delta = 1e-6", "delta = 1e-6\nnum_classes = -3", "num_classes: must be >= 0, got -3"),
        ("delta = 1e-6", "delta = 1e-6\nnum_classes = 2.5", "num_classes: has the wrong type"),
        ("delta = 1e-6", "delta = 1e-6\nnum_classes = nan", "num_classes: has the wrong type"),
    ],
)
def test_dataset_numbers_must_be_finite_and_in_range(
    tmp_path: Path, old: str, new: str, needle: str
) -> None:
    assert f"{DS}{needle}" in _party_error(tmp_path, PARTY.replace(old, new))


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("nan", "min_colluders: has the wrong type (float: nan)"),
        ("1.5", "min_colluders: has the wrong type (float: 1.5)"),
        ("true", "min_colluders: must be int, got True"),
        ("-1", "min_colluders: must be >= 0, got -1"),
    ],
)
def test_min_colluders_must_be_a_non_negative_integer(
    tmp_path: Path, value: str, needle: str
) -> None:
    text = PARTY.replace('ledger = "l.sqlite"', f'ledger = "l.sqlite"\nmin_colluders = {value}')
    assert needle in _party_error(tmp_path, text)


def test_valid_numbers_still_load(tmp_path: Path) -> None:
    text = PARTY.replace("delta = 1e-6", "delta = 0\nmax_epsilon_per_query = 0.25\nl2_bound = 0")
    ds = load_party_config(_write(tmp_path, text)).datasets["raises"]
    assert ds.max_epsilon_per_query == 0.25 and ds.delta == 0 and ds.l2_bound == 0
    assert isinstance(ds.max_epsilon_per_query, float)
    cap_int = PARTY.replace("delta = 1e-6", "delta = 1e-6\nmax_epsilon_per_query = 2")
    assert (
        load_party_config(_write(tmp_path, cap_int)).datasets["raises"].max_epsilon_per_query == 2.0
    )
    no_cap = load_party_config(_write(tmp_path, PARTY)).datasets["raises"]
    assert no_cap.max_epsilon_per_query is None


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("deadline_s = 30", "deadline_s = nan", "deadline_s: must be finite, got nan"),
        ("deadline_s = 30", "deadline_s = inf", "deadline_s: must be finite, got inf"),
        ("deadline_s = 30", "deadline_s = 0", "deadline_s: must be > 0, got 0"),
        ("deadline_s = 30", "deadline_s = -5", "deadline_s: must be > 0, got -5"),
        ("deadline_s = 30", "deadline_s = 1e300", "deadline_s: must be at most 604800"),
        ("deadline_s = 30", 'deadline_s = "30"', "deadline_s: has the wrong type (str: '30')"),
        ("colluders = 1", "colluders = -1", "colluders: must be in [0, 1], got -1"),
        ("colluders = 1", "colluders = nan", "colluders: has the wrong type (float: nan)"),
        ("colluders = 1", "colluders = true", "colluders: must be int, got True"),
    ],
)
def test_federation_numbers_must_be_finite_and_in_range(
    tmp_path: Path, old: str, new: str, needle: str
) -> None:
    assert needle in _federation_error(tmp_path, FEDERATION.replace(old, new))


def test_federation_deadline_bounds(tmp_path: Path) -> None:
    week = FEDERATION.replace("deadline_s = 30", "deadline_s = 604800")
    assert load_federation_config(_write(tmp_path, week, "f.toml")).deadline_s == 604800.0
    small = FEDERATION.replace("deadline_s = 30", "deadline_s = 0.5")
    assert load_federation_config(_write(tmp_path, small, "f.toml")).deadline_s == 0.5


def test_limits_load_and_reach_the_node(tmp_path: Path) -> None:
    from mpcdp.config.party_config import LimitsConfig

    assert load_party_config(_write(tmp_path, PARTY)).limits == LimitsConfig()
    text = PARTY + (
        "[limits]\npending_sessions = 6\npending_sessions_per_coordinator = 2\n"
        "long_calls = 3\nlong_calls_per_coordinator = 1\nstream_silence_s = 2.5\n"
    )
    limits = load_party_config(_write(tmp_path, text)).limits
    assert (limits.pending_sessions, limits.pending_sessions_per_coordinator) == (6, 2)
    assert (limits.long_calls, limits.long_calls_per_coordinator) == (3, 1)
    assert limits.stream_silence_s == 2.5 and limits.setup_calls == 16


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        ("long_calls = 0", "limits.long_calls: must be an integer in [1, 4096], got 0"),
        ("setup_calls = 1.5", "limits.setup_calls"),
        ("pending_sessions_per_coordinator = 40", "is more than pending_sessions=32"),
        ("stream_silence_s = nan", "limits.stream_silence_s"),
        ("stream_silence_s = 0", "limits.stream_silence_s: must be in (0, 3600]"),
        ("workers = 4", "limits.workers: unknown key"),
    ],
)
def test_bad_limits_are_refused(tmp_path: Path, limits: str, needle: str) -> None:
    assert needle in _party_error(tmp_path, PARTY + f"[limits]\n{limits}\n")
