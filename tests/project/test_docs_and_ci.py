"""Project hygiene that CI must keep true: README == CI command, the docs' example and links.

Lint, formatting, strict types and the freshness of the generated proto code are named
steps of .ci/run (and hooks in .pre-commit-config.yaml), not tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", readme, flags=re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_python_api_example_runs(tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "python-api.md").read_text()
    code = re.findall(r"```python core-example\n(.*?)```", guide, flags=re.S)[0]
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


DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_resolve(doc: Path) -> None:
    """Every relative link of the README and the guides names a file or folder that exists."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        assert (doc.parent / path).exists(), f"{doc.name}: broken link {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_no_tracker_items(doc: Path) -> None:
    """The docs say what the system does; tracker items and work sessions stay in the tracker."""
    found = re.findall(r"\b(?:issues?|sessions?) \d+", doc.read_text(), flags=re.I)
    assert not found, f"{doc.name}: {found}"
