"""Party and federation configuration files (TOML).

party.toml (one per party; relative paths resolve against the file's folder)::

    id = "alice"
    listen = "127.0.0.1:50051"        # HOST:PORT, HOST an IPv4 address, a host name or
                                      # [IPv6]; port 0 binds any free port
    ledger = "alice-ledger.sqlite"    # its folder must exist (none is created); the ledger
                                      # itself is created once: `mpcdp party init`
    min_colluders = 1                 # refuse queries that size noise for fewer colluders
    max_model_params = 100000000      # refuse training runs of larger models (checked
                                      # before the model is built)
    device = "auto"                   # where the party trains: auto (first GPU, else CPU),
                                      # cpu, cuda or cuda:N
    [tls]
    ca = "certs/ca.pem"
    cert = "certs/alice.pem"
    key = "certs/alice.key"
    coordinators = ["analyst"]        # who may query this party
    peers = ["bob", "carlos"]         # whose signed keys this party accepts in a round
    [total_budget]                    # optional: what all this party's datasets together
    epsilon = 8.0                     # may spend, composed at this delta (each dataset
    delta = 1e-5                      # still has its own budget too)
    [coordinator_shares]              # optional: each coordinator's share, in (0, 1], of
    analyst = 0.5                     # every dataset's budget: what it may spend and hold
                                      # reserved (without a share: whatever the others leave)
    [datasets.raises]
    path = "raises.csv"               # a table (.csv, .parquet, .jsonl/.ndjson) or .npy vector
    epsilon = 3.0                     # this party's budget for the dataset
    delta = 1e-6
    allow_exact = false               # answer mechanism "none" (exact MPC, no DP)?
    max_epsilon_per_query = 1.0       # optional
    l2_bound = 1.0                    # .npy vectors: L2 clipping bound
    [datasets.raises.coordinator_shares]  # optional: shares of this dataset's budget, over
    analyst = 0.75                        # the party-wide ones
    [datasets.digits]                 # .npz examples (arrays x, y) to train on
    path = "digits.npz"
    num_classes = 10                  # labels are 0..num_classes-1
    epsilon = 3.0
    delta = 1e-5                      # training (RDP) needs delta > 0
    eval_path = "digits-test.npz"     # optional held-out split: a run may ask the sites to
                                      # evaluate on it (charged to this budget; its
                                      # number of examples is public, like the training
                                      # data's)
    [datasets.digits_wide]            # a second entry over the same data (another model):
    path = "digits.npz"               # it must share the first one's budget, with the
    budget = "digits"                 # same epsilon and delta (budget: default the
    num_classes = 10                  # dataset's own name); two entries over the same
    epsilon = 3.0                     # file, table or declared Dataset with different
    delta = 1e-5                      # budgets are refused
    [datasets.scans]                  # a training task declared by import paths
    python_path = "code"              # folder prepended to sys.path (relative: to this file)
    model = "mysite.models:make"      # make(name) or make(name, **model_options) -> nn.Module
    data = "mysite.data:scans"        # scans(**data_options) -> map-style torch Dataset of (x, y)
    loss = "cross_entropy"            # or "mse" (float targets) or "pkg.module:fn" (per example)
    collate = "mysite.data:collate"   # optional collate_fn of the DataLoader
    num_classes = 4                   # optional for data = ... (0: not a classification task)
    max_physical_batch = 1024         # examples per forward/backward on the device
    num_workers = 0                   # DataLoader worker processes
    pin_memory = true                 # default: true when the party trains on a GPU
    epsilon = 3.0
    delta = 1e-5
    [datasets.scans.model_options]    # optional keyword arguments of the factories
    width = 64
    [datasets.scans.data_paths]       # optional: keyword arguments of the Dataset factory
    root = "scans"                    # that are paths, resolved against this file's folder
    [datasets.scans.eval_data_paths]  # optional held-out split: the factory's arguments
    root = "scans-test"               # that differ for it (also eval_data_options)
    [datasets.raises.columns.raise]
    lower = 0
    upper = 5000
    out_of_bounds = "clip"            # default; "error" refuses the file (see README)
    [datasets.raises.columns.dept]
    categories = ["eng", "ops"]
    [datasets.visits]                 # a table for SQL queries (mpcdp.data): DuckDB reads a
    path = "visits.parquet"           # .csv, .parquet or .jsonl/.ndjson file in-process
    epsilon = 2.0
    privacy_unit = "patient_id"       # optional: the column naming the person (declared
                                      # or not); without it one row is one person
    max_rows_per_unit = 3             # rows of one person a query keeps per group (>= 1,
                                      # default 1; needs privacy_unit)
    max_groups_per_unit = 1           # groups one person counts in (>= 1, default 1;
                                      # needs privacy_unit)
    max_parties_per_unit = 2          # the least number of parties that may hold one
                                      # person's rows a query must assume (>= 1, default
                                      # 1); a query that assumes fewer is refused
    [datasets.visits.columns.cost]
    lower = 0
    upper = 1000
    edges = [0, 10, 100, 1000]        # optional quantile bin edges: strictly increasing,
                                      # within [lower, upper], 2 to 10^4 of them
    [datasets.visits.columns.ward]
    categories = ["a", "b"]
    [datasets.hr]                     # a PostgreSQL table (give url a read-only role)
    url = "postgresql://reader@db.internal:5432/hr"   # libpq URL; no password here:
                                      # use ~/.pgpass or PGPASSFILE
    table = "public.raises"           # schema.name, matched exactly (quoted)
    epsilon = 1.0
    [datasets.hr.columns.raise]
    lower = 0
    upper = 5000
    [datasets.events]                 # Spark (pyspark, the `spark` extra): a Parquet file
    spark_master = "local[2]"         # or folder by path, or a catalog table by table
    path = "events.parquet"           # (or table = "db.events")
    epsilon = 1.0
    [datasets.events.columns.kind]
    categories = ["click", "view"]
    [engines]                         # optional; how the SQL engines of table datasets may
                                      # use this machine (the defaults shown)
    memory_limit = "2GB"              # DuckDB, in-process (it spills to disk past it)
    threads = 2                       # DuckDB
    statement_timeout_s = 300         # PostgreSQL: the server cancels a longer query
    connect_timeout_s = 10            # PostgreSQL
    shuffle_partitions = 4            # Spark
    [limits]                          # optional; the defaults shown
    pending_sessions = 32             # query sessions open at once, all coordinators
    pending_sessions_per_coordinator = 16
    training_sessions = 8
    training_sessions_per_coordinator = 4
    setup_calls = 16                  # Propose / TrainOpen running at once
    setup_calls_per_coordinator = 8
    long_calls = 8                    # TrainStep streams running at once
    long_calls_per_coordinator = 4
    stream_silence_s = 30             # a call waiting this long on its coordinator ends
    call_s = 3600                     # any call ends after this long, whatever it does
    short_calls_per_caller = 16       # Describe / Abort / health checks running at once
                                      # per coordinator (and for all strangers together)
    session_ttl_s = 30                # a query session, and the budget it reserved, waits
                                      # this long for its Contribute
    connections = 1024                # connections open at once (at most half the node's
                                      # file descriptors, RLIMIT_NOFILE)
    handshake_timeout_s = 10          # a connection's TLS handshake must finish in this
    propose_floor_s = 0               # answer a query's Propose no sooner than this after it
                                      # arrives (0: when ready); above the engine's slowest
                                      # query, its timing says nothing about the data

federation.toml (the analyst's)::

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

Numbers must be finite (TOML's nan and inf are refused), and epsilon, max_epsilon_per_query
and deadline_s > 0; paths may not hold a NUL character; every error names the file, the key
and the value (a url's password shown as ``***``).

A table dataset names its data in exactly one way: ``path`` (DuckDB, the default engine;
.csv files are also what the statistics of docs/queries.md load), ``url`` with ``table``
(PostgreSQL), or ``spark_master`` with ``path`` or ``table`` (Spark). Which engine runs a
query is :attr:`DatasetConfig.source`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mpcdp.config.datasets import ColumnSpec
from mpcdp.config.reader import Reader
from mpcdp.config.training_config import (
    TRAINING_KEYS,
    TrainingDeclaration,
    is_import_path,
    read_training,
)
from mpcdp.errors import ConfigError, ParameterError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "TABLE_SUFFIXES",
    "DatasetConfig",
    "EngineOptions",
    "FederationConfig",
    "LimitsConfig",
    "PartyAddress",
    "PartyConfig",
    "SourceKind",
    "TlsConfig",
    "TrainingDeclaration",
    "is_import_path",
    "load_federation_config",
    "load_party_config",
    "redact_url",
]

#: the engine that runs a table dataset's SQL (mpcdp.data): DuckDB for files, PostgreSQL,
#: Spark
SourceKind = Literal["duckdb", "postgres", "spark"]
#: the file suffixes of a table that DuckDB reads
TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")


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
    #: a training task's declarations (mpcdp.train.declared); see the module docstring
    training: TrainingDeclaration | None = None
    #: (coordinator, share of this dataset's budget): the party-wide [coordinator_shares]
    #: with this dataset's own coordinator_shares over them; see the module docstring
    coordinator_shares: tuple[tuple[str, Fraction], ...] = ()
    #: the engine of a table dataset: "duckdb" (``path``), "postgres" (``url`` and
    #: ``table``) or "spark" (``spark_master`` and ``path`` or ``table``). A PostgreSQL
    #: table, or a Spark catalog one, has ``path`` = the folder of party.toml (unused)
    source: SourceKind = "duckdb"
    #: PostgreSQL: the libpq URL (not in repr: it may hold a password)
    url: str | None = field(default=None, repr=False)
    #: PostgreSQL: "schema.name"; Spark: a catalog table ("name", "db.name" or
    #: "catalog.db.name")
    table: str | None = None
    #: Spark: the master URL, e.g. "local[2]" or "spark://host:7077"
    spark_master: str | None = None
    #: the column naming the person whose rows a query bounds; None: one row, one person
    privacy_unit: str | None = None
    #: the most rows of one person a query keeps in one group (needs privacy_unit)
    max_rows_per_unit: int = 1
    #: the most groups one person's rows count in (needs privacy_unit)
    max_groups_per_unit: int = 1
    #: the least number of parties holding one person's rows that a query must assume: a
    #: query spec with a smaller value is refused
    max_parties_per_unit: int = 1
    #: the budget this dataset draws on, as party.toml's ``budget`` names it ("": its own
    #: name); see :attr:`budget`
    budget_name: str = ""

    @property
    def budget(self) -> str:
        """The ledger budget this dataset draws on: ``budget = "..."`` in party.toml, by
        default the dataset's own name. Datasets over the same data must share one."""
        return self.budget_name or self.name

    def share(self, coordinator: str) -> Fraction | None:
        """The part of this dataset's budget ``coordinator`` may spend and hold reserved
        (None: no share declared, the whole budget, whatever the others leave of it)."""
        return dict(self.coordinator_shares).get(coordinator)

    @property
    def kind(self) -> str:
        if self.training is not None and self.training.data:
            return "examples"
        return {".npy": "vector", ".npz": "examples"}.get(self.path.suffix, "table")

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise ParameterError("column", name, f"is not a column of dataset {self.name!r}")


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


def _engines(r: Reader) -> EngineOptions:
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
    #: the largest model (parameters) a site agrees to train; checked before it is built
    max_model_params: int = 100_000_000
    limits: LimitsConfig = LimitsConfig()
    #: how the SQL engines of its table datasets may use the machine (``[engines]``)
    engines: EngineOptions = EngineOptions()
    #: what all its datasets together may spend, (epsilon, delta) (``[total_budget]``;
    #: None: each dataset's budget alone)
    total_budget: tuple[float, float] | None = None


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


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _tls(r: Reader) -> TlsConfig:
    t = r.table("tls")
    return TlsConfig(ca=t.path_of("ca"), cert=t.path_of("cert"), key=t.path_of("key"))


def _column(r: Reader, name: str) -> ColumnSpec:
    r.unknown({"lower", "upper", "categories", "out_of_bounds", "edges"})
    cats = r.get("categories", list, [])
    if cats:
        if not all(isinstance(c, str) and c for c in cats) or len(set(cats)) != len(cats):
            raise r.error("categories", "must be distinct non-empty strings")
        if "edges" in r.data:
            raise r.error("edges", "applies to numeric columns (lower, upper), not categories")
        return ColumnSpec(name=name, categories=tuple(cats))
    lower, upper = r.number("lower"), r.number("upper")
    if lower > upper:
        raise r.error("lower", f"{lower} is above upper={upper}")
    oob = r.get("out_of_bounds", str, "clip")
    if oob not in ("error", "clip"):
        raise r.error("out_of_bounds", f"must be 'error' or 'clip', got {oob!r}")
    return ColumnSpec(
        name=name,
        lower=float(lower),
        upper=float(upper),
        out_of_bounds=oob,
        edges=_edges(r, float(lower), float(upper)),
    )


#: the most quantile bin edges a column may declare
_MAX_EDGES = 10_000


def _edges(r: Reader, lower: float, upper: float) -> tuple[float, ...]:
    """A numeric column's declared quantile bin edges: 2 to 10^4 finite numbers, strictly
    increasing, within [lower, upper]."""
    raw = r.get("edges", list, None)
    if raw is None:
        return ()
    if not 2 <= len(raw) <= _MAX_EDGES:
        raise r.error("edges", f"must hold 2 to {_MAX_EDGES} numbers, got {len(raw)}")
    out: list[float] = []
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise r.error("edges", f"edges[{i}]={v!r} is not a finite number")
        if not lower <= v <= upper:
            raise r.error("edges", f"edges[{i}]={v!r} is outside [lower, upper]=[{lower}, {upper}]")
        if out and not v > out[-1]:
            raise r.error(
                "edges", f"must be strictly increasing: edges[{i}]={v!r} after {out[-1]!r}"
            )
        out.append(float(v))
    return tuple(out)


def _dataset(r: Reader, name: str, shares: _Shares = ({}, ())) -> DatasetConfig:
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
            "coordinator_shares",
            "budget",
            *TRAINING_KEYS,
            *_SOURCE_KEYS,
            *_UNIT_KEYS,
        }
    )
    eps = r.positive("epsilon")
    delta = r.number("delta", 0.0)
    if not 0 <= delta < 1:
        raise r.error("delta", f"must be in [0, 1), got {delta}")
    cols = r.table("columns") if "columns" in r.data else Reader(r.path, {}, r.prefix + "columns.")
    columns = tuple(_column(cols.table(c), c) for c in cols.data)
    training = read_training(r)
    if training is not None:
        _refuse_table_keys(r, "a training dataset")
    if any(k in r.data for k in _SOURCE_KEYS):
        return _engine_table(r, name, shares, float(eps), float(delta), columns)
    if training is not None and training.data:
        if "path" in r.data:
            raise r.error("path", "give either path (an .npz) or data (an import path), not both")
        if not delta > 0:
            raise r.error("delta", "a training dataset (DP-SGD) needs delta > 0")
        num_classes = r.get("num_classes", int, 0)
        if not (num_classes == 0 or 2 <= num_classes <= 1 << 20):
            raise r.error("num_classes", f"must be 0 or in [2, 2^20], got {num_classes}")
        if training.loss == "mse" and num_classes:
            raise r.error("num_classes", "must be 0 (or absent) with loss = 'mse'")
        return DatasetConfig(
            name=name,
            path=r.path.parent,
            epsilon=float(eps),
            delta=float(delta),
            columns=(),
            max_epsilon_per_query=_cap_of(r),
            num_classes=num_classes,
            training=training,
            coordinator_shares=_shares(r, shares),
        )
    path = r.path_of("path")
    if training is not None and path.suffix != ".npz":
        key = next(k for k in TRAINING_KEYS if k in r.data)
        raise r.error(key, f"is a training key; {path.name!r} is not an .npz of examples")
    for key in ("collate", "num_workers", "pin_memory", "data_options", "data_paths"):
        if key in r.data and path.suffix == ".npz":
            raise r.error(key, "applies to data = ... (a Dataset), not to an .npz")
    if path.suffix not in (*TABLE_SUFFIXES, ".npy", ".npz"):
        raise r.error(
            "path",
            f"must be a table ({', '.join(TABLE_SUFFIXES)}), a .npy vector or .npz examples, "
            f"got {path.name!r}",
        )
    table = path.suffix in TABLE_SUFFIXES
    if not table:
        _refuse_table_keys(r, f"{path.name!r} (not a table)")
    elif _GLOB.search(str(path)):
        raise r.error("path", f"{str(path)!r} holds a glob character (*, ? or [): rename the file")
    num_classes = r.get("num_classes", int, 0)
    if num_classes < 0:
        raise r.error("num_classes", f"must be >= 0, got {num_classes}")
    classifies = training is None or training.loss != "mse"
    if path.suffix == ".npz":
        if not classifies and num_classes != 0:
            raise r.error("num_classes", "must be 0 (or absent) with loss = 'mse'")
        if classifies and not 2 <= num_classes <= 1 << 20:
            raise r.error(
                "num_classes", f"an .npz example dataset needs num_classes >= 2, got {num_classes}"
            )
        if not delta > 0:
            raise r.error("delta", "an .npz example dataset (DP-SGD) needs delta > 0")
    l2 = r.number("l2_bound", 0.0)
    if l2 < 0:
        raise r.error("l2_bound", f"must be >= 0, got {l2}")
    if path.suffix == ".npy" and not l2 > 0:
        raise r.error("l2_bound", "a .npy vector dataset needs l2_bound > 0")
    if table and not columns:
        raise r.error("columns", f"a {path.suffix} dataset needs at least one declared column")
    return DatasetConfig(
        name=name,
        path=path,
        epsilon=float(eps),
        delta=float(delta),
        columns=columns,
        allow_exact=r.get("allow_exact", bool, False),
        max_epsilon_per_query=_cap_of(r),
        l2_bound=float(l2),
        num_classes=num_classes,
        training=training,
        coordinator_shares=_shares(r, shares),
        **(_unit(r) if table else {}),
    )


#: keys that say where a table dataset's data is, other than path
_SOURCE_KEYS = ("url", "table", "spark_master")
#: keys of a table dataset's privacy unit and its contribution bounds
_UNIT_KEYS = ("privacy_unit", "max_rows_per_unit", "max_groups_per_unit", "max_parties_per_unit")
#: the largest contribution bound (engines count in 32-bit integers)
_MAX_PER_UNIT = 2**31 - 1
#: characters DuckDB's file readers take for a glob pattern
_GLOB = re.compile(r"[*?\[]")
#: one part of a PostgreSQL or Spark table name (quoted as written: case matters)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SPARK_MASTER = re.compile(
    r"local(\[(\*|[1-9][0-9]{0,3})(,[1-9][0-9]{0,3})?\])?|yarn|(spark|k8s)://\S+"
)


def _refuse_table_keys(r: Reader, what: str) -> None:
    for key in (*_SOURCE_KEYS, *_UNIT_KEYS):
        if key in r.data:
            raise r.error(key, f"applies to table datasets, not to {what}")


def _unit(r: Reader) -> dict[str, Any]:
    """privacy_unit and the contribution bounds of a table dataset."""
    unit = r.get("privacy_unit", str, None)
    if unit is not None and not re.fullmatch(r"[^\x00-\x1f\x7f\"`]{1,128}", unit):
        raise r.error(
            "privacy_unit",
            f"{unit!r} is not a usable column name (1 to 128 characters, no control "
            "character, double quote or backtick)",
        )
    out: dict[str, Any] = {"privacy_unit": unit}
    for key in _UNIT_KEYS[1:]:
        n = r.get(key, int, 1)
        if not 1 <= n <= _MAX_PER_UNIT:
            raise r.error(key, f"must be an integer in [1, {_MAX_PER_UNIT}], got {n!r}")
        if unit is None and n != 1 and key != "max_parties_per_unit":
            raise r.error(key, f"is {n} but needs privacy_unit (without it one row is one person)")
        out[key] = int(n)
    return out


def _table_name(r: Reader, *, parts: tuple[int, int], form: str) -> str:
    name = r.get("table", str)
    pieces = name.split(".")
    if not (parts[0] <= len(pieces) <= parts[1] and all(_IDENT.fullmatch(p) for p in pieces)):
        raise r.error(
            "table",
            f"{name!r} is not {form}, each part a letter or _ then letters, digits or _ "
            "(at most 63)",
        )
    return str(name)


def redact_url(url: str) -> str:
    """``url`` with its password (in the user part or the query) shown as ``***``: what an
    error message or a log line may carry."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}:***@{host}"
        query = parts.query
        if "password" in query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs])
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<a url that does not parse>"


def _postgres_url(r: Reader) -> str:
    url = r.get("url", str)
    shown = redact_url(url)
    if not re.fullmatch(r"postgres(ql)?://[^\x00-\x20\x7f]*", url):
        raise r.error(
            "url",
            f"{shown!r} is not a PostgreSQL URL (postgresql://USER@HOST:PORT/DB, no spaces)",
        )
    try:
        _ = urlsplit(url).port  # a port out of range raises
    except ValueError as exc:
        raise r.error("url", f"{shown!r} does not parse: {exc}") from None
    return str(url)


def _engine_table(
    r: Reader, name: str, shares: _Shares, eps: float, delta: float, columns: tuple[ColumnSpec, ...]
) -> DatasetConfig:
    """A table dataset read by PostgreSQL (url, table) or Spark (spark_master, path or
    table): exactly one of path, url and spark_master says where the data is."""
    given = [k for k in ("path", "url", "spark_master") if k in r.data]
    if "url" in given and len(given) > 1:  # path goes with spark_master, not with url
        raise r.error(
            given[1],
            f"give one of path (a file for DuckDB), url (PostgreSQL) or spark_master (Spark), "
            f"not {' and '.join(given)}",
        )
    for key in ("l2_bound", "num_classes"):
        if key in r.data:
            raise r.error(key, "applies to .npy and .npz datasets, not to a table")
    path = r.path.parent
    url = master = None
    source: SourceKind
    if "url" in r.data:
        source, url = "postgres", _postgres_url(r)
        table: str | None = _table_name(r, parts=(2, 2), form="schema.name")
    elif "spark_master" in r.data:
        source, master = "spark", r.get("spark_master", str)
        if not _SPARK_MASTER.fullmatch(master):
            raise r.error(
                "spark_master",
                f"{master!r} is not a Spark master (local, local[N], local[*], yarn, "
                "spark://HOST:PORT or k8s://...)",
            )
        if ("path" in r.data) == ("table" in r.data):
            raise r.error(
                "spark_master",
                "needs exactly one of path (a Parquet file or folder) or table (a catalog table)",
            )
        table = None
        if "path" in r.data:
            path = r.path_of("path")
            if path.suffix in (".csv", ".jsonl", ".ndjson", ".npy", ".npz"):
                raise r.error("path", f"Spark reads Parquet here, got {path.name!r}")
        else:
            table = _table_name(r, parts=(1, 3), form="name, db.name or catalog.db.name")
    else:
        raise r.error(
            "table", "needs url (PostgreSQL) or spark_master (Spark); a file is declared by path"
        )
    if not columns:
        raise r.error("columns", "a table dataset needs at least one declared column")
    return DatasetConfig(
        name=name,
        path=path,
        epsilon=eps,
        delta=delta,
        columns=columns,
        allow_exact=r.get("allow_exact", bool, False),
        max_epsilon_per_query=_cap_of(r),
        coordinator_shares=_shares(r, shares),
        source=source,
        url=url,
        table=table,
        spark_master=master,
        **_unit(r),
    )


def _read_shares(r: Reader, coordinators: tuple[str, ...]) -> dict[str, Fraction]:
    """A ``coordinator_shares`` table: coordinator -> its share of a budget, in (0, 1]."""
    if "coordinator_shares" not in r.data:
        return {}
    t = r.table("coordinator_shares")
    out = {}
    for name in t.data:
        if name not in coordinators:
            raise t.error(
                name, f"is not a coordinator of this party (tls.coordinators: {list(coordinators)})"
            )
        v = t.number(name)
        if not 0 < v <= 1:
            raise t.error(name, f"must be a share of the budget in (0, 1], got {v!r}")
        out[name] = Fraction(repr(float(v))) if isinstance(v, float) else Fraction(v)
    return out


def _shares(r: Reader, shares: _Shares) -> tuple[tuple[str, Fraction], ...]:
    party_wide, coordinators = shares
    merged = {**party_wide, **_read_shares(r, coordinators)}
    return tuple(sorted(merged.items()))


#: the party-wide coordinator shares and the party's coordinators
_Shares = tuple[dict[str, Fraction], tuple[str, ...]]


def _cap_of(r: Reader) -> float | None:
    # a nan cap would compare False with every request: the cap would silently vanish
    cap = r.positive("max_epsilon_per_query", None)
    return None if cap is None else float(cap)


def _data_of(ds: DatasetConfig) -> list[str]:
    """What data ``ds`` reads, in words, its held-out split included: equal for two datasets
    over the same data (the same resolved file, table or declared Dataset factory with the
    same options)."""
    t = ds.training
    if t is None:
        return [_source_of(ds)]
    out = [_declared_of(t) if t.data else _source_of(ds)]
    if t.eval_path:
        out.append(f"the file {Path(t.eval_path).resolve()}")
    elif t.evaluation:
        out.append(_declared_of(t.eval_declaration()))
    return out


def _declared_of(t: TrainingDeclaration) -> str:
    folders = ", ".join(str(p) for p in t.python_path) or "none"
    paths = ((k, str(Path(v).resolve())) for k, v in t.data_paths)
    options = ", ".join(f"{k}={v!r}" for k, v in sorted((*t.data_options, *paths)))
    return f"the Dataset {t.data}({options}) (python_path: {folders})"


def _source_of(ds: DatasetConfig) -> str:
    if ds.source == "postgres":
        return f"the PostgreSQL table {ds.table} at {redact_url(ds.url or '')}"
    if ds.table is not None:
        return f"the Spark table {ds.table} at {ds.spark_master}"
    return f"the file {ds.path.resolve()}"


def _shared_budgets(r: Reader, datasets: dict[str, DatasetConfig]) -> dict[str, DatasetConfig]:
    """Each dataset with the budget it draws on (``budget = "..."``, default its own name),
    checked: datasets sharing a budget declare the same epsilon, delta and coordinator
    shares; two datasets over the same data share a budget (else each would get a full
    budget over the same people); a budget named after another dataset is that dataset's."""
    out: dict[str, DatasetConfig] = {}
    for name, ds in datasets.items():
        t = r.table(name)
        budget = t.get("budget", str, name)
        if not budget or len(budget) > 256 or not budget.isprintable():
            raise t.error("budget", f"must be 1 to 256 printable characters, got {budget!r}")
        out[name] = dataclasses.replace(ds, budget_name="" if budget == name else budget)
    first: dict[str, DatasetConfig] = {}
    for ds in out.values():
        owner = out.get(ds.budget)
        if owner is not None and owner.budget != ds.budget:
            raise r.error(
                f"{ds.name}.budget",
                f"{ds.budget!r} is dataset {owner.name!r}, which draws on budget "
                f"{owner.budget!r}: name that budget, or another one",
            )
        other = first.setdefault(ds.budget, ds)
        mine = (ds.epsilon, ds.delta, ds.coordinator_shares)
        theirs = (other.epsilon, other.delta, other.coordinator_shares)
        if mine != theirs:
            raise r.error(
                f"{ds.name}.budget",
                f"datasets {other.name!r} and {ds.name!r} share budget {ds.budget!r} but "
                f"declare different epsilon, delta or coordinator_shares ({other.epsilon!r}, "
                f"{other.delta!r}, {dict(other.coordinator_shares)} against {ds.epsilon!r}, "
                f"{ds.delta!r}, {dict(ds.coordinator_shares)}): declare the same in both",
            )
    data: dict[str, DatasetConfig] = {}
    for ds in out.values():
        for what in _data_of(ds):  # a held-out split counts as data read, too
            other = data.setdefault(what, ds)
            if other.budget != ds.budget:
                raise r.error(
                    ds.name,
                    f"datasets {other.name!r} and {ds.name!r} both read {what}, but draw on "
                    f"budgets {other.budget!r} and {ds.budget!r}: each would spend a full "
                    f'budget on the same people. Declare budget = "{other.budget}" in both',
                )
    return out


def load_party_config(path: str | Path) -> PartyConfig:
    p = Path(path).resolve()
    r = Reader(p, _load(p))
    r.unknown(
        {
            "id",
            "listen",
            "ledger",
            "min_colluders",
            "device",
            "max_model_params",
            "tls",
            "datasets",
            "limits",
            "engines",
            "coordinator_shares",
            "total_budget",
        }
    )
    tls = r.table("tls")
    tls.unknown({"ca", "cert", "key", "coordinators", "peers"})
    coordinators = tls.identities("coordinators")
    if not coordinators:
        raise tls.error("coordinators", "must name at least one coordinator allowed to query")
    shares = (_read_shares(r, coordinators), coordinators)
    ds = r.table("datasets")
    datasets = {name: _dataset(ds.table(name), name, shares) for name in ds.data}
    datasets = _shared_budgets(ds, datasets)
    return PartyConfig(
        path=p,
        id=r.identity("id"),
        listen=r.address("listen", any_port=True),
        ledger=r.file_path("ledger"),
        tls=_tls(r),
        coordinators=coordinators,
        peers=tls.identities("peers"),
        datasets=datasets,
        min_colluders=_min_colluders(r),
        device=_device(r),
        max_model_params=_max_model_params(r),
        limits=_limits(r.table("limits")) if "limits" in r.data else LimitsConfig(),
        engines=_engines(r.table("engines")) if "engines" in r.data else EngineOptions(),
        total_budget=(
            _total_budget(r.table("total_budget"), datasets) if "total_budget" in r.data else None
        ),
    )


def _total_budget(r: Reader, datasets: dict[str, DatasetConfig]) -> tuple[float, float]:
    """``[total_budget]``: epsilon > 0 and delta in [0, 1) for all datasets together; delta
    is required, and > 0 when a dataset allows RDP releases (delta > 0): at delta 0 every
    training run and Skellam or Gaussian query would be refused."""
    r.unknown({"epsilon", "delta"})
    eps = r.positive("epsilon")
    if "delta" not in r.data:
        raise r.error("delta", "is required (the delta at which all datasets' releases compose)")
    delta = r.number("delta")
    if not 0 <= delta < 1:
        raise r.error("delta", f"must be in [0, 1), got {delta}")
    needing = sorted(name for name, ds in datasets.items() if ds.delta > 0)
    if delta == 0 and needing:
        raise r.error(
            "delta",
            f"is 0, but datasets {needing} declare delta > 0: at delta 0 the total would refuse "
            "every RDP release (training runs, Skellam and Gaussian queries); give delta > 0",
        )
    return float(eps), float(delta)


def _device(r: Reader) -> str:
    value = r.get("device", str, "auto")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise r.error("device", f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return str(value)


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


def _limits(r: Reader) -> LimitsConfig:
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


def _max_model_params(r: Reader) -> int:
    n = r.get("max_model_params", int, 100_000_000)
    if not 1 <= n <= 1 << 40:
        raise r.error("max_model_params", f"must be in [1, 2^40], got {n}")
    return int(n)


def _min_colluders(r: Reader) -> int:
    t = r.get("min_colluders", int, 1)
    if t < 0:
        raise r.error("min_colluders", f"must be >= 0, got {t}")
    return int(t)


def load_federation_config(path: str | Path) -> FederationConfig:
    p = Path(path).resolve()
    r = Reader(p, _load(p))
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
        tls=_tls(r),
        parties=tuple(parties),
        colluders=colluders,
        deadline_s=float(deadline),
        max_parties_per_unit=int(per_unit),
        min_parties=int(min_parties),
    )
