"""Mutual TLS for every channel: credentials and peer identities.

A party's server requires a client certificate from the federation CA (the TLS handshake
refuses any other), then :func:`peer_name` reads the authenticated common name so the
servicer can refuse names that are not configured coordinators. The coordinator's channel
checks the party's server certificate against the CA and pins the expected party id as the
TLS target name, so a server with another party's certificate is refused too.
There is no insecure mode.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mpcdp.config.tls_config import TlsConfig
from mpcdp.errors import AuthError, ConfigError

__all__ = ["Credentials", "channel", "load_credentials", "peer_name", "server_credentials"]

_log = logging.getLogger(__name__)

#: Upload chunks are up to 8 MiB; leave room for framing.
MAX_MESSAGE_BYTES = 16 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

#: A party that was down is tried again within seconds once it is back (gRPC's default
#: back-off grows to 120 s, so a restarted site would look dead for up to two minutes and
#: could not rejoin a training run or answer a query before then). The minimum connect
#: timeout stays gRPC's (20 s): lowering it would turn a slow handshake, or a stopped party,
#: into a refused connection instead of a call that waits for its deadline.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


@dataclass(frozen=True)
class Credentials:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    ca: x509.Certificate
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _read(path: Path, what: str, *, private: bool = False) -> bytes:
    """The file's bytes; a ``private`` file readable by group or others logs a warning."""
    try:
        with path.open("rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path}: no such file (a relative path in party.toml or federation.toml "
            "resolves against that file's folder, not the current directory)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from None
    if private and os.name == "posix" and mode & 0o077:
        # the mode of the file actually read (a symlink is followed), never its contents
        _log.warning(
            "%s %s has mode %04o: the private key is open to its group or to others; "
            "restrict it with `chmod 600 %s`",
            what,
            path,
            mode,
            path,
        )
    return data


def load_credentials(tls: TlsConfig) -> Credentials:
    ca_pem, cert_pem, key_pem = (
        _read(tls.ca, "tls.ca"),
        _read(tls.cert, "tls.cert"),
        _read(tls.key, "tls.key", private=True),
    )
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"tls files {tls.ca}, {tls.cert}, {tls.key}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"tls.key {tls.key}: expected an EC private key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ConfigError(f"tls.key {tls.key} does not belong to tls.cert {tls.cert}")
    return Credentials(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, ca=ca, cert=cert, key=key)


def server_credentials(creds: Credentials) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
    )


def channel(address: str, *, creds: Credentials, server_name: str) -> grpc.Channel:
    """An mTLS channel to ``address`` that accepts only a certificate for ``server_name``."""
    cc = grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem, private_key=creds.key_pem, certificate_chain=creds.cert_pem
    )
    options = [
        *GRPC_OPTIONS,
        ("grpc.ssl_target_name_override", server_name),
        *RECONNECT_OPTIONS,
    ]
    return grpc.secure_channel(address, cc, options=options)


def peer_name(context: grpc.ServicerContext) -> str:
    """The authenticated common name of the caller's certificate."""
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    if len(names) != 1:
        raise AuthError("the caller presented no certificate common name")
    name = names[0]
    return name.decode() if isinstance(name, bytes) else str(name)
