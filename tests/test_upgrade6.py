"""
Upgrading a schema version 5 database to version 6, on SQLite and on PostgreSQL.

Version 6 adds ``relayer_targets.down_since``. A version 5 database is made here by the code of
today, with work in every state, and then given version 5's tables (the column dropped, the
version set back): the upgrade must add the column and lose nothing, and every piece of work
must go on as it would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from twisted.internet.task import Clock

from relayer import BackoffPolicy, FailurePolicy, GiveUp, RetryPolicy, TargetState
from relayer.store import schema
from relayer.testing import FakeTransport, build_scheduler, release_process_lock, step, target
from tests._support import database_engine, result_of

result = result_of


def as_version_5(db_path: Path | str) -> None:
    """Give the database version 5's tables: no down_since, version 5."""
    engine = database_engine(db_path)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE relayer_targets DROP COLUMN down_since"))
            conn.execute(
                sa.text("UPDATE relayer_meta SET value = '5' WHERE name = 'schema_version'")
            )
        with engine.connect() as conn:
            assert schema.read_version(conn) == 5
            columns = {c["name"] for c in sa.inspect(conn).get_columns("relayer_targets")}
            assert "down_since" not in columns
            assert (
                set(schema.define_tables(sa.MetaData(), 5).tables["relayer_targets"].c.keys())
                == columns
            )
    finally:
        engine.dispose()


def configs() -> list[Any]:
    return [
        target("down", backoff=BackoffPolicy.constant(10.0)),
        target("blocked", failure_policy=FailurePolicy.BLOCK),
        target("dead", max_events=1),
        target("held"),
        target("await"),
        # After the upgrade this one is given a policy that disables a target failing for an
        # hour: it has been DOWN for longer than that, but the upgrade cannot date its outage.
        target("old", backoff=BackoffPolicy.constant(10.0)),
    ]


def test_work_in_progress_in_version_5_goes_on_after_the_upgrade(db_path: Path | str) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    h = build_scheduler(configs(), path=db_path, clock=clock, transport=transport)
    transport["down"].fail_with(500)
    transport["old"].fail_with(500)
    transport["blocked"].respond(400)
    transport["dead"].respond(400)
    transport["held"].hold()
    transport["await"].never_confirm()
    for n in range(3):
        for t in ("down", "blocked", "dead", "held", "await", "old"):
            h.scheduler.submit(t, {"t": t, "n": n})
    step(clock, 15)
    before = {s.target_id: s for s in result(h.scheduler.status())}
    assert before["down"].state is TargetState.DOWN
    assert before["down"].consecutive_failures == 2
    assert before["blocked"].state is TargetState.BLOCKED
    assert before["dead"].dead_letters == 1
    assert transport["held"].held == 1
    # The process dies with all of that under way, and is upgraded from version 5.
    release_process_lock(h.scheduler)
    as_version_5(db_path)
    clock = Clock()
    clock.advance(7200)
    transport.clock = clock
    transport["held"].drop()
    transport["held"].up()
    transport["await"].up()
    transport["down"].up()
    transport["blocked"].up()
    patient = RetryPolicy(
        backoff=BackoffPolicy.constant(10.0), give_up=GiveUp(age=3600.0, then="disable")
    )
    upgraded = [
        c if c.target_id != "old" else target("old", retry_policy=patient) for c in configs()
    ]
    h = build_scheduler(upgraded, path=db_path, clock=clock, transport=transport)
    engine = database_engine(db_path)
    try:
        with engine.connect() as conn:
            assert schema.read_version(conn) == schema.SCHEMA_VERSION
    finally:
        engine.dispose()
    after = {s.target_id: s for s in result(h.scheduler.status())}
    for t in ("down", "blocked", "dead", "held", "await", "old"):
        assert after[t].dead_letters == before[t].dead_letters, t
    # Those UP went on at the start; the others wait as they did.
    for t in ("down", "blocked", "old"):
        assert after[t].pending_events == before[t].pending_events == 3, t
    assert after["blocked"].state is TargetState.BLOCKED
    assert after["down"].state is TargetState.DOWN
    # A DOWN target counts its outage from this start, not from a time it cannot know.
    assert after["old"].down_since == 7200.0
    assert after["old"].consecutive_failures == 2
    step(clock, 120)
    assert h.scheduler.status  # still running
    status = {s.target_id: s for s in result(h.scheduler.status())}
    assert status["old"].state is TargetState.DOWN  # failing for 2 minutes, not 2 hours
    # Everything goes on: the retry delivers, the held transaction is sent again with its id,
    # the awaited one is confirmed, the blocked one is woken, the dead letter replays.
    assert transport["down"].events == [{"t": "down", "n": n} for n in range(3)]
    assert [r.txn_id for r in transport["held"].received][:1] == [1]
    assert transport["held"].events == [{"t": "held", "n": n} for n in range(3)]
    assert result(h.scheduler.confirm("await", 1)) is True
    step(clock, 1)
    assert transport["await"].events[:1] == [{"t": "await", "n": 0}]
    h.scheduler.wake("blocked")
    step(clock, 1)
    assert transport["blocked"].events == [{"t": "blocked", "n": n} for n in range(3)]
    assert result(h.scheduler.replay("dead")) == 1
    step(clock, 1)
    assert transport["dead"].events == [{"t": "dead", "n": n} for n in (1, 2, 0)]
    status = {s.target_id: s for s in result(h.scheduler.status())}
    assert status["down"].down_since is None
    assert status["down"].state is TargetState.UP
