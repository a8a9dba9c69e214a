"""
Shared fixtures.

Tests take their database from ``RELAYER_TEST_DATABASE_URL``. Unset, each test gets a fresh
SQLite file; set to a ``postgresql://`` URL, each test gets a fresh schema in that database,
dropped when the test ends.

On PostgreSQL, a store that opens on an empty schema creates relayer's tables by running the
statements that :func:`relayer.store.schema.upgrade` ran on an empty schema once earlier in the
session (:class:`_RecordedUpgrade`), rather than running every migration from version 0 again.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
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


def _uses_the_database(item: pytest.Item) -> bool:
    """
    Whether a test runs against the database under test: through the ``db_path`` fixture, as a
    test that needs PostgreSQL, or in a module that looks at which database this run is on.
    """
    if "db_path" in getattr(item, "fixturenames", ()) or item.get_closest_marker("postgres_only"):
        return True
    module = getattr(item, "module", None)
    return module is not None and (hasattr(module, "POSTGRES") or hasattr(module, "DATABASE_URL"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if POSTGRES and item.get_closest_marker("sqlite_only"):
            item.add_marker(pytest.mark.skip(reason="about SQLite; this run is on PostgreSQL"))
        elif POSTGRES and not _uses_the_database(item):
            # The test never touches the database under test (it runs on a SQLite file of its
            # own, in memory, or on no database at all): the run on SQLite has run it as is.
            item.add_marker(
                pytest.mark.skip(reason="uses no PostgreSQL; the run on SQLite runs it as is")
            )
        if not POSTGRES and item.get_closest_marker("postgres_only"):
            item.add_marker(
                pytest.mark.skip(reason="needs PostgreSQL: set RELAYER_TEST_DATABASE_URL")
            )


def _admin_engine() -> sa.Engine:
    url = sa.make_url(DATABASE_URL).set(drivername="postgresql+psycopg")
    return sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")


_admin: sa.Engine | None = None


def _shared_admin_engine() -> sa.Engine:
    """
    One admin engine for the session's fixtures, which keeps its connection between uses (a
    new connection is a new server process): checked before each use, and replaced if a test
    ended it.
    """
    global _admin
    if _admin is None:
        url = sa.make_url(DATABASE_URL).set(drivername="postgresql+psycopg")
        _admin = sa.create_engine(
            url, pool_size=1, max_overflow=2, pool_pre_ping=True, isolation_level="AUTOCOMMIT"
        )
    return _admin


class _RecordedUpgrade:
    """
    :func:`relayer.store.schema.upgrade`, made quick on an empty PostgreSQL schema.

    The first time it is called, the real upgrade creates the current schema in an empty
    scratch schema, and the statements it sends are recorded. Each later upgrade of an empty
    schema to the current version runs the recorded statements that change anything (all but
    the reads, which found nothing), in the same order, on the caller's connection and in its
    transaction, after taking the same advisory lock: the same tables, indexes, sequences and
    rows, without the catalog look-ups and the statement building of every migration from
    version 0. Any other upgrade (from another version, to another version, of a schema that
    is not empty, or on SQLite) is the real one.

    The recording is checked once: replayed in a second scratch schema, it must give what the
    real upgrade gave, as the catalog and the tables' rows show it.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self._recording: tuple[tuple[str, Any], list[tuple[str, Any]]] | None = None
        self._lock = threading.Lock()

    def __call__(self, conn: sa.Connection, *args: Any, **kwargs: Any) -> tuple[int, int]:
        from relayer.store import schema

        to_version = kwargs.get("to_version", args[0] if args else schema.SCHEMA_VERSION)
        if conn.dialect.name != "postgresql" or to_version != schema.SCHEMA_VERSION:
            return self.real(conn, *args, **kwargs)
        lock, writes = self._recorded()
        cursor = conn.connection.cursor()
        try:
            # Processes that start together upgrade one at a time, as in the real upgrade.
            cursor.execute(*lock)
            cursor.execute(
                "SELECT count(*) FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema()"
            )
            row = cursor.fetchone()
            if row is None or row[0] != 0:
                return self.real(conn, *args, **kwargs)
            for statement, parameters in writes:
                cursor.execute(statement, parameters)
        finally:
            cursor.close()
        return 0, to_version

    def _recorded(self) -> tuple[tuple[str, Any], list[tuple[str, Any]]]:
        with self._lock:
            if self._recording is None:
                self._recording = self._record()
            return self._recording

    def _record(self) -> tuple[tuple[str, Any], list[tuple[str, Any]]]:
        from relayer.store import schema

        sent: list[tuple[str, Any]] = []

        def record(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
        ) -> None:
            assert not many, "the upgrade of an empty schema sent an executemany"
            sent.append((statement, parameters))

        with _scratch_schema() as real_engine, _scratch_schema() as replay_engine:
            sa.event.listen(real_engine, "before_cursor_execute", record)
            with real_engine.begin() as conn:
                assert self.real(conn) == (0, schema.SCHEMA_VERSION)
            sa.event.remove(real_engine, "before_cursor_execute", record)
            locks = [w for w in sent if "pg_advisory_xact_lock" in w[0]]
            writes = [w for w in sent if not w[0].lstrip().upper().startswith("SELECT")]
            assert len(locks) == 1 and writes, f"not the upgrade this was written for: {sent}"
            with replay_engine.begin() as conn:
                cursor = conn.connection.cursor()
                for statement, parameters in writes:
                    cursor.execute(statement, parameters)
                cursor.close()
            with real_engine.connect() as real, replay_engine.connect() as replayed:
                assert _contents(replayed) == _contents(real), (
                    "replaying the statements of an upgrade of an empty schema did not give the "
                    "schema that the upgrade made"
                )
        return locks[0], writes


@contextlib.contextmanager
def _scratch_schema() -> Iterator[sa.Engine]:
    """An engine on a new, empty schema, dropped afterwards."""
    name = f"relayer_test_scratch_{uuid.uuid4().hex[:12]}"
    admin = _shared_admin_engine()
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    engine = sa.create_engine(
        sa.make_url(postgres_schema_url(name)).set(drivername="postgresql+psycopg"),
        poolclass=sa.pool.NullPool,
    )
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))


def _contents(conn: sa.Connection) -> list[Any]:
    """
    What the current schema holds: its relations, columns, indexes, constraints, sequences,
    views, and the rows of its tables and sequences.
    """
    queries = [
        "SELECT c.relname, c.relkind FROM pg_catalog.pg_class c "
        "WHERE c.relnamespace = current_schema()::regnamespace ORDER BY 1",
        "SELECT table_name, column_name, ordinal_position, data_type, is_nullable, "
        "column_default, character_maximum_length FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY 1, 3",
        "SELECT tablename, indexname, replace(indexdef, schemaname || '.', '') "
        "FROM pg_catalog.pg_indexes WHERE schemaname = current_schema() ORDER BY 1, 2",
        "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) "
        "FROM pg_catalog.pg_constraint "
        "WHERE connamespace = current_schema()::regnamespace ORDER BY 1, 2",
        "SELECT sequence_name, data_type, start_value, increment, maximum_value "
        "FROM information_schema.sequences WHERE sequence_schema = current_schema() ORDER BY 1",
        "SELECT viewname, definition FROM pg_catalog.pg_views "
        "WHERE schemaname = current_schema() ORDER BY 1",
    ]
    found: list[Any] = [conn.execute(sa.text(q)).all() for q in queries]
    for name, kind in found[0]:
        if kind in ("r", "p", "S"):
            rows = f'SELECT * FROM "{name}"' + (" ORDER BY 1" if kind != "S" else "")
            found.append((name, conn.execute(sa.text(rows)).all()))
    return found


if POSTGRES:
    from relayer.store import schema as _schema

    # Once only: this file imported again under another name (``tests.conftest``) would wrap
    # the recorded upgrade in a second one, whose recording would then see no statements.
    if not hasattr(_schema.upgrade, "real"):
        _schema.upgrade = _RecordedUpgrade(_schema.upgrade)  # type: ignore[assignment]


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
