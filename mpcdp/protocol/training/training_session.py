"""The coordinator's half of federated DP-SGD: :class:`TrainingSession` opens a session at
every site, relays the signed keys, runs steps and reveals each step's noisy sum (see the
package docstring). Nothing happens at import time.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from mpcdp.audit.canaries import (
    unpack_inclusion,
)
from mpcdp.errors import (
    ParameterError,
    ProtocolError,
    RoundAborted,
)
from mpcdp.mpc import encoding, ring
from mpcdp.protocol import identity
from mpcdp.protocol.query.round_coordinator import (
    ContributionStream,
    abort_all,
    accumulate,
    order_clients,
    signed_keys,
)
from mpcdp.protocol.session import SESSION_ID_BYTES, Proposal
from mpcdp.protocol.training.train_spec import TrainSpec

log = logging.getLogger(__name__)


class TrainingClient(Protocol):
    """How the coordinator reaches one site for training."""

    @property
    def party_id(self) -> str: ...

    def train_open(self, *, session_id: bytes, spec: TrainSpec) -> Proposal: ...

    def train_step(
        self,
        *,
        session_id: bytes,
        step: int,
        keys: Sequence[identity.SignedKey],
        parameters: NDArray[np.float32],
        full: bool,
        ring_bits: int,
    ) -> ContributionStream: ...

    def abort(self, *, session_id: bytes, reason: str) -> None: ...


@dataclass
class TrainingSession:
    """The coordinator's side of one training session over ``clients`` (one per site)."""

    spec: TrainSpec
    clients: Sequence[TrainingClient]
    session_id: bytes = field(default_factory=lambda: secrets.token_bytes(SESSION_ID_BYTES))
    _keys: list[identity.SignedKey] = field(default_factory=list)
    _next: int = -1
    _pool: ThreadPoolExecutor | None = None
    budget_remaining: dict[str, float] = field(default_factory=dict)
    #: audit runs, after the last step: every site's canary inclusion bits, in party order
    #: of ``spec.parties`` (mpcdp.audit.canaries)
    audit_inclusion: dict[str, NDArray[np.bool_]] = field(default_factory=dict)

    def open(self) -> None:
        self.clients = order_clients(self.clients, self.spec.parties)
        self._pool = ThreadPoolExecutor(
            max_workers=len(self.clients), thread_name_prefix="train-step"
        )
        try:
            asked = [
                self._pool.submit(c.train_open, session_id=self.session_id, spec=self.spec)
                for c in self.clients
            ]
            # every answer is in before any abort: an abort that overtook a site's TrainOpen
            # would find no session, and the reservation that TrainOpen then makes would be
            # held until its session expired
            wait(asked)
            proposals = [f.result() for f in asked]
            keys = signed_keys(proposals, self.spec.parties)
            for p, pid in zip(proposals, self.spec.parties, strict=True):
                if p.length != self.spec.num_params:
                    raise ProtocolError(
                        f"party {pid!r} announced {p.length} words, the run has "
                        f"{self.spec.num_params}"
                    )
        except Exception as exc:
            self._abort(str(exc))
            raise RoundAborted(self.spec.run_id, exc) from exc
        self._keys = keys
        self._next = self.spec.start_step

    def step(
        self, *, parameters: NDArray[np.float32], full: bool, out: np.ndarray | None = None
    ) -> NDArray[np.int32] | NDArray[np.int64]:
        """Run the next step; returns the decoded sum (integer units, signed; int32 in
        Z_2^32, a view of the summed words). ``out``: a C-contiguous array of
        ``num_params`` ring words (uint32 for Z_2^32, uint64 for Z_2^64) to sum into instead
        of a new one (a loop that reuses one saves an allocation of the model's size per
        step); its contents are overwritten."""
        if self._pool is None or self._next < 0:
            raise ProtocolError("open the training session first")
        if self._next >= self.spec.end_step:
            raise ProtocolError(f"the session's {self.spec.steps} steps are done")
        dtype = ring.dtype_for(self.spec.ring_bits).newbyteorder("=")
        if out is None:
            total = np.zeros(self.spec.num_params, dtype=dtype)
        else:
            if (
                not isinstance(out, np.ndarray)
                or out.dtype != dtype
                or out.shape != (self.spec.num_params,)
                or not out.flags.c_contiguous
                or not out.flags.writeable
            ):
                what = (
                    f"{out.dtype} of shape {out.shape}"
                    if isinstance(out, np.ndarray)
                    else type(out).__name__
                )
                raise ParameterError(
                    "out",
                    what,
                    f"must be a writeable C-contiguous {dtype} array of shape "
                    f"({self.spec.num_params},)",
                )
            total = out
            total.fill(0)
        step = self._next
        first = step == self.spec.start_step
        keys = self._keys if first else []
        lock = threading.Lock()
        params = np.ascontiguousarray(parameters, dtype=np.float32)

        last = step + 1 == self.spec.end_step
        reveals: dict[str, bytes] = {}

        def one(client: TrainingClient) -> float:
            stream = client.train_step(
                session_id=self.session_id,
                step=step,
                keys=keys,
                parameters=params,
                full=full,
                ring_bits=self.spec.ring_bits,
            )
            reveals[client.party_id] = stream.audit_inclusion
            return accumulate(stream, total, lock, client.party_id, None)

        try:
            remaining = list(self._pool.map(one, self.clients))
            self._check_reveals(reveals, last=last)
        except Exception as exc:
            self._abort(str(exc))
            raise RoundAborted(f"{self.spec.run_id} step {step}", exc) from exc
        self.budget_remaining = dict(zip(self.spec.parties, remaining, strict=True))
        self._next = step + 1
        return encoding.signed_view(total)

    def _check_reveals(self, reveals: Mapping[str, bytes], *, last: bool) -> None:
        """Inclusion bits come with the last step of an audit run, from every site, and
        never otherwise."""
        wanted = last and self.spec.audit_canaries > 0
        for party in self.spec.parties:
            data = reveals.get(party, b"")
            if not wanted:
                if data:
                    raise ProtocolError(f"party {party!r} revealed canary bits out of place")
                continue
            self.audit_inclusion[party] = unpack_inclusion(
                data, count=self.spec.audit_canaries, party=party
            )

    def _abort(self, reason: str) -> None:
        abort_all(self.clients, session_id=self.session_id, reason=reason)

    def close(self) -> None:
        """End the session (tells sites to forget it when steps remain)."""
        if self._pool is not None:
            if 0 <= self._next < self.spec.end_step:
                self._abort("closed by the coordinator")
            self._pool.shutdown(wait=True)
            self._pool = None
