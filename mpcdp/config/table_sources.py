"""Where a table dataset's rows are, as party.toml declares them: a file for DuckDB
(``path``), a PostgreSQL table (``url`` and ``table``) or Spark (``spark_master`` with
``path`` or ``table``), and its privacy unit with the contribution bounds (docs/queries.md).
Every name is checked here, before any engine sees it; a URL's password never reaches an
error message or a log line (:func:`redact_url`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mpcdp.config.reader import Reader

__all__ = [
    "GLOB",
    "SOURCE_KEYS",
    "TABLE_SUFFIXES",
    "UNIT_KEYS",
    "SourceKind",
    "read_engine_source",
    "read_unit",
    "redact_url",
    "refuse_table_keys",
]

#: the engine that runs a table dataset's SQL (mpcdp.data): DuckDB for files, PostgreSQL,
#: Spark
SourceKind = Literal["duckdb", "postgres", "spark"]
#: the file suffixes of a table that DuckDB reads
TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
#: keys that say where a table dataset's data is, other than path
SOURCE_KEYS = ("url", "table", "spark_master")
#: keys of a table dataset's privacy unit and its contribution bounds
UNIT_KEYS = ("privacy_unit", "max_rows_per_unit", "max_groups_per_unit", "max_parties_per_unit")
#: the largest contribution bound (engines count in 32-bit integers)
_MAX_PER_UNIT = 2**31 - 1
#: characters DuckDB's file readers take for a glob pattern
GLOB = re.compile(r"[*?\[]")
#: one part of a PostgreSQL or Spark table name (quoted as written: case matters)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SPARK_MASTER = re.compile(
    r"local(\[(\*|[1-9][0-9]{0,3})(,[1-9][0-9]{0,3})?\])?|yarn|(spark|k8s)://\S+"
)


def refuse_table_keys(r: Reader, what: str) -> None:
    for key in (*SOURCE_KEYS, *UNIT_KEYS):
        if key in r.data:
            raise r.error(key, f"applies to table datasets, not to {what}")


def read_unit(r: Reader) -> dict[str, Any]:
    """privacy_unit and the contribution bounds of a table dataset."""
    unit = r.get("privacy_unit", str, None)
    if unit is not None and not re.fullmatch(r"[^\x00-\x1f\x7f\"`]{1,128}", unit):
        raise r.error(
            "privacy_unit",
            f"{unit!r} is not a usable column name (1 to 128 characters, no control "
            "character, double quote or backtick)",
        )
    out: dict[str, Any] = {"privacy_unit": unit}
    for key in UNIT_KEYS[1:]:
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


def read_engine_source(r: Reader) -> tuple[SourceKind, Path, str | None, str | None, str | None]:
    """A table dataset read by PostgreSQL (url, table) or Spark (spark_master, path or
    table): (engine, path, url, table, spark_master). Exactly one of path, url and
    spark_master says where the data is; a PostgreSQL table, or a Spark catalog one, has
    path = the folder of party.toml (unused)."""
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
    if "url" in r.data:
        url = _postgres_url(r)
        return "postgres", path, url, _table_name(r, parts=(2, 2), form="schema.name"), None
    if "spark_master" not in r.data:
        raise r.error(
            "table", "needs url (PostgreSQL) or spark_master (Spark); a file is declared by path"
        )
    master = r.get("spark_master", str)
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
    if "table" in r.data:
        table = _table_name(r, parts=(1, 3), form="name, db.name or catalog.db.name")
        return "spark", path, None, table, str(master)
    path = r.path_of("path")
    if path.suffix in (".csv", ".jsonl", ".ndjson", ".npy", ".npz"):
        raise r.error("path", f"Spark reads Parquet here, got {path.name!r}")
    return "spark", path, None, None, str(master)
