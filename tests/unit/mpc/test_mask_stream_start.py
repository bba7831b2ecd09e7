"""MaskStream positioned at a word (``start``): the same words as one stream read from word
0, in either ring, so that slices of one pad can be masked in parallel."""

from __future__ import annotations

import numpy as np
import pytest

from mpcdp.errors import ParameterError
from mpcdp.mpc import sharing

KEYS = {0: bytes(range(32)), 2: bytes(range(1, 33)), 3: bytes(32)}


@pytest.mark.parametrize("bits", [32, 64])
def test_streams_started_at_a_slice_equal_the_whole_mask(bits: int) -> None:
    size = 10_000
    whole = sharing.pairwise_mask(
        party=1, pair_keys=KEYS, round_id=7, tensor_id=3, size=size, ring_bits=bits
    )
    step = 16 // (bits // 8)
    dtype = whole.dtype
    for cut in (step, 5 * step, 4096, 9_996):
        out = np.zeros(size, dtype=dtype)
        for a, b in ((0, cut), (cut, size)):
            stream = sharing.MaskStream(
                party=1, pair_keys=KEYS, round_id=7, tensor_id=3, ring_bits=bits, start=a
            )
            assert stream.words_done == a
            stream.apply(out[a:b])
            assert stream.words_done == b
        assert np.array_equal(out, whole), cut


@pytest.mark.parametrize(("bits", "start"), [(32, 2), (32, 6), (64, 1), (64, -2), (32, 2**40)])
def test_a_start_off_the_cipher_blocks_is_refused(bits: int, start: int) -> None:
    with pytest.raises(ParameterError, match="start"):
        sharing.MaskStream(
            party=1, pair_keys=KEYS, round_id=0, tensor_id=0, ring_bits=bits, start=start
        )
