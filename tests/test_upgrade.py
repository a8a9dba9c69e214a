"""
Upgrading a schema version 3 database to version 4, on SQLite and on PostgreSQL.

The version 3 database is written by hand (``_v3``), as relayer 3 left it in the middle of its
work; the current code opens it, upgrades it in place, and must then deliver everything it held
as relayer 3 would have: nothing lost, nothing twice, in order, a transaction that was in flight
sent again with its id and its bytes, dead letters still dead letters, and each target's
backoff as it was.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import _v3
import pytest
import sqlalchemy as sa
from _v3 import T0
from conftest import POSTGRES
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from relayer import DeliveryState, FailurePolicy, TargetState
from relayer.scheduler import DEFAULT_STOP_TIMEOUT
from relayer.store import schema
from relayer.testing import FakeTarget, FakeTransport, Harness, build_scheduler, target

T = TypeVar("T")

#: The ids relayer gives events that have none of their own.
GENERATED_ID = re.compile(r"relayer-[0-9]+")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL schema (from ``db_path``)."""
    if request.param == "sqlite":
        yield tmp_path / "relayer.db"
    elif not POSTGRES:
        pytest.skip("needs PostgreSQL: set RELAYER_TEST_DATABASE_URL")
    else:
        yield request.getfixturevalue("db_path")


class Interrupted(Exception):
    """The failure an upgrade is made to meet part-way."""


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that has fired already (the inline pool makes them fire)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def open_upgraded(database: Path | str, target_ids: list[str] | None = None) -> Harness:
    """
    Start a scheduler on ``database``, at ``T0`` on a fake clock; its store upgrades it.

    The transaction in flight at ``inflight`` is held when it is sent again, so that its state
    can be seen during the send.
    """
    clock = Clock()
    clock.advance(T0)
    transport = FakeTransport(clock)
    transport["inflight"].hold()
    if target_ids is None:
        target_ids = [t.target_id for t in _v3.standard_contents().targets]
    configs = [
        target(t, failure_policy=FailurePolicy.BLOCK) if t == "blocked" else target(t)
        for t in target_ids
    ]
    return build_scheduler(configs, path=database, clock=clock, transport=transport)


def stop(h: Harness) -> None:
    stopping = h.scheduler.stop()
    if not stopping.called:
        h.clock.advance(DEFAULT_STOP_TIMEOUT)
    result_of(stopping)


def pump(h: Harness, seconds: float, step: float = 1.0) -> None:
    """Let ``seconds`` of the clock pass, a step at a time."""
    end = h.clock.seconds() + seconds
    while h.clock.seconds() < end:
        h.clock.advance(min(step, end - h.clock.seconds()))


def delivered(t: FakeTarget) -> list[bytes]:
    """The encoded events a target accepted, once each, in order."""
    return [e for r in t.received for e in _v3.events_of(r.body)]


def carried_by(t: FakeTarget) -> list[int]:
    """For each event in :func:`delivered`, the id of the transaction that carried it."""
    return [r.txn_id for r in t.received for _ in _v3.events_of(r.body)]


def entries(h: Harness, target_id: str, state: DeliveryState) -> list[Any]:
    """Every :class:`relayer.EventEntry` of a target in ``state``, following the pages."""
    found: list[Any] = []
    after: str | None = None
    while True:
        page = result_of(h.scheduler.target_events(target_id, state, after=after, limit=3))
        found.extend(page.entries)
        if page.next is None:
            return found
        after = page.next


def status_of(h: Harness, target_id: str) -> Any:
    return next(s for s in result_of(h.scheduler.status()) if s.target_id == target_id)


def delivery(h: Harness, event_id: str, target_id: str) -> Any:
    """How an event stands at a target, as :meth:`relayer.Scheduler.event_status` says."""
    status = result_of(h.scheduler.event_status(event_id))
    assert status is not None, f"{event_id} is unknown"
    assert status.event_id == event_id
    assert set(status.deliveries) == {target_id}
    return status.deliveries[target_id]


def check_upgraded(h: Harness, c: _v3.Contents) -> None:
    """
    Drive a scheduler that has just upgraded a database holding ``c``, and check that it
    delivers what the database held as relayer 3 would have.
    """
    tr = h.transport
    # -- the transaction in flight goes out first, with its id and its bytes ----------------
    (inflight,) = c.txns_of("inflight")
    assert tr["inflight"].requests == [(inflight.txn_id, inflight.body)]
    pending = entries(h, "inflight", DeliveryState.PENDING)
    assert len(pending) == len(c.pending("inflight"))
    # Its events are in it, sent once more than before; the others are only queued.
    in_txn = len(inflight.events)
    assert [e.txn_id for e in pending] == [inflight.txn_id] * in_txn + [None] * (
        len(pending) - in_txn
    )
    assert [e.attempts for e in pending[:in_txn]] == [inflight.attempts + 1] * in_txn
    d = delivery(h, pending[0].event_id, "inflight")
    assert d.state is DeliveryState.PENDING
    assert (d.txn_id, d.attempts, d.last_attempt_at) == (
        inflight.txn_id,
        inflight.attempts + 1,
        T0,
    )
    tr["inflight"].release()

    # -- UP targets deliver their backlog at once, in submit order ---------------------------
    for target_id in ("backlog", "inflight", "dead"):
        t = tr[target_id]
        assert delivered(t) == c.pending(target_id), target_id
        formed = [x.txn_id for x in c.txns_of(target_id)]
        assert t.txn_ids[: len(formed)] == formed
        # New transactions get new ids, above every id relayer 3 gave out.
        assert all(i > c.target(target_id).last_txn_id for i in t.txn_ids[len(formed) :])

    # -- the DOWN target keeps its backoff, and delivers after its retry ----------------------
    down = c.target("down")
    assert down.next_attempt_at is not None
    s = status_of(h, "down")
    assert s.state is TargetState.DOWN
    assert (s.consecutive_failures, s.next_retry_at, s.last_error) == (
        down.failures,
        down.next_attempt_at,
        down.last_error,
    )
    d = delivery(h, entries(h, "down", DeliveryState.PENDING)[0].event_id, "down")
    assert (d.state, d.next_attempt_at) == (DeliveryState.PENDING, down.next_attempt_at)
    pump(h, down.next_attempt_at - h.clock.seconds() - 0.5)
    assert tr["down"].requests == []
    pump(h, 60)
    (head,) = c.txns_of("down")
    assert tr["down"].requests[0] == (head.txn_id, head.body)
    assert tr["down"].times[0] >= down.next_attempt_at
    assert delivered(tr["down"]) == c.pending("down")
    s = status_of(h, "down")
    assert (s.state, s.consecutive_failures, s.next_retry_at) == (TargetState.UP, 0, None)

    # -- the BLOCKED target stays blocked until it is woken -----------------------------------
    pump(h, 3600, step=60)
    assert tr["blocked"].requests == []
    assert status_of(h, "blocked").state is TargetState.BLOCKED
    h.scheduler.wake("blocked")
    (refused,) = c.txns_of("blocked")
    assert tr["blocked"].requests[0] == (refused.txn_id, refused.body)
    assert delivered(tr["blocked"]) == c.pending("blocked")
    assert all(i > c.target("blocked").last_txn_id for i in tr["blocked"].txn_ids[1:])

    # -- dead letters are still dead letters, and a replay delivers them after the rest ------
    listed = result_of(h.scheduler.dead_letters("dead"))
    assert [
        (x.txn_id, x.reason, x.attempts, x.dead_at, list(x.events), x.body) for x in listed
    ] == [(x.txn_id, x.reason, x.attempts, x.dead_at, x.events, x.body) for x in c.dead_of("dead")]
    dead_ids = [i for x in listed for i in x.event_ids]
    assert len(dead_ids) == len(set(dead_ids)) == sum(len(x.events) for x in listed)
    for x in listed:
        for event_id in x.event_ids:
            d = delivery(h, event_id, "dead")
            assert (d.state, d.txn_id, d.reason) == (
                DeliveryState.DEAD_LETTERED,
                x.txn_id,
                x.reason,
            )
    rest = len(delivered(tr["dead"]))
    assert result_of(h.scheduler.replay("dead")) == len(dead_ids)
    pump(h, 10)
    replayed = [e for x in c.dead_of("dead") for e in x.events]
    assert delivered(tr["dead"]) == c.pending("dead") + replayed
    carriers = carried_by(tr["dead"])[rest:]
    assert all(i > c.target("dead").last_txn_id for i in carriers)
    for event_id, txn_id in zip(dead_ids, carriers, strict=True):
        d = delivery(h, event_id, "dead")
        assert (d.state, d.txn_id) == (DeliveryState.DELIVERED, txn_id)

    # -- a target with nothing pending goes on with its ids ----------------------------------
    new_id = result_of(h.scheduler.submit("empty", {"type": "m.test", "after": "upgrade"}))
    assert GENERATED_ID.fullmatch(new_id)
    assert tr["empty"].txn_ids == [c.target("empty").last_txn_id + 1]

    # -- every event once, with a relayer id, DELIVERED in the transaction that carried it ----
    seen: list[str] = []
    for stored in c.targets:
        f = tr[stored.target_id]
        assert f.violations == [], stored.target_id
        assert f.max_in_flight <= 1
        done = entries(h, stored.target_id, DeliveryState.DELIVERED)
        assert entries(h, stored.target_id, DeliveryState.PENDING) == []
        ids = [e.event_id for e in done]
        if stored.target_id == "dead":
            # Replayed events were delivered after events submitted after them.
            assert Counter(e.txn_id for e in done) == Counter(carried_by(f))
        else:
            assert [e.txn_id for e in done] == carried_by(f), stored.target_id
        for entry in done:
            assert GENERATED_ID.fullmatch(entry.event_id), entry.event_id
            d = delivery(h, entry.event_id, stored.target_id)
            assert (d.state, d.txn_id) == (DeliveryState.DELIVERED, entry.txn_id)
            assert d.delivered_at is not None
        seen.extend(ids)
    assert len(seen) == len(set(seen))
    assert new_id in seen
    assert len(seen) == sum(len(c.pending(t.target_id)) for t in c.targets) + len(dead_ids) + 1


def test_a_version_3_database_is_upgraded_and_delivered_in_full(database: Path | str) -> None:
    contents = _v3.standard_contents()
    _v3.write_v3(database, contents)
    h = open_upgraded(database)
    try:
        assert _v3.schema_version(database) == str(schema.SCHEMA_VERSION)
        # What leases say is kept as it was.
        assert _v3.rows(database, "relayer_nodes") == sorted(contents.nodes, key=repr)
        assert _v3.rows(database, "relayer_leases") == sorted(contents.leases, key=repr)
        check_upgraded(h, contents)
    finally:
        stop(h)


def _caused_by(error: BaseException | None, kind: type[BaseException]) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


#: Where the migration to version 4 is made to fail: at the statement for which the test is
#: true (given the statement and how many have run, this one included), or after the last.
FAIL_POINTS: dict[str, Callable[[str, int], bool]] = {
    "first-statement": lambda sql, n: n == 1,
    # Events are being moved.
    "first-insert": lambda sql, n: sql.lstrip().upper().startswith("INSERT"),
    # Every event has been moved; the version 3 tables are being dropped.
    "first-drop": lambda sql, n: sql.lstrip().upper().startswith("DROP"),
    "after-last": lambda sql, n: False,
}


@pytest.mark.parametrize("fail_at", list(FAIL_POINTS))
def test_an_upgrade_that_fails_part_way_changes_nothing(
    database: Path | str, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    """
    The migration to version 4 fails at one of its statements, or after all of them (before
    the version is written): the database is left at version 3, as it was; once the fault is
    gone, the next start upgrades it.
    """
    contents = _v3.standard_contents()
    _v3.write_v3(database, contents)
    before = _v3.dump(database)
    migrate = schema.MIGRATIONS[4]
    fails_here = FAIL_POINTS[fail_at]
    statements: list[str] = []

    def interrupted(conn: sa.Connection) -> None:
        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)
            if fails_here(statement, len(statements)):
                raise Interrupted(f"the upgrade failed at: {statement[:60]}")

        sa.event.listen(conn, "before_cursor_execute", count)
        try:
            migrate(conn)
        finally:
            sa.event.remove(conn, "before_cursor_execute", count)
        raise Interrupted("the upgrade failed after its last statement")

    monkeypatch.setitem(schema.MIGRATIONS, 4, interrupted)
    with pytest.raises(Exception) as failed:  # noqa: B017 - the store may wrap it
        open_upgraded(database)
    assert _caused_by(failed.value, Interrupted), failed.value
    # The migration did some work before it failed.
    assert statements
    reached = any(fails_here(sql, n) for n, sql in enumerate(statements, 1))
    assert reached == (fail_at != "after-last"), statements
    assert _v3.dump(database) == before
    assert _v3.schema_version(database) == "3"

    monkeypatch.undo()
    h = open_upgraded(database)
    try:
        assert _v3.schema_version(database) == str(schema.SCHEMA_VERSION)
        check_upgraded(h, contents)
    finally:
        stop(h)


def test_an_empty_version_3_database_is_upgraded(database: Path | str) -> None:
    _v3.write_v3(database)
    h = open_upgraded(database, ["t", "u"])
    try:
        assert _v3.schema_version(database) == str(schema.SCHEMA_VERSION)
        ids = [
            result_of(h.scheduler.submit(t, {"type": "m.test", "n": n}))
            for n, t in enumerate(["t", "u", "t"])
        ]
        assert all(GENERATED_ID.fullmatch(i) for i in ids)
        assert len(set(ids)) == 3
        assert [r.txn_id for r in h.transport["t"].received] == [1, 2]
        assert h.transport["t"].events == [{"type": "m.test", "n": 0}, {"type": "m.test", "n": 2}]
        assert h.transport["u"].events == [{"type": "m.test", "n": 1}]
        for event_id, target_id in zip(ids, ["t", "u", "t"], strict=True):
            d = delivery(h, event_id, target_id)
            assert d.state is DeliveryState.DELIVERED
    finally:
        stop(h)
