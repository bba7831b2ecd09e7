"""Party and coordinator ids: short, DNS-label-like names (the common name of each
certificate, the keys of party.toml and federation.toml, the parties of a query). Nothing happens
at import time.
"""

from __future__ import annotations

import re

from mpcdp.errors import ParameterError

__all__ = ["IDENTITY_RE", "check_identity"]

#: Party and coordinator ids: short, DNS-label-like names.
IDENTITY_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_identity(name: str, *, what: str = "name") -> str:
    if not isinstance(name, str) or not IDENTITY_RE.fullmatch(name):
        raise ParameterError(what, name, "must be lowercase letters, digits and '-' (1-63 chars)")
    return name
