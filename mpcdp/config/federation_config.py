"""The coordinator's configuration file: federation.toml (docs/deploy.md).

federation.toml, the analyst's file (relative paths resolve against its folder)::

    coordinator = "analyst"
    colluders = 1
    deadline_s = 30                   # per call, at most a week
    [tls]
    ca = "certs/ca.pem"
    cert = "certs/analyst.pem"
    key = "certs/analyst.key"
    max_parties_per_unit = 1          # optional: parties that may hold one person's rows
                                      # (>= 1); a party refuses a value below its own
    [[parties]]
    id = "alice"
    address = "127.0.0.1:50051"       # HOST:PORT as for listen, PORT 1..65535

Numbers must be finite and deadline_s > 0; every error names the file, the key and the value.
The parties' own file, party.toml, is :mod:`mpcdp.config.party_config`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpcdp.config.reader import Reader, load_toml
from mpcdp.config.tls_config import TlsConfig, read_tls

__all__ = ["FederationConfig", "PartyAddress", "load_federation_config"]


@dataclass(frozen=True)
class PartyAddress:
    """A party as the coordinator reaches it: its id (the name in its certificate) and
    HOST:PORT."""

    id: str
    address: str


@dataclass(frozen=True)
class FederationConfig:
    """federation.toml, read and checked."""

    path: Path
    coordinator: str
    tls: TlsConfig
    parties: tuple[PartyAddress, ...]
    colluders: int = 1
    deadline_s: float = 30.0
    #: how many parties may hold rows of one person: the sensitivity of a SQL query is
    #: multiplied by it (each party refuses a value below its own dataset's)
    max_parties_per_unit: int = 1
    #: the fewest parties a query may be answered by when others fail (None: all of them);
    #: a query re-run without the parties that failed needs at least this many, and
    #: n' - colluders >= 1 (docs/queries.md, "When a party fails")
    min_parties: int | None = None

    @property
    def quorum(self) -> int:
        """:attr:`min_parties`, or every party when it is not set."""
        return len(self.parties) if self.min_parties is None else self.min_parties


#: the longest per-call deadline federation.toml accepts (seconds)
_MAX_DEADLINE_S = 7 * 24 * 3600


def load_federation_config(path: str | Path) -> FederationConfig:
    """federation.toml at ``path``, checked (module docstring); ConfigError naming the file,
    the key and the value otherwise."""
    p = Path(path).resolve()
    r = Reader(p, load_toml(p))
    r.unknown(
        {
            "coordinator",
            "colluders",
            "deadline_s",
            "tls",
            "parties",
            "max_parties_per_unit",
            "min_parties",
        }
    )
    entries = r.get("parties", list)
    parties = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise r.error(f"parties[{i}]", "must be a table with id and address")
        pr = Reader(p, e, f"parties[{i}].")
        pr.unknown({"id", "address"})
        parties.append(
            PartyAddress(id=pr.identity("id"), address=pr.address("address", any_port=False))
        )
    ids = [q.id for q in parties]
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise r.error("parties", f"need >= 2 parties with distinct ids, got {ids}")
    colluders = r.get("colluders", int, 1)
    if not 0 <= colluders < len(parties):
        raise r.error("colluders", f"must be in [0, {len(parties) - 1}], got {colluders}")
    deadline = r.positive("deadline_s", 30.0)
    if deadline > _MAX_DEADLINE_S:
        # gRPC turns a deadline ~1e10 s away into an immediate DEADLINE_EXCEEDED on every call
        raise r.error("deadline_s", f"must be at most {_MAX_DEADLINE_S} (a week), got {deadline!r}")
    per_unit = r.get("max_parties_per_unit", int, 1)
    if not 1 <= per_unit <= len(parties):
        raise r.error(
            "max_parties_per_unit", f"must be an integer in [1, {len(parties)}], got {per_unit!r}"
        )
    min_parties = r.get("min_parties", int, len(parties))
    if isinstance(min_parties, bool) or not 2 <= min_parties <= len(parties):
        raise r.error(
            "min_parties", f"must be an integer in [2, {len(parties)}], got {min_parties!r}"
        )
    return FederationConfig(
        path=p,
        coordinator=r.identity("coordinator"),
        tls=read_tls(r),
        parties=tuple(parties),
        colluders=colluders,
        deadline_s=float(deadline),
        max_parties_per_unit=int(per_unit),
        min_parties=int(min_parties),
    )
