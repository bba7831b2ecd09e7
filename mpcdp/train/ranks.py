"""A site that trains on several processes: rank 0 is the party node, ranks 1..k-1 its workers.

The engine is ``torch.distributed`` as ``torchrun`` starts it (gloo on CPUs, NCCL on GPUs);
nothing home-made crosses between ranks but its collectives. All ranks are one site, inside
one trust boundary: they exchange indices, parameters and unrounded clipped sums, which must
never leave the site, and the commands between them are pickled Python objects (any rank can
run code in the others, as processes of one program can).

Privacy does not change with the number of ranks:

* The Poisson sample is drawn once per step, at rank 0, from the site's CSPRNG over all of
  the site's example indices: each example is in the batch independently with probability
  q, the law the accountant assumes. :func:`deal` then hands each drawn index to one rank.
  (``DistributedSampler`` would not do: it deals a fixed-size permutation, not a Poisson
  sample.)
* Each rank computes the sum of its examples' clipped gradients with
  :class:`~mpcdp.train.clipping.PerSampleClipper`; the parts are added in float32 by a
  ``reduce`` to rank 0. The sum is the site's clipped sum up to float32 rounding, with the
  same per-example bound C.
* Only rank 0 rounds, adds the site's one noise share and masks: one release per site per
  step, as with one process.

A worker that dies or stops answering makes rank 0's next collective fail within the group's
time-out (:class:`RankFailure`): the step raises, the round aborts and nothing is revealed.
The group is then broken for good; the site restarts (``torchrun --max-restarts``), and a
training run resumes from its checkpoint.

Nothing happens at import time.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray

from mpcdp.errors import ParameterError, RankFailure

__all__ = [
    "RankFailure",
    "RankGroup",
    "WorkerSource",
    "deal",
    "serve_worker",
]

log = logging.getLogger(__name__)

#: how long a collective waits for the other ranks before rank 0 gives the step up
DEFAULT_TIMEOUT_S = 60.0


def deal(indices: NDArray[np.int64], *, world_size: int) -> list[NDArray[np.int64]]:
    """The drawn indices, split into ``world_size`` nearly equal contiguous parts (rank r gets
    part r). Every index goes to exactly one rank, so the union of the parts is the Poisson
    sample itself."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ParameterError("world_size", world_size, "must be an int >= 1")
    return [np.ascontiguousarray(p) for p in np.array_split(np.asarray(indices), world_size)]


class WorkerSource(Protocol):
    """What a rank computes its part with (every rank, rank 0 included, has one per session):
    a site's :class:`mpcdp.train.gradient_source.TorchGradientSource`."""

    def load_flat(self, flat: torch.Tensor, *, full: bool) -> None:
        """Copy the session's parameters in (all of them, or the trainable ones)."""
        ...

    def clipped_sum(self, indices: NDArray[np.int64], *, scale: float, out: torch.Tensor) -> None:
        """Write the sum of the clipped gradients of these examples, times ``scale``, into
        ``out`` (float32, the trainable parameters' length; zeros for no index)."""
        ...


#: builds a rank's source for a session from what rank 0 sends at open (rank 0's own
#: description of the session: run id, model, dataset, clipping)
SourceBuilder = Callable[[dict[str, Any]], WorkerSource]


def _init_group(backend: str | None, timeout_s: float) -> None:
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
            timeout=datetime.timedelta(seconds=timeout_s),
        )


class RankGroup:
    """Rank 0's handle on its workers: every call is one command to all ranks, serialised
    (a party runs several sessions at once, and collectives must come in one order).

    ``device``: where this group's tensors live (the CPU for gloo; rank 0's GPU for NCCL).
    """

    def __init__(self, *, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not dist.is_initialized():
            raise ParameterError(
                "torch.distributed", "not initialised", "start the site with torchrun"
            )
        if dist.get_rank() != 0:
            raise ParameterError("rank", dist.get_rank(), "only rank 0 leads the site's ranks")
        self.world_size = dist.get_world_size()
        self.device = device
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._broken: str | None = None

    @classmethod
    def from_env(
        cls, *, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> RankGroup:
        """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
        _init_group(backend, timeout_s)
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        return cls(device=device, timeout_s=timeout_s)

    def _command(self, command: tuple[Any, ...]) -> None:
        box = [command]
        dist.broadcast_object_list(box, src=0)

    def _collective(self, what: str, run: Callable[[], Any]) -> Any:
        with self._lock:
            if self._broken is not None:
                raise RankFailure(
                    f"this site's worker ranks failed earlier ({self._broken}); restart the "
                    "site (torchrun --max-restarts restarts every rank); a training run "
                    "takes it back when it answers again, or resumes from its checkpoint "
                    "when rerun"
                )
            try:
                return run()
            except (RuntimeError, OSError) as exc:  # gloo/NCCL: a rank died or timed out
                self._broken = f"{what}: {type(exc).__name__}"
                log.error("worker ranks failed during %s: %s", what, exc)
                raise RankFailure(
                    f"a worker rank of this site failed or did not answer within "
                    f"{self.timeout_s:g} s during {what}; the step is refused (nothing of it "
                    "left this site) and the run goes on without this site until its ranks "
                    "are restarted; rerunning the training command resumes from its checkpoint"
                ) from exc

    def open(self, *, key: str, description: dict[str, Any]) -> None:
        """Every worker builds its source for session ``key`` from ``description``."""
        self._collective("open", lambda: self._command(("open", key, description)))

    def load(self, *, key: str, flat: torch.Tensor, full: bool) -> None:
        """Send the session's parameters to every worker."""

        def run() -> None:
            self._command(("load", key, full, int(flat.numel())))
            dist.broadcast(flat.to(self.device).contiguous(), src=0)

        self._collective("load", run)

    def clipped_sum(
        self,
        *,
        key: str,
        indices: NDArray[np.int64],
        scale: float,
        own: WorkerSource,
        out: torch.Tensor,
    ) -> None:
        """The site's clipped sum of the drawn ``indices`` into ``out`` (float32 on this
        group's device): each rank its dealt part, summed here."""

        def run() -> None:
            parts = deal(indices, world_size=self.world_size)
            self._command(("step", key, parts, float(scale), int(out.numel())))
            own.clipped_sum(parts[0], scale=scale, out=out)
            dist.reduce(out, dst=0, op=dist.ReduceOp.SUM)

        self._collective("step", run)

    def close(self, *, key: str) -> None:
        """Workers drop session ``key`` (a broken group is left as it is)."""
        if self._broken is None:
            self._collective("close", lambda: self._command(("close", key)))

    def stop(self) -> None:
        """Workers leave their loop; the group is torn down."""
        with self._lock:
            if self._broken is None:
                try:
                    self._command(("stop",))
                except (RuntimeError, OSError) as exc:
                    log.warning("could not stop the worker ranks: %s", exc)
            self._broken = "stopped"
        if dist.is_initialized():
            dist.destroy_process_group()


def serve_worker(
    *,
    build: SourceBuilder,
    device: torch.device,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """A worker rank's life: join the group, then follow rank 0's commands until "stop".

    A failed command (a source that raises) ends the worker: rank 0's collective then fails
    and refuses the step, and the site restarts."""
    _init_group(backend, timeout_s)
    rank = dist.get_rank()
    sessions: dict[str, WorkerSource] = {}
    log.info("worker rank %d of %d ready", rank, dist.get_world_size())
    try:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            command = box[0]
            op = command[0]
            if op == "stop":
                return
            if op == "open":
                _, key, description = command
                sessions[key] = build(description)
            elif op == "load":
                _, key, full, length = command
                flat = torch.empty(length, dtype=torch.float32, device=device)
                dist.broadcast(flat, src=0)
                sessions[key].load_flat(flat, full=full)
            elif op == "step":
                _, key, parts, scale, length = command
                out = torch.empty(length, dtype=torch.float32, device=device)
                sessions[key].clipped_sum(parts[rank], scale=scale, out=out)
                dist.reduce(out, dst=0, op=dist.ReduceOp.SUM)
            elif op == "close":
                sessions.pop(command[1], None)
            else:
                raise RankFailure(f"unknown command {op!r} from rank 0")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
