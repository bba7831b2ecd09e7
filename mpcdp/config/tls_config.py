"""The ``[tls]`` table that party.toml and federation.toml share: the CA certificate, this
node's certificate and its key (docs/deploy.md). Reading only; the files are loaded and
checked by :mod:`mpcdp.transport.tls`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpcdp.config.reader import Reader

__all__ = ["TlsConfig", "read_tls"]


@dataclass(frozen=True)
class TlsConfig:
    """Paths of the CA certificate, this node's certificate and its private key."""

    ca: Path
    cert: Path
    key: Path


def read_tls(r: Reader) -> TlsConfig:
    """``[tls]``: ``ca``, ``cert`` and ``key``, each a path relative to the file."""
    t = r.table("tls")
    return TlsConfig(ca=t.path_of("ca"), cert=t.path_of("cert"), key=t.path_of("key"))
