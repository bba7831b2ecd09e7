"""Noisy local vectors built ahead of time, off the request path (docs/design.md, "Distributed
noise": "generate noise ahead of the request path").

What a party uploads is ``mask + (noise share + local statistic)``. The noise share depends
only on the query's parameters (and so does the statistic of an in-memory vector dataset,
which the builder adds too; a table's statistic is added when a round takes the vector, from
its engine, so it is never stale), so the party keeps at most one ready vector per parameter
set: a round takes the ready vector (or, on a miss, builds one synchronously;
:meth:`take_later` does the same on the pool's own threads, so that a party can answer its
request while the vector is drawn), and once the round's upload has been sent,
:meth:`prepare` builds the next one in a background thread, so that a later round with the
same parameters (a repeated dashboard query, training rounds with a fixed plan) finds it
ready and does not compete with it for the CPU.

Background builds run at a lower scheduling priority (Linux: nice + 10 for those threads
only): when the party's cores are busy with a request (a training step's gradients, the
coordinator's update on a shared machine), the request runs first and the noise fills the
idle time. A build in the foreground (a miss) runs at normal priority on its own workers.
When a request takes a vector whose background build is still under way, the build is on
the request path from then on: the request's thread hands the build's slices that have not
started to the foreground workers (normal priority; a build that has not started at all is
cancelled and built in the foreground), so that the request does not wait on low-priority
threads which other work on the machine (another site's gradients, other processes) may
starve.

Each vector holds a fresh noise share, is handed to exactly one round and is never kept or
reused after that. Memory is bounded by ``max_entries`` and ``max_bytes``; the least
recently used parameters are dropped first.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from mpcdp.mpc.rng import csprng, ensure_rng

__all__ = [
    "Builder",
    "NoisePool",
    "background_executor",
    "default_noise_threads",
    "fill_in_slices",
]

log = logging.getLogger(__name__)

#: Builds one vector from a CSPRNG, drawing slices on the given workers; called in the
#: foreground (a miss, normal priority) or the background (low priority).
Builder = Callable[[np.random.Generator, Executor], np.ndarray]

#: How much lower background threads run (Linux nice increment, 0..19).
BACKGROUND_NICE = 10

#: Threads that run :meth:`NoisePool.take_later` (builds in flight at once; more wait).
_TAKERS = 2

#: Per-slice CSPRNG keys (AES-128) drawn from the caller's generator.
_SLICE_KEY_BYTES = 16


def default_noise_threads() -> int:
    """Threads for drawing noise: the cores this process may run on, at most 8, and at most
    OMP_NUM_THREADS when that is set (mpcdp.local.localnet sets it so that parties sharing one
    machine split its cores instead of oversubscribing them)."""
    if hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, min(8, n))


def _lower_priority() -> None:
    """Lower the calling thread's priority (Linux gives every thread its own nice value;
    elsewhere PRIO_PROCESS would renice the whole process, so nothing is done)."""
    if sys.platform != "linux":  # pragma: no cover - macOS, Windows
        return
    tid = threading.get_native_id()
    try:
        # relative to the main thread's (a thread started by a background thread inherits
        # the lower value already)
        nice = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + BACKGROUND_NICE)
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # pragma: no cover - e.g. a seccomp profile refusing it
        log.debug("could not lower the priority of a background thread: %s", exc)


def background_executor(max_workers: int, *, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at a lower priority (see the module docstring), for
    work that does not depend on data and must not slow a request down."""
    return ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix=name, initializer=_lower_priority
    )


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


class _HelpableWorkers(Executor):
    """Low-priority threads (:func:`background_executor`) for the slices of background builds,
    whose queued calls a caller that needs the build now can take over (:meth:`help`): a
    build that becomes urgent does not wait on threads that normal-priority work starves.
    Calls are queued in order; each runs once, on whichever thread takes it first."""

    def __init__(self, threads: int, *, name: str) -> None:
        self._threads = background_executor(threads, name=name)
        self._queue: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._cond = threading.Condition()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._cond:
            self._queue.append((fut, functools.partial(fn, **kwargs), args))
            self._cond.notify_all()
        self._threads.submit(self._run_next)
        return fut

    def _next(self) -> tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None:
        with self._cond:
            return self._queue.popleft() if self._queue else None

    @staticmethod
    def _run(item: tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]) -> None:
        fut, fn, args = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller through its future
            fut.set_exception(exc)

    def _run_next(self) -> None:
        item = self._next()
        if item is not None:  # else a helper ran it
            self._run(item)

    def help(self, workers: Executor, *, until: Future[Any]) -> None:
        """Run the queued calls on ``workers`` until ``until`` is done (the build that
        submitted them; calls it submits later are taken as they come)."""
        running: list[Future[None]] = []

        def wake(_: Future[Any]) -> None:  # the build is done: stop waiting at once
            with self._cond:
                self._cond.notify_all()

        until.add_done_callback(wake)
        while not until.done():
            item = self._next()
            if item is not None:
                running.append(workers.submit(self._run, item))
                continue
            with self._cond:
                if not self._queue and not until.done():
                    self._cond.wait(timeout=1.0)  # woken by a new call or by the build's end
        for f in running:
            f.result()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            with self._cond:
                for fut, _, _ in self._queue:
                    fut.cancel()
                self._queue.clear()
        self._threads.shutdown(wait=wait, cancel_futures=cancel_futures)


class NoisePool:
    """Ready vectors per key (module docstring). ``threads`` workers draw the slices of a
    build: one pool at normal priority for foreground builds, one at low priority for
    background builds (default: :func:`default_noise_threads`)."""

    def __init__(
        self,
        *,
        rng: np.random.Generator | None = None,
        max_entries: int = 4,
        max_bytes: int = 1 << 30,
        threads: int | None = None,
        name: str = "noise",
    ) -> None:
        # the foreground and the background thread never share a Generator
        self._rng = ensure_rng(rng)
        self._bg_rng = csprng() if rng is None else ensure_rng(rng)
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ready: OrderedDict[Hashable, tuple[int, Future[np.ndarray]]] = OrderedDict()
        self._lock = threading.Lock()
        n = threads or default_noise_threads()
        self._executor = background_executor(1, name=f"{name}-bg")
        self._bg_workers = _HelpableWorkers(n, name=f"{name}-bg-slice")
        self._fg_workers = ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"{name}-slice")
        # runs :meth:`take` for :meth:`take_later` (a build there maps its slices onto the
        # foreground workers, so it must not run on one of them)
        self._takers = ThreadPoolExecutor(max_workers=_TAKERS, thread_name_prefix=f"{name}-take")
        self.hits = 0
        self.misses = 0

    def take(self, key: Hashable, build: Builder) -> np.ndarray:
        """A fresh vector for ``key``: the ready one, or one built now."""
        with self._lock:
            entry = self._ready.pop(key, None)
        if entry is not None and not entry[1].cancel():  # cancelled: it had not started
            try:
                # a build under way is now on the request path: its slices not yet started
                # run on the foreground workers, at normal priority, instead of waiting for
                # low-priority threads that busier work may starve
                self._bg_workers.help(self._fg_workers, until=entry[1])
                vec = entry[1].result()
                self.hits += 1
                return vec
            except Exception:  # a failed background build: build in the foreground instead
                log.exception("background build failed")
        self.misses += 1
        return build(self._rng, self._fg_workers)

    def take_later(self, key: Hashable, build: Builder) -> Future[np.ndarray]:
        """:meth:`take`, started now on the pool's own threads: the caller goes on (answers
        its request) while the vector is drawn, and waits for the future when it needs the
        vector. Cancel the future when the vector is no longer wanted (a build that has not
        started then never runs)."""
        return self._takers.submit(self.take, key, build)

    def prepare(self, key: Hashable, build: Builder, *, nbytes: int) -> None:
        """Build a vector for ``key`` in the background (no-op when one is ready)."""
        if nbytes > self._max_bytes:
            return
        with self._lock:
            if key in self._ready:
                self._ready.move_to_end(key)
                return
            self._ready[key] = (
                nbytes,
                self._executor.submit(build, self._bg_rng, self._bg_workers),
            )
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
        self._takers.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._bg_workers.shutdown(wait=True, cancel_futures=True)
        self._fg_workers.shutdown(wait=True, cancel_futures=True)
