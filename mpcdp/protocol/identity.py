"""Signed ephemeral keys (docs/design.md, "Threat model": ephemeral keys are signed).

A party signs its X25519 public key with its certificate's ECDSA P-256 key over

    SIGNATURE_LABEL || u16 len(session_id) || session_id || digest(spec)
                    || u16 len(party_id) || party_id || public_key

Every other party verifies, before deriving pair keys: the certificate chains to the
federation CA (signature, validity period, not a CA), its common name is the claimed party id,
and the signature is valid. A coordinator relaying the keys can therefore neither substitute
its own key nor replay a key from another session or another query.

Pre-published keys (docs/queries.md, "Warm queries in one round trip"): a party may sign a
batch of X25519 keys ahead of any query, each for one future round of one coordinator, over

    PREKEY_LABEL || u16 len(party_id) || party_id || u16 len(coordinator) || coordinator
                 || u16 len(batch_id) || batch_id || u32 index || u64 expires || public_key

(``expires``: Unix seconds). The spec is not known yet, so it is not signed; the warm round
binds the session id and the spec digest into each pair key's derivation instead
(:func:`prekey_context`). Every party checks every relayed key: signed by the party it
names for the calling coordinator, not expired by its own clock, and of the same batch and
index as its own key, so that each party's key for a round is the one key it signed for that
(batch, index): a coordinator cannot show two parties two different keys of a third.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mpcdp.errors import AuthError, ProtocolError, SessionError

__all__ = [
    "BATCH_ID_BYTES",
    "PREKEY_LABEL",
    "PREKEY_REFUSAL",
    "SIGNATURE_LABEL",
    "CertificateCache",
    "Prekey",
    "SignedKey",
    "common_name",
    "prekey_context",
    "sign_key",
    "sign_prekey",
    "verify_certificate",
    "verify_key",
    "verify_prekey",
]

SIGNATURE_LABEL = b"mpcdp ephemeral key v1"
PREKEY_LABEL = b"mpcdp pre-published key v1"
#: bytes of a batch id (chosen by the coordinator, fresh per batch)
BATCH_ID_BYTES = 16
#: every refusal of a pre-published key says this: a coordinator that reads it knows its
#: key is spent, forgets that party's keys and answers the query the two-round-trip way
PREKEY_REFUSAL = "pre-published key"


@dataclass(frozen=True)
class SignedKey:
    """A party's signed ephemeral key, as relayed by the coordinator."""

    party_id: str
    public_key: bytes
    signature: bytes
    certificate: bytes  # DER


def _message(session_id: bytes, spec_digest: bytes, party_id: str, public_key: bytes) -> bytes:
    pid = party_id.encode()
    return (
        SIGNATURE_LABEL
        + struct.pack(">H", len(session_id))
        + session_id
        + spec_digest
        + struct.pack(">H", len(pid))
        + pid
        + public_key
    )


def sign_key(
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    session_id: bytes,
    spec_digest: bytes,
    party_id: str,
    public_key: bytes,
) -> SignedKey:
    from cryptography.hazmat.primitives import serialization

    sig = signing_key.sign(
        _message(session_id, spec_digest, party_id, public_key), ec.ECDSA(hashes.SHA256())
    )
    return SignedKey(
        party_id=party_id,
        public_key=public_key,
        signature=sig,
        certificate=certificate.public_bytes(serialization.Encoding.DER),
    )


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        raise AuthError("certificate must have exactly one common name")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def verify_certificate(cert: x509.Certificate, *, ca: x509.Certificate) -> str:
    """Check ``cert`` was issued by ``ca`` and is valid now; return its common name."""
    if cert.issuer != ca.subject:
        raise AuthError(f"certificate of {common_name(cert)!r} was not issued by the federation CA")
    ca_key = ca.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        raise AuthError("unsupported CA key or certificate signature")
    try:
        ca_key.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
    except InvalidSignature:
        raise AuthError(
            f"certificate of {common_name(cert)!r} has a signature the federation CA did not make"
        ) from None
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthError(f"certificate of {common_name(cert)!r} is expired or not yet valid")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise AuthError(f"certificate of {common_name(cert)!r} is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    return common_name(cert)


class CertificateCache:
    """Certificates already verified against the CA, by their DER bytes.

    A party sees the same few peer certificates every round; re-checking the CA signature
    each time is wasted work. An entry is used only while the certificate is still valid.
    """

    def __init__(self, *, ca: x509.Certificate, max_entries: int = 1024) -> None:
        self.ca = ca
        self._max = max_entries
        self._entries: dict[bytes, tuple[str, ec.EllipticCurvePublicKey, dt.datetime]] = {}

    def get(self, der: bytes, *, claimed: str) -> ec.EllipticCurvePublicKey:
        """The verified public key of ``der``, whose common name must be ``claimed``."""
        entry = self._entries.get(der)
        now = dt.datetime.now(dt.timezone.utc)
        if entry is None or now > entry[2]:
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                raise ProtocolError(f"signed key of {claimed!r}: certificate is not DER") from None
            name = verify_certificate(cert, ca=self.ca)
            pub = cert.public_key()
            if not isinstance(pub, ec.EllipticCurvePublicKey):
                raise AuthError(f"certificate of {name!r} does not hold an EC key")
            entry = (name, pub, cert.not_valid_after_utc)
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[der] = entry
        name, pub, _ = entry
        if name != claimed:
            raise AuthError(f"signed key claims party {claimed!r} but its certificate is {name!r}")
        return pub


def verify_key(
    key: SignedKey,
    *,
    ca: x509.Certificate,
    session_id: bytes,
    spec_digest: bytes,
    certificates: CertificateCache | None = None,
) -> None:
    """Raise ProtocolError/AuthError unless ``key`` is a valid signed key for this round."""
    cache = certificates if certificates is not None else CertificateCache(ca=ca)
    if cache.ca != ca:
        raise AuthError("certificate cache belongs to another CA")
    pub = cache.get(key.certificate, claimed=key.party_id)
    try:
        pub.verify(
            key.signature,
            _message(session_id, spec_digest, key.party_id, key.public_key),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature:
        raise ProtocolError(
            f"signed key of {key.party_id!r} does not verify for this session and query"
        ) from None


@dataclass(frozen=True)
class Prekey:
    """A party's pre-published ephemeral key: for one round of ``coordinator``, slot
    ``index`` of batch ``batch_id``, usable until ``expires`` (Unix seconds)."""

    party_id: str
    coordinator: str
    batch_id: bytes
    index: int
    expires: int
    public_key: bytes
    signature: bytes
    certificate: bytes  # DER

    @property
    def slot(self) -> tuple[bytes, int]:
        """The round this key is for: (batch id, index)."""
        return self.batch_id, self.index


def _prekey_message(
    party_id: str, coordinator: str, batch_id: bytes, index: int, expires: int, public_key: bytes
) -> bytes:
    pid, coord = party_id.encode(), coordinator.encode()
    return (
        PREKEY_LABEL
        + struct.pack(">H", len(pid))
        + pid
        + struct.pack(">H", len(coord))
        + coord
        + struct.pack(">H", len(batch_id))
        + batch_id
        + struct.pack(">IQ", index, expires)
        + public_key
    )


def sign_prekey(
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    certificate_der: bytes,
    party_id: str,
    coordinator: str,
    batch_id: bytes,
    index: int,
    expires: int,
    public_key: bytes,
) -> Prekey:
    """Sign one pre-published key (module docstring)."""
    sig = signing_key.sign(
        _prekey_message(party_id, coordinator, batch_id, index, expires, public_key),
        ec.ECDSA(hashes.SHA256()),
    )
    return Prekey(
        party_id=party_id,
        coordinator=coordinator,
        batch_id=batch_id,
        index=index,
        expires=expires,
        public_key=public_key,
        signature=sig,
        certificate=certificate_der,
    )


def verify_prekey(
    key: Prekey,
    *,
    coordinator: str,
    now: float,
    certificates: CertificateCache,
) -> None:
    """Raise unless ``key`` is a valid pre-published key of the party it names, for
    ``coordinator``, unexpired at ``now`` (Unix seconds)."""
    if key.coordinator != coordinator:
        raise AuthError(
            f"{PREKEY_REFUSAL} of {key.party_id!r} was signed for coordinator "
            f"{key.coordinator!r}, not {coordinator!r}"
        )
    if now >= key.expires:
        raise SessionError(
            f"{PREKEY_REFUSAL} of {key.party_id!r} (batch {key.batch_id.hex()}, index "
            f"{key.index}) expired at {key.expires}"
        )
    pub = certificates.get(key.certificate, claimed=key.party_id)
    try:
        pub.verify(
            key.signature,
            _prekey_message(
                key.party_id, key.coordinator, key.batch_id, key.index, key.expires, key.public_key
            ),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature:
        raise ProtocolError(
            f"{PREKEY_REFUSAL} of {key.party_id!r} does not verify (batch "
            f"{key.batch_id.hex()}, index {key.index})"
        ) from None


def prekey_context(session_id: bytes, spec_digest: bytes) -> bytes:
    """What a warm round's pair keys are derived for (the ``session_id`` input of
    mpcdp.mpc.prg.derive_pair_key): the session id and the spec digest, so that the masks
    are bound to both although the keys were signed before the query was known."""
    return session_id + spec_digest
