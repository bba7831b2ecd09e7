"""Project hygiene that CI must keep true: lint, types, and README == CI command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed; install the dev extra: pip install -e '.[dev]'")
    return exe


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", readme, flags=re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_ruff_lint_and_format() -> None:
    subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, check=True)
    subprocess.run([_tool("ruff"), "format", "--check", "."], cwd=ROOT, check=True)


def test_mypy_strict() -> None:
    subprocess.run([_tool("mypy")], cwd=ROOT, check=True)


def test_readme_python_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python core-example\n(.*?)```", readme, flags=re.S)[0]
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert (tmp_path / "party-a.sqlite").exists()


@pytest.mark.parametrize("script", ["noise_sampling", "masking"])
def test_benchmarks_run_at_tiny_sizes(script: str) -> None:
    args = ["--size", "1000"] if script == "noise_sampling" else ["--sizes", "1000"]
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *args, "--repeat", "1"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "ratio" in out.stdout or "mask/add" in out.stdout
