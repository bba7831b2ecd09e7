"""The ring and fixed-point encoding (mpcdp.mpc.ring, encoding, rng): round trips, wrap-around,
randomized rounding, the headroom check, strict decoding, the CSPRNG guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpcdp.errors import DecodeError, HeadroomError, ParameterError
from mpcdp.mpc import encoding, ring
from mpcdp.mpc.rng import csprng, ensure_rng

int64s = hnp.arrays(np.int64, st.integers(0, 50), elements=st.integers(-(2**63), 2**63 - 1))
u64s = hnp.arrays(np.uint64, st.integers(0, 50))


@given(int64s)
def test_int_round_trip(x: np.ndarray) -> None:
    assert np.array_equal(encoding.decode_int(encoding.encode_int(x)), x)


@given(
    hnp.arrays(np.float64, st.integers(0, 50), elements=st.floats(-1e9, 1e9)),
    st.integers(0, 30),
)
def test_fixed_point_round_trip_within_half_ulp(x: np.ndarray, frac_bits: int) -> None:
    back = encoding.decode_fixed(encoding.encode_fixed(x, frac_bits=frac_bits), frac_bits=frac_bits)
    assert np.all(np.abs(back - x) <= 2.0 ** -(frac_bits + 1) + 1e-9 * np.abs(x))


@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=20), st.integers(0, 20))
def test_sum_of_encodings_is_encoding_of_sum_with_negatives(
    xs: list[float], frac_bits: int
) -> None:
    enc = [encoding.encode_fixed([x], frac_bits=frac_bits) for x in xs]
    total = encoding.decode_fixed(ring.sum_vectors(enc), frac_bits=frac_bits)[0]
    assert abs(total - sum(xs)) <= len(xs) * 2.0 ** -(frac_bits + 1) + 1e-6


def test_words_at_or_above_2_63_decode_negative() -> None:
    words = np.array([2**63, 2**64 - 1, 2**64 - 256], dtype=np.uint64)
    assert encoding.decode_int(words).tolist() == [-(2**63), -1, -256]
    assert encoding.decode_fixed(words[2:], frac_bits=8).tolist() == [-1.0]


@given(u64s, u64s)
def test_ring_add_sub_wrap(a: np.ndarray, b: np.ndarray) -> None:
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    s = ring.add(a, b)
    assert [int(v) for v in s] == [(int(x) + int(y)) % 2**64 for x, y in zip(a, b, strict=False)]
    assert np.array_equal(ring.sub(s, b), a)
    assert np.array_equal(ring.add(a, ring.neg(a)), np.zeros(n, dtype=np.uint64))


@given(u64s)
def test_bytes_round_trip_little_endian(v: np.ndarray) -> None:
    data = ring.to_bytes(v)
    assert len(data) == 8 * v.size
    assert np.array_equal(ring.from_bytes(data, length=v.size), v)
    if v.size:
        assert int.from_bytes(data[:8], "little") == int(v[0])


def test_strict_decoder_refuses_partial_words_and_wrong_length() -> None:
    with pytest.raises(DecodeError, match="8-byte words"):
        ring.from_bytes(b"\x00" * 7)
    with pytest.raises(DecodeError, match="expected 3"):
        ring.from_bytes(b"\x00" * 16, length=3)


def test_ring_refuses_other_dtypes() -> None:
    with pytest.raises(ParameterError, match="dtype=int64"):
        ring.as_ring(np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_refuses_non_finite_naming_index(bad: float) -> None:
    with pytest.raises(ParameterError, match=r"x\[2\]"):
        encoding.encode_fixed([1.0, 2.0, bad], frac_bits=16)


def test_encode_refuses_values_too_large_for_frac_bits() -> None:
    with pytest.raises(ParameterError, match=r"x\[0\].*frac_bits=40"):
        encoding.encode_fixed([1e8], frac_bits=40)


@pytest.mark.parametrize("frac_bits", [-1, 53, 2.5, True])
def test_bad_frac_bits(frac_bits: object) -> None:
    with pytest.raises(ParameterError, match="frac_bits"):
        encoding.encode_fixed([1.0], frac_bits=frac_bits)  # type: ignore[arg-type]


def test_randomized_rounding_is_unbiased_and_only_floor_or_ceil() -> None:
    rng = csprng(key=bytes(16))
    x = np.full(200_000, 2.3)
    r = encoding.randomized_round(x, rng=rng)
    assert set(np.unique(r).tolist()) == {2, 3}
    # mean 2.3, std of the mean sqrt(0.21/200000) ~ 0.001: a 6-sigma window
    assert abs(r.mean() - 2.3) < 6 * math.sqrt(0.21 / x.size)
    neg = encoding.randomized_round(np.full(1000, -0.5), rng=rng)
    assert set(np.unique(neg).tolist()) <= {-1, 0}


def test_randomized_rounding_encode_path() -> None:
    rng = csprng(key=bytes(range(16)))
    v = encoding.encode_fixed(np.full(10_000, 0.25), frac_bits=0, rounding="randomized", rng=rng)
    vals = encoding.decode_int(v)
    assert set(np.unique(vals).tolist()) == {0, 1}
    with pytest.raises(ParameterError, match="rounding"):
        encoding.encode_fixed([0.0], frac_bits=0, rounding="up")  # type: ignore[arg-type]


def test_headroom_passes_and_reports_spare_bits() -> None:
    h = encoding.check_headroom(n_parties=10, max_abs=1e6, frac_bits=16, noise_tail=10**9)
    assert h.bound == 10 * 10**6 * 2**16 + 10**9
    assert h.spare_bits > 20


def test_headroom_refuses_wrap_with_all_values_in_message() -> None:
    with pytest.raises(HeadroomError) as info:
        encoding.check_headroom(n_parties=1000, max_abs=1e9, frac_bits=40, noise_tail=5)
    msg = str(info.value)
    for part in (
        "n_parties=1000",
        "max_abs=1e+09",
        "2^frac_bits=1099511627776",
        "noise_tail=5",
        "2^63",
    ):
        assert part in msg


def test_headroom_refuses_when_noise_tail_alone_wraps() -> None:
    with pytest.raises(HeadroomError):
        encoding.check_headroom(n_parties=2, max_abs=0, frac_bits=0, noise_tail=2**63)


def test_rounded_l2_bound_exceeds_l2_and_matches_formula() -> None:
    b = encoding.rounded_l2_bound(l2=100.0, dim=1000)
    beta = math.exp(-0.5)
    expected = math.sqrt(
        100**2 + 250 + math.sqrt(2 * math.log(1 / beta)) * (100 + math.sqrt(1000) / 2)
    )
    assert b == pytest.approx(expected) and b > 100
    with pytest.raises(ParameterError, match="dim"):
        encoding.rounded_l2_bound(l2=1.0, dim=0)


def test_insecure_generators_are_refused() -> None:
    with pytest.raises(ParameterError, match="PCG64"):
        ensure_rng(np.random.default_rng(1))
    with pytest.raises(ParameterError, match="key"):
        csprng(key=b"short")
    g = csprng()
    assert ensure_rng(g) is g


@settings(max_examples=20)
@given(st.binary(min_size=16, max_size=16))
def test_keyed_csprng_is_reproducible(key: bytes) -> None:
    assert np.array_equal(
        ring.uniform(8, rng=csprng(key=key)), ring.uniform(8, rng=csprng(key=key))
    )


@given(
    hnp.arrays(np.float64, st.integers(1, 30), elements=st.floats(-1000, 1000)),
    st.integers(0, 16),
)
def test_fixed_point_in_the_32_bit_ring(x: np.ndarray, frac_bits: int) -> None:
    enc = encoding.encode_fixed(x, frac_bits=frac_bits, ring_bits=32)
    assert enc.dtype == np.uint32
    back = encoding.decode_fixed(enc, frac_bits=frac_bits)
    assert np.all(np.abs(back - x) <= 2.0 ** -(frac_bits + 1) + 1e-9)
    assert ring.from_bytes(enc.tobytes(), bits=32, length=x.size).tolist() == enc.tolist()


def test_32_bit_encoding_refuses_what_does_not_fit() -> None:
    with pytest.raises(ParameterError, match=r"2\^30"):
        encoding.encode_fixed([2.0**20], frac_bits=12, ring_bits=32)
    with pytest.raises(HeadroomError, match="2\\^31"):
        encoding.check_headroom(
            n_parties=3, max_abs=1.0, frac_bits=16, noise_tail=2**31, ring_bits=32
        )
    with pytest.raises(DecodeError, match="4-byte words"):
        ring.from_bytes(b"\x00" * 6, bits=32)


def test_signed_view_is_decode_int_without_a_copy() -> None:
    for bits, dtype in ((32, np.uint32), (64, np.uint64)):
        words = np.array([0, 1, 2 ** (bits - 1) - 1, 2 ** (bits - 1), 2**bits - 1], dtype=dtype)
        view = encoding.signed_view(words)
        assert np.shares_memory(view, words)
        assert (
            view.tolist()
            == encoding.decode_int(words).tolist()
            == [0, 1, 2 ** (bits - 1) - 1, -(2 ** (bits - 1)), -1]
        )


def test_to_ring_takes_int32_and_int64_and_views_when_the_width_matches() -> None:
    i32 = np.array([-(2**31), -1, 0, 5, 2**31 - 1], dtype=np.int32)
    i64 = i32.astype(np.int64)
    w32 = encoding.to_ring(i32, ring_bits=32)
    assert np.shares_memory(w32, i32) and w32.dtype == np.uint32
    assert w32.tolist() == encoding.to_ring(i64, ring_bits=32).tolist()
    assert w32.tolist() == [2**31, 2**32 - 1, 0, 5, 2**31 - 1]
    w64 = encoding.to_ring(i32, ring_bits=64)  # sign-extended, not reinterpreted
    assert w64.tolist() == encoding.to_ring(i64, ring_bits=64).tolist()
    assert np.shares_memory(encoding.to_ring(i64, ring_bits=64), i64)
    assert encoding.decode_int(w64).tolist() == i64.tolist()


@pytest.mark.parametrize("bits", [32, 64])
def test_decode_fixed_into_a_given_array_equals_a_new_one(bits: int) -> None:
    words = csprng(key=bytes(16)).integers(0, 2**bits, 1000, dtype=np.uint64, endpoint=False)
    words = words.astype(ring.dtype_for(bits))
    out = np.full(1000, np.nan)
    got = encoding.decode_fixed(words, frac_bits=12, out=out)
    assert got is out
    expected = words.view(np.int32 if bits == 32 else np.int64).astype(np.float64) / 4096.0
    assert np.array_equal(out, expected)


@pytest.mark.parametrize(
    "out",
    [np.empty(3), np.empty(4, dtype=np.float32), np.empty((2, 2))],
    ids=["short", "float32", "2d"],
)
def test_decode_fixed_refuses_an_output_of_another_shape_or_type(out: np.ndarray) -> None:
    with pytest.raises(ParameterError, match="out"):
        encoding.decode_fixed(np.zeros(4, dtype=np.uint64), frac_bits=1, out=out)
