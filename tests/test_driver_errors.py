"""
Errors raised by the driver's own cursors, which the hot path reads blocks of events through,
are reported as the store's errors, as those of SQLAlchemy's statements are.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from twisted.internet.task import Clock

from relayer.errors import StoreError, StoreUnavailable
from relayer.store import SQLStore
from relayer.store.base import EventBatch, Transaction
from relayer.testing import open_store
from tests._support import database_engine, result_of


def _store(db_path: Path | str) -> Any:
    store = open_store(Clock(), db_path)
    result_of(store.open())
    result_of(store.register_targets(["t"]))
    result_of(store.add_events(EventBatch([b'{"n":1}'], [("t", [0])]), 1.0))
    return store


class _Failing:
    """A driver cursor whose ``execute`` raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def execute(self, *args: Any) -> None:
        raise self.error

    def close(self) -> None:
        pass


def _failure_of(store: Any, method: str, *args: Any) -> Any:
    failures: list[Any] = []
    getattr(store, method)(*args).addErrback(failures.append)
    assert len(failures) == 1, f"{method} did not fail"
    return failures[0]


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        # The store is unavailable: the step is retried later, as any that found it so.
        (sqlite3.OperationalError("disk I/O error"), True),
        # Any other error of the database is a StoreError, as SQLAlchemy's statements give.
        (sqlite3.DatabaseError("file is not a database"), False),
    ],
)
def test_an_error_of_a_driver_cursor_is_classified_as_the_store_s(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, unavailable: bool
) -> None:
    store = _store(db_path)
    try:
        monkeypatch.setattr(SQLStore, "_block_cursor", lambda self, conn: _Failing(error))
        failure = _failure_of(store, "claim", "t", 10, 10**6, 2.0)
        assert failure.check(StoreError), failure
        assert bool(failure.check(StoreUnavailable)) is unavailable, failure
        assert str(error) in str(failure.value)
        monkeypatch.undo()
        # Nothing was claimed: the next step forms the transaction.
        txn = result_of(store.claim("t", 10, 10**6, 3.0))
        assert isinstance(txn, Transaction) and list(txn.events) == [b'{"n":1}']
    finally:
        result_of(store.close())


@pytest.mark.postgres_only
def test_a_connection_lost_under_a_driver_cursor_is_replaced_and_the_step_run_again(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relayer.store.postgres import PostgresStore

    store = _store(db_path)
    killed: list[int] = []
    real = PostgresStore._block_cursor

    def killing(self: PostgresStore, conn: sa.Connection) -> Any:
        # The first time, the server ends the connection just before the blocks are read
        # through the driver's cursor.
        if not killed:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            assert isinstance(pid, int)
            engine = database_engine(db_path)
            try:
                with engine.connect() as other:
                    ended = other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                    assert ended.scalar()
            finally:
                engine.dispose()
            killed.append(pid)
        return real(self, conn)

    monkeypatch.setattr(PostgresStore, "_block_cursor", killing)
    try:
        txn = result_of(store.claim("t", 10, 10**6, 2.0))
        assert killed
        assert isinstance(txn, Transaction) and list(txn.events) == [b'{"n":1}']
        # On a connection of its own: the one that was lost went out of the pool.
        pid = result_of(
            store._run(lambda conn: conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
        )
        assert pid != killed[0]
    finally:
        result_of(store.close())


@pytest.mark.postgres_only
def test_a_connection_lost_twice_under_a_driver_cursor_is_the_store_being_unavailable(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from relayer.store.postgres import PostgresStore

    def lost(self: PostgresStore, conn: sa.Connection) -> Any:
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.close()  # as a dead server leaves it: closed under the store's feet
        return _Failing(psycopg.OperationalError("the connection is closed"))

    store = _store(db_path)
    try:
        monkeypatch.setattr(PostgresStore, "_block_cursor", lost)
        failure = _failure_of(store, "claim", "t", 10, 10**6, 2.0)
        assert failure.check(StoreUnavailable), failure
        monkeypatch.undo()
        txn = result_of(store.claim("t", 10, 10**6, 3.0))
        assert isinstance(txn, Transaction) and list(txn.events) == [b'{"n":1}']
    finally:
        result_of(store.close())
