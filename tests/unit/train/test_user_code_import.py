"""One importer of user code: `mpcdp check-model` (mpcdp.train.model_check.load_model), the
coordinator's --model (mpcdp.train.run_model) and a site's declarations
(mpcdp.train.declared) import a ``package.module:attr`` path through the same function,
under the same lock on sys.path, and get the same object."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

pytest.importorskip("torch")


from torch import nn

from mpcdp.errors import ConfigError, ParameterError, UserImportError
from mpcdp.train import declared
from mpcdp.train.model_check import load_model
from mpcdp.train.run_model import model_factory_for

COUNTED = """
    from pathlib import Path

    from torch import nn

    # every execution of this module's body leaves one line in the log
    with open(Path(__file__).with_suffix(".log"), "a") as log:
        log.write("imported\\n")

    instance = nn.Linear(4, 2)

    def build(name):
        return instance
"""


@pytest.fixture
def counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> tuple[Path, str]:
    """A folder with a module (named after the test) that logs each import of itself."""
    name = f"counted_{request.node.name.replace('[', '_').replace(']', '_').replace('-', '_')}"
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / f"{name}.py").write_text(textwrap.dedent(COUNTED))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return folder, name


def imports(folder: Path, name: str) -> int:
    log = folder / f"{name}.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_check_model_the_coordinator_and_a_site_get_the_same_object(
    counted: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, name = counted
    calls: list[tuple[Path, ...]] = []
    real = declared._add_python_path

    def spy(folders: Sequence[Path]) -> None:
        calls.append(tuple(folders))
        real(folders)

    monkeypatch.setattr(declared, "_add_python_path", spy)
    checked = load_model(f"{name}:instance", python_path=[folder])
    site = declared.model_factory(
        f"{name}:build", python_path=(folder.resolve(),), where="site.model"
    )
    coordinator = model_factory_for(f"{name}:build", default=nn.Identity, python_path=folder)
    assert isinstance(checked, nn.Linear)
    assert site("m") is checked and coordinator("m") is checked
    assert declared.import_object(f"{name}:instance", where="x") is checked
    assert imports(folder, name) == 1  # imported once, by the one importer
    # every path went through the importer's lock on sys.path, with the folder resolved
    assert calls == [(folder.resolve(),)] * 3 + [()]
    assert str(folder.resolve()) in sys.path


def test_check_model_refuses_what_a_site_refuses(counted: tuple[Path, str]) -> None:
    folder, name = counted
    for target in (f"{name}:nothing", "surely_missing_pkg_xyz:build", f"{name}-x:build"):
        with pytest.raises(ConfigError) as site:
            declared.import_object(target, python_path=(folder.resolve(),), where="site.model")
        with pytest.raises(ParameterError) as checked:
            load_model(target, python_path=[folder])
        assert checked.value.name == "model" and checked.value.value == target
        assert repr(target) in str(site.value)
        if isinstance(site.value, UserImportError):
            assert site.value.path == target and site.value.where == "site.model"
    assert imports(folder, name) == 1


def test_an_import_failure_keeps_its_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "raises_at_import_xyz.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.delitem(sys.modules, "raises_at_import_xyz", raising=False)
    with pytest.raises(UserImportError) as site:
        declared.import_object("raises_at_import_xyz:f", python_path=(tmp_path,), where="k")
    assert isinstance(site.value.cause, RuntimeError)
    assert site.value.module_name == "raises_at_import_xyz" and site.value.attr == "f"
    assert "k = 'raises_at_import_xyz:f': cannot import module" in str(site.value)
    with pytest.raises(ParameterError, match="raised RuntimeError: boom") as checked:
        load_model("raises_at_import_xyz:f", python_path=[tmp_path])
    assert isinstance(checked.value.__cause__, RuntimeError)
