"""
The store on SQLAlchemy Core, shared by every SQL backend.

Each public method runs one database transaction, as one function handed to the store's
:class:`relayer.dbpool.DatabasePool`, so no database work ever happens on the reactor thread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Any, TypeVar

import attrs
import sqlalchemy as sa
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from relayer import _encoding, _faults
from relayer import _logevents as ev
from relayer.dbpool import DatabasePool
from relayer.errors import LeaseLost, SchemaVersionError, StoreError, StoreUnavailable
from relayer.event import GENERATED_ID_PREFIX
from relayer.store import _retention, _seqs, schema
from relayer.store.base import (
    COMMAND_ACTIONS,
    Awaiting,
    Claim,
    Command,
    DeadLetter,
    Delivery,
    DeliveryState,
    Drained,
    EventBatch,
    EventCounts,
    EventEntry,
    EventStatus,
    ILeaseStore,
    LeaseRound,
    PurgeReport,
    QueueCounts,
    TargetEventsPage,
    TargetRecord,
    TargetState,
    Transaction,
)

T = TypeVar("T")

#: Errors that may pass, after which an operation is worth retrying: a locked or busy database,
#: a full disk, a lost connection, a connection pool that ran dry.
_TRANSIENT = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    sa.exc.TimeoutError,
)


def _db_message(e: BaseException) -> str:
    """The driver's own message for a database error, without the SQL or its parameters."""
    orig = getattr(e, "orig", None)
    text = str(orig) if orig is not None else type(e).__name__
    return text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__


_t = schema.targets
_l = schema.leases
_n = schema.nodes
_e = schema.events
_ei = schema.event_ids
_s = schema.target_sets
_r = schema.runs
_x = schema.txns
_xp = schema.expired
_cmd = schema.commands
_c = schema.counters
# The views of live and archived rows together, that status queries read.
_ae = schema.all_events
_ax = schema.all_txns
_axp = schema.all_expired

_PENDING = schema.TXN_PENDING
_AWAITING = schema.TXN_AWAITING
_DELIVERED_STATE = schema.TXN_DELIVERED
# Where a claim's unit of work counts the events it found expired (see _run_claim).
_EXPIRED_KEY = "relayer.expired"
_DEAD = schema.TXN_DEAD
_DISCARDED = schema.TXN_DISCARDED
# Written out, not bound: the partial indexes on open and dead transactions serve only queries
# whose condition is the index's own, and a database cannot know a bound value's when it plans.
_OPEN = sa.text("relayer_txns.state IN ('pending', 'awaiting')")
_IS_DEAD = sa.text("relayer_txns.state = 'dead'")


# The statements of the delivery path, built once: building a statement costs several times
# more than running it. Their values are bound at execution.
_HEAD_TXN = (
    sa.select(
        _x.c.txn_id,
        _x.c.state,
        _x.c.seqs,
        _x.c.attempts,
        _x.c.oldest_at,
        _x.c.confirm_by,
    )
    .where(_x.c.target_id == sa.bindparam("p_target"), _OPEN)
    .order_by(_x.c.txn_id)
    .limit(1)
)
_COUNT_ATTEMPT = (
    sa.update(_x)
    .where(_x.c.target_id == sa.bindparam("p_target"), _x.c.txn_id == sa.bindparam("p_txn"))
    .values(
        attempts=sa.bindparam("p_attempts"),
        last_attempt_at=sa.bindparam("p_now"),
        # A transaction sent again after its confirmation timeout keeps its confirm_by: it is
        # one the target accepted, and a late confirmation of it still counts.
        state=_PENDING,
    )
)
_RUN_HEAD = (
    sa.select(_r.c.id, _r.c.n_events, _r.c.size, _r.c.seqs, _r.c.oldest_at)
    .where(_r.c.target_id == sa.bindparam("p_target"))
    .order_by(_r.c.pos, _r.c.id)
    # Each run holds at least one event, so no more runs than events are needed; they are
    # fetched a few at a time, so a long backlog is never read into memory.
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
    .execution_options(yield_per=8)
)
_DELETE_RUN = sa.delete(_r).where(_r.c.id == sa.bindparam("p_id"))
_SHORTEN_RUN = (
    sa.update(_r)
    .where(_r.c.id == sa.bindparam("p_id"))
    .values(
        n_events=sa.bindparam("p_n"),
        size=sa.bindparam("p_size"),
        seqs=sa.bindparam("p_seqs"),
        first_seq=sa.bindparam("p_first"),
        last_seq=sa.bindparam("p_last"),
    )
)
_INSERT_TXN = sa.insert(_x)
_INSERT_RUN = sa.insert(_r)
_NEXT_TXN_ID = (
    sa.update(_t)
    .where(_t.c.target_id == sa.bindparam("p_target"))
    .values(last_txn_id=_t.c.last_txn_id + 1)
    .returning(_t.c.last_txn_id, _t.c.max_span)
)
_WIDEN_SPAN = (
    sa.update(_t)
    .where(_t.c.target_id == sa.bindparam("p_target"))
    .values(max_span=sa.bindparam("p_span"))
)
_MARK_UP = (
    sa.update(_t)
    .where(_t.c.target_id == sa.bindparam("p_target"), _t.c.state != TargetState.UP.value)
    .values(state=TargetState.UP.value, failures=0, next_attempt_at=None, down_since=None)
)
_FINISH_TXN = (
    sa.update(_x)
    .where(
        _x.c.target_id == sa.bindparam("p_target"),
        _x.c.txn_id == sa.bindparam("p_txn"),
        _OPEN,
    )
    .values(state=_DELIVERED_STATE, done_at=sa.bindparam("p_now"), confirm_by=None)
)
_AWAIT_TXN = (
    sa.update(_x)
    .where(
        _x.c.target_id == sa.bindparam("p_target"),
        _x.c.txn_id == sa.bindparam("p_txn"),
        _x.c.state == _PENDING,
    )
    .values(state=_AWAITING, confirm_by=sa.bindparam("p_by"))
)
_DELIVERED = (
    sa.update(_t)
    .where(_t.c.target_id == sa.bindparam("p_target"))
    .values(
        last_success_at=sa.bindparam("p_now"),
        failures=0,
        next_attempt_at=None,
        last_error=None,
        down_since=None,
        # A woken BLOCKED or DISABLED target that delivers its head transaction is draining:
        # DOWN, like a recovering target, so a restart goes on with the drain instead of
        # waiting.
        # Two comparisons rather than IN: a statement with no list to expand is compiled once,
        # as it is (see PostgresStore._write).
        state=sa.case(
            (
                sa.or_(
                    _t.c.state == TargetState.BLOCKED.value,
                    _t.c.state == TargetState.DISABLED.value,
                ),
                TargetState.DOWN.value,
            ),
            else_=_t.c.state,
        ),
    )
)
_INSERT_EXPIRED = sa.insert(_xp)

# Replay: the target's row, locked; a chunk of dead letters in txn_id order; marking exactly
# those replayed.
_LOCK_TARGET = (
    sa.select(_t.c.target_id).where(_t.c.target_id == sa.bindparam("p_target")).with_for_update()
)
_DEAD_CHUNK = (
    sa.select(_x.c.txn_id, _x.c.seqs, _x.c.n_events, _x.c.size, _x.c.oldest_at)
    .where(
        _x.c.target_id == sa.bindparam("p_target"),
        _IS_DEAD,
        _x.c.txn_id > sa.bindparam("p_after"),
        _x.c.txn_id <= sa.bindparam("p_high"),
    )
    .order_by(_x.c.txn_id)
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
)
_MARK_REPLAYED = (
    sa.update(_x)
    .where(
        _x.c.target_id == sa.bindparam("p_target"),
        _IS_DEAD,
        _x.c.txn_id.in_(sa.bindparam("p_txns", expanding=True)),
    )
    .values(state=schema.TXN_REPLAYED, done_at=sa.bindparam("p_now"))
)
# The statements of the hot path, handed to the driver as they are, with "?" for a parameter;
# "format" is the same with "%s" (psycopg).
_QMARK_SQL = {
    # The blocks that hold the events from one number to another: the last that begins at or
    # before the first, and those that begin up to the last.
    "select_blocks": (
        "SELECT first_seq, last_seq, seqs, submitted_at, bodies, expires, ids "
        "FROM relayer_events WHERE first_seq >= coalesce((SELECT max(first_seq) "
        "FROM relayer_events WHERE first_seq <= ?), ?) AND first_seq <= ? "
        "ORDER BY first_seq"
    ),
    # The same, among live and archived blocks alike. Not max(first_seq): over the view's
    # UNION ALL, SQLite computes it by reading every block before (bodies and all), while an
    # ORDER BY with LIMIT 1 merges the two tables' keys and stops at the first.
    "select_all_blocks": (
        "SELECT first_seq, last_seq, seqs, submitted_at, bodies, expires, ids "
        "FROM relayer_all_events WHERE first_seq >= coalesce((SELECT first_seq "
        "FROM relayer_all_events WHERE first_seq <= ? ORDER BY first_seq DESC LIMIT 1), ?) "
        "AND first_seq <= ? ORDER BY first_seq"
    ),
    "insert_blocks": (
        "INSERT INTO relayer_events (first_seq, last_seq, seqs, n_events, set_id, "
        "submitted_at, bodies, expires, ids) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    "insert_ids": (
        "INSERT INTO relayer_event_ids (event_id, seq) VALUES (?, ?) "
        "ON CONFLICT (event_id) DO NOTHING"
    ),
}
_DRIVER_SQL = {
    "qmark": _QMARK_SQL,
    "format": {name: sql.replace("?", "%s") for name, sql in _QMARK_SQL.items()},
}

#: What joins the events of a block: compact JSON never holds a raw newline.
_BLOCK_SEPARATOR = b"\n"
#: How many events one query of events by sequence number asks for.
_IN_CHUNK = 500
#: How many targets one statement of queue_counts() looks at.
_PAGE = 500


@implementer(ILeaseStore)
class SQLStore:
    """
    A store on a SQLAlchemy engine.

    Use a backend's constructor, such as :meth:`relayer.store.SQLiteStore.open_path`, rather than
    this class directly.

    Args:
        engine: The SQLAlchemy engine, set up for the backend.
        pool: Where database work runs.
    """

    schema_version = schema.SCHEMA_VERSION
    #: The node id whose leases every change to a target requires, or None (one process).
    lease_owner: str | None = None
    log = Logger(namespace="relayer.store")

    #: How many dead letters :meth:`replay` moves back to the queue per database transaction.
    replay_chunk = 100

    def __init__(
        self,
        engine: sa.Engine,
        pool: DatabasePool,
        lease_pool: DatabasePool | None = None,
        *,
        read_engine: sa.Engine | None = None,
        read_pool: DatabasePool | None = None,
    ) -> None:
        self._engine = engine
        self._pool = pool
        self._expired_listener: Callable[[str, int], None] | None = None
        # Lease rounds must not queue behind a backlog of other work, or leases would lapse
        # under load: a backend with several connections gives them a thread of their own.
        self._lease_pool = lease_pool
        # Reads that change nothing (status, dead letters, loading targets) may run on
        # connections of their own, beside the writer: see :meth:`_read`.
        self._read_engine = read_engine if read_engine is not None else engine
        self._read_pool = read_pool
        #: The ids of lists of targets known to be stored, by their "\n"-joined ids.
        self._set_ids: dict[str, int] = {}
        # The statements of the hot path, written for the driver's parameter style.
        self._sql = _DRIVER_SQL["qmark" if engine.dialect.paramstyle == "qmark" else "format"]

    def __repr__(self) -> str:
        # The URL is shown without its password.
        return f"<{type(self).__name__} {self._engine.url.render_as_string(hide_password=True)}>"

    # -- plumbing -------------------------------------------------------------------------------

    def _run(
        self, f: Callable[..., T], *args: Any, pool: DatabasePool | None = None
    ) -> Deferred[T]:
        return _in_transaction(self._engine, pool or self._pool, f, *args, finish=self._finish)

    def _finish(self, conn: sa.Connection) -> None:
        """Called once a unit of work has returned, before its commit: see :meth:`_write`."""

    def _write(
        self,
        conn: sa.Connection,
        statement: sa.Executable,
        params: dict[str, Any] | list[dict[str, Any]],
    ) -> None:
        """
        Run a write whose result is not needed (a list of parameters runs it once for each).

        A backend may send it later, together with the transaction's next statement or its
        commit (PostgreSQL pipelines them, saving round trips to the server); it always runs
        before any later statement of the transaction, and an error in it fails the
        transaction all the same.
        """
        conn.execute(statement, params)

    def _write_driver(self, conn: sa.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Like :meth:`_write`, for a statement in the driver's own SQL, once for each row."""
        conn.exec_driver_sql(sql, rows)

    def set_expired_listener(self, listener: Callable[[str, int], None] | None) -> None:
        """
        Have ``listener(target_id, count)`` called, on the reactor thread, once the events
        that a claim found past their deadline are stored as expired.
        """
        self._expired_listener = listener

    def _run_claim(self, target_id: str, f: Callable[[sa.Connection], T]) -> Deferred[T]:
        """Run a unit of work that claims the target's next transaction, counting expiries."""

        def unit(conn: sa.Connection) -> tuple[T, int]:
            counter = conn.info[_EXPIRED_KEY] = [0]
            try:
                return f(conn), counter[0]
            finally:
                conn.info.pop(_EXPIRED_KEY, None)

        def committed(result: tuple[T, int]) -> T:
            claim, expired = result
            if expired:
                self._expired(target_id, expired)
            return claim

        return self._run(unit).addCallback(committed)

    def _expired(self, target_id: str, count: int) -> None:
        """Tell the listener that ``count`` events of the target are stored as expired."""
        listener = self._expired_listener
        if listener is None:
            return
        try:
            listener(target_id, count)
        except Exception:
            self.log.failure(
                "The listener of expired events failed",
                relayer_event=ev.STORE_EXPIRY_LISTENER_FAILED,
                target=target_id,
                events=count,
            )

    def _read(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run ``f(connection, *args)`` in a database transaction that only reads.

        It runs on the store's read engine and read pool, when it has them, so that it never
        waits for the writer (on SQLite, a read transaction begins DEFERRED, and WAL lets it
        read beside the writer); otherwise as any other unit of work, but never grouped with
        writes.
        """
        return _in_transaction(self._read_engine, self._read_pool or self._pool, f, *args)

    def _read_snapshot(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Like :meth:`_read`, with every statement of ``f`` reading the same snapshot of the
        database, so that an answer drawn from several tables (live and archived rows) is
        never caught half-way through another transaction's change.
        """

        def in_snapshot(conn: sa.Connection, *args: Any) -> T:
            self._begin_snapshot(conn)
            return f(conn, *args)

        return self._read(in_snapshot, *args)

    def _begin_snapshot(self, conn: sa.Connection) -> None:
        """Make the transaction just begun read one snapshot: SQLite's read transactions do."""

    def _retention_lock(self, conn: sa.Connection) -> bool:
        """Take the lock that lets one retention chunk run at a time; False if another holds it."""
        return True

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self, *, upgrade: bool = True) -> Deferred[None]:
        """
        Start the store, and create or upgrade its schema.

        Args:
            upgrade: With False, only check that the schema is this code's version, in a
                transaction that only reads (so never waiting for a writer's lock), and
                fail with :class:`relayer.errors.SchemaVersionError` if it is not.
        """
        self._pool.start()
        if self._lease_pool is not None:
            self._lease_pool.start()
        if self._read_pool is not None:
            self._read_pool.start()
        if not upgrade:
            return self._read(_check_version)

        def upgrade_(conn: sa.Connection) -> None:
            before, after = schema.upgrade(conn)
            if before != after:
                self.log.info(
                    "Upgraded the relayer schema from version {before} to {after}",
                    relayer_event=ev.SCHEMA_UPGRADED,
                    before=before,
                    after=after,
                )

        return self._run(upgrade_)

    def hold_process_lock(self, shared: bool) -> Deferred[None]:
        """Hold the process lock: nothing here; the SQLite and PostgreSQL stores take one."""
        return succeed(None)

    def close(self) -> Deferred[None]:
        async def close() -> None:
            try:
                if self._lease_pool is not None:
                    await self._lease_pool.stop()
                if self._read_engine is not self._engine:
                    await (self._read_pool or self._pool).run(self._read_engine.dispose)
                if self._read_pool is not None:
                    await self._read_pool.stop()
                await self._pool.run(self._engine.dispose)
            finally:
                await self._pool.stop()

        return Deferred.fromCoroutine(close())

    # -- targets --------------------------------------------------------------------------------

    def register_targets(self, target_ids: Sequence[str]) -> Deferred[dict[str, TargetRecord]]:
        ids = list(dict.fromkeys(target_ids))

        async def register() -> dict[str, TargetRecord]:
            # Targets are nearly always registered already: read first, beside the writer,
            # and write only for the targets that are missing.
            records, orphans = await self._read(self._stored_targets)
            if orphans or not all(t in records for t in ids):
                # Events may have been stored for a target while its registration had not
                # reached the store yet: the write registers it, and checks again.
                records = await self._run(self._register_targets, ids)
            # Each target's own list of targets, for the events submitted for it alone, is
            # stored now rather than on its first submit.
            missing = [t for t in ids if t not in self._set_ids]
            if missing:
                found = await self._read(self._find_sets, missing)
                self._set_ids.update(found)
                missing = [t for t in missing if t not in found]
            if missing:
                self._set_ids.update(await self._run(self._ensure_sets, missing))
            return records

        return Deferred.fromCoroutine(register())

    def load_targets(self, target_ids: Sequence[str]) -> Deferred[dict[str, TargetRecord]]:
        ids = list(dict.fromkeys(target_ids))

        def load(conn: sa.Connection) -> dict[str, TargetRecord]:
            records = {}
            for chunk in _chunks(ids):
                pending = set(
                    conn.execute(
                        sa.select(_r.c.target_id).where(_r.c.target_id.in_(chunk)).distinct()
                    ).scalars()
                )
                pending.update(
                    conn.execute(
                        sa.select(_x.c.target_id).where(_x.c.target_id.in_(chunk), _OPEN).distinct()
                    ).scalars()
                )
                for row in conn.execute(sa.select(_t).where(_t.c.target_id.in_(chunk))):
                    records[row.target_id] = _record(row, row.target_id in pending)
            return records

        return self._read(load)

    def pending_targets(self, target_ids: Sequence[str]) -> Deferred[set[str]]:
        ids = list(dict.fromkeys(target_ids))

        def pending(conn: sa.Connection) -> set[str]:
            found: set[str] = set()
            for chunk in _chunks(ids):
                queued = sa.exists().where(_r.c.target_id == _t.c.target_id)
                formed = sa.exists().where(_x.c.target_id == _t.c.target_id, _OPEN)
                found.update(
                    conn.execute(
                        sa.select(_t.c.target_id).where(
                            _t.c.target_id.in_(chunk), sa.or_(queued, formed)
                        )
                    ).scalars()
                )
            return found

        return self._read(pending)

    def _register_targets(
        self, conn: sa.Connection, target_ids: list[str]
    ) -> dict[str, TargetRecord]:
        existing = set(conn.execute(sa.select(_t.c.target_id)).scalars())
        # Targets with events stored but no state row yet (their registration has not reached
        # the store, while this one has) get one too: they show in status(), and a
        # registration never waits for another's.
        _, orphans = self._stored_targets(conn)
        missing = [t for t in dict.fromkeys([*target_ids, *sorted(orphans)]) if t not in existing]
        if missing:
            # Another process may register the same targets at the same time.
            conn.execute(
                self._insert_ignoring_conflicts(_t),
                [
                    {
                        "target_id": t,
                        "state": TargetState.UP.value,
                        "failures": 0,
                        "next_attempt_at": None,
                        "last_success_at": None,
                        "last_txn_id": 0,
                        "last_error": None,
                        "max_span": 0,
                    }
                    for t in missing
                ],
            )
        return self._all_targets(conn)

    def _all_targets(self, conn: sa.Connection) -> dict[str, TargetRecord]:
        """Every target's stored state."""
        records, orphans = self._stored_targets(conn)
        # A queue without a state row would be invisible to status(); report it all the same.
        for target_id in orphans:
            raise StoreError(f"the store holds events for target {target_id!r} without its state")
        return records

    def _stored_targets(self, conn: sa.Connection) -> tuple[dict[str, TargetRecord], set[str]]:
        """Every target's stored state, and the targets with events stored but no state row."""
        pending = set(conn.execute(sa.select(_r.c.target_id).distinct()).scalars())
        pending.update(conn.execute(sa.select(_x.c.target_id).where(_OPEN).distinct()).scalars())
        records = {}
        for row in conn.execute(sa.select(_t)):
            records[row.target_id] = _record(row, row.target_id in pending)
        return records, pending - records.keys()

    def _insert_ignoring_conflicts(self, table: sa.Table) -> Any:
        """An INSERT that skips rows whose primary key exists already."""
        dialect = self._engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table).on_conflict_do_nothing()
        raise StoreError(f"relayer does not support the {dialect} database")

    # -- submitting -----------------------------------------------------------------------------

    def add_events(
        self, batch: EventBatch | Sequence[tuple[str, Sequence[bytes]]], now: float
    ) -> Deferred[list[str]]:
        if not isinstance(batch, EventBatch):
            batch = EventBatch.of_runs(batch)
        return Deferred.fromCoroutine(self._add_with_sets(batch, self._add_events, batch, now))

    def add_events_claiming(
        self,
        batch: EventBatch,
        now: float,
        claims: Mapping[str, tuple[int, int, float | None]],
    ) -> Deferred[tuple[list[str], dict[str, Claim]]]:
        """
        Store events as :meth:`add_events` does, and then, in the same database transaction,
        claim the next transaction of each of ``claims``' targets as :meth:`claim` does.

        ``claims`` gives each target's ``(max_events, max_bytes, default_ttl)``. It is how the
        first transaction of a target that was idle goes out without a second wait for the
        database: the events and that transaction are committed together.

        Returns:
            A Deferred that fires with the events' ids and each target's claim, once both are
            durable. If it fails, nothing of either was stored.
        """

        def unit(conn: sa.Connection) -> tuple[list[str], dict[str, Claim], dict[str, int]]:
            ids = self._add_events(conn, batch, now)
            claimed: dict[str, Claim] = {}
            expired: dict[str, int] = {}
            for target_id, (max_events, max_bytes, ttl) in claims.items():
                counter = conn.info[_EXPIRED_KEY] = [0]
                try:
                    self._check_lease(conn, target_id, now)
                    claimed[target_id] = self._claim(
                        conn, target_id, max_events, max_bytes, ttl, now, hold_down=True
                    )
                finally:
                    conn.info.pop(_EXPIRED_KEY, None)
                if counter[0]:
                    expired[target_id] = counter[0]
            return ids, claimed, expired

        async def add() -> tuple[list[str], dict[str, Claim]]:
            ids, claimed, expired = await self._add_with_sets(batch, unit)
            for target_id, count in expired.items():
                self._expired(target_id, count)
            return ids, claimed

        return Deferred.fromCoroutine(add())

    async def _add_with_sets(self, batch: EventBatch, f: Callable[..., T], *args: Any) -> T:
        """Run the unit ``f`` that stores ``batch``, once the lists of targets it names are."""
        keys = {target_id for target_id, _ in batch.runs}
        keys.update(map("\n".join, batch.targets.values()))
        missing = [k for k in keys if k not in self._set_ids]
        if missing:
            # Target lists are written in a database transaction of their own, and only
            # remembered once it has committed: a list is never named by an event before.
            self._set_ids.update(await self._run(self._ensure_sets, missing))
        return await self._run(f, *args)

    def _find_sets(self, conn: sa.Connection, keys: list[str]) -> dict[str, int]:
        """The ids of those of these lists of targets that are stored."""
        found: dict[str, int] = {}
        for chunk in _chunks(keys):
            for set_id, targets in conn.execute(
                sa.select(_s.c.set_id, _s.c.targets).where(_s.c.targets.in_(chunk))
            ):
                found[targets] = set_id
        return found

    def _ensure_sets(self, conn: sa.Connection, keys: list[str]) -> dict[str, int]:
        """The ids of these lists of targets, written first where they are missing."""
        found: dict[str, int] = {}
        for chunk in _chunks(keys):
            for set_id, targets in conn.execute(
                sa.select(_s.c.set_id, _s.c.targets).where(_s.c.targets.in_(chunk))
            ):
                found[targets] = set_id
            new = [k for k in chunk if k not in found]
            if new:
                # Another process may write the same list at once: it is written once.
                conn.execute(
                    self._insert_ignoring_targets_conflict(), [{"targets": k} for k in new]
                )
                for set_id, targets in conn.execute(
                    sa.select(_s.c.set_id, _s.c.targets).where(_s.c.targets.in_(new))
                ):
                    found[targets] = set_id
        return found

    def _insert_ignoring_targets_conflict(self) -> Any:
        dialect = self._engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(_s).on_conflict_do_nothing(index_elements=["targets"])
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(_s).on_conflict_do_nothing(index_elements=["targets"])

    def _allocate_seqs(self, conn: sa.Connection, n: int) -> list[int]:
        """``n`` new event sequence numbers, increasing; never handed out before."""
        row = conn.execute(
            sa.update(_c)
            .where(_c.c.name == "event_seq")
            .values(value=_c.c.value + n)
            .returning(_c.c.value)
        ).first()
        if row is None:
            # The first events of a new database.
            conn.execute(sa.insert(_c).values(name="event_seq", value=n))
            last = n
        else:
            last = int(row[0])
        return list(range(last - n + 1, last + 1))

    def _insert_ids(self, conn: sa.Connection, rows: list[tuple[str, int]]) -> set[str]:
        """
        Store the application's ids of new events, as ``(event_id, seq)``; return those that
        were stored. An id that another process stored meanwhile is skipped, not an error.
        """
        if not rows:
            return set()
        conn.exec_driver_sql(self._sql["insert_ids"], rows)
        mine = dict(rows)
        inserted: set[str] = set()
        for chunk in _chunks(list(mine)):
            for eid, seq in conn.execute(
                sa.select(_ei.c.event_id, _ei.c.seq).where(_ei.c.event_id.in_(chunk))
            ):
                if mine.get(eid) == seq:
                    inserted.add(eid)
        return inserted

    def _add_events(self, conn: sa.Connection, batch: EventBatch, now: float) -> list[str]:
        bodies = batch.bodies
        given = batch.event_ids
        fanned = batch.targets
        n = len(bodies)
        skipped: set[int] = set()
        first_of: dict[str, int] = {}
        stored: set[str] = set()
        if given:
            # A repeated id stores nothing: one stored before, or earlier in this batch.
            for i in sorted(given):
                eid = given[i]
                if eid in first_of:
                    skipped.add(i)
                else:
                    first_of[eid] = i
            for chunk in _chunks(list(first_of)):
                stored.update(
                    conn.execute(
                        sa.select(_ei.c.event_id).where(_ei.c.event_id.in_(chunk))
                    ).scalars()
                )
            skipped.update(first_of[eid] for eid in stored)
        fresh = n - len(skipped)
        numbers = self._allocate_seqs(conn, fresh) if fresh else []
        # Numbers are given run by run, so that each target's events in this batch are
        # consecutive (a run is then one range), and each run's new events make a block.
        seq_of: list[int] = [0] * n
        blocks: list[tuple[int, list[int]]] = []
        set_ids = self._set_ids
        take = iter(numbers).__next__
        for target_id, indices in batch.runs:
            sid = set_ids[target_id]
            block: list[int] | None = None
            block_set = -1
            previous = -1
            for i in indices:
                if seq_of[i] or i in skipped:
                    continue
                seq = seq_of[i] = take()
                event_set = set_ids["\n".join(fanned[i])] if i in fanned else sid
                # A block's numbers are consecutive: on PostgreSQL another process may draw
                # numbers in between, and a block must never span one of another's, so that
                # the block holding a number is the one that starts at or before it.
                if block is None or event_set != block_set or seq != previous + 1:
                    block = []
                    block_set = event_set
                    blocks.append((event_set, block))
                block.append(i)
                previous = seq
        if given:
            inserted = self._insert_ids(
                conn, [(given[i], seq_of[i]) for i in sorted(given) if i not in skipped]
            )
            # Another process stored the same id meanwhile (PostgreSQL): that one stands.
            lost = {first_of[eid] for eid in first_of if eid not in inserted and eid not in stored}
            if lost:
                skipped.update(lost)
                blocks = [(s, [i for i in b if i not in lost]) for s, b in blocks]
        expires = batch.expires_at
        block_rows = []
        for sid, block in blocks:
            if not block:
                continue
            seqs = [seq_of[i] for i in block]
            deadlines = None
            if expires and any(i in expires for i in block):
                deadlines = json.dumps([expires.get(i) for i in block])
            ids = None
            if given and any(i in given for i in block):
                ids = json.dumps([given.get(i) for i in block])
            block_rows.append(
                (
                    seqs[0],
                    seqs[-1],
                    _seqs.encode(seqs),
                    len(block),
                    sid,
                    now,
                    _BLOCK_SEPARATOR.join([bodies[i] for i in block]),
                    deadlines,
                    ids,
                )
            )
        if block_rows:
            # The hot path of every submit: rows handed to the driver as they are.
            self._write_driver(conn, self._sql["insert_blocks"], block_rows)
        rows = []
        for target_id, indices in batch.runs:
            seqs = (
                [seq_of[i] for i in indices if i not in skipped]
                if skipped
                else [seq_of[i] for i in indices]
            )
            if not seqs:
                continue
            rows.append(
                {
                    "target_id": target_id,
                    "pos": 0,
                    "n_events": len(seqs),
                    "size": sum(len(bodies[i]) for i in indices if i not in skipped),
                    "seqs": _seqs.encode(seqs),
                    "first_seq": seqs[0],
                    "last_seq": seqs[-1],
                    "oldest_at": now,
                }
            )
        if rows:
            self._write(conn, _INSERT_RUN, rows)
            self._events_added(conn, list(dict.fromkeys(str(r["target_id"]) for r in rows)))
        return (
            [given[i] if i in given else f"{GENERATED_ID_PREFIX}{seq_of[i]}" for i in range(n)]
            if given
            else [f"{GENERATED_ID_PREFIX}{s}" for s in seq_of]
        )

    def _events_added(self, conn: sa.Connection, target_ids: Sequence[str]) -> None:
        """Called inside the transaction that stores events; a backend may notify others."""

    # -- forming and claiming -------------------------------------------------------------------

    def _load_events(
        self, conn: sa.Connection, seqs: list[int], strict: bool = True, archived: bool = False
    ) -> list[tuple[Any, ...]]:
        """
        The rows of these events, in the order of ``seqs``: ``(seq, body, submitted_at,
        expires_at, event_id)`` tuples, cut out of their blocks, read straight from the driver
        (this is the hot path of every transaction formed or resent).

        With ``strict``, an event missing from the store is an error; else it is left out.
        With ``archived``, archived events are read too.
        """
        if not seqs:
            return []
        spans = _seqs.ranges(_seqs.encode(seqs))
        found: dict[int, tuple[Any, ...]] = {}
        in_order: list[tuple[Any, ...]] = []
        statement = self._sql["select_all_blocks" if archived else "select_blocks"]
        cursor = self._block_cursor(conn)
        try:
            for low, high in spans:
                cursor.execute(statement, (low, low, high))
                for _first, _last, numbers, submitted, bodies, deadlines, ids in cursor.fetchall():
                    events = bytes(bodies).split(_BLOCK_SEPARATOR)
                    block = _seqs.decode(numbers)
                    n = len(block)
                    expiry = json.loads(deadlines) if deadlines else repeat(None, n)
                    named = json.loads(ids) if ids else repeat(None, n)
                    rows = zip(block, events, repeat(submitted, n), expiry, named, strict=True)
                    if low <= block[0] and block[-1] <= high:
                        if len(spans) == 1:
                            in_order.extend(rows)
                        else:
                            found.update((r[0], r) for r in rows)
                    else:
                        found.update((r[0], r) for r in rows if low <= r[0] <= high)
        finally:
            cursor.close()
        if in_order and not found and len(in_order) == len(seqs) and in_order[0][0] == seqs[0]:
            # One increasing range of whole blocks: the rows are in order already.
            return in_order
        found.update((r[0], r) for r in in_order)
        if not strict:
            return [found[s] for s in seqs if s in found]
        try:
            return [found[s] for s in seqs]
        except KeyError as e:
            raise StoreError(
                f"event {e.args[0]} of a transaction is missing from the store"
            ) from None

    def _head_txn(self, conn: sa.Connection, target_id: str, max_events: int) -> Any:
        """
        The target's oldest open transaction, or None; ``max_events`` is how many events a
        transaction formed next would take (a backend may read the head of the queue at the
        same time, for :meth:`_run_heads`).
        """
        return conn.execute(_HEAD_TXN, {"p_target": target_id}).first()

    def _run_heads(self, conn: sa.Connection, target_id: str, limit: int) -> Any:
        """
        The first ``limit`` runs of the target's queue, in order, as ``(id, n_events, size,
        seqs, oldest_at)`` rows: an iterable with a ``close()``, read a few rows at a time.
        """
        return conn.execute(_RUN_HEAD, {"p_target": target_id, "p_limit": limit})

    def _block_cursor(self, conn: sa.Connection) -> Any:
        """A driver cursor for reading blocks of events."""
        return conn.connection.cursor()

    def _form(
        self,
        conn: sa.Connection,
        target_id: str,
        max_events: int,
        max_bytes: int,
        ttl: float | None,
        now: float,
    ) -> Transaction | None:
        """
        Form a new transaction from the head of the queue; None if the queue is empty.

        Events past their deadline are recorded as expired.
        """
        while True:
            taken: list[Any] = []
            n_events = 0
            size = _encoding.ENVELOPE_BYTES
            consumed: list[int] = []
            remainder: tuple[int, list[Any]] | None = None
            sep = len(_encoding.SEPARATOR)
            seen_any = False
            result = self._run_heads(conn, target_id, max_events)
            try:
                for row_id, run_n, run_size, run_seqs, _oldest in result:
                    seen_any = True
                    rows = self._load_events(conn, _seqs.decode(run_seqs))
                    joined = run_size + sep * (run_n - 1) + (sep if n_events else 0)
                    if n_events + run_n <= max_events and size + joined <= max_bytes:
                        # The whole run fits: take it as it is.
                        taken.extend(rows)
                        n_events += run_n
                        size += joined
                        consumed.append(row_id)
                        if n_events >= max_events:
                            break
                        continue
                    # Only part of the run fits. A transaction always takes at least one
                    # event, so an event larger than the cap (the cap was lowered since)
                    # still goes out.
                    take = 0
                    for ev in rows:
                        extra = len(ev[1]) + (sep if n_events else 0)
                        if n_events and (n_events >= max_events or size + extra > max_bytes):
                            break
                        n_events += 1
                        size += extra
                        take += 1
                    taken.extend(rows[:take])
                    if take == len(rows):
                        consumed.append(row_id)
                    else:
                        remainder = (row_id, rows[take:])
                    break
            finally:
                result.close()
            if not seen_any:
                return None
            if consumed:
                self._write(conn, _DELETE_RUN, [{"p_id": i} for i in consumed])
            if remainder is not None:
                row_id, rest = remainder
                rest_seqs = [r[0] for r in rest]
                self._write(
                    conn,
                    _SHORTEN_RUN,
                    {
                        "p_id": row_id,
                        "p_n": len(rest),
                        "p_size": sum(len(r[1]) for r in rest),
                        "p_seqs": _seqs.encode(rest_seqs),
                        "p_first": rest_seqs[0],
                        "p_last": rest_seqs[-1],
                    },
                )
            live = self._drop_expired(conn, target_id, taken, ttl, now)
            if live:
                return self._new_txn(conn, target_id, live, ttl, now)
            # Every event taken had expired: go on with the next ones.

    def _drop_expired(
        self,
        conn: sa.Connection,
        target_id: str,
        rows: list[Any],
        ttl: float | None,
        now: float,
        txn_id: int | None = None,
    ) -> list[Any]:
        """
        Record the events past their deadline as expired at the target; return the others.

        Args:
            txn_id: The abandoned transaction that held them, if they were in one.
        """
        if ttl is None and all(row[3] is None for row in rows):
            return rows
        live = []
        dead = []
        for row in rows:
            deadline = _deadline(row, ttl)
            if deadline is not None and deadline <= now:
                dead.append(
                    {"target_id": target_id, "seq": row[0], "expired_at": now, "txn_id": txn_id}
                )
            else:
                live.append(row)
        if dead:
            conn.execute(self._insert_ignoring_conflicts(_xp), dead)
            counter = conn.info.get(_EXPIRED_KEY)
            if counter is not None:
                counter[0] += len(dead)
            _faults.checkpoint("event.expired")
        return live

    def _new_txn(
        self, conn: sa.Connection, target_id: str, rows: list[Any], ttl: float | None, now: float
    ) -> Transaction:
        """Store a new transaction of these events, with the target's next id."""
        seqs = [r[0] for r in rows]
        txn_id, span = self._next_txn_id(conn, target_id)
        first, last = min(seqs), max(seqs)
        if last - first > span:
            self._write(conn, _WIDEN_SPAN, {"p_target": target_id, "p_span": last - first})
        oldest = min(r[2] for r in rows)
        self._write(
            conn,
            _INSERT_TXN,
            {
                "target_id": target_id,
                "txn_id": txn_id,
                "state": _PENDING,
                "seqs": _seqs.encode(seqs),
                "first_seq": first,
                "last_seq": last,
                "n_events": len(rows),
                "size": sum(len(r[1]) for r in rows),
                "oldest_at": oldest,
                "created_at": now,
                "attempts": 1,
                "last_attempt_at": now,
                "done_at": None,
                "confirm_by": None,
                "reason": None,
            },
        )
        return _transaction(target_id, txn_id, rows, 1, oldest, ttl)

    def _next_txn_id(self, conn: sa.Connection, target_id: str) -> tuple[int, int]:
        row = conn.execute(_NEXT_TXN_ID, {"p_target": target_id}).first()
        if row is None:
            raise StoreError(f"target {target_id!r} is not registered in the store")
        return int(row[0]), int(row[1] or 0)

    def _requeue_head(
        self, conn: sa.Connection, target_id: str, rows: list[Any], oldest_at: float
    ) -> None:
        """Put events back at the head of the target's queue, as one run, in this order."""
        head = conn.execute(
            sa.select(sa.func.min(_r.c.pos)).where(_r.c.target_id == target_id)
        ).scalar()
        seqs = [r[0] for r in rows]
        conn.execute(
            _INSERT_RUN,
            {
                "target_id": target_id,
                "pos": min(head if head is not None else 0, 0) - 1,
                "n_events": len(rows),
                "size": sum(len(r[1]) for r in rows),
                "seqs": _seqs.encode(seqs),
                "first_seq": seqs[0],
                "last_seq": seqs[-1],
                "oldest_at": oldest_at,
            },
        )

    def _claim(
        self,
        conn: sa.Connection,
        target_id: str,
        max_events: int,
        max_bytes: int,
        ttl: float | None,
        now: float,
        hold_down: bool = False,
    ) -> Claim:
        row = self._head_txn(conn, target_id, max_events)
        if row is not None:
            if row.state == _AWAITING and row.confirm_by is not None and row.confirm_by > now:
                return Awaiting(target_id, row.txn_id, row.confirm_by)
            events = self._load_events(conn, _seqs.decode(row.seqs))
            deadline = _earliest(events, ttl)
            if deadline is not None and deadline <= now:
                # A formed transaction is never altered: one with an event past its deadline
                # is abandoned, and its live events are formed into a new one.
                conn.execute(
                    sa.update(_x)
                    .where(_x.c.target_id == target_id, _x.c.txn_id == row.txn_id)
                    .values(
                        state=schema.TXN_ABANDONED,
                        done_at=now,
                        confirm_by=None,
                        reason="an event expired before it was accepted",
                    )
                )
                live = self._drop_expired(conn, target_id, events, ttl, now, txn_id=row.txn_id)
                if live:
                    self._requeue_head(conn, target_id, live, row.oldest_at)
            else:
                attempts = row.attempts + 1
                self._write(
                    conn,
                    _COUNT_ATTEMPT,
                    {
                        "p_target": target_id,
                        "p_txn": row.txn_id,
                        "p_attempts": attempts,
                        "p_now": now,
                    },
                )
                return _transaction(target_id, row.txn_id, events, attempts, row.oldest_at, ttl)
        txn = self._form(conn, target_id, max_events, max_bytes, ttl, now)
        if txn is None:
            if hold_down:
                # A retry found nothing to send (what was left expired, unsent, or was taken
                # care of elsewhere): the target has not answered, and stays DOWN with its
                # backoff, rather than have the next event sent to it at once.
                state = conn.execute(
                    sa.select(_t.c.state, _t.c.failures).where(_t.c.target_id == target_id)
                ).first()
                if state is not None and state.state == TargetState.DOWN.value and state.failures:
                    return Drained(target_id)
            # Nothing is left: the target is UP. This happens in the same database transaction
            # that found the queue empty, so no event stored before it can be stranded, and an
            # event stored after it finds the target UP.
            marked = conn.execute(_MARK_UP, {"p_target": target_id})
            if marked.rowcount:
                _faults.checkpoint("up.transition")
        return txn

    def claim(
        self,
        target_id: str,
        max_events: int,
        max_bytes: int,
        now: float,
        *,
        default_ttl: float | None = None,
    ) -> Deferred[Claim]:
        def claim(conn: sa.Connection) -> Claim:
            self._check_lease(conn, target_id, now)
            return self._claim(
                conn, target_id, max_events, max_bytes, default_ttl, now, hold_down=True
            )

        return self._run_claim(target_id, claim)

    def complete(
        self,
        target_id: str,
        txn_id: int,
        max_events: int,
        max_bytes: int,
        now: float,
        *,
        default_ttl: float | None = None,
    ) -> Deferred[Claim]:
        def complete(conn: sa.Connection) -> Claim:
            self._check_lease(conn, target_id, now)
            self._write(conn, _FINISH_TXN, {"p_target": target_id, "p_txn": txn_id, "p_now": now})
            self._write(conn, _DELIVERED, {"p_target": target_id, "p_now": now})
            return self._claim(conn, target_id, max_events, max_bytes, default_ttl, now)

        return self._run_claim(target_id, complete)

    def accepted(
        self,
        target_id: str,
        txn_id: int,
        confirm_by: float,
        max_events: int,
        max_bytes: int,
        now: float,
        *,
        default_ttl: float | None = None,
    ) -> Deferred[Claim]:
        def accepted(conn: sa.Connection) -> Claim:
            self._check_lease(conn, target_id, now)
            conn.execute(_DELIVERED, {"p_target": target_id, "p_now": now})
            waiting = conn.execute(
                _AWAIT_TXN, {"p_target": target_id, "p_txn": txn_id, "p_by": confirm_by}
            )
            if waiting.rowcount:
                return Awaiting(target_id, txn_id, confirm_by)
            # Confirmed already, before the target's answer came back: go on.
            return self._claim(conn, target_id, max_events, max_bytes, default_ttl, now)

        return self._run_claim(target_id, accepted)

    def confirm(self, target_id: str, txn_id: int, now: float) -> Deferred[bool]:
        def confirm(conn: sa.Connection) -> bool:
            # Only a transaction that the target accepted may be confirmed: one awaiting its
            # confirmation, or being sent again after its confirmation timeout. A transaction
            # the target never accepted is not delivered by a confirmation.
            done = conn.execute(
                sa.update(_x)
                .where(
                    _x.c.target_id == target_id,
                    _x.c.txn_id == txn_id,
                    _OPEN,
                    _x.c.confirm_by.is_not(None),
                )
                .values(state=_DELIVERED_STATE, done_at=now, confirm_by=None)
            )
            if done.rowcount:
                # The owner of the target, in whichever process, goes on at once.
                self._events_added(conn, [target_id])
                return True
            state = conn.execute(
                sa.select(_x.c.state).where(_x.c.target_id == target_id, _x.c.txn_id == txn_id)
            ).scalar()
            return state == _DELIVERED_STATE

        return self._run(confirm)

    def fail(
        self,
        target_id: str,
        txn_id: int,
        failures: int,
        next_attempt_at: float,
        error: str,
        now: float,
        *,
        down_since: float | None = None,
        dead_letter: str | None = None,
    ) -> Deferred[None]:
        def fail(conn: sa.Connection) -> None:
            self._check_lease(conn, target_id, now)
            if dead_letter is not None:
                conn.execute(
                    sa.update(_x)
                    .where(_x.c.target_id == target_id, _x.c.txn_id == txn_id, _OPEN)
                    .values(state=_DEAD, done_at=now, confirm_by=None, reason=dead_letter[:500])
                )
            conn.execute(
                sa.update(_t)
                .where(_t.c.target_id == target_id)
                .values(
                    state=TargetState.DOWN.value,
                    failures=failures,
                    next_attempt_at=next_attempt_at,
                    last_error=error[:500],
                    down_since=now if down_since is None else down_since,
                )
            )
            _faults.checkpoint("backoff.write")

        return self._run(fail)

    def disable(
        self, target_id: str, txn_id: int, error: str, failures: int, down_since: float, now: float
    ) -> Deferred[None]:
        def disable(conn: sa.Connection) -> None:
            self._check_lease(conn, target_id, now)
            conn.execute(
                sa.update(_t)
                .where(_t.c.target_id == target_id)
                .values(
                    state=TargetState.DISABLED.value,
                    failures=failures,
                    next_attempt_at=None,
                    last_error=error[:500],
                    down_since=down_since,
                )
            )

        return self._run(disable)

    def block(self, target_id: str, txn_id: int, error: str, now: float) -> Deferred[None]:
        def block(conn: sa.Connection) -> None:
            self._check_lease(conn, target_id, now)
            conn.execute(
                sa.update(_t)
                .where(_t.c.target_id == target_id)
                .values(
                    state=TargetState.BLOCKED.value, next_attempt_at=None, last_error=error[:500]
                )
            )

        return self._run(block)

    def dead_letter(
        self,
        target_id: str,
        txn_id: int,
        reason: str,
        max_events: int,
        max_bytes: int,
        now: float,
        *,
        default_ttl: float | None = None,
    ) -> Deferred[Claim]:
        def dead_letter(conn: sa.Connection) -> Claim:
            self._check_lease(conn, target_id, now)
            conn.execute(
                sa.update(_x)
                .where(_x.c.target_id == target_id, _x.c.txn_id == txn_id, _OPEN)
                .values(state=_DEAD, done_at=now, confirm_by=None, reason=reason[:500])
            )
            conn.execute(
                sa.update(_t).where(_t.c.target_id == target_id).values(last_error=reason[:500])
            )
            return self._claim(conn, target_id, max_events, max_bytes, default_ttl, now)

        return self._run_claim(target_id, dead_letter)

    def split(
        self, target_id: str, txn_id: int, now: float, *, default_ttl: float | None = None
    ) -> Deferred[Transaction | None]:
        def split(conn: sa.Connection) -> Transaction | None:
            self._check_lease(conn, target_id, now)
            row = conn.execute(
                sa.select(_x).where(_x.c.target_id == target_id, _x.c.txn_id == txn_id, _OPEN)
            ).first()
            if row is None or row.n_events < 2:
                return None
            events = self._load_events(conn, _seqs.decode(row.seqs))
            half = len(events) // 2
            first, second = events[:half], events[half:]
            conn.execute(
                sa.update(_x)
                .where(_x.c.target_id == target_id, _x.c.txn_id == txn_id)
                .values(
                    state=schema.TXN_ABANDONED,
                    done_at=now,
                    reason="split: the target refused it as too large",
                )
            )
            self._requeue_head(conn, target_id, second, row.oldest_at)
            return self._new_txn(conn, target_id, first, default_ttl, now)

        return self._run_claim(target_id, split)

    # -- inspection -----------------------------------------------------------------------------

    def queue_counts(
        self, after: str | None = None, limit: int | None = None
    ) -> Deferred[dict[str, QueueCounts]]:
        def counts(conn: sa.Connection) -> dict[str, QueueCounts]:
            result: dict[str, QueueCounts] = {}
            last = after
            while limit is None or len(result) < limit:
                want = _PAGE if limit is None else min(_PAGE, limit - len(result))
                key = self._id_order(_t.c.target_id)
                query = sa.select(_t.c.target_id).order_by(key).limit(want)
                if last is not None:
                    query = query.where(key > last)
                ids = list(conn.execute(query).scalars())
                result.update(self._counts_of(conn, ids))
                if len(ids) < want:
                    break
                last = ids[-1]
            return result

        return self._read(counts)

    def _id_order(self, column: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
        """
        ``column`` as it sorts for paging by target id: by code point, as Python compares
        strings (SQLite's own order).
        """
        return column

    def _counts_of(self, conn: sa.Connection, ids: list[str]) -> dict[str, QueueCounts]:
        """The counts of the given targets, each looked up by its index."""
        acc: dict[str, dict[str, Any]] = {
            t: {
                "pending_events": 0,
                "pending_transactions": 0,
                "oldest_pending_at": None,
                "dead_letters": 0,
            }
            for t in ids
        }

        def older(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else min(a, b)

        if not ids:
            return {}
        # Each query reads only these targets' rows, through the indexes whose keys start
        # with target_id (the runs' order, the open and dead transactions').
        for target_id, n, oldest in conn.execute(
            sa.select(_r.c.target_id, sa.func.sum(_r.c.n_events), sa.func.min(_r.c.oldest_at))
            .where(_r.c.target_id.in_(ids))
            .group_by(_r.c.target_id)
        ):
            s = acc[target_id]
            s["pending_events"] += int(n)
            s["oldest_pending_at"] = older(s["oldest_pending_at"], oldest)
        for target_id, count, n, oldest in conn.execute(
            sa.select(
                _x.c.target_id,
                sa.func.count(),
                sa.func.sum(_x.c.n_events),
                sa.func.min(_x.c.oldest_at),
            )
            .where(_x.c.target_id.in_(ids), _OPEN)
            .group_by(_x.c.target_id)
        ):
            s = acc[target_id]
            s["pending_transactions"] += int(count)
            s["pending_events"] += int(n)
            s["oldest_pending_at"] = older(s["oldest_pending_at"], oldest)
        for target_id, count in conn.execute(
            sa.select(_x.c.target_id, sa.func.count())
            .where(_x.c.target_id.in_(ids), _IS_DEAD)
            .group_by(_x.c.target_id)
        ):
            acc[target_id]["dead_letters"] = int(count)
        return {t: QueueCounts(**v) for t, v in acc.items()}

    def dead_letters(
        self, target_id: str, limit: int, after: int | None = None
    ) -> Deferred[list[DeadLetter]]:
        def list_dead(conn: sa.Connection) -> list[DeadLetter]:
            query = sa.select(_x).where(_x.c.target_id == target_id, _IS_DEAD)
            if after is not None:
                query = query.where(_x.c.txn_id > after)
            found = []
            for r in conn.execute(query.order_by(_x.c.txn_id).limit(limit)).all():
                events = self._load_events(conn, _seqs.decode(r.seqs))
                found.append(
                    DeadLetter(
                        target_id=r.target_id,
                        txn_id=r.txn_id,
                        attempts=r.attempts,
                        reason=r.reason or "",
                        dead_at=r.done_at,
                        events=tuple(bytes(e[1]) for e in events),
                        event_ids=tuple(_event_id(e) for e in events),
                    )
                )
            return found

        return self._read(list_dead)

    def replay(self, target_id: str, now: float, txn_id: int | None = None) -> Deferred[int]:
        chunk = self.replay_chunk

        def replay_chunk(
            conn: sa.Connection, last: int | None, high: int | None
        ) -> tuple[int | None, int | None, int]:
            # The target's row lock serialises replays of one target (on SQLite, BEGIN
            # IMMEDIATE does): two replays never take the same dead letters.
            if conn.execute(_LOCK_TARGET, {"p_target": target_id}).first() is None:
                return None, None, 0
            if txn_id is not None:
                # One dead letter: the chunk of ids (txn_id - 1, txn_id].
                high, last = txn_id, txn_id - 1
            elif high is None:
                # Only what was dead-lettered when the replay began is replayed.
                high = conn.execute(
                    sa.select(sa.func.max(_x.c.txn_id)).where(_x.c.target_id == target_id, _IS_DEAD)
                ).scalar()
                if high is None:
                    return None, None, 0
            rows = self._take_dead_letters(conn, target_id, last, high, chunk)
            if not rows:
                return None, high, 0
            total = 0
            for r in rows:
                # Appended in txn_id order: runs keep their order by id. The events are named,
                # not copied.
                conn.execute(
                    _INSERT_RUN,
                    {
                        "target_id": target_id,
                        "pos": 0,
                        "n_events": r.n_events,
                        "size": r.size,
                        "seqs": r.seqs,
                        "first_seq": _seqs.ranges(r.seqs)[0][0],
                        "last_seq": _seqs.ranges(r.seqs)[-1][1],
                        "oldest_at": r.oldest_at,
                    },
                )
                total += r.n_events
            taken = [r.txn_id for r in rows]
            # Exactly the rows replayed are marked, by primary key: a dead letter stored
            # meanwhile stays a dead letter.
            marked = conn.execute(
                _MARK_REPLAYED, {"p_target": target_id, "p_txns": taken, "p_now": now}
            )
            if marked.rowcount != len(taken):
                raise StoreError(
                    f"replaying {target_id!r}: {len(taken)} dead letters read, "
                    f"{marked.rowcount} replayed; nothing was replayed from this chunk"
                )
            self._events_added(conn, [target_id])
            return taken[-1], high, total

        async def replay() -> int:
            total = 0
            last: int | None = None
            high: int | None = None
            while True:
                last, high, n = await self._run(replay_chunk, last, high)
                total += n
                if last is None or high is None or last >= high:
                    return total

        return Deferred.fromCoroutine(replay())

    # -- operators' commands --------------------------------------------------------------------

    def add_command(
        self, target_id: str, action: str, now: float, txn_id: int | None = None
    ) -> Deferred[int]:
        if action not in COMMAND_ACTIONS:
            raise ValueError(
                f"unknown command {action!r}: one of {', '.join(sorted(COMMAND_ACTIONS))}"
            )

        def add(conn: sa.Connection) -> int:
            key = conn.execute(
                sa.insert(_cmd).values(
                    target_id=target_id, action=action, txn_id=txn_id, created_at=now
                )
            ).inserted_primary_key
            assert key is not None
            command_id = key[0]
            self._command_added(conn, target_id)
            return int(command_id)

        return self._run(add)

    def _command_added(self, conn: sa.Connection, target_id: str) -> None:
        """Called inside the transaction that records a command; a backend may notify others."""

    def command(self, command_id: int) -> Deferred[Command | None]:
        def read(conn: sa.Connection) -> Command | None:
            row = conn.execute(sa.select(_cmd).where(_cmd.c.command_id == command_id)).first()
            return _command(row) if row is not None else None

        return self._read(read)

    def pending_commands(self, limit: int, after: int | None = None) -> Deferred[list[Command]]:
        def read(conn: sa.Connection) -> list[Command]:
            query = sa.select(_cmd).where(_cmd.c.done_at.is_(None))
            if after is not None:
                query = query.where(_cmd.c.command_id > after)
            rows = conn.execute(query.order_by(_cmd.c.command_id).limit(limit))
            return [_command(r) for r in rows]

        return self._read(read)

    def finish_command(
        self, command_id: int, now: float, done_by: str, result: str
    ) -> Deferred[bool]:
        def finish(conn: sa.Connection) -> bool:
            done = conn.execute(
                sa.update(_cmd)
                .where(_cmd.c.command_id == command_id, _cmd.c.done_at.is_(None))
                .values(done_at=now, done_by=done_by, result=result)
            )
            # What was applied a day ago has been seen by whoever waited for it.
            conn.execute(sa.delete(_cmd).where(_cmd.c.done_at < now - _COMMANDS_KEPT))
            return bool(done.rowcount == 1)

        return self._run(finish)

    def _take_dead_letters(
        self, conn: sa.Connection, target_id: str, after: int | None, high: int, limit: int
    ) -> list[Any]:
        """A target's next dead letters to replay, oldest first, with ids in ``(after, high]``."""
        return list(
            conn.execute(
                _DEAD_CHUNK,
                {
                    "p_target": target_id,
                    "p_after": after if after is not None else -1,
                    "p_high": high,
                    "p_limit": limit,
                },
            ).all()
        )

    # -- events ---------------------------------------------------------------------------------

    def event_status(self, event_id: str) -> Deferred[EventStatus | None]:
        def status(conn: sa.Connection) -> EventStatus | None:
            row = self._find_event(conn, event_id)
            if row is None:
                return None
            targets = conn.execute(
                sa.select(_s.c.targets).where(_s.c.set_id == row.set_id)
            ).scalar()
            deliveries = {}
            for target_id in (targets or "").split("\n"):
                if target_id:
                    deliveries[target_id] = self._delivery(conn, target_id, row.seq)
            return EventStatus(
                event_id=event_id,
                submitted_at=row.submitted_at,
                expires_at=row.expires_at,
                deliveries=deliveries,
            )

        return self._read_snapshot(status)

    def _find_event(self, conn: sa.Connection, event_id: str) -> Any:
        """The event with this id, as ``(seq, submitted_at, expires_at, set_id)``; or None."""
        if event_id.startswith(GENERATED_ID_PREFIX):
            number = event_id[len(GENERATED_ID_PREFIX) :]
            if not number.isdigit() or len(number) > 18:
                return None
            seq = int(number)
        else:
            known = conn.execute(sa.select(_ei.c.seq).where(_ei.c.event_id == event_id)).scalar()
            if known is None:
                return None
            seq = int(known)
        block = conn.execute(
            sa.select(_ae.c.seqs, _ae.c.set_id, _ae.c.submitted_at, _ae.c.expires, _ae.c.ids)
            .where(_ae.c.first_seq <= seq)
            .order_by(_ae.c.first_seq.desc())
            .limit(1)
        ).first()
        if block is None:
            return None
        numbers = _seqs.decode(block.seqs)
        if seq not in numbers:
            return None
        j = numbers.index(seq)
        named = json.loads(block.ids)[j] if block.ids else None
        if named != (None if event_id.startswith(GENERATED_ID_PREFIX) else event_id):
            # "relayer-<n>" names only an event without an id of the application's.
            return None
        expires_at = json.loads(block.expires)[j] if block.expires else None
        return _Found(seq, block.submitted_at, expires_at, block.set_id)

    def _delivery(self, conn: sa.Connection, target_id: str, seq: int) -> Delivery:
        """Where the event ``seq`` stands at ``target_id``."""
        expired = conn.execute(
            sa.select(_axp.c.expired_at, _axp.c.txn_id).where(
                _axp.c.target_id == target_id, _axp.c.seq == seq
            )
        ).first()
        if expired is not None:
            # The abandoned transaction that held it, if it was sent in one.
            sent = None
            if expired.txn_id is not None:
                sent = conn.execute(
                    sa.select(_ax.c.attempts, _ax.c.last_attempt_at).where(
                        _ax.c.target_id == target_id, _ax.c.txn_id == expired.txn_id
                    )
                ).first()
            return Delivery(
                target_id,
                DeliveryState.EXPIRED,
                txn_id=expired.txn_id,
                attempts=sent.attempts if sent is not None else 0,
                last_attempt_at=sent.last_attempt_at if sent is not None else None,
                expired_at=expired.expired_at,
            )
        target = conn.execute(
            sa.select(_t.c.state, _t.c.next_attempt_at, _t.c.max_span).where(
                _t.c.target_id == target_id
            )
        ).first()
        next_at = target.next_attempt_at if target is not None else None
        for (run_seqs,) in conn.execute(
            sa.select(_r.c.seqs).where(
                _r.c.target_id == target_id, _r.c.first_seq <= seq, _r.c.last_seq >= seq
            )
        ):
            if _seqs.contains(run_seqs, seq):
                return Delivery(target_id, DeliveryState.PENDING, next_attempt_at=next_at)
        span = int(target.max_span) if target is not None else 0
        # Every transaction that holds the event starts within max_span of it: the newest
        # one that is not abandoned says where the event stands.
        for txn in conn.execute(
            sa.select(_ax)
            .where(
                _ax.c.target_id == target_id,
                _ax.c.first_seq >= seq - span,
                _ax.c.first_seq <= seq,
                _ax.c.last_seq >= seq,
            )
            .order_by(_ax.c.txn_id.desc())
        ):
            if txn.state == schema.TXN_ABANDONED or not _seqs.contains(txn.seqs, seq):
                continue
            common = {
                "txn_id": txn.txn_id,
                "attempts": txn.attempts,
                "last_attempt_at": txn.last_attempt_at,
            }
            if txn.state == _PENDING:
                return Delivery(target_id, DeliveryState.PENDING, next_attempt_at=next_at, **common)
            if txn.state == _AWAITING:
                return Delivery(
                    target_id,
                    DeliveryState.AWAITING_CONFIRMATION,
                    confirm_by=txn.confirm_by,
                    **common,
                )
            if txn.state == _DELIVERED_STATE:
                return Delivery(
                    target_id, DeliveryState.DELIVERED, delivered_at=txn.done_at, **common
                )
            if txn.state == _DEAD:
                return Delivery(target_id, DeliveryState.DEAD_LETTERED, reason=txn.reason, **common)
            if txn.state == _DISCARDED:
                return Delivery(
                    target_id,
                    DeliveryState.DISCARDED,
                    reason=txn.reason,
                    discarded_at=txn.done_at,
                    **common,
                )
            # Replayed: its events are queued again, or in a newer transaction found first.
            break
        return Delivery(target_id, DeliveryState.PENDING, next_attempt_at=next_at)

    def target_events(
        self,
        target_id: str,
        state: DeliveryState,
        after: str | None,
        limit: int,
        since: float | None = None,
        until: float | None = None,
        with_events: bool = False,
    ) -> Deferred[TargetEventsPage]:
        def page(conn: sa.Connection) -> TargetEventsPage:
            return _TargetEvents(
                self, conn, target_id, state, after, limit, since, until, with_events
            ).page()

        return self._read_snapshot(page)

    def event_counts(
        self, target_id: str, since: float | None, until: float | None
    ) -> Deferred[EventCounts]:
        def counts(conn: sa.Connection) -> EventCounts:
            def window(column: Any) -> list[Any]:
                return _in_window(column, since, until)

            queued = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(_r.c.n_events), 0)).where(
                    _r.c.target_id == target_id
                )
            ).scalar()
            by_state = {
                state: int(n or 0)
                for state, n in conn.execute(
                    sa.select(_x.c.state, sa.func.sum(_x.c.n_events))
                    .where(_x.c.target_id == target_id, _OPEN)
                    .group_by(_x.c.state)
                )
            }
            dead = conn.execute(
                sa.select(sa.func.sum(_x.c.n_events)).where(
                    _x.c.target_id == target_id, _IS_DEAD, *window(_x.c.done_at)
                )
            ).scalar()
            done = {
                state: int(n or 0)
                for state, n in conn.execute(
                    sa.select(_ax.c.state, sa.func.sum(_ax.c.n_events))
                    .where(
                        _ax.c.target_id == target_id,
                        _ax.c.state.in_([_DELIVERED_STATE, _DISCARDED]),
                        *window(_ax.c.done_at),
                    )
                    .group_by(_ax.c.state)
                )
            }
            expired = conn.execute(
                sa.select(sa.func.count()).where(
                    _axp.c.target_id == target_id, *window(_axp.c.expired_at)
                )
            ).scalar()
            return EventCounts(
                pending=int(queued or 0) + by_state.get(_PENDING, 0),
                awaiting_confirmation=by_state.get(_AWAITING, 0),
                delivered=done.get(_DELIVERED_STATE, 0),
                expired=int(expired or 0),
                dead_lettered=int(dead or 0),
                discarded=done.get(_DISCARDED, 0),
            )

        return self._read_snapshot(counts)

    def discard(self, target_id: str, txn_id: int, now: float) -> Deferred[bool]:
        def discard(conn: sa.Connection) -> bool:
            done = conn.execute(
                sa.update(_x)
                .where(_x.c.target_id == target_id, _x.c.txn_id == txn_id, _IS_DEAD)
                .values(state=_DISCARDED, done_at=now)
            )
            return bool(done.rowcount == 1)

        return self._run(discard)

    def purge(
        self,
        rule: _retention.RetentionRule,
        now: float,
        *,
        archive: bool = False,
        dry_run: bool = False,
        chunk: int = 2000,
        progress: Callable[[PurgeReport], None] | None = None,
        keep_going: Callable[[], bool] | None = None,
    ) -> Deferred[PurgeReport]:
        """
        Purge (or archive) the final events that have passed their retention, a chunk at a
        time, each chunk in a database transaction of its own; see :class:`relayer.Retention`.

        Args:
            rule: How long each target keeps its final events.
            now: The time (clock seconds) that retention is measured to.
            archive: Move them to the archive tables instead of deleting them.
            dry_run: Change nothing; report what would go. A transaction whose events would
                go over several chunks is not counted.
            chunk: About how many event numbers one database transaction looks at.
            progress: Called on the reactor thread with the totals so far after each chunk.
            keep_going: Asked before each chunk after the first; the run stops when it
                answers False (a scheduler that is stopping).

        Returns:
            A Deferred firing with the totals. On PostgreSQL, a run that finds another
            process's run under way stops at once, and reports what it did. A run that stops
            before the end, either way, reports ``stopped``.
        """

        def one_chunk(conn: sa.Connection, after: int) -> _retention.ChunkResult | None:
            if not dry_run and not self._retention_lock(conn):
                return None
            return _retention.purge_chunk(conn, rule, now, after, chunk, archive, dry_run)

        async def run() -> PurgeReport:
            report = PurgeReport(archived=archive, dry_run=dry_run)
            after: int | None = -1
            while after is not None:
                if dry_run:
                    found = await self._read(one_chunk, after)
                else:
                    found = await self._run(one_chunk, after)
                if found is None:
                    report = attrs.evolve(report, stopped=True)
                    break
                by_target = dict(report.by_target)
                for target_id, n in found.by_target.items():
                    by_target[target_id] = by_target.get(target_id, 0) + n
                report = attrs.evolve(
                    report,
                    events=report.events + found.events,
                    transactions=report.transactions + found.transactions,
                    expired=report.expired + found.expired,
                    not_final=report.not_final + found.not_final,
                    by_target=by_target,
                    chunks=report.chunks + 1,
                )
                if progress is not None:
                    progress(report)
                after = found.next_after
                if after is not None and keep_going is not None and not keep_going():
                    report = attrs.evolve(report, stopped=True)
                    break
            return report

        return Deferred.fromCoroutine(run())

    # -- leases ---------------------------------------------------------------------------------

    def _check_lease(self, conn: sa.Connection, target_id: str, now: float) -> None:
        owner = self.lease_owner
        if owner is None:
            return
        row = conn.execute(
            sa.select(_l.c.owner, _l.c.expires_at)
            .where(_l.c.target_id == target_id)
            .with_for_update()
        ).first()
        if row is None or row.owner != owner or row.expires_at <= now:
            raise LeaseLost(f"this process ({owner}) does not hold the lease on {target_id!r}")

    def lease_round(
        self, node_id: str, target_ids: Sequence[str], timeout: float, now: float
    ) -> Deferred[LeaseRound]:
        ids = list(dict.fromkeys(target_ids))
        until = now + timeout

        def round_(conn: sa.Connection) -> LeaseRound:
            # Heartbeat; forget processes that have been silent for long. A process with no
            # targets (one that only submits) takes no share, so it does not count as live:
            # the others would otherwise give it targets it never delivers to.
            if ids:
                conn.execute(
                    self._insert_ignoring_conflicts(_n),
                    [{"node_id": node_id, "expires_at": until}],
                )
                conn.execute(sa.update(_n).where(_n.c.node_id == node_id).values(expires_at=until))
            else:
                conn.execute(sa.delete(_n).where(_n.c.node_id == node_id))
            conn.execute(sa.delete(_n).where(_n.c.expires_at < now - 10 * timeout))
            live = conn.execute(
                sa.select(sa.func.count()).select_from(_n).where(_n.c.expires_at > now)
            ).scalar_one()
            for chunk in _chunks(ids):
                conn.execute(
                    self._insert_ignoring_conflicts(_l),
                    [{"target_id": t, "owner": None, "expires_at": 0.0} for t in chunk],
                )
            owned = set(
                conn.execute(
                    sa.update(_l)
                    .where(_l.c.owner == node_id)
                    .values(expires_at=until)
                    .returning(_l.c.target_id)
                ).scalars()
            )
            fair = -(-len(ids) // max(1, live))
            acquired: set[str] = set()
            wanted = fair - len(owned & set(ids))
            if wanted > 0:
                free = sa.or_(_l.c.owner.is_(None), _l.c.expires_at <= now)
                candidates: list[str] = []
                # The lease each candidate had: another process's that expired, or none.
                expired: dict[str, float] = {}
                for chunk in _chunks(ids):
                    query = (
                        sa.select(_l.c.target_id, _l.c.owner, _l.c.expires_at)
                        .where(_l.c.target_id.in_(chunk), free)
                        .order_by(_l.c.target_id)
                        .limit(wanted - len(candidates))
                    )
                    if conn.dialect.name == "postgresql":
                        query = query.with_for_update(skip_locked=True)
                    for target_id, owner, expires_at in conn.execute(query):
                        candidates.append(target_id)
                        if owner is not None and owner != node_id:
                            expired[target_id] = float(expires_at)
                    if len(candidates) >= wanted:
                        break
                for chunk in _chunks(candidates):
                    # The condition is checked again under the row lock, so two processes
                    # never both take the same lease.
                    acquired.update(
                        conn.execute(
                            sa.update(_l)
                            .where(_l.c.target_id.in_(chunk), free)
                            .values(owner=node_id, expires_at=until)
                            .returning(_l.c.target_id)
                        ).scalars()
                    )
            next_expiry = conn.execute(
                sa.select(sa.func.min(_l.c.expires_at)).where(
                    _l.c.owner.is_not(None), _l.c.owner != node_id, _l.c.expires_at > now
                )
            ).scalar()
            return LeaseRound(
                owned=frozenset(owned | acquired),
                acquired=frozenset(acquired),
                live_nodes=int(live),
                fair_share=fair,
                next_expiry=next_expiry,
                taken_over={t: expired[t] for t in acquired if t in expired},
            )

        return self._run(round_, pool=self._lease_pool)

    def release_leases(self, node_id: str, target_ids: Sequence[str] | None) -> Deferred[None]:
        def release(conn: sa.Connection) -> None:
            free = {"owner": None, "expires_at": 0.0}
            if target_ids is None:
                conn.execute(sa.update(_l).where(_l.c.owner == node_id).values(**free))
                conn.execute(sa.delete(_n).where(_n.c.node_id == node_id))
                return
            for chunk in _chunks(list(target_ids)):
                conn.execute(
                    sa.update(_l)
                    .where(_l.c.owner == node_id, _l.c.target_id.in_(chunk))
                    .values(**free)
                )

        return self._run(release, pool=self._lease_pool)


def _in_window(column: Any, since: float | None, until: float | None) -> list[Any]:
    """The conditions that ``column``, a time, is from ``since`` (included) to ``until``."""
    found = []
    if since is not None:
        found.append(column >= since)
    if until is not None:
        found.append(column < until)
    return found


def _check_version(conn: sa.Connection) -> None:
    found = schema.read_version(conn)
    if found != schema.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the database has relayer schema version {found}, and this relayer reads version "
            f"{schema.SCHEMA_VERSION} (nothing was changed)"
        )


def _in_transaction(
    engine: sa.Engine,
    pool: DatabasePool,
    f: Callable[..., T],
    *args: Any,
    finish: Callable[[sa.Connection], None] | None = None,
) -> Deferred[T]:
    """
    Run ``f(connection, *args)`` on ``pool``, in one database transaction on ``engine``; then
    ``finish(connection)``, if given, before the commit.
    """
    # The driver's own errors, raised by the cursors of its own that the hot path uses.
    dbapi_error = engine.dialect.loaded_dbapi.Error

    def in_transaction() -> T:
        try:
            try:
                return attempt()
            except _Reconnected:
                # The connection had been lost (the server ended it, say) before anything of
                # the unit could be committed: run it again, once, on a new connection.
                return attempt()
        except _Reconnected as e:
            raise StoreUnavailable(
                f"the database is unavailable: {_db_message(e.__cause__ or e)}"
            ) from e.__cause__
        except _TRANSIENT as e:
            raise StoreUnavailable(f"the database is unavailable: {_db_message(e)}") from e
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"the database operation failed: {_db_message(e)}") from e

    def attempt() -> T:
        with engine.begin() as conn:
            try:
                result = f(conn, *args)
            except sa.exc.DBAPIError as e:
                # Raised before the commit was sent: nothing of the unit was committed.
                if e.connection_invalidated:
                    raise _Reconnected() from e
                raise
            except dbapi_error as e:
                # From a cursor of the driver's own (the hot path reads blocks through one),
                # which SQLAlchemy does not see: classified as SQLAlchemy would have, and a
                # connection found dead is thrown away rather than put back in the pool.
                raw = conn.connection.dbapi_connection
                if engine.dialect.is_disconnect(e, raw, None):
                    conn.invalidate(e)
                    raise _Reconnected() from e
                raise sa.exc.DBAPIError.instance(
                    None, None, e, dbapi_error, dialect=engine.dialect
                ) from e
            # Not run again if it fails: it may send the COMMIT (PostgresStore._finish), and a
            # connection lost then leaves it unknown whether the unit was committed.
            if finish is not None:
                finish(conn)
            return result

    return pool.run(in_transaction)


class _Reconnected(Exception):
    """The connection was lost before the unit of work could commit: it may run again."""


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    """Cut a list into pieces small enough for an IN (...) list."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _record(row: Any, has_pending: bool) -> TargetRecord:
    return TargetRecord(
        target_id=row.target_id,
        state=TargetState(row.state),
        failures=row.failures,
        next_attempt_at=row.next_attempt_at,
        last_success_at=row.last_success_at,
        last_txn_id=row.last_txn_id,
        last_error=row.last_error,
        has_pending=has_pending,
        down_since=row.down_since,
    )


@attrs.frozen
class _Found:
    seq: int
    submitted_at: float
    expires_at: float | None
    set_id: int


def _deadline(row: Any, ttl: float | None) -> float | None:
    """An event's deadline at a target whose default time to live is ``ttl``."""
    if row[3] is not None:
        return float(row[3])
    if ttl is not None:
        return float(row[2]) + ttl
    return None


def _earliest(rows: Sequence[Any], ttl: float | None) -> float | None:
    """The earliest deadline of these events, or None if none has one."""
    if ttl is None and all(row[3] is None for row in rows):
        return None
    found = None
    for row in rows:
        d = _deadline(row, ttl)
        if d is not None and (found is None or d < found):
            found = d
    return found


def _event_id(row: Any) -> str:
    return row[4] if row[4] is not None else f"{GENERATED_ID_PREFIX}{row[0]}"


def _transaction(
    target_id: str,
    txn_id: int,
    rows: Sequence[Any],
    attempts: int,
    oldest_at: float,
    ttl: float | None,
) -> Transaction:
    return Transaction(
        target_id=target_id,
        txn_id=txn_id,
        events=tuple([bytes(r[1]) for r in rows]),
        seqs=tuple([r[0] for r in rows]),
        attempts=attempts,
        oldest_at=oldest_at,
        deadline=_earliest(rows, ttl),
        named={r[0]: r[4] for r in rows if r[4] is not None},
    )


_TXN_STATE_OF = {
    DeliveryState.PENDING: _PENDING,
    DeliveryState.AWAITING_CONFIRMATION: _AWAITING,
    DeliveryState.DELIVERED: _DELIVERED_STATE,
    DeliveryState.DEAD_LETTERED: _DEAD,
    DeliveryState.DISCARDED: _DISCARDED,
}


# Each state's table and condition on transactions. Open transactions and dead letters are
# never archived: they are read from the live table, through its partial indexes; delivered
# and discarded ones from live and archived rows alike.
_STATE_CONDITIONS: dict[DeliveryState, tuple[Any, tuple[Any, ...]]] = {
    DeliveryState.PENDING: (_x, (_OPEN, sa.text("relayer_txns.state = 'pending'"))),
    DeliveryState.AWAITING_CONFIRMATION: (
        _x,
        (_OPEN, sa.text("relayer_txns.state = 'awaiting'")),
    ),
    DeliveryState.DELIVERED: (_ax, (_ax.c.state == _DELIVERED_STATE,)),
    DeliveryState.DEAD_LETTERED: (_x, (_IS_DEAD,)),
    DeliveryState.DISCARDED: (_ax, (_ax.c.state == _DISCARDED,)),
}


class _TargetEvents:
    """
    One page of a target's events in one state, oldest first, read by keyset.

    The cursor says where the page before ended: ``x:<seq>`` among expired events,
    ``t:<txn_id>:<index>`` in a transaction, ``q:<pos>:<id>:<index>`` in a queued run (pending
    events are those of pending transactions, in id order, then those of the queue, in order).
    """

    #: How many transactions or runs one query reads.
    batch = 64

    def __init__(
        self,
        store: SQLStore,
        conn: sa.Connection,
        target_id: str,
        state: DeliveryState,
        after: str | None,
        limit: int,
        since: float | None = None,
        until: float | None = None,
        with_events: bool = False,
    ) -> None:
        self.store = store
        self.conn = conn
        self.target_id = target_id
        self.state = state
        self.limit = limit
        self.since = since
        self.until = until
        #: Whether the entries carry their events' bytes.
        self.with_events = with_events
        self.cursor = parse_cursor(after)
        # (seq, txn_id, attempts, last_attempt_at, at)
        self.found: list[tuple[int, int | None, int, float | None, float | None]] = []
        self.next: str | None = None

    def page(self) -> TargetEventsPage:
        if self.state is DeliveryState.EXPIRED:
            self._expired()
        else:
            kind = self.cursor[0] if self.cursor else "t"
            if kind == "t":
                self._transactions()
            if self.state is DeliveryState.PENDING and self.next is None:
                # After the pending transactions, the queue: from where the page before
                # stopped, or, when this page is full already, to say where the next begins.
                self._queue()
        return TargetEventsPage(self._entries(), self.next)

    def _full(self) -> bool:
        return len(self.found) >= self.limit

    def _window(self, column: Any) -> list[Any]:
        return _in_window(column, self.since, self.until)

    def _expired(self) -> None:
        after = int(self.cursor[1]) if self.cursor else -1
        rows = self.conn.execute(
            sa.select(_axp.c.seq, _axp.c.expired_at, _axp.c.txn_id)
            .where(
                _axp.c.target_id == self.target_id,
                _axp.c.seq > after,
                *self._window(_axp.c.expired_at),
            )
            .order_by(_axp.c.seq)
            .limit(self.limit + 1)
        ).all()
        # The abandoned transactions they had been sent in, as event_status reports them.
        sent = sorted({r.txn_id for r in rows if r.txn_id is not None})
        tried: dict[int, tuple[int, float | None]] = {}
        for chunk in range(0, len(sent), _IN_CHUNK):
            for txn_id, attempts, last in self.conn.execute(
                sa.select(_ax.c.txn_id, _ax.c.attempts, _ax.c.last_attempt_at).where(
                    _ax.c.target_id == self.target_id,
                    _ax.c.txn_id.in_(sent[chunk : chunk + _IN_CHUNK]),
                )
            ):
                tried[txn_id] = (attempts, last)
        for seq, at, txn_id in rows[: self.limit]:
            attempts, last = tried.get(txn_id, (0, None)) if txn_id is not None else (0, None)
            self.found.append((seq, txn_id, attempts, last, at))
        if len(rows) > self.limit:
            self.next = f"x:{rows[self.limit - 1][0]}"

    def _transactions(self) -> None:
        state = _TXN_STATE_OF[self.state]
        table, conditions = _STATE_CONDITIONS[self.state]
        txn, index = (int(self.cursor[1]), int(self.cursor[2])) if self.cursor else (-1, 0)
        while True:
            c = table.c
            rows = self.conn.execute(
                sa.select(c.txn_id, c.seqs, c.attempts, c.last_attempt_at, c.done_at)
                .where(
                    c.target_id == self.target_id,
                    *conditions,
                    c.txn_id >= txn,
                    *self._window(c.done_at),
                )
                .order_by(c.txn_id)
                .limit(self.batch)
            ).all()
            for row in rows:
                seqs = _seqs.decode(row.seqs)
                start = index if row.txn_id == txn else 0
                at = row.done_at if state in (_DELIVERED_STATE, _DEAD, _DISCARDED) else None
                for i in range(start, len(seqs)):
                    if self._full():
                        self.next = f"t:{row.txn_id}:{i}"
                        return
                    self.found.append((seqs[i], row.txn_id, row.attempts, row.last_attempt_at, at))
            if len(rows) < self.batch:
                return
            txn, index = rows[-1].txn_id + 1, 0

    def _queue(self) -> None:
        if self.cursor and self.cursor[0] == "q":
            pos, run_id, index = int(self.cursor[1]), int(self.cursor[2]), int(self.cursor[3])
        else:
            pos, run_id, index = None, -1, 0
        while True:
            query = (
                sa.select(_r.c.pos, _r.c.id, _r.c.seqs)
                .where(_r.c.target_id == self.target_id)
                .order_by(_r.c.pos, _r.c.id)
                .limit(self.batch)
            )
            if pos is not None:
                query = query.where(
                    sa.or_(_r.c.pos > pos, sa.and_(_r.c.pos == pos, _r.c.id >= run_id))
                )
            rows = self.conn.execute(query).all()
            for row in rows:
                seqs = _seqs.decode(row.seqs)
                start = index if (row.pos, row.id) == (pos, run_id) else 0
                for i in range(start, len(seqs)):
                    if self._full():
                        self.next = f"q:{row.pos}:{row.id}:{i}"
                        return
                    self.found.append((seqs[i], None, 0, None, None))
            if len(rows) < self.batch:
                return
            pos, run_id, index = rows[-1].pos, rows[-1].id + 1, 0

    def _entries(self) -> list[EventEntry]:
        seqs = [f[0] for f in self.found]
        info = _event_info(self.conn, seqs)
        events: dict[int, bytes] = {}
        if self.with_events:
            for row in self.store._load_events(self.conn, seqs, strict=False, archived=True):
                events[row[0]] = bytes(row[1])
        entries = []
        for seq, txn_id, attempts, last_attempt_at, at in self.found:
            found = info.get(seq)
            if found is None:
                continue
            entries.append(
                EventEntry(
                    event_id=found[1],
                    submitted_at=found[0],
                    txn_id=txn_id,
                    attempts=attempts,
                    last_attempt_at=last_attempt_at,
                    at=at,
                    event=events.get(seq),
                )
            )
        return entries


#: How far apart two ranges of numbers may be and still be read in one query.
_STRETCH_GAP = 1024


def _event_info(conn: sa.Connection, seqs: list[int]) -> dict[int, tuple[float, str]]:
    """
    The time each of these events was submitted, and its id, by number, among live and
    archived events: read from the blocks' columns, without their events' bytes.
    """
    if not seqs:
        return {}
    wanted = set(seqs)
    # One query per stretch of numbers, rather than per range: the events of a target whose
    # numbers interleave with others' are read a page at a time, not one by one.
    stretches: list[list[int]] = []
    for low, high in _seqs.ranges(_seqs.encode(sorted(wanted))):
        if stretches and low - stretches[-1][1] <= _STRETCH_GAP:
            stretches[-1][1] = high
        else:
            stretches.append([low, high])
    found: dict[int, tuple[float, str]] = {}
    for low, high in stretches:
        # The last block that begins at or before ``low`` (see "select_all_blocks").
        start = conn.execute(
            sa.select(_ae.c.first_seq)
            .where(_ae.c.first_seq <= low)
            .order_by(_ae.c.first_seq.desc())
            .limit(1)
        ).scalar()
        for numbers, submitted_at, ids in conn.execute(
            sa.select(_ae.c.seqs, _ae.c.submitted_at, _ae.c.ids)
            .where(_ae.c.first_seq >= (start if start is not None else low))
            .where(_ae.c.first_seq <= high)
        ):
            names = json.loads(ids) if ids else None
            for j, seq in enumerate(_seqs.decode(numbers)):
                if seq in wanted:
                    name = names[j] if names else None
                    found[seq] = (submitted_at, name or f"{GENERATED_ID_PREFIX}{seq}")
    return found


_INTEGER = re.compile(r"-?[0-9]{1,19}")


def parse_cursor(after: str | None) -> tuple[str, ...] | None:
    """The parts of a cursor that :class:`_TargetEvents` wrote; ValueError if it did not."""
    if after is None:
        return None
    parts = tuple(after.split(":"))
    shapes = {"x": 2, "t": 3, "q": 4}
    if not parts or shapes.get(parts[0]) != len(parts):
        raise ValueError(f"not a cursor of target_events: {after!r}")
    if not all(_INTEGER.fullmatch(p) for p in parts[1:]):
        raise ValueError(f"not a cursor of target_events: {after!r}")
    return parts


#: How long an applied command is kept, in seconds, for those that wait to see it done.
_COMMANDS_KEPT = 86400.0


def _command(row: Any) -> Command:
    return Command(
        command_id=int(row.command_id),
        target_id=row.target_id,
        action=row.action,
        txn_id=row.txn_id,
        created_at=row.created_at,
        done_at=row.done_at,
        done_by=row.done_by,
        result=row.result,
    )
