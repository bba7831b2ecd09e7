"""One secure-sum round with distributed noise, all parties in this process.

This runs the real cryptography of a round (ephemeral X25519 keys, HKDF pair keys, AES-CTR
masks, fixed point, per-party noise shares sized for h = n - t honest parties, per-party
ledgers charged before contributing) without a network: the local salary demo and the tests
use it. The networked protocol (mpcdp.protocol / mpcdp.transport) performs the same steps with
each party in its own process.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mpcdp.dp.ledger import BudgetLedger
from mpcdp.dp.mechanisms import Mechanism, NoNoise
from mpcdp.errors import ParameterError
from mpcdp.mpc import encoding, prg, ring, sharing

__all__ = ["SimulatedRound", "pair_keys_for", "simulate_sum"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatedRound:
    """What a simulated round produced. ``uploads[i]`` is what party i sent the coordinator."""

    value: NDArray[np.float64]
    uploads: tuple[ring.RingVector, ...]
    noise_variance: float
    pair_keys: dict[tuple[int, int], bytes]
    session_id: bytes
    round_id: int
    honest: int


def pair_keys_for(n_parties: int, *, session_id: bytes) -> dict[tuple[int, int], bytes]:
    """Run the key agreement for ``n_parties`` and return k_ij for every pair i < j."""
    private = [prg.generate_keypair() for _ in range(n_parties)]
    public = [prg.public_bytes(k) for k in private]
    keys: dict[tuple[int, int], bytes] = {}
    for i in range(n_parties):
        for j in range(i + 1, n_parties):
            k_ij = prg.derive_pair_key(
                private_key=private[i],
                peer_public_key=public[j],
                session_id=session_id,
                party=i,
                peer=j,
            )
            k_ji = prg.derive_pair_key(
                private_key=private[j],
                peer_public_key=public[i],
                session_id=session_id,
                party=j,
                peer=i,
            )
            if k_ij != k_ji:  # pragma: no cover - X25519 is symmetric
                raise RuntimeError("key agreement mismatch")
            keys[(i, j)] = k_ij
    return keys


def simulate_sum(
    inputs: Sequence[ArrayLike],
    *,
    bound: float,
    frac_bits: int,
    mechanism: Mechanism,
    colluders: int = 1,
    ledgers: Sequence[BudgetLedger] | None = None,
    dataset: str = "data",
    query_id: str | None = None,
    rng: np.random.Generator | None = None,
) -> SimulatedRound:
    """Securely sum ``inputs`` (one vector per party, |x| <= ``bound``) with distributed noise.

    Each party clips its own input to [-bound, bound], encodes it, charges its ledger (when
    ``ledgers`` is given) before contributing, adds its noise share and its pairwise mask.
    """
    n = len(inputs)
    if n < 2:
        raise ParameterError("inputs", f"{n} parties", "need at least two parties")
    if ledgers is not None and len(ledgers) != n:
        raise ParameterError("ledgers", f"{len(ledgers)} ledgers", f"need one per party ({n})")
    honest = n - colluders
    if not 1 <= honest <= n:
        raise ParameterError("colluders", colluders, f"must be in [0, {n - 1}]")
    vectors = [np.clip(np.asarray(x, dtype=np.float64).reshape(-1), -bound, bound) for x in inputs]
    size = vectors[0].size
    if any(v.size != size for v in vectors):
        raise ParameterError(
            "inputs", [v.size for v in vectors], "all vectors must be equally long"
        )
    encoding.check_headroom(
        n_parties=n,
        max_abs=bound,
        frac_bits=frac_bits,
        noise_tail=mechanism.tail_bound(n_parties=n, honest=honest),
    )
    if isinstance(mechanism, NoNoise):
        log.warning("mechanism 'none': this release is exact and has no differential privacy")
    session_id = secrets.token_bytes(16)
    round_id = 0
    keys = pair_keys_for(n, session_id=session_id)
    query = query_id or session_id.hex()
    uploads = []
    for i, vec in enumerate(vectors):
        if ledgers is not None:
            ledgers[i].charge(dataset=dataset, query_id=query, event=mechanism.event())
        enc = encoding.encode_fixed(vec, frac_bits=frac_bits)
        noise = mechanism.share(size=size, honest=honest, rng=rng)
        enc = ring.add(enc, encoding.encode_int(noise))
        mine = {j: keys[(min(i, j), max(i, j))] for j in range(n) if j != i}
        uploads.append(sharing.mask(enc, party=i, pair_keys=mine, round_id=round_id, tensor_id=0))
    total = ring.sum_vectors(uploads)
    return SimulatedRound(
        value=encoding.decode_fixed(total, frac_bits=frac_bits),
        uploads=tuple(uploads),
        noise_variance=mechanism.total_variance(n_parties=n, honest=honest)
        / float(1 << (2 * frac_bits)),
        pair_keys=keys,
        session_id=session_id,
        round_id=round_id,
        honest=honest,
    )
