"""A party's table in the engine where it lives (DuckDB, PostgreSQL, Spark), for DP SQL.

See :mod:`mpcdp.data.source` for the protocol, :func:`open_source` and :func:`validate`;
each engine's module is imported only when a dataset uses it.
"""

from mpcdp.data.source import (
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
