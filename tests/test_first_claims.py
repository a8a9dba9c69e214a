"""
The first transaction of an idle target is claimed with its events, in one database transaction.

A target that is UP with nothing under way used to wait for the database twice for a new event:
once to store it, and once to claim the transaction that carries it. The grouper now reserves
such targets when it writes their events, and the store claims their first transactions in the
same database transaction; these tests hold the database's work in a pool that runs a job only
when told, and check what goes out after each job, and that nothing is lost, repeated or
reordered when that claim cannot be made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _support import GatedStore, result_of
from test_batching import ManualPool
from twisted.internet.task import Clock

from relayer import Scheduler
from relayer.errors import StoreUnavailable
from relayer.grouper import MAX_FIRST_CLAIMS_PER_WRITE
from relayer.store.base import TargetState
from relayer.testing import FakeTransport, open_store, target


def _started(db_path: Path, ids: list[str], gated: bool = False) -> Any:
    """A started scheduler on a pool run by hand; each target has had one event delivered."""
    clock = Clock()
    pool = ManualPool()
    store = open_store(clock, db_path, pool=pool)  # type: ignore[arg-type]
    if gated:
        store = GatedStore(store)
    transport = FakeTransport(clock)
    scheduler = Scheduler(clock, store, transport, [target(i) for i in ids])
    started = scheduler.start()
    pool.drain()
    assert started.called
    # Each target's list of targets is stored once, by the first write that names it, in a
    # database transaction of its own: that is done here.
    for i in ids:
        scheduler.submit(i, {"warm-up": i})
    pool.drain()
    assert all(transport[i].events == [{"warm-up": i}] for i in ids)
    return clock, pool, store, transport, scheduler


def _status(scheduler: Scheduler, pool: ManualPool) -> Any:
    """The status of the scheduler's first target."""
    d = scheduler.status()
    pool.drain()
    return result_of(d)[0]


def _sent(transport: FakeTransport, target_id: str) -> list[Any]:
    """The events sent to the target after its warm-up."""
    return transport[target_id].events[1:]


def _spy(store: Any) -> list[tuple[str, dict[str, Any]]]:
    """Record each write of events: which method, and the targets claimed with it."""
    writes: list[tuple[str, dict[str, Any]]] = []
    add_events, add_claiming = store.add_events, store.add_events_claiming

    def plain(batch: Any, now: float) -> Any:
        writes.append(("add_events", {}))
        return add_events(batch, now)

    def claiming(batch: Any, now: float, claims: Any) -> Any:
        writes.append(("add_events_claiming", dict(claims)))
        return add_claiming(batch, now, claims)

    store.add_events = plain
    store.add_events_claiming = claiming
    return writes


def test_an_idle_target_sends_once_its_events_are_committed(db_path: Path) -> None:
    """One database job stores the event and claims its transaction: the send starts then."""
    _, pool, store, transport, scheduler = _started(db_path, ["a", "b"])
    writes = _spy(store)
    d = scheduler.submit_many([("a", {"n": 1}), ("b", {"n": 2})])
    assert not d.called and _sent(transport, "a") == []
    assert len(pool.jobs) == 1
    pool.step()
    assert d.called
    assert _sent(transport, "a") == [{"n": 1}]
    assert _sent(transport, "b") == [{"n": 2}]
    assert [(name, sorted(claims)) for name, claims in writes] == [
        ("add_events_claiming", ["a", "b"])
    ]
    pool.drain()
    assert _status(scheduler, pool).pending_events == 0
    # The next event to the target, idle again, goes the same way.
    scheduler.submit("a", {"n": 3})
    pool.step()
    assert _sent(transport, "a") == [{"n": 1}, {"n": 3}]


def test_a_target_whose_loop_runs_is_not_claimed_with_its_events(db_path: Path) -> None:
    """A draining target's new events wait for its loop, in order, after what it sends now."""
    _, pool, store, transport, scheduler = _started(db_path, ["a"])
    fake = transport["a"]
    fake.hold()
    scheduler.submit("a", {"n": 0})
    pool.drain()
    assert fake.held == 1
    writes = _spy(store)
    scheduler.submit("a", {"n": 1})
    scheduler.submit("a", {"n": 2})
    pool.drain()
    assert writes and {name for name, _ in writes} == {"add_events"}
    fake.release(keep_holding=False)
    pool.drain()
    assert _sent(transport, "a") == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_a_wake_while_the_first_claim_is_made_starts_no_second_send(db_path: Path) -> None:
    """The reserved loop is the target's only one: a wake or a sweep meanwhile adds nothing."""
    clock, pool, _, transport, scheduler = _started(db_path, ["a"])
    scheduler.submit("a", {"n": 1})
    scheduler.wake("a")
    clock.advance(3600)  # sweeps run; the target is UP with its loop waiting
    pool.drain()
    assert [r.events for r in transport["a"].received[1:]] == [[{"n": 1}]]


@pytest.mark.parametrize("fault", ["claim", "lease"])
def test_a_claim_that_fails_does_not_fail_the_submit(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """
    If claiming with the events fails, the events are stored alone, and the loop claims for
    itself: the submit succeeds, and the event goes out once.
    """
    _, pool, store, transport, scheduler = _started(db_path, ["a"])
    writes = _spy(store)
    failures = [RuntimeError("claim failed")]
    real = store._check_lease if fault == "lease" else store._claim
    name = "_check_lease" if fault == "lease" else "_claim"

    def failing(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(store, name, failing)
    d = scheduler.submit("a", {"n": 1})
    pool.drain()
    assert result_of(d)
    assert [name for name, _ in writes] == ["add_events_claiming", "add_events"]
    assert _sent(transport, "a") == [{"n": 1}]
    assert _status(scheduler, pool).pending_events == 0


def test_a_store_unavailable_for_the_first_write_loses_and_repeats_nothing(
    db_path: Path,
) -> None:
    """The write is retried alone; the reserved loop claims for itself, and finds it later."""
    clock, pool, gated, transport, scheduler = _started(db_path, ["a"], gated=True)
    gated.fail_calls("add_events_claiming", StoreUnavailable("the disk is full"))
    d = scheduler.submit("a", {"n": 1})
    pool.drain()
    assert not d.called
    assert _sent(transport, "a") == []
    clock.advance(1)  # the grouper's retry
    pool.drain()
    assert result_of(d)
    assert _sent(transport, "a") == [{"n": 1}]
    assert gated.calls.count("add_events") == 1
    scheduler.submit("a", {"n": 2})
    pool.drain()
    assert _sent(transport, "a") == [{"n": 1}, {"n": 2}]
    assert _status(scheduler, pool).state is TargetState.UP


def test_stopping_while_a_first_claim_is_made(db_path: Path) -> None:
    """
    A stop during the write waits for it, and for the send of what it claimed, as it waits
    for any send in flight; nothing is sent again after a restart.
    """
    clock, pool, _, transport, scheduler = _started(db_path, ["a"])
    d = scheduler.submit("a", {"n": 1})
    stopped = scheduler.stop()
    pool.drain()
    assert result_of(d)
    assert stopped.called
    assert _sent(transport, "a") == [{"n": 1}]
    store = open_store(clock, db_path, pool=pool)  # type: ignore[arg-type]
    again = Scheduler(clock, store, transport, [target("a")])
    started = again.start()
    pool.drain()
    assert started.called
    clock.advance(3600)
    pool.drain()
    assert _sent(transport, "a") == [{"n": 1}]
    assert _status(again, pool).pending_events == 0


def test_a_write_to_many_idle_targets_claims_a_bounded_number_with_it(db_path: Path) -> None:
    """Past MAX_FIRST_CLAIMS_PER_WRITE, targets claim once the events are stored, as before."""
    ids = [f"t{i:02}" for i in range(MAX_FIRST_CLAIMS_PER_WRITE + 8)]
    _, pool, store, transport, scheduler = _started(db_path, ids)
    writes = _spy(store)
    d = scheduler.submit_many([(i, {"to": i}) for i in ids])
    pool.step()
    assert len(writes) == 1 and len(writes[0][1]) == MAX_FIRST_CLAIMS_PER_WRITE
    assert result_of(d)
    sent_at_once = [i for i in ids if _sent(transport, i)]
    assert sorted(sent_at_once) == sorted(writes[0][1])
    pool.drain()
    assert all(_sent(transport, i) == [{"to": i}] for i in ids)


def test_submits_hear_of_the_commit_before_the_first_sends_start(db_path: Path) -> None:
    _, pool, _, transport, scheduler = _started(db_path, ["a"])
    seen: list[bool] = []
    d = scheduler.submit("a", {"n": 1})
    send = transport.send

    def watching(target: Any, txn_id: int, body: bytes) -> Any:
        seen.append(d.called)
        return send(target, txn_id, body)

    transport.send = watching  # type: ignore[method-assign]
    pool.step()
    assert seen == [True]
