"""A party's configuration file, party.toml (TOML; docs/deploy.md).

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

Numbers must be finite (TOML's nan and inf are refused), and epsilon and
max_epsilon_per_query > 0; paths may not hold a NUL character; every error names the file, the key
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
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from mpcdp.config.datasets import ColumnSpec
from mpcdp.config.federation_config import FederationConfig, PartyAddress, load_federation_config
from mpcdp.config.party_limits import EngineOptions, LimitsConfig, read_engines, read_limits
from mpcdp.config.reader import Reader, load_toml
from mpcdp.config.table_sources import (
    GLOB,
    SOURCE_KEYS,
    TABLE_SUFFIXES,
    UNIT_KEYS,
    SourceKind,
    read_engine_source,
    read_unit,
    redact_url,
    refuse_table_keys,
)
from mpcdp.config.tls_config import TlsConfig, read_tls
from mpcdp.config.training_config import (
    TRAINING_KEYS,
    TrainingDeclaration,
    is_import_path,
    read_training,
)
from mpcdp.errors import ParameterError

# FederationConfig, load_federation_config, TlsConfig, LimitsConfig, EngineOptions, SourceKind,
# TABLE_SUFFIXES and redact_url are defined in the modules imported above; named here too,
# since callers have always found them in this module
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
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: how the SQL engines of its table datasets may use the machine (``[engines]``)
    engines: EngineOptions = field(default_factory=EngineOptions)
    #: what all its datasets together may spend, (epsilon, delta) (``[total_budget]``;
    #: None: each dataset's budget alone)
    total_budget: tuple[float, float] | None = None


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
            *SOURCE_KEYS,
            *UNIT_KEYS,
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
        refuse_table_keys(r, "a training dataset")
    if any(k in r.data for k in SOURCE_KEYS):
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
        refuse_table_keys(r, f"{path.name!r} (not a table)")
    elif GLOB.search(str(path)):
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
        **(read_unit(r) if table else {}),
    )


def _engine_table(
    r: Reader, name: str, shares: _Shares, eps: float, delta: float, columns: tuple[ColumnSpec, ...]
) -> DatasetConfig:
    """A table dataset read by PostgreSQL or Spark (:func:`.read_engine_source`)."""
    source, path, url, table, master = read_engine_source(r)
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
        **read_unit(r),
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
    r = Reader(p, load_toml(p))
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
        tls=read_tls(r),
        coordinators=coordinators,
        peers=tls.identities("peers"),
        datasets=datasets,
        min_colluders=_min_colluders(r),
        device=_device(r),
        max_model_params=_max_model_params(r),
        limits=read_limits(r.table("limits")) if "limits" in r.data else LimitsConfig(),
        engines=read_engines(r.table("engines")) if "engines" in r.data else EngineOptions(),
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
