"""Store faults: a locked database, a full disk, failing writes. Nothing acknowledged is lost."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import sqlalchemy as sa
from twisted.internet.task import Clock

from relayer import (
    Backpressure,
    ConfigurationError,
    Scheduler,
    SQLiteStore,
    StoreError,
    TargetState,
)
from relayer.testing import FakeTransport, InlineDatabasePool, open_store, target


@attrs.define
class Faults:
    """Makes the store's write statements fail, as a full disk or an I/O error would."""

    dbapi: Any
    error: str | None = None
    kinds: tuple[str, ...] = ("INSERT", "UPDATE", "DELETE")
    failed: int = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.error is not None and statement.lstrip().upper().startswith(self.kinds):
            self.failed += 1
            # The driver's own error, as a full disk or a lost connection raises it.
            raise self.dbapi.OperationalError(self.error)


@attrs.define
class Setup:
    scheduler: Scheduler
    clock: Clock
    transport: FakeTransport
    faults: Faults
    path: Path | str

    def status(self, target_id: str = "target") -> Any:
        d = self.scheduler.status()
        assert d.called
        return {s.target_id: s for s in d.result}[target_id]


def make(path: Path | str, store_retry_timeout: float = 60.0, **settings: Any) -> Setup:
    clock = Clock()
    if isinstance(path, Path):
        store: Any = SQLiteStore.open_path(
            clock,  # type: ignore[arg-type]
            path,
            pool=InlineDatabasePool(),
            busy_timeout_ms=0,
        )
    else:
        store = open_store(clock, path)
    faults = Faults(store._engine.dialect.dbapi)
    sa.event.listen(store._engine, "before_cursor_execute", faults)
    transport = FakeTransport(clock)
    scheduler = Scheduler(
        clock,
        store,
        transport,
        [target("target")],
        random=lambda: 0.0,
        store_retry_timeout=store_retry_timeout,
        **settings,
    )
    assert scheduler.start().called
    return Setup(scheduler, clock, transport, faults, path)


@pytest.fixture
def lock(db_path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection to the same file, which can hold the write lock."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    yield conn
    conn.close()


@pytest.mark.sqlite_only
def test_a_locked_database_delays_the_ack_until_the_event_is_stored(
    db_path: Path, lock: sqlite3.Connection
) -> None:
    s = make(db_path)
    lock.execute("BEGIN IMMEDIATE")
    acked = s.scheduler.submit("target", {"n": 1})
    assert not acked.called  # not stored, so not acknowledged: it is being retried
    s.clock.advance(1.0)
    assert not acked.called
    lock.execute("ROLLBACK")
    s.clock.advance(5.0)
    assert acked.called and acked.result == "relayer-1"
    assert s.transport["target"].events == [{"n": 1}]


@pytest.mark.sqlite_only
def test_a_submit_fails_only_when_its_event_was_not_stored(
    db_path: Path, lock: sqlite3.Connection
) -> None:
    s = make(db_path, store_retry_timeout=10.0)
    lock.execute("BEGIN IMMEDIATE")
    failed = s.scheduler.submit("target", {"n": "lost"})
    errors: list[Any] = []
    failed.addErrback(errors.append)
    s.clock.pump([1.0] * 12)
    assert len(errors) == 1
    assert errors[0].check(StoreError)
    assert "not stored" in errors[0].getErrorMessage()
    assert "database is locked" in errors[0].getErrorMessage()
    lock.execute("ROLLBACK")
    # The scheduler goes on: the next event is stored and delivered; the failed one was not
    # stored, so it is not delivered either.
    assert s.scheduler.submit("target", {"n": "kept"}).called
    assert s.transport["target"].events == [{"n": "kept"}]
    assert s.status().pending_events == 0


def test_a_full_disk_while_submitting(db_path: Path) -> None:
    s = make(db_path)
    s.faults.error = "database or disk is full"
    acks = [s.scheduler.submit("target", {"n": n}) for n in range(5)]
    s.clock.pump([0.5] * 4)
    assert s.faults.failed >= 3
    assert not any(d.called for d in acks)
    s.faults.error = None
    s.clock.pump([5.0] * 2)
    assert all(d.called for d in acks)
    assert s.transport["target"].events == [{"n": n} for n in range(5)]


def test_a_failing_store_after_a_delivery_leads_to_an_identical_resend(db_path: Path) -> None:
    s = make(db_path)
    fake = s.transport["target"]
    fake.hold()
    assert s.scheduler.submit("target", {"n": 1}).called
    s.faults.error = "disk I/O error"
    fake.release()  # delivered, but recording the completion fails
    st = s.status()
    assert st.pending_events == 1
    assert st.next_retry_at is not None  # the delivery loop is retried
    s.faults.error = None
    s.clock.advance(st.next_retry_at - s.clock.seconds())
    # The transaction was sent again, with the same id and bytes; the receiver deduplicates.
    assert len(fake.requests) == 2
    assert fake.requests[0] == fake.requests[1]
    assert fake.events == [{"n": 1}]
    assert s.status().pending_events == 0
    assert s.scheduler.submit("target", {"n": 2}).called
    assert fake.events == [{"n": 1}, {"n": 2}]


def test_a_failing_backoff_write_still_retries_the_target(db_path: Path) -> None:
    s = make(db_path)
    fake = s.transport["target"]
    fake.hold()
    assert s.scheduler.submit("target", {"n": 1}).called
    s.faults.error = "database or disk is full"
    s.faults.kinds = ("UPDATE",)
    fake.down()
    fake.release()  # the send fails, and so does storing the target's backoff state
    assert s.faults.failed >= 1
    assert s.status().next_retry_at is not None
    s.faults.error = None
    fake.up()
    s.clock.pump([1.0] * 5)
    assert fake.events == [{"n": 1}]
    assert s.status().state is TargetState.UP


def test_events_acknowledged_before_a_fault_survive_a_restart(db_path: Path) -> None:
    s = make(db_path)
    fake = s.transport["target"]
    fake.down()
    acks = [s.scheduler.submit("target", {"n": n}) for n in range(3)]
    assert all(d.called for d in acks)
    s.faults.error = "disk I/O error"
    s.clock.pump([1.0] * 10)  # retries and store errors, no progress
    assert s.faults.failed >= 2
    s.faults.error = None
    s.scheduler.stop()
    again = make(db_path)
    again.transport["target"].up()
    again.clock.advance(1000)
    assert again.transport["target"].events == [{"n": n} for n in range(3)]


def test_submits_past_the_waiting_bound_are_refused_while_the_store_is_down(
    db_path: Path,
) -> None:
    s = make(db_path, max_waiting_events=5)
    s.faults.error = "database or disk is full"
    acks = [s.scheduler.submit("target", {"n": n}) for n in range(4)]
    acks.append(s.scheduler.submit_many([("target", {"n": 4})]))
    s.clock.pump([0.5] * 3)
    assert not any(d.called for d in acks)
    with pytest.raises(Backpressure, match="max_waiting_events of 5"):
        s.scheduler.submit("target", {"n": "refused"})
    with pytest.raises(Backpressure):
        s.scheduler.submit_many([("target", {"n": "refused too"})])
    # The store comes back: the waiting events are stored and delivered, the refused ones never.
    s.faults.error = None
    s.clock.pump([5.0] * 2)
    assert all(d.called and isinstance(d.result, (str, list)) for d in acks)
    assert s.scheduler.submit_many([("target", {"n": 5}), ("target", {"n": 6})]).called
    assert s.scheduler.submit("target", {"n": 7}).called
    assert s.transport["target"].events == [{"n": n} for n in range(8)]
    assert s.status().pending_events == 0


def test_a_submit_many_that_would_cross_the_bound_is_refused_whole(db_path: Path) -> None:
    s = make(db_path, max_waiting_events=3)
    s.faults.error = "disk I/O error"
    first = s.scheduler.submit_many([("target", {"n": 0}), ("target", {"n": 1})])
    with pytest.raises(Backpressure):
        s.scheduler.submit_many([("target", {"n": 2}), ("target", {"n": 3})])
    s.faults.error = None
    s.clock.pump([5.0] * 2)
    # Two ids of relayer's (on PostgreSQL, numbers drawn by the failed attempts are skipped).
    assert first.called and len(set(first.result)) == 2
    assert all(i.startswith("relayer-") for i in first.result)
    assert s.transport["target"].events == [{"n": 0}, {"n": 1}]
    assert s.status().pending_events == 0


@pytest.mark.sqlite_only
def test_events_whose_submits_failed_no_longer_count_as_waiting(
    db_path: Path, lock: sqlite3.Connection
) -> None:
    s = make(db_path, store_retry_timeout=2.0, max_waiting_events=2)
    lock.execute("BEGIN IMMEDIATE")
    failed = [s.scheduler.submit("target", {"n": n}) for n in range(2)]
    for d in failed:
        d.addErrback(lambda f: None)
    with pytest.raises(Backpressure):
        s.scheduler.submit("target", {"n": 2})
    s.clock.pump([0.5] * 12)  # past the retry timeout, twice: those submits fail
    assert [d.called for d in failed] == [True, True]
    lock.execute("ROLLBACK")
    assert s.scheduler.submit("target", {"n": 3}).called
    assert s.transport["target"].events == [{"n": 3}]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10", None])
def test_max_waiting_events_is_validated(db_path: Path, value: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_waiting_events"):
        make(db_path, max_waiting_events=value)
