"""
The scheduler's bound on sends in flight (``max_sends_in_flight``), seen at the transport:
the bound holds across targets, first attempts go before retries, retries still go, and a wait
for a slot ends cleanly at stop and at removal, without counting against a request's timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _support import delivery_timers, result_of
from twisted.internet.defer import Deferred

from relayer import ConfigurationError, Scheduler, SQLiteStore, TargetState
from relayer._slots import RECOVERY_PROBATION, RETRY_TURN
from relayer.config import TargetConfig
from relayer.scheduler import DEFAULT_MAX_SENDS_IN_FLIGHT
from relayer.testing import (
    FakeTransport,
    Harness,
    InlineDatabasePool,
    build_scheduler,
    step,
    target,
)
from relayer.transport.base import SendOutcome


class CountingTransport(FakeTransport):
    """A fake transport that sees the sends in flight across all its targets."""

    def __init__(self, clock: Any = None) -> None:
        super().__init__(clock)
        self.in_flight = 0
        self.max_in_flight = 0
        #: The target of each request, in the order they came.
        self.order: list[str] = []
        #: The clock time of each request in :attr:`order`.
        self.times: list[float] = []

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        self.order.append(target.target_id)
        self.times.append(self.clock.seconds() if self.clock is not None else 0.0)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        d = super().send(target, txn_id, body)

        def ended(result: object) -> object:
            self.in_flight -= 1
            return result

        return d.addBoth(ended)


def build(
    targets: list[str | TargetConfig], db_path: Path, limit: int | None, **options: Any
) -> tuple[Harness, CountingTransport]:
    h = build_scheduler(
        targets,
        path=db_path,
        transport=CountingTransport(),
        options={
            "max_sends_in_flight": limit,
            **options,
        },
    )
    h.transport.clock = h.clock
    return h, h.transport  # type: ignore[return-value]


def state_of(h: Harness, target_id: str) -> Any:
    return {s.target_id: s for s in result_of(h.scheduler.status())}[target_id]


def test_never_more_than_the_limit_in_flight_across_many_targets(db_path: Path) -> None:
    names = [f"t{i}" for i in range(40)]
    h, transport = build(names, db_path, limit=5)
    for name in names:
        transport[name].hold()
    h.scheduler.submit_many([(name, {"n": n}) for n in range(3) for name in names])
    assert transport.in_flight == 5
    assert h.scheduler.sends.in_flight == 5
    assert h.scheduler.sends.waiting == 35
    while any(transport[name].held for name in names):
        for name in names:
            transport[name].release(keep_holding=True)
            assert transport.in_flight <= 5
    assert transport.max_in_flight == 5
    for name in names:
        assert transport[name].events == [{"n": n} for n in range(3)]
        assert transport[name].violations == []
    assert (h.scheduler.sends.in_flight, h.scheduler.sends.waiting) == (0, 0)


def test_first_attempts_of_up_targets_go_before_waiting_retries(db_path: Path) -> None:
    h, transport = build(["busy", "down", "healthy"], db_path, limit=1)
    transport["down"].down()
    h.scheduler.submit("down", {"n": 0})
    assert state_of(h, "down").state is TargetState.DOWN
    transport["down"].up()
    transport["busy"].hold()
    h.scheduler.submit("busy", {"n": 0})
    # The DOWN target's retry comes due while the only slot is taken: it waits.
    h.clock.advance(state_of(h, "down").next_retry_at - h.clock.seconds())
    assert transport.order == ["down", "busy"]
    # A healthy target's first attempt comes after it, and goes before it.
    h.scheduler.submit("healthy", {"n": 0})
    assert h.scheduler.sends.retries_waiting == 1
    transport["busy"].release()
    assert transport.order == ["down", "busy", "healthy", "down"]
    assert transport["down"].events == [{"n": 0}]
    assert state_of(h, "down").state is TargetState.UP


def test_a_retry_goes_out_while_first_attempts_keep_coming(db_path: Path) -> None:
    healthy = [f"h{i}" for i in range(4)]
    h, transport = build([*healthy, "down"], db_path, limit=1)
    for name in healthy:
        transport[name].slow(1.0)
    transport["down"].down()
    h.scheduler.submit("down", {"n": 0})
    transport["down"].up()
    retry_at = state_of(h, "down").next_retry_at
    n = 0
    # Every second each healthy target gets an event: first attempts always wait for the slot.
    while not transport["down"].events and h.clock.seconds() < retry_at + 60:
        h.scheduler.submit_many([(name, {"n": n}) for name in healthy])
        n += 1
        h.clock.advance(1.0)
    assert transport["down"].events == [{"n": 0}]
    # Once due, it waited for first attempts to have their turns, and no longer: the one in
    # flight when it came due, and RETRY_TURN more.
    retried_at = transport["down"].times[-1]
    sent = [
        name
        for name, when in zip(transport.order, transport.times, strict=True)
        if retry_at <= when <= retried_at and name != "down"
    ]
    assert RETRY_TURN <= len(sent) <= RETRY_TURN + 1


def test_stop_withdraws_the_waiting_sends_and_sends_nothing_more(db_path: Path) -> None:
    names = ["busy", "a", "b", "c"]
    h, transport = build(names, db_path, limit=1)
    transport["busy"].hold()
    h.scheduler.submit_many([(name, {"n": 0}) for name in names])
    assert transport.order == ["busy"]
    stopping = h.scheduler.stop()
    assert h.scheduler.sends.waiting == 0
    # The send in flight may finish within the stop timeout; the waiting ones never start.
    transport["busy"].release()
    assert stopping.called
    assert transport.order == ["busy"]
    assert delivery_timers(h.clock) == []
    assert (h.scheduler.sends.in_flight, h.scheduler.sends.waiting) == (0, 0)
    # Their events are still stored, and delivered after a restart.
    h2 = h.restart()
    for name in names:
        assert transport[name].events == [{"n": 0}]
    assert transport.max_in_flight == 1
    result_of(h2.scheduler.stop())


def test_removing_a_waiting_target_withdraws_its_wait(db_path: Path) -> None:
    h, transport = build(["busy", "gone", "next"], db_path, limit=1)
    transport["busy"].hold()
    h.scheduler.submit_many([("busy", {"n": 0}), ("gone", {"n": 0}), ("next", {"n": 0})])
    assert h.scheduler.sends.waiting == 2
    removed = h.scheduler._controller.remove(["gone"])
    # Its loop ends at once, without sending.
    assert removed.called
    assert h.scheduler.sends.waiting == 1
    transport["busy"].release()
    assert transport.order == ["busy", "next"]
    assert transport["gone"].requests == []
    assert (h.scheduler.sends.in_flight, h.scheduler.sends.waiting) == (0, 0)


def test_waiting_for_a_slot_does_not_count_against_the_request_timeout(db_path: Path) -> None:
    busy = target("busy", request_timeout=100.0)
    waiter = target("waiter", request_timeout=5.0)
    h, transport = build([busy, waiter], db_path, limit=1)
    transport["busy"].hold()
    h.scheduler.submit_many([("busy", {"n": 0}), ("waiter", {"n": 0})])
    h.clock.advance(50.0)
    # Ten of its request timeouts passed while it waited: it is UP, and nothing failed.
    status = state_of(h, "waiter")
    assert status.state is TargetState.UP
    assert status.consecutive_failures == 0
    assert not status.in_flight
    assert transport["waiter"].requests == []
    transport["busy"].release()
    assert transport["waiter"].events == [{"n": 0}]
    assert len(transport["waiter"].requests) == 1
    assert state_of(h, "waiter").consecutive_failures == 0


def test_a_send_that_may_no_longer_go_after_its_wait_is_not_sent(db_path: Path) -> None:
    # With leases, a process may lose the right to send while a send waits for its slot.
    h, transport = build(["busy", "waiter"], db_path, limit=1)
    controller = h.scheduler._controller
    allowed = {"busy", "waiter"}
    controller._may_send = lambda t: t.config.target_id in allowed
    transport["busy"].hold()
    h.scheduler.submit_many([("busy", {"n": 0}), ("waiter", {"n": 0})])
    allowed.discard("waiter")
    transport["busy"].release()
    assert transport["waiter"].requests == []
    # It resumes once it may send again, as a loop paused for its lease does.
    allowed.add("waiter")
    controller.resume_paused()
    assert transport["waiter"].events == [{"n": 0}]


def test_without_a_limit_every_target_sends_at_once(db_path: Path) -> None:
    names = [f"t{i}" for i in range(20)]
    h, transport = build(names, db_path, limit=None)
    for name in names:
        transport[name].hold()
    h.scheduler.submit_many([(name, {"n": 0}) for name in names])
    assert transport.in_flight == 20
    assert h.scheduler.sends.limit is None
    assert h.scheduler.sends.in_flight == 20


def test_the_default_limit(db_path: Path) -> None:
    h = build_scheduler(["t"], path=db_path)
    assert DEFAULT_MAX_SENDS_IN_FLIGHT == 1000
    assert h.scheduler.sends.limit == 1000


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
def test_a_bad_max_sends_in_flight_is_refused(bad: Any, tmp_path: Path) -> None:
    store = SQLiteStore.open_path(None, tmp_path / "r.db", pool=InlineDatabasePool())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_sends_in_flight must be an int >= 1"):
        Scheduler(None, store, FakeTransport(), max_sends_in_flight=bad)  # type: ignore[arg-type]


def test_the_sends_property_counts_first_attempts_and_retries(db_path: Path) -> None:
    h, transport = build(["busy", "down", "next"], db_path, limit=1)
    transport["down"].down()
    h.scheduler.submit("down", {"n": 0})
    transport["busy"].hold()
    h.scheduler.submit_many([("busy", {"n": 0}), ("next", {"n": 0})])
    h.clock.advance(state_of(h, "down").next_retry_at - h.clock.seconds())
    sends = h.scheduler.sends
    assert (sends.limit, sends.in_flight, sends.retries_in_flight) == (1, 1, 0)
    assert (sends.waiting, sends.retries_waiting) == (2, 1)
    transport["busy"].release()
    sends = h.scheduler.sends
    assert (sends.in_flight, sends.waiting) == (0, 0)


def test_a_target_that_failed_lately_waits_as_a_retry_even_once_up(db_path: Path) -> None:
    h, transport = build(["busy", "flappy", "healthy"], db_path, limit=1)
    transport["flappy"].fail_with(500)
    h.scheduler.submit("flappy", {"n": 0})
    transport["flappy"].up()
    h.clock.advance(state_of(h, "flappy").next_retry_at - h.clock.seconds())
    assert state_of(h, "flappy").state is TargetState.UP

    def race(n: int) -> list[str]:
        transport.order.clear()
        transport["busy"].hold()
        h.scheduler.submit("busy", {"n": n})
        # The flappy target asks for the slot first.
        h.scheduler.submit("flappy", {"n": n})
        h.scheduler.submit("healthy", {"n": n})
        transport["busy"].release()
        return transport.order

    # Back UP, but it failed a moment ago: its new transaction waits as a retry.
    assert race(1) == ["busy", "healthy", "flappy"]
    # Once it has not failed for RECOVERY_PROBATION seconds, it is healthy again.
    h.clock.advance(RECOVERY_PROBATION)
    assert race(2) == ["busy", "flappy", "healthy"]
    assert transport["flappy"].events == [{"n": n} for n in range(3)]


@pytest.mark.parametrize("wire", ["matrix", "standard-webhooks"])
def test_a_send_in_flight_holds_its_events_once_as_its_request(tmp_path: Path, wire: str) -> None:
    # Sends in flight are bounded in number (max_sends_in_flight), so what each holds bounds
    # the memory of all of them: the bytes of its request, not those and its events' too.
    import tracemalloc

    options: dict[str, Any] = {"max_events": 1, "max_bytes": 8_000_000}
    if wire != "matrix":
        options.update(
            format="standard-webhooks", secrets=("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",)
        )
    h = build_scheduler([target("t", **options)], path=tmp_path / "relayer.db")
    h.transport["t"].hold()
    size = 4_000_000
    event = {"big": "x" * size}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        h.scheduler.submit("t", event)
        step(h.clock, 0)
        assert h.transport["t"].in_flight == 1
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The request's body (and the transport's record of it, the same bytes): one copy.
    assert size <= held < 1.5 * size, held
    assert h.transport["t"].release() == 1
    step(h.clock, 0)
    assert h.transport["t"].events == [event]
    result_of(h.scheduler.stop())


def test_the_part_of_a_split_transaction_in_flight_holds_its_events_once(tmp_path: Path) -> None:
    import tracemalloc

    h = build_scheduler([target("t", max_events=10, max_bytes=40_000_000)], path=tmp_path / "r.db")
    fake = h.transport["t"]
    fake.respond(413)
    fake.hold()
    size = 2_000_000
    events = [{"n": n, "big": "x" * size} for n in range(4)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        h.scheduler.submit_many([("t", e) for e in events])
        step(h.clock, 0)
        assert [len(body) > 4 * size for _, body in fake.requests] == [True]
        # Refused as too large: split in two, and the first half sent, and held.
        fake.release(keep_holding=True)
        step(h.clock, 0)
        assert fake.in_flight == 1
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The fake's record of the first request (4 events) and the request in flight (2 events),
    # and not the events of the part in flight again.
    assert [round(len(body) / size) for _, body in fake.requests] == [4, 2]
    assert 6 * size <= held < 7 * size, held
    fake.up()
    assert fake.release() == 1
    step(h.clock, 0)
    assert fake.events == events
    result_of(h.scheduler.stop())
