"""Noisy local vectors built ahead of time, off the request path (DESIGN.md, "Distributed
noise": "generate noise ahead of the request path").

What a party uploads is ``mask + (noise share + local statistic)``. The part in parentheses
depends only on the party's (static) data and the query's parameters, so the party keeps at
most one ready vector per parameter set: a round takes the ready vector (or, on a miss,
builds one synchronously), and once the round's upload has been sent, :meth:`prepare` builds
the next one in a background thread, so that a later round with the same parameters
(a repeated dashboard query, training rounds with a fixed plan) finds it ready and does not
compete with it for the CPU.

Each vector holds a fresh noise share, is handed to exactly one round and is never kept or
reused after that. Memory is bounded by ``max_entries`` and ``max_bytes``; the least
recently used parameters are dropped first.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import numpy as np

from mpcdp.rng import csprng, ensure_rng

__all__ = ["Builder", "NoisePool", "default_noise_threads", "fill_in_slices"]

log = logging.getLogger(__name__)

#: Builds one vector from a CSPRNG; called in the foreground (miss) or the background.
Builder = Callable[[np.random.Generator], np.ndarray]

#: Per-slice CSPRNG keys (AES-128) drawn from the caller's generator.
_SLICE_KEY_BYTES = 16


def default_noise_threads() -> int:
    """Threads for drawing noise: the cores this process may run on, at most 8, and at most
    OMP_NUM_THREADS when that is set (mpcdp.localnet sets it so that parties sharing one
    machine split its cores instead of oversubscribing them)."""
    if hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, min(8, n))


def fill_in_slices(
    *,
    size: int,
    slice_size: int,
    rng: np.random.Generator,
    fill: Callable[[int, int, np.random.Generator], None],
    workers: Executor | None = None,
) -> None:
    """Call ``fill(start, stop, gen)`` for consecutive slices of ``range(size)``.

    Each slice gets its own AES-CTR CSPRNG keyed with 16 bytes drawn from ``rng`` (so the
    result is a function of ``rng`` alone, whatever the scheduling), and the slices run on
    ``workers`` when given: numpy's samplers release the GIL, so a party draws a noise share
    on all its cores. Small slices also keep the temporaries small.
    """
    bounds = [(a, min(size, a + slice_size)) for a in range(0, size, slice_size)]
    keys = [rng.bytes(_SLICE_KEY_BYTES) for _ in bounds]

    def one(i: int) -> None:
        fill(bounds[i][0], bounds[i][1], csprng(key=keys[i]))

    if workers is None or len(bounds) < 2:
        for i in range(len(bounds)):
            one(i)
    else:
        list(workers.map(one, range(len(bounds))))


class NoisePool:
    def __init__(
        self,
        *,
        rng: np.random.Generator | None = None,
        max_entries: int = 4,
        max_bytes: int = 1 << 30,
    ) -> None:
        # the foreground and the background thread never share a Generator
        self._rng = ensure_rng(rng)
        self._bg_rng = csprng() if rng is None else ensure_rng(rng)
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ready: OrderedDict[Hashable, tuple[int, Future[np.ndarray]]] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noise")
        self.hits = 0
        self.misses = 0

    def take(self, key: Hashable, build: Builder) -> np.ndarray:
        """A fresh vector for ``key``: the ready one, or one built now."""
        with self._lock:
            entry = self._ready.pop(key, None)
        if entry is not None:
            try:
                vec = entry[1].result()
                self.hits += 1
                return vec
            except Exception:  # a failed background build: build in the foreground instead
                log.exception("background build failed")
        self.misses += 1
        return build(self._rng)

    def prepare(self, key: Hashable, build: Builder, *, nbytes: int) -> None:
        """Build a vector for ``key`` in the background (no-op when one is ready)."""
        if nbytes > self._max_bytes:
            return
        with self._lock:
            if key in self._ready:
                self._ready.move_to_end(key)
                return
            self._ready[key] = (nbytes, self._executor.submit(build, self._bg_rng))
            while len(self._ready) > self._max_entries or (
                sum(n for n, _ in self._ready.values()) > self._max_bytes
            ):
                _, (_, fut) = self._ready.popitem(last=False)
                fut.cancel()

    def close(self) -> None:
        with self._lock:
            for _, fut in self._ready.values():
                fut.cancel()
            self._ready.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
