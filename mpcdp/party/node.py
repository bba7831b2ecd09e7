"""A party node: config -> ledger, datasets, engine, mTLS gRPC server.

``mpcdp party serve --config party.toml`` runs :func:`serve`. At start the node checks that
its certificate verifies against its CA file (:func:`check_tls`), opens its ledger (which
must exist: :func:`init_ledger`, ``mpcdp party init``, creates it once; a missing, empty or
corrupt ledger stops the node with a message that says how to restore it), sets each
dataset's budget in it from the config (the owner's decision), loads and validates every
dataset (a dataset that fails validation stays unavailable: queries on it are refused with
the validation error, the others keep working), and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from mpcdp.config.datasets import Vector, load_vector
from mpcdp.config.party_config import DatasetConfig, PartyConfig, load_party_config
from mpcdp.data.table_source import open_validated
from mpcdp.dp.ledger import BudgetLedger
from mpcdp.errors import ConfigError, DataError, PolicyError
from mpcdp.party.training_tasks import ModelFactory, load_tasks
from mpcdp.protocol.catalog import ColumnInfo, DatasetInfo
from mpcdp.protocol.query.local_statistic import EngineTable
from mpcdp.protocol.query.party_engine import DatasetView, PartyEngine
from mpcdp.protocol.query.sql_release import table_decl
from mpcdp.protocol.session import PartyIdentity
from mpcdp.protocol.training import TrainingEngine
from mpcdp.transport import server as srv
from mpcdp.transport import tls

__all__ = [
    "PartyNode",
    "check_datasets",
    "check_ledger",
    "check_tls",
    "init_ledger",
    "raise_open_files_limit",
    "serve",
    "set_budgets",
]

log = logging.getLogger(__name__)


def _close_sources(views: Mapping[str, DatasetView]) -> None:
    """Close the engines the table datasets of ``views`` opened."""
    for view in views.values():
        if isinstance(view.data, EngineTable):
            view.data.source.close()


def _load(cfg: PartyConfig) -> dict[str, DatasetView]:
    views = {}
    for name, ds in cfg.datasets.items():
        if ds.kind == "examples":
            continue  # training data: mpcdp.party.training_tasks
        try:
            data: EngineTable | Vector
            if ds.kind == "vector":
                data = load_vector(ds.path)
            else:  # read where it lives, never loaded into Python (mpcdp.data)
                source = open_validated(ds, options=cfg.engines)
                data = EngineTable(source=source, table=table_decl(ds))
            views[name] = DatasetView(config=ds, data=data)
        except DataError as exc:
            log.error("dataset %r is unavailable: %s", name, exc)
            views[name] = DatasetView(config=ds, data=None, error=str(exc))
    return views


def check_datasets(cfg: PartyConfig) -> dict[str, str | None]:
    """Load and validate every dataset of ``cfg`` as the node would at start: dataset name ->
    None when usable, else the validation error (with file, row, column and value: for the
    owner's eyes; a coordinator only hears that the dataset is unavailable). Every item of
    a declared Dataset is read (a node reads a few when it starts)."""
    views = _load(cfg)
    try:
        tasks = load_tasks(cfg, "cpu", None, probe=None)
        out: dict[str, str | None] = {}
        for name in cfg.datasets:
            item = views.get(name) or tasks.get(name)
            out[name] = item.error if item is not None else "not loaded"
        return out
    finally:  # the engines' connections (a database's, a Spark session) end with the check
        _close_sources(views)


def check_tls(cfg: PartyConfig) -> str:
    """Load the party's TLS files and check that its certificate is for its id and was
    issued (and signed) by its CA file, and is valid now: what an mTLS peer would check.
    Returns what was checked, in words; ConfigError naming the file otherwise."""
    import datetime as dt

    from cryptography.exceptions import InvalidSignature

    creds = tls.load_credentials(cfg.tls)
    name = creds.cert.subject.rfc4514_string()
    if f"CN={cfg.id}" not in name.split(","):
        raise ConfigError(f"tls.cert {cfg.tls.cert} is for {name}, not for party {cfg.id!r}")
    try:
        creds.cert.verify_directly_issued_by(creds.ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        why = str(exc) or "bad signature"
        raise ConfigError(
            f"tls.cert {cfg.tls.cert} does not verify against tls.ca {cfg.tls.ca} ({why}): "
            "peers that trust that CA would refuse this party; is tls.ca the federation's "
            "CA file?"
        ) from None
    now = dt.datetime.now(dt.timezone.utc)
    if not creds.cert.not_valid_before_utc <= now <= creds.cert.not_valid_after_utc:
        raise ConfigError(
            f"tls.cert {cfg.tls.cert} is not valid now (valid from "
            f"{creds.cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{creds.cert.not_valid_after_utc:%Y-%m-%d})"
        )
    return f"certificate {name} verifies against CA file {cfg.tls.ca}"


def init_ledger(cfg: PartyConfig) -> Path:
    """Create the party's ledger (``mpcdp party init``), with each dataset's budget from the
    config; LedgerError when a file is already there (a ledger is never overwritten)."""
    with BudgetLedger.create(cfg.ledger, owner=True) as ledger:
        set_budgets(ledger, cfg)
    return cfg.ledger


def set_budgets(ledger: BudgetLedger, cfg: PartyConfig) -> None:
    """Each budget of ``cfg`` in ``ledger`` (once, however many datasets share it), and
    each dataset drawing on its budget (party.toml ``budget``). A dataset that used to have
    a budget of its own in this ledger and now shares another brings its charges along:
    they count against the shared budget (nothing spent is forgotten)."""
    for ds in cfg.datasets.values():
        ledger.set_budget(ds.budget, epsilon=ds.epsilon, delta=ds.delta)
    budgets = {ds.budget for ds in cfg.datasets.values()}
    for ds in cfg.datasets.values():
        if ds.name not in budgets and ds.name in ledger.datasets():
            ledger.merge_budget(ds.name, into=ds.budget)
    ledger.share_budgets({ds.name: ds.budget for ds in cfg.datasets.values()})
    if cfg.total_budget is None:
        ledger.set_total(epsilon=None)
    else:
        ledger.set_total(epsilon=cfg.total_budget[0], delta=cfg.total_budget[1])


def check_ledger(cfg: PartyConfig) -> str:
    """Open the party's ledger read-only as the node would (it must exist, and every row is
    checked); what it holds, in words, or LedgerError saying what is wrong and how to
    restore it. Works while the node runs (it takes no ownership)."""
    with BudgetLedger(cfg.ledger) as ledger:
        names = ledger.datasets()
        charged = sum(ledger.status(n).queries for n in names)
    return f"{cfg.ledger}: {len(names)} datasets, {charged} charges, every row consistent"


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files (RLIMIT_NOFILE) to its hard limit, so
    that ``[limits] connections`` is not cut down by a low default soft limit (the node
    keeps at most half of its descriptors for connections). Returns the soft limit now;
    logs what it did. A limit that cannot be raised is left as it is (logged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open files limit from %d to %d: %s", soft, hard, exc)
        return soft
    log.info("raised the open files limit (RLIMIT_NOFILE) from %d to its hard limit %d", soft, hard)
    return hard


class PartyNode:
    """One running party. Use :meth:`start` and :meth:`stop`, or :func:`serve`."""

    def __init__(
        self,
        config: PartyConfig,
        *,
        device: str | None = None,
        model_factory: ModelFactory | None = None,
        test_only_noise_divisor: float = 1.0,
        ranks: Any = None,
        create_ledger: bool = False,
    ) -> None:
        """``create_ledger``: this is the party's first start, create its ledger (refused
        when the file exists); otherwise the ledger must exist and be whole.
        ``ranks``: this site's worker ranks (an mpcdp.train.ranks.RankGroup, when
        torchrun started the site on several processes; rank 0 is this node).
        ``device``: where a site trains (default: the config's ``device``, "auto": its
        first GPU, else the CPU). ``model_factory``: the site's own modules by architecture
        name (default: mpcdp.train.models.build_model); it must build what the coordinator
        builds. ``test_only_noise_divisor``: FOR TESTS AND BENCHMARKS ONLY, breaks the
        site's training noise (mpcdp.protocol.training.TrainingEngine); :func:`serve` never
        sets it and party.toml cannot."""
        self.config = config
        device = config.device if device is None else device
        trains = any(ds.kind == "examples" for ds in config.datasets.values())
        if trains and device != "auto":
            try:  # a wrong device fails at start-up, not at the first training step
                from mpcdp.train.gradient_source import pick_device
            except ImportError:
                pass  # no torch here: a training run is refused with that reason
            else:
                pick_device(device)
        log.info("tls: %s", check_tls(config))
        self.creds = tls.load_credentials(config.tls)
        # one process per ledger; created only on purpose, never over a lost or empty one
        self.ledger = BudgetLedger(config.ledger, owner=True, create=create_ledger)
        set_budgets(self.ledger, config)
        self.views = _load(config)
        self.tasks = load_tasks(config, device, model_factory, ranks=ranks)
        party = PartyIdentity(
            party_id=config.id,
            ca=self.creds.ca,
            certificate=self.creds.cert,
            signing_key=self.creds.key,
            ledger=self.ledger,
            peers=frozenset(config.peers),
            min_colluders=config.min_colluders,
        )
        self.engine = PartyEngine(
            party,
            datasets=self.views,
            max_pending=config.limits.pending_sessions_per_coordinator,
            max_pending_total=config.limits.pending_sessions,
            session_ttl_s=config.limits.session_ttl_s,
            propose_floor_s=config.limits.propose_floor_s,
        )
        self.training: TrainingEngine | None = None
        if self.tasks:
            self.training = TrainingEngine(
                party,
                tasks=self.tasks,
                max_params=config.max_model_params,
                max_sessions=config.limits.training_sessions_per_coordinator,
                max_sessions_total=config.limits.training_sessions,
                test_only_noise_divisor=test_only_noise_divisor,
            )
        self._server: srv.ServerHandle | None = None
        self.port: int | None = None

    def dataset_states(self) -> dict[str, str | None]:
        """Dataset name -> None when it can be used, else its validation error (for the
        owner's eyes only)."""
        out: dict[str, str | None] = {name: v.error for name, v in self.views.items()}
        out.update({name: t.error for name, t in self.tasks.items()})
        return dict(sorted(out.items()))

    def _budget(
        self, info: DatasetInfo, cfg: DatasetConfig, coordinator: str | None
    ) -> DatasetInfo:
        """``info`` with its budget fields as ``coordinator`` sees them: the dataset's budget
        and what is left after every charge, and the coordinator's own share and what it may
        still spend (mpcdp.dp.ledger.BudgetLedger.coordinator_remaining)."""
        status = self.ledger.status(cfg.name)
        info = replace(
            info,
            budget_epsilon=float(status.budget_epsilon),
            remaining_epsilon=status.remaining_epsilon,
        )
        if coordinator is not None:
            share = cfg.share(coordinator)
            info = replace(
                info,
                coordinator_share=float(share) if share is not None else 0.0,
                coordinator_remaining_epsilon=self.ledger.coordinator_remaining(
                    cfg.name, coordinator=coordinator, share=share
                ),
            )
        return info

    def describe(self, coordinator: str | None = None) -> list[DatasetInfo]:
        """Every dataset's public metadata; with ``coordinator``, also its share of each
        budget and what it may still spend."""
        out = []
        for name, task in sorted(self.tasks.items()):
            info = DatasetInfo(
                name=name,
                kind="examples",
                length=task.examples,
                delta=task.config.delta,
                feature_shape=tuple(task.feature_shape),
                num_classes=task.num_classes,
                held_out=task.held_out,
            )
            out.append(self._budget(info, task.config, coordinator))
        for name, view in sorted(self.views.items()):
            cfg = view.config
            length = view.data.values.size if isinstance(view.data, Vector) else 0
            info = DatasetInfo(
                name=name,
                kind=cfg.kind,
                length=length,
                l2_bound=cfg.l2_bound,
                delta=cfg.delta,
                allow_exact=cfg.allow_exact,
                columns=tuple(
                    ColumnInfo(
                        name=c.name,
                        lower=c.lower,
                        upper=c.upper,
                        categories=tuple(c.categories),
                        edges=tuple(c.edges),
                    )
                    for c in cfg.columns
                ),
                privacy_unit=cfg.privacy_unit or "",
                max_rows_per_unit=cfg.max_rows_per_unit if cfg.privacy_unit else 1,
                max_groups_per_unit=cfg.max_groups_per_unit if cfg.privacy_unit else 1,
                max_parties_per_unit=cfg.max_parties_per_unit,
            )
            out.append(self._budget(info, cfg, coordinator))
        return out

    def start(self) -> int:
        limits = self.config.limits
        servicer = srv.PartyServicer(
            self.engine,
            coordinators=frozenset(self.config.coordinators),
            describe=self.describe,
            training=self.training,
            max_long_calls=limits.long_calls,
            max_long_calls_per_coordinator=limits.long_calls_per_coordinator,
            max_setup_calls=limits.setup_calls,
            max_setup_calls_per_coordinator=limits.setup_calls_per_coordinator,
            # an upload holds its session's slot until it ends: the engine's bound
            max_uploads_per_coordinator=limits.pending_sessions_per_coordinator,
            max_short_calls_per_caller=limits.short_calls_per_caller,
            stream_silence_s=limits.stream_silence_s,
            max_call_s=limits.call_s,
        )
        raise_open_files_limit()
        self._server, self.port = srv.start_server(
            servicer,
            listen=self.config.listen,
            creds=self.creds,
            max_connections=limits.connections,
            handshake_timeout_s=limits.handshake_timeout_s,
        )
        log.info("party %s serving on port %d", self.config.id, self.port)
        return self.port

    def stop(self, grace_s: float = 2.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        self.engine.close()
        _close_sources(self.views)
        if self.training is not None:
            self.training.close()
        self.ledger.close()


#: After SIGTERM/SIGINT the node must be gone within this many seconds, even if a gRPC
#: worker thread is stuck (e.g. on a client that stopped reading).
SHUTDOWN_DEADLINE_S = 15.0


def _force_exit() -> None:
    log.error("shutdown took longer than %.0f s; exiting hard", SHUTDOWN_DEADLINE_S)
    os._exit(1)


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process with more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0") or 0), world


def serve_site_rank(
    config_path: str | Path,
    *,
    port_file: Path | None = None,
    on_ready: Callable[[PartyNode], None] | None = None,
    create_ledger: bool = False,
) -> None:
    """A site started by torchrun: rank 0 serves as the party node and leads,
    the other ranks follow it as workers (mpcdp.train.ranks), each with its own copy of the
    site's config and data, on its own GPU (LOCAL_RANK) when the site has GPUs."""
    from mpcdp.train.ranks import RankGroup, serve_worker

    found = torchrun_rank()
    assert found is not None
    rank, _ = found
    if rank == 0:
        group = RankGroup.from_env()
        try:
            serve(
                config_path,
                port_file=port_file,
                on_ready=on_ready,
                ranks=group,
                create_ledger=create_ledger,
            )
        finally:
            group.stop()
        return
    import torch

    cfg = load_party_config(config_path)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = cfg.device
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    tasks = load_tasks(cfg, device, None)

    def build(description: dict[str, Any]) -> Any:
        task = tasks.get(description["dataset"])
        if task is None or task.make_source is None:
            raise PolicyError(
                f"worker rank {rank}: dataset {description['dataset']!r} is not usable here "
                f"({task.error if task is not None else 'not declared'})"
            )
        return task.make_source(description["spec"])

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 stops the workers
    serve_worker(build=build, device=torch.device(device))


def serve(
    config_path: str | Path,
    *,
    port_file: Path | None = None,
    on_ready: Callable[[PartyNode], None] | None = None,
    ranks: Any = None,
    create_ledger: bool = False,
) -> None:
    """Run a party node until SIGINT or SIGTERM. ``on_ready(node)`` is called once it
    serves (the command line prints where, and what). ``ranks``: the site's worker ranks
    (:func:`serve_site_rank` when torchrun started it). ``create_ledger``: the party's
    first start creates its ledger (see :class:`PartyNode`)."""
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node = PartyNode(load_party_config(config_path), ranks=ranks, create_ledger=create_ledger)
    port = node.start()
    if port_file is not None:
        tmp = port_file.with_suffix(port_file.suffix + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(port_file)  # atomic: readers never see a partial file
    if on_ready is not None:
        on_ready(node)
    try:
        while not done.wait(timeout=1.0):
            pass
    finally:
        watchdog = threading.Timer(SHUTDOWN_DEADLINE_S, _force_exit)
        watchdog.daemon = True
        watchdog.start()
        node.stop()
        log.info("party %s stopped", node.config.id)
