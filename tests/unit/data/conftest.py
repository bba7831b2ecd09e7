"""The real servers of the data-source tests (tests/servers.py): one PostgreSQL cluster and
one local Spark session per pytest process, started on first use."""

from tests.servers import postgres_server, spark_session

__all__ = ["postgres_server", "spark_session"]
