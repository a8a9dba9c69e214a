"""
The store's writes that are held back and sent with the next statement or the commit (in one
pipeline, on PostgreSQL), the lease checks sent the same way, and the PostgreSQL connections'
set-up: every outcome stays what it was when each statement went on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from twisted.internet.task import Clock

from relayer.errors import LeaseLost, StoreError
from relayer.store import schema
from relayer.store.base import EventBatch, Transaction
from relayer.testing import open_store
from tests._support import database_engine, result_of

POSTGRES_ONLY = pytest.mark.postgres_only


def _store(db_path: Path | str) -> Any:
    store = open_store(Clock(), db_path)
    result_of(store.open())
    result_of(store.register_targets(["t", "u"]))
    return store


def _state(db_path: Path | str) -> list[tuple[Any, ...]]:
    """Everything a fenced step could change, read over a connection of its own."""
    engine = database_engine(db_path)
    try:
        with engine.connect() as conn:
            targets = conn.execute(
                sa.select(schema.targets).order_by(schema.targets.c.target_id)
            ).all()
            txns = conn.execute(
                sa.select(schema.txns).order_by(schema.txns.c.target_id, schema.txns.c.txn_id)
            ).all()
            runs = conn.execute(sa.select(schema.runs).order_by(schema.runs.c.id)).all()
    finally:
        engine.dispose()
    return [tuple(r) for r in [*targets, *txns, *runs]]


def test_a_process_that_lost_the_lease_changes_nothing_in_any_step(db_path: Path | str) -> None:
    store = _store(db_path)
    try:
        result_of(store.lease_round("other", ["t", "u"], 60.0, 100.0))
        bodies = [b'{"n":%d}' % i for i in range(6)]
        result_of(store.add_events(EventBatch(bodies, [("t", range(6))]), 100.0))
        # The owner forms a transaction: the one the steps below are about.
        store.lease_owner = "other"
        txn = result_of(store.claim("t", 3, 10**6, 101.0))
        assert isinstance(txn, Transaction)
        before = _state(db_path)
        store.lease_owner = "me"
        steps = {
            "claim": lambda: store.claim("t", 3, 10**6, 102.0),
            "complete": lambda: store.complete("t", txn.txn_id, 3, 10**6, 102.0),
            "accepted": lambda: store.accepted("t", txn.txn_id, 200.0, 3, 10**6, 102.0),
            "fail": lambda: store.fail("t", txn.txn_id, 1, 110.0, "down", 102.0),
            "disable": lambda: store.disable("t", txn.txn_id, "gone", 1, 102.0, 102.0),
            "block": lambda: store.block("t", txn.txn_id, "refused", 102.0),
            "dead_letter": lambda: store.dead_letter("t", txn.txn_id, "bad", 3, 10**6, 102.0),
            "split": lambda: store.split("t", txn.txn_id, 102.0),
        }
        for name, step in steps.items():
            with pytest.raises(LeaseLost):
                result_of(step())
            assert _state(db_path) == before, name
        # A lease that expired is lost too, for its own owner.
        store.lease_owner = "other"
        with pytest.raises(LeaseLost):
            result_of(store.complete("t", txn.txn_id, 3, 10**6, 1000.0))
        assert _state(db_path) == before
        # And the owner's own step goes through.
        nxt = result_of(store.complete("t", txn.txn_id, 3, 10**6, 103.0))
        assert isinstance(nxt, Transaction)
        assert list(nxt.events) == bodies[3:]
    finally:
        result_of(store.close())


def test_a_held_back_write_is_seen_by_the_next_statement(db_path: Path | str) -> None:
    store = _store(db_path)
    t = schema.targets

    def unit(conn: sa.Connection) -> Any:
        store._write(
            conn,
            sa.update(t).where(t.c.target_id == sa.bindparam("p")).values(last_error="held"),
            {"p": "t"},
        )
        return conn.execute(sa.select(t.c.last_error).where(t.c.target_id == "t")).scalar()

    try:
        assert result_of(store._run(unit)) == "held"
        engine = database_engine(db_path)
        try:
            with engine.connect() as conn:
                stored = conn.execute(sa.select(t.c.last_error).where(t.c.target_id == "t"))
                assert stored.scalar() == "held"
        finally:
            engine.dispose()
    finally:
        result_of(store.close())


def test_a_held_back_write_that_fails_fails_its_transaction_and_leaves_nothing(
    db_path: Path | str,
) -> None:
    store = _store(db_path)
    t = schema.targets

    def unit(conn: sa.Connection) -> str:
        store._write(
            conn,
            sa.update(t).where(t.c.target_id == sa.bindparam("p")).values(last_error="lost"),
            {"p": "u"},
        )
        # "t" is there already: the primary key refuses it, at the commit at the latest.
        store._write(
            conn,
            sa.insert(t),
            {
                "target_id": "t",
                "state": "up",
                "failures": 0,
                "next_attempt_at": None,
                "last_success_at": None,
                "last_txn_id": 0,
                "last_error": None,
                "max_span": 0,
            },
        )
        return "returned"

    try:
        with pytest.raises(StoreError):
            result_of(store._run(unit))
        engine = database_engine(db_path)
        try:
            with engine.connect() as conn:
                errors = conn.execute(sa.select(t.c.last_error)).scalars().all()
        finally:
            engine.dispose()
        assert errors == [None, None]
        # The store goes on working.
        ids = result_of(store.add_events(EventBatch([b"{}"], [("u", [0])]), 1.0))
        assert len(ids) == 1
    finally:
        result_of(store.close())


@POSTGRES_ONLY
def test_event_bodies_are_compressed_with_lz4_where_the_server_has_it(db_path: str) -> None:
    engine = database_engine(db_path)
    try:
        with engine.connect() as conn:
            has_lz4 = conn.execute(
                sa.text(
                    "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                    "WHERE name = 'default_toast_compression'"
                )
            ).scalar()
        if not has_lz4:
            pytest.skip("this PostgreSQL has no lz4")
        store = _store(db_path)
        try:
            # Large enough to be compressed: a block of 200 similar events.
            bodies = [b'{"n":%d,"text":"%s"}' % (i, b"x" * 100) for i in range(200)]
            result_of(store.add_events(EventBatch(bodies, [("t", range(200))]), 1.0))
        finally:
            result_of(store.close())
        with engine.connect() as conn:
            methods = conn.execute(
                sa.text("SELECT pg_column_compression(bodies) FROM relayer_events")
            ).scalars()
            assert list(methods) == ["lz4"]
    finally:
        engine.dispose()


@POSTGRES_ONLY
def test_an_idle_connection_that_the_server_ended_is_replaced_before_use(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relayer.store import postgres

    monkeypatch.setattr(postgres, "PING_AFTER_IDLE", 0.0)
    store = _store(db_path)
    try:
        result_of(store.add_events(EventBatch([b"{}"], [("t", [0])]), 1.0))
        engine = database_engine(db_path)
        try:
            with engine.connect() as conn:
                killed = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                        "AND application_name = 'relayer' AND state = 'idle'"
                    )
                ).scalar()
        finally:
            engine.dispose()
        assert killed
        # The idle connection is pinged, found dead and replaced: the step does not fail.
        txn = result_of(store.claim("t", 10, 10**6, 2.0))
        assert isinstance(txn, Transaction)
    finally:
        result_of(store.close())


@POSTGRES_ONLY
def test_a_connection_the_server_ended_a_moment_after_its_use_is_replaced_at_once(
    db_path: str,
) -> None:
    # Used a moment ago, it is not pinged: the first statement finds it dead, and the unit
    # runs again on a new connection, since nothing of it could have been committed.
    store = _store(db_path)
    try:
        pid = result_of(
            store._run(lambda conn: conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
        )
        engine = database_engine(db_path)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        finally:
            engine.dispose()
        counts = result_of(store.queue_counts())
        assert set(counts) == {"t", "u"}
        again = result_of(
            store._run(lambda conn: conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
        )
        assert again != pid
    finally:
        result_of(store.close())
