"""Typed access to a TOML table (party.toml, federation.toml, a training declaration): every
error names the file and the full key, e.g. ``party.toml: datasets.raises.epsilon: must be > 0``.
Nothing happens at import time.
"""

from __future__ import annotations

import ipaddress
import math
import re
import sys
from pathlib import Path
from typing import Any

from mpcdp.config.names import check_identity
from mpcdp.errors import ConfigError, ParameterError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Reader", "address_problem", "load_toml"]

_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class Reader:
    """Typed access to a TOML table with errors that name the file and the key.

    :meth:`error` makes such an error for a check done outside the reader."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, data, prefix

    def error(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: {msg}")

    def get(
        self,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"must be {names}, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(key, f"has the wrong type ({type(value).__name__}: {value!r})")
        return value

    def number(self, key: str, default: Any = ...) -> float:
        v = self.get(key, (int, float), default)
        if v is not None and (not math.isfinite(v)):
            raise self.error(key, f"must be finite, got {v!r}")
        return v  # type: ignore[no-any-return]

    def positive(self, key: str, default: Any = ...) -> float:
        """A finite number > 0 (a missing key with ``default=None`` gives None)."""
        v = self.number(key, default)
        if v is not None and not v > 0:
            raise self.error(key, f"must be > 0, got {v!r}")
        return v

    def path_of(self, key: str) -> Path:
        value = self.get(key, str)
        if "\0" in value or not value:
            raise self.error(key, f"{value!r} is not a usable path (empty, or a NUL character)")
        p = Path(value)
        return p if p.is_absolute() else (self.path.parent / p)

    def file_path(self, key: str) -> Path:
        """A path to a file the program creates or opens: its folder must already exist."""
        p = self.path_of(key)
        if p.is_dir():
            raise self.error(key, f"{str(p)!r} is a directory; give a file path inside it")
        if not p.parent.is_dir():
            raise self.error(
                key,
                f"the folder of {str(p)!r} does not exist ({str(p.parent)!r}); "
                "create it first (folders are not created for you)",
            )
        return p

    def address(self, key: str, *, any_port: bool) -> str:
        """``host:port`` (IPv4, ``[IPv6]`` or host name); port 0 only when ``any_port``."""
        value = self.get(key, str)
        low = 0 if any_port else 1
        reason = address_problem(value, low_port=low)
        if reason is not None:
            raise self.error(
                key,
                f"{value!r} {reason}; expected HOST:PORT with PORT in {low}..65535 and HOST an "
                "IPv4 address, a host name or [IPv6], e.g. '0.0.0.0:50051', "
                "'localhost:50051', 'party-a:50051' or '[::1]:50051'",
            )
        return str(value)

    def table(self, key: str) -> Reader:
        return Reader(self.path, self.get(key, dict), f"{self.prefix}{key}.")

    def identity(self, key: str) -> str:
        v = self.get(key, str)
        try:
            return check_identity(v)
        except ParameterError as exc:
            raise self.error(key, exc.reason) from None

    def identities(self, key: str) -> tuple[str, ...]:
        values = self.get(key, list, [])
        for v in values:
            if not isinstance(v, str):
                raise self.error(key, f"must be a list of names, got {v!r}")
            try:
                check_identity(v)
            except ParameterError as exc:
                raise self.error(key, f"{v!r} {exc.reason}") from None
        return tuple(values)

    def unknown(self, allowed: set[str]) -> None:
        extra = set(self.data) - allowed
        if extra:
            raise self.error(sorted(extra)[0], f"unknown key (allowed: {sorted(allowed)})")


def address_problem(value: str, *, low_port: int) -> str | None:
    """Why ``value`` is not a ``host:port`` address, or None when it is one."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            return "is not [IPv6]:PORT"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"has {host!r}, not an IPv6 address, in brackets"
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            return "has no ':PORT'"
        if not host:
            return "has no host"
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                return f"has {host!r}, not a host name"
            return "has an IPv6 host without brackets (write [IPv6]:PORT)"
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return f"has {host!r}, not an IPv4 address"
        else:
            name = host[:-1] if host.endswith(".") else host
            if len(name) > 253 or not all(_HOST_LABEL.fullmatch(x) for x in name.split(".")):
                return f"has {host!r}, not a host name"
    if not re.fullmatch(r"[0-9]{1,5}", port) or not low_port <= int(port) <= 65535:
        return f"has port {port!r}, not a number in {low_port}..65535"
    return None


def load_toml(path: Path) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; ConfigError naming the file when it cannot be
    read or parsed."""
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
