"""The ring Z_{2^64} as numpy uint64 vectors (DESIGN.md, "Arithmetic").

Addition, subtraction and negation wrap around modulo 2^64 for free in numpy's unsigned
arithmetic, vectorised. Elements travel as raw little-endian 8-byte words; the decoder is
strict (a byte length that is not a multiple of 8, or not the announced length, is refused).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import DecodeError, ParameterError

__all__ = [
    "BITS",
    "DTYPE",
    "MODULUS",
    "RingVector",
    "add",
    "as_ring",
    "from_bytes",
    "neg",
    "sub",
    "sum_vectors",
    "to_bytes",
    "uniform",
]

BITS = 64
MODULUS = 1 << BITS
#: Wire dtype: little-endian unsigned 64-bit words.
DTYPE = np.dtype("<u8")

RingVector = NDArray[np.uint64]


def as_ring(x: object, *, name: str = "x") -> RingVector:
    """View ``x`` as a 1-D ring vector; only uint64 arrays are accepted (no silent casts)."""
    arr = np.asarray(x)
    if arr.dtype != np.uint64:
        raise ParameterError(name, f"dtype={arr.dtype}", "ring vectors must be uint64")
    return arr.reshape(-1)


def add(a: RingVector, b: RingVector, *, out: RingVector | None = None) -> RingVector:
    """a + b mod 2^64."""
    return np.add(a, b, out=out)


def sub(a: RingVector, b: RingVector, *, out: RingVector | None = None) -> RingVector:
    """a - b mod 2^64."""
    return np.subtract(a, b, out=out)


def neg(a: RingVector) -> RingVector:
    """-a mod 2^64."""
    out: RingVector = np.subtract(np.uint64(0), a)
    return out


def sum_vectors(vectors: Iterable[RingVector]) -> RingVector:
    """Sum of equally long ring vectors, mod 2^64 (in place into one accumulator)."""
    it = iter(vectors)
    try:
        first = next(it)
    except StopIteration:
        raise ParameterError("vectors", "[]", "need at least one vector") from None
    acc = np.array(first, dtype=np.uint64, copy=True)
    for v in it:
        if v.shape != acc.shape:
            raise ParameterError("vectors", f"shape={v.shape}", f"expected shape {acc.shape}")
        np.add(acc, v, out=acc)
    return acc


def uniform(size: int, *, rng: np.random.Generator) -> RingVector:
    """``size`` independent uniform ring elements."""
    out: RingVector = rng.integers(0, MODULUS - 1, size=size, dtype=np.uint64, endpoint=True)
    return out


def to_bytes(v: RingVector) -> bytes:
    """Wire format: the words in order, each 8 bytes little-endian, nothing else."""
    return np.ascontiguousarray(v, dtype=DTYPE).tobytes()


def from_bytes(data: bytes | bytearray | memoryview, *, length: int | None = None) -> RingVector:
    """Strict inverse of :func:`to_bytes`; ``length`` (words), when given, must match."""
    n = len(data)
    if n % 8:
        raise DecodeError(f"ring vector of {n} bytes is not a whole number of 8-byte words")
    if length is not None and n != 8 * length:
        raise DecodeError(f"ring vector has {n // 8} words, expected {length}")
    return np.frombuffer(data, dtype=DTYPE).astype(np.uint64, copy=True)
