"""A party's table in PostgreSQL, queried through psycopg 3, read only.

Why: an organisation's table often lives in a PostgreSQL server; the server aggregates it
where it lies and only the per-cell aggregates come back (docs/queries.md, "Data sources").

Every query runs in its own transaction that is read only (``SET TRANSACTION READ ONLY``, the
first statement) with a statement timeout (``set_config('statement_timeout', ..., true)``,
local to the transaction), and is rolled back at the end: nothing a query does can change
the database, whatever the role may do. The query is prepared (the extended protocol: one
statement, so a ``COMMIT; ...`` in the text cannot end the read-only transaction) and its
parameters are bound by the server, never spliced into the text. The relation is the
``schema.name`` of the dataset's ``table``, checked at config time (letters, digits, _) and
quoted here, so it matches the name exactly (case included). The columns keep the table's
own types; NUMERIC results come back as float. The docs recommend a role that may only
SELECT that table, with ``default_transaction_read_only`` on, as a second lock.

One connection per source, opened on first use (libpq's URL: host, port, database and user;
the password from ~/.pgpass or PGPASSFILE rather than the URL), one query at a time on it,
opened again when the server dropped it.

What is revealed: errors are DataError naming the dataset, with the server's message for the
owner's log (it may quote a value) and the url without its password; a coordinator only
learns "unavailable".
"""

from __future__ import annotations

import logging
import math
import threading
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from mpcdp.config.party_config import DatasetConfig
from mpcdp.config.table_sources import SourceKind, redact_url
from mpcdp.data.table_source import EngineOptions, quote_identifier
from mpcdp.errors import DataError
from mpcdp.sql.render import EngineQuery

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresSource"]

log = logging.getLogger(__name__)


def _plain(value: object) -> object:
    return float(value) if isinstance(value, Decimal) else value


class PostgresSource:
    """The table ``dataset.table`` of the PostgreSQL database at ``dataset.url``."""

    def __init__(self, *, dataset: DatasetConfig, options: EngineOptions) -> None:
        if dataset.source != "postgres" or not dataset.url or not dataset.table:
            raise DataError(f"dataset {dataset.name!r}: not a PostgreSQL table (url, table)")
        parts = dataset.table.split(".")
        if len(parts) != 2:
            raise DataError(f"dataset {dataset.name!r}: table must be schema.name")
        self._dataset = dataset
        self._url = dataset.url
        self._options = options
        self._relation = ".".join(quote_identifier(p, dialect="postgres") for p in parts)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    @property
    def dialect(self) -> SourceKind:
        return "postgres"

    @property
    def relation(self) -> str:
        return self._relation

    def _where(self) -> str:
        return f"dataset {self._dataset.name!r}"

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        try:
            self._conn = psycopg.connect(
                self._url,
                autocommit=False,
                connect_timeout=max(1, math.ceil(self._options.connect_timeout_s)),
                application_name="mpcdp",
            )
        except psycopg.Error as exc:
            raise DataError(
                f"{self._where()}: cannot connect to PostgreSQL at {redact_url(self._url)}: {exc}"
            ) from None
        log.debug("%s: connected to PostgreSQL", self._where())
        return self._conn

    def _run(
        self, text: str, params: tuple[object, ...]
    ) -> tuple[list[tuple[Any, ...]], list[str]]:
        import psycopg

        with self._lock:
            reused = self._conn is not None and not self._conn.closed and not self._conn.broken
            try:
                return self._once(self._connect(), text, params)
            except psycopg.OperationalError as exc:
                # a connection the server dropped while idle is seen only when used: one
                # more try on a fresh one (the query changed nothing: it was read only)
                if not reused:
                    raise self._failed(exc) from None
                log.info("%s: PostgreSQL connection lost; connecting again", self._where())
            try:
                return self._once(self._connect(), text, params)
            except psycopg.Error as exc:
                raise self._failed(exc) from None

    def _failed(self, exc: Exception) -> DataError:
        return DataError(f"{self._where()}: the PostgreSQL query failed: {exc}")

    def _once(
        self, conn: psycopg.Connection[tuple[Any, ...]], text: str, params: tuple[object, ...]
    ) -> tuple[list[tuple[Any, ...]], list[str]]:
        """One query in its own read-only transaction, rolled back (module docstring);
        psycopg.OperationalError when the connection is gone, DataError otherwise."""
        import psycopg

        timeout_ms = str(max(1, round(self._options.statement_timeout_s * 1000)))
        try:
            with conn.cursor() as cur:
                cur.execute(b"SET TRANSACTION READ ONLY")
                cur.execute(b"SELECT set_config('statement_timeout', %s, true)", (timeout_ms,))
                # bytes: the text is the renderer's (or validate's) trusted SQL; prepared:
                # the extended protocol takes one statement, so no COMMIT; ... in it
                cur.execute(text.encode(), params, prepare=True)
                names = [d.name for d in cur.description or []]
                rows = cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError) and (conn.broken or conn.closed):
                raise  # the connection is gone: the caller may try a fresh one
            raise self._failed(exc) from None
        finally:
            if not conn.closed and not conn.broken:
                try:
                    conn.rollback()
                except psycopg.Error:  # pragma: no cover (a dropped connection)
                    conn.close()
        return rows, names

    def execute(self, query: EngineQuery) -> list[tuple[object, ...]]:
        rows, _ = self._run(query.text, tuple(query.params))
        return [tuple(_plain(v) for v in row) for row in rows]

    def columns(self) -> tuple[str, ...]:
        _, names = self._run(f"SELECT * FROM {self._relation} LIMIT 0", ())
        return tuple(names)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
