"""A party's table in Spark: a Parquet file or folder, or a catalog table, queried with Spark
SQL (pyspark, the ``spark`` extra; a Java 17+ runtime).

Why: some organisations keep their data in a Spark lake; Spark aggregates it on its workers
and only the per-cell aggregates come back to the party (docs/queries.md, "Data sources").
The party stays one process: it is the Spark driver.

pyspark is imported inside the functions, never at import time. The SparkSession starts on
the first query with the dataset's ``spark_master`` (no web UI, few shuffle partitions, logs
at ERROR; a local master binds the driver to 127.0.0.1). Spark allows one session per
process, so every Spark dataset of a party must name the same master. The relation is a
temporary view (named from a hash of the dataset name) over the Parquet data or the catalog
table, with the declared numeric columns cast to double and the categorical ones (and the
privacy unit) to string. A query runs as ``spark.sql(text, args=[...])``: its constants are
positional parameters, bound by Spark, never spliced into the text.

What is revealed: errors are DataError naming the dataset, with Spark's message for the
owner's log (it may quote a value or a path); a coordinator only learns "unavailable".
"""

from __future__ import annotations

import hashlib
import logging
import threading
from decimal import Decimal
from typing import TYPE_CHECKING

from mpcdp.config.party_config import DatasetConfig
from mpcdp.config.table_sources import SourceKind
from mpcdp.data.table_source import EngineOptions, quote_identifier
from mpcdp.errors import DataError
from mpcdp.sql.render import EngineQuery

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["SparkSource"]

log = logging.getLogger(__name__)


def _plain(value: object) -> object:
    return float(value) if isinstance(value, Decimal) else value


def _q(name: str) -> str:
    return quote_identifier(name, dialect="spark")


def _errors(*extra: type[Exception]) -> tuple[type[Exception], ...]:
    """What pyspark raises: its own errors (AnalysisException, a failed start) and py4j's
    (an error in the JVM), and ``extra``."""
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    return (PySparkException, Py4JError, *extra)


class SparkSource:
    """The Parquet data (``path``) or catalog table (``table``) of ``dataset`` in Spark."""

    def __init__(self, *, dataset: DatasetConfig, options: EngineOptions) -> None:
        if dataset.source != "spark" or not dataset.spark_master:
            raise DataError(f"dataset {dataset.name!r}: not a Spark dataset (spark_master)")
        self._dataset = dataset
        self._master = dataset.spark_master
        self._options = options
        digest = hashlib.sha256(dataset.name.encode()).hexdigest()[:16]
        self._view = f"mpcdp_{digest}"
        self._relation = _q(self._view)
        self._lock = threading.Lock()
        self._spark: SparkSession | None = None
        self._has_view = False

    @property
    def dialect(self) -> SourceKind:
        return "spark"

    @property
    def relation(self) -> str:
        return self._relation

    def _where(self) -> str:
        return f"dataset {self._dataset.name!r}"

    def _fail(self, what: str, exc: Exception) -> DataError:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "JAVA_GATEWAY_EXITED" in text or "JAVA_HOME" in text:
            hint = " (is a Java 17+ runtime installed, and JAVA_HOME set?)"
        return DataError(f"{self._where()}: {what}: {text}{hint}")

    def _session(self) -> SparkSession:
        """The process's SparkSession, started on first use with this dataset's master."""
        if self._spark is not None:
            return self._spark
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise DataError(
                f"{self._where()}: pyspark is not installed (pip install 'mpcdp[spark]')"
            ) from None
        builder = (
            SparkSession.builder.master(self._master)
            .appName("mpcdp-party")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", str(self._options.shuffle_partitions))
        )
        if self._master.startswith("local"):
            builder = builder.config("spark.driver.bindAddress", "127.0.0.1").config(
                "spark.driver.host", "127.0.0.1"
            )
        try:
            spark = builder.getOrCreate()
            spark.sparkContext.setLogLevel("ERROR")
        except _errors(OSError) as exc:  # OSError: no java executable at all
            raise self._fail("cannot start Spark", exc) from None
        master = spark.sparkContext.master  # getOrCreate returns a running session as it is
        if master != self._master:
            raise DataError(
                f"{self._where()}: spark_master {self._master!r}, but this process already "
                f"runs a Spark session on {master!r} (one per process)"
            )
        log.debug("%s: Spark session on %s", self._where(), self._master)
        self._spark = spark
        return spark

    def _frame(self, spark: SparkSession) -> DataFrame:
        """The data as Spark reads it (the schema only, until an action)."""
        if self._dataset.table is not None:
            return spark.table(".".join(_q(p) for p in self._dataset.table.split(".")))
        return spark.read.parquet(str(self._dataset.path))

    def _names(self) -> list[str]:
        names = [c.name for c in self._dataset.columns]
        unit = self._dataset.privacy_unit
        if unit is not None and unit not in names:
            names.append(unit)
        return names

    def _with_view(self) -> SparkSession:
        with self._lock:
            spark = self._session()
            if self._has_view:
                return spark
            from pyspark.sql import functions as F

            numeric = {c.name for c in self._dataset.columns if not c.categorical}
            try:
                frame = self._frame(spark)
                casts = [
                    F.col(_q(n)).cast("double" if n in numeric else "string").alias(n)
                    for n in self._names()
                ]
                frame.select(*casts).createOrReplaceTempView(self._view)
            except _errors() as exc:
                raise self._fail("Spark cannot make its view", exc) from None
            self._has_view = True
            return spark

    def execute(self, query: EngineQuery) -> list[tuple[object, ...]]:
        spark = self._with_view()
        try:
            rows = spark.sql(query.text, args=list(query.params)).collect()
        except _errors() as exc:
            raise self._fail("the Spark query failed", exc) from None
        return [tuple(_plain(v) for v in row) for row in rows]

    def columns(self) -> tuple[str, ...]:
        with self._lock:
            spark = self._session()
            try:
                return tuple(self._frame(spark).columns)
            except _errors() as exc:
                raise self._fail("Spark cannot read its schema", exc) from None

    def close(self) -> None:
        """Drop the view; the session stays for the process's other Spark datasets."""
        with self._lock:
            if self._spark is not None and self._has_view:
                try:
                    self._spark.catalog.dropTempView(self._view)
                except _errors():  # a session stopped meanwhile has no views left
                    log.debug("%s: Spark view already gone", self._where())
            self._has_view = False
            self._spark = None
