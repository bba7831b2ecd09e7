"""A party's pad, noise share + pairwise masks, made in one pass over memory on all its cores.

What a training site uploads each step is ``pad + gradient`` with

    pad = noise share + sum_{j > i} PRG(k_ij) - sum_{j < i} PRG(k_ij)   (mod 2^bits)

(docs/design.md, "Secure sum" and "Distributed noise"). The pad does not depend on data, so
it is built ahead of the step (mpcdp.protocol.noise_pool). :func:`build_pad` makes it slice
by slice (256K words, :data:`PAD_SLICE`): each slice's noise share is drawn straight into
the ring words (for Skellam, mpcdp.dp.poisson_table's compiled loop, which releases the
GIL), then each peer's AES-CTR stream, positioned at the slice
(mpcdp.mpc.sharing.MaskStream's ``start``), is added or subtracted in place. Slices run on
the given workers (threads: numpy, the compiled loop and OpenSSL release the GIL), so the
pad takes one pass over memory on every core instead of a noise pass and a mask pass on one.

The noise of each slice comes from its own CSPRNG keyed by 16 bytes of the caller's
(mpcdp.protocol.noise_pool.fill_in_slices), so the pad is a function of the caller's
generator and the keys alone, whatever the scheduling. The masks are the same words as
MaskStream's from word 0 (the known-answer tests of sharing hold for every slicing).

:func:`fill_noise` is the noise alone, in slices, for a query's vector (its mask is added
as the upload streams out).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np

from mpcdp.dp.mechanisms import Mechanism, Skellam
from mpcdp.errors import ParameterError
from mpcdp.mpc import encoding, ring, sharing
from mpcdp.protocol.noise_pool import fill_in_slices

__all__ = ["PAD_SLICE", "build_pad", "fill_noise", "noise_into"]

#: words per slice: a multiple of 4 (a slice starts on an AES block). 256K: each slice sets up
#: its CSPRNG, its cipher contexts and its word buffers once, and 64K slices took 11-13% more
#: CPU per coordinate (a 9.4M-parameter pad: 130 against 116 ms on one core; a query's share
#: at 1e6 and 1e7 likewise), while a 1 MiB slice still leaves 36 slices to share out at 9.4M
PAD_SLICE = 1 << 18


def noise_into(out: Any, *, noise: Mechanism | None, honest: int, rng: np.random.Generator) -> None:
    """One party's noise share for ``out``'s coordinates, written as ring words (``None``:
    zeros). Skellam in one pass (no int64 copy); other mechanisms through their ``share``."""
    if noise is None:
        out[:] = 0
    elif isinstance(noise, Skellam):
        noise.share_into(out, honest=honest, rng=rng)
    else:
        share = noise.share(size=out.size, honest=honest, rng=rng)
        out[:] = encoding.to_ring(share, ring_bits=ring.bits_of(out))


def _check_slice(slice_size: int, word: int) -> int:
    if (
        isinstance(slice_size, bool)
        or not isinstance(slice_size, int)
        or slice_size < 1
        or (slice_size * word) % 16
    ):
        raise ParameterError(
            "slice_size", slice_size, f"must be a positive multiple of {16 // word} words"
        )
    return slice_size


def fill_noise(
    out: Any,
    *,
    noise: Mechanism | None,
    honest: int,
    rng: np.random.Generator,
    workers: Executor | None = None,
    slice_size: int = PAD_SLICE,
) -> None:
    """``out`` (ring words) := a noise share, drawn in slices on ``workers``."""
    ring.bits_of(out)
    size = out.size

    def fill(a: int, b: int, gen: np.random.Generator) -> None:
        noise_into(out[a:b], noise=noise, honest=honest, rng=gen)

    if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
        raise ParameterError("slice_size", slice_size, "must be an int >= 1")
    fill_in_slices(size=size, slice_size=slice_size, rng=rng, fill=fill, workers=workers)


def build_pad(
    *,
    size: int,
    ring_bits: int,
    noise: Mechanism | None,
    honest: int,
    party: int,
    pair_keys: Mapping[int, bytes],
    round_id: int,
    tensor_id: int = 0,
    rng: np.random.Generator,
    workers: Executor | None = None,
    slice_size: int = PAD_SLICE,
) -> Any:
    """The pad of ``party`` for (``round_id``, ``tensor_id``): a new vector of ``size`` words
    of Z_2^ring_bits holding a noise share (``noise`` sized for ``honest``; None: none) plus
    the pairwise masks of ``pair_keys`` (module docstring), made in slices on ``workers``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ParameterError("size", size, "must be an int >= 0")
    dtype = ring.dtype_for(ring_bits).newbyteorder("=")
    _check_slice(slice_size, dtype.itemsize)
    # refuses bad keys, party or ring before any noise is drawn
    sharing.MaskStream(
        party=party, pair_keys=pair_keys, round_id=round_id, tensor_id=tensor_id,
        ring_bits=ring_bits,
    )  # fmt: skip
    if noise is not None:
        noise.check_range(honest=honest)
    pad = np.empty(size, dtype=dtype)

    def fill(a: int, b: int, gen: np.random.Generator) -> None:
        seg = pad[a:b]
        noise_into(seg, noise=noise, honest=honest, rng=gen)
        sharing.MaskStream(
            party=party, pair_keys=pair_keys, round_id=round_id, tensor_id=tensor_id,
            ring_bits=ring_bits, start=a,
        ).apply(seg)  # fmt: skip

    fill_in_slices(size=size, slice_size=slice_size, rng=rng, fill=fill, workers=workers)
    return pad
