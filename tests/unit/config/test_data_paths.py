"""party.toml's ``data_paths``: keyword arguments of a declared Dataset factory that are paths,
resolved against party.toml's folder like every other path in the file (``data_options``
stay as written), passed next to ``data_options``; a keyword in both tables, a value that is
not a path, and data_paths on an .npz are refused naming the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpcdp.config.party_config import load_party_config
from mpcdp.errors import ConfigError

HEAD = """
id = "alice"
listen = "127.0.0.1:0"
ledger = "l.sqlite"
[tls]
ca = "ca.pem"
cert = "alice.pem"
key = "alice.key"
coordinators = ["analyst"]
"""

#: a Dataset factory reading (x, y) from an .npz at ``root``
FROM_FILE = """
import numpy as np
from torch.utils.data import Dataset


class FromFile(Dataset):
    def __init__(self, root, scale):
        with np.load(root) as npz:
            self.x, self.y = npz["x"] * scale, npz["y"]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].astype(np.float32), int(self.y[i])


def make(root, scale=1.0):
    assert isinstance(root, str)
    return FromFile(root, scale)
"""


def _site(tmp_path: Path, tables: str) -> Path:
    site = tmp_path / "site"
    (site / "code").mkdir(parents=True)
    (site / "code" / "fromfile.py").write_text(FROM_FILE)
    (site / "data").mkdir()
    np.savez(site / "data" / "ex.npz", x=np.ones((6, 3)), y=np.arange(6) % 2)
    cfg = site / "party.toml"
    cfg.write_text(
        HEAD + '[datasets.ex]\npython_path = "code"\ndata = "fromfile:make"\nnum_classes = 2\n'
        "epsilon = 1.0\ndelta = 1e-5\n" + tables
    )
    return cfg


def test_data_paths_resolve_against_party_toml_s_folder_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    from mpcdp.party.node import check_datasets

    cfg = _site(
        tmp_path,
        '[datasets.ex.data_paths]\nroot = "data/ex.npz"\n[datasets.ex.data_options]\nscale = 2.0\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_party_config(cfg)
    decl = config.datasets["ex"].training
    assert decl is not None
    root = str(tmp_path / "site" / "data" / "ex.npz")
    assert decl.data_paths == (("root", root),)
    assert decl.data_arguments() == {"root": root, "scale": 2.0}
    assert check_datasets(config) == {"ex": None}


def test_data_options_stay_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same relative path in data_options is taken from the current directory: the
    dataset is unavailable when the party runs elsewhere (what data_paths is for)."""
    pytest.importorskip("torch")
    from mpcdp.party.node import check_datasets

    cfg = _site(tmp_path, '[datasets.ex.data_options]\nroot = "data/ex.npz"\n')
    monkeypatch.chdir(tmp_path)
    problem = check_datasets(load_party_config(cfg))["ex"]
    assert problem is not None and "data/ex.npz" in problem
    monkeypatch.chdir(tmp_path / "site")
    assert check_datasets(load_party_config(cfg)) == {"ex": None}


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            '[datasets.ex.data_options]\nroot = "a"\n[datasets.ex.data_paths]\nroot = "b"\n',
            "datasets.ex.data_paths.root: is also in data_options",
        ),
        ("[datasets.ex.data_paths]\nroot = 3\n", "datasets.ex.data_paths.root: must be a path"),
        ('[datasets.ex.data_paths]\nroot = ""\n', "datasets.ex.data_paths.root: must be a path"),
        ('data_paths = "a"\n', "datasets.ex.data_paths: has the wrong type"),
    ],
)
def test_bad_data_paths_are_refused_naming_the_key(
    tmp_path: Path, tables: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_party_config(_site(tmp_path, tables))


def test_data_paths_apply_to_a_declared_dataset_only(tmp_path: Path) -> None:
    np.savez(tmp_path / "ex.npz", x=np.ones((4, 2)), y=np.arange(4) % 2)
    cfg = tmp_path / "party.toml"
    cfg.write_text(
        HEAD + '[datasets.ex]\npath = "ex.npz"\nnum_classes = 2\nepsilon = 1.0\ndelta = 1e-5\n'
        '[datasets.ex.data_paths]\nroot = "x"\n'
    )
    with pytest.raises(ConfigError, match=r"datasets\.ex\.data_paths: applies to data = "):
        load_party_config(cfg)


def test_two_entries_over_the_same_data_paths_share_a_budget(tmp_path: Path) -> None:
    """The same factory and file, spelled two ways: the same data, refused under two
    budgets; another file is other data."""
    one = '[datasets.ex.data_paths]\nroot = "data/ex.npz"\n'
    two = (
        '[datasets.ex2]\npython_path = "code"\ndata = "fromfile:make"\nnum_classes = 2\n'
        'epsilon = 1.0\ndelta = 1e-5\n[datasets.ex2.data_paths]\nroot = "./code/../data/ex.npz"\n'
    )
    with pytest.raises(ConfigError, match="datasets 'ex' and 'ex2' both read the Dataset"):
        load_party_config(_site(tmp_path / "a", one + two))
    other = two.replace("./code/../data/ex.npz", "data/other.npz")
    assert load_party_config(_site(tmp_path / "b", one + other)).datasets["ex2"].budget == "ex2"
