"""
Upgrading a schema version 6 database to version 7, on SQLite and on PostgreSQL.

Version 7 adds the table ``relayer_commands``. A version 6 database is made here by the code of
today, with work in every state (pending behind a DOWN target, BLOCKED, dead-lettered, in
flight when the process died, awaiting a confirmation), and then given version 6's tables (the
table dropped, the version set back): the upgrade must add the table and lose nothing, every
piece of work must go on, and commands must work on the upgraded database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from twisted.internet.task import Clock

from relayer import BackoffPolicy, FailurePolicy, TargetState
from relayer.store import schema
from relayer.testing import (
    FakeTransport,
    build_scheduler,
    open_store,
    release_process_lock,
    step,
    target,
)
from tests._support import database_engine, result_of


def as_version_6(db_path: Path | str) -> None:
    """Give the database version 6's tables: no relayer_commands, version 6."""
    engine = database_engine(db_path)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE relayer_commands"))
            conn.execute(
                sa.text("UPDATE relayer_meta SET value = '6' WHERE name = 'schema_version'")
            )
        with engine.connect() as conn:
            assert schema.read_version(conn) == 6
            tables = set(sa.inspect(conn).get_table_names())
            assert "relayer_commands" not in tables
            assert set(schema.define_tables(sa.MetaData(), 6).tables) <= tables
    finally:
        engine.dispose()


def configs() -> list[Any]:
    return [
        # An hour's backoff: after the upgrade, only a wake retries it within the test.
        target("down", backoff=BackoffPolicy.constant(3600.0)),
        target("blocked", failure_policy=FailurePolicy.BLOCK),
        target("dead", max_events=1),
        target("held"),
        target("await"),
    ]


def test_work_in_progress_in_version_6_goes_on_after_the_upgrade(db_path: Path | str) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    h = build_scheduler(configs(), path=db_path, clock=clock, transport=transport)
    transport["down"].fail_with(500)
    transport["blocked"].respond(400)
    transport["dead"].respond(400)
    transport["held"].hold()
    transport["await"].never_confirm()
    for n in range(3):
        for t in ("down", "blocked", "dead", "held", "await"):
            h.scheduler.submit(t, {"t": t, "n": n})
    step(clock, 15)
    before = {s.target_id: s for s in result_of(h.scheduler.status())}
    assert before["down"].state is TargetState.DOWN
    assert before["blocked"].state is TargetState.BLOCKED
    assert before["dead"].dead_letters == 1
    assert transport["held"].held == 1
    # The process dies with all of that under way, and is upgraded from version 6.
    release_process_lock(h.scheduler)
    as_version_6(db_path)
    clock = Clock()
    clock.advance(60)
    transport.clock = clock
    for t in ("held", "await", "down", "blocked", "dead"):
        if t == "held":
            transport[t].drop()
        transport[t].up()
    h = build_scheduler(configs(), path=db_path, clock=clock, transport=transport)
    engine = database_engine(db_path)
    try:
        with engine.connect() as conn:
            assert schema.read_version(conn) == schema.SCHEMA_VERSION == 7
            assert "relayer_commands" in sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()
    after = {s.target_id: s for s in result_of(h.scheduler.status())}
    for t in ("down", "blocked", "dead", "held", "await"):
        assert after[t].dead_letters == before[t].dead_letters, t
        assert after[t].state is before[t].state, t
    for t in ("down", "blocked"):
        assert after[t].pending_events == before[t].pending_events == 3, t
    # The in-flight transaction is sent again with its id; the awaited one is confirmed.
    step(clock, 5)
    assert [r.txn_id for r in transport["held"].received][:1] == [1]
    assert transport["held"].events == [{"t": "held", "n": n} for n in range(3)]
    assert result_of(h.scheduler.confirm("await", 1)) is True
    # A command recorded by another process (the command line) reaches the DOWN target, whose
    # stored retry is an hour away.
    other = open_store(Clock(), db_path)
    command_id = result_of(other.add_command("down", "wake", 0.0))
    step(clock, 31)
    assert transport["down"].events == [{"t": "down", "n": n} for n in range(3)]
    assert result_of(other.command(command_id)).result == "woken"
    result_of(other.close())
    # The BLOCKED one is woken in place; the dead letter is replayed by its id.
    assert result_of(h.scheduler.wake("blocked")) is None
    step(clock, 1)
    assert transport["blocked"].events == [{"t": "blocked", "n": n} for n in range(3)]
    dead = result_of(h.scheduler.dead_letters("dead"))
    assert len(dead) == 1
    assert result_of(h.scheduler.replay("dead", dead[0].txn_id)) == 1
    step(clock, 1)
    assert transport["dead"].events == [{"t": "dead", "n": n} for n in (1, 2, 0)]
    result_of(h.scheduler.stop())
