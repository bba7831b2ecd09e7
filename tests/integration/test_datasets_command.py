"""``mpcdp datasets`` against real party processes: each party's datasets, their kinds,
public columns and training shapes, and a dataset some party does not offer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mpcdp.cli.app import app
from mpcdp.local.localnet import launch

pytestmark = pytest.mark.slow


def test_datasets_lists_kinds_and_public_columns_per_party(tmp_path: Path) -> None:
    toml = {}
    for i, p in enumerate(("alice", "bob", "carlos")):
        (tmp_path / p).mkdir()
        (tmp_path / p / "t.csv").write_text(f"raise,team\n{1000 + i},red\n")
        toml[p] = (
            '[datasets.t]\npath = "t.csv"\nepsilon = 2.0\ndelta = 1e-6\n'
            "[datasets.t.columns.raise]\nlower = 0\nupper = 5000\n"
            '[datasets.t.columns.team]\ncategories = ["red", "blue"]\n'
        )
        if p != "carlos":
            x = np.zeros((5 + i, 3), np.float32)
            np.savez(tmp_path / p / "ex.npz", x=x, y=np.zeros(len(x), np.int64))
            toml[p] += (
                '[datasets.ex]\npath = "ex.npz"\nnum_classes = 4\nepsilon = 3.0\ndelta = 1e-5\n'
            )
    with launch(workdir=tmp_path, datasets_toml=toml) as net:
        f = str(net.federation_config)
        out = CliRunner().invoke(app, ["datasets", "--federation", f])
        assert out.exit_code == 0, out.output
        obj = json.loads(CliRunner().invoke(app, ["datasets", "--federation", f, "--json"]).stdout)
        # a party that does not answer is listed as such; the others still are
        net.processes["carlos"].kill()
        net.processes["carlos"].wait(timeout=30)
        down = CliRunner().invoke(app, ["datasets", "--federation", f])
        down_json = json.loads(
            CliRunner().invoke(app, ["datasets", "--federation", f, "--json"]).stdout
        )
    assert down.exit_code == 0, down.output
    assert down.stdout.splitlines()[0] == "alice:"
    assert down.stdout.splitlines()[-1].startswith("carlos: did not answer: ")
    assert "error" in down_json["carlos"] and len(down_json["alice"]) == 2
    lines = out.stdout.splitlines()
    assert [li for li in lines if not li.startswith(" ")][:3] == ["alice:", "bob:", "carlos:"]
    assert (
        "  t (table): columns raise [0, 5000], team {red, blue}; budget 2 at delta 1e-06, "
        "left 2, yours to spend 2" in lines
    )
    assert any(li.startswith("  ex (examples): 6 examples of shape 3, 4 classes") for li in lines)
    assert lines[-1] == "note: ex is not offered by carlos"
    assert sorted(d["name"] for d in obj["alice"]) == ["ex", "t"]
    assert [d["kind"] for d in obj["carlos"]] == ["table"]


def test_an_unreadable_federation_file_is_named(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["datasets", "--federation", str(tmp_path / "none.toml")])
    assert out.exit_code == 1 and "none.toml" in out.stderr
