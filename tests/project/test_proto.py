"""The committed generated code must be exactly what protos/generate.sh makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    generated = sorted(
        p.relative_to(tmp_path) for p in (tmp_path / "mpcdp" / "proto").glob("*_pb2*")
    )
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "mpcdp" / "proto").glob("*_pb2*"))
    assert generated == committed and generated
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), (
            f"{rel} is stale: run protos/generate.sh"
        )
