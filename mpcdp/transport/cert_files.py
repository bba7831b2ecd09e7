"""Federation certificates: one CA, one certificate per party and per coordinator.

``mpcdp certs init`` calls :func:`init_federation`. Keys are ECDSA P-256; certificates are
X.509 v3 with the identity as common name and as a DNS subject alternative name, plus
``localhost``/127.0.0.1 and any extra host names given (for multi-host deployments), and both
serverAuth and clientAuth extended key usages (a party is a server; a coordinator a client).
Private keys are written PKCS#8 PEM with mode 0600 and certificates with mode 0644, whatever
the umask, into a folder of mode 0700; each file is written to a new file in the same folder
and renamed over the old one, so a rewritten key never keeps an old, wider mode, and a path
that is a symbolic link is refused, never written through. The CA key should then be moved
offline.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mpcdp.config.names import check_identity
from mpcdp.errors import ParameterError

__all__ = ["FederationFiles", "init_federation", "issue", "make_ca"]

_log = logging.getLogger(__name__)

_VALIDITY = dt.timedelta(days=825)


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


_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, atomically, never through a link.

    The bytes go to a new file in the same folder (created 0600, never following a link,
    then set to ``mode`` whatever the umask), which then replaces ``path``: a rename swaps
    the directory entry, so an old file's mode is not kept and a link's target is untouched.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), _KEY_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _prepare_folder(out: Path) -> None:
    """Create ``out`` with mode 0700, or set an existing folder of ours to 0700."""
    try:
        out.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        st = out.stat()
        mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        if mine and stat.S_IMODE(st.st_mode) != _DIR_MODE:
            _log.info(
                "%s: mode %04o -> %04o (it holds private keys)",
                out,
                stat.S_IMODE(st.st_mode),
                _DIR_MODE,
            )
            out.chmod(_DIR_MODE)
        elif not mine:
            _log.warning(
                "%s belongs to user id %d, not to this user: its mode %04o is left as it is; "
                "anyone who can write to it can replace the keys written there",
                out,
                st.st_uid,
                stat.S_IMODE(st.st_mode),
            )
    except OSError as exc:
        raise ParameterError(
            "out", str(out), f"cannot use it as a folder: {exc.strerror}"
        ) from None


def _check_target(out: Path, path: Path) -> None:
    if path.is_symlink():
        raise ParameterError(
            "out",
            str(out),
            f"{path.name} is a symbolic link (to {os.readlink(path)!r}); refusing to write "
            "a key or certificate through it: remove the link first",
        )
    if path.exists() and not path.is_file():
        raise ParameterError("out", str(out), f"{path.name} exists and is not a regular file")


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
    ca_cert_path, ca_key_path = out / "ca.pem", out / "ca.key"
    if ca_cert_path.exists() and not overwrite:
        raise ParameterError(
            "overwrite",
            overwrite,
            f"{out} already holds a CA (ca.pem); pass overwrite=True to replace it",
        )
    certs = {n: out / f"{n}.pem" for n in names}
    keys = {n: out / f"{n}.key" for n in names}
    targets = [ca_cert_path, ca_key_path, *certs.values(), *keys.values()]
    for path in targets:  # before anything is written: no half-replaced federation
        _check_target(out, path)
    _prepare_folder(out)
    ca_key, ca_cert = make_ca()
    files = [
        (ca_key_path, _key_bytes(ca_key), _KEY_MODE),
        (ca_cert_path, _cert_bytes(ca_cert), _CERT_MODE),
    ]
    for n in names:
        key, cert = issue(name=n, ca_key=ca_key, ca_cert=ca_cert, hosts=extra.get(n, ()))
        files += [(keys[n], _key_bytes(key), _KEY_MODE), (certs[n], _cert_bytes(cert), _CERT_MODE)]
    for path, data, mode in files:
        try:
            _write_file(path, data, mode=mode)
        except OSError as exc:
            raise ParameterError(
                "out", str(out), f"cannot write {path.name}: {exc.strerror}"
            ) from None
    return FederationFiles(ca_cert=ca_cert_path, ca_key=ca_key_path, certs=certs, keys=keys)
