"""The dependency rule and the no-import-side-effects rule, enforced."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mpcdp"
PURE = ["errors.py", "local/simulation.py"]
PURE_DIRS = ["mpc", "dp", "protocol"]
FORBIDDEN = {"grpc", "torch", "google.protobuf"}


def _pure_files() -> list[Path]:
    files = [PKG / f for f in PURE]
    for d in PURE_DIRS:
        files += sorted((PKG / d).glob("**/*.py")) if (PKG / d).exists() else []
    return files


def test_pure_core_imports_neither_grpc_nor_torch_statically() -> None:
    offenders = []
    for path in _pure_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)
            ]
    assert offenders == []


def test_importing_the_core_loads_no_grpc_torch_and_starts_nothing() -> None:
    modules = [
        "mpcdp",
        "mpcdp.mpc.ring",
        "mpcdp.mpc.encoding",
        "mpcdp.mpc.prg",
        "mpcdp.mpc.sharing",
        "mpcdp.mpc.rng",
        "mpcdp.local.simulation",
        "mpcdp.dp.samplers",
        "mpcdp.dp.mechanisms",
        "mpcdp.dp.accountant",
        "mpcdp.dp.ledger",
        "mpcdp.dp.rdp",
        "mpcdp.dp.events",
        "mpcdp.dp.randomized_response",
    ]
    code = (
        "import sys, threading, os\n"
        "before = set(os.listdir('.'))\n"
        + "".join(f"import {m}\n" for m in modules)
        + "bad = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'torch')]\n"
        "assert not bad, bad\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert set(os.listdir('.')) == before\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PKG.parent)
