"""
The SQLite store: relayer's embedded default.

The database is one file, in WAL mode, written by a single thread. Every write transaction
begins with ``BEGIN IMMEDIATE``, so that it takes the write lock up front rather than failing
half-way when another connection holds it, and waits up to ``busy_timeout`` for that lock.

Reads that change nothing (status, dead letters, loading targets, and registering targets that
are registered already) run on a connection of their own, on a thread of their own, in
transactions that begin with a plain (deferred) ``BEGIN``: WAL lets them read a consistent
snapshot beside the writer, so they never wait for its lock, and never hold up its work.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads

from relayer.dbpool import DatabasePool, ThreadedDatabasePool
from relayer.errors import ConfigurationError, DatabaseInUse
from relayer.store._group import GroupCommit
from relayer.store.sql import SQLStore

T = TypeVar("T")

_SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")


def sqlite_engine(path: str, synchronous: str = "FULL", busy_timeout_ms: int = 10_000) -> sa.Engine:
    """
    Make a SQLAlchemy engine for a SQLite file, set up as relayer wants it.

    Args:
        path: The database file. It is created if it does not exist.
        synchronous: SQLite's ``synchronous`` setting. ``FULL`` (the default) makes every
            acknowledged event survive a power loss; ``NORMAL`` survives a crash of the process
            (even ``kill -9``) but may lose the last commits on a power loss, and is faster.
        busy_timeout_ms: How long a transaction waits for another connection's lock.
    """
    if synchronous.upper() not in _SYNCHRONOUS:
        raise ConfigurationError(
            f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {synchronous!r}"
        )
    if not isinstance(busy_timeout_ms, int) or busy_timeout_ms < 0:
        raise ConfigurationError(f"busy_timeout_ms must be an int >= 0, not {busy_timeout_ms!r}")
    return _engine(
        os.fspath(path),
        [
            f"PRAGMA busy_timeout = {busy_timeout_ms}",
            # Transaction bodies are large blobs: 16 KiB pages write them in a quarter of the
            # page writes that 4 KiB pages take (docs/performance.md). This only takes effect
            # when the file is created; an existing file keeps its page size.
            "PRAGMA page_size = 16384",
            "PRAGMA journal_mode = WAL",
            f"PRAGMA synchronous = {synchronous.upper()}",
        ],
        # Takes the write lock up front, rather than failing half-way.
        "BEGIN IMMEDIATE",
    )


def _sqlite_read_engine(path: str, busy_timeout_ms: int) -> sa.Engine:
    """An engine for the read connection: its transactions begin DEFERRED and only read."""
    return _engine(
        path,
        [
            # The writer sets up the file (WAL, page size) before any read runs; a reader
            # waits for a lock only while the WAL is recovered after a crash.
            f"PRAGMA busy_timeout = {busy_timeout_ms}",
            "PRAGMA query_only = ON",
        ],
        # Deferred: no lock is taken until the first read, and then only a shared one.
        "BEGIN",
    )


def _engine(path: str, pragmas: list[str], begin: str) -> sa.Engine:
    """An engine of one connection that runs ``pragmas`` when it connects and ``begin``."""
    engine = sa.create_engine(
        f"sqlite:///{path}", poolclass=sa.pool.QueuePool, pool_size=1, max_overflow=0
    )

    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN, instead of the driver.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


class SQLiteStore(SQLStore):
    """
    A store in a SQLite file.

    Make one with :meth:`open_path`; tests pass an inline pool instead of a thread pool.

    Its single database thread uses group commit (:mod:`relayer.store._group`): the units of
    work that wait while it is busy run together in one database transaction, with one commit
    (one fsync) for all of them, and each reports its result only after that commit.

    Reads run on ``read_engine`` (deferred transactions, beside the writer) and ``read_pool``:
    by default the writer's engine and pool.
    """

    def __init__(
        self,
        engine: sa.Engine,
        pool: DatabasePool,
        lease_pool: DatabasePool | None = None,
        *,
        read_engine: sa.Engine | None = None,
        read_pool: DatabasePool | None = None,
    ) -> None:
        super().__init__(engine, pool, lease_pool, read_engine=read_engine, read_pool=read_pool)
        self._group = GroupCommit(super()._run)
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> str | None:
        """The lock file beside the database (``relayer.db-relayer.lock``); None in memory."""
        path = self._engine.url.database
        if not path or path == ":memory:" or path.startswith("file:"):
            return None
        return path + "-relayer.lock"

    def hold_process_lock(self, shared: bool) -> Deferred[None]:
        """
        Hold an ``flock`` on the lock file beside the database until :meth:`close`.

        The kernel releases it when the process dies, however it dies.
        """
        path = self.lock_path
        if path is None or self._lock_fd is not None:
            return succeed(None)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return fail(DatabaseInUse(_in_use_message(shared, path)))
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        return succeed(None)

    def release_process_lock(self) -> None:
        """
        Release the process lock at once, as the kernel does when the process dies.

        For tests that simulate a crash by abandoning a store and opening another on the same
        database in the same process; :meth:`close` releases it too.
        """
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _run(
        self, f: Callable[..., T], *args: Any, pool: DatabasePool | None = None
    ) -> Deferred[T]:
        if pool is not None and pool is not self._pool:
            return super()._run(f, *args, pool=pool)
        return self._group.run(f, *args)

    def close(self) -> Deferred[None]:
        async def close() -> None:
            # Work handed over before close() runs before the database is closed.
            await self._group.idle()
            try:
                await super(SQLiteStore, self).close()
            finally:
                self.release_process_lock()

        return Deferred.fromCoroutine(close())

    @classmethod
    def open_path(
        cls,
        reactor: IReactorFromThreads,
        path: str | os.PathLike[str],
        *,
        pool: DatabasePool | None = None,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
    ) -> SQLiteStore:
        """
        A store in the SQLite file at ``path``, created if it does not exist.

        Args:
            reactor: The reactor that database results are delivered to.
            path: The database file.
            pool: Where database work runs; by default a dedicated single-thread pool for
                writes, and another single thread for reads. A pool given here runs both, reads
                on a read connection of their own all the same.
            synchronous: SQLite's ``synchronous`` setting; see :func:`sqlite_engine`.
            busy_timeout_ms: How long a transaction waits for another connection's lock
                before it fails (and is retried).
        """
        engine = sqlite_engine(
            os.fspath(path), synchronous=synchronous, busy_timeout_ms=busy_timeout_ms
        )
        read_engine = _sqlite_read_engine(os.fspath(path), busy_timeout_ms)
        read_pool: DatabasePool | None = None
        if pool is None:
            pool = ThreadedDatabasePool(reactor)
            read_pool = ThreadedDatabasePool(reactor, name="relayer-db-read")
        return cls(engine, pool, read_engine=read_engine, read_pool=read_pool)


def _in_use_message(shared: bool, where: str) -> str:
    """Why a process lock was refused, and what to do."""
    if shared:
        why = "a relayer scheduler without leases uses this database"
    else:
        why = "another relayer scheduler uses this database"
    return (
        f"{why} (lock {where}): a scheduler without leases must be alone on its database, "
        "since it claims work without locking it. Stop the other process, or give every "
        "process leases=LeaseSettings() so that they share the targets"
    )
