"""
Start, stop, takeovers and registrations when the store fails at the wrong moment.

Nothing may be left running after a failed start or a stop, renewals never stop on an error,
and a target whose registration or takeover failed on the store is still delivered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _support import GatedStore, delivery_timers
from twisted.internet.task import Clock

from relayer import BackoffPolicy, Scheduler, TargetState
from relayer.errors import StoreUnavailable
from relayer.lease import LeaseSettings
from relayer.testing import FakeTransport, open_store, target

LEASES = {"timeout": 10.0, "renew_interval": 2.5}


def make(
    db_path: Path,
    targets: list[str],
    *,
    clock: Clock | None = None,
    node: str | None = None,
    transport: FakeTransport | None = None,
    wrap: Callable[[Any], Any] = GatedStore,
) -> tuple[Scheduler, Any, FakeTransport, Clock]:
    clock = clock if clock is not None else Clock()
    store = wrap(open_store(clock, db_path))
    transport = transport if transport is not None else FakeTransport(clock)
    configs = [target(t, request_timeout=1.0, backoff=BackoffPolicy.constant(5.0)) for t in targets]
    leases = LeaseSettings(node_id=node, **LEASES) if node is not None else None  # type: ignore[arg-type]
    scheduler = Scheduler(clock, store, transport, configs, random=lambda: 0.0, leases=leases)
    return scheduler, store, transport, clock


def test_a_takeover_whose_load_fails_is_retried(db_path: Path) -> None:
    scheduler, store, transport, clock = make(db_path, ["t"], node="a")
    store.fail_calls("load_targets", StoreUnavailable("the database is unavailable"))
    assert scheduler.start().called
    assert "t" in scheduler.owned_targets
    scheduler.submit("t", {"n": 1})
    # The lease is held, but loading the target failed: the load is retried, and delivers.
    assert transport["t"].events == []
    clock.advance(1.0)
    assert transport["t"].events == [{"n": 1}]


def test_a_runtime_registration_that_fails_is_retried(db_path: Path) -> None:
    scheduler, store, transport, clock = make(db_path, [])
    assert scheduler.start().called
    store.fail_calls("register_targets", StoreUnavailable("the database is unavailable"), 2)
    scheduler.add_target(target("late"))
    scheduler.submit("late", {"n": 1})
    assert transport["late"].events == []
    clock.advance(1.0)
    assert transport["late"].events == []  # failed a second time; next try after 2 s more
    clock.advance(2.0)
    assert transport["late"].events == [{"n": 1}]


def test_an_error_acting_on_a_lease_round_does_not_stop_renewals(db_path: Path) -> None:
    scheduler, store, transport, clock = make(db_path, ["t"], node="a")
    assert scheduler.start().called
    controller = scheduler._controller
    real = controller.resume_paused
    errors = [RuntimeError("a bug after a round")] * 3

    def broken() -> None:
        if errors:
            raise errors.pop()
        real()

    controller.resume_paused = broken  # type: ignore[method-assign]
    # Three rounds fail after renewing; the leases are renewed all the same, and held.
    for _ in range(12):
        clock.advance(2.5)
    assert errors == []
    assert scheduler.owned_targets == frozenset({"t"})
    scheduler.submit("t", {"n": 1})
    assert transport["t"].events == [{"n": 1}]


class _ThreadsClock(Clock):
    """A Clock that claims to deliver calls from threads, so that start() listens."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def test_a_failed_start_leaves_nothing_running(db_path: Path) -> None:
    from twisted.internet.interfaces import IReactorFromThreads
    from zope.interface import classImplements

    classImplements(_ThreadsClock, IReactorFromThreads)
    # A DOWN target, stored, so that taking it over schedules its retry.
    first, store, transport, clock = make(db_path, ["t"], node="a")
    assert first.start().called
    transport["t"].down()
    first.submit("t", {"n": 1})
    assert first.stop().called

    clock = _ThreadsClock()

    def listen_fails(store: Any) -> Any:
        gated = GatedStore(store)

        def listen(callback: Any, commands: Any = None) -> Any:
            raise RuntimeError("cannot listen")

        gated.__dict__["listen"] = listen
        return gated

    scheduler, store, transport, clock = make(
        db_path, ["t"], node="a", clock=clock, transport=transport, wrap=listen_fails
    )
    started = scheduler.start()
    failures: list[Any] = []
    started.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    # No lease round, retry or delivery loop is left behind, and the lease is given back.
    assert clock.getDelayedCalls() == []
    requests = len(transport["t"].requests)
    transport["t"].up()
    clock.advance(100)
    assert len(transport["t"].requests) == requests
    other, _, _, _ = make(db_path, ["t"], node="b", transport=transport)
    assert other.start().called
    assert other.owned_targets == frozenset({"t"})


def test_a_target_taken_in_charge_while_stopping_starts_no_timer(db_path: Path) -> None:
    first, store, transport, clock = make(db_path, ["t"])
    assert first.start().called
    transport["t"].down()
    first.submit("t", {"n": 1})
    assert first.stop().called

    scheduler, store, transport, clock = make(db_path, ["t"], node="a", transport=transport)
    store.hold_calls("load_targets")
    assert scheduler.start().called
    assert [name for name, _ in store.held] == ["load_targets"]
    stopping = scheduler.stop()
    # The takeover's load finishes while the scheduler stops: the DOWN target is not resumed.
    store.release()
    assert stopping.called
    assert clock.getDelayedCalls() == []


def test_the_sweep_delivers_what_a_missed_notification_left(db_path: Path) -> None:
    """Two processes with leases on one database, and no notification between them."""
    clock = Clock()
    transport = FakeTransport(clock)
    a, _, _, _ = make(db_path, ["t0", "t1"], node="a", clock=clock, transport=transport)
    assert a.start().called
    b, _, _, _ = make(db_path, ["t0", "t1"], node="b", clock=clock, transport=transport)
    assert b.start().called
    for _ in range(4):
        clock.advance(2.5)
    owner = {t: n for n in (a, b) for t in n.owned_targets}
    assert set(owner) == {"t0", "t1"} and owner["t0"] is not owner["t1"]
    # Each submits for the other's target; nothing tells the owner (no LISTEN/NOTIFY here).
    owner["t0"].submit("t1", {"n": 1})
    owner["t1"].submit("t0", {"n": 2})
    assert transport["t0"].events == transport["t1"].events == []
    clock.advance(30.0)
    assert transport["t1"].events == [{"n": 1}]
    assert transport["t0"].events == [{"n": 2}]


def test_the_sweep_revives_a_down_target_without_a_retry(db_path: Path) -> None:
    scheduler, store, transport, clock = make(db_path, ["t"])
    assert scheduler.start().called
    transport["t"].down()
    scheduler.submit("t", {"n": 1})
    t = scheduler._controller.targets["t"]
    assert t.recoverer is not None
    # Whatever lost it, the retry is gone.
    t.recoverer.cancel()
    transport["t"].up()
    clock.advance(30.0)
    assert transport["t"].events == [{"n": 1}]
    assert scheduler.status().result[0].state is TargetState.UP  # type: ignore[attr-defined]


def test_overdue_retries_are_spread_at_start_up(tmp_path: Path) -> None:
    import random

    ids = [f"t{n}" for n in range(20)]
    path = tmp_path / "r.db"
    first, store, transport, clock = make(path, ids)
    assert first.start().called
    for t in ids:
        transport[t].down()
        first.submit(t, {"n": 1})
    assert first.stop().called
    # The restart comes long after every retry was due.
    clock = Clock()
    clock.advance(1000.0)
    transport.clock = clock
    draws = random.Random(7)
    configs = [
        target(t, request_timeout=1.0, backoff=BackoffPolicy(initial=5.0, maximum=60.0))
        for t in ids
    ]
    scheduler = Scheduler(clock, open_store(clock, path), transport, configs, random=draws.random)
    assert scheduler.start().called
    due = sorted(s.next_retry_at - 1000.0 for s in scheduler.status().result)  # type: ignore[attr-defined]
    # Not a herd: spread over the 30 s window, none at once.
    assert all(0.0 <= d <= 30.0 for d in due)
    assert len(set(due)) == len(due)
    assert due[-1] - due[0] > 15.0
    for t in ids:
        transport[t].up()
    clock.advance(30.0)
    assert all(transport[t].events == [{"n": 1}] for t in ids)
    assert delivery_timers(clock) == []


def test_recovery_spread_is_configurable_and_validated(db_path: Path) -> None:
    clock = Clock()
    with pytest.raises(ValueError, match="recovery_spread"):
        Scheduler(clock, open_store(clock, db_path), FakeTransport(), recovery_spread=-1)
    with pytest.raises(ValueError, match="sweep_interval"):
        Scheduler(clock, open_store(clock, db_path), FakeTransport(), sweep_interval=0)


def test_a_stop_while_starting_waits_for_the_start_and_then_stops(db_path: Path) -> None:
    scheduler, store, transport, clock = make(db_path, ["t"])
    store.hold_calls("open")
    started = scheduler.start()
    stopping = scheduler.stop()
    assert not stopping.called
    store.release()
    assert started.called and stopping.called
    assert not scheduler.running
    # Nothing was left behind: no timer, and the database is free for the next scheduler.
    assert clock.getDelayedCalls() == []
    again, _, _, _ = make(db_path, ["t"], transport=transport)
    assert again.start().called
    assert again.running


def test_a_submit_made_as_the_last_one_is_stored_is_not_refused(db_path: Path) -> None:
    """The back-pressure count drops before the submits' Deferreds fire, not after."""
    clock = Clock()
    store = GatedStore(open_store(clock, db_path))
    scheduler = Scheduler(clock, store, FakeTransport(clock), [target("t")], max_waiting_events=10)
    assert scheduler.start().called
    store.hold_calls("add_events")
    outcomes: list[Any] = []

    def again(_: object) -> None:
        # The first six are stored: six more fit under the bound of ten.
        scheduler.submit_many([("t", {"n": i}) for i in range(6, 12)]).addBoth(outcomes.append)

    scheduler.submit_many([("t", {"n": i}) for i in range(6)]).addCallback(again)
    store.release()
    assert outcomes == [[f"relayer-{n}" for n in range(7, 13)]]
