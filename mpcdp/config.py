"""Party and federation configuration files (TOML).

party.toml (one per party; relative paths resolve against the file's folder)::

    id = "alice"
    listen = "127.0.0.1:50051"
    ledger = "alice-ledger.sqlite"
    min_colluders = 1                 # refuse queries that size noise for fewer colluders
    device = "auto"                   # where the party trains: auto (first GPU, else CPU),
                                      # cpu, cuda or cuda:N
    [tls]
    ca = "certs/ca.pem"
    cert = "certs/alice.pem"
    key = "certs/alice.key"
    coordinators = ["analyst"]        # who may query this party
    peers = ["bob", "carlos"]         # whose signed keys this party accepts in a round
    [datasets.raises]
    path = "raises.csv"               # .csv table or .npy vector
    epsilon = 3.0                     # this party's budget for the dataset
    delta = 1e-6
    allow_exact = false               # answer mechanism "none" (exact MPC, no DP)?
    max_epsilon_per_query = 1.0       # optional
    l2_bound = 1.0                    # .npy vectors: L2 clipping bound
    [datasets.digits]                 # .npz examples (arrays x, y) to train on
    path = "digits.npz"
    num_classes = 10                  # labels are 0..num_classes-1
    epsilon = 3.0
    delta = 1e-5                      # training (RDP) needs delta > 0
    [datasets.raises.columns.raise]
    lower = 0
    upper = 5000
    out_of_bounds = "error"           # or "clip"
    [datasets.raises.columns.dept]
    categories = ["eng", "ops"]

federation.toml (the analyst's)::

    coordinator = "analyst"
    colluders = 1
    deadline_s = 30
    [tls]
    ca = "certs/ca.pem"
    cert = "certs/analyst.pem"
    key = "certs/analyst.key"
    [[parties]]
    id = "alice"
    address = "127.0.0.1:50051"
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpcdp.certs import check_identity
from mpcdp.datasets import ColumnSpec
from mpcdp.errors import ConfigError, ParameterError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DatasetConfig",
    "FederationConfig",
    "PartyAddress",
    "PartyConfig",
    "TlsConfig",
    "load_federation_config",
    "load_party_config",
]


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    path: Path
    epsilon: float
    delta: float
    columns: tuple[ColumnSpec, ...]
    allow_exact: bool = False
    max_epsilon_per_query: float | None = None
    l2_bound: float = 0.0
    num_classes: int = 0

    @property
    def kind(self) -> str:
        return {".npy": "vector", ".npz": "examples"}.get(self.path.suffix, "table")

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise ParameterError("column", name, f"is not a column of dataset {self.name!r}")


@dataclass(frozen=True)
class PartyConfig:
    path: Path
    id: str
    listen: str
    ledger: Path
    tls: TlsConfig
    coordinators: tuple[str, ...]
    peers: tuple[str, ...]
    datasets: dict[str, DatasetConfig]
    #: the least t (colluders) this party accepts: its noise share is sized for h = n - t,
    #: so a coordinator asking for t = 0 would shrink every party's noise
    min_colluders: int = 1
    #: where the party computes training gradients: "auto", "cpu", "cuda" or "cuda:N"
    device: str = "auto"


@dataclass(frozen=True)
class PartyAddress:
    id: str
    address: str


@dataclass(frozen=True)
class FederationConfig:
    path: Path
    coordinator: str
    tls: TlsConfig
    parties: tuple[PartyAddress, ...]
    colluders: int = 1
    deadline_s: float = 30.0


class _Reader:
    """Typed access to a TOML table with errors that name the file and the key."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, data, prefix

    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: {msg}")

    def get(
        self,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        if key not in self.data:
            if default is ...:
                raise self._err(key, "is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool:
            raise self._err(key, f"must be {kind}, got {value!r}")
        if not isinstance(value, kind):
            raise self._err(key, f"has the wrong type ({type(value).__name__}: {value!r})")
        return value

    def number(self, key: str, default: Any = ...) -> float:
        v = self.get(key, (int, float), default)
        if v is not None and (not math.isfinite(v)):
            raise self._err(key, f"must be finite, got {v!r}")
        return v  # type: ignore[no-any-return]

    def path_of(self, key: str) -> Path:
        p = Path(self.get(key, str))
        return p if p.is_absolute() else (self.path.parent / p)

    def table(self, key: str) -> _Reader:
        return _Reader(self.path, self.get(key, dict), f"{self.prefix}{key}.")

    def identity(self, key: str) -> str:
        v = self.get(key, str)
        try:
            return check_identity(v)
        except ParameterError as exc:
            raise self._err(key, exc.reason) from None

    def identities(self, key: str) -> tuple[str, ...]:
        values = self.get(key, list, [])
        for v in values:
            if not isinstance(v, str):
                raise self._err(key, f"must be a list of names, got {v!r}")
            try:
                check_identity(v)
            except ParameterError as exc:
                raise self._err(key, f"{v!r} {exc.reason}") from None
        return tuple(values)

    def unknown(self, allowed: set[str]) -> None:
        extra = set(self.data) - allowed
        if extra:
            raise self._err(sorted(extra)[0], f"unknown key (allowed: {sorted(allowed)})")


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _tls(r: _Reader) -> TlsConfig:
    t = r.table("tls")
    return TlsConfig(ca=t.path_of("ca"), cert=t.path_of("cert"), key=t.path_of("key"))


def _column(r: _Reader, name: str) -> ColumnSpec:
    r.unknown({"lower", "upper", "categories", "out_of_bounds"})
    cats = r.get("categories", list, [])
    if cats:
        if not all(isinstance(c, str) and c for c in cats) or len(set(cats)) != len(cats):
            raise r._err("categories", "must be distinct non-empty strings")
        return ColumnSpec(name=name, categories=tuple(cats))
    lower, upper = r.number("lower"), r.number("upper")
    if lower > upper:
        raise r._err("lower", f"{lower} is above upper={upper}")
    oob = r.get("out_of_bounds", str, "error")
    if oob not in ("error", "clip"):
        raise r._err("out_of_bounds", f"must be 'error' or 'clip', got {oob!r}")
    return ColumnSpec(name=name, lower=float(lower), upper=float(upper), out_of_bounds=oob)


def _dataset(r: _Reader, name: str) -> DatasetConfig:
    r.unknown(
        {
            "path",
            "epsilon",
            "delta",
            "allow_exact",
            "max_epsilon_per_query",
            "l2_bound",
            "columns",
            "num_classes",
        }
    )
    eps = r.number("epsilon")
    if eps <= 0:
        raise r._err("epsilon", f"must be > 0, got {eps}")
    delta = r.number("delta", 0.0)
    if not 0 <= delta < 1:
        raise r._err("delta", f"must be in [0, 1), got {delta}")
    cols = r.table("columns") if "columns" in r.data else _Reader(r.path, {}, r.prefix + "columns.")
    columns = tuple(_column(cols.table(c), c) for c in cols.data)
    path = r.path_of("path")
    if path.suffix not in (".csv", ".npy", ".npz"):
        raise r._err(
            "path", f"must be a .csv table, a .npy vector or .npz examples, got {path.name!r}"
        )
    num_classes = r.get("num_classes", int, 0)
    if path.suffix == ".npz":
        if not 2 <= num_classes <= 1 << 20:
            raise r._err(
                "num_classes", f"an .npz example dataset needs num_classes >= 2, got {num_classes}"
            )
        if not delta > 0:
            raise r._err("delta", "an .npz example dataset (DP-SGD) needs delta > 0")
    l2 = r.number("l2_bound", 0.0)
    if path.suffix == ".npy" and not l2 > 0:
        raise r._err("l2_bound", "a .npy vector dataset needs l2_bound > 0")
    if path.suffix == ".csv" and not columns:
        raise r._err("columns", "a .csv dataset needs at least one declared column")
    cap = r.get("max_epsilon_per_query", (int, float), None)
    return DatasetConfig(
        name=name,
        path=path,
        epsilon=float(eps),
        delta=float(delta),
        columns=columns,
        allow_exact=r.get("allow_exact", bool, False),
        max_epsilon_per_query=None if cap is None else float(cap),
        l2_bound=float(l2),
        num_classes=num_classes,
    )


def load_party_config(path: str | Path) -> PartyConfig:
    p = Path(path).resolve()
    r = _Reader(p, _load(p))
    r.unknown({"id", "listen", "ledger", "min_colluders", "device", "tls", "datasets"})
    tls = r.table("tls")
    tls.unknown({"ca", "cert", "key", "coordinators", "peers"})
    ds = r.table("datasets")
    datasets = {name: _dataset(ds.table(name), name) for name in ds.data}
    coordinators = tls.identities("coordinators")
    if not coordinators:
        raise tls._err("coordinators", "must name at least one coordinator allowed to query")
    return PartyConfig(
        path=p,
        id=r.identity("id"),
        listen=r.get("listen", str),
        ledger=r.path_of("ledger"),
        tls=_tls(r),
        coordinators=coordinators,
        peers=tls.identities("peers"),
        datasets=datasets,
        min_colluders=_min_colluders(r),
        device=_device(r),
    )


def _device(r: _Reader) -> str:
    value = r.get("device", str, "auto")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise r._err("device", f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return str(value)


def _min_colluders(r: _Reader) -> int:
    t = r.get("min_colluders", int, 1)
    if t < 0:
        raise r._err("min_colluders", f"must be >= 0, got {t}")
    return int(t)


def load_federation_config(path: str | Path) -> FederationConfig:
    p = Path(path).resolve()
    r = _Reader(p, _load(p))
    r.unknown({"coordinator", "colluders", "deadline_s", "tls", "parties"})
    entries = r.get("parties", list)
    parties = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise r._err(f"parties[{i}]", "must be a table with id and address")
        pr = _Reader(p, e, f"parties[{i}].")
        pr.unknown({"id", "address"})
        parties.append(PartyAddress(id=pr.identity("id"), address=pr.get("address", str)))
    ids = [q.id for q in parties]
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise r._err("parties", f"need >= 2 parties with distinct ids, got {ids}")
    colluders = r.get("colluders", int, 1)
    if not 0 <= colluders < len(parties):
        raise r._err("colluders", f"must be in [0, {len(parties) - 1}], got {colluders}")
    deadline = r.number("deadline_s", 30.0)
    if deadline <= 0:
        raise r._err("deadline_s", f"must be > 0, got {deadline}")
    return FederationConfig(
        path=p,
        coordinator=r.identity("coordinator"),
        tls=_tls(r),
        parties=tuple(parties),
        colluders=colluders,
        deadline_s=float(deadline),
    )
