"""Federation certificates: one CA, one certificate per party and per coordinator.

``mpcdp certs init`` calls :func:`init_federation`. Keys are ECDSA P-256; certificates are
X.509 v3 with the identity as common name and as a DNS subject alternative name, plus
``localhost``/127.0.0.1 and any extra host names given (for multi-host deployments), and both
serverAuth and clientAuth extended key usages (a party is a server; a coordinator a client).
Private keys are written PKCS#8 PEM with mode 0600; the CA key should then be moved offline.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mpcdp.errors import ParameterError

__all__ = ["IDENTITY_RE", "FederationFiles", "init_federation", "issue", "make_ca"]

#: Party and coordinator ids: short, DNS-label-like names.
IDENTITY_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_VALIDITY = dt.timedelta(days=825)


def check_identity(name: str, *, what: str = "name") -> str:
    if not isinstance(name, str) or not IDENTITY_RE.fullmatch(name):
        raise ParameterError(what, name, "must be lowercase letters, digits and '-' (1-63 chars)")
    return name


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(
    *, name: str = "mpcdp-federation-ca"
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    *,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and certificate for identity ``name``, valid for ``name``, localhost and ``hosts``."""
    check_identity(name)
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    for host in [name, "localhost", *hosts]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    unique = list(dict.fromkeys(sans))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(unique), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class FederationFiles:
    """Paths written by :func:`init_federation`."""

    ca_cert: Path
    ca_key: Path
    certs: dict[str, Path]
    keys: dict[str, Path]


def init_federation(
    *,
    out: Path,
    parties: Sequence[str],
    coordinators: Sequence[str],
    hosts: Mapping[str, Sequence[str]] | None = None,
    overwrite: bool = False,
) -> FederationFiles:
    """Write ca.pem/ca.key and NAME.pem/NAME.key for every party and coordinator into ``out``."""
    names = [*parties, *coordinators]
    for n in names:
        check_identity(n, what="parties/coordinators")
    if len(set(names)) != len(names):
        raise ParameterError("parties/coordinators", names, "names must be unique")
    if not parties:
        raise ParameterError("parties", list(parties), "need at least one party")
    extra = dict(hosts or {})
    unknown = set(extra) - set(names)
    if unknown:
        raise ParameterError("hosts", sorted(unknown), "names hosts for unknown identities")
    out.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = out / "ca.pem", out / "ca.key"
    if ca_cert_path.exists() and not overwrite:
        raise ParameterError(
            "out", str(out), "already holds a CA (ca.pem); pass overwrite to replace"
        )
    ca_key, ca_cert = make_ca()
    _write_key(ca_key_path, ca_key)
    _write_cert(ca_cert_path, ca_cert)
    certs, keys = {}, {}
    for n in names:
        key, cert = issue(name=n, ca_key=ca_key, ca_cert=ca_cert, hosts=extra.get(n, ()))
        keys[n], certs[n] = out / f"{n}.key", out / f"{n}.pem"
        _write_key(keys[n], key)
        _write_cert(certs[n], cert)
    return FederationFiles(ca_cert=ca_cert_path, ca_key=ca_key_path, certs=certs, keys=keys)
