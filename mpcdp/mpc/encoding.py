"""Signed fixed point in Z_{2^64}, randomized rounding, and the headroom check.

docs/design.md, "Arithmetic". A real x is encoded as the integer round(x * 2^frac_bits) in two's
complement: words >= 2^63 decode as negative. Sums of encodings are encodings of sums as long
as no partial sum leaves [-2^63, 2^63); :func:`check_headroom` refuses a round before it could.

Randomized rounding (used for gradients, Kairouz-Liu-Steinke 2021, "The Distributed Discrete
Gaussian Mechanism", Sec. 4) rounds x up with probability frac(x), so E[round(x)] = x. It may
move a vector's L2 norm; :func:`rounded_l2_bound` gives the inflated sensitivity bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mpcdp.errors import HeadroomError, ParameterError
from mpcdp.mpc import ring
from mpcdp.mpc.rng import ensure_rng

__all__ = [
    "Headroom",
    "check_headroom",
    "decode_fixed",
    "decode_int",
    "encode_fixed",
    "encode_int",
    "randomized_round",
    "rounded_l2_bound",
    "signed_view",
    "to_ring",
]

MAX_FRAC_BITS = 52
_SIGNED_LIMIT = 1 << (ring.BITS - 1)


def _check_frac_bits(frac_bits: int) -> None:
    if not isinstance(frac_bits, int) or isinstance(frac_bits, bool):
        raise ParameterError("frac_bits", frac_bits, "must be an int")
    if not 0 <= frac_bits <= MAX_FRAC_BITS:
        raise ParameterError("frac_bits", frac_bits, f"must be in [0, {MAX_FRAC_BITS}]")


def _finite_float(x: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ParameterError(f"{name}[{i}]", float(arr[i]), "must be finite (no NaN or inf)")
    return arr


def randomized_round(x: ArrayLike, *, rng: np.random.Generator | None = None) -> NDArray[np.int64]:
    """Round each value to floor(x) + Bernoulli(x - floor(x)): unbiased integer rounding."""
    arr = _finite_float(x, "x")
    gen = ensure_rng(rng)
    lo = np.floor(arr)
    up = gen.random(arr.shape) < (arr - lo)
    return (lo + up).astype(np.int64)


def encode_int(x: ArrayLike, *, name: str = "x") -> ring.RingVector:
    """Signed integers (int64 range) -> ring words (two's complement)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise ParameterError(name, f"dtype={arr.dtype}", "encode_int needs integers")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= _SIGNED_LIMIT:
        raise ParameterError(name, int(arr.max()), "exceeds the signed 64-bit range")
    return arr.astype(np.int64).reshape(-1).view(np.uint64)


def to_ring(ints: NDArray[np.int32] | NDArray[np.int64], *, ring_bits: int = ring.BITS) -> Any:
    """Signed integers -> words of Z_{2^ring_bits} (mod 2^bits, two's complement; a view,
    not a copy, when the integers already have the words' width: int64 for Z_2^64, int32
    for Z_2^32)."""
    words = ring.dtype_for(ring_bits).newbyteorder("=")
    if ints.dtype.itemsize == words.itemsize:
        return ints.view(words)
    return ints.astype(words)


def decode_int(v: ring.AnyRingVector) -> NDArray[np.int64]:
    """Ring words -> signed integers; words >= 2^(bits-1) are negative."""
    return signed_view(v).astype(np.int64, copy=False)


def signed_view(v: ring.AnyRingVector) -> NDArray[np.int32] | NDArray[np.int64]:
    """Ring words as signed integers without a copy: int32 for Z_2^32, int64 for Z_2^64."""
    if ring.bits_of(v) == 32:
        out32: NDArray[np.int32] = v.reshape(-1).view(np.int32)
        return out32
    out64: NDArray[np.int64] = ring.as_ring(v, name="v").view(np.int64)
    return out64


def encode_fixed(
    x: ArrayLike,
    *,
    frac_bits: int,
    rounding: Literal["nearest", "randomized"] = "nearest",
    rng: np.random.Generator | None = None,
    ring_bits: int = ring.BITS,
) -> Any:
    """Reals -> fixed point words with ``frac_bits`` fractional bits.

    NaN/inf and values whose encoding leaves the signed 64-bit range are refused with an error
    that names the offending index and value.
    """
    _check_frac_bits(frac_bits)
    arr = _finite_float(x, "x")
    scaled = arr * float(1 << frac_bits)
    ring.dtype_for(ring_bits)
    too_big = np.abs(scaled) >= float(1 << (ring_bits - 2))
    if too_big.any():
        i = int(np.flatnonzero(too_big)[0])
        raise ParameterError(
            f"x[{i}]",
            float(arr[i]),
            f"too large for fixed point with frac_bits={frac_bits} "
            f"(|x|*2^frac_bits >= 2^{ring_bits - 2})",
        )
    if rounding == "nearest":
        ints = np.rint(scaled).astype(np.int64)
    elif rounding == "randomized":
        ints = randomized_round(scaled, rng=rng)
    else:
        raise ParameterError("rounding", rounding, "must be 'nearest' or 'randomized'")
    return to_ring(ints, ring_bits=ring_bits)


def decode_fixed(
    v: ring.AnyRingVector, *, frac_bits: int, out: NDArray[np.float64] | None = None
) -> NDArray[np.float64]:
    """Fixed point words -> float64 (two's complement, so words >= 2^63 are negative).

    ``out``: a float64 array of ``v``'s size to write into (one pass, no temporary; the
    caller decodes a long vector in slices into one array); returned."""
    _check_frac_bits(frac_bits)
    signed = v.reshape(-1).view(np.int32 if ring.bits_of(v) == 32 else np.int64)
    if out is None:
        out = np.empty(signed.size, dtype=np.float64)
    elif out.dtype != np.float64 or out.shape != signed.shape:
        raise ParameterError(
            "out", f"{out.dtype} of shape {out.shape}", f"must be float64 of shape {signed.shape}"
        )
    # the int -> float64 conversion is exact up to 2^53 and so is the scaling (a power of
    # two); numpy converts in buffered blocks, so no float64 temporary of the whole size
    np.multiply(signed, 1.0 / float(1 << frac_bits), out=out)
    return out


def rounded_l2_bound(*, l2: float, dim: int, beta: float = math.exp(-0.5)) -> float:
    """L2 bound after randomized rounding of a vector with L2 norm <= ``l2`` (unit grid).

    Kairouz-Liu-Steinke 2021, Thm 1 / Sec. 4.1: with probability >= 1 - beta the rounded vector
    has norm at most sqrt(l2^2 + d/4 + sqrt(2 log(1/beta)) * (l2 + sqrt(d)/2)); rounding is
    repeated until it does, so this is a hard sensitivity bound.
    """
    if l2 < 0 or not math.isfinite(l2):
        raise ParameterError("l2", l2, "must be finite and >= 0")
    if dim < 1:
        raise ParameterError("dim", dim, "must be >= 1")
    if not 0 < beta < 1:
        raise ParameterError("beta", beta, "must be in (0, 1)")
    return math.sqrt(
        l2 * l2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (l2 + math.sqrt(dim) / 2)
    )


@dataclass(frozen=True)
class Headroom:
    """Result of a passed headroom check (all in ring units)."""

    n_parties: int
    max_abs_encoded: int
    noise_tail: int
    bound: int
    limit: int

    @property
    def spare_bits(self) -> float:
        """log2(limit / bound): how many bits of slack the round has."""
        return math.log2(self.limit / max(self.bound, 1))


def check_headroom(
    *,
    n_parties: int,
    max_abs: float,
    frac_bits: int,
    noise_tail: int,
    ring_bits: int = ring.BITS,
) -> Headroom:
    """Refuse a round whose sum could wrap: need n * max|x| * 2^frac_bits + tail < 2^(bits-1).

    ``noise_tail`` is a high-probability bound on |total noise| in ring units (see
    ``Mechanism.tail_bound``). Raises :class:`HeadroomError` naming every value involved.
    """
    if n_parties < 1:
        raise ParameterError("n_parties", n_parties, "must be >= 1")
    if max_abs < 0 or not math.isfinite(max_abs):
        raise ParameterError("max_abs", max_abs, "must be finite and >= 0")
    if noise_tail < 0:
        raise ParameterError("noise_tail", noise_tail, "must be >= 0")
    _check_frac_bits(frac_bits)
    max_enc = math.ceil(max_abs * (1 << frac_bits))
    bound = n_parties * max_enc + noise_tail
    limit = 1 << (ring_bits - 1)
    if bound >= limit:
        raise HeadroomError(
            f"round could overflow the ring: n_parties={n_parties} * max_abs={max_abs:g} * "
            f"2^frac_bits={1 << frac_bits} + noise_tail={noise_tail} = {bound} >= 2^{ring_bits - 1}"
            f"; lower frac_bits or tighten the bounds"
        )
    return Headroom(
        n_parties=n_parties,
        max_abs_encoded=max_enc,
        noise_tail=noise_tail,
        bound=bound,
        limit=limit,
    )
