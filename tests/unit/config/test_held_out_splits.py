"""party.toml's held-out splits for evaluation at the sites: ``eval_path`` for an .npz,
``eval_data_paths`` / ``eval_data_options`` for a declared Dataset (the factory's arguments
that differ for the split), resolved like the training data's; a split of another shape is
refused at start; a split over another entry's training data must share its budget; every
misdeclaration is refused naming the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpcdp.config.party_config import load_party_config
from mpcdp.errors import ConfigError
from tests.unit.config.test_data_paths import HEAD, _site


def _npz_site(tmp_path: Path, lines: str) -> Path:
    np.savez(tmp_path / "ex.npz", x=np.ones((6, 3), np.float32), y=np.arange(6) % 2)
    np.savez(tmp_path / "ex-test.npz", x=np.ones((4, 3), np.float32), y=np.arange(4) % 2)
    cfg = tmp_path / "party.toml"
    cfg.write_text(
        HEAD
        + '[datasets.ex]\npath = "ex.npz"\nnum_classes = 2\nepsilon = 1.0\ndelta = 1e-5\n'
        + lines
    )
    return cfg


def test_an_npz_split_resolves_against_party_toml_s_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    from mpcdp.party.node import check_datasets

    cfg = _npz_site(tmp_path, 'eval_path = "ex-test.npz"\n')
    monkeypatch.chdir(tmp_path.parent)
    config = load_party_config(cfg)
    decl = config.datasets["ex"].training
    assert decl is not None and decl.evaluation
    assert decl.eval_path == str(tmp_path / "ex-test.npz")
    assert check_datasets(config) == {"ex": None}


def test_a_declared_dataset_s_split_replaces_only_the_arguments_given(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from mpcdp.party.node import check_datasets

    cfg = _site(
        tmp_path,
        '[datasets.ex.data_paths]\nroot = "data/ex.npz"\n[datasets.ex.data_options]\n'
        'scale = 2.0\n[datasets.ex.eval_data_paths]\nroot = "data/test.npz"\n',
    )
    np.savez(cfg.parent / "data" / "test.npz", x=np.ones((3, 3)), y=np.arange(3) % 2)
    config = load_party_config(cfg)
    decl = config.datasets["ex"].training
    assert decl is not None
    split = decl.eval_declaration()
    assert split.data_arguments() == {"root": str(cfg.parent / "data" / "test.npz"), "scale": 2.0}
    assert decl.data_arguments()["root"] == str(cfg.parent / "data" / "ex.npz")
    assert check_datasets(config) == {"ex": None}


def test_a_split_of_another_shape_makes_the_dataset_unavailable(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from mpcdp.party.node import check_datasets

    cfg = _npz_site(tmp_path, 'eval_path = "ex-test.npz"\n')
    np.savez(tmp_path / "ex-test.npz", x=np.ones((4, 5), np.float32), y=np.arange(4) % 2)
    problem = check_datasets(load_party_config(cfg))["ex"]
    assert problem is not None and "held-out split's examples have shape (5,)" in problem


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('eval_path = "ex-test.csv"\n', "datasets.ex.eval_path: must be an .npz file"),
        ("eval_path = 3\n", "datasets.ex.eval_path: has the wrong type"),
        (
            '[datasets.ex.eval_data_options]\nsplit = "test"\n',
            "datasets.ex.eval_data_options: needs data = ",
        ),
        (
            '[datasets.ex.eval_data_paths]\nroot = "t.npz"\n',
            "datasets.ex.eval_data_paths: needs data = ",
        ),
    ],
)
def test_bad_npz_splits_are_refused_naming_the_key(
    tmp_path: Path, lines: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_party_config(_npz_site(tmp_path, lines))


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ('eval_path = "t.npz"\n', "datasets.ex.eval_path: 't.npz': a declared Dataset's"),
        (
            '[datasets.ex.eval_data_options]\nroot = "a"\n[datasets.ex.eval_data_paths]\n'
            'root = "b"\n',
            "datasets.ex.eval_data_paths.root: is also in eval_data_options",
        ),
        (
            "[datasets.ex.eval_data_paths]\nroot = 3\n",
            "datasets.ex.eval_data_paths.root: must be a path",
        ),
    ],
)
def test_bad_dataset_splits_are_refused_naming_the_key(
    tmp_path: Path, tables: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_party_config(_site(tmp_path, tables))


def test_a_split_over_another_entry_s_training_data_must_share_its_budget(
    tmp_path: Path,
) -> None:
    """Evaluations on a split are charged to its entry's budget: a split that is another
    entry's training file, under another budget, would spend two budgets on one person."""
    other = '[datasets.ex2]\npath = "ex-test.npz"\nnum_classes = 2\nepsilon = 1.0\ndelta = 1e-5\n'
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    with pytest.raises(ConfigError, match="datasets 'ex' and 'ex2' both read the file"):
        load_party_config(_npz_site(tmp_path / "a", 'eval_path = "ex-test.npz"\n' + other))
    shared = 'eval_path = "ex-test.npz"\n' + other + 'budget = "ex"\n'
    config = load_party_config(_npz_site(tmp_path / "b", shared))
    assert config.datasets["ex2"].budget == "ex"


def test_examples_count_rows_whatever_the_targets_shape(tmp_path: Path) -> None:
    """Describe publishes these counts, and the sites' evaluation is divided by them: a
    regression target of shape (N, k) is N examples (it was counted N * k)."""
    from mpcdp.config.datasets import load_examples

    np.savez(tmp_path / "r.npz", x=np.ones((10, 4), np.float32), y=np.ones((10, 3), np.float32))
    assert load_examples(tmp_path / "r.npz", num_classes=0, regression=True).count == 10


def test_a_declared_split_whose_items_are_of_another_kind_is_unavailable(tmp_path: Path) -> None:
    """Integer features (token ids) in the split, floats in the training data: found at
    start, not at the first evaluation after steps were charged."""
    pytest.importorskip("torch")
    from mpcdp.party.node import check_datasets

    cfg = _site(
        tmp_path,
        '[datasets.ex.data_paths]\nroot = "data/ex.npz"\n[datasets.ex.eval_data_options]\n'
        "tokens = true\n",
    )
    # a module of its own: another test may have imported fromfile in this process already
    cfg.write_text(cfg.read_text().replace("fromfile:make", "heldout_kinds:make"))
    (cfg.parent / "code" / "heldout_kinds.py").write_text(
        "import numpy as np\nfrom torch.utils.data import Dataset\n\n\n"
        "class Items(Dataset):\n"
        "    def __init__(self, root, tokens):\n"
        "        with np.load(root) as npz:\n"
        "            self.x, self.y, self.tokens = npz['x'], npz['y'], tokens\n\n"
        "    def __len__(self):\n        return len(self.y)\n\n"
        "    def __getitem__(self, i):\n"
        "        x = self.x[i].astype(np.int64 if self.tokens else np.float32)\n"
        "        return x, int(self.y[i])\n\n\n"
        "def make(root, tokens=False):\n    return Items(root, tokens)\n"
    )
    problem = check_datasets(load_party_config(cfg))["ex"]
    assert problem is not None and "held-out split's items have integer_features=True" in problem
