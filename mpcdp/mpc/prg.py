"""Pairwise key agreement and AES-CTR share streams (docs/design.md, "Secure sum").

Key agreement (per session): each party makes an ephemeral X25519 key pair (RFC 7748). For the
pair (i, j), both sides compute the same

    k_ij = HKDF-SHA256(ikm = X25519(sk_i, pk_j), salt = empty,
                       info = INFO_LABEL || u16 version || u16 len(session) || session
                              || u32 min(i, j) || u32 max(i, j))            (RFC 5869)

32 bytes, used as an AES-256 key. Binding the protocol version, the session id and the ordered
pair into ``info`` gives domain separation: no key is ever reused across sessions, pairs or
protocol versions.

Share streams (per round and tensor): AES-256-CTR under k_ij with the 16-byte initial counter
block ``u64 round_id || u32 tensor_id || u32 0`` (big-endian), i.e. the keystream for round r
and tensor t, read as little-endian uint64 words. One stream holds at most 2^32 AES blocks
(2^33 words); longer tensors must be split into several tensor ids.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from mpcdp import PROTOCOL_VERSION
from mpcdp.errors import ParameterError
from mpcdp.mpc import ring

__all__ = [
    "INFO_LABEL",
    "KEY_BYTES",
    "MAX_STREAM_WORDS",
    "PUBLIC_KEY_BYTES",
    "derive_pair_key",
    "fill_keystream",
    "generate_keypair",
    "public_bytes",
    "stream",
    "stream_cipher",
]

INFO_LABEL = b"mpcdp pairwise mask key"
KEY_BYTES = 32
PUBLIC_KEY_BYTES = 32
MAX_STREAM_WORDS = 1 << 33
_U32 = 1 << 32
_U64 = 1 << 64


def generate_keypair() -> X25519PrivateKey:
    """A fresh ephemeral X25519 private key (from the OS CSPRNG)."""
    return X25519PrivateKey.generate()


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """The 32-byte raw public key to send (signed) to the other parties."""
    return private_key.public_key().public_bytes_raw()


def _check_party(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U32:
        raise ParameterError(name, value, "must be an int in [0, 2^32)")


def derive_pair_key(
    *,
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    session_id: bytes,
    party: int,
    peer: int,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """k_ij for this party (``party``) and ``peer``: the same 32 bytes on both sides."""
    _check_party("party", party)
    _check_party("peer", peer)
    if party == peer:
        raise ParameterError("peer", peer, "must differ from party")
    if len(peer_public_key) != PUBLIC_KEY_BYTES:
        raise ParameterError(
            "peer_public_key", f"{len(peer_public_key)} bytes", f"must be {PUBLIC_KEY_BYTES} bytes"
        )
    if not 1 <= len(session_id) <= 0xFFFF:
        raise ParameterError("session_id", f"{len(session_id)} bytes", "must be 1..65535 bytes")
    if not 0 <= version <= 0xFFFF:
        raise ParameterError("version", version, "must be in [0, 65535]")
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError as exc:  # all-zero shared secret from a small-order point
        raise ParameterError("peer_public_key", "<32 bytes>", f"rejected: {exc}") from None
    lo, hi = min(party, peer), max(party, peer)
    info = (
        INFO_LABEL
        + struct.pack(">HH", version, len(session_id))
        + session_id
        + struct.pack(">II", lo, hi)
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def stream_cipher(key: bytes, *, round_id: int, tensor_id: int, offset: int = 0) -> CipherContext:
    """The AES-256-CTR keystream of (key, round, tensor), positioned at word ``offset``.

    ``offset`` must be even (one AES block holds two words).
    """
    if len(key) != KEY_BYTES:
        raise ParameterError("key", f"{len(key)} bytes", f"must be {KEY_BYTES} bytes")
    if not 0 <= round_id < _U64:
        raise ParameterError("round_id", round_id, "must be in [0, 2^64)")
    if not 0 <= tensor_id < _U32:
        raise ParameterError("tensor_id", tensor_id, "must be in [0, 2^32)")
    if not 0 <= offset < MAX_STREAM_WORDS or offset % 2:
        raise ParameterError("offset", offset, "must be even and in [0, 2^33)")
    block = int.from_bytes(struct.pack(">QII", round_id, tensor_id, 0), "big") + offset // 2
    return Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()


def stream(
    key: bytes, *, round_id: int, tensor_id: int, size: int, offset: int = 0
) -> ring.RingVector:
    """``size`` uint64 words of the (key, round, tensor) stream, starting at word ``offset``."""
    if size < 0 or offset + size > MAX_STREAM_WORDS:
        raise ParameterError("size", size, "need 0 <= size and offset + size <= 2^33")
    enc = stream_cipher(key, round_id=round_id, tensor_id=tensor_id, offset=offset)
    out = np.empty(size + 2, dtype=np.uint64)  # update_into wants len(data) + 15 bytes of room
    fill_keystream(enc, out.view(np.uint8), size * 8)
    return out[:size]


CHUNK_BYTES = 1 << 20
_ZEROS = bytes(CHUNK_BYTES)


def fill_keystream(enc: CipherContext, buf: NDArray[np.uint8], nbytes: int) -> None:
    """Write ``nbytes`` of keystream into ``buf`` (uint8, >= nbytes + 15 long), 1 MiB at a time."""
    if len(buf) < nbytes + 15:
        raise ParameterError("buf", f"{len(buf)} bytes", f"needs >= {nbytes + 15} bytes")
    view = buf.data
    zeros = memoryview(_ZEROS)
    pos = 0
    while pos < nbytes:
        n = min(CHUNK_BYTES, nbytes - pos)
        enc.update_into(zeros[:n], view[pos : pos + n + 15])
        pos += n
