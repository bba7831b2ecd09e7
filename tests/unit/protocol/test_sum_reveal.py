"""The coordinator decodes the sum behind the slowest upload (round_coordinator._Reveal).

Whatever the order in which the parties' chunks arrive, their sizes, or the tensors of the
plan (each with its own fixed point), the reals are those of decoding the whole sum at once,
and each word is decoded after every party has added it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from mpcdp.mpc import encoding
from mpcdp.mpc.rng import csprng
from mpcdp.protocol.query import round_coordinator as rc


@dataclass(frozen=True)
class _Tensor:
    name: str
    length: int
    frac_bits: int


@dataclass(frozen=True)
class _Plan:
    tensors: tuple[_Tensor, ...]


PLAN = _Plan((_Tensor("a", 700, 3), _Tensor("b", 1, 0), _Tensor("c", 2_000, 17)))
LENGTH = sum(t.length for t in PLAN.tensors)


def _uploads(bits: int) -> dict[str, np.ndarray]:
    gen = csprng(key=bytes(range(16)))
    dtype = np.uint32 if bits == 32 else np.uint64
    return {
        p: gen.integers(0, 2**bits, LENGTH, dtype=np.uint64, endpoint=False).astype(dtype)
        for p in ("p0", "p1", "p2")
    }


def _expected(uploads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    total = sum(uploads.values(), np.zeros(LENGTH, dtype=next(iter(uploads.values())).dtype))
    out, offset = {}, 0
    for t in PLAN.tensors:
        out[t.name] = encoding.decode_fixed(
            total[offset : offset + t.length], frac_bits=t.frac_bits
        )
        offset += t.length
    return out


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("chunk", [1, 64, 333, LENGTH])
def test_decoding_behind_the_slowest_upload_equals_one_decode(
    bits: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rc, "_DECODE_WORDS", 100)
    uploads = _uploads(bits)
    total = np.zeros(LENGTH, dtype=uploads["p0"].dtype)
    reveal = rc._Reveal(PLAN, total, list(uploads))  # type: ignore[arg-type]
    decoded: list[tuple[int, int]] = []
    real_decode = reveal._decode

    def decode(start: int, stop: int) -> None:
        # every word of the slice is final: each party has added it
        for p, at in reveal._at.items():
            assert at >= stop, (p, at, stop)
        decoded.append((start, stop))
        real_decode(start, stop)

    monkeypatch.setattr(reveal, "_decode", decode)
    # the parties' chunks interleaved unevenly: p1 runs ahead, p2 lags
    order = ["p1", "p1", "p0", "p1", "p2", "p0"]
    offsets = dict.fromkeys(uploads, 0)
    step = 0
    while min(offsets.values()) < LENGTH:
        p = order[step % len(order)]
        step += 1
        a = offsets[p]
        if a >= LENGTH:
            continue
        b = min(LENGTH, a + chunk)
        np.add(total[a:b], uploads[p][a:b], out=total[a:b])
        offsets[p] = b
        reveal.advanced(p, b)
    got = reveal.tensors()
    for name, value in _expected(uploads).items():
        assert np.array_equal(got[name], value), name
    # the slices cover every word once, in order
    bounds = [w for ab in decoded for w in ab]
    assert bounds[0] == 0 and bounds[-1] == LENGTH
    assert all(bounds[i] == bounds[i + 1] for i in range(1, len(bounds) - 1, 2))
    if chunk < LENGTH:
        assert len(decoded) > 2  # decoded while the uploads were streaming in


def test_accumulate_reports_its_progress_with_uploads_in_threads() -> None:
    uploads = _uploads(32)
    total = np.zeros(LENGTH, dtype=np.uint32)
    reveal = rc._Reveal(PLAN, total, list(uploads))  # type: ignore[arg-type]
    lock = threading.Lock()

    def stream(p: str) -> rc.ContributionStream:
        def chunks() -> Iterator[np.ndarray]:
            for a in range(0, LENGTH, 97):
                yield uploads[p][a : a + 97]

        return rc.ContributionStream(p, LENGTH, "1", 0.0, chunks())

    threads = [
        threading.Thread(
            target=rc.accumulate,
            args=(stream(p), total, lock, p, None, None),
            kwargs={"advanced": lambda offset, p=p: reveal.advanced(p, offset)},
        )
        for p in uploads
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = reveal.tensors()
    for name, value in _expected(uploads).items():
        assert np.array_equal(got[name], value), name
