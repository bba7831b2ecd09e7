"""A site on two ranks (torch.distributed, gloo on the CPU), as torchrun starts it.

Each test starts two real processes with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): rank 0 leads, rank 1 serves. Rank 0 prints one JSON line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from mpcdp.errors import ParameterError
from mpcdp.train.ranks import deal

pytestmark = pytest.mark.slow

COMMON = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    from mpcdp.errors import RankFailure
    from pathlib import Path
    from mpcdp.config.datasets import Examples
    from mpcdp.protocol.training import TrainSpec
    from mpcdp.train.ranks import RankGroup, serve_worker
    from mpcdp.train.gradient_source import TorchGradientSource

    torch.manual_seed(0)
    X = torch.randn(300, 12, generator=torch.Generator().manual_seed(1))
    Y = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(2))

    NCLS = 4

    def model(description):
        torch.manual_seed(3)
        return torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
        )

    def build(description):
        spec = TrainSpec(
            run_id="r", dataset="d", model="m", parties=("a", "b"), sample_rate=0.5, steps=1,
            max_grad_norm=description["C"], scale_bits=0, mu=1.0, num_params=1,
        )
        examples = Examples(path=Path("memory"), x=X.numpy(), y=Y.numpy(), num_classes=NCLS)
        return TorchGradientSource(model=model(description), spec=spec, examples=examples,
                                   device="cpu", max_physical_batch=description["physical"])
    """
)

LEADER = COMMON + textwrap.dedent(
    """
    group = RankGroup.from_env(backend="gloo", timeout_s=float(os.environ["TIMEOUT"]))
    description = {"C": 0.7, "physical": 16}
    own = build(description)
    group.open(key="s1", description=description)
    flat = torch.nn.utils.parameters_to_vector(own.model.parameters()).detach() * 1.5
    own.load_flat(flat, full=True)
    group.load(key="s1", flat=flat, full=True)
    rng = np.random.default_rng(4)
    idx = np.flatnonzero(rng.random(300) < 0.3)
    out = torch.empty(own.clipper.num_params)
    result = {}
    try:
        group.clipped_sum(key="s1", indices=idx, scale=8.0, own=own, out=out)
        single = build(description)
        single.load_flat(flat, full=True)
        ref = torch.empty_like(out)
        single.clipped_sum(idx, scale=8.0, out=ref)
        result["max_abs_diff"] = float((out - ref).abs().max())
        result["max_abs"] = float(ref.abs().max())
        group.clipped_sum(key="s1", indices=idx[:0], scale=8.0, own=own, out=out)
        result["empty_is_zero"] = bool((out == 0).all())
    except RankFailure as exc:
        result["failure"] = str(exc)
        try:
            group.clipped_sum(key="s1", indices=idx, scale=8.0, own=own, out=out)
        except RankFailure as again:
            result["then"] = str(again)
    group.close(key="s1")
    group.stop()
    print(json.dumps(result))
    """
)

WORKER = COMMON + textwrap.dedent(
    """
    if os.environ.get("DIE_AT_STEP"):
        real = build
        def build(description):
            source = real(description)
            def die(indices, *, scale, out):
                os._exit(3)
            source.clipped_sum = die
            return source
    serve_worker(build=build, device=torch.device("cpu"), backend="gloo",
                 timeout_s=float(os.environ["TIMEOUT"]))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_ranks(tmp_path: Path, *, die: bool = False) -> tuple[dict[str, Any], int]:
    (tmp_path / "leader.py").write_text(LEADER)
    (tmp_path / "worker.py").write_text(WORKER)
    base = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
        TIMEOUT="20", PYTHONPATH=str(Path(__file__).resolve().parents[2]),
    )  # fmt: skip
    worker_env = dict(base, RANK="1", LOCAL_RANK="1", **({"DIE_AT_STEP": "1"} if die else {}))
    worker = subprocess.Popen(
        [sys.executable, str(tmp_path / "worker.py")], env=worker_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    leader = subprocess.run(
        [sys.executable, str(tmp_path / "leader.py")], env=dict(base, RANK="0", LOCAL_RANK="0"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    assert leader.returncode == 0, leader.stderr
    return json.loads(leader.stdout.strip().splitlines()[-1]), int(worker.returncode)


def test_a_two_rank_site_sums_what_one_process_sums(tmp_path: Path) -> None:
    """The clipped sum of a 2-rank site equals the single-process sum on the same Poisson
    sample, to float32 precision; an empty sample gives zeros; the worker stops cleanly."""
    result, worker_rc = _two_ranks(tmp_path)
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["max_abs"])
    assert result["empty_is_zero"] is True
    assert worker_rc == 0


def test_a_dead_worker_fails_the_step_and_the_group_stays_refused(tmp_path: Path) -> None:
    """A worker that dies mid-step makes rank 0's step fail (so the round aborts and nothing
    is revealed); later steps are refused with the advice to restart the site."""
    result, worker_rc = _two_ranks(tmp_path, die=True)
    assert worker_rc == 3
    assert "failed or did not answer" in str(result["failure"])
    assert "restart the site" in str(result["then"])


def test_deal_hands_every_drawn_index_to_exactly_one_rank() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        idx = np.flatnonzero(rng.random(1000) < rng.uniform(0, 0.2))
        world = int(rng.integers(1, 9))
        parts = deal(idx, world_size=world)
        assert len(parts) == world
        assert np.array_equal(np.sort(np.concatenate(parts)), idx)
        sizes = [p.size for p in parts]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ParameterError, match="world_size"):
        deal(np.arange(3), world_size=0)
