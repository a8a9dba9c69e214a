"""
Operator actions and store faults that race a send's outcome being stored.

A wake must be honoured whenever it comes: before a send, while it is in flight, or while its
outcome is being written. An outcome that the store cannot take is stored before anything else
is sent, and never makes a retry come earlier than its backoff.
"""

from __future__ import annotations

from pathlib import Path

from _support import GatedStore
from twisted.internet.task import Clock

from relayer import BackoffPolicy, FailurePolicy, Scheduler, TargetState
from relayer.errors import StoreUnavailable
from relayer.testing import FakeTransport, open_store, target


def start(db_path: Path, **settings: object) -> tuple[Scheduler, GatedStore, FakeTransport, Clock]:
    clock = Clock()
    store = GatedStore(open_store(clock, db_path))
    transport = FakeTransport(clock)
    config = target("t", backoff=BackoffPolicy(initial=2.0, maximum=60.0, jitter=0.0), **settings)
    scheduler = Scheduler(clock, store, transport, [config], random=lambda: 0.0)  # type: ignore[arg-type]
    assert scheduler.start().called
    return scheduler, store, transport, clock


def status(scheduler: Scheduler) -> object:
    d = scheduler.status()
    assert d.called
    return d.result[0]  # type: ignore[attr-defined]


def test_a_wake_while_a_failure_is_being_stored_retries_at_once(db_path: Path) -> None:
    scheduler, store, transport, clock = start(db_path)
    fake = transport["t"]
    fake.down()
    store.hold_calls("fail")
    scheduler.submit("t", {"n": 1})
    # The send failed; its outcome (DOWN, retry in 2 s) is being written.
    assert [name for name, _ in store.held] == ["fail"]
    scheduler.wake("t")
    fake.up()
    store.release()
    # The wake came after the send but before the failure was stored: it is not lost.
    assert fake.events == [{"n": 1}]
    assert fake.times == [0.0, 0.0]
    assert status(scheduler).state is TargetState.UP  # type: ignore[attr-defined]


def test_a_wake_while_a_block_is_being_stored_unblocks(db_path: Path) -> None:
    scheduler, store, transport, clock = start(db_path, failure_policy=FailurePolicy.BLOCK)
    fake = transport["t"]
    fake.respond(400)
    store.hold_calls("block")
    scheduler.submit("t", {"n": 1})
    assert [name for name, _ in store.held] == ["block"]
    # The operator fixed what the target refused, and wakes it while the block is written.
    scheduler.wake("t")
    store.release()
    assert fake.events == [{"n": 1}]
    assert status(scheduler).state is TargetState.UP  # type: ignore[attr-defined]


def test_a_failure_the_store_cannot_take_waits_for_its_backoff(db_path: Path) -> None:
    scheduler, store, transport, clock = start(db_path)
    fake = transport["t"]
    fake.down()
    store.fail_calls("fail", StoreUnavailable("the database is locked"))
    scheduler.submit("t", {"n": 1})
    assert fake.times == [0.0]
    # The failure is stored when the loop restarts (after 1 s), without sending again...
    clock.pump([0.5, 0.5])
    assert fake.times == [0.0]
    s = status(scheduler)
    assert s.consecutive_failures == 1  # type: ignore[attr-defined]
    assert s.next_retry_at == 2.0  # type: ignore[attr-defined]
    records = scheduler._store.load_targets(["t"])
    assert records.result["t"].failures == 1  # type: ignore[attr-defined]
    assert records.result["t"].state is TargetState.DOWN  # type: ignore[attr-defined]
    # ...and the retry comes after the backoff of the first failure, not before.
    clock.advance(0.999)
    assert fake.times == [0.0]
    fake.up()
    clock.advance(0.001)
    assert fake.times == [0.0, 2.0]
    assert fake.events == [{"n": 1}]


def test_the_failure_count_never_drifts_from_the_stored_one(db_path: Path) -> None:
    scheduler, store, transport, clock = start(db_path)
    fake = transport["t"]
    fake.down()
    store.fail_calls("fail", StoreUnavailable("the database is locked"), times=3)
    scheduler.submit("t", {"n": 1})
    # The write is retried after 1, 2 and 4 s of loop backoff (at 1, 3 and 7 s); nothing is
    # sent in between, and the count in memory is the one failure being stored.
    clock.pump([0.5] * 13)
    assert fake.times == [0.0]
    assert status(scheduler).consecutive_failures == 1  # type: ignore[attr-defined]
    stored = scheduler._store.load_targets(["t"]).result["t"]  # type: ignore[attr-defined]
    assert (stored.state, stored.failures) == (TargetState.UP, 0)
    # At 7 s the failure is stored; its retry was due at 2 s, so it goes out at once, and
    # its failure is the second, in memory and in the store alike.
    clock.advance(0.5)
    assert fake.times == [0.0, 7.0]
    stored = scheduler._store.load_targets(["t"]).result["t"]  # type: ignore[attr-defined]
    assert (stored.state, stored.failures) == (TargetState.DOWN, 2)
    assert status(scheduler).consecutive_failures == 2  # type: ignore[attr-defined]
    assert stored.next_attempt_at == status(scheduler).next_retry_at == 7.0 + 4.0  # type: ignore[attr-defined]
