"""
Shared fixtures.

Tests take their database from ``RELAYER_TEST_DATABASE_URL``. Unset, each test gets a fresh
SQLite file; set to a ``postgresql://`` URL, each test gets a fresh schema in that database,
dropped when the test ends.
"""

from __future__ import annotations

import gc
import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from twisted.logger import ILogObserver, LogEvent, globalLogBeginner
from zope.interface import provider

DATABASE_URL = os.environ.get("RELAYER_TEST_DATABASE_URL", "")
POSTGRES = DATABASE_URL.startswith("postgresql")


def pytest_report_header() -> str:
    if POSTGRES:
        return f"relayer test database: {sa.make_url(DATABASE_URL).render_as_string()}"
    return "relayer test database: a SQLite file per test"


@provider(ILogObserver)
def _nowhere(event: LogEvent) -> None:
    """The test process's primary log observer: the tests that read logs add their own."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: the test is about SQLite itself")
    config.addinivalue_line("markers", "postgres_only: the test needs PostgreSQL")
    # Until a process begins logging, Twisted keeps its last 65,536 log events in memory, and
    # each event its source: a scheduler, its store and the store's database connections, for
    # tests that have long ended. Begin logging, to nowhere; Python's warnings stay pytest's.
    showwarning = warnings.showwarning
    globalLogBeginner.beginLoggingTo([_nowhere], discardBuffer=True, redirectStandardIO=False)
    warnings.showwarning = showwarning


def pytest_collection_finish(session: pytest.Session) -> None:
    # What the imports and the collection made lives as long as the session: leave it out of
    # every collection from now on, which then looks at what the tests made (see db_path).
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if POSTGRES and item.get_closest_marker("sqlite_only"):
            item.add_marker(pytest.mark.skip(reason="about SQLite; this run is on PostgreSQL"))
        if not POSTGRES and item.get_closest_marker("postgres_only"):
            item.add_marker(
                pytest.mark.skip(reason="needs PostgreSQL: set RELAYER_TEST_DATABASE_URL")
            )


def _admin_engine() -> sa.Engine:
    url = sa.make_url(DATABASE_URL).set(drivername="postgresql+psycopg")
    return sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")


_admin: sa.Engine | None = None


def _shared_admin_engine() -> sa.Engine:
    """One admin engine for the session's fixtures: each use still opens its own connection."""
    global _admin
    if _admin is None:
        _admin = _admin_engine()
    return _admin


def postgres_schema_url(schema: str) -> str:
    """The test database URL, with ``schema`` as the search path."""
    url = sa.make_url(DATABASE_URL)
    query = dict(url.query)
    query["options"] = f"-csearch_path={schema}"
    return url.set(query=query).render_as_string(hide_password=False)


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path | str]:
    """The database for one test: a SQLite file, or a PostgreSQL URL with a fresh schema."""
    if not POSTGRES:
        yield tmp_path / "relayer.db"
        return
    schema = f"relayer_test_{uuid.uuid4().hex[:12]}"
    engine = _shared_admin_engine()
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield postgres_schema_url(schema)
    finally:
        # Stores that a test abandoned (as a crashed process would) close their connections
        # once they are collected.
        gc.collect()
        with engine.connect() as conn:
            # Connections a test abandoned must not keep the schema alive, nor, piling up
            # over the suite, use up the server's connections.
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND query ILIKE :pattern"
                ),
                {"pattern": f"%{quote(schema)}%"},
            )
            # Among them, the connections that hold a scheduler's process lock on the schema.
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND pid <> pg_backend_pid() "
                    "AND classid = (hashtext('relayer process')::bigint & 4294967295)::oid "
                    "AND objid = (hashtext(:schema)::bigint & 4294967295)::oid"
                ),
                {"schema": schema},
            )
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
