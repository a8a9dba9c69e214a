"""
The store on SQLAlchemy Core, shared by every SQL backend.

Each public method runs one database transaction, as one function handed to the store's
:class:`relayer.dbpool.DatabasePool`, so no database work ever happens on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from relayer import _encoding, _faults
from relayer.dbpool import DatabasePool
from relayer.errors import LeaseLost, StoreError, StoreUnavailable
from relayer.store import schema
from relayer.store.base import (
    DeadLetter,
    ILeaseStore,
    LeaseRound,
    QueueCounts,
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
_q = schema.queue
_x = schema.transactions
_d = schema.dead_letters

# The statements of the delivery path, built once: building a statement costs several times
# more than running it. Their values are bound at execution.
_HEAD_TXN = (
    sa.select(_x.c.txn_id, _x.c.body, _x.c.n_events, _x.c.attempts, _x.c.oldest_at)
    .where(_x.c.target_id == sa.bindparam("p_target"))
    .order_by(_x.c.txn_id)
    .limit(1)
)
_COUNT_ATTEMPT = (
    sa.update(_x)
    .where(_x.c.target_id == sa.bindparam("p_target"), _x.c.txn_id == sa.bindparam("p_txn"))
    .values(attempts=sa.bindparam("p_attempts"), last_attempt_at=sa.bindparam("p_now"))
)
_QUEUE_HEAD = (
    sa.select(_q.c.id, _q.c.n_events, _q.c.events, _q.c.oldest_at)
    .where(_q.c.target_id == sa.bindparam("p_target"))
    .order_by(_q.c.pos, _q.c.id)
    # Each run holds at least one event, so no more runs than events are needed; they are
    # fetched a few at a time, so a long backlog is never read into memory.
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
    .execution_options(yield_per=8)
)
_DELETE_RUNS = sa.delete(_q).where(_q.c.id.in_(sa.bindparam("p_ids", expanding=True)))
_SHORTEN_RUN = (
    sa.update(_q)
    .where(_q.c.id == sa.bindparam("p_id"))
    .values(n_events=sa.bindparam("p_n"), events=sa.bindparam("p_events"))
)
_INSERT_TXN = sa.insert(_x)
_NEXT_TXN_ID = (
    sa.update(_t)
    .where(_t.c.target_id == sa.bindparam("p_target"))
    .values(last_txn_id=_t.c.last_txn_id + 1)
    .returning(_t.c.last_txn_id)
)
_MARK_UP = (
    sa.update(_t)
    .where(_t.c.target_id == sa.bindparam("p_target"), _t.c.state != TargetState.UP.value)
    .values(state=TargetState.UP.value, failures=0, next_attempt_at=None)
)
_DELETE_TXN = sa.delete(_x).where(
    _x.c.target_id == sa.bindparam("p_target"), _x.c.txn_id == sa.bindparam("p_txn")
)
_DELIVERED = (
    sa.update(_t)
    .where(_t.c.target_id == sa.bindparam("p_target"))
    .values(
        last_success_at=sa.bindparam("p_now"),
        failures=0,
        next_attempt_at=None,
        last_error=None,
        # A woken BLOCKED target that delivers its head transaction is draining: DOWN, like
        # a recovering target, so a restart goes on with the drain instead of waiting.
        state=sa.case(
            (_t.c.state == TargetState.BLOCKED.value, TargetState.DOWN.value),
            else_=_t.c.state,
        ),
    )
)

# Replay: the target's row, locked; a chunk of dead letters in txn_id order; deleting exactly
# those.
_LOCK_TARGET = (
    sa.select(_t.c.target_id).where(_t.c.target_id == sa.bindparam("p_target")).with_for_update()
)
_DEAD_CHUNK = (
    sa.select(_d.c.txn_id, _d.c.body, _d.c.oldest_at)
    .where(
        _d.c.target_id == sa.bindparam("p_target"),
        _d.c.txn_id > sa.bindparam("p_after"),
        _d.c.txn_id <= sa.bindparam("p_high"),
    )
    .order_by(_d.c.txn_id)
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
    # Fetched a few at a time: a chunk stops early once it holds _REPLAY_BYTES.
    .execution_options(yield_per=8)
)
#: A replay chunk takes no more dead letters once it holds this many bytes.
_REPLAY_BYTES = 8 * 1024 * 1024
_INSERT_RUN = sa.insert(_q)
_DELETE_DEAD = sa.delete(_d).where(
    _d.c.target_id == sa.bindparam("p_target"),
    _d.c.txn_id.in_(sa.bindparam("p_txns", expanding=True)),
)
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
        # Lease rounds must not queue behind a backlog of other work, or leases would lapse
        # under load: a backend with several connections gives them a thread of their own.
        self._lease_pool = lease_pool
        # Reads that change nothing (status, dead letters, loading targets) may run on
        # connections of their own, beside the writer: see :meth:`_read`.
        self._read_engine = read_engine if read_engine is not None else engine
        self._read_pool = read_pool

    def __repr__(self) -> str:
        # The URL is shown without its password.
        return f"<{type(self).__name__} {self._engine.url.render_as_string(hide_password=True)}>"

    # -- plumbing -------------------------------------------------------------------------------

    def _run(
        self, f: Callable[..., T], *args: Any, pool: DatabasePool | None = None
    ) -> Deferred[T]:
        return _in_transaction(self._engine, pool or self._pool, f, *args)

    def _read(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run ``f(connection, *args)`` in a database transaction that only reads.

        It runs on the store's read engine and read pool, when it has them, so that it never
        waits for the writer (on SQLite, a read transaction begins DEFERRED, and WAL lets it
        read beside the writer); otherwise as any other unit of work, but never grouped with
        writes.
        """
        return _in_transaction(self._read_engine, self._read_pool or self._pool, f, *args)

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        self._pool.start()
        if self._lease_pool is not None:
            self._lease_pool.start()
        if self._read_pool is not None:
            self._read_pool.start()

        def upgrade(conn: sa.Connection) -> None:
            before, after = schema.upgrade(conn)
            if before != after:
                self.log.info(
                    "Upgraded the relayer schema from version {before} to {after}",
                    before=before,
                    after=after,
                )

        return self._run(upgrade)

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
            if not orphans and all(t in records for t in ids):
                return records
            # Events may have been stored for a target while its registration had not reached
            # the store yet: the write registers it, and checks again.
            return await self._run(self._register_targets, ids)

        return Deferred.fromCoroutine(register())

    def load_targets(self, target_ids: Sequence[str]) -> Deferred[dict[str, TargetRecord]]:
        ids = list(dict.fromkeys(target_ids))

        def load(conn: sa.Connection) -> dict[str, TargetRecord]:
            records = {}
            for chunk in _chunks(ids):
                pending = set(
                    conn.execute(
                        sa.select(_q.c.target_id).where(_q.c.target_id.in_(chunk)).distinct()
                    ).scalars()
                )
                pending.update(
                    conn.execute(
                        sa.select(_x.c.target_id).where(_x.c.target_id.in_(chunk)).distinct()
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
                queued = sa.exists().where(_q.c.target_id == _t.c.target_id)
                formed = sa.exists().where(_x.c.target_id == _t.c.target_id)
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
        missing = [t for t in dict.fromkeys(target_ids) if t not in existing]
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
        pending = set(conn.execute(sa.select(_q.c.target_id).distinct()).scalars())
        pending.update(conn.execute(sa.select(_x.c.target_id).distinct()).scalars())
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

    # -- the queue ------------------------------------------------------------------------------

    def add_events(self, runs: Sequence[tuple[str, Sequence[bytes]]], now: float) -> Deferred[None]:
        rows = [
            {
                "target_id": target_id,
                "pos": 0,
                "n_events": len(events),
                "events": _encoding.join_events(events),
                "oldest_at": now,
            }
            for target_id, events in runs
            if events
        ]

        def add(conn: sa.Connection) -> None:
            if rows:
                conn.execute(sa.insert(_q), rows)
                self._events_added(conn, [str(r["target_id"]) for r in rows])

        return self._run(add)

    def _events_added(self, conn: sa.Connection, target_ids: Sequence[str]) -> None:
        """Called inside the transaction that stores events; a backend may notify others."""

    def _form(
        self, conn: sa.Connection, target_id: str, max_events: int, max_bytes: int, now: float
    ) -> Transaction | None:
        """Form a new transaction from the head of the queue; None if the queue is empty."""
        runs: list[bytes] = []
        n_events = 0
        size = _encoding.ENVELOPE_BYTES
        oldest: float | None = None
        consumed: list[int] = []
        remainder: tuple[int, list[bytes]] | None = None
        sep = len(_encoding.SEPARATOR)
        result = conn.execute(_QUEUE_HEAD, {"p_target": target_id, "p_limit": max_events})
        try:
            for row_id, run_n, run, run_oldest in result:
                run = bytes(run)
                extra = len(run) + (sep if n_events else 0)
                if n_events + run_n <= max_events and size + extra <= max_bytes:
                    # The whole run fits: take it as it is, without splitting it.
                    runs.append(run)
                    n_events += run_n
                    size += extra
                    consumed.append(row_id)
                    oldest = run_oldest if oldest is None else min(oldest, run_oldest)
                    if n_events >= max_events:
                        break
                    continue
                # Only part of the run fits. A transaction always takes at least one event, so
                # an event larger than the cap (the cap was lowered since) still goes out.
                events = _encoding.split_events(run)
                take = 0
                for event in events:
                    extra = len(event) + (sep if n_events else 0)
                    if n_events and (n_events >= max_events or size + extra > max_bytes):
                        break
                    n_events += 1
                    size += extra
                    take += 1
                if take:
                    runs.append(_encoding.join_events(events[:take]))
                    oldest = run_oldest if oldest is None else min(oldest, run_oldest)
                if take == len(events):
                    consumed.append(row_id)
                else:
                    remainder = (row_id, events[take:])
                break
        finally:
            result.close()
        if not n_events:
            return None
        if consumed:
            conn.execute(_DELETE_RUNS, {"p_ids": consumed})
        if remainder is not None:
            row_id, rest = remainder
            conn.execute(
                _SHORTEN_RUN,
                {"p_id": row_id, "p_n": len(rest), "p_events": _encoding.join_events(rest)},
            )
        txn_id = self._next_txn_id(conn, target_id)
        body = _encoding.transaction_body(_encoding.SEPARATOR.join(runs))
        assert oldest is not None
        conn.execute(
            _INSERT_TXN,
            {
                "target_id": target_id,
                "txn_id": txn_id,
                "n_events": n_events,
                "body": body,
                "oldest_at": oldest,
                "created_at": now,
                "attempts": 1,
                "last_attempt_at": now,
            },
        )
        return Transaction(target_id, txn_id, body, n_events, 1, oldest)

    def _next_txn_id(self, conn: sa.Connection, target_id: str) -> int:
        last = conn.execute(_NEXT_TXN_ID, {"p_target": target_id}).scalar_one_or_none()
        if last is None:
            raise StoreError(f"target {target_id!r} is not registered in the store")
        return int(last)

    def _claim(
        self, conn: sa.Connection, target_id: str, max_events: int, max_bytes: int, now: float
    ) -> Transaction | None:
        row = conn.execute(_HEAD_TXN, {"p_target": target_id}).first()
        if row is not None:
            attempts = row.attempts + 1
            conn.execute(
                _COUNT_ATTEMPT,
                {"p_target": target_id, "p_txn": row.txn_id, "p_attempts": attempts, "p_now": now},
            )
            return Transaction(
                target_id, row.txn_id, bytes(row.body), row.n_events, attempts, row.oldest_at
            )
        txn = self._form(conn, target_id, max_events, max_bytes, now)
        if txn is None:
            # Nothing is left: the target is UP. This happens in the same database transaction
            # that found the queue empty, so no event stored before it can be stranded, and an
            # event stored after it finds the target UP.
            marked = conn.execute(_MARK_UP, {"p_target": target_id})
            if marked.rowcount:
                _faults.checkpoint("up.transition")
        return txn

    def claim(
        self, target_id: str, max_events: int, max_bytes: int, now: float
    ) -> Deferred[Transaction | None]:
        def claim(conn: sa.Connection) -> Transaction | None:
            self._check_lease(conn, target_id, now)
            return self._claim(conn, target_id, max_events, max_bytes, now)

        return self._run(claim)

    def complete(
        self, target_id: str, txn_id: int, max_events: int, max_bytes: int, now: float
    ) -> Deferred[Transaction | None]:
        def complete(conn: sa.Connection) -> Transaction | None:
            self._check_lease(conn, target_id, now)
            conn.execute(_DELETE_TXN, {"p_target": target_id, "p_txn": txn_id})
            conn.execute(_DELIVERED, {"p_target": target_id, "p_now": now})
            return self._claim(conn, target_id, max_events, max_bytes, now)

        return self._run(complete)

    def fail(
        self,
        target_id: str,
        txn_id: int,
        failures: int,
        next_attempt_at: float,
        error: str,
        now: float,
    ) -> Deferred[None]:
        def fail(conn: sa.Connection) -> None:
            self._check_lease(conn, target_id, now)
            conn.execute(
                sa.update(_t)
                .where(_t.c.target_id == target_id)
                .values(
                    state=TargetState.DOWN.value,
                    failures=failures,
                    next_attempt_at=next_attempt_at,
                    last_error=error[:500],
                )
            )
            _faults.checkpoint("backoff.write")

        return self._run(fail)

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
    ) -> Deferred[Transaction | None]:
        def dead_letter(conn: sa.Connection) -> Transaction | None:
            self._check_lease(conn, target_id, now)
            row = conn.execute(
                sa.select(_x).where(_x.c.target_id == target_id, _x.c.txn_id == txn_id)
            ).first()
            if row is not None:
                conn.execute(
                    sa.insert(_d).values(
                        target_id=target_id,
                        txn_id=txn_id,
                        n_events=row.n_events,
                        body=row.body,
                        oldest_at=row.oldest_at,
                        attempts=row.attempts,
                        reason=reason[:500],
                        dead_at=now,
                    )
                )
                conn.execute(
                    sa.delete(_x).where(_x.c.target_id == target_id, _x.c.txn_id == txn_id)
                )
            conn.execute(
                sa.update(_t).where(_t.c.target_id == target_id).values(last_error=reason[:500])
            )
            return self._claim(conn, target_id, max_events, max_bytes, now)

        return self._run(dead_letter)

    def split(self, target_id: str, txn_id: int, now: float) -> Deferred[Transaction | None]:
        def split(conn: sa.Connection) -> Transaction | None:
            self._check_lease(conn, target_id, now)
            row = conn.execute(
                sa.select(_x).where(_x.c.target_id == target_id, _x.c.txn_id == txn_id)
            ).first()
            if row is None or row.n_events < 2:
                return None
            events = _encoding.events_of_body(bytes(row.body))
            half = len(events) // 2
            first, second = events[:half], events[half:]
            head = conn.execute(
                sa.select(sa.func.min(_q.c.pos)).where(_q.c.target_id == target_id)
            ).scalar()
            conn.execute(
                sa.insert(_q).values(
                    target_id=target_id,
                    pos=min(head if head is not None else 0, 0) - 1,
                    n_events=len(second),
                    events=_encoding.join_events(second),
                    oldest_at=row.oldest_at,
                )
            )
            conn.execute(sa.delete(_x).where(_x.c.target_id == target_id, _x.c.txn_id == txn_id))
            new_id = self._next_txn_id(conn, target_id)
            body = _encoding.transaction_body(_encoding.join_events(first))
            conn.execute(
                sa.insert(_x).values(
                    target_id=target_id,
                    txn_id=new_id,
                    n_events=len(first),
                    body=body,
                    oldest_at=row.oldest_at,
                    created_at=now,
                    attempts=1,
                    last_attempt_at=now,
                )
            )
            return Transaction(target_id, new_id, body, len(first), 1, row.oldest_at)

        return self._run(split)

    # -- inspection -----------------------------------------------------------------------------

    def queue_counts(
        self, after: str | None = None, limit: int | None = None
    ) -> Deferred[dict[str, QueueCounts]]:
        def counts(conn: sa.Connection) -> dict[str, QueueCounts]:
            result: dict[str, QueueCounts] = {}
            last = after
            while limit is None or len(result) < limit:
                want = _PAGE if limit is None else min(_PAGE, limit - len(result))
                query = sa.select(_t.c.target_id).order_by(_t.c.target_id).limit(want)
                if last is not None:
                    query = query.where(_t.c.target_id > last)
                ids = list(conn.execute(query).scalars())
                result.update(self._counts_of(conn, ids))
                if len(ids) < want:
                    break
                last = ids[-1]
            return result

        return self._read(counts)

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
        # with target_id (relayer_queue_order, and the other tables' primary keys).
        for target_id, n, oldest in conn.execute(
            sa.select(_q.c.target_id, sa.func.sum(_q.c.n_events), sa.func.min(_q.c.oldest_at))
            .where(_q.c.target_id.in_(ids))
            .group_by(_q.c.target_id)
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
            .where(_x.c.target_id.in_(ids))
            .group_by(_x.c.target_id)
        ):
            s = acc[target_id]
            s["pending_transactions"] += int(count)
            s["pending_events"] += int(n)
            s["oldest_pending_at"] = older(s["oldest_pending_at"], oldest)
        for target_id, count in conn.execute(
            sa.select(_d.c.target_id, sa.func.count())
            .where(_d.c.target_id.in_(ids))
            .group_by(_d.c.target_id)
        ):
            acc[target_id]["dead_letters"] = int(count)
        return {t: QueueCounts(**v) for t, v in acc.items()}

    def dead_letters(
        self, target_id: str, limit: int, after: int | None = None
    ) -> Deferred[list[DeadLetter]]:
        def list_dead(conn: sa.Connection) -> list[DeadLetter]:
            query = sa.select(_d).where(_d.c.target_id == target_id)
            if after is not None:
                query = query.where(_d.c.txn_id > after)
            rows = conn.execute(query.order_by(_d.c.txn_id).limit(limit))
            return [
                DeadLetter(
                    target_id=r.target_id,
                    txn_id=r.txn_id,
                    n_events=r.n_events,
                    attempts=r.attempts,
                    reason=r.reason,
                    dead_at=r.dead_at,
                    body=bytes(r.body),
                )
                for r in rows
            ]

        return self._read(list_dead)

    def replay(self, target_id: str, now: float) -> Deferred[int]:
        chunk = self.replay_chunk

        def replay_chunk(
            conn: sa.Connection, last: int | None, high: int | None
        ) -> tuple[int | None, int | None, int]:
            # The target's row lock serialises replays of one target (on SQLite, BEGIN
            # IMMEDIATE does): two replays never take the same dead letters.
            if conn.execute(_LOCK_TARGET, {"p_target": target_id}).first() is None:
                return None, None, 0
            if high is None:
                # Only what was dead-lettered when the replay began is replayed.
                high = conn.execute(
                    sa.select(sa.func.max(_d.c.txn_id)).where(_d.c.target_id == target_id)
                ).scalar()
                if high is None:
                    return None, None, 0
            rows = self._take_dead_letters(conn, target_id, last, high, chunk)
            if not rows:
                return None, high, 0
            total = 0
            for r in rows:
                events = _encoding.events_of_body(bytes(r.body))
                # Appended in txn_id order: runs keep their order by id.
                conn.execute(
                    _INSERT_RUN,
                    {
                        "target_id": target_id,
                        "pos": 0,
                        "n_events": len(events),
                        "events": _encoding.join_events(events),
                        "oldest_at": r.oldest_at,
                    },
                )
                total += len(events)
            taken = [r.txn_id for r in rows]
            # Exactly the rows replayed are deleted, by primary key: a dead letter stored
            # meanwhile stays a dead letter.
            deleted = conn.execute(_DELETE_DEAD, {"p_target": target_id, "p_txns": taken})
            if deleted.rowcount != len(taken):
                raise StoreError(
                    f"replaying {target_id!r}: {len(taken)} dead letters read, "
                    f"{deleted.rowcount} deleted; nothing was replayed from this chunk"
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

    def _take_dead_letters(
        self, conn: sa.Connection, target_id: str, after: int | None, high: int, limit: int
    ) -> list[Any]:
        """
        A target's next dead letters to replay, oldest first, with ids in ``(after, high]``: up
        to ``limit`` of them, and no more once they hold :data:`_REPLAY_BYTES` bytes.
        """
        rows: list[Any] = []
        size = 0
        result = conn.execute(
            _DEAD_CHUNK,
            {
                "p_target": target_id,
                "p_after": after if after is not None else -1,
                "p_high": high,
                "p_limit": limit,
            },
        )
        try:
            for row in result:
                rows.append(row)
                size += len(row.body)
                if size >= _REPLAY_BYTES:
                    break
        finally:
            result.close()
        return rows

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
                conn.execute(
                    sa.update(_n).where(_n.c.node_id == node_id).values(expires_at=until)
                )
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


def _in_transaction(
    engine: sa.Engine, pool: DatabasePool, f: Callable[..., T], *args: Any
) -> Deferred[T]:
    """Run ``f(connection, *args)`` on ``pool``, in one database transaction on ``engine``."""

    def in_transaction() -> T:
        try:
            with engine.begin() as conn:
                return f(conn, *args)
        except _TRANSIENT as e:
            raise StoreUnavailable(f"the database is unavailable: {_db_message(e)}") from e
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"the database operation failed: {_db_message(e)}") from e

    return pool.run(in_transaction)


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
    )
