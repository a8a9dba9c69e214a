"""Failure handling: isolation, backoff, recovery, wake, 413 splits, 4xx policies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import delivery_timers

from relayer import BackoffPolicy, FailurePolicy, TargetState
from relayer.testing import Harness, build_scheduler


def status(h: Harness, target_id: str = "target") -> Any:
    result = h.scheduler.status()
    assert result.called
    return {s.target_id: s for s in result.result}[target_id]


def advance_to(h: Harness, when: float) -> None:
    h.clock.advance(when - h.clock.seconds())


def test_a_down_target_does_not_delay_another(db_path: Path) -> None:
    h = build_scheduler(["down", "slow", "ok"], path=db_path)
    h.transport["down"].down()
    h.transport["slow"].hold()
    for n in range(5):
        h.scheduler.submit_many([("down", {"n": n}), ("slow", {"n": n}), ("ok", {"n": n})])
    # Without any time passing, the healthy target has everything.
    assert h.transport["ok"].events == [{"n": n} for n in range(5)]
    assert status(h, "down").state is TargetState.DOWN
    assert status(h, "slow").in_flight
    assert status(h, "ok").pending_events == 0


def test_exact_backoff_schedule_with_injected_jitter(db_path: Path) -> None:
    draws = iter([0.5, 0.0, 0.25, 0.75, 0.5, 0.0, 0.0])
    h = build_scheduler(["target"], path=db_path, random=lambda: next(draws))
    fake = h.transport["target"]
    fake.down()
    h.scheduler.submit("target", {"n": 1})
    # policy: initial 2, doubling, cap 512, jitter 0.2: delay = base * (1 - 0.2 * r)
    expected_delays = [2 * 0.9, 4 * 1.0, 8 * 0.95, 16 * 0.85, 32 * 0.9]
    times = [0.0]
    for delay in expected_delays:
        times.append(times[-1] + delay)
    for i, when in enumerate(times[1:], start=1):
        assert status(h).next_retry_at == pytest.approx(when)
        assert status(h).consecutive_failures == i
        advance_to(h, when - 0.001)
        assert len(fake.requests) == i  # not a moment early
        advance_to(h, when)
        assert len(fake.requests) == i + 1
    assert fake.times == pytest.approx(times)


def test_backoff_is_capped(db_path: Path) -> None:
    policy = BackoffPolicy(initial=1.0, multiplier=3.0, maximum=10.0, jitter=0.0)
    h = build_scheduler(["target"], path=db_path, backoff=policy)
    fake = h.transport["target"]
    fake.down()
    h.scheduler.submit("target", {"n": 1})
    h.clock.pump([0.5] * 200)
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:], strict=False)]
    assert gaps[:5] == pytest.approx([1.0, 3.0, 9.0, 10.0, 10.0])
    assert max(gaps) == pytest.approx(10.0)


def test_backoff_resets_after_a_success(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.down()
    h.scheduler.submit("target", {"n": 1})
    advance_to(h, 2.0)
    advance_to(h, 6.0)
    assert status(h).consecutive_failures == 3
    assert status(h).next_retry_at == pytest.approx(14.0)
    fake.up()
    advance_to(h, 14.0)
    assert fake.events == [{"n": 1}]
    s = status(h)
    assert (s.state, s.consecutive_failures, s.next_retry_at) == (TargetState.UP, 0, None)
    # The next outage starts from the initial delay again, not from 16 s.
    fake.down()
    h.scheduler.submit("target", {"n": 2})
    assert status(h).next_retry_at == pytest.approx(16.0)
    assert status(h).consecutive_failures == 1


def test_wake_during_backoff_retries_now(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.down()
    h.scheduler.submit("target", {"n": 1})
    advance_to(h, 2.0)
    assert status(h).next_retry_at == pytest.approx(6.0)
    fake.up()
    advance_to(h, 3.0)
    h.scheduler.wake("target")
    assert fake.events == [{"n": 1}]
    assert fake.times[-1] == 3.0
    assert status(h).state is TargetState.UP
    # The cancelled retry does not fire later.
    requests = len(fake.requests)
    h.clock.advance(1000)
    assert len(fake.requests) == requests
    assert delivery_timers(h.clock) == []


def test_wake_during_an_in_flight_send_never_sends_twice(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.hold()
    h.scheduler.submit("target", {"n": 1})
    assert status(h).in_flight
    h.scheduler.wake("target")
    h.scheduler.wake("target")
    assert len(fake.requests) == 1
    # The send in flight fails; because the target was woken, the retry is immediate.
    fake.fail_with(500)
    fake.release()
    assert status(h).state is TargetState.DOWN
    assert status(h).next_retry_at == h.clock.seconds()
    fake.up()
    h.clock.advance(0)
    assert fake.events == [{"n": 1}]
    assert fake.max_in_flight == 1
    assert fake.violations == []


def test_wake_during_a_send_that_succeeds_changes_nothing(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.hold()
    h.scheduler.submit("target", {"n": 1})
    h.scheduler.wake("target")
    fake.release()
    assert fake.events == [{"n": 1}]
    assert len(fake.requests) == 1
    assert status(h).state is TargetState.UP
    assert delivery_timers(h.clock) == []


def test_drain_then_up_strands_nothing(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path, max_events=10)
    fake = h.transport["target"]
    fake.down()
    for n in range(35):
        h.scheduler.submit("target", {"n": n})
    assert status(h).state is TargetState.DOWN
    assert status(h).pending_events == 35
    fake.up()
    fake.hold()
    h.clock.advance(2.0)  # the retry sends the failed transaction
    # Finish the drain one transaction at a time; during the last one, submit more.
    submitted_during_last = False
    while fake.held:
        if status(h).pending_events <= 10 and not submitted_during_last:
            # The last transaction of the backlog is in flight: nothing else is queued.
            assert status(h).pending_transactions == 1
            for n in range(35, 40):
                h.scheduler.submit("target", {"n": n})
            submitted_during_last = True
        fake.release(keep_holding=True)
    assert submitted_during_last
    assert fake.events == [{"n": n} for n in range(40)]
    s = status(h)
    assert (s.state, s.pending_events, s.pending_transactions) == (TargetState.UP, 0, 0)
    # UP again: new events go out at once.
    fake.up()
    h.scheduler.submit("target", {"n": 40})
    assert fake.events[-1] == {"n": 40}
    assert fake.violations == []


def test_a_down_backlog_is_delivered_in_full_size_batches(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.down()
    for n in range(250):
        h.scheduler.submit("target", {"n": n})  # 250 separate flushes while DOWN
    fake.up()
    h.clock.advance(2.0)
    assert [len(r.events) for r in fake.received] == [1, 100, 100, 49]
    assert fake.events == [{"n": n} for n in range(250)]


def test_413_splits_a_transaction_and_keeps_order(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.respond(413)
    fake.respond(413)
    h.scheduler.submit_many(("target", {"n": n}) for n in range(100))
    # 100 refused -> 50 + 50 queued; 50 refused -> 25 sent; then 25 + 50 together.
    assert [len(r.events) for r in fake.received] == [25, 75]
    assert fake.events == [{"n": n} for n in range(100)]
    assert [txn_id for txn_id, _ in fake.requests] == [1, 2, 3, 4]
    assert status(h).state is TargetState.UP
    assert status(h).dead_letters == 0


def test_413_on_a_single_event_is_permanent(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.respond(413)
    h.scheduler.submit("target", {"n": 1})
    h.scheduler.submit("target", {"n": 2})
    assert fake.events == [{"n": 2}]
    dead = h.scheduler.dead_letters("target").result
    assert [(d.txn_id, d.reason, d.n_events) for d in dead] == [(1, "HTTP 413", 1)]


def test_4xx_dead_letters_by_default_and_goes_on(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.respond(400)
    h.scheduler.submit("target", {"n": 1})
    h.scheduler.submit("target", {"n": 2})
    assert fake.events == [{"n": 2}]
    s = status(h)
    assert (s.state, s.dead_letters, s.pending_events) == (TargetState.UP, 1, 0)
    dead = h.scheduler.dead_letters("target").result
    assert len(dead) == 1 and dead[0].reason == "HTTP 400"
    # Replayed, the events go out again, in a new transaction.
    assert h.scheduler.replay("target").result == 1
    assert fake.events == [{"n": 2}, {"n": 1}]
    assert fake.txn_ids == [2, 3]
    assert status(h).dead_letters == 0


def test_4xx_blocks_the_target_under_the_block_policy(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path, failure_policy=FailurePolicy.BLOCK)
    fake = h.transport["target"]
    fake.fail_with(422)
    h.scheduler.submit("target", {"n": 1})
    h.scheduler.submit("target", {"n": 2})
    assert status(h).state is TargetState.BLOCKED
    assert status(h).last_error == "HTTP 422"
    h.clock.advance(10_000)
    assert len(fake.requests) == 1  # no automatic retry
    fake.up()
    h.scheduler.wake("target")
    assert fake.events == [{"n": 1}, {"n": 2}]
    # The blocked transaction was resent unchanged: same id, same bytes.
    assert fake.requests[1] == fake.requests[0]
    assert status(h).state is TargetState.UP


@pytest.mark.parametrize(
    ("status_code", "says"), [(401, "token"), (403, "token"), (404, "base URL"), (409, "409")]
)
def test_a_registration_fault_is_retried_not_dead_lettered(
    db_path: Path, status_code: int, says: str
) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.fail_with(status_code)
    for n in range(3):
        h.scheduler.submit("target", {"n": n})
    s = status(h)
    assert (s.state, s.dead_letters, s.pending_events) == (TargetState.DOWN, 0, 3)
    assert s.last_error is not None and s.last_error.startswith(f"HTTP {status_code}")
    assert says in s.last_error
    h.clock.advance(2.0)
    assert len(fake.requests) == 2 and fake.requests[0] == fake.requests[1]
    fake.up()
    h.clock.advance(4.0)
    # Once the registration is fixed, every event goes out, in order, none dead-lettered.
    assert fake.events == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert status(h).dead_letters == 0


def test_422_dead_letters_by_default(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.respond(422)
    h.scheduler.submit("target", {"n": 1})
    h.scheduler.submit("target", {"n": 2})
    assert fake.events == [{"n": 2}]
    assert [d.reason for d in h.scheduler.dead_letters("target").result] == ["HTTP 422"]


@pytest.mark.parametrize("status_code", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(db_path: Path, status_code: int) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.respond(status_code)
    h.scheduler.submit("target", {"n": 1})
    assert status(h).state is TargetState.DOWN
    assert status(h).last_error == f"HTTP {status_code}"
    h.clock.advance(2.0)
    assert fake.events == [{"n": 1}]
    assert fake.requests[0] == fake.requests[1]
    assert status(h).dead_letters == 0


def retry_after_cases() -> Iterator[tuple[int, str, float]]:
    yield 429, "30", 30.0
    yield 503, "7", 7.0
    yield 429, "100000", 512.0  # capped at the backoff maximum
    yield 503, "Thu, 01 Jan 1970 00:01:40 GMT", 100.0  # an HTTP date: clock time 100


@pytest.mark.parametrize("status_code, header, delay", list(retry_after_cases()))
def test_retry_after_is_honoured_within_the_cap(
    db_path: Path, status_code: int, header: str, delay: float
) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.respond(status_code, retry_after=header)
    h.scheduler.submit("target", {"n": 1})
    assert status(h).next_retry_at == pytest.approx(delay)
    advance_to(h, delay - 0.01)
    assert fake.events == []
    advance_to(h, delay)
    assert fake.events == [{"n": 1}]


def test_a_woken_blocked_target_keeps_draining_across_a_restart(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path, failure_policy=FailurePolicy.BLOCK)
    fake = h.transport["target"]
    fake.respond(422)
    for n in range(3):
        h.scheduler.submit("target", {"n": n})
    assert status(h).state is TargetState.BLOCKED
    fake.hold()
    h.scheduler.wake("target")
    fake.release(keep_holding=True)  # the blocking transaction is delivered; the next is held
    assert fake.events == [{"n": 0}]
    assert status(h).state is TargetState.DOWN  # draining, no longer blocked
    h2 = h.restart(stop=False)
    fake.up()
    h2.clock.advance(0)
    assert fake.events == [{"n": n} for n in range(3)]
    assert status(h2).state is TargetState.UP


def test_retry_after_zero_does_not_retry_in_a_busy_loop(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.fail_with(429, retry_after="0")
    h.scheduler.submit("target", {"n": 1})
    h.clock.advance(0)
    h.clock.advance(0)
    assert len(fake.requests) == 1
    assert status(h).next_retry_at == pytest.approx(2.0)  # the policy's initial delay
