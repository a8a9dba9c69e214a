"""relayer.testing's own helpers: step() on a fake clock, and what a FakeTarget counts."""

from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

import relayer.testing
from relayer import Delivery, DeliveryState, OutcomeKind
from relayer.testing import FakeTransport, Harness, build_scheduler, step, target

# -- step() ---------------------------------------------------------------------------------------


def recorder(clock: Clock) -> tuple[list[tuple[str, float]], Any]:
    """A list of (name, time) and a function that appends to it, for callLater."""
    seen: list[tuple[str, float]] = []

    def record(name: str) -> None:
        seen.append((name, clock.seconds()))

    return seen, record


def test_step_is_exported() -> None:
    assert "step" in relayer.testing.__all__
    assert relayer.testing.step is step


def test_each_timer_runs_at_its_own_time() -> None:
    clock = Clock()
    seen, record = recorder(clock)
    clock.callLater(5, record, "b")
    clock.callLater(1, record, "a")
    clock.callLater(10, record, "c")
    assert step(clock, 10) == 3
    assert seen == [("a", 1.0), ("b", 5.0), ("c", 10.0)]
    assert clock.seconds() == 10.0


def test_advance_by_contrast_runs_them_all_at_the_end() -> None:
    clock = Clock()
    seen, record = recorder(clock)
    clock.callLater(1, record, "a")
    clock.callLater(5, record, "b")
    clock.advance(10)
    assert seen == [("a", 10.0), ("b", 10.0)]


def test_timers_scheduled_by_timers_within_the_window_run_too() -> None:
    clock = Clock()
    seen, record = recorder(clock)

    def tick() -> None:
        record("tick")
        clock.callLater(2, tick)

    clock.callLater(2, tick)
    assert step(clock, 9) == 4
    assert seen == [("tick", 2.0), ("tick", 4.0), ("tick", 6.0), ("tick", 8.0)]
    (pending,) = clock.getDelayedCalls()
    assert pending.getTime() == 10.0  # beyond the window: still pending
    assert step(clock, 1) == 1
    assert seen[-1] == ("tick", 10.0)


def test_a_timer_due_exactly_at_the_end_runs() -> None:
    clock = Clock()
    clock.advance(3)
    seen, record = recorder(clock)
    clock.callLater(7, record, "end")
    assert step(clock, 7) == 1
    assert seen == [("end", 10.0)]


def test_a_timer_scheduled_for_now_by_a_timer_runs_before_the_clock_moves_on() -> None:
    clock = Clock()
    seen, record = recorder(clock)

    def first() -> None:
        record("first")
        clock.callLater(0, record, "now")

    clock.callLater(1, first)
    clock.callLater(2, record, "later")
    assert step(clock, 5) == 3
    assert seen == [("first", 1.0), ("now", 1.0), ("later", 2.0)]


def test_step_zero_runs_what_is_due_now() -> None:
    clock = Clock()
    seen, record = recorder(clock)
    clock.callLater(0, record, "now")
    clock.callLater(1, record, "later")
    assert step(clock, 0) == 1
    assert seen == [("now", 0.0)]
    assert clock.seconds() == 0.0


def test_timers_due_at_the_same_time_run_in_the_order_they_were_scheduled() -> None:
    clock = Clock()
    seen, record = recorder(clock)
    for name in "abcd":
        clock.callLater(3, record, name)
    clock.callLater(1, record, "first")
    step(clock, 3)
    assert [name for name, _ in seen] == ["first", "a", "b", "c", "d"]


def test_a_timer_cancelled_by_another_does_not_run() -> None:
    clock = Clock()
    seen, record = recorder(clock)
    victim = clock.callLater(2, record, "victim")
    clock.callLater(1, victim.cancel)
    assert step(clock, 5) == 1
    assert seen == []
    assert clock.getDelayedCalls() == []


def test_a_reset_timer_runs_at_its_new_time() -> None:
    clock = Clock()
    seen, record = recorder(clock)
    moved = clock.callLater(1, record, "moved")
    clock.callLater(2, record, "fixed")
    moved.reset(3)
    step(clock, 5)
    assert seen == [("fixed", 2.0), ("moved", 3.0)]


def test_a_timer_in_the_past_runs_now_and_the_clock_never_goes_back() -> None:
    clock = Clock()
    clock.advance(10)
    seen, record = recorder(clock)
    clock.callLater(-5, record, "late")
    assert step(clock, 1) == 1
    assert seen == [("late", 10.0)]
    assert clock.seconds() == 11.0


def test_step_lands_exactly_on_the_end() -> None:
    clock = Clock()
    clock.advance(0.1)
    clock.callLater(0.2, lambda: None)
    step(clock, 0.7)
    assert clock.seconds() == 0.1 + 0.7


def test_an_exception_in_a_timer_propagates_and_leaves_the_clock_at_its_time() -> None:
    clock = Clock()
    seen, record = recorder(clock)

    def boom() -> None:
        raise ZeroDivisionError("boom")

    clock.callLater(2, boom)
    clock.callLater(3, record, "after")
    with pytest.raises(ZeroDivisionError):
        step(clock, 10)
    assert clock.seconds() == 2.0
    assert step(clock, 8) == 1  # the rest runs on the next step
    assert seen == [("after", 3.0)]


@pytest.mark.parametrize("seconds", [-1, -0.001, math.inf, -math.inf, math.nan])
def test_step_refuses_a_bad_duration(seconds: float) -> None:
    clock = Clock()
    clock.callLater(0, lambda: None)
    with pytest.raises(ValueError, match="finite"):
        step(clock, seconds)
    assert clock.seconds() == 0.0
    assert len(clock.getDelayedCalls()) == 1  # nothing ran


@pytest.mark.parametrize("seconds", ["1", None, True])
def test_step_refuses_what_is_not_a_number(seconds: Any) -> None:
    with pytest.raises(TypeError, match="number of seconds"):
        step(Clock(), seconds)


def test_step_refuses_to_move_past_the_largest_float() -> None:
    clock = Clock()
    clock.advance(1e308)
    with pytest.raises(ValueError, match="cannot move"):
        step(clock, 1e308)


def test_a_busy_loop_is_stopped_with_a_clear_error() -> None:
    clock = Clock()
    runs = []

    def spin() -> None:
        runs.append(clock.seconds())
        clock.callLater(0, spin)

    clock.callLater(1, spin)
    with pytest.raises(RuntimeError, match="busy loop"):
        step(clock, 10, max_timers=1000)
    assert len(runs) == 1000
    assert clock.seconds() == 1.0  # where the loop spins


def test_the_default_bound_is_a_million_timers() -> None:
    assert inspect.signature(step).parameters["max_timers"].default == 1_000_000


def test_exactly_max_timers_is_allowed() -> None:
    clock = Clock()
    for n in range(5):
        clock.callLater(n, lambda: None)
    assert step(clock, 10, max_timers=5) == 5


def test_step_drives_the_scheduler_retry_by_retry(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.down()
    h.scheduler.submit("bridge", {"n": 1})
    step(h.clock, 3000)
    assert bridge.times == [0, 2, 6, 14, 30, 62, 126, 254, 510, 1022, 1534, 2046, 2558]
    bridge.up()
    step(h.clock, 512)
    assert bridge.events == [{"n": 1}]
    assert bridge.times[-1] == 3070
    h.scheduler.stop()


# -- duplicates -----------------------------------------------------------------------------------


def send(transport: FakeTransport, txn_id: int, body: bytes, target_id: str = "t") -> Any:
    """Send one transaction straight to a fake target; return the outcome (or the Failure)."""
    results: list[Any] = []
    transport.send(target(target_id), txn_id, body).addBoth(results.append)
    assert results, "the fake target did not answer"
    return results[0]


BODY_1 = b'{"events":[{"n":1}]}'
BODY_2 = b'{"events":[{"n":2},\n{"n":3}]}'


def test_a_fresh_target_has_seen_no_duplicates() -> None:
    t = FakeTransport(Clock())["t"]
    assert (t.duplicates, t.duplicate_txn_ids) == (0, [])


def test_a_resend_with_the_same_bytes_is_counted_not_recorded_again() -> None:
    transport = FakeTransport(Clock())
    t = transport["t"]
    assert send(transport, 1, BODY_1).reason == "HTTP 200"
    assert send(transport, 1, BODY_1).reason == "HTTP 200 (duplicate)"
    assert send(transport, 2, BODY_2).reason == "HTTP 200"
    assert send(transport, 1, BODY_1).reason == "HTTP 200 (duplicate)"
    assert send(transport, 2, BODY_2).reason == "HTTP 200 (duplicate)"
    assert t.duplicates == 3
    assert t.duplicate_txn_ids == [1, 1, 2]
    assert t.txn_ids == [1, 2]
    assert t.events == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert len(t.requests) == 5
    assert t.violations == []


def test_a_resend_with_other_bytes_is_a_violation_not_a_duplicate() -> None:
    transport = FakeTransport(Clock())
    t = transport["t"]
    send(transport, 1, BODY_1)
    send(transport, 1, BODY_2)
    assert t.duplicates == 0
    assert t.duplicate_txn_ids == []
    assert t.violations == ["transaction 1 was resent with different bytes"]
    assert t.events == [{"n": 1}]


def test_requests_that_were_not_accepted_are_not_duplicates() -> None:
    transport = FakeTransport(Clock())
    t = transport["t"]
    t.respond(503)
    send(transport, 1, BODY_1)  # refused: the target does not have it
    send(transport, 1, BODY_1)  # accepted, the first time
    t.down()
    send(transport, 1, BODY_1)  # never reached the target
    t.up()
    t.fail_with(500)
    send(transport, 1, BODY_1)  # answered 500, not accepted again
    assert t.duplicates == 0
    assert t.txn_ids == [1]
    assert len(t.requests) == 4


def test_a_lost_answer_makes_the_scheduler_resend_and_the_resend_is_a_duplicate(
    tmp_path: Path,
) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.lose_responses(1)
    h.scheduler.submit("bridge", {"n": 1})
    assert bridge.events == [{"n": 1}]  # the target has it...
    assert bridge.duplicates == 0
    step(h.clock, 2)  # ...the sender did not hear: it resends
    assert [txn_id for txn_id, _ in bridge.requests] == [1, 1]
    assert bridge.events == [{"n": 1}]
    assert (bridge.duplicates, bridge.duplicate_txn_ids) == (1, [1])
    assert bridge.violations == []
    (status,) = h.scheduler.status().result
    assert status.pending_events == 0
    h.scheduler.stop()


def test_lost_answers_add_up_and_apply_only_to_accepted_transactions(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.respond(503)  # not accepted: no answer lost
    bridge.lose_responses(1)
    bridge.lose_responses(1)
    h.scheduler.submit("bridge", {"n": 1})
    step(h.clock, 60)
    # 503 at 0; accepted at 2 (answer lost), at 6 (lost again, a duplicate), at 14 (heard).
    assert bridge.times == [0, 2, 6, 14]
    assert bridge.duplicate_txn_ids == [1, 1]
    assert bridge.events == [{"n": 1}]
    h.scheduler.stop()


def test_lose_responses_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        FakeTransport(Clock())["t"].lose_responses(-1)


def test_a_crash_after_the_target_accepted_gives_one_duplicate(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.lose_responses(1)  # the sender never learns of the acceptance
    h.scheduler.submit("bridge", {"n": 1})
    h = h.restart(stop=False)  # and dies before its retry
    step(h.clock, 60)
    assert bridge.txn_ids == [1]
    assert bridge.duplicate_txn_ids == [1]
    assert bridge.events == [{"n": 1}]
    assert bridge.violations == []
    h.scheduler.stop()


# -- confirmations --------------------------------------------------------------------------------


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired already."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def delivery(h: Harness, event_id: str, target_id: str = "bridge") -> Delivery:
    status = result_of(h.scheduler.event_status(event_id))
    assert status is not None
    return status.deliveries[target_id]


def test_confirm_later_answers_202_and_confirms_on_time(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.confirm_later(5)
    event_id = result_of(h.scheduler.submit("bridge", {"n": 1}))
    assert bridge.events == [{"n": 1}]  # the target has it...
    assert bridge.unconfirmed == [1]  # ...and owes a confirmation
    assert delivery(h, event_id).state is DeliveryState.AWAITING_CONFIRMATION
    step(h.clock, 4.9)
    assert bridge.confirmations == []
    step(h.clock, 0.1)
    assert bridge.confirmations == [(1, True)]
    assert bridge.unconfirmed == []
    assert delivery(h, event_id).state is DeliveryState.DELIVERED
    assert bridge.duplicates == 0
    assert bridge.violations == []
    h.scheduler.stop()


def test_a_transaction_awaiting_confirmation_holds_the_next(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.confirm_later(10)
    h.scheduler.submit("bridge", {"n": 1})
    h.scheduler.submit("bridge", {"n": 2})
    assert bridge.txn_ids == [1]
    step(h.clock, 10)  # 1 is confirmed; 2 goes out, and awaits in turn
    assert bridge.txn_ids == [1, 2]
    assert bridge.unconfirmed == [2]
    step(h.clock, 10)
    assert bridge.confirmations == [(1, True), (2, True)]
    assert bridge.events == [{"n": 1}, {"n": 2}]
    assert bridge.times == [0, 10]
    h.scheduler.stop()


def test_confirm_later_zero_confirms_at_the_next_advance_not_during_the_send(
    tmp_path: Path,
) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.confirm_later(0)
    h.scheduler.submit("bridge", {"n": 1})
    assert bridge.unconfirmed == [1]
    assert step(h.clock, 0) >= 1
    assert bridge.confirmations == [(1, True)]
    h.scheduler.stop()


def test_never_confirm_is_resent_after_the_confirmation_timeout(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db", confirmation_timeout=300)
    bridge = h.transport["bridge"]
    bridge.never_confirm()
    event_id = result_of(h.scheduler.submit("bridge", {"n": 1}))
    assert delivery(h, event_id).confirm_by == 300
    step(h.clock, 1000)
    # Sent at 0, then again at 300, 600 and 900: same id, same bytes, each a duplicate.
    assert bridge.times == [0, 300, 600, 900]
    assert bridge.duplicate_txn_ids == [1, 1, 1]
    assert bridge.events == [{"n": 1}]
    assert bridge.unconfirmed == [1]
    assert bridge.confirmations == []
    assert bridge.violations == []
    assert result_of(bridge.confirm()) is True
    assert delivery(h, event_id).state is DeliveryState.DELIVERED
    step(h.clock, 1000)
    assert len(bridge.requests) == 4  # never resent again
    h.scheduler.stop()


def test_confirm_picks_the_oldest_or_the_one_named(tmp_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=tmp_path / "relayer.db")
    a = h.transport["a"]
    a.never_confirm()
    with pytest.raises(ValueError, match="no transaction awaits confirmation"):
        a.confirm()
    h.scheduler.submit("a", {"n": 1})
    with pytest.raises(ValueError, match="transaction 7 does not await confirmation"):
        a.confirm(7)
    assert result_of(a.confirm(1)) is True
    assert a.unconfirmed == []
    h.scheduler.submit("a", {"n": 2})
    assert a.unconfirmed == [2]
    assert result_of(a.confirm()) is True
    assert a.confirmations == [(1, True), (2, True)]
    assert h.transport["b"].confirmations == []
    h.scheduler.stop()


def test_up_goes_back_to_plain_delivery(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db", confirmation_timeout=60)
    bridge = h.transport["bridge"]
    bridge.never_confirm()
    first = result_of(h.scheduler.submit("bridge", {"n": 1}))
    bridge.up()
    step(h.clock, 60)  # resent after the timeout, answered 200: delivered
    assert bridge.duplicate_txn_ids == [1]
    assert bridge.unconfirmed == []
    assert delivery(h, first).state is DeliveryState.DELIVERED
    second = result_of(h.scheduler.submit("bridge", {"n": 2}))
    assert delivery(h, second).state is DeliveryState.DELIVERED
    assert bridge.confirmations == []
    h.scheduler.stop()


def test_up_keeps_the_confirmations_already_owed(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.confirm_later(30)
    h.scheduler.submit("bridge", {"n": 1})
    bridge.up()
    step(h.clock, 30)
    assert bridge.confirmations == [(1, True)]
    h.scheduler.stop()


def test_a_confirmation_for_an_abandoned_transaction_is_answered_false(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db", confirmation_timeout=60)
    bridge = h.transport["bridge"]
    bridge.never_confirm()
    event_id = result_of(h.scheduler.submit("bridge", {"n": 1}, ttl=30))
    step(h.clock, 60)  # past its deadline: never sent again, abandoned
    assert len(bridge.requests) == 1
    assert delivery(h, event_id).state is DeliveryState.EXPIRED
    assert result_of(bridge.confirm()) is False  # the target copes: it records the answer
    assert bridge.confirmations == [(1, False)]
    assert bridge.unconfirmed == []
    assert bridge.violations == []
    assert delivery(h, event_id).state is DeliveryState.EXPIRED
    h.scheduler.stop()


def test_a_lost_202_is_resent_and_answered_202_again(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.never_confirm()
    bridge.lose_responses(1)
    event_id = result_of(h.scheduler.submit("bridge", {"n": 1}))
    step(h.clock, 2)  # the retry after the lost answer
    assert bridge.duplicate_txn_ids == [1]
    assert delivery(h, event_id).state is DeliveryState.AWAITING_CONFIRMATION
    assert result_of(bridge.confirm()) is True
    assert delivery(h, event_id).state is DeliveryState.DELIVERED
    h.scheduler.stop()


def test_a_resend_after_the_confirmation_was_sent_is_answered_200(tmp_path: Path) -> None:
    transport = FakeTransport(Clock())
    answers: list[tuple[str, int]] = []
    transport.confirmer = lambda target_id, txn_id: (
        answers.append((target_id, txn_id)) or succeed(False)
    )
    t = transport["t"]
    t.never_confirm()
    assert send(transport, 1, BODY_1).kind is OutcomeKind.ACCEPTED
    assert send(transport, 1, BODY_1).kind is OutcomeKind.ACCEPTED  # still pending
    assert result_of(t.confirm()) is False
    assert send(transport, 1, BODY_1).kind is OutcomeKind.DELIVERED  # the target is done
    assert answers == [("t", 1)]
    assert t.duplicate_txn_ids == [1, 1]


def test_confirmations_due_without_a_confirmer_wait_for_one() -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    t = transport["t"]
    t.confirm_later(5)
    assert send(transport, 1, BODY_1).reason == "HTTP 202"
    step(clock, 10)
    assert t.unconfirmed == [1]  # due, but no one to tell
    with pytest.raises(RuntimeError, match="confirmer is not set"):
        t.confirm()
    asked: list[tuple[str, int]] = []
    transport.confirmer = lambda target_id, txn_id: (
        asked.append((target_id, txn_id)) or succeed(True)
    )
    assert asked == [("t", 1)]
    assert t.confirmations == [(1, True)]
    assert t.unconfirmed == []


def test_a_failed_confirmation_is_a_violation() -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    transport.confirmer = lambda target_id, txn_id: fail(ZeroDivisionError("no"))
    t = transport["t"]
    t.confirm_later(1)
    send(transport, 1, BODY_1)
    step(clock, 1)
    assert t.violations == ["the confirmation of transaction 1 failed: no"]
    assert t.confirmations == []
    assert t.unconfirmed == []


def test_confirm_later_needs_a_clock_and_a_good_delay() -> None:
    with pytest.raises(ValueError, match="needs a FakeTransport made with a clock"):
        FakeTransport()["t"].confirm_later(1)
    t = FakeTransport(Clock())["t"]
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite delay"):
            t.confirm_later(bad)


def test_build_scheduler_and_restart_wire_the_confirmer(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    assert h.transport.confirmer == h.scheduler.confirm
    h = h.restart()
    assert h.transport.confirmer == h.scheduler.confirm
    h.scheduler.stop()


def test_a_confirmation_owed_survives_the_sender_crashing(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db", confirmation_timeout=600)
    bridge = h.transport["bridge"]
    bridge.confirm_later(30)
    event_id = result_of(h.scheduler.submit("bridge", {"n": 1}))
    step(h.clock, 10)
    h = h.restart(stop=False)  # kill -9; the new scheduler runs on a new clock
    step(h.clock, 20)  # the receiver's confirmation still comes at 30 s, to the new one
    assert bridge.confirmations == [(1, True)]
    assert delivery(h, event_id).state is DeliveryState.DELIVERED
    assert len(bridge.requests) == 1
    h.scheduler.stop()


def test_a_confirmation_owed_goes_to_the_new_scheduler_after_a_graceful_restart(
    tmp_path: Path,
) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.confirm_later(30)
    event_id = result_of(h.scheduler.submit("bridge", {"n": 1}))
    h = h.restart()
    step(h.clock, 30)
    assert bridge.confirmations == [(1, True)]
    assert delivery(h, event_id).state is DeliveryState.DELIVERED
    h.scheduler.stop()


# -- expiry on the fake clock ---------------------------------------------------------------------


def test_an_event_expires_at_a_down_target(tmp_path: Path) -> None:
    h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
    bridge = h.transport["bridge"]
    bridge.down()
    event_id = result_of(h.scheduler.submit("bridge", {"n": 1}, ttl=60))
    step(h.clock, 120)
    d = delivery(h, event_id)
    assert d.state is DeliveryState.EXPIRED
    assert d.expired_at is not None and d.expired_at <= 62
    assert all(t < 60 for t in bridge.times)  # no send starts at or after the deadline
    bridge.up()
    step(h.clock, 600)
    assert bridge.events == []
    h.scheduler.stop()


# -- docs/testing.md ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_the_testing_guide_examples_pass(tmp_path: Path) -> None:
    """Every example in docs/testing.md is a complete pytest module, and passes as written."""
    page = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) >= 8
    for n, block in enumerate(blocks):
        (tmp_path / f"test_example_{n:02d}.py").write_text(block)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
