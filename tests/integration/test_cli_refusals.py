"""The command line's refusals as a user reads them: a misspelled dataset, column, model,
loss, mechanism or subcommand lists the valid names (mpcdp.errors.valid_names, the closest
first), and a refused query or run says once what was charged (mpcdp.cli.messages)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from mpcdp.cli.app import app
from mpcdp.cli.messages import refusal_text
from mpcdp.errors import valid_names
from mpcdp.local.localnet import LocalFederation, launch


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def test_valid_names_puts_the_close_matches_first() -> None:
    assert valid_names("summ", ["sum", "mean", "count"]) == (
        "did you mean 'sum'? valid names: count, mean, sum"
    )
    assert valid_names("zzz", ["b", "a", "a"]) == "valid names: a, b"
    assert valid_names("x", []) == "there are none"


def test_refusal_text_says_nothing_was_charged_once() -> None:
    party = "privacy budget exceeded; the query is refused and nothing was charged"
    text = f"query q aborted: alice: {party}; bob: {party}; nothing was charged"
    once = refusal_text(RuntimeError(text))
    assert once.count("nothing was charged") == 1 and once.endswith("; nothing was charged")
    assert "alice: privacy budget exceeded; the query is refused; bob:" in once
    assert refusal_text("refused (nothing was charged)") == "refused (nothing was charged)"
    assert refusal_text("a (nothing was charged); b; nothing was charged") == (
        "a; b; nothing was charged"
    )


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["query", "summ"], "did you mean 'sum'? valid names: count, histogram, mean, sql, sum"),
        (["query", "avg"], "valid names: count, histogram, mean, sql, sum"),
        (["trian"], "did you mean 'train'?"),
        (["demo", "salery"], "did you mean 'salary'? valid names: digits, salary"),
    ],
)
def test_a_misspelled_command_lists_the_commands(args: list[str], names: str) -> None:
    out = cli(*args)
    assert out.exit_code == 2 and names in out.stderr and repr(args[-1]) in out.stderr


def test_a_misspelled_loss_is_refused_before_any_site_is_asked(tmp_path: Path) -> None:
    # the federation file does not exist: the loss is refused before it is read
    for command in ("train", "audit"):
        out = cli(command, "--federation", str(tmp_path / "none.toml"), "--dataset", "d",
                  "--loss", "cross_entropi")  # fmt: skip
        assert out.exit_code == 2 and "--loss" in out.stderr and "'cross_entropi'" in out.stderr
        assert "did you mean 'cross_entropy'? valid names: cross_entropy, mse" in out.stderr


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """Three parties with a table t (budget 2) and an example dataset ex."""
    root = tmp_path_factory.mktemp("refusals")
    toml = {}
    for i, p in enumerate(("alice", "bob", "carlos")):
        (root / p).mkdir()
        (root / p / "t.csv").write_text(f"raise,team\n{1000 + i},red\n{2000 + i},blue\n")
        x = np.zeros((6, 3), np.float32)
        np.savez(root / p / "ex.npz", x=x, y=np.zeros(6, np.int64))
        toml[p] = (
            '[datasets.t]\npath = "t.csv"\nepsilon = 2.0\ndelta = 1e-6\n'
            "[datasets.t.columns.raise]\nlower = 0\nupper = 5000\n"
            '[datasets.t.columns.team]\ncategories = ["red", "blue"]\n'
            '[datasets.ex]\npath = "ex.npz"\nnum_classes = 2\nepsilon = 3.0\ndelta = 1e-5\n'
        )
    with launch(workdir=root, datasets_toml=toml) as net:
        yield net


@pytest.mark.slow
def test_a_misspelled_dataset_or_column_lists_the_valid_names(fed: LocalFederation) -> None:
    f = str(fed.federation_config)
    query = ["query", "sum", "--federation", f, "--epsilon", "0.1"]
    out = cli(*query, "--dataset", "tt", "--column", "raise")
    assert out.exit_code == 1 and "dataset='tt'" in out.stderr
    assert "did you mean 't'? valid names: t" in out.stderr  # ex is for training
    out = cli(*query, "--dataset", "t", "--column", "rase")
    assert out.exit_code == 1 and "column='rase'" in out.stderr
    assert "did you mean 'raise'? valid names: raise, team" in out.stderr
    out = cli(*query, "--dataset", "t", "--column", "raise", "--mechanism", "lapalce")
    assert out.exit_code == 2 and "did you mean 'discrete-laplace'?" in out.stderr
    out = cli(*query, "--dataset", "ex", "--column", "raise")
    assert out.exit_code == 1 and "column='raise'" in out.stderr
    assert "'ex' is a dataset to train on (mpcdp train), with no columns" in out.stderr
    out = cli("train", "--federation", f, "--dataset", "exx")
    assert out.exit_code == 1 and "dataset='exx'" in out.stderr
    assert "did you mean 'ex'? valid names: ex" in out.stderr
    out = cli("train", "--federation", f, "--dataset", "ex", "--model", "mpl:3,2")
    assert out.exit_code == 1 and "'mpl:3,2'" in out.stderr
    assert "did you mean 'mlpln' or 'mlp'? valid names: linear, mlp, mlpln" in out.stderr


@pytest.mark.slow
def test_a_query_refused_by_every_party_says_once_that_nothing_was_charged(
    fed: LocalFederation,
) -> None:
    out = cli("query", "sum", "--federation", str(fed.federation_config), "--dataset", "t",
              "--column", "raise", "--epsilon", "5")  # fmt: skip
    assert out.exit_code == 1 and "privacy budget exceeded for dataset='t'" in out.stderr
    assert out.stderr.count("nothing was charged") == 1


@pytest.mark.slow
def test_a_refused_query_is_said_once_by_the_command_as_a_user_runs_it(
    fed: LocalFederation,
) -> None:
    """The process as a user runs it (its log on stderr): the failed round is not also
    logged as a warning, and shown with -v."""
    exe = str(Path(sys.executable).parent / "mpcdp")
    args = ["query", "sum", "--federation", str(fed.federation_config), "--dataset", "t",
            "--column", "raise", "--epsilon", "5"]  # fmt: skip
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("nothing was charged") == 1
    assert "WARNING" not in out.stderr
    verbose = subprocess.run([exe, "-v", *args], capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 1 and "WARNING" in verbose.stderr


def test_a_query_on_a_federation_of_training_data_says_what_it_offers() -> None:
    from mpcdp.cli.messages import with_valid_names
    from mpcdp.errors import ParameterError
    from mpcdp.protocol.catalog import DatasetInfo, PartyDescription

    class Stub:
        def describe(self) -> dict[str, PartyDescription]:
            ex = DatasetInfo(name="digits", kind="examples", length=10)
            return {p: PartyDescription(party_id=p, datasets=(ex,)) for p in ("a", "b")}

    exc = ParameterError("dataset", "digitz", "is not offered by party 'a'")
    said = str(with_valid_names(Stub(), exc, training=False))  # type: ignore[arg-type]
    assert "no dataset to query is offered by every party" in said
    assert "the datasets offered: digits" in said
    said = str(with_valid_names(Stub(), exc, training=True))  # type: ignore[arg-type]
    assert "did you mean 'digits'? valid names: digits" in said
