"""``mpcdp train --eval FILE`` and ``Federation.train(eval_data=...)``: the evaluation data is
loaded and run through the run's model (and its loss) at the coordinator before any site is
asked to open a session, so a missing file, a wrong shape, a wrong label range or labels of
the wrong kind are refused with every ledger unchanged. Integer features (token ids) stay
integers from the .npz to the model: an Embedding model trains at the sites on an int .npz
and evaluates on one. Real party nodes over loopback mTLS and their SQLite ledgers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner

from mpcdp.cli.app import app
from mpcdp.config.datasets import load_examples
from mpcdp.errors import ParameterError
from mpcdp.federation import Federation
from tests.conftest import PARTIES, Net, build_net

#: a token model (Embedding, mean over positions, Linear), the sites' and the coordinator's
TOKENS = """
import torch
from torch import nn


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x).mean(dim=1))


def make(name: str) -> nn.Module:
    return Tokens()
"""


def _ledgers(net: Net) -> dict[str, Any]:
    """Every party's ledger: each budget's spend and its charges' ids."""
    return {
        p: {
            name: (
                n.ledger.status(name).spent_epsilon,
                [c.query_id for c in n.ledger.charges(name)],
            )
            for name in n.ledger.datasets()
        }
        for p, n in net.nodes.items()
    }


def _token_net(root: Path) -> Net:
    """Each site: 30 sequences of 6 token ids in [0, 20) (int64) with labels 0..2, the
    token model declared by import path; and a float .npz 'ex' for an MLP."""
    (root / "code").mkdir()
    (root / "code" / "tokmod.py").write_text(TOKENS)
    extra = {}
    for i, p in enumerate(PARTIES):
        rng = np.random.default_rng(i)
        y = np.arange(30) % 3
        x = (rng.integers(0, 6, size=(30, 6)) + 6 * y[:, None]).astype(np.int64)  # learnable
        np.savez(root / f"{p}-tok.npz", x=x, y=y)
        np.savez(root / f"{p}-ex.npz", x=rng.normal(size=(30, 8)).astype(np.float32), y=y)
        extra[p] = (
            f'\n[datasets.tok]\npath = "{p}-tok.npz"\nnum_classes = 3\npython_path = "code"\n'
            'model = "tokmod:make"\nepsilon = 50.0\ndelta = 1e-5\n'
            f'\n[datasets.ex]\npath = "{p}-ex.npz"\nnum_classes = 3\nepsilon = 50.0\n'
            "delta = 1e-5\n"
        )
    return build_net(root, extra=extra)


@pytest.fixture
def net(tmp_path: Path) -> Any:
    n = _token_net(tmp_path)
    try:
        yield n
    finally:
        n.stop()


def test_load_examples_keeps_integer_features_as_int64(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", x=np.array([[1, 2], [3, 4]], np.int32), y=np.array([0, 1]))
    np.savez(tmp_path / "f.npz", x=np.array([[1.5, 2], [3, 4]]), y=np.array([0, 1]))
    assert load_examples(tmp_path / "t.npz", num_classes=2).x.dtype == np.int64
    assert load_examples(tmp_path / "f.npz", num_classes=2).x.dtype == np.float32


@pytest.mark.parametrize(
    ("x", "y", "problem"),
    [
        (np.zeros((10, 5), np.float32), np.arange(10) % 3, "cannot run on its first 8 examples"),
        (np.zeros((10, 8), np.float32), np.arange(10) % 3 + 5, "example 0 has label 5, outside"),
        (np.zeros((10, 8), np.float32), np.zeros(10, np.float32), "must be integer labels"),
        (np.zeros((10, 8), np.float32), np.arange(9) % 3, "the same number"),
    ],
)
def test_bad_eval_data_is_refused_before_any_site_is_asked(
    net: Net, x: Any, y: Any, problem: str
) -> None:
    before = _ledgers(net)
    with Federation.from_config(net.federation) as fed:
        with pytest.raises(ParameterError, match="eval_data") as exc:
            fed.train(
                dataset="ex", model="mlp:8,6,3", target_epsilon=2.0, target_delta=1e-5,
                epochs=1, batch_size=10, eval_data=(x, y),
            )  # fmt: skip
    assert problem in str(exc.value) and "nothing was charged" in str(exc.value)
    assert _ledgers(net) == before


def _train_cli(net: Net, *args: str) -> Any:
    return CliRunner().invoke(
        app,
        [
            "train", "--federation", str(net.federation), "--target-epsilon", "2",
            "--epochs", "1", "--batch-size", "10", "--seed", "1", *args,
        ],
    )  # fmt: skip


def test_mpcdp_train_refuses_a_bad_eval_file_naming_eval_with_ledgers_unchanged(
    net: Net,
) -> None:
    root = net.root
    np.savez(root / "narrow.npz", x=np.zeros((12, 5), np.float32), y=np.arange(12) % 3)
    np.savez(root / "labels.npz", x=np.zeros((12, 8), np.float32), y=np.arange(12) % 3 + 3)
    before = _ledgers(net)
    for file, problem in (
        ("missing.npz", "cannot read an .npz"),
        ("narrow.npz", "the model cannot run on its first 8 examples (x of shape (5,)"),
        ("labels.npz", "example 0 has label 3, outside the model's 3 classes"),
    ):
        out = _train_cli(net, "--dataset", "ex", "--model", "mlp:8,6,3", "--eval", str(root / file))
        assert out.exit_code == 2, out.output
        assert "--eval" in out.stderr and problem in out.stderr, out.stderr
        assert _ledgers(net) == before


def test_integer_pixels_are_given_as_floats_to_a_model_that_needs_floats() -> None:
    """uint8 features for an MLP become float32 (as the sites do with such an .npz); token
    ids for an Embedding stay int64."""
    import torch

    from mpcdp.train.federated import checked_eval_data
    from mpcdp.train.models import build_model

    y = np.arange(12) % 3
    pixels = np.full((12, 8), 200, np.uint8)
    floats = checked_eval_data(build_model("mlp:8,6,3"), (pixels, y), loss="cross_entropy")
    assert isinstance(floats, tuple)  # arrays in, arrays out
    x = floats[0]
    assert x.dtype == np.float32 and float(x[0, 0]) == 200.0
    tokens = checked_eval_data(
        torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Flatten(), torch.nn.Linear(8, 3)),
        (np.ones((12, 2), np.int32), y),
        loss="cross_entropy",
    )
    assert isinstance(tokens, tuple) and tokens[0].dtype == np.int64


def test_an_embedding_model_trains_on_int_ids_and_evaluates_on_an_int_npz(net: Net) -> None:
    root = net.root
    rng = np.random.default_rng(9)
    y = np.arange(30) % 3
    x = (rng.integers(0, 6, size=(30, 6)) + 6 * y[:, None]).astype(np.int64)
    np.savez(root / "tok-test.npz", x=x, y=y)
    out = _train_cli(
        net, "--dataset", "tok", "--model", "tokmod:make", "--python-path", str(root / "code"),
        "--eval", str(root / "tok-test.npz"), "--lr", "0.1", "--json",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert '"test_accuracy"' in out.stdout
    for node in net.nodes.values():
        assert node.ledger.status("tok").spent_epsilon > 0
    # the same model on float ids is refused before any charge (Embedding needs integers)
    np.savez(root / "tok-float.npz", x=x.astype(np.float32), y=y)
    before = _ledgers(net)
    out = _train_cli(
        net, "--dataset", "tok", "--model", "tokmod:make", "--python-path", str(root / "code"),
        "--eval", str(root / "tok-float.npz"),
    )  # fmt: skip
    assert out.exit_code == 2 and "--eval" in out.stderr and "cannot run" in out.stderr
    assert _ledgers(net) == before


def test_an_eval_dataset_is_checked_on_its_first_items() -> None:
    """A map-style Dataset of (x, y) items: the model runs on its first items, and something
    that is not a Dataset, or an empty one, is refused (all before any site is asked)."""
    import torch

    from mpcdp.train.federated import checked_eval_data
    from mpcdp.train.models import build_model

    class Items(torch.utils.data.Dataset[Any]):
        def __init__(self, width: int, n: int = 12) -> None:
            self.width, self.n = width, n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(self.width), i % 3

    net = build_model("mlp:8,6,3")
    good = Items(8)
    assert checked_eval_data(net, good, loss="cross_entropy") is good
    for data, problem in (
        (Items(5), "evaluating the model on its first examples failed"),
        (Items(8, n=0), "the Dataset is empty"),
        (iter([]), "is not a map-style Dataset"),
    ):
        with pytest.raises(ParameterError, match="eval_data") as exc:
            checked_eval_data(net, data, loss="cross_entropy")  # type: ignore[arg-type]
        assert problem in str(exc.value)


def test_an_embedding_model_warm_starts_on_int_public_data(net: Net) -> None:
    """Public token ids stay int64 for the warm start and the public mixing (they were cast
    to floats and the Embedding failed); public data the model cannot run on is refused
    naming public_data, before any site is asked."""
    rng = np.random.default_rng(11)
    y = np.arange(60) % 3
    x = (rng.integers(0, 6, size=(60, 6)) + 6 * y[:, None]).astype(np.int64)
    with Federation.from_config(net.federation) as fed:
        result = fed.train(
            dataset="tok", model="tokmod:make", python_path=net.root / "code",
            target_epsilon=8.0, target_delta=1e-5, epochs=1, batch_size=12,
            public_data=(x, y), public_epochs=5, public_learning_rate=0.1, eval_data=(x, y),
        )  # fmt: skip
        assert result.public_accuracy is not None and result.public_accuracy > 0.6
        before = _ledgers(net)
        with pytest.raises(ParameterError) as err:
            fed.train(
                dataset="tok", model="tokmod:make", python_path=net.root / "code",
                target_epsilon=8.0, target_delta=1e-5, epochs=1, batch_size=12,
                public_data=(x[:, :2].astype(np.float32), y), public_epochs=1,
            )  # fmt: skip
        assert err.value.name == "public_data"  # type: ignore[attr-defined]
        assert _ledgers(net) == before
