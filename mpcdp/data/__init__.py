"""A party's table in the engine where it lives (DuckDB, PostgreSQL, Spark), for DP SQL.

See :mod:`mpcdp.data.table_source` for the protocol, :func:`open_source` and :func:`validate`;
each engine's module is imported only when a dataset uses it.
"""

from mpcdp.data.table_source import (
    EngineOptions,
    Source,
    open_source,
    open_validated,
    quote_identifier,
    validate,
)

__all__ = [
    "EngineOptions",
    "Source",
    "open_source",
    "open_validated",
    "quote_identifier",
    "validate",
]
