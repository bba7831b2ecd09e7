"""Masking ahead while the charge is written (party_engine._MaskAhead, Contribution's
``_masked_words``): whatever number of leading words was masked ahead, the upload is the
vector plus the same mask, read once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from mpcdp.dp.ledger import LedgerWriteError
from mpcdp.errors import PolicyError, ProtocolError
from mpcdp.mpc import sharing
from mpcdp.protocol.query import party_engine
from mpcdp.protocol.query.query_spec import Statistic
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


def test_two_readers_at_once_get_one_upload() -> None:
    """The read-once check is one check-and-set: of readers racing for the first slice,
    exactly one gets the upload and every other is refused."""
    for _ in range(20):
        vec, stream = _vector(64), _stream(64)
        c = _contribution(vec, stream, 0)
        readers = 8
        barrier = threading.Barrier(readers)
        got: list[int] = []
        refused: list[int] = []

        def read(
            c: Contribution = c,
            barrier: threading.Barrier = barrier,
            got: list[int] = got,
            refused: list[int] = refused,
        ) -> None:
            barrier.wait()
            try:
                got.append(sum(s.size for s in c.chunks(1000)))
            except ProtocolError:
                refused.append(1)

        threads = [threading.Thread(target=read) for _ in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert got == [LENGTH] and len(refused) == readers - 1


class _Engine:
    """What PartyEngine._charge_and_mask uses of its engine, with a charge that fails."""

    def __init__(self, charge_error: BaseException) -> None:
        self.party_id = "p1"
        self.calls: list[str] = []
        self._maskers = ThreadPoolExecutor(1)
        self._lock = threading.Lock()
        self._error = charge_error
        self.datasets = {"d": SimpleNamespace(config=SimpleNamespace(share=lambda c: None))}
        self.ledger = SimpleNamespace(charge=self._charge, release=self._release)

    def _charge(self, **_: object) -> None:
        raise self._error

    def _release(self, query_id: str, *, coordinator: str) -> None:
        self.calls.append("release")

    def upload_ended(self, *, session_id: bytes) -> None:
        self.calls.append("upload_ended")


_SPEC = SimpleNamespace(
    index_of=lambda p: 1, ring_bits=64, dataset="d", query_id="q", parties=("p0", "p1", "p2"),
    statistic=Statistic.SQL, sql="SELECT COUNT(*) FROM t", column="",
    mechanism="skellam", epsilon=1.0,
)  # fmt: skip


def _charge_and_mask(engine: _Engine) -> None:
    party_engine.PartyEngine._charge_and_mask(
        engine,  # type: ignore[arg-type]
        b"s" * 16,
        _SPEC,  # type: ignore[arg-type]
        SimpleNamespace(event=None),  # type: ignore[arg-type]
        np.zeros(1 << 17, np.uint64),
        KEYS,
        "analyst",
    )


def test_an_engine_that_is_closing_charges_nothing_and_frees_the_slot() -> None:
    engine = _Engine(AssertionError("the charge must not be reached"))
    engine._maskers.shutdown()  # closing: its maskers take no more work
    with pytest.raises(RuntimeError):
        _charge_and_mask(engine)
    assert engine.calls == ["upload_ended", "release"]


def test_a_refused_charge_is_what_the_caller_sees_even_when_masking_failed_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fails(self: sharing.MaskStream, seg: np.ndarray) -> None:
        raise MemoryError("no memory for the keystream")

    monkeypatch.setattr(sharing.MaskStream, "apply", fails)
    engine = _Engine(LedgerWriteError("disk full"))
    with pytest.raises(PolicyError, match="cannot record this in its budget ledger"):
        _charge_and_mask(engine)
    assert engine.calls == ["upload_ended", "release"]
    engine._maskers.shutdown()
