"""
The PostgreSQL store: for production, and for several relayer processes sharing one database.

It runs the same SQL as the SQLite store, through SQLAlchemy and psycopg 3, on a pool of
database threads (one connection each). Transactions run at READ COMMITTED; every operation
that must not race (allocating a transaction id, claiming a target's next transaction, taking a
lease) does so under a row lock.

When events are stored, the store sends ``NOTIFY`` on a channel of its own, so that the process
that owns the target, which listens on that channel, wakes at once without polling; a store
that holds the exclusive process lock (a scheduler without leases, alone on the schema) sends
none, since no other scheduler may run there to hear it.

Round trips to the server are what a transaction mostly waits for, so the store holds back the
writes whose results it does not need, and its lease checks, and sends them in one pipeline
(psycopg's pipeline mode) with the transaction's next statement or its commit; a lease check
is looked at as soon as its answer is in, and always before anything is committed.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import attrs
import sqlalchemy as sa
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from relayer import _logevents as ev
from relayer.config import BackoffPolicy
from relayer.dbpool import DatabasePool, ThreadedDatabasePool
from relayer.errors import ConfigurationError, DatabaseInUse, LeaseLost, StoreUnavailable
from relayer.store import schema as _schema
from relayer.store.sql import _HEAD_TXN, SQLStore
from relayer.store.sqlite import _in_use_message

#: The most bytes a NOTIFY payload may carry (PostgreSQL's limit is 8000).
_MAX_PAYLOAD = 7000
#: The process lock: a session advisory lock keyed by relayer and the schema in use.
_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext('relayer process'), hashtext(%s))"
_TRY_LOCK_SHARED = "SELECT pg_try_advisory_lock_shared(hashtext('relayer process'), hashtext(%s))"

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

#: A connection handed back to the pool less than this many seconds ago is handed out again
#: without a ping: its socket has just been used. One idle for longer is pinged first.
PING_AFTER_IDLE = 1.0
_CHECKED_IN = "relayer.checked_in"

#: Compress large values (the blocks of event bodies) with LZ4 rather than pglz, where the
#: server has it (PostgreSQL 14 and later, built with lz4): it costs the server a fraction of
#: the CPU time, to read as to write. A session setting; the tables are not changed, and values
#: stored either way are read alike.
_LZ4 = (
    "SELECT set_config('default_toast_compression', 'lz4', false) FROM pg_settings "
    "WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
)

# Writes held back until the transaction's next statement or its commit (see
# PostgresStore._write), and the pipeline they were sent in, in the connection's info.
_HELD = "relayer.held_writes"
_PIPELINE = "relayer.pipeline"
# The lease checks sent in that pipeline, whose rows are looked at once it is synced.
_CHECKS = "relayer.lease_checks"
# How many statements the transaction has run so far, and the head of a queue read ahead.
_COUNT = "relayer.statements"
_AHEAD = "relayer.read_ahead"


def _send_held(conn: sa.Connection) -> None:
    """Enter pipeline mode, and send the writes held back; their results come at the sync."""
    held = conn.info.pop(_HELD, None)
    if not held:
        return
    raw: Any = conn.connection.driver_connection
    pipeline = raw.pipeline()
    pipeline.__enter__()
    conn.info[_PIPELINE] = pipeline
    cursor = raw.cursor()
    # The engine's other listeners (instrumentation, tests' fault injection) see each statement
    # as it is sent, as they see those that SQLAlchemy sends.
    listeners = [fn for fn in conn.dispatch.before_cursor_execute if fn is not _before_execute]
    for sql, params, many in held:
        for fn in listeners:
            fn(conn, cursor, sql, params, None, many is True)
        if isinstance(many, (_LeaseCheck, _ReadAhead)):
            # A cursor of its own, whose rows are looked at after the sync.
            many.cursor = raw.cursor()
            many.cursor.execute(sql, params)
            if isinstance(many, _LeaseCheck):
                conn.info.setdefault(_CHECKS, []).append(many)
        elif many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)


def _sync(conn: sa.Connection) -> None:
    """Leave pipeline mode: wait for every result, and raise the first error among them."""
    pipeline = conn.info.pop(_PIPELINE, None)
    if pipeline is not None:
        pipeline.__exit__(None, None, None)
    for check in conn.info.pop(_CHECKS, ()):
        check.verify()


@attrs.define
class _ReadAhead:
    """The first runs of a target's queue, read in the pipeline of its head transaction's query."""

    target_id: str
    limit: int
    #: The statements run in the transaction once its answer was in: if any more have run
    #: since, the queue may have changed, and it is read again.
    count: int = 0
    cursor: Any = None


@attrs.define
class _LeaseCheck:
    """A lease check sent in a pipeline: it fails the transaction if the lease was lost."""

    owner: str
    target_id: str
    now: float
    cursor: Any = None

    def verify(self) -> None:
        row = self.cursor.fetchone()
        self.cursor.close()
        if row is None or row[0] != self.owner or row[1] <= self.now:
            raise LeaseLost(
                f"this process ({self.owner}) does not hold the lease on {self.target_id!r}"
            )


def _before_execute(conn: sa.Connection, *args: Any) -> None:
    info = conn.info
    info[_COUNT] = info.get(_COUNT, 0) + 1
    # The writes held back go first, in the same pipeline as this statement.
    if info.get(_HELD):
        _send_held(conn)


def _after_execute(conn: sa.Connection, *args: Any) -> None:
    if _PIPELINE in conn.info:
        _sync(conn)


def _forget(conn: sa.Connection) -> None:
    """Drop what is held back and any pipeline left open (after an error, or a rollback)."""
    try:
        info = conn.info
    except sa.exc.SQLAlchemyError:
        # The connection was invalidated (it broke): its info went with it.
        return
    info.pop(_HELD, None)
    info.pop(_CHECKS, None)
    info.pop(_AHEAD, None)
    info.pop(_COUNT, None)
    pipeline = info.pop(_PIPELINE, None)
    if pipeline is not None:
        try:
            pipeline.__exit__(RuntimeError, RuntimeError("abandoned"), None)
        except Exception:  # noqa: BLE001 - the error that got us here is the one reported
            pass


def _on_error(context: Any) -> None:
    conn = context.connection
    if conn is not None:
        _forget(conn)


def _pipelined(engine: sa.Engine) -> None:
    """Set ``engine`` up for writes held back and sent in pipelines (once)."""
    if sa.event.contains(engine, "before_cursor_execute", _before_execute):
        return
    sa.event.listen(engine, "before_cursor_execute", _before_execute)
    sa.event.listen(engine, "after_cursor_execute", _after_execute)
    sa.event.listen(engine, "handle_error", _on_error)
    sa.event.listen(engine, "rollback", _forget)
    sa.event.listen(engine, "begin", _forget)


_l = _schema.leases
_LEASE_CHECK = (
    sa.select(_l.c.owner, _l.c.expires_at)
    .where(_l.c.target_id == sa.bindparam("p_target"))
    .with_for_update()
)

_NOTIFY = sa.select(
    sa.func.pg_notify(
        sa.bindparam("p_channel", type_=sa.String), sa.bindparam("p_payload", type_=sa.String)
    )
)

#: How many runs of a queue one query reads when a transaction is formed.
_RUN_PAGE = 8
_r = _schema.runs
_RUN_COLUMNS = (_r.c.id, _r.c.n_events, _r.c.size, _r.c.seqs, _r.c.oldest_at, _r.c.pos)
_FIRST_RUNS = (
    sa.select(*_RUN_COLUMNS)
    .where(_r.c.target_id == sa.bindparam("p_target"))
    .order_by(_r.c.pos, _r.c.id)
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
)
_NEXT_RUNS = (
    sa.select(*_RUN_COLUMNS)
    .where(
        _r.c.target_id == sa.bindparam("p_target"),
        sa.tuple_(_r.c.pos, _r.c.id) > sa.tuple_(sa.bindparam("p_pos"), sa.bindparam("p_id")),
    )
    .order_by(_r.c.pos, _r.c.id)
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
)


def postgres_url(url: str | sa.URL) -> sa.URL:
    """
    Parse a PostgreSQL URL, choosing the psycopg 3 driver.

    ``postgresql://user:password@host:port/database`` and ``postgresql+psycopg://...`` are both
    accepted.

    Raises:
        ConfigurationError: The URL is not a PostgreSQL URL.
    """
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as e:
        raise ConfigurationError(f"not a database URL: {e}") from None
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}"
        )
    if parsed.drivername != "postgresql+psycopg":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def postgres_engine(
    url: str | sa.URL, *, pool_size: int = 4, schema: str | None = None, connect_timeout: int = 10
) -> sa.Engine:
    """
    Make a SQLAlchemy engine for PostgreSQL, set up as relayer wants it.

    Args:
        url: The database URL.
        pool_size: How many connections to keep; one per database thread.
        schema: A schema to keep relayer's tables in, instead of the default search path; it is
            created if it does not exist.
        connect_timeout: How long connecting may take, in seconds.

    A connection idle for more than :data:`PING_AFTER_IDLE` seconds is checked before use, and
    replaced if broken. Each connection compresses large values with LZ4 where the server has
    it (a session setting).
    """
    if schema is not None and not (isinstance(schema, str) and _SCHEMA_NAME.fullmatch(schema)):
        raise ConfigurationError(f"schema must be a plain SQL identifier, not {schema!r}")
    connect_args: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        # Shown in pg_stat_activity, so operators can tell relayer's connections apart.
        "application_name": "relayer",
    }
    if schema is not None:
        connect_args["options"] = f"-csearch_path={schema}"
    engine = sa.create_engine(
        postgres_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=60,
        isolation_level="READ COMMITTED",
        connect_args=connect_args,
    )

    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(_LZ4)
        finally:
            cursor.close()
        dbapi_connection.commit()

    @sa.event.listens_for(engine, "checkin")
    def on_checkin(dbapi_connection: Any, connection_record: Any) -> None:
        connection_record.info[_CHECKED_IN] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def on_checkout(dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        # Connections are checked before use and replaced when broken, as SQLAlchemy's
        # pool_pre_ping does, but a connection that was in use a moment ago is not pinged: a
        # busy store would otherwise pay a round trip to the server for every transaction. One
        # that broke meanwhile fails the transaction as unavailable, and it is retried.
        since = connection_record.info.get(_CHECKED_IN)
        if since is not None and time.monotonic() - since < PING_AFTER_IDLE:
            return
        if dbapi_connection.closed or dbapi_connection.broken:
            raise sa.exc.DisconnectionError("the connection was closed")
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as e:
            # The pool replaces it with a new connection.
            raise sa.exc.DisconnectionError(f"the connection failed its ping: {e}") from e

    return engine


#: The lock a retention chunk holds, to the end of its transaction: keyed by relayer and the
#: schema in use, as the process lock is, so that the stores of other schemas (other
#: deployments in the same database) never stop each other's runs.
_TRY_RETENTION_LOCK = (
    "SELECT pg_try_advisory_xact_lock(hashtext('relayer retention'), hashtext(current_schema()))"
)


class PostgresStore(SQLStore):
    """
    A store in a PostgreSQL database. Make one with :meth:`open_url`.
    """

    log = Logger(namespace="relayer.store.postgres")

    def __init__(
        self,
        engine: sa.Engine,
        pool: DatabasePool,
        *,
        schema: str | None = None,
        reactor: IReactorFromThreads | None = None,
        lease_pool: DatabasePool | None = None,
    ) -> None:
        # The schema's name is written into SQL (CREATE SCHEMA, LISTEN): a plain identifier only.
        if schema is not None and not (isinstance(schema, str) and _SCHEMA_NAME.fullmatch(schema)):
            raise ConfigurationError(f"schema must be a plain SQL identifier, not {schema!r}")
        super().__init__(engine, pool, lease_pool)
        _pipelined(engine)
        #: Held-back writes' SQL, by statement and parameter names: (SQL, constant parameters),
        #: or None for one that cannot be held back.
        self._compiled: dict[tuple[Any, tuple[str, ...]], tuple[str, dict[str, Any]] | None] = {}
        self._lease_sql: str | None = None
        self._runs_sql: str | None = None
        self._schema = schema
        self._reactor = reactor
        self.channel = f"relayer_events_{schema}" if schema else "relayer_events"
        #: The channel on which operators' commands are announced.
        self.command_channel = f"relayer_commands_{schema}" if schema else "relayer_commands"
        # The connection that holds the process lock, outside the engine's pool.
        self._lock_conn: Any = None
        # Whether this store holds the exclusive process lock: no other scheduler runs on the
        # schema, so that none needs to hear of the events this one stores.
        self._alone = False
        self._lock_guard = threading.Lock()

    def hold_process_lock(self, shared: bool) -> Deferred[None]:
        """
        Hold a session advisory lock, keyed by relayer and the schema, until :meth:`close`.

        It is held on a connection of its own, kept open; PostgreSQL ends the session of a
        client that dies when its socket closes, and the lock with it.
        """
        if self._lock_conn is not None:
            return succeed(None)
        statement = _TRY_LOCK_SHARED if shared else _TRY_LOCK

        def take(conn: sa.Connection) -> None:
            where = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
            dialect = self._engine.dialect
            cargs, cparams = dialect.create_connect_args(self._engine.url)
            # The lock lives as long as this idle session: keepalives let the server notice a
            # dead client, and let this side notice a session that the network dropped.
            cparams.update(keepalives=1, keepalives_idle=30, keepalives_interval=10)
            cparams.setdefault("application_name", "relayer")
            raw = dialect.connect(*cargs, **cparams)
            try:
                raw.autocommit = True
                cursor = raw.cursor()
                cursor.execute(statement, (where,))
                row: Any = cursor.fetchone()
                held = bool(row[0])
                cursor.close()
            except BaseException:
                raw.close()
                raise
            if not held:
                raw.close()
                raise DatabaseInUse(_in_use_message(shared, f"schema {where!r}"))
            with self._lock_guard:
                self._lock_conn = raw
                self._alone = not shared

        return self._run(take)

    def release_process_lock(self) -> None:
        """
        Release the process lock at once, as PostgreSQL does when the process dies.

        For tests that simulate a crash by abandoning a store and opening another on the same
        database in the same process; :meth:`close` releases it too.
        """
        with self._lock_guard:
            raw, self._lock_conn = self._lock_conn, None
            self._alone = False
        if raw is not None:
            raw.close()

    def close(self) -> Deferred[None]:
        async def close() -> None:
            try:
                if self._lock_conn is not None:
                    await self._pool.run(self.release_process_lock)
            finally:
                await super(PostgresStore, self).close()

        return Deferred.fromCoroutine(close())

    @classmethod
    def open_url(
        cls,
        reactor: IReactorFromThreads,
        url: str | sa.URL,
        *,
        pool: DatabasePool | None = None,
        pool_size: int = 4,
        schema: str | None = None,
    ) -> PostgresStore:
        """
        A store in the PostgreSQL database at ``url``.

        Args:
            reactor: The reactor that database results are delivered to.
            url: ``postgresql://user:password@host:port/database``.
            pool: Where database work runs; by default ``pool_size`` dedicated threads, plus one
                thread for lease renewals, so that they never wait behind other work.
            pool_size: How many database threads to use (with one connection each).
            schema: Keep relayer's tables in this schema (created if needed).
        """
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigurationError(f"pool_size must be an int >= 1, not {pool_size!r}")
        lease_pool: DatabasePool | None = None
        if pool is None:
            pool = ThreadedDatabasePool(reactor, threads=pool_size, name="relayer-pg")
            lease_pool = ThreadedDatabasePool(reactor, threads=1, name="relayer-pg-lease")
        # One connection per database thread, and one for the lease thread.
        engine = postgres_engine(url, pool_size=pool_size + 1, schema=schema)
        return cls(engine, pool, schema=schema, reactor=reactor, lease_pool=lease_pool)

    def _where(self) -> str:
        url = self._engine.url
        return f"{url.host or 'localhost'}:{url.port or 5432}"

    def open(self, *, upgrade: bool = True) -> Deferred[None]:
        async def open_() -> None:
            if self._schema is not None and upgrade:
                self._pool.start()
                await self._run(self._create_schema)
            try:
                await super(PostgresStore, self).open(upgrade=upgrade)
            except StoreUnavailable as e:
                url = self._engine.url
                raise StoreUnavailable(
                    f"cannot reach PostgreSQL at {self._where()} (database "
                    f"{url.database!r}, user {url.username!r}): {e}"
                ) from None

        return Deferred.fromCoroutine(open_())

    def _create_schema(self, conn: sa.Connection) -> None:
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"'))

    def _begin_snapshot(self, conn: sa.Connection) -> None:
        # Read committed would give each statement a snapshot of its own.
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def _retention_lock(self, conn: sa.Connection) -> bool:
        # Held to the end of the chunk's transaction: one process purges at a time.
        return bool(conn.execute(sa.text(_TRY_RETENTION_LOCK)).scalar())

    def _allocate_seqs(self, conn: sa.Connection, n: int) -> list[int]:
        # A sequence, rather than a counter row: writers in several processes never wait for
        # each other's commits to number their events. Only the lowest and highest numbers
        # come back: they are all there is to know when no other process drew numbers
        # meanwhile, which is nearly always.
        low, high = conn.execute(
            sa.text(
                "SELECT min(s), max(s) FROM (SELECT nextval('relayer_event_seq') AS s "
                "FROM generate_series(1, :n)) AS drawn"
            ),
            {"n": n},
        ).one()
        if high - low + 1 == n:
            return list(range(low, high + 1))
        # Another process drew numbers in between: draw again, keeping every number this
        # time (those drawn above are left unused; a sequence has gaps anyway).
        return sorted(
            conn.execute(
                sa.text("SELECT nextval('relayer_event_seq') FROM generate_series(1, :n)"),
                {"n": n},
            ).scalars()
        )

    def _write(
        self,
        conn: sa.Connection,
        statement: sa.Executable,
        params: dict[str, Any] | list[dict[str, Any]],
    ) -> None:
        # Held back, and sent in one pipeline with the next statement (or the commit): a
        # transaction's writes then cost no round trips of their own.
        many = isinstance(params, list)
        rows = params if isinstance(params, list) else [params]
        if not rows:
            return
        names = tuple(rows[0])
        key = (statement, names)
        try:
            found = self._compiled[key]
        except KeyError:
            # Compiled as for many rows: an INSERT then asks for no generated keys back.
            compiled = cast(Any, statement).compile(
                dialect=conn.dialect, column_keys=list(names), for_executemany=True
            )
            found = None
            if "POSTCOMPILE" not in compiled.string and not compiled.returning:
                found = (compiled.string, dict(compiled.params))
            self._compiled[key] = found
        if found is None:
            conn.execute(statement, params)
            return
        sql, constants = found
        values: Any = [{**constants, **row} for row in rows] if many else {**constants, **rows[0]}
        conn.info.setdefault(_HELD, []).append((sql, values, many))

    def _write_driver(self, conn: sa.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            conn.info.setdefault(_HELD, []).append((sql, rows, True))

    def _finish(self, conn: sa.Connection) -> None:
        held = conn.info.get(_HELD)
        if not held:
            return
        if any(isinstance(many, _LeaseCheck) for _, _, many in held):
            # A lease check is looked at before anything is committed.
            conn.exec_driver_sql("SELECT 1")
            return
        # What is still held back goes with the COMMIT, in one pipeline; SQLAlchemy's own
        # commit then finds the transaction committed, and has nothing to do.
        conn.exec_driver_sql("COMMIT")

    def _check_lease(self, conn: sa.Connection, target_id: str, now: float) -> None:
        # Sent with the transaction's next statement, under the same row lock as ever, and
        # looked at as soon as its answer is in: before anything is committed, and before
        # the next statement's result is used.
        owner = self.lease_owner
        if owner is None:
            return
        if self._lease_sql is None:
            self._lease_sql = _LEASE_CHECK.compile(dialect=conn.dialect).string
        check = _LeaseCheck(owner, target_id, now)
        conn.info.setdefault(_HELD, []).append((self._lease_sql, {"p_target": target_id}, check))

    def _head_txn(self, conn: sa.Connection, target_id: str, max_events: int) -> Any:
        # The head of the queue is read in the same round trip, in case there is no open
        # transaction (nearly always), when the next one is formed from it.
        if self._runs_sql is None:
            self._runs_sql = _FIRST_RUNS.compile(dialect=conn.dialect).string
        ahead = _ReadAhead(target_id, min(max_events, _RUN_PAGE))
        conn.info.setdefault(_HELD, []).append(
            (self._runs_sql, {"p_target": target_id, "p_limit": ahead.limit}, ahead)
        )
        row = conn.execute(_HEAD_TXN, {"p_target": target_id}).first()
        ahead.count = conn.info.get(_COUNT, 0)
        conn.info[_AHEAD] = ahead
        return row

    def _first_runs(self, conn: sa.Connection, target_id: str, limit: int) -> list[Any]:
        ahead = conn.info.pop(_AHEAD, None)
        if (
            ahead is not None
            and ahead.target_id == target_id
            and ahead.limit == limit
            and ahead.count == conn.info.get(_COUNT, 0)
        ):
            # Nothing has run since it was read: the queue is as it was.
            rows = ahead.cursor.fetchall()
            ahead.cursor.close()
            return list(rows)
        return list(conn.execute(_FIRST_RUNS, {"p_target": target_id, "p_limit": limit}).all())

    def _run_heads(self, conn: sa.Connection, target_id: str, limit: int) -> Iterator[Any]:
        # A few runs at a time, by their place in the queue: no server-side cursor, whose
        # declaring, fetching and closing would each cost a round trip to the server.
        page = self._first_runs(conn, target_id, min(limit, _RUN_PAGE))
        while page:
            for row in page:
                yield row[:5]
            limit -= len(page)
            if limit <= 0 or len(page) < _RUN_PAGE:
                return
            pos, row_id = page[-1][5], page[-1][0]
            page = list(
                conn.execute(
                    _NEXT_RUNS,
                    {
                        "p_target": target_id,
                        "p_pos": pos,
                        "p_id": row_id,
                        "p_limit": min(limit, _RUN_PAGE),
                    },
                ).all()
            )

    def _block_cursor(self, conn: sa.Connection) -> Any:
        if conn.info.get(_HELD):
            # This cursor is the driver's own: what is held back goes first, through
            # SQLAlchemy, which reports its errors as it does any statement's.
            conn.exec_driver_sql("SELECT 1")
        # Results in binary: the bodies come as they are, rather than as hex text that takes
        # twice the bytes and has to be decoded.
        return conn.connection.driver_connection.cursor(binary=True)  # type: ignore[union-attr]

    def _events_added(self, conn: sa.Connection, target_ids: Sequence[str]) -> None:
        if self._alone:
            # The only scheduler on the schema stored them, and its controller hears of them
            # from the store's answer: a NOTIFY would tell nobody anything.
            return
        payload = "\n".join(dict.fromkeys(target_ids))
        if len(payload.encode("utf-8")) > _MAX_PAYLOAD:
            payload = "*"
        self._write(conn, _NOTIFY, {"p_channel": self.channel, "p_payload": payload})

    def _id_order(self, column: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
        # The database's collation may be a language's (en_US sorts "a" before "B"); the
        # bytes of UTF-8 sort by code point, as Python and the scheduler's pages do.
        return column.collate("C")

    def _command_added(self, conn: sa.Connection, target_id: str) -> None:
        conn.execute(sa.select(sa.func.pg_notify(self.command_channel, "")))

    def listen(
        self,
        callback: Callable[[list[str] | None], None],
        commands: Callable[[], None] | None = None,
    ) -> Callable[[], None]:
        """
        Call ``callback`` on the reactor thread whenever events are stored, by any process.

        It is called with the ids of the targets that have new events, or with None when they
        are not known (the notification was too large, or notifications may have been missed
        while the listening connection was being re-established).

        Args:
            callback: Called when events are stored.
            commands: Called, if given, whenever a process records an operator's command
                (:meth:`add_command`), and after the listening connection was re-established.

        Returns:
            A function that stops listening.
        """
        if not IReactorFromThreads.providedBy(self._reactor):
            raise ConfigurationError("listen() needs a store made with a real reactor")
        listener = _Listener(
            self._reactor,
            self._engine.url,
            self._schema,
            self.channel,
            callback,
            (self.command_channel, commands) if commands is not None else None,
        )
        listener.start()
        return listener.stop


class _Listener:
    """
    LISTENs on a dedicated connection, on a thread of its own, and reconnects on any error.

    After a reconnection it reports that notifications may have been missed (the callback is
    called with None), so that the scheduler looks at every target.
    """

    log = Logger(namespace="relayer.store.postgres")

    def __init__(
        self,
        reactor: IReactorFromThreads,
        url: sa.URL,
        schema: str | None,
        channel: str,
        callback: Callable[[list[str] | None], None],
        commands: tuple[str, Callable[[], None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._where = f"{url.host or 'localhost'}:{url.port or 5432}"
        self._channel = channel
        self._callback = callback
        # The channel of operators' commands, and what to call when one is announced.
        self._command_channel = commands[0] if commands is not None else None
        self._on_command = commands[1] if commands is not None else None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relayer-pg-listen", daemon=True)
        self._backoff = BackoffPolicy(initial=0.1, multiplier=2.0, maximum=10.0, jitter=0.2)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _deliver(self, target_ids: list[str] | None) -> None:
        self._reactor.callFromThread(self._callback, target_ids)

    def _run(self) -> None:
        import random

        import psycopg

        failures = 0
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f'LISTEN "{self._channel}"')
                    if self._command_channel is not None:
                        conn.execute(f'LISTEN "{self._command_channel}"')
                    if failures:
                        self.log.info(
                            "Listening for new events again at {server}",
                            relayer_event=ev.LISTEN_RESTORED,
                            server=self._where,
                        )
                        # Notifications may have been missed while reconnecting.
                        self._deliver(None)
                        if self._on_command is not None:
                            self._reactor.callFromThread(self._on_command)
                    failures = 0
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=0.5, stop_after=1000):
                            if self._on_command is not None and note.channel == (
                                self._command_channel
                            ):
                                self._reactor.callFromThread(self._on_command)
                                continue
                            payload = note.payload
                            self._deliver(None if payload == "*" else payload.split("\n"))
            except Exception as e:  # noqa: BLE001 - the listener must outlive any error
                # A lost connection, or anything unexpected: listen again after a pause, and
                # tell the scheduler that notifications may have been missed meanwhile.
                failures += 1
                delay = self._backoff.delay(failures, random.random)
                self.log.warn(
                    "Listening for new events at {server} failed ({error}); retrying in "
                    "{delay:.1f}s",
                    relayer_event=ev.LISTEN_FAILED,
                    server=self._where,
                    error=str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                    delay=delay,
                )
                self._stopping.wait(delay)
