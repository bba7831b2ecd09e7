"""The ring Z_{2^64} as numpy uint64 vectors (docs/design.md, "Arithmetic"), and Z_{2^32}.

Addition, subtraction and negation wrap around modulo 2^64 for free in numpy's unsigned
arithmetic, vectorised. Elements travel as raw little-endian 8-byte words; the decoder is
strict (a byte length that is not a multiple of 8, or not the announced length, is refused).

Z_{2^32} (uint32, 4-byte words) is the compact option for large vectors: half the bytes on
the wire, the same arithmetic, and a headroom of 2^31 that mpcdp.mpc.encoding.check_headroom
enforces. ``bits`` selects the ring wherever both are accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import DecodeError, ParameterError

__all__ = [
    "BITS",
    "DTYPE",
    "MODULUS",
    "AnyRingVector",
    "RingVector",
    "add",
    "as_ring",
    "bits_of",
    "dtype_for",
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
#: A vector over either ring (uint64 or uint32).
AnyRingVector = NDArray[np.unsignedinteger[Any]]
RING_BITS = (32, 64)


def dtype_for(bits: int) -> np.dtype[Any]:
    """The wire dtype of Z_{2^bits}: little-endian uint32 or uint64."""
    if bits == 64:
        return DTYPE
    if bits == 32:
        return np.dtype("<u4")
    raise ParameterError("ring_bits", bits, "must be 32 or 64")


def bits_of(v: np.ndarray) -> int:
    """64 for uint64 vectors, 32 for uint32 ones; anything else is refused."""
    if v.dtype == np.uint64:
        return 64
    if v.dtype == np.uint32:
        return 32
    raise ParameterError("v", f"dtype={v.dtype}", "ring vectors must be uint64 or uint32")


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


def from_bytes(
    data: bytes | bytearray | memoryview,
    *,
    length: int | None = None,
    copy: bool = True,
    bits: int = BITS,
) -> Any:
    """Strict inverse of :func:`to_bytes`; ``length`` (words), when given, must match.

    ``copy=False`` returns a read-only view of ``data`` (no copy), for streaming consumers.
    ``bits=32`` decodes 4-byte words of Z_{2^32}.
    """
    dt = dtype_for(bits)
    size = dt.itemsize
    n = len(data)
    if n % size:
        raise DecodeError(f"ring vector of {n} bytes is not a whole number of {size}-byte words")
    if length is not None and n != size * length:
        raise DecodeError(f"ring vector has {n // size} words, expected {length}")
    words = np.frombuffer(data, dtype=dt)
    return words.astype(dt.newbyteorder("="), copy=True) if copy else words
