"""Key agreement, streams and masks (mpcdp.mpc.prg, sharing): known answers, domain
separation, masks that cancel, uploads that are uniform."""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpcdp import PROTOCOL_VERSION
from mpcdp.dp.mechanisms import Skellam
from mpcdp.errors import ParameterError
from mpcdp.local.simulation import pair_keys_for, simulate_sum
from mpcdp.mpc import encoding, prg, ring, sharing
from mpcdp.mpc.rng import csprng
from tests.stats import assert_uniform_words

# ---------------------------------------------------------------- known-answer vectors

# RFC 7748, Sec. 6.1 (X25519 Diffie-Hellman test vector).
RFC7748_A_PRIV = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
RFC7748_A_PUB = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
RFC7748_B_PRIV = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
RFC7748_B_PUB = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
RFC7748_SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def _rfc7748_keys() -> tuple[X25519PrivateKey, X25519PrivateKey]:
    return (
        X25519PrivateKey.from_private_bytes(bytes.fromhex(RFC7748_A_PRIV)),
        X25519PrivateKey.from_private_bytes(bytes.fromhex(RFC7748_B_PRIV)),
    )


def test_x25519_known_answer_rfc7748() -> None:
    a, b = _rfc7748_keys()
    assert prg.public_bytes(a).hex() == RFC7748_A_PUB
    assert prg.public_bytes(b).hex() == RFC7748_B_PUB


def _hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with the standard library, as an independent check."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def test_pair_key_is_hkdf_of_x25519_with_documented_info() -> None:
    a, b = _rfc7748_keys()
    session = b"session-0001"
    k_ab = prg.derive_pair_key(
        private_key=a,
        peer_public_key=bytes.fromhex(RFC7748_B_PUB),
        session_id=session,
        party=3,
        peer=1,
    )
    info = prg.INFO_LABEL + struct.pack(">HH", PROTOCOL_VERSION, len(session)) + session
    info += struct.pack(">II", 1, 3)
    assert k_ab == _hkdf_sha256(bytes.fromhex(RFC7748_SHARED), info, 32)
    k_ba = prg.derive_pair_key(
        private_key=b,
        peer_public_key=bytes.fromhex(RFC7748_A_PUB),
        session_id=session,
        party=1,
        peer=3,
    )
    assert k_ab == k_ba


def test_pair_keys_are_domain_separated() -> None:
    a, _ = _rfc7748_keys()
    pub = bytes.fromhex(RFC7748_B_PUB)
    base = dict(private_key=a, peer_public_key=pub, session_id=b"s1", party=0, peer=1)
    k = prg.derive_pair_key(**base)  # type: ignore[arg-type]
    variants = [
        dict(base, session_id=b"s2"),
        dict(base, peer=2),
        dict(base, version=PROTOCOL_VERSION + 1),
    ]
    keys = {prg.derive_pair_key(**v) for v in variants}  # type: ignore[arg-type]
    assert k not in keys and len(keys) == 3


def test_pair_key_input_errors() -> None:
    a, _ = _rfc7748_keys()
    with pytest.raises(ParameterError, match="peer_public_key"):
        prg.derive_pair_key(
            private_key=a, peer_public_key=b"x" * 31, session_id=b"s", party=0, peer=1
        )
    with pytest.raises(ParameterError, match="peer_public_key"):  # small-order point -> zero secret
        prg.derive_pair_key(
            private_key=a, peer_public_key=bytes(32), session_id=b"s", party=0, peer=1
        )
    with pytest.raises(ParameterError, match="peer"):
        prg.derive_pair_key(
            private_key=a,
            peer_public_key=bytes.fromhex(RFC7748_B_PUB),
            session_id=b"s",
            party=2,
            peer=2,
        )
    with pytest.raises(ParameterError, match="session_id"):
        prg.derive_pair_key(
            private_key=a,
            peer_public_key=bytes.fromhex(RFC7748_B_PUB),
            session_id=b"",
            party=0,
            peer=1,
        )


def test_aes256_ctr_stream_known_answer_nist_sp800_38a() -> None:
    """NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt, blocks 1-2: keystream = C xor P.

    Initial counter block f0f1...feff = round_id f0..f7 || tensor_id f8..fb || word offset
    2 * 0xfcfdfeff (two words per block).
    """
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
    cipher = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5")
    ks = prg.stream(
        key, round_id=0xF0F1F2F3F4F5F6F7, tensor_id=0xF8F9FAFB, size=4, offset=2 * 0xFCFDFEFF
    )
    assert bytes(x ^ y for x, y in zip(ks.tobytes(), plain, strict=False)) == cipher


def test_stream_offsets_rounds_and_tensors() -> None:
    key = bytes(range(32))
    full = prg.stream(key, round_id=7, tensor_id=1, size=300_001)
    assert np.array_equal(
        prg.stream(key, round_id=7, tensor_id=1, size=1000, offset=150_000), full[150_000:151_000]
    )
    other_round = prg.stream(key, round_id=8, tensor_id=1, size=1000)
    other_tensor = prg.stream(key, round_id=7, tensor_id=2, size=1000)
    assert not np.array_equal(other_round, full[:1000])
    assert not np.array_equal(other_tensor, full[:1000])
    with pytest.raises(ParameterError, match="offset"):
        prg.stream(key, round_id=0, tensor_id=0, size=2, offset=1)
    with pytest.raises(ParameterError, match="size"):
        prg.stream(key, round_id=0, tensor_id=0, size=4, offset=2**33 - 2)
    with pytest.raises(ParameterError, match="round_id"):
        prg.stream(key, round_id=-1, tensor_id=0, size=4)


# ---------------------------------------------------------------- textbook shares


@given(hnp.arrays(np.uint64, st.integers(0, 40)), st.integers(2, 12))
def test_split_reconstruct_round_trip(x: np.ndarray, n: int) -> None:
    shares = sharing.split(x, n=n)
    assert shares.shape == (n, x.size)
    assert np.array_equal(sharing.reconstruct(shares), x)


def test_split_refuses_bad_n() -> None:
    with pytest.raises(ParameterError, match="n=1"):
        sharing.split(np.zeros(2, dtype=np.uint64), n=1)


# ---------------------------------------------------------------- seeded masks


@pytest.mark.parametrize("n", range(2, 11))
def test_masks_cancel(n: int) -> None:
    size = (1 << 15) + 3  # crosses a chunk boundary with an odd tail
    keys = pair_keys_for(n, session_id=b"cancel")
    total = np.zeros(size, dtype=np.uint64)
    for i in range(n):
        mine = {j: keys[(min(i, j), max(i, j))] for j in range(n) if j != i}
        total += sharing.pairwise_mask(party=i, pair_keys=mine, round_id=5, tensor_id=2, size=size)
    assert not total.any()


@settings(max_examples=25, deadline=None)
@given(st.lists(hnp.arrays(np.uint64, 17), min_size=2, max_size=6))
def test_masked_uploads_sum_to_the_inputs(xs: list[np.ndarray]) -> None:
    n = len(xs)
    keys = pair_keys_for(n, session_id=b"sum")
    ups = [
        sharing.mask(
            x,
            party=i,
            pair_keys={j: keys[(min(i, j), max(i, j))] for j in range(n) if j != i},
            round_id=1,
            tensor_id=0,
        )
        for i, x in enumerate(xs)
    ]
    assert np.array_equal(ring.sum_vectors(ups), ring.sum_vectors(xs))


def test_mask_errors() -> None:
    with pytest.raises(ParameterError, match="pair_keys"):
        sharing.pairwise_mask(party=0, pair_keys={}, round_id=0, tensor_id=0, size=3)
    with pytest.raises(ParameterError, match="itself"):
        sharing.pairwise_mask(party=0, pair_keys={0: bytes(32)}, round_id=0, tensor_id=0, size=3)
    with pytest.raises(ParameterError, match=r"pair_keys\[1\]"):
        sharing.pairwise_mask(party=0, pair_keys={1: bytes(16)}, round_id=0, tensor_id=0, size=3)


def test_share_table_columns_are_uploads_and_rows_are_inputs() -> None:
    values = [3800, 2514, 2982, 3390]
    keys = pair_keys_for(4, session_id=b"table")
    table = sharing.share_table(values, pair_keys=keys).view(np.uint64)
    assert [int(v) for v in table.sum(axis=1, dtype=np.uint64)] == values
    for i in range(4):
        mine = {j: keys[(min(i, j), max(i, j))] for j in range(4) if j != i}
        up = sharing.mask(
            encoding.encode_int(np.array([values[i]])),
            party=i,
            pair_keys=mine,
            round_id=0,
            tensor_id=0,
        )
        assert int(table[:, i].sum(dtype=np.uint64)) == int(up[0])
    assert not np.triu(table, 1).any()


# ---------------------------------------------------------------- uniformity of uploads


@pytest.mark.parametrize("party", [0, 2, 4])
def test_upload_of_all_zero_input_is_uniform(party: int) -> None:
    n, size = 5, 1 << 17
    keys = pair_keys_for(n, session_id=b"uniform")
    mine = {j: keys[(min(party, j), max(party, j))] for j in range(n) if j != party}
    up = sharing.mask(
        np.zeros(size, dtype=np.uint64), party=party, pair_keys=mine, round_id=0, tensor_id=0
    )
    assert_uniform_words(up)


def test_uploads_with_noise_are_uniform_and_an_unmasked_vector_is_not() -> None:
    rnd = simulate_sum(
        [np.zeros(1 << 16)] * 3,
        bound=1.0,
        frac_bits=16,
        mechanism=Skellam(mu=1e4, l1_sensitivity=1e5, l2_sensitivity=300.0),
        rng=csprng(key=bytes(16)),
    )
    for up in rnd.uploads:
        assert_uniform_words(up)
    # the test has power: a noisy but unmasked share is far from uniform
    noisy = encoding.encode_int(
        Skellam(mu=1e4, l1_sensitivity=1.0, l2_sensitivity=1.0).share(size=1 << 16, honest=2)
    )
    with pytest.raises(AssertionError):
        assert_uniform_words(noisy)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_masks_cancel_in_the_32_bit_ring(n: int) -> None:
    size = (1 << 16) + 5
    keys = pair_keys_for(n, session_id=b"cancel32")
    total = np.zeros(size, dtype=np.uint32)
    ups = []
    for i in range(n):
        mine = {j: keys[(min(i, j), max(i, j))] for j in range(n) if j != i}
        up = sharing.pairwise_mask(
            party=i, pair_keys=mine, round_id=1, tensor_id=0, size=size, ring_bits=32
        )
        assert up.dtype == np.uint32
        ups.append(up)
        total += up
    assert not total.any()
    assert_uniform_words(ups[0][: 1 << 16].view(np.uint64))


@pytest.mark.parametrize("bits", [32, 64])
def test_mask_stream_in_uneven_slices_equals_the_whole_mask(bits: int) -> None:
    keys = pair_keys_for(4, session_id=b"stream")
    mine = {j: keys[(min(2, j), max(2, j))] for j in range(4) if j != 2}
    size = 100_003
    whole = sharing.pairwise_mask(
        party=2, pair_keys=mine, round_id=3, tensor_id=1, size=size, ring_bits=bits
    )
    dtype = np.uint32 if bits == 32 else np.uint64
    buf = np.zeros(size, dtype=dtype)
    stream = sharing.MaskStream(party=2, pair_keys=mine, round_id=3, tensor_id=1, ring_bits=bits)
    for start, stop in [(0, 1), (1, 17), (17, 70_000), (70_000, size)]:
        stream.apply(buf[start:stop])
    assert np.array_equal(buf, whole) and stream.words_done == size
    with pytest.raises(ParameterError, match="dtype"):
        stream.apply(np.zeros(3, dtype=np.uint64 if bits == 32 else np.uint32))
