"""Helpers shared by the training tests: a small model and its examples at each site, a
TrainSpec, an in-process TrainingClient, the sites' engines. torch is imported only by
:func:`initial`."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mpcdp.protocol.identity import SignedKey
from mpcdp.protocol.query.party_engine import Proposal
from mpcdp.protocol.query.round_coordinator import ContributionStream
from mpcdp.protocol.training import (
    TrainingEngine,
    TrainSpec,
)
from tests.conftest import PARTIES, Net

MODEL = "mlp:8,6,3"


NUM_PARAMS = 8 * 6 + 6 + 6 * 3 + 3


def example_data(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 8)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y


def examples_toml(
    root: Path, *, epsilon: float = 20.0, cap: float | None = None, held_out: int = 0
) -> dict[str, str]:
    """Each site's dataset ``ex`` (40 examples); with ``held_out``, also a held-out split of
    that many examples (``eval_path``)."""
    extra = {}
    for i, p in enumerate(PARTIES):
        x, y = example_data(i)
        np.savez(root / f"{p}-ex.npz", x=x, y=y)
        extra[p] = (
            f'\n[datasets.ex]\npath = "{p}-ex.npz"\nnum_classes = 3\nepsilon = {epsilon}\n'
            "delta = 1e-5\n" + ("" if cap is None else f"max_epsilon_per_query = {cap}\n")
        )
        if held_out:
            tx, ty = example_data(100 + i, n=held_out)
            np.savez(root / f"{p}-ex-test.npz", x=tx, y=ty)
            extra[p] += f'eval_path = "{p}-ex-test.npz"\n'
    return extra


class Direct:
    """A TrainingClient calling a TrainingEngine in-process (the in-memory transport)."""

    def __init__(self, engine: TrainingEngine, coordinator: str = "analyst") -> None:
        self.engine, self.coordinator = engine, coordinator
        self.uploads: list[np.ndarray] = []

    @property
    def party_id(self) -> str:
        return self.engine.party_id

    def train_open(self, *, session_id: bytes, spec: TrainSpec) -> Proposal:
        return self.engine.open(session_id=session_id, spec=spec, coordinator=self.coordinator)

    def train_step(
        self,
        *,
        session_id: bytes,
        step: int,
        keys: Sequence[SignedKey],
        parameters: np.ndarray,
        full: bool,
        ring_bits: int,
        deadline_s: float | None = None,
        evaluate: bool = False,
    ) -> ContributionStream:
        # as gRPC does: past the call's deadline the site sees the call given up
        end = None if deadline_s is None else time.monotonic() + deadline_s
        run = self.engine.evaluate if evaluate else self.engine.step
        c = run(
            session_id=session_id,
            step=step,
            keys=keys,
            parameters=parameters,
            full=full,
            coordinator=self.coordinator,
            in_time=None if end is None else (lambda: time.monotonic() < end),
        )
        words = c.masked().copy()
        self.uploads.append(words)
        if not evaluate:
            self.engine.step_finished(session_id=session_id)

        def chunks() -> Iterator[np.ndarray]:
            yield from np.array_split(words, 3)

        return ContributionStream(
            c.party_id, c.length, c.epsilon_spent, c.budget_remaining, chunks(), c.audit_inclusion
        )

    def abort(self, *, session_id: bytes, reason: str) -> None:
        self.engine.abort(session_id=session_id, coordinator=self.coordinator)


def tspec(**kw: object) -> TrainSpec:
    base: dict[str, object] = dict(
        run_id="run-1",
        dataset="ex",
        model=MODEL,
        parties=PARTIES,
        sample_rate=0.25,
        steps=4,
        max_grad_norm=1.0,
        scale_bits=16,
        mu=(2.0 * (2**16 + math.sqrt(NUM_PARAMS))) ** 2,
        num_params=NUM_PARAMS,
        steps_per_charge=2,
    )
    base.update(kw)
    return TrainSpec(**base)  # type: ignore[arg-type]


def engines_of(net: Net) -> dict[str, TrainingEngine]:
    out = {}
    for p, node in net.nodes.items():
        assert node.training is not None
        out[p] = node.training
    return out


def dither_threads(wait_s: float = 5.0) -> list[str]:
    """Names of live site dither threads, after giving stopped ones ``wait_s`` to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        names = [t.name for t in threading.enumerate() if t.name.startswith("dither")]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.01)


def initial(spec: TrainSpec) -> np.ndarray:
    import torch

    from mpcdp.train.models import build_model

    torch.manual_seed(0)
    net = build_model(spec.model)
    return torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
