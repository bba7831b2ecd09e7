"""How much of a party's machine a coordinator, or all of them, may hold: party.toml's
``[limits]`` (sessions, calls, connections, time) and ``[engines]`` (what the SQL engines of
its table datasets may use). Each limit bounds what one client can hold hostage: the node
refuses, with the limit's name, what goes beyond it (mpcdp.transport.server,
mpcdp.protocol.query.party_engine, mpcdp.data).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from mpcdp.config.reader import Reader
from mpcdp.errors import ParameterError

__all__ = ["EngineOptions", "LimitsConfig", "read_engines", "read_limits"]


@dataclass(frozen=True)
class LimitsConfig:
    """How much of a party one coordinator, and all of them together, may hold at once
    (party.toml ``[limits]``; see mpcdp.transport.server and mpcdp.protocol.query.party_engine)."""

    pending_sessions: int = 32
    pending_sessions_per_coordinator: int = 16
    training_sessions: int = 8
    training_sessions_per_coordinator: int = 4
    setup_calls: int = 16
    setup_calls_per_coordinator: int = 8
    long_calls: int = 8
    long_calls_per_coordinator: int = 4
    stream_silence_s: float = 30.0
    #: how long any call may last (the servicer's ``max_call_s``)
    call_s: float = 3600.0
    #: Describe, Abort and health checks one caller runs at once
    short_calls_per_caller: int = 16
    #: how long a query session, and the budget it reserved, waits for its Contribute
    session_ttl_s: float = 30.0
    #: connections open at once (never more than half of the node's file descriptors)
    connections: int = 1024
    #: how long a connection may take for its TLS handshake
    handshake_timeout_s: float = 10.0
    #: a query's Propose is answered no sooner than this after it arrives (0: when ready):
    #: set above the engine's slowest query, the answer's timing does not depend on the data
    propose_floor_s: float = 0.0


#: DuckDB's memory limit: a number and a unit
_MEMORY = r"[1-9][0-9]{0,5}(\.[0-9]+)?\s?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)"
#: the longest statement or connect timeout (seconds)
_MAX_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class EngineOptions:
    """How much of the party's machine the SQL engines (mpcdp.data) may use, and how long a
    query may run (party.toml ``[engines]``)."""

    #: DuckDB's memory limit (it spills to disk past it), e.g. "512MB", "4GB"
    memory_limit: str = "2GB"
    #: DuckDB's worker threads
    threads: int = 2
    #: PostgreSQL: a query (and a schema query) is cancelled by the server after this long
    statement_timeout_s: float = 300.0
    #: PostgreSQL: give up connecting after this long
    connect_timeout_s: float = 10.0
    #: Spark: spark.sql.shuffle.partitions (small: the aggregates are small)
    shuffle_partitions: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.memory_limit, str) or not re.fullmatch(_MEMORY, self.memory_limit):
            raise ParameterError("memory_limit", self.memory_limit, "must be like '512MB' or '4GB'")
        for name in ("threads", "shuffle_partitions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
                raise ParameterError(name, value, "must be an integer in [1, 1024]")
        for name in ("statement_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0 < value <= _MAX_TIMEOUT_S:
                raise ParameterError(name, value, f"must be in (0, {_MAX_TIMEOUT_S}] seconds")


def read_engines(r: Reader) -> EngineOptions:
    """party.toml ``[engines]``: each key of :class:`EngineOptions`, optional."""
    kinds: dict[str, Any] = {
        "memory_limit": str,
        "threads": int,
        "shuffle_partitions": int,
        "statement_timeout_s": (int, float),
        "connect_timeout_s": (int, float),
    }
    r.unknown(set(kinds))
    values = {k: r.get(k, kind) for k, kind in kinds.items() if k in r.data}
    try:
        return EngineOptions(**values)
    except ParameterError as exc:
        raise r.error(exc.name, f"{exc.value!r} {exc.reason}") from None


#: [limits] keys in seconds, and the largest value each accepts
_SECONDS_LIMITS = {
    "stream_silence_s": 3600,
    "session_ttl_s": 3600,
    "call_s": 7 * 24 * 3600,
    "handshake_timeout_s": 300,
}
#: the longest propose_floor_s (a floor above a session's time to live would expire it)
_MAX_PROPOSE_FLOOR_S = 60
#: [limits] counts whose largest value is not 4096
_COUNT_LIMITS = {"connections": 1 << 20}


def read_limits(r: Reader) -> LimitsConfig:
    """party.toml ``[limits]``: each key of :class:`LimitsConfig`, optional, in range."""
    defaults = LimitsConfig()
    names = [f.name for f in dataclasses.fields(LimitsConfig)]
    r.unknown(set(names))
    values: dict[str, Any] = {}
    for name in names:
        if name == "propose_floor_s":
            v = r.number(name, 0.0)
            if not 0 <= v <= _MAX_PROPOSE_FLOOR_S:
                raise r.error(name, f"must be in [0, {_MAX_PROPOSE_FLOOR_S}] seconds, got {v!r}")
            values[name] = float(v)
            continue
        if name in _SECONDS_LIMITS:
            most = _SECONDS_LIMITS[name]
            v = r.number(name, getattr(defaults, name))
            if not 0 < v <= most:
                raise r.error(name, f"must be in (0, {most}] seconds, got {v!r}")
            values[name] = float(v)
            continue
        most = _COUNT_LIMITS.get(name, 4096)
        n = r.get(name, int, getattr(defaults, name))
        if not 1 <= n <= most:
            raise r.error(name, f"must be an integer in [1, {most}], got {n!r}")
        values[name] = int(n)
    if values["propose_floor_s"] >= values["session_ttl_s"]:
        raise r.error(
            "propose_floor_s",
            f"{values['propose_floor_s']!r} must be below session_ttl_s="
            f"{values['session_ttl_s']!r}",
        )
    for total in ("pending_sessions", "training_sessions", "setup_calls", "long_calls"):
        if values[f"{total}_per_coordinator"] > values[total]:
            raise r.error(
                f"{total}_per_coordinator",
                f"{values[f'{total}_per_coordinator']} is more than {total}={values[total]}",
            )
    return LimitsConfig(**values)
