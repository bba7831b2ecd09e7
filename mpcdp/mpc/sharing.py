"""Additive secret sharing over Z_{2^64}: the textbook n-share view and the seeded view.

Textbook (docs/salary_example.md, the salary example): a party splits x into n uniformly
random shares that sum to x mod 2^64 and sends one to each other party; n - 1 shares reveal
nothing about x. :func:`split` / :func:`reconstruct`.

Seeded (docs/design.md, "Secure sum"): for each pair i < j the
share that party j hands party i is PRG(k_ij), expanded locally from the pair key of
mpcdp.mpc.prg, so nothing but the key agreement crosses the wire. Party i then uploads

    y_i = x_i + sum_{j > i} PRG(k_ij) - sum_{j < i} PRG(k_ij)   (mod 2^64),

every PRG term appears once with + and once with -, so sum_i y_i = sum_i x_i, while any single
y_i (or any set of them missing at least one honest pair) is uniformly random.
:func:`pairwise_mask`, :func:`mask`, :func:`share_table`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpcdp.errors import ParameterError
from mpcdp.mpc import prg, ring
from mpcdp.mpc.rng import ensure_rng

__all__ = ["MaskStream", "mask", "pairwise_mask", "reconstruct", "share_table", "split"]

# Words of keystream per AES call: 256 KiB scratch stays in L2 while it is added in.
_CHUNK_WORDS = 1 << 15


def split(
    x: ring.RingVector, *, n: int, rng: np.random.Generator | None = None
) -> NDArray[np.uint64]:
    """n additive shares of ``x``, shape (n, len(x)): rows 0..n-2 uniform, row n-1 the rest."""
    if not isinstance(n, int) or n < 2:
        raise ParameterError("n", n, "must be an int >= 2")
    vec = ring.as_ring(x)
    gen = ensure_rng(rng)
    shares = np.empty((n, vec.size), dtype=np.uint64)
    shares[:-1] = gen.integers(
        0, ring.MODULUS - 1, size=(n - 1, vec.size), dtype=np.uint64, endpoint=True
    )
    np.subtract(vec, shares[:-1].sum(axis=0, dtype=np.uint64), out=shares[-1])
    return shares


def reconstruct(shares: NDArray[np.uint64] | Sequence[ring.RingVector]) -> ring.RingVector:
    """Sum of all shares mod 2^64 (the inverse of :func:`split`)."""
    arr = np.asarray(shares)
    if arr.dtype != np.uint64 or arr.ndim != 2 or arr.shape[0] < 1:
        raise ParameterError("shares", f"dtype={arr.dtype} shape={arr.shape}", "need uint64 (n, d)")
    out: ring.RingVector = arr.sum(axis=0, dtype=np.uint64)
    return out


def _check_keys(party: int, pair_keys: Mapping[int, bytes]) -> list[tuple[int, bytes]]:
    if party in pair_keys:
        raise ParameterError(
            "pair_keys", f"contains party {party}", "a party has no key with itself"
        )
    if not pair_keys:
        raise ParameterError("pair_keys", "{}", "need at least one peer (n >= 2)")
    for peer, key in pair_keys.items():
        if len(key) != prg.KEY_BYTES:
            raise ParameterError(f"pair_keys[{peer}]", f"{len(key)} bytes", "must be 32 bytes")
    return sorted(pair_keys.items())


def pairwise_mask(
    *,
    party: int,
    pair_keys: Mapping[int, bytes],
    round_id: int,
    tensor_id: int,
    size: int,
    out: ring.AnyRingVector | None = None,
    ring_bits: int = ring.BITS,
) -> Any:
    """sum_{j > party} PRG(k_ij) - sum_{j < party} PRG(k_ij) for (round, tensor).

    Keystream is produced 256 KiB at a time into a scratch buffer and added into ``out``, so
    memory is one vector plus the scratch, whatever the number of peers. When ``out`` is given,
    the mask is added to it in place (``out`` becomes out + mask) and returned. Over
    Z_{2^32} (``ring_bits=32``, or a uint32 ``out``) the same keystream is read as 4-byte
    words.
    """
    if size < 0 or size > prg.MAX_STREAM_WORDS:
        raise ParameterError("size", size, "must be in [0, 2^33]")
    if out is None:
        acc = np.zeros(size, dtype=ring.dtype_for(ring_bits).newbyteorder("="))
    else:
        ring.bits_of(out)
        acc = out.reshape(-1)
    if acc.size != size:
        raise ParameterError("out", f"len={acc.size}", f"expected len {size}")
    MaskStream(
        party=party,
        pair_keys=pair_keys,
        round_id=round_id,
        tensor_id=tensor_id,
        ring_bits=ring.bits_of(acc),
    ).apply(acc)
    return acc


class MaskStream:
    """The pairwise mask of one (round, tensor), applied to consecutive slices in order.

    ``apply(seg)`` adds the next ``len(seg)`` words of the mask to ``seg`` in place, so a
    party can mask each chunk of its upload just before sending it: the first bytes leave
    sooner and no masked copy of the whole vector is ever needed. Slices must be applied in
    order and each word exactly once (the AES-CTR streams advance with every call).

    ``start`` positions the stream at ring word ``start`` (a multiple of 16 bytes: of 4 words
    in Z_2^32, of 2 in Z_2^64), so that disjoint slices of one vector can be masked by their
    own streams, in parallel, with the same words as one stream read from word 0.
    """

    def __init__(
        self,
        *,
        party: int,
        pair_keys: Mapping[int, bytes],
        round_id: int,
        tensor_id: int,
        ring_bits: int = ring.BITS,
        start: int = 0,
    ) -> None:
        keys = _check_keys(party, pair_keys)
        self._dtype = ring.dtype_for(ring_bits).newbyteorder("=")
        self._word = self._dtype.itemsize
        if (
            isinstance(start, bool)
            or not isinstance(start, int)
            or not 0 <= start < prg.MAX_STREAM_WORDS
            or (start * self._word) % 16
        ):
            raise ParameterError(
                "start", start, f"must be an int in [0, 2^33), a multiple of {16 // self._word}"
            )
        offset = start * self._word // 8  # in the stream's 8-byte words
        self._ciphers = [
            (
                peer > party,
                prg.stream_cipher(key, round_id=round_id, tensor_id=tensor_id, offset=offset),
            )
            for peer, key in keys
        ]
        self._chunk = _CHUNK_WORDS * 8 // self._word
        self._scratch = np.empty(self._chunk + 16 // self._word, dtype=self._dtype)
        #: the stream's position, in ring words (``start`` + the words applied so far)
        self.words_done = start

    def apply(self, seg: ring.AnyRingVector) -> None:
        if seg.dtype != self._dtype:
            raise ParameterError("seg", f"dtype={seg.dtype}", f"expected {self._dtype}")
        if self.words_done + seg.size > prg.MAX_STREAM_WORDS:
            raise ParameterError("seg", seg.size, "the mask stream is exhausted (2^33 words)")
        scratch, scratch_bytes = self._scratch, self._scratch.view(np.uint8)
        for start in range(0, seg.size, self._chunk):
            part = seg[start : start + self._chunk]
            n = part.size
            for positive, enc in self._ciphers:
                prg.fill_keystream(enc, scratch_bytes, self._word * n)
                if positive:
                    np.add(part, scratch[:n], out=part)
                else:
                    np.subtract(part, scratch[:n], out=part)
        self.words_done += seg.size


def mask(
    x: ring.RingVector,
    *,
    party: int,
    pair_keys: Mapping[int, bytes],
    round_id: int,
    tensor_id: int,
) -> ring.RingVector:
    """y = x + pairwise_mask(...): what party ``party`` uploads (a new array; x is untouched)."""
    vec = ring.as_ring(x)
    out: ring.RingVector = pairwise_mask(
        party=party,
        pair_keys=pair_keys,
        round_id=round_id,
        tensor_id=tensor_id,
        size=vec.size,
        out=vec.copy(),
    )
    return out


def share_table(
    values: Sequence[int],
    *,
    pair_keys: Mapping[tuple[int, int], bytes],
    round_id: int = 0,
    tensor_id: int = 0,
) -> NDArray[np.int64]:
    """The seeded sharing of scalar inputs as an (n, n) table of signed shares.

    Row i is what party i's input is split into: ``table[i, j]`` for j < i is PRG(k_ji), the
    share that party i gave party j, and ``table[i, i]`` is what party i kept; above the
    diagonal the table is zero because each pair shares a single seed. Column j sums to party
    j's upload y_j, and the whole table to sum(values). ``pair_keys`` is indexed by the pair
    (i, j) with i < j. For display only.
    """
    n = len(values)
    if n < 2:
        raise ParameterError("values", list(values), "need at least two parties")
    table = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i):
            key = pair_keys.get((j, i))
            if key is None:
                raise ParameterError("pair_keys", f"missing ({j}, {i})", "need every pair i < j")
            table[i][j] = int(prg.stream(key, round_id=round_id, tensor_id=tensor_id, size=1)[0])
        table[i][i] = (int(values[i]) - sum(table[i][:i])) % ring.MODULUS
    return np.array(table, dtype=np.uint64).view(np.int64)
