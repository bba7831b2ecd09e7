"""The real PostgreSQL cluster of tests/servers.py, for running the rendered SQL."""

from tests.servers import postgres_server

__all__ = ["postgres_server"]
