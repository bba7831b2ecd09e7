"""Real servers for the data-source tests: a PostgreSQL cluster and a local Spark session.

No mocks: each test talks to the real engine a party would use. Both are started once per
pytest process (so once per pytest-xdist worker: each worker has its own cluster, in its own
temporary folder, reached through a Unix socket in that folder, so workers never race for a
port) and stopped at the end.

A missing binary is a test FAILURE that says what to install, never a silent skip.

Use from another test folder: import the fixtures into its conftest.py::

    from tests.servers import postgres_server, spark_session  # noqa: F401

then ``postgres_server`` is a :class:`PostgresServer` (``.url(user=...)``, ``.run(sql)`` as
its superuser, ``.reader``: a role that may only SELECT), ``spark_session`` a started
pyspark SparkSession on local[2] (mark such tests ``slow``). Outside pytest,
:func:`running_postgres` and :func:`running_spark` are context managers doing the same.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "PostgresServer",
    "java_home",
    "postgres_bin",
    "postgres_server",
    "running_postgres",
    "running_spark",
    "spark_session",
]

INSTALL_POSTGRES = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin nor "
    "on PATH: install them (Debian: apt-get install -y --no-install-recommends postgresql), "
    "or name their folder in MPCDP_PG_BIN"
)
INSTALL_JAVA = (
    "no Java runtime for Spark (JAVA_HOME unset, no /usr/lib/jvm/default-java, no java on "
    "PATH): install one (Debian: apt-get install -y --no-install-recommends "
    "default-jre-headless), or set JAVA_HOME"
)
INSTALL_PYSPARK = "pyspark is not installed: pip install -e '.[dev]' (or '.[spark]')"


def postgres_bin(
    *, debian: Path = Path("/usr/lib/postgresql"), search_path: str | None = None
) -> Path:
    """The folder of initdb and pg_ctl: $MPCDP_PG_BIN, else Debian's newest
    ``debian``/N/bin, else ``search_path`` (PATH); pytest.fail saying what to install
    otherwise."""
    candidates = []
    if os.environ.get("MPCDP_PG_BIN"):
        candidates.append(Path(os.environ["MPCDP_PG_BIN"]))
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: -int(p.name))]
    on_path = shutil.which("pg_ctl", path=search_path)
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    pytest.fail(INSTALL_POSTGRES, pytrace=False)


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL cluster reached through a Unix socket in ``socket_dir``.

    ``owner`` is its superuser (trust authentication: a test cluster only), ``reader`` a
    login role that may only SELECT the tables granted to it (``grant_select``), with
    ``default_transaction_read_only`` on: the role docs/queries.md recommends."""

    socket_dir: Path
    port: int
    database: str
    owner: str = "mpcdp_owner"
    reader: str = "mpcdp_reader"

    def url(self, *, user: str | None = None) -> str:
        return (
            f"postgresql://{user or self.reader}@/{self.database}"
            f"?host={self.socket_dir}&port={self.port}"
        )

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` as the superuser (autocommit); the rows it returns, if any."""
        import psycopg

        with psycopg.connect(self.url(user=self.owner), autocommit=True) as conn:
            cur = conn.execute(sql.encode(), params)  # bytes: a test's own trusted SQL
            return cur.fetchall() if cur.description else []

    def grant_select(self, schema: str, table: str) -> None:
        self.run(f'GRANT USAGE ON SCHEMA "{schema}" TO {self.reader}')
        self.run(f'GRANT SELECT ON "{schema}"."{table}" TO {self.reader}')


def _as_postgres_user() -> dict[str, Any]:
    """subprocess arguments that run a server binary as a non-root user: PostgreSQL refuses
    to run as root (CI and this machine run tests as root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(
            "running as root, and no 'postgres' user to run the test cluster as: "
            + INSTALL_POSTGRES,
            pytrace=False,
        )
    return {"user": pw.pw_uid, "group": pw.pw_gid}


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL cluster (initdb + pg_ctl in a new temporary folder, no
    TCP port: a Unix socket in that folder), yield it, stop it and delete the folder."""
    bin_dir = postgres_bin()
    user = _as_postgres_user()
    # not under pytest's tmp_path: its folders are private to root, and the cluster runs as
    # 'postgres'; a short path also keeps the socket's path under its 107-byte limit
    root = Path(tempfile.mkdtemp(prefix="mpcdp-pg-"))
    data, log = root / "data", root / "server.log"
    if user:
        os.chown(root, user["user"], user["group"])
    port = 5432
    env = {**os.environ, "LC_ALL": "C"}

    def run(*args: str) -> None:
        proc = subprocess.run(
            args, capture_output=True, text=True, env=env, timeout=60, check=False, **user
        )
        if proc.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(
                f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr[-2000:]}{tail}",
                pytrace=False,
            )

    server = PostgresServer(socket_dir=root, port=port, database="mpcdp")
    started = False
    try:
        run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            server.owner,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{root}' -p {port} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c shared_buffers=16MB -c max_connections=20"
        )
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
            "-o", options, "start")  # fmt: skip
        started = True
        import psycopg

        with psycopg.connect(
            f"postgresql://{server.owner}@/postgres?host={root}&port={port}", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {server.database}".encode())
        server.run(f"CREATE ROLE {server.reader} LOGIN")
        server.run(f"ALTER ROLE {server.reader} SET default_transaction_read_only = on")
        server.run(f"REVOKE CREATE ON SCHEMA public FROM {server.reader}")
        yield server
    finally:
        if started:
            subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                env=env,
                timeout=60,
                check=False,
                **user,
            )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster per pytest process (per xdist worker), stopped at its end."""
    with running_postgres() as server:
        yield server


def java_home(
    *, default: Path = Path("/usr/lib/jvm/default-java"), search_path: str | None = None
) -> Path:
    """$JAVA_HOME, else Debian's default JRE (``default``), else the runtime of the java on
    ``search_path`` (PATH); pytest.fail saying what to install otherwise."""
    env = os.environ.get("JAVA_HOME")
    if env and (Path(env) / "bin" / "java").is_file():
        return Path(env)
    if (default / "bin" / "java").is_file():
        return default
    java = shutil.which("java", path=search_path)
    if java:
        return Path(java).resolve().parent.parent
    pytest.fail(INSTALL_JAVA, pytrace=False)


@contextlib.contextmanager
def running_spark(*, warehouse: Path) -> Iterator[Any]:
    """A pyspark SparkSession on local[2] (no UI, few shuffle partitions, quiet logs, its
    catalog tables under ``warehouse``), stopped at the end."""
    os.environ.setdefault("JAVA_HOME", str(java_home()))
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        pytest.fail(INSTALL_PYSPARK, pytrace=False)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("mpcdp-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.warehouse.dir", str(warehouse))
        .config("spark.driver.memory", "512m")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        # tiny tables: a JVM that starts fast (C1 only, serial GC) and no code generation
        # roughly halve the tests' time; a party's own session keeps Spark's defaults
        .config(
            "spark.driver.extraJavaOptions",
            f"-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Dderby.system.home={warehouse}",
        )
        .config("spark.sql.codegen.wholeStage", "false")
        .config("spark.sql.adaptive.enabled", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()


@pytest.fixture(scope="session")
def spark_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One local Spark session per pytest process (per xdist worker): startup is slow."""
    with running_spark(warehouse=tmp_path_factory.mktemp("spark-warehouse")) as spark:
        yield spark
