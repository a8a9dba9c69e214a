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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from relayer.errors import SchemaVersionError

#: The schema version this code reads and writes.
SCHEMA_VERSION = 3

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
    sa.Table("relayer_targets", m, *target_columns)
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
    if version >= 3:
        _define_leases(m)
    return m


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
queue = metadata.tables["relayer_queue"]
transactions = metadata.tables["relayer_transactions"]
dead_letters = metadata.tables["relayer_dead_letters"]
nodes = metadata.tables["relayer_nodes"]
leases = metadata.tables["relayer_leases"]


def _v1(conn: sa.Connection) -> None:
    define_tables(sa.MetaData(), 1).create_all(conn)


def _v2(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE relayer_targets ADD COLUMN last_error TEXT"))


def _v3(conn: sa.Connection) -> None:
    m = sa.MetaData()
    _define_leases(m)
    m.create_all(conn)


#: ``MIGRATIONS[v]`` moves a database from version ``v - 1`` to version ``v``.
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {1: _v1, 2: _v2, 3: _v3}


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
