"""The party side of DP SQL: a data source that runs a rendered query where the data lives.

A party answers a SQL query (docs/queries.md, "Data sources") by running the query that
``mpcdp.sql.render`` made from the query text and the party's own declaration in the engine
that holds its table: DuckDB in-process for files (.csv, .parquet, .jsonl/.ndjson), a
PostgreSQL server, or Spark. The engine aggregates (and bounds each person's contribution);
only the per-cell aggregates come back into Python, never the table, so a party can answer
over tables far larger than its memory.

This module is the shared part: the :class:`Source` protocol every engine implements,
:func:`open_source` (which engine, from the dataset's declaration; nothing connects before
the first query) and :func:`validate` (do the declared columns exist: a schema query, the
table is never read).

What is revealed: nothing by this module to anyone but the party. Every failure is a
:class:`~mpcdp.errors.DataError` naming the dataset; its text is for the owner's own log and
``mpcdp party check`` (it may hold an engine's message about the data), while a coordinator is
only ever told that the dataset is unavailable (mpcdp.protocol.query.party_engine.DatasetView).
No message carries a url's password (:func:`mpcdp.config.party_config.redact_url`).
"""

from __future__ import annotations

from typing import Protocol

from mpcdp.config.party_config import DatasetConfig
from mpcdp.config.party_limits import EngineOptions
from mpcdp.config.table_sources import SourceKind
from mpcdp.errors import DataError, ParameterError
from mpcdp.sql.render import EngineQuery

__all__ = [
    "EngineOptions",
    "Source",
    "open_source",
    "open_validated",
    "quote_identifier",
    "validate",
]


class Source(Protocol):
    """A party's table in the engine that holds it."""

    @property
    def dialect(self) -> SourceKind:
        """The SQL dialect the source executes (``render(..., dialect=...)``)."""
        ...

    @property
    def relation(self) -> str:
        """Trusted SQL text naming the table (a quoted name, built from the party's own
        config): what ``render(..., relation=...)`` puts after FROM. Declared numeric columns
        are DOUBLE and categorical ones text where the source can cast (DuckDB, Spark); a
        PostgreSQL table keeps its own column types."""
        ...

    def execute(self, query: EngineQuery) -> list[tuple[object, ...]]:
        """Run ``query`` (read only; its ``params`` bound by the engine, never spliced
        into its text) and return its rows; DataError when it fails."""
        ...

    def columns(self) -> tuple[str, ...]:
        """The names of the columns in the data, from its schema (the rows are not read)."""
        ...

    def close(self) -> None:
        """Release the connection (idempotent); a later execute connects again."""
        ...


def quote_identifier(name: str, *, dialect: SourceKind) -> str:
    """``name`` as a quoted identifier of ``dialect`` (double quotes, or backticks for
    Spark), the quote character doubled inside; NUL is refused."""
    if not name or "\0" in name:
        raise ParameterError("identifier", name, "must be non-empty without a NUL character")
    q = "`" if dialect == "spark" else '"'
    return q + name.replace(q, q + q) + q


def open_source(dataset: DatasetConfig, *, options: EngineOptions | None = None) -> Source:
    """The source of a table dataset, by its declared engine (``dataset.source``). Nothing
    connects, and no engine library is imported, before the first query or schema call."""
    if dataset.kind != "table":
        raise DataError(f"dataset {dataset.name!r}: a {dataset.kind} dataset has no SQL source")
    opts = options if options is not None else EngineOptions()
    if dataset.source == "duckdb":
        from mpcdp.data.duckdb_source import DuckDBSource

        return DuckDBSource(dataset=dataset, options=opts)
    if dataset.source == "postgres":
        from mpcdp.data.postgres_source import PostgresSource

        return PostgresSource(dataset=dataset, options=opts)
    if dataset.source == "spark":
        from mpcdp.data.spark_source import SparkSource

        return SparkSource(dataset=dataset, options=opts)
    raise DataError(f"dataset {dataset.name!r}: unknown source {dataset.source!r}")


#: the most present column names a validation error lists
_SHOWN = 50


def validate(source: Source, *, dataset: DatasetConfig) -> None:
    """Check that every declared column (and the privacy unit) is in the data, by a schema
    query: the table is never read. DataError naming the dataset and the missing columns."""
    present = source.columns()
    needed = [c.name for c in dataset.columns]
    if dataset.privacy_unit is not None and dataset.privacy_unit not in needed:
        needed.append(dataset.privacy_unit)
    missing = [n for n in needed if n not in present]
    if missing:
        shown = list(present[:_SHOWN]) + (["..."] if len(present) > _SHOWN else [])
        raise DataError(
            f"dataset {dataset.name!r}: declared column(s) {missing} are not in its "
            f"{source.dialect} data, which has {shown}"
        )


def open_validated(dataset: DatasetConfig, *, options: EngineOptions | None = None) -> Source:
    """:func:`open_source` then :func:`validate` (what a node does when it starts), and for a
    party's own file one scan with the checks CSV files always had
    (:meth:`~mpcdp.data.duckdb_source.DuckDBSource.check_values`; a database or Spark table is
    live and is not scanned): the source, connected; closed again before an error leaves."""
    source = open_source(dataset, options=options)
    try:
        validate(source, dataset=dataset)
        if dataset.source == "duckdb":
            from mpcdp.data.duckdb_source import DuckDBSource

            assert isinstance(source, DuckDBSource)  # open_source's engine for "duckdb"
            source.check_values()
    except BaseException:
        source.close()
        raise
    return source
