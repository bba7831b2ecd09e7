"""Cryptographically secure randomness for masks, noise and rounding.

Every random draw in mpcdp comes from a ``numpy.random.Generator`` whose bit generator is a
CSPRNG: AES-128 in counter mode (randomgen's ``AESCounter``, AES-NI accelerated) keyed with
128 bits from ``os.urandom``. numpy's vectorised samplers (Poisson, negative binomial,
uniform integers) then run at full speed on a secure stream. numpy's global RNG, ``random``,
Mersenne Twister, PCG64 and short seeds are refused: an attacker who recovers the state of a
non-cryptographic generator from a few outputs could subtract a party's noise (the flaw
reported for Flower's SecAgg+, flwr issue 7522).

Deterministic streams exist for tests and known-answer vectors only: pass ``key=`` bytes.
"""

from __future__ import annotations

import secrets

import numpy as np
from randomgen import AESCounter, ChaCha

from mpcdp.errors import ParameterError

__all__ = ["SECURE_BIT_GENERATORS", "csprng", "ensure_rng"]

#: Bit generators accepted as cryptographically secure.
SECURE_BIT_GENERATORS: tuple[type, ...] = (AESCounter, ChaCha)

KEY_BYTES = 16


def csprng(*, key: bytes | None = None) -> np.random.Generator:
    """A Generator over AES-128-CTR.

    ``key`` (16 bytes) makes the stream reproducible; leave it out (the default) for a fresh
    key from the operating system's CSPRNG.
    """
    if key is None:
        key = secrets.token_bytes(KEY_BYTES)
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise ParameterError("key", key, f"must be {KEY_BYTES} bytes")
    return np.random.Generator(AESCounter(key=int.from_bytes(key, "little")))


def ensure_rng(rng: np.random.Generator | None) -> np.random.Generator:
    """Return ``rng``, or a fresh CSPRNG when it is None; refuse insecure generators."""
    if rng is None:
        return csprng()
    if not isinstance(rng, np.random.Generator):
        raise ParameterError("rng", type(rng).__name__, "must be a numpy.random.Generator")
    if not isinstance(rng.bit_generator, SECURE_BIT_GENERATORS):
        raise ParameterError(
            "rng",
            type(rng.bit_generator).__name__,
            "is not a cryptographically secure bit generator; use mpcdp.mpc.rng.csprng()",
        )
    return rng
