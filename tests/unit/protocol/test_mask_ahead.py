"""Masking ahead while the charge is written (party_engine._MaskAhead, Contribution's
``_masked_words``): whatever number of leading words was masked ahead, the upload is the
vector plus the same mask, read once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mpcdp.errors import ProtocolError
from mpcdp.mpc import sharing
from mpcdp.protocol.query import party_engine
from mpcdp.protocol.session import Contribution

KEYS = {0: bytes(range(32)), 2: bytes(range(1, 33))}
LENGTH = 10_000


def _stream(bits: int) -> sharing.MaskStream:
    return sharing.MaskStream(party=1, pair_keys=KEYS, round_id=0, tensor_id=0, ring_bits=bits)


def _vector(bits: int) -> np.ndarray:
    return np.arange(LENGTH, dtype=np.uint32 if bits == 32 else np.uint64)


def _contribution(vec: np.ndarray, stream: sharing.MaskStream, ahead: int) -> Contribution:
    return Contribution("p1", "1", 0.0, vec.size, vec, stream, _masked_words=ahead)


def _masked_ahead(pool: ThreadPoolExecutor, bits: int, stop_after: int) -> Contribution:
    """A contribution whose masking ahead was stopped (its charge written) after
    ``stop_after`` slices."""
    vec, stream = _vector(bits), _stream(bits)
    real_apply = stream.apply
    calls: list[int] = []
    start = threading.Event()
    holder: list[party_engine._MaskAhead] = []

    def apply(seg: np.ndarray) -> None:
        start.wait()
        real_apply(seg)
        calls.append(seg.size)
        if len(calls) == stop_after:
            holder[0]._halt.set()  # the charge is written now

    stream.apply = apply  # type: ignore[method-assign]
    holder.append(party_engine._MaskAhead(pool, stream, vec))
    start.set()
    holder[0]._job.result(timeout=30)
    words = holder[0].stop()
    stream.apply = real_apply  # type: ignore[method-assign]
    assert words == min(LENGTH, stop_after * party_engine._AHEAD_SLICE_WORDS) == sum(calls)
    return _contribution(vec, stream, words)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("slice_words", [4, 1000, 1 << 16])
def test_an_upload_masked_partly_ahead_equals_one_masked_as_read(
    bits: int, slice_words: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _vector(bits)
    _stream(bits).apply(expected)
    monkeypatch.setattr(party_engine, "_AHEAD_SLICE_WORDS", slice_words)
    slices = -(-LENGTH // slice_words)
    with ThreadPoolExecutor(1) as pool:
        for stop_after in (1, 2, 3, slices):
            c = _masked_ahead(pool, bits, stop_after)
            assert np.array_equal(np.concatenate(list(c.chunks(333))), expected)
            with pytest.raises(ProtocolError, match="already read"):
                list(c.chunks(333))


def test_a_job_that_never_started_masks_nothing() -> None:
    vec, stream = _vector(32), _stream(32)
    block = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(block.wait)  # the only thread is busy
        ahead = party_engine._MaskAhead(pool, stream, vec)
        assert ahead.stop() == 0
        block.set()
    assert np.array_equal(vec, _vector(32))
    expected = _vector(32)
    _stream(32).apply(expected)
    assert np.array_equal(_contribution(vec, stream, 0).masked(), expected)


def test_a_fully_masked_upload_is_still_read_once() -> None:
    vec, stream = _vector(32), _stream(32)
    stream.apply(vec)
    c = _contribution(vec, stream, LENGTH)
    first = c.masked().copy()
    with pytest.raises(ProtocolError, match="already read"):
        c.masked()
    expected = _vector(32)
    _stream(32).apply(expected)
    assert np.array_equal(first, expected)
