"""The package boundaries (docs/architecture.md), enforced by folder: the pure core imports
neither grpc nor torch, grpc and protobuf stay in transport/, each package imports only the
packages below it, importing the core has no side effects, and no child process is started
in a way that gRPC can abort."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "mpcdp"

#: The pure core: numpy, cryptography and the standard library only. Whole folders, plus the
#: two loose files that belong to it.
PURE_DIRS = ["mpc", "dp", "audit", "config", "sql", "data", "protocol"]
PURE_FILES = ["errors.py", "local/simulation.py"]
FORBIDDEN = {"grpc", "grpc_health", "google.protobuf", "mpcdp.proto", "torch"}

#: The wire: grpc, grpc_health, protobuf and the generated mpcdp.proto are imported by
#: transport/ (and proto/ itself) only: the node, the analyst's API, train/ and the demos hand
#: out and take dataclasses (transport/codec.py converts).
WIRE = {"grpc", "grpc_health", "google.protobuf", "mpcdp.proto"}
WIRE_DIRS = ["transport", "proto"]
WIRE_EXCEPTIONS: dict[str, set[str]] = {}

#: The layers: the mpcdp packages (a folder, or a top-level module) each one may import.
#: Everything may import mpcdp.errors and mpcdp's own constants (mpcdp/__init__.py).
LAYERS: dict[str, set[str]] = {
    "mpc": set(),
    "dp": {"mpc"},
    "audit": set(),
    "config": set(),
    "sql": {"config"},
    "data": {"config", "sql"},
    "protocol": {"mpc", "dp", "audit", "config", "sql", "data"},
    "transport": {"mpc", "config", "protocol", "proto"},
    "train": {"mpc", "dp", "audit", "config", "protocol"},
    "party": {
        "mpc",
        "dp",
        "audit",
        "config",
        "sql",
        "data",
        "protocol",
        "proto",
        "transport",
        "train",
    },
    "federation": {
        "mpc",
        "dp",
        "audit",
        "config",
        "sql",
        "protocol",
        "proto",
        "transport",
        "train",
    },
    "local": {"mpc", "dp", "transport"},
    "demos": {"mpc", "dp", "protocol", "federation", "local", "train"},
    "cli": {"config", "dp", "transport", "train", "party", "federation", "demos"},
    "__main__": {"cli"},
}
ALWAYS = {"errors", "__init__"}


def _files(dirs: list[str], files: list[str] = []) -> list[Path]:  # noqa: B006
    found = [PKG / f for f in files]
    for d in dirs:
        found += sorted((PKG / d).glob("**/*.py"))
    return found


def _imports(path: Path) -> list[str]:
    """Every module a file imports, anywhere in it (``from mpcdp import x`` gives mpcdp.x)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mpcdp":
                names += [f"mpcdp.{a.name}" for a in node.names]
            else:
                names.append(node.module)
    return names


def _matches(name: str, prefixes: set[str]) -> set[str]:
    return {p for p in prefixes if name == p or name.startswith(p + ".")}


def _package(path: Path) -> str:
    """The package a file belongs to: its top folder under mpcdp/, or its own name."""
    parts = path.relative_to(PKG).with_suffix("").parts
    return parts[0]


def test_pure_core_imports_neither_grpc_nor_torch_statically() -> None:
    offenders = [
        f"{path.relative_to(PKG)}: {n}"
        for path in _files(PURE_DIRS, PURE_FILES)
        for n in _imports(path)
        if _matches(n, FORBIDDEN)
    ]
    assert offenders == []


def test_only_transport_imports_grpc_and_protobuf() -> None:
    inside = set(_files(WIRE_DIRS))
    offenders = []
    for path in sorted(PKG.glob("**/*.py")):
        if path in inside:
            continue
        rel = path.relative_to(PKG).as_posix()
        for n in _imports(path):
            hit = _matches(n, WIRE) - WIRE_EXCEPTIONS.get(rel, set())
            if hit:
                offenders.append(f"{rel}: {n}")
    assert offenders == []
    for rel in WIRE_EXCEPTIONS:
        assert (PKG / rel).exists(), f"{rel} is gone: drop it from WIRE_EXCEPTIONS"


def test_each_package_imports_only_the_layers_below_it() -> None:
    packages = {_package(p) for p in PKG.glob("**/*.py")} - ALWAYS - {"proto"}
    assert packages == set(LAYERS), "a package is missing from LAYERS (or LAYERS is stale)"
    offenders = []
    for path in sorted(PKG.glob("**/*.py")):
        me = _package(path)
        if me in ALWAYS or me == "proto":
            continue
        for n in _imports(path):
            if not n.startswith("mpcdp."):
                continue
            other = n.split(".")[1]
            if other in (me, *ALWAYS) or other[:1].isupper() or other.startswith("__"):
                continue  # its own package, errors, or a constant of mpcdp/__init__.py
            if other not in LAYERS[me]:
                offenders.append(f"{path.relative_to(PKG)}: {n}")
    assert offenders == []


def test_importing_the_core_loads_no_grpc_torch_and_starts_nothing() -> None:
    modules = ["mpcdp"] + [
        "mpcdp." + p.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
        for p in _files(PURE_DIRS, PURE_FILES)
        if p.name != "__init__.py"
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


def test_no_two_modules_share_a_name() -> None:
    """A module's name says what it is: no two modules of the package, nor two test modules,
    share a file name (a package's __init__ and __main__ aside)."""
    for root, skip in ((PKG, {"__init__.py", "__main__.py"}), (PKG.parent / "tests", set())):
        seen: dict[str, Path] = {}
        pattern = "**/*.py" if root == PKG else "**/test_*.py"
        for path in sorted(root.glob(pattern)):
            if path.name in skip:
                continue
            assert path.name not in seen, f"{path} and {seen[path.name]} share a name"
            seen[path.name] = path


def test_no_preexec_fn_where_grpc_may_run() -> None:
    """No Popen ``preexec_fn`` in the package or the tests: it makes Popen fork() instead of
    vfork(), and in a process whose gRPC runs, gRPC's fork handler restarts its poller in the
    child, where close_fds closes the poller's epoll descriptor before exec: the child aborts
    in about 1 launch of 60 (measured with a serving gRPC process and 2,000 launches; none in
    2,000 without ``preexec_fn``). A small exec wrapper does the same work safely."""
    offenders = []
    for root in (PKG, PKG.parent / "tests"):
        for path in sorted(root.glob("**/*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "preexec_fn":
                    offenders.append(f"{path}:{node.value.lineno}")
    assert not offenders, f"preexec_fn used at {offenders}"
