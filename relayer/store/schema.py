"""
The database schema and its migrations.

The schema version is kept in ``relayer_meta``. Each migration moves the schema up by one version
inside the same database transaction as the version bump, so an upgrade happens entirely or not
at all. A database whose version is newer than :data:`SCHEMA_VERSION` is refused.

Version history:

1. Targets, the event queue, transactions and dead letters.
2. ``relayer_targets.last_error``: a short description of a target's last failure.
3. ``relayer_nodes`` and ``relayer_leases``: the processes sharing a database, and which of them
   owns each target.
4. Events with identity. Each event's bytes are written once, in blocks in ``relayer_events``,
   under a sequence number (``seq``) and, if the application gave one, its own id
   (``relayer_event_ids``); the queue's runs and
   the transactions name their events by sequence number instead of holding their bytes, and
   transactions are kept, with their state, once they are done. ``relayer_target_sets`` holds
   the targets an event was submitted for, ``relayer_expired`` the events that expired at a
   target, and ``relayer_counters`` the event sequence on SQLite (PostgreSQL uses a sequence).
   Version 3's queued events, transactions and dead letters are moved into the new tables.
5. Retention and archive. ``relayer_archived_events``, ``relayer_archived_txns`` and
   ``relayer_archived_expired`` hold final events moved out of the live tables; the views
   ``relayer_all_events``, ``relayer_all_txns`` and ``relayer_all_expired`` read both. A
   transaction may be ``discarded`` (a dead letter given up), and ``relayer_txns_done`` indexes
   done transactions by time. A version 4 block whose numbers were not consecutive (two
   PostgreSQL writers at once) is cut into blocks that are.
6. ``relayer_targets.down_since``: when a target's current run of failures began (for retry
   policies that disable a target failing for too long, and for status). A target's state may
   now also be ``disabled``.
7. ``relayer_commands``: operators' commands (a wake) for the process that delivers to a target,
   kept until that process has applied them, so that a command survives that process's restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from relayer.errors import SchemaVersionError

#: The schema version this code reads and writes.
SCHEMA_VERSION = 7

# The PostgreSQL advisory lock taken while upgrading: an arbitrary constant of relayer's.
_UPGRADE_LOCK = 0x72656C61796572


def define_tables(m: sa.MetaData, version: int) -> sa.MetaData:
    """
    Define the tables as schema ``version`` has them, in ``m``.

    Migrations create tables through this function with their own version, so that a migration
    keeps describing its own version as the current tables change.
    """
    sa.Table(
        "relayer_meta",
        m,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    target_columns: list[sa.Column[Any]] = [
        sa.Column("target_id", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=True),
        sa.Column("last_success_at", sa.Float, nullable=True),
        sa.Column("last_txn_id", sa.BigInteger, nullable=False),
    ]
    if version >= 2:
        target_columns.append(sa.Column("last_error", sa.Text, nullable=True))
    if version >= 4:
        # The widest span of sequence numbers of any of the target's transactions: bounds the
        # search for the transaction that carries an event (see the store's event_status).
        target_columns.append(sa.Column("max_span", sa.BigInteger, nullable=False, default=0))
    if version >= 6:
        target_columns.append(sa.Column("down_since", sa.Float, nullable=True))
    sa.Table("relayer_targets", m, *target_columns)
    if version < 4:
        _define_v3_queue(m)
    else:
        _define_log(m, version)
    if version >= 3:
        _define_leases(m)
    if version >= 5:
        _define_archive(m)
    if version >= 7:
        _define_commands(m)
    return m


def _define_commands(m: sa.MetaData) -> None:
    # Operators' commands for the process that delivers to a target: written by any process
    # (the command line, an admin API), applied and marked done by that one.
    sa.Table(
        "relayer_commands",
        m,
        sa.Column("command_id", _seq_type(), primary_key=True, autoincrement=True),
        sa.Column("target_id", sa.String(255), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("txn_id", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("done_at", sa.Float, nullable=True),
        sa.Column("done_by", sa.String(255), nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        # The commands still to apply are found by this index, without reading those done.
        sa.Index("relayer_commands_pending", "done_at", "command_id"),
    )


def _define_v3_queue(m: sa.MetaData) -> None:
    # Queued events: runs of encoded events, in submit order per target, ordered by (pos, id).
    # Appended runs have pos 0 and an increasing id; a run put back at the head of the queue
    # (the second half of a split transaction) gets a pos below every other run of its target.
    sa.Table(
        "relayer_queue",
        m,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("target_id", sa.String(255), nullable=False),
        sa.Column("pos", sa.BigInteger, nullable=False),
        sa.Column("n_events", sa.Integer, nullable=False),
        sa.Column("events", sa.LargeBinary, nullable=False),
        sa.Column("oldest_at", sa.Float, nullable=False),
        sa.Index("relayer_queue_order", "target_id", "pos", "id"),
    )
    sa.Table(
        "relayer_transactions",
        m,
        sa.Column("target_id", sa.String(255), primary_key=True),
        sa.Column("txn_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("n_events", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("oldest_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_attempt_at", sa.Float, nullable=True),
    )
    sa.Table(
        "relayer_dead_letters",
        m,
        sa.Column("target_id", sa.String(255), primary_key=True),
        sa.Column("txn_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("n_events", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("oldest_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("dead_at", sa.Float, nullable=False),
    )


#: A transaction's states in schema 4. ``pending`` and ``awaiting`` are open (the target's head
#: is its oldest open transaction); the others are done, and kept as the events' history.
TXN_PENDING = "pending"
TXN_AWAITING = "awaiting"
TXN_DELIVERED = "delivered"
TXN_DEAD = "dead"
TXN_REPLAYED = "replayed"
TXN_ABANDONED = "abandoned"
#: A dead letter that an operator gave up: final, like a delivered one (schema 5).
TXN_DISCARDED = "discarded"
OPEN_STATES = (TXN_PENDING, TXN_AWAITING)


def _seq_type() -> sa.types.TypeEngine[int]:
    # On SQLite an INTEGER PRIMARY KEY is the rowid itself: no second copy of the key.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _event_columns() -> list[sa.Column[Any]]:
    # Every event, written once, in blocks: the events of one target's run of one write (those
    # submitted together for the same targets), under consecutive sequence numbers. A block
    # holds their bytes joined by b"\n" (compact JSON never holds a raw newline), the time they
    # were submitted, and their deadlines and the application's ids as JSON lists, when any of
    # them has one. One row per block rather than per event: SQLite writes rows at a cost
    # each, and a block costs about what one of its events would.
    return [
        sa.Column("first_seq", _seq_type(), primary_key=True, autoincrement=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        # The block's sequence numbers as ranges, "10-20". From schema 5 they are consecutive
        # (one range) but for the numbers of events refused as repeats, which no block holds.
        sa.Column("seqs", sa.Text, nullable=False),
        sa.Column("n_events", sa.Integer, nullable=False),
        sa.Column("set_id", sa.Integer, nullable=False),
        sa.Column("submitted_at", sa.Float, nullable=False),
        sa.Column("bodies", sa.LargeBinary, nullable=False),
        sa.Column("expires", sa.Text, nullable=True),
        sa.Column("ids", sa.Text, nullable=True),
    ]


def _txn_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("target_id", sa.String(255), primary_key=True),
        sa.Column("txn_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("seqs", sa.Text, nullable=False),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("n_events", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("oldest_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_attempt_at", sa.Float, nullable=True),
        # When it was delivered, dead-lettered, replayed, abandoned or discarded.
        sa.Column("done_at", sa.Float, nullable=True),
        # Awaiting confirmation: when it is sent again unless it is confirmed first.
        sa.Column("confirm_by", sa.Float, nullable=True),
        # Why it was dead-lettered or abandoned.
        sa.Column("reason", sa.Text, nullable=True),
    ]


def _expired_columns() -> list[sa.Column[Any]]:
    # Events that expired at a target: never sent there.
    return [
        sa.Column("target_id", sa.String(255), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("expired_at", sa.Float, nullable=False),
        # The abandoned transaction that held it, if it had been sent in one.
        sa.Column("txn_id", sa.BigInteger, nullable=True),
    ]


#: The live tables that retention archives from, each with its archive and the view of both.
ARCHIVED = (
    ("relayer_events", "relayer_archived_events", "relayer_all_events"),
    ("relayer_txns", "relayer_archived_txns", "relayer_all_txns"),
    ("relayer_expired", "relayer_archived_expired", "relayer_all_expired"),
)


def _define_archive(m: sa.MetaData) -> None:
    # Final events that retention moved out of the live tables, with their transactions and
    # expiries: the same columns, and the indexes that status queries read them by. An
    # archived transaction is one all of whose events are archived.
    sa.Table("relayer_archived_events", m, *_event_columns())
    sa.Table(
        "relayer_archived_txns",
        m,
        *_txn_columns(),
        sa.Index("relayer_archived_txns_by_seq", "target_id", "first_seq"),
        sa.Index("relayer_archived_txns_done", "target_id", "done_at"),
    )
    sa.Table("relayer_archived_expired", m, *_expired_columns())


def create_views(conn: sa.Connection) -> None:
    """
    Create the views that read live and archived rows as one table, ``relayer_all_events``,
    ``relayer_all_txns`` and ``relayer_all_expired``: a status query reads them in one
    snapshot, so its answer does not depend on whether retention has moved a row yet.
    """
    tables = define_tables(sa.MetaData(), 5).tables
    for live, archived, view in ARCHIVED:
        columns = ", ".join(c.name for c in tables[live].columns)
        conn.execute(
            sa.text(
                f"CREATE VIEW {view} AS SELECT {columns} FROM {live} "
                f"UNION ALL SELECT {columns} FROM {archived}"
            )
        )


def _define_log(m: sa.MetaData, version: int) -> None:
    sa.Table("relayer_events", m, *_event_columns())
    # The application's ids, each once: an event without one is known as "relayer-<seq>", so
    # that its id costs nothing to store.
    sa.Table(
        "relayer_event_ids",
        m,
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    # The targets each event was submitted for, one row per distinct list of targets.
    sa.Table(
        "relayer_target_sets",
        m,
        sa.Column("set_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("targets", sa.Text, nullable=False, unique=True),
    )
    # Queued events: runs of event sequence numbers, in submit order per target, ordered by
    # (pos, id). Appended runs have pos 0 and an increasing id; a run put back at the head of
    # the queue (the second half of a split transaction, the live events of an abandoned one)
    # gets a pos below every other run of its target. ``seqs`` lists the events as ranges
    # ("10-20,25"); ``size`` is the sum of their encoded sizes.
    sa.Table(
        "relayer_runs",
        m,
        sa.Column("id", _seq_type(), primary_key=True, autoincrement=True),
        sa.Column("target_id", sa.String(255), nullable=False),
        sa.Column("pos", sa.BigInteger, nullable=False),
        sa.Column("n_events", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("seqs", sa.Text, nullable=False),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("oldest_at", sa.Float, nullable=False),
        sa.Index("relayer_runs_head", "target_id", "pos", "id"),
        sa.Index("relayer_runs_by_seq", "target_id", "first_seq"),
    )
    # Transactions, open and done. A formed transaction's events never change; its state does.
    open_states = "state IN ('pending', 'awaiting')"
    txn_indexes = [
        sa.Index(
            "relayer_txns_open",
            "target_id",
            "txn_id",
            sqlite_where=sa.text(open_states),
            postgresql_where=sa.text(open_states),
        ),
        sa.Index(
            "relayer_txns_dead",
            "target_id",
            "txn_id",
            sqlite_where=sa.text("state = 'dead'"),
            postgresql_where=sa.text("state = 'dead'"),
        ),
        sa.Index("relayer_txns_by_seq", "target_id", "first_seq"),
    ]
    if version >= 5:
        # Counts of a time window (delivered in the last hour) read done transactions by time.
        txn_indexes.append(sa.Index("relayer_txns_done", "target_id", "done_at"))
    sa.Table("relayer_txns", m, *_txn_columns(), *txn_indexes)
    sa.Table("relayer_expired", m, *_expired_columns())
    # The event sequence on SQLite; PostgreSQL uses the sequence relayer_event_seq instead.
    sa.Table(
        "relayer_counters",
        m,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )


def _define_leases(m: sa.MetaData) -> None:
    # Each scheduler process that shares the database, with the time its heartbeat expires.
    sa.Table(
        "relayer_nodes",
        m,
        sa.Column("node_id", sa.String(255), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    # Which process owns each target, until when. A target without an owner, or whose lease
    # has expired, may be taken by any process.
    sa.Table(
        "relayer_leases",
        m,
        sa.Column("target_id", sa.String(255), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


metadata = define_tables(sa.MetaData(), SCHEMA_VERSION)
meta = metadata.tables["relayer_meta"]
targets = metadata.tables["relayer_targets"]
events = metadata.tables["relayer_events"]
event_ids = metadata.tables["relayer_event_ids"]
target_sets = metadata.tables["relayer_target_sets"]
runs = metadata.tables["relayer_runs"]
txns = metadata.tables["relayer_txns"]
expired = metadata.tables["relayer_expired"]
archived_events = metadata.tables["relayer_archived_events"]
archived_txns = metadata.tables["relayer_archived_txns"]
archived_expired = metadata.tables["relayer_archived_expired"]
#: The views of live and archived rows together, for queries; they are not written to.
all_events = sa.table("relayer_all_events", *(sa.column(c.name) for c in events.columns))
all_txns = sa.table("relayer_all_txns", *(sa.column(c.name) for c in txns.columns))
all_expired = sa.table("relayer_all_expired", *(sa.column(c.name) for c in expired.columns))
counters = metadata.tables["relayer_counters"]
nodes = metadata.tables["relayer_nodes"]
leases = metadata.tables["relayer_leases"]
commands = metadata.tables["relayer_commands"]


def _v1(conn: sa.Connection) -> None:
    define_tables(sa.MetaData(), 1).create_all(conn)


def _v2(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE relayer_targets ADD COLUMN last_error TEXT"))


def _v3(conn: sa.Connection) -> None:
    m = sa.MetaData()
    _define_leases(m)
    m.create_all(conn)


def _v4(conn: sa.Connection) -> None:
    from relayer.store import _upgrade4

    _upgrade4.upgrade(conn, define_tables)


def _v5(conn: sa.Connection) -> None:
    m = sa.MetaData()
    _define_archive(m)
    m.create_all(conn)
    for index in define_tables(sa.MetaData(), 5).tables["relayer_txns"].indexes:
        if index.name == "relayer_txns_done":
            index.create(conn)
    create_views(conn)
    _cut_blocks(conn)


def _cut_blocks(conn: sa.Connection) -> None:
    """Cut every block whose numbers are not one range into blocks whose numbers are."""
    import json

    from relayer.store import _seqs

    table = define_tables(sa.MetaData(), 5).tables["relayer_events"]
    last = -1
    while True:
        rows = conn.execute(
            sa.select(table)
            .where(table.c.seqs.like("%,%"), table.c.first_seq > last)
            .order_by(table.c.first_seq)
            .limit(64)
        ).all()
        if not rows:
            return
        for row in rows:
            numbers = _seqs.decode(row.seqs)
            bodies = bytes(row.bodies).split(b"\n")
            expires = json.loads(row.expires) if row.expires else None
            ids = json.loads(row.ids) if row.ids else None
            conn.execute(sa.delete(table).where(table.c.first_seq == row.first_seq))
            start = 0
            for low, high in _seqs.ranges(row.seqs):
                end = start + high - low + 1
                part_expires = expires[start:end] if expires else None
                part_ids = ids[start:end] if ids else None
                conn.execute(
                    sa.insert(table).values(
                        first_seq=low,
                        last_seq=high,
                        seqs=_seqs.encode(numbers[start:end]),
                        n_events=end - start,
                        set_id=row.set_id,
                        submitted_at=row.submitted_at,
                        bodies=b"\n".join(bodies[start:end]),
                        expires=(
                            json.dumps(part_expires)
                            if part_expires and any(e is not None for e in part_expires)
                            else None
                        ),
                        ids=(
                            json.dumps(part_ids)
                            if part_ids and any(i is not None for i in part_ids)
                            else None
                        ),
                    )
                )
                start = end
            last = row.first_seq


def _v6(conn: sa.Connection) -> None:
    # A target DOWN at the upgrade gets no time: its failures count from when a scheduler next
    # takes it in charge, so that no policy disables it for an outage it cannot date.
    conn.execute(sa.text("ALTER TABLE relayer_targets ADD COLUMN down_since FLOAT"))


def _v7(conn: sa.Connection) -> None:
    m = sa.MetaData()
    _define_commands(m)
    m.create_all(conn)


#: ``MIGRATIONS[v]`` moves a database from version ``v - 1`` to version ``v``.
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {
    1: _v1,
    2: _v2,
    3: _v3,
    4: _v4,
    5: _v5,
    6: _v6,
    7: _v7,
}


def read_version(conn: sa.Connection) -> int:
    """The schema version of the database behind ``conn``; 0 for an empty database."""
    if not sa.inspect(conn).has_table("relayer_meta"):
        return 0
    value = conn.execute(
        sa.select(meta.c.value).where(meta.c.name == "schema_version")
    ).scalar_one_or_none()
    return int(value) if value is not None else 0


def upgrade(conn: sa.Connection, to_version: int = SCHEMA_VERSION) -> tuple[int, int]:
    """
    Bring the schema up to ``to_version``, inside the caller's transaction.

    Returns:
        The versions before and after.

    Raises:
        SchemaVersionError: The database is newer than ``to_version``.
    """
    if conn.dialect.name == "postgresql":
        # Processes that start together upgrade one at a time; the others then find the
        # schema up to date. The lock is released at the end of the transaction.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
    found = read_version(conn)
    if found > to_version:
        raise SchemaVersionError(
            f"the database has relayer schema version {found}, but this relayer only knows "
            f"versions up to {to_version}; upgrade relayer to open it (nothing was changed)"
        )
    for version in range(found + 1, to_version + 1):
        MIGRATIONS[version](conn)
        if version == 1:
            conn.execute(sa.insert(meta).values(name="schema_version", value="1"))
        else:
            conn.execute(
                sa.update(meta).where(meta.c.name == "schema_version").values(value=str(version))
            )
    return found, max(found, to_version)
