"""A party's table file (.csv, .parquet, .jsonl/.ndjson) queried by DuckDB, in-process.

Why DuckDB: it scans the file where it lies, in parallel and within a memory limit (spilling
past it), so a query over a Parquet file of many gigabytes returns only its aggregates to
Python. One in-memory database per source (one connection, a cursor per query, so
concurrent queries do not share a cursor) is opened on first use; past its memory limit it
spills to a temporary folder of its own, made only then and removed on close.

The relation is a view over the party's own file, built from its config only: the path is
a quoted SQL string literal, and the readers get explicit options, so no type is sniffed: a
CSV is read as text (header row, comma, double quotes; cells trimmed as the CSV loader trims
them), JSON lines with the declared keys as text, Parquet with its own types; then every
declared numeric column is cast to DOUBLE and every categorical one (and the privacy unit)
to VARCHAR. A value that is not a number fails
the query (DataError) rather than becoming NULL. After the view is made the database is
locked down: it may read the dataset's file (or folder) and nothing else, loads no extension
and its configuration cannot be changed by a query (DuckDB's ``allowed_paths``,
``enable_external_access = false``, ``lock_configuration``).

What is revealed: errors are DataError naming the dataset, with DuckDB's message for the
owner's log (it may quote a value of the file); a coordinator only learns "unavailable".
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpcdp.config.party_config import DatasetConfig
from mpcdp.config.table_sources import SourceKind
from mpcdp.data.table_source import EngineOptions, quote_identifier
from mpcdp.errors import DataError
from mpcdp.sql.render import EngineQuery

if TYPE_CHECKING:
    import duckdb

__all__ = ["DuckDBSource"]

log = logging.getLogger(__name__)


def _literal(text: str) -> str:
    """``text`` as a SQL string literal (single quotes doubled)."""
    if "\0" in text:
        raise DataError("a path with a NUL character cannot be read")
    return "'" + text.replace("'", "''") + "'"


def _q(name: str) -> str:
    return quote_identifier(name, dialect="duckdb")


class DuckDBSource:
    """A table file of ``dataset`` in an in-process DuckDB database (see the module doc)."""

    def __init__(self, *, dataset: DatasetConfig, options: EngineOptions) -> None:
        suffix = dataset.path.suffix
        if dataset.source != "duckdb" or suffix not in (".csv", ".parquet", ".jsonl", ".ndjson"):
            raise DataError(f"dataset {dataset.name!r}: not a table file DuckDB reads")
        self._dataset = dataset
        self._options = options
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._has_view = False
        self._temp: str | None = None
        self._relation = _q(dataset.name)

    @property
    def dialect(self) -> SourceKind:
        return "duckdb"

    @property
    def relation(self) -> str:
        return self._relation

    def _where(self) -> str:
        return f"dataset {self._dataset.name!r}"

    def _reader(self, *, typed: bool) -> str:
        """The table function reading the file: ``typed`` gives the declared columns as text
        (CSV, JSON lines); otherwise every column with what the file says (schema queries)."""
        path = self._dataset.path
        suffix = path.suffix
        if suffix == ".csv":
            return (
                f"read_csv({_literal(str(path))}, header = true, all_varchar = true, "
                "delim = ',', quote = '\"', escape = '\"')"
            )
        if suffix == ".parquet":
            target = f"{path}/**/*.parquet" if path.is_dir() else str(path)
            return f"read_parquet({_literal(target)})"
        if not typed:
            return f"read_json({_literal(str(path))}, format = 'newline_delimited')"
        cols = ", ".join(f"{_literal(n)}: 'VARCHAR'" for n in self._names())
        return (
            f"read_json({_literal(str(path))}, format = 'newline_delimited', columns = {{{cols}}})"
        )

    def _names(self) -> list[str]:
        names = [c.name for c in self._dataset.columns]
        unit = self._dataset.privacy_unit
        if unit is not None and unit not in names:
            names.append(unit)
        return names

    def _view(self) -> str:
        casts = []
        csv = self._dataset.path.suffix == ".csv"
        for name in self._names():
            numeric = any(c.name == name and not c.categorical for c in self._dataset.columns)
            # a CSV cell is trimmed as mpcdp.config.datasets.load_table trims it
            value = f"trim({_q(name)})" if csv else _q(name)
            casts.append(f"CAST({value} AS {'DOUBLE' if numeric else 'VARCHAR'}) AS {_q(name)}")
        return (
            f"CREATE VIEW {self._relation} AS SELECT {', '.join(casts)} "
            f"FROM {self._reader(typed=True)}"
        )

    def _connect(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._con is not None:
                return self._con
            import duckdb

            path = self._dataset.path
            if not path.exists():
                raise DataError(f"{self._where()}: its file does not exist")
            opts = self._options
            config: dict[str, Any] = {
                "memory_limit": opts.memory_limit,
                "threads": opts.threads,
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
            }
            # where it spills: a fresh name that DuckDB makes only when it spills, and
            # removes when the connection closes (no folder otherwise)
            self._temp = os.path.join(tempfile.gettempdir(), f"mpcdp-duckdb-{secrets.token_hex(8)}")
            config["temp_directory"] = self._temp
            con = duckdb.connect(":memory:", config=config)
            try:
                allowed = "allowed_directories" if path.is_dir() else "allowed_paths"
                con.execute(f"SET {allowed} = [{_literal(str(Path(path)))}]")
                con.execute("SET enable_external_access = false")
                con.execute("SET lock_configuration = true")
            except duckdb.Error as exc:  # pragma: no cover (settings DuckDB knows)
                con.close()
                self._remove_temp()
                raise DataError(f"{self._where()}: DuckDB refused its settings: {exc}") from None
            self._con = con
            return con

    def _with_view(self) -> duckdb.DuckDBPyConnection:
        """The connection, with the relation's view made (on first use: it reads the file's
        header or schema, and fails on a missing declared column)."""
        import duckdb

        con = self._connect()
        with self._lock:
            if not self._has_view:
                try:
                    con.execute(self._view())
                except duckdb.Error as exc:
                    raise DataError(
                        f"{self._where()}: DuckDB cannot make its view: {exc}"
                    ) from None
                self._has_view = True
                log.debug(
                    "%s: DuckDB view over its %s file", self._where(), self._dataset.path.suffix
                )
        return con

    def _run(
        self, text: str, params: list[object], *, view: bool = True
    ) -> tuple[list[tuple[Any, ...]], list[str]]:
        import duckdb

        con = self._with_view() if view else self._connect()
        cur = con.cursor()
        try:
            cur.execute(text, params)
            names = [d[0] for d in cur.description or []]
            return cur.fetchall(), names
        except duckdb.Error as exc:
            raise DataError(f"{self._where()}: the DuckDB query failed: {exc}") from None
        finally:
            cur.close()

    def execute(self, query: EngineQuery) -> list[tuple[object, ...]]:
        rows, _ = self._run(query.text, list(query.params))
        return [tuple(r) for r in rows]

    def columns(self) -> tuple[str, ...]:
        _, names = self._run(f"SELECT * FROM {self._reader(typed=False)} LIMIT 0", [], view=False)
        return tuple(names)

    def check_values(self) -> None:
        """One scan of the file (DuckDB, in parallel; nothing returns to Python but the first
        offence per check), refusing what the CSV loader always refused: a declared numeric
        value that is not a number or not finite, a categorical value outside the declared
        categories, and, under ``out_of_bounds = "error"``, a value outside the bounds.
        DataError names the row (1-based, the header of a CSV being row 1), the column and
        the value: for the owner's log and ``mpcdp party check``, never for a coordinator.
        Empty cells are NULL (aggregates skip them, as SQL does). Under the default
        ``out_of_bounds = "clip"`` the number of values outside the bounds (which queries
        clamp) goes to the owner's log at WARNING, per column, never the values."""
        checks: list[tuple[str, str, str]] = []  # (column, SQL condition on v, what it means)
        csv = self._dataset.path.suffix == ".csv"

        def text_of(name: str) -> str:  # a CSV cell trimmed, as the view (and loader) trim it
            v = f"CAST({_q(name)} AS VARCHAR)"
            return f"trim({v})" if csv else v

        for c in self._dataset.columns:
            v = text_of(c.name)
            if c.categorical:
                cats = ", ".join(_literal(x) for x in c.categories)
                checks.append((c.name, f"{v} IS NOT NULL AND {v} NOT IN ({cats})", "category"))
                continue
            d = f"TRY_CAST({v} AS DOUBLE)"
            checks.append((c.name, f"{v} IS NOT NULL AND {d} IS NULL", "number"))
            checks.append((c.name, f"isinf({d}) OR isnan({d})", "finite"))
            if c.out_of_bounds == "error":
                checks.append(
                    (c.name, f"{d} < {float(c.lower)!r} OR {d} > {float(c.upper)!r}", "bounds")
                )
        if not checks:
            return
        parts = []
        for name, cond, _ in checks:
            v = text_of(name)
            parts.append(f"arg_min(struct_pack(r := rn, v := {v}), rn) FILTER (WHERE {cond})")
        # values the queries clamp to the bounds ("clip"): counted for the owner's log
        clipped = [
            c for c in self._dataset.columns if not c.categorical and c.out_of_bounds != "error"
        ]
        for c in clipped:
            d = f"TRY_CAST({text_of(c.name)} AS DOUBLE)"
            parts.append(
                f"count(*) FILTER (WHERE {d} < {float(c.lower)!r} OR {d} > {float(c.upper)!r})"
            )
        first = self._dataset.path.suffix == ".csv"
        text = (
            f"SELECT {', '.join(parts)} FROM (SELECT row_number() OVER () AS rn, * "
            f"FROM {self._reader(typed=True)})"
        )
        rows, _ = self._run(text, [], view=False)
        for (name, _, kind), hit in zip(checks, rows[0][: len(checks)], strict=True):
            if hit is None:
                continue
            row = int(hit["r"]) + (1 if first else 0)
            value = hit["v"]
            col = self._dataset.column(name)
            if kind == "bounds":
                why = (
                    f"{float(value):g} is outside the declared bounds "
                    f"[{col.lower:g}, {col.upper:g}]"
                )
            elif kind == "category":
                why = f"{value!r} is not one of the declared categories {list(col.categories)}"
            else:
                why = f"{value!r} is not {'a number' if kind == 'number' else 'finite'}"
            raise DataError(f"{self._dataset.path}: row {row} column {name!r}: {why}")
        for c, n in zip(clipped, rows[0][len(checks) :], strict=True):
            if n:  # the count only, as the CSV loader logged it: never the values or rows
                log.warning(
                    "%s: clipped %d value(s) of column %r to its bounds",
                    self._dataset.path,
                    n,
                    c.name,
                )

    def _remove_temp(self) -> None:
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None
                self._has_view = False
            self._remove_temp()
