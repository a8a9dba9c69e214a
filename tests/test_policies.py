"""
Retry policies: backoff schedules, what each failure class does, give-up rules, disabled
targets, and policies that misbehave.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relayer import (
    Action,
    BackoffPolicy,
    Decision,
    DelaySchedule,
    DeliveryState,
    FailureClass,
    FailureInfo,
    FailurePolicy,
    GiveUp,
    IRetryPolicy,
    RetryPolicy,
    TargetState,
)
from relayer.errors import ConfigurationError, InvalidTarget
from relayer.testing import Harness, build_scheduler, step, target
from tests._support import result_of

result = result_of


def statuses(h: Harness) -> dict[str, Any]:
    return {s.target_id: s for s in result(h.scheduler.status())}


def dead(h: Harness, target_id: str) -> list[Any]:
    return list(result(h.scheduler.dead_letters(target_id)))


def events_of(letter: Any) -> list[Any]:
    return [json.loads(e) for e in letter.events]


def harness(db_path: Any, policy: Any, **options: Any) -> Harness:
    return build_scheduler(
        [target("t", retry_policy=policy, max_events=1)], path=db_path, options=options
    )


# -- the built-in policy, without a scheduler -------------------------------------------------


def info(**changes: Any) -> FailureInfo:
    base = FailureInfo(
        target_id="t",
        txn_id=1,
        failure=FailureClass.SERVER_ERROR,
        reason="HTTP 500",
        retry_after=None,
        attempts=1,
        failures=1,
        n_events=1,
        oldest_at=0.0,
        down_since=0.0,
        now=0.0,
    )
    return attrs.evolve(base, **changes)


def test_the_built_in_policy_provides_the_interface() -> None:
    assert verifyObject(IRetryPolicy, RetryPolicy())


def test_what_each_failure_class_leads_to_by_default() -> None:
    policy = RetryPolicy(backoff=BackoffPolicy.constant(7.0))
    for failure in FailureClass:
        decision = policy.decide(info(failure=failure, n_events=3), lambda: 0.0)
        if failure is FailureClass.TOO_LARGE:
            assert decision.action is Action.SPLIT
        elif failure in (FailureClass.REJECTED, FailureClass.PERMANENT):
            assert decision.action is Action.DEAD_LETTER
        else:
            assert decision == Decision.retry(7.0), failure
    # A transaction of one event cannot be split: it is a permanent failure.
    one = policy.decide(info(failure=FailureClass.TOO_LARGE, n_events=1), lambda: 0.0)
    assert one.action is Action.DEAD_LETTER
    blocking = RetryPolicy(on_permanent="block")
    assert blocking.decide(info(failure=FailureClass.REJECTED), lambda: 0.0).action is Action.BLOCK


def test_a_schedule_gives_its_delays_and_then_repeats_its_last() -> None:
    schedule = DelaySchedule([5, 300, 1800])
    assert [schedule.delay(n, lambda: 0.5) for n in range(1, 6)] == [5, 300, 1800, 1800, 1800]
    assert (schedule.initial, schedule.maximum) == (5.0, 1800.0)
    jittered = DelaySchedule((100,), jitter=0.5)
    assert jittered.delay(1, lambda: 1.0) == 50.0


def test_retry_after_is_honoured_within_the_backoff_s_bounds() -> None:
    policy = RetryPolicy(backoff=DelaySchedule((10, 60)))
    decide = policy.decide
    assert decide(info(retry_after=30.0), lambda: 0.0).delay == 30.0
    assert decide(info(retry_after=0.0), lambda: 0.0).delay == 10.0
    assert decide(info(retry_after=99999.0), lambda: 0.0).delay == 60.0


def test_give_up_rules_count_the_transaction_or_the_target() -> None:
    policy = RetryPolicy(
        give_up=(GiveUp(attempts=3), GiveUp(age=100.0, then="disable")),
    )
    assert policy.decide(info(attempts=2), lambda: 0.0).action is Action.RETRY
    third = policy.decide(info(attempts=3), lambda: 0.0)
    assert (third.action, third.reason) == (Action.DEAD_LETTER, "gave up after 3 attempts")
    # The disable rule counts from when the target began failing, not from the events' age.
    old_events = info(oldest_at=-1000.0, down_since=-50.0, now=0.0)
    assert policy.decide(old_events, lambda: 0.0).action is Action.RETRY
    failing = policy.decide(info(down_since=-100.0, now=0.0), lambda: 0.0)
    assert failing.action is Action.DISABLE
    assert "failing for 100s" in failing.reason
    by_age = RetryPolicy(give_up=GiveUp(age=60.0))
    assert by_age.decide(info(oldest_at=-60.0), lambda: 0.0).action is Action.DEAD_LETTER
    # Only a retry meets the rules: a permanent failure is dead-lettered as it is.
    assert policy.decide(info(failure=FailureClass.REJECTED, attempts=9), lambda: 0.0) == (
        Decision.dead_letter()
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GiveUp(), "needs attempts, an age, or both"),
        (lambda: GiveUp(attempts=0), "attempts must be from 1"),
        (lambda: GiveUp(age=float("nan")), "finite"),
        (lambda: GiveUp(attempts=1, then="block"), "'dead_letter' or 'disable'"),
        (lambda: DelaySchedule(()), "at least one delay"),
        (lambda: DelaySchedule((5, -1)), "delay 2 of the schedule"),
        (lambda: DelaySchedule((5,), jitter=1.0), "jitter"),
        (lambda: RetryPolicy(backoff=5), "BackoffPolicy or a DelaySchedule"),
        (lambda: RetryPolicy(on_permanent="drop"), "on_permanent"),
        (lambda: RetryPolicy(give_up=(3,)), "GiveUp rules"),
        (lambda: RetryPolicy(actions={"nope": "retry"}), "not a failure class"),
        (lambda: RetryPolicy(actions={"not_found": "explode"}), "not an Action"),
    ],
)
def test_bad_policy_settings_are_refused_with_a_message(make: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make()


def test_a_target_takes_a_policy_or_backoff_settings_not_both() -> None:
    with pytest.raises(InvalidTarget, match="in the retry_policy"):
        target("t", retry_policy=RetryPolicy(), backoff=BackoffPolicy.constant(1.0))
    with pytest.raises(InvalidTarget, match="in the retry_policy"):
        target("t", retry_policy=RetryPolicy(), failure_policy=FailurePolicy.BLOCK)
    with pytest.raises(InvalidTarget, match="relayer.IRetryPolicy"):
        target("t", retry_policy=object())
    with pytest.raises(InvalidTarget, match="not a policy name"):
        target("t", retry_policy="Has Spaces")


# -- through a scheduler --------------------------------------------------------------------


def test_a_schedule_times_each_retry(db_path: Any) -> None:
    h = harness(db_path, RetryPolicy(backoff=DelaySchedule((5, 300, 1800))))
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 1})
    step(h.clock, 5000)
    assert h.transport["t"].times == [0.0, 5.0, 305.0, 2105.0, 3905.0]
    h.transport["t"].up()
    step(h.clock, 1800)
    assert h.transport["t"].events == [{"n": 1}]


def test_a_transaction_given_up_is_dead_lettered_and_the_next_waits_for_the_backoff(
    db_path: Any,
) -> None:
    h = harness(
        db_path,
        RetryPolicy(backoff=BackoffPolicy.constant(10.0), give_up=GiveUp(attempts=3)),
    )
    h.transport["t"].fail_with(503)
    for n in range(3):
        h.scheduler.submit("t", {"n": n})
    step(h.clock, 25)
    # Attempts at 0, 10 and 20; the third gives up on the first event's transaction.
    assert h.transport["t"].times == [0.0, 10.0, 20.0]
    letters = dead(h, "t")
    assert [events_of(d) for d in letters] == [[{"n": 0}]]
    assert letters[0].reason == "gave up after 3 attempts (HTTP 503)"
    status = statuses(h)["t"]
    assert status.state is TargetState.DOWN
    assert status.next_retry_at == 30.0  # not at once: the target is still failing
    h.transport["t"].up()
    step(h.clock, 10)
    assert h.transport["t"].events == [{"n": 1}, {"n": 2}]
    # The dead letter can be replayed, after the rest, as any other.
    assert result(h.scheduler.replay("t")) == 1
    step(h.clock, 1)
    assert h.transport["t"].events == [{"n": 1}, {"n": 2}, {"n": 0}]


def test_a_target_given_up_is_disabled_keeps_its_events_and_resumes_on_wake(
    db_path: Any,
) -> None:
    policy = RetryPolicy(
        backoff=BackoffPolicy.constant(60.0), give_up=GiveUp(age=600.0, then="disable")
    )
    h = harness(db_path, policy)
    h.transport["t"].down()
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 660)
    status = statuses(h)["t"]
    assert status.state is TargetState.DISABLED
    assert status.down_since == 0.0
    assert status.next_retry_at is None
    assert "gave up after failing for 600s" in (status.last_error or "")
    sent = len(h.transport["t"].requests)
    assert sent == 11  # at 0, 60, ..., 600
    # Disabled: nothing is sent, whatever time passes, and new events are stored.
    for n in range(1, 4):
        h.scheduler.submit("t", {"n": n})
    step(h.clock, 86400)
    assert len(h.transport["t"].requests) == sent
    status = statuses(h)["t"]
    assert status.state is TargetState.DISABLED
    assert status.pending_events == 4
    # It stays disabled across a restart.
    h = h.restart()
    step(h.clock, 86400)
    assert len(h.transport["t"].requests) == sent
    assert statuses(h)["t"].state is TargetState.DISABLED
    assert statuses(h)["t"].consecutive_failures == 11
    # Woken: its count of failures starts again, so one more failure does not disable it.
    h.scheduler.wake("t")
    step(h.clock, 0)
    status = statuses(h)["t"]
    assert status.state is TargetState.DOWN
    assert status.consecutive_failures == 1
    assert status.down_since == h.clock.seconds()
    h.transport["t"].up()
    step(h.clock, 60)
    assert h.transport["t"].events == [{"n": n} for n in range(4)]
    status = statuses(h)["t"]
    assert (status.state, status.down_since, status.consecutive_failures) == (
        TargetState.UP,
        None,
        0,
    )


def test_a_target_is_disabled_after_consecutive_failures(db_path: Any) -> None:
    policy = RetryPolicy(
        backoff=BackoffPolicy.constant(1.0), give_up=GiveUp(attempts=4, then="disable")
    )
    h = harness(db_path, policy)
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 100)
    assert len(h.transport["t"].requests) == 4
    assert statuses(h)["t"].state is TargetState.DISABLED
    assert statuses(h)["t"].consecutive_failures == 4


def test_a_disabled_target_woken_and_delivering_is_not_disabled_after_a_restart(
    db_path: Any,
) -> None:
    policy = RetryPolicy(
        backoff=BackoffPolicy.constant(1.0), give_up=GiveUp(attempts=2, then="disable")
    )
    h = harness(db_path, policy)
    h.transport["t"].fail_with(500)
    for n in range(3):
        h.scheduler.submit("t", {"n": n})
    step(h.clock, 10)
    assert statuses(h)["t"].state is TargetState.DISABLED
    h.transport["t"].up()
    h.transport["t"].hold()
    h.scheduler.wake("t")
    step(h.clock, 0)
    h.transport["t"].release()  # the first is delivered; the second is in flight
    step(h.clock, 0)
    assert h.transport["t"].events[:1] == [{"n": 0}]
    h = h.restart()
    h.transport["t"].up()
    step(h.clock, 5)
    assert h.transport["t"].events == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_actions_change_what_a_failure_class_does(db_path: Any) -> None:
    policy = RetryPolicy(
        backoff=BackoffPolicy.constant(5.0),
        actions={FailureClass.NOT_FOUND: Action.DISABLE, "rejected": "retry"},
    )
    h = build_scheduler(
        [target("a", retry_policy=policy), target("b", retry_policy=policy)], path=db_path
    )
    h.transport["a"].fail_with(404)
    h.transport["b"].respond(400)
    h.scheduler.submit("a", {"n": 0})
    h.scheduler.submit("b", {"n": 0})
    step(h.clock, 30)
    assert statuses(h)["a"].state is TargetState.DISABLED
    assert len(h.transport["a"].requests) == 1
    # A 400 is retried rather than dead-lettered.
    assert dead(h, "b") == []
    assert h.transport["b"].events == [{"n": 0}]
    assert h.transport["b"].times == [0.0, 5.0]


@implementer(IRetryPolicy)
class Scripted:
    """A policy of one's own: answers what it is told to, and records what it was asked."""

    name = "scripted"

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.asked: list[FailureInfo] = []

    def decide(self, failure: FailureInfo, random: Any) -> Decision:
        self.asked.append(failure)
        answer = self.answers.pop(0) if self.answers else Decision.retry(1.0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    def backoff_delay(self, failures: int, random: Any) -> float:
        return 42.0


def test_a_policy_of_one_s_own_is_asked_with_what_it_needs(db_path: Any) -> None:
    policy = Scripted(Decision.retry(3.0), Decision.retry(4.0))
    h = harness(db_path, policy)
    h.transport["t"].fail_with(429, retry_after="9")
    h.clock.advance(100)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 7)
    first, second = policy.asked[:2]
    assert (first.failure, first.retry_after, first.attempts, first.failures) == (
        FailureClass.RATE_LIMITED,
        9.0,
        1,
        1,
    )
    assert (first.oldest_at, first.down_since, first.now) == (100.0, 100.0, 100.0)
    assert (second.attempts, second.failures, second.down_since, second.now) == (
        2,
        2,
        100.0,
        103.0,
    )
    assert h.transport["t"].times == [100.0, 103.0, 107.0]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(RuntimeError("policy bug"), id="raises"),
        pytest.param("retry", id="not-a-decision"),
        pytest.param(Decision(Action.RETRY, float("inf")), id="infinite-delay"),
        pytest.param(Decision(Action.RETRY, None), id="no-delay"),
    ],
)
def test_a_policy_that_fails_or_answers_nonsense_gets_a_retry_and_loses_nothing(
    db_path: Any, answer: Any
) -> None:
    policy = Scripted(answer)
    h = harness(db_path, policy)
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 1)
    assert statuses(h)["t"].next_retry_at == 42.0  # the policy's own backoff
    h.transport["t"].up()
    step(h.clock, 42)
    assert h.transport["t"].events == [{"n": 0}]


def test_a_retry_delay_is_kept_within_seven_days(db_path: Any) -> None:
    h = harness(db_path, Scripted(Decision.retry(10.0**9)))
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 0)
    assert statuses(h)["t"].next_retry_at == 7 * 86400.0


def test_a_split_of_a_single_event_is_a_dead_letter(db_path: Any) -> None:
    h = harness(db_path, Scripted(Decision.split()))
    h.transport["t"].respond(500)
    h.scheduler.submit("t", {"n": 0})
    h.scheduler.submit("t", {"n": 1})
    step(h.clock, 0)
    assert [events_of(d) for d in dead(h, "t")] == [[{"n": 0}]]
    # The target did not answer (a 500): the next one waits for the policy's backoff.
    assert h.transport["t"].events == []
    step(h.clock, 42)
    assert h.transport["t"].events == [{"n": 1}]


def test_named_policies_come_from_the_scheduler_and_unknown_names_are_refused(
    db_path: Any,
) -> None:
    policy = RetryPolicy(backoff=BackoffPolicy.constant(3.0))
    h = build_scheduler(
        [target("t", retry_policy="three")], path=db_path, options={"policies": {"three": policy}}
    )
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 7)
    assert h.transport["t"].times == [0.0, 3.0, 6.0]
    with pytest.raises(InvalidTarget, match="unknown retry policy 'nowhere'"):
        h.scheduler.add_target(target("u", retry_policy="nowhere"))
    assert "u" not in h.scheduler.targets
    with pytest.raises(ConfigurationError, match="IRetryPolicy"):
        build_scheduler(["x"], path=db_path, options={"policies": {"bad": object()}})


def test_a_dead_letter_after_a_transient_failure_is_stored_with_the_failure(
    db_path: Any,
) -> None:
    """The give-up and the target's backoff state are stored together, and survive a crash."""
    policy = RetryPolicy(backoff=BackoffPolicy.constant(50.0), give_up=GiveUp(attempts=1))
    h = harness(db_path, policy)
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    h.scheduler.submit("t", {"n": 1})
    step(h.clock, 0)
    h = h.restart(stop=False)
    states = result(h.scheduler.event_status(_ids(h)[0]))
    assert states.deliveries["t"].state is DeliveryState.DEAD_LETTERED
    status = statuses(h)["t"]
    assert (status.state, status.consecutive_failures) == (TargetState.DOWN, 1)
    h.transport["t"].up()
    step(h.clock, 60)
    assert h.transport["t"].events == [{"n": 1}]


def _ids(h: Harness) -> list[str]:
    page = result(h.scheduler.target_events("t", DeliveryState.DEAD_LETTERED))
    return [e.event_id for e in page.entries]


def test_a_target_down_before_an_upgrade_counts_its_failures_from_its_first_start(
    db_path: Any,
) -> None:
    """A stored DOWN target without a time (as after an upgrade) is not disabled at once."""
    policy = RetryPolicy(
        backoff=BackoffPolicy.constant(10.0), give_up=GiveUp(age=100.0, then="disable")
    )
    clock = Clock()
    h = build_scheduler([target("t", retry_policy=policy)], path=db_path, clock=clock)
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 0)
    result(h.scheduler.stop())
    from tests._support import database_engine

    engine = database_engine(db_path)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE relayer_targets SET down_since = NULL")
    engine.dispose()
    clock.advance(10_000)
    h = h.restart()
    step(h.clock, 50)
    assert statuses(h)["t"].state is TargetState.DOWN
    assert statuses(h)["t"].down_since == 10_000.0
    step(h.clock, 100)
    assert statuses(h)["t"].state is TargetState.DISABLED


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(RetryPolicy(backoff=DelaySchedule((0,))), id="schedule-of-zero"),
        pytest.param(Scripted(*[Decision.retry(0.0)] * 10_000), id="policy-answers-zero"),
    ],
)
def test_a_retry_delay_of_zero_is_no_busy_loop(db_path: Any, policy: Any) -> None:
    h = harness(db_path, policy)
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    # A busy loop runs timer after timer without the clock moving: step() raises.
    step(h.clock, 0.5, max_timers=1000)
    times = h.transport["t"].times
    assert 1 < len(times) <= 51
    assert times == sorted(set(times))  # never two attempts at the same instant
