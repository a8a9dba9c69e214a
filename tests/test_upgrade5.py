"""
Upgrading a schema version 4 database to version 5, on SQLite and on PostgreSQL.

Version 4 on PostgreSQL could store a block whose numbers surround another process's (two
writers drawing from one sequence at once): 1-3 and 6-7 in one block, around 4-5 in another.
The upgrade cuts such blocks into blocks of consecutive numbers, so that every event is found,
and adds the archive tables and views; everything stored is then delivered as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from twisted.internet.task import Clock

from relayer import DeliveryState
from relayer.errors import SchemaVersionError
from relayer.store import RetentionRule, schema
from relayer.testing import FakeTransport, build_scheduler, open_store, step
from tests._support import database_engine, result_of

result = result_of


def write_v4(db_path: Path | str) -> None:
    """A version 4 database with two targets' queues, one block around the other's."""
    engine = database_engine(db_path)
    try:
        with engine.begin() as conn:
            schema.upgrade(conn, to_version=4)
            v4 = schema.define_tables(sa.MetaData(), 4).tables
            for t in ("a", "b"):
                conn.execute(
                    sa.insert(v4["relayer_targets"]).values(
                        target_id=t, state="up", failures=0, last_txn_id=0, max_span=0
                    )
                )
            conn.execute(sa.insert(v4["relayer_target_sets"]).values(set_id=1, targets="a"))
            conn.execute(sa.insert(v4["relayer_target_sets"]).values(set_id=2, targets="b"))
            blocks = [
                (
                    1,
                    7,
                    "1-3,6-7",
                    1,
                    [b'{"a":%d}' % i for i in range(5)],
                    ["a0", None, None, None, "a4"],
                ),
                (4, 5, "4-5", 2, [b'{"b":0}', b'{"b":1}'], None),
            ]
            for first, last, seqs, set_id, bodies, ids in blocks:
                conn.execute(
                    sa.insert(v4["relayer_events"]).values(
                        first_seq=first,
                        last_seq=last,
                        seqs=seqs,
                        n_events=len(bodies),
                        set_id=set_id,
                        submitted_at=10.0,
                        bodies=b"\n".join(bodies),
                        expires=json.dumps([None, None, 99999.0, None, None]) if ids else None,
                        ids=json.dumps(ids) if ids else None,
                    )
                )
            for eid, seq in (("a0", 1), ("a4", 7)):
                conn.execute(sa.insert(v4["relayer_event_ids"]).values(event_id=eid, seq=seq))
            for t, seqs, first, last, n in (("a", "1-3,6-7", 1, 7, 5), ("b", "4-5", 4, 5, 2)):
                conn.execute(
                    sa.insert(v4["relayer_runs"]).values(
                        target_id=t,
                        pos=0,
                        n_events=n,
                        size=7 * n,
                        seqs=seqs,
                        first_seq=first,
                        last_seq=last,
                        oldest_at=10.0,
                    )
                )
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT setval('relayer_event_seq', 7)"))
            else:
                c = v4["relayer_counters"]
                conn.execute(sa.delete(c).where(c.c.name == "event_seq"))
                conn.execute(sa.insert(c).values(name="event_seq", value=7))
    finally:
        engine.dispose()


def test_a_version_4_database_is_upgraded_and_its_cut_blocks_delivered(
    db_path: Path | str,
) -> None:
    write_v4(db_path)
    clock = Clock()
    transport = FakeTransport(clock)
    transport["a"].down()
    transport["b"].down()
    h = build_scheduler(["a", "b"], path=db_path, clock=clock, transport=transport)
    engine = database_engine(db_path)
    try:
        with engine.connect() as conn:
            assert schema.read_version(conn) == schema.SCHEMA_VERSION
            rows = conn.execute(
                sa.text(
                    "SELECT first_seq, last_seq, seqs, n_events, ids, expires "
                    "FROM relayer_events ORDER BY first_seq"
                )
            ).all()
            for table in ("relayer_all_events", "relayer_all_txns", "relayer_all_expired"):
                conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (1, 3, "1-3", 3),
        (4, 5, "4-5", 2),
        (6, 7, "6-7", 2),
    ]
    # Each piece keeps its events' ids and deadlines.
    assert [json.loads(r[4]) if r[4] else None for r in rows] == [
        ["a0", None, None],
        None,
        [None, "a4"],
    ]
    assert [json.loads(r[5]) if r[5] else None for r in rows] == [[None, None, 99999.0], None, None]
    for event_id in ("a0", "relayer-2", "relayer-3", "relayer-6", "a4", "relayer-4", "relayer-5"):
        status = result(h.scheduler.event_status(event_id))
        assert status is not None, event_id
        assert [d.state for d in status.deliveries.values()] == [DeliveryState.PENDING]
    assert result(h.scheduler.event_status("a0")).deliveries["a"].state is DeliveryState.PENDING
    transport["a"].up()
    transport["b"].up()
    step(h.clock, 600)
    assert h.transport["a"].events == [{"a": i} for i in range(5)]
    assert h.transport["b"].events == [{"b": 0}, {"b": 1}]
    assert result(h.scheduler.event_status("relayer-6")).deliveries["a"].state is (
        DeliveryState.DELIVERED
    )
    # New events are numbered after the old ones.
    new = result(h.scheduler.submit("b", {"b": 2}))
    assert int(new.removeprefix("relayer-")) > 7


def test_a_store_opened_without_upgrading_refuses_another_version(db_path: Path | str) -> None:
    write_v4(db_path)
    store = open_store(Clock(), db_path)
    with pytest.raises(SchemaVersionError, match="version 4"):
        result(store.open(upgrade=False))
    result(store.close())
    engine = database_engine(db_path)
    try:
        with engine.connect() as conn:
            assert schema.read_version(conn) == 4
    finally:
        engine.dispose()
    # Upgraded, it opens either way.
    store = open_store(Clock(), db_path)
    result(store.open())
    result(store.close())
    store = open_store(Clock(), db_path)
    result(store.open(upgrade=False))
    result(store.close())


def add_v4_history(db_path: Path | str) -> None:
    """
    Add to :func:`write_v4`'s database what version 4 left mid-work: a transaction in flight
    at "c" (sent twice), a dead letter at "d", a delivered event and an expired one at "e",
    and a transaction awaiting its confirmation at "f".
    """
    engine = database_engine(db_path)
    try:
        with engine.begin() as conn:
            v4 = schema.define_tables(sa.MetaData(), 4).tables
            sets = {"c": 3, "d": 4, "e": 5, "f": 6}
            last_txn = {"c": 5, "d": 3, "e": 1, "f": 2}
            for t, set_id in sets.items():
                conn.execute(
                    sa.insert(v4["relayer_targets"]).values(
                        target_id=t,
                        state="up",
                        failures=0,
                        last_txn_id=last_txn[t],
                        max_span=1 if t == "c" else 0,
                    )
                )
                conn.execute(sa.insert(v4["relayer_target_sets"]).values(set_id=set_id, targets=t))
            for first, last, set_id, bodies in (
                (8, 9, 3, [b'{"c":0}', b'{"c":1}']),
                (10, 10, 4, [b'{"d":0}']),
                (11, 12, 5, [b'{"e":0}', b'{"e":1}']),
                (13, 13, 6, [b'{"f":0}']),
            ):
                conn.execute(
                    sa.insert(v4["relayer_events"]).values(
                        first_seq=first,
                        last_seq=last,
                        seqs=f"{first}-{last}" if last > first else str(first),
                        n_events=len(bodies),
                        set_id=set_id,
                        submitted_at=10.0,
                        bodies=b"\n".join(bodies),
                        expires=json.dumps([None, 20.0]) if set_id == 5 else None,
                        ids=None,
                    )
                )
            txn = {
                "oldest_at": 10.0,
                "created_at": 11.0,
                "confirm_by": None,
                "reason": None,
                "done_at": None,
            }
            for t, txn_id, state, seqs, n, attempts, extra in (
                ("c", 5, "pending", (8, 9), 2, 2, {}),
                ("d", 3, "dead", (10, 10), 1, 1, {"reason": "HTTP 400", "done_at": 12.0}),
                ("e", 1, "delivered", (11, 11), 1, 1, {"done_at": 12.0}),
                ("f", 2, "awaiting", (13, 13), 1, 1, {"confirm_by": 10_000.0}),
            ):
                conn.execute(
                    sa.insert(v4["relayer_txns"]).values(
                        **{
                            **txn,
                            **extra,
                            "target_id": t,
                            "txn_id": txn_id,
                            "state": state,
                            "seqs": f"{seqs[0]}-{seqs[1]}" if seqs[1] > seqs[0] else str(seqs[0]),
                            "first_seq": seqs[0],
                            "last_seq": seqs[1],
                            "n_events": n,
                            "size": 7 * n,
                            "attempts": attempts,
                            "last_attempt_at": 11.5,
                        }
                    )
                )
            conn.execute(
                sa.insert(v4["relayer_expired"]).values(
                    target_id="e", seq=12, expired_at=21.0, txn_id=None
                )
            )
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT setval('relayer_event_seq', 13)"))
            else:
                c = v4["relayer_counters"]
                conn.execute(sa.update(c).where(c.c.name == "event_seq").values(value=13))
    finally:
        engine.dispose()


def test_work_in_progress_in_version_4_goes_on_after_the_upgrade(db_path: Path | str) -> None:
    write_v4(db_path)
    add_v4_history(db_path)
    clock = Clock()
    clock.advance(100)
    transport = FakeTransport(clock)
    transport["c"].hold()
    transport["a"].down()
    targets = ["a", "b", "c", "d", "e", "f"]
    h = build_scheduler(targets, path=db_path, clock=clock, transport=transport)

    def state(event_id: str, t: str) -> Any:
        return result(h.scheduler.event_status(event_id)).deliveries[t]

    # The transaction in flight is sent again first, with its id and its bytes.
    assert transport["c"].held == 1
    assert state("relayer-8", "c").attempts == 3
    transport["c"].release()
    assert [r.txn_id for r in transport["c"].received] == [5]
    assert transport["c"].events == [{"c": 0}, {"c": 1}]
    assert state("relayer-9", "c").state is DeliveryState.DELIVERED
    # The dead letter is one still, and replays.
    [letter] = result(h.scheduler.dead_letters("d"))
    assert (letter.txn_id, letter.reason, letter.event_ids) == (3, "HTTP 400", ("relayer-10",))
    assert result(h.scheduler.replay("d")) == 1
    step(h.clock, 5)
    assert transport["d"].events == [{"d": 0}]
    # History: delivered and expired as they were.
    delivered = state("relayer-11", "e")
    assert (delivered.state, delivered.txn_id, delivered.delivered_at) == (
        DeliveryState.DELIVERED,
        1,
        12.0,
    )
    assert state("relayer-12", "e").state is DeliveryState.EXPIRED
    counts = result(h.scheduler.event_counts("e"))
    assert (counts.delivered, counts.expired) == (1, 1)
    # Awaiting its confirmation: confirmed now, delivered.
    assert state("relayer-13", "f").state is DeliveryState.AWAITING_CONFIRMATION
    assert result(h.scheduler.confirm("f", 2)) is True
    assert state("relayer-13", "f").state is DeliveryState.DELIVERED
    # And retention takes what is final, and nothing else.
    report = result(h.scheduler._store.purge(RetentionRule(1.0), clock.seconds() + 10))
    assert report.events >= 4
    assert result(h.scheduler.event_status("relayer-11")) is None
    assert result(h.scheduler.event_status("a0")) is not None  # still queued at "a"
