"""Party/federation config files and the party's own data files: bad input, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from mpcdp.config.datasets import ColumnSpec, load_table, load_vector
from mpcdp.config.party_config import load_federation_config, load_party_config
from mpcdp.errors import ConfigError, DataError

BASE = """
id = "alice"
listen = "127.0.0.1:0"
ledger = "l.sqlite"
[tls]
ca = "ca.pem"
cert = "alice.pem"
key = "alice.key"
coordinators = ["analyst"]
peers = ["bob"]
[datasets.raises]
path = "raises.csv"
epsilon = 1.0
[datasets.raises.columns.raise]
lower = 0
upper = 5000
"""


def _party(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "party.toml"
    p.write_text(text)
    return p


def test_party_config_resolves_paths_and_defaults(tmp_path: Path) -> None:
    cfg = load_party_config(_party(tmp_path, BASE))
    assert cfg.ledger == tmp_path / "l.sqlite" and cfg.tls.ca == tmp_path / "ca.pem"
    ds = cfg.datasets["raises"]
    assert ds.delta == 0 and not ds.allow_exact and ds.kind == "table"
    assert cfg.min_colluders == 1 and cfg.coordinators == ("analyst",)
    assert cfg.device == "auto"
    gpu = BASE.replace('ledger = "l.sqlite"', 'ledger = "l.sqlite"\ndevice = "cuda:1"')
    assert load_party_config(_party(tmp_path, gpu)).device == "cuda:1"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("epsilon = 1.0", "epsilon = -1.0"), "datasets.raises.epsilon: must be > 0"),
        (("epsilon = 1.0", 'epsilon = "lots"'), "datasets.raises.epsilon: has the wrong type"),
        (("upper = 5000", "upper = -1"), "lower: 0 is above upper=-1"),
        (('id = "alice"', 'id = "Alice!"'), "id: must be lowercase"),
        (('coordinators = ["analyst"]', "coordinators = []"), "must name at least one coordinator"),
        (
            ('path = "raises.csv"', 'path = "raises.xlsx"'),
            "must be a table (.csv, .parquet, .jsonl, .ndjson), a .npy vector or .npz examples",
        ),
        (("epsilon = 1.0", "epsilon = 1.0\ncolour = 1"), "colour: unknown key"),
        (
            ('ledger = "l.sqlite"', 'ledger = "l.sqlite"\nmin_colluders = -1'),
            "min_colluders: must be >= 0",
        ),
        (
            ('ledger = "l.sqlite"', 'ledger = "l.sqlite"\ndevice = "gpu0"'),
            "device: must be auto, cpu, cuda or cuda:N, got 'gpu0'",
        ),
    ],
)
def test_party_config_errors_name_file_and_key(
    tmp_path: Path, change: tuple[str, str], needle: str
) -> None:
    path = _party(tmp_path, BASE.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_party_config(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_vector_dataset_needs_an_l2_bound(tmp_path: Path) -> None:
    text = BASE.replace('path = "raises.csv"', 'path = "g.npy"').split("[datasets.raises.columns")[
        0
    ]
    with pytest.raises(ConfigError, match="needs l2_bound > 0"):
        load_party_config(_party(tmp_path, text))


def test_federation_config_errors(tmp_path: Path) -> None:
    good = (
        'coordinator = "analyst"\n[tls]\nca = "ca.pem"\ncert = "a.pem"\nkey = "a.key"\n'
        '[[parties]]\nid = "alice"\naddress = "h:1"\n[[parties]]\nid = "bob"\naddress = "h:2"\n'
    )
    p = tmp_path / "f.toml"
    p.write_text(good)
    cfg = load_federation_config(p)
    assert cfg.colluders == 1 and [q.id for q in cfg.parties] == ["alice", "bob"]
    p.write_text(good.replace('id = "bob"', 'id = "alice"'))
    with pytest.raises(ConfigError, match="distinct ids"):
        load_federation_config(p)
    p.write_text(good.replace('coordinator = "analyst"', 'coordinator = "analyst"\ncolluders = 2'))
    with pytest.raises(ConfigError, match=r"colluders: must be in \[0, 1\]"):
        load_federation_config(p)


def test_out_of_bounds_values_are_refused_when_the_party_says_so(tmp_path: Path) -> None:
    csv = tmp_path / "r.csv"
    csv.write_text("raise\n9000\n-5\n100\n")
    with pytest.raises(DataError, match="9000 is outside the declared bounds"):
        load_table(csv, [ColumnSpec(name="raise", lower=0, upper=5000, out_of_bounds="error")])
    table = load_table(csv, [ColumnSpec(name="raise", lower=0, upper=5000, out_of_bounds="clip")])
    assert table.numeric["raise"].tolist() == [5000.0, 0.0, 100.0] and table.rows == 3


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("salary\n1\n", "missing declared column(s) ['raise']"),
        ("raise\n1,2\n", "more fields than the header"),
        ("raise\n\n", None),  # an empty line is skipped by csv: zero rows is fine
    ],
)
def test_malformed_csv(tmp_path: Path, text: str, needle: str | None) -> None:
    csv = tmp_path / "r.csv"
    csv.write_text(text)
    cols = [ColumnSpec(name="raise", lower=0, upper=10)]
    if needle is None:
        assert load_table(csv, cols).rows == 0
    else:
        with pytest.raises(DataError) as info:
            load_table(csv, cols)
        assert needle in str(info.value) and str(csv) in str(info.value)


def test_missing_file_and_bad_vectors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot open"):
        load_table(tmp_path / "nope.csv", [ColumnSpec(name="x", lower=0, upper=1)])
    np.save(tmp_path / "m.npy", np.zeros((2, 2)))
    with pytest.raises(DataError, match="1-D numeric vector"):
        load_vector(tmp_path / "m.npy")
    np.save(tmp_path / "n.npy", np.array([1.0, np.nan]))
    with pytest.raises(DataError, match="element 1 is nan"):
        load_vector(tmp_path / "n.npy")
    big = np.zeros((1 << 20) + 5, dtype=np.float32)  # checked slice by slice: past the first
    big[(1 << 20) + 3] = np.inf
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(DataError, match=f"element {(1 << 20) + 3} is inf"):
        load_vector(tmp_path / "big.npy")
    big[(1 << 20) + 3] = 2.5
    np.save(tmp_path / "big.npy", big)
    loaded = load_vector(tmp_path / "big.npy").values
    assert loaded.dtype == np.float64 and loaded[(1 << 20) + 3] == 2.5
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"cannot read a \.npy vector"):
        load_vector(tmp_path / "junk.npy")


def test_the_default_policy_clips_and_counts_in_the_owner_s_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No ``out_of_bounds`` in the declaration: values outside the bounds are clipped, the
    owner's log counts them (never the values), and ``"error"`` still refuses on request."""
    cfg = load_party_config(_party(tmp_path, BASE))
    assert cfg.datasets["raises"].columns[0].out_of_bounds == "clip"
    assert ColumnSpec(name="raise", lower=0, upper=1).out_of_bounds == "clip"
    csv = tmp_path / "r.csv"
    csv.write_text("raise\n9000\n-5\n100\n")
    with caplog.at_level(logging.INFO, logger="mpcdp.config.datasets"):
        table = load_table(csv, [ColumnSpec(name="raise", lower=0, upper=5000)])
    assert table.numeric["raise"].tolist() == [5000.0, 0.0, 100.0]
    logged = [r.getMessage() for r in caplog.records if r.name == "mpcdp.config.datasets"]
    assert any("clipped 2 value(s) of column 'raise'" in m for m in logged), logged
    # never the values (the file's path is left out: pytest's folders are numbered, e.g.
    # pytest-512, which holds "-5")
    values = [m.replace(str(csv), "<file>") for m in logged]
    assert not any("9000" in m or "-5" in m for m in values), values
    explicit = BASE.replace("upper = 5000", 'upper = 5000\nout_of_bounds = "error"')
    cfg = load_party_config(_party(tmp_path, explicit))
    assert cfg.datasets["raises"].columns[0].out_of_bounds == "error"


def test_a_coordinator_cannot_tell_whether_a_party_holds_an_out_of_bounds_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attacker is a coordinator. Two federations differ only in one private value at
    bob: 2514 (inside the declared [0, 5000]) or 9000 (outside), with the default policy.
    Describe answers the same, and an exact count is answered, with the same value, in both
    (today's "error" default made the second "unavailable": one free bit, uncharged). The
    owner's log counts the clipped value without showing it."""
    from mpcdp.federation import Federation
    from tests.conftest import build_net

    seen: dict[str, tuple[object, ...]] = {}
    # the file is checked where the party reads it (mpcdp.data), with the CSV loader's log
    owner_log = ("mpcdp.config.datasets", "mpcdp.data.duckdb_source")
    for name in owner_log:
        caplog.set_level(logging.INFO, logger=name)
    for case, row in (("inside", "2514"), ("outside", "9000")):
        root = tmp_path / case
        root.mkdir()
        net = build_net(root, csv_override={"bob": f"raise,dept\n{row},ops\n"})
        try:
            with Federation.from_config(net.federation) as fed:
                described = tuple(fed.describe().values())
                count = fed.count(dataset="raises", mechanism="none")
                mean = fed.mean(dataset="raises", column="raise", epsilon=0.5)
            seen[case] = (described, count.value, count.parties, mean.parties)
        finally:
            net.stop()
    assert seen["inside"] == seen["outside"]
    assert seen["inside"][1] == 5.0
    logged = [r.getMessage() for r in caplog.records if r.name in owner_log]
    assert sum("clipped 1 value(s) of column 'raise'" in m for m in logged) == 1, logged
    assert not any("9000" in m for m in logged)
