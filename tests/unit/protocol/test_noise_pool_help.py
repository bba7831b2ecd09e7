"""A background build that a request needs now is finished at normal priority
(mpcdp.protocol.noise_pool: the taker runs the build's queued slices on the foreground
workers), so a vector on the request path never waits on starved low-priority threads."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor

import numpy as np
import pytest

from mpcdp.mpc.rng import csprng
from mpcdp.protocol.noise_pool import NoisePool


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_take_runs_the_queued_slices_of_a_build_under_way() -> None:
    pool = NoisePool(rng=csprng(key=bytes(16)), threads=1)
    block, started = threading.Event(), threading.Event()
    nices: list[int] = []
    base = _nice()

    def build(g: np.random.Generator, workers: Executor) -> np.ndarray:
        started.set()
        out = np.zeros(8, dtype=np.uint64)

        def one(i: int) -> None:
            nices.append(_nice())
            out[i] = i + 1

        list(workers.map(one, range(8)))
        return out

    try:
        # the only low-priority slice thread is busy (as under a starving load)
        pool._bg_workers._threads.submit(block.wait)
        pool.prepare("k", build, nbytes=64)
        assert started.wait(30)
        got = pool.take("k", build)
        assert got.tolist() == list(range(1, 9))
        assert pool.hits == 1 and pool.misses == 0
        if os.name == "posix":
            assert nices == [base] * 8  # every slice ran on a foreground worker
    finally:
        block.set()
        pool.close()


def test_a_build_that_has_not_started_is_built_in_the_foreground() -> None:
    pool = NoisePool(rng=csprng(key=bytes(16)), threads=1)
    block = threading.Event()
    calls: list[str] = []

    def builder(label: str):  # type: ignore[no-untyped-def]
        def build(g: np.random.Generator, workers: Executor) -> np.ndarray:
            calls.append(label)
            return np.full(2, len(calls), dtype=np.uint64)

        return build

    try:
        pool._executor.submit(block.wait)  # the background builder is busy
        pool.prepare("k", builder("bg"), nbytes=16)
        assert pool.take("k", builder("fg")).tolist() == [1, 1]
        assert calls == ["fg"] and pool.misses == 1
    finally:
        block.set()
        pool.close()
    assert calls == ["fg"]  # the cancelled background build never ran


def test_a_failed_slice_of_a_helped_build_falls_back_to_the_foreground() -> None:
    pool = NoisePool(rng=csprng(key=bytes(16)), threads=1)
    block = threading.Event()

    def bad(g: np.random.Generator, workers: Executor) -> np.ndarray:
        def one(i: int) -> None:
            raise RuntimeError("slice failed")

        list(workers.map(one, range(3)))
        raise AssertionError("unreachable")

    def good(g: np.random.Generator, workers: Executor) -> np.ndarray:
        return np.arange(3, dtype=np.uint64)

    try:
        pool._bg_workers._threads.submit(block.wait)
        pool.prepare("k", bad, nbytes=24)
        assert pool.take("k", good).tolist() == [0, 1, 2]
        assert pool.misses == 1
    finally:
        block.set()
        pool.close()


@pytest.mark.parametrize("slices", [1, 5, 40])
def test_helped_and_unhelped_builds_are_the_same_vector(slices: int) -> None:
    """Which thread runs a slice does not change the vector (each slice has its own key)."""
    from mpcdp.protocol.noise_pool import fill_in_slices

    def build(g: np.random.Generator, workers: Executor) -> np.ndarray:
        out = np.empty(slices * 16, dtype=np.uint64)

        def fill(a: int, b: int, gen: np.random.Generator) -> None:
            out[a:b] = gen.integers(0, 2**63, b - a, dtype=np.uint64)

        fill_in_slices(size=out.size, slice_size=16, rng=g, fill=fill, workers=workers)
        return out

    vectors = []
    for helped in (False, True):
        pool = NoisePool(rng=csprng(key=bytes(16)), threads=2)
        block = threading.Event()
        try:
            if helped:
                pool._bg_workers._threads.submit(block.wait)
                pool._bg_workers._threads.submit(block.wait)
            pool.prepare("k", build, nbytes=slices * 128)
            if not helped:
                pool._ready["k"][1].result()
            vectors.append(pool.take("k", build))
            assert pool.hits == 1
        finally:
            block.set()
            pool.close()
    assert np.array_equal(vectors[0], vectors[1])
