"""A site's training session and its ledger book-keeping: :class:`SiteSession` (what the
site holds for one session: keys, model source, the blocks it reserved and charged, the
evaluations it made), the ledger query ids of a session's blocks and evaluations, and how an
ending session's ledger is settled (a charged block keeps only the steps that left the site,
an uncharged reservation is released). Used by mpcdp.protocol.training.site_engine and
.site_evaluation; nothing happens at import time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import LedgerError
from mpcdp.protocol import identity
from mpcdp.protocol.training.source import GradientSource
from mpcdp.protocol.training.train_spec import TrainSpec

__all__ = [
    "LATE",
    "SiteSession",
    "block_of",
    "charge_id",
    "eval_id",
    "release_block",
    "settle_block",
]

log = logging.getLogger(__name__)


@dataclass
class SiteSession:
    """One training session as its site holds it (mpcdp.protocol.training.site_engine)."""

    coordinator: str
    spec: TrainSpec
    source: GradientSource
    private_key: X25519PrivateKey
    public: identity.SignedKey
    expires: float
    next_step: int
    pair_keys: dict[int, bytes] | None = None
    charged_block: int = -1
    reserved_block: int = 0  # the session's latest reserved block (block 0 at open)
    busy: bool = False
    #: ended (aborted, expired, failed) while a step ran: that step finishes the ending
    ended: bool = False
    last_status: float = 0.0
    last_epsilon: str = "0"  # the dataset's epsilon spent after the session's last charge
    #: audit runs: this site's canary inclusion bits (secret until the last step's upload)
    canaries_in: NDArray[np.bool_] | None = None
    #: white-box audit runs: the coordinates of this site's included gradient canaries
    canary_coordinates: NDArray[np.int64] | None = None
    #: the step indices before which this session has evaluated (each at most once)
    evaluated: set[int] = field(default_factory=set)


def charge_id(spec: TrainSpec, session_id: bytes, block: int) -> str:
    """A block's query id in the ledger (in its coordinator's namespace there)."""
    return f"{spec.run_id}/{session_id.hex()}/{block}"


def eval_id(spec: TrainSpec, session_id: bytes, step: int) -> str:
    """An evaluation's query id in the ledger (in its coordinator's namespace there)."""
    return f"{spec.run_id}/{session_id.hex()}/eval-{step}"


def block_of(spec: TrainSpec, block: int) -> tuple[int, int]:
    """The first step of block ``block`` of a session, and its number of steps."""
    first = spec.start_step + block * spec.steps_per_charge
    return first, min(spec.steps_per_charge, spec.end_step - first)


#: a step whose coordinator has given up on it
LATE = (
    "{what} of training session {sid} arrived or finished after its coordinator gave up "
    "on it (past its deadline, cancelled, or this party was suspended); it is not sent and "
    "not charged"
)


def settle_block(ledger: BudgetLedger, session: SiteSession, session_id: bytes) -> None:
    """An ending session's charged block keeps only the steps that left this site (the
    ledger's settle): a session cut short by a site's failure, the coordinator's abort or a
    late step does not cost the steps it never sent. Whatever cannot be settled stays
    charged (safe: more than what left)."""
    if session.charged_block < 0:
        return
    first, steps = block_of(session.spec, session.charged_block)
    sent = max(0, min(steps, session.next_step - first))
    if sent == steps:
        return
    try:
        ledger.settle(
            charge_id(session.spec, session_id, session.charged_block),
            coordinator=session.coordinator,
            steps=sent,
            note=f"settled: {sent} of its {steps} steps left this site",
        )
    except (LedgerError, OSError) as exc:
        log.warning(
            "training session %s: its block stays charged in full (%s)", session_id.hex(), exc
        )


def release_block(ledger: BudgetLedger, session: SiteSession, session_id: bytes) -> None:
    """An ending session's reserved block that was never charged is free again."""
    if session.reserved_block > session.charged_block:
        ledger.release(
            charge_id(session.spec, session_id, session.reserved_block),
            coordinator=session.coordinator,
        )
