"""
Stateful property tests: random sequences of submits, target failures, time, restarts and
wakes, with the delivery guarantees checked after every step.

A hypothesis :class:`~hypothesis.stateful.RuleBasedStateMachine` drives a scheduler built by
:func:`relayer.testing.build_scheduler` (a :class:`~twisted.internet.task.Clock`, an inline
database pool and a SQLite file). With the inline pool every store call completes before it
returns, so between two steps the only work not finished is a send held by a target (``hold``)
or answered later (``slow``): everything the invariants look at is exactly observable.

Every event carries its target and a per-target sequence number ``n``, so order and loss can be
checked by number.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from relayer import BackoffPolicy, FailurePolicy, SendOutcome, TargetState, TargetStatus
from relayer._encoding import events_of_body
from relayer.config import TargetConfig
from relayer.controller import DEFAULT_RECOVERY_SPREAD
from relayer.scheduler import DEFAULT_STOP_TIMEOUT
from relayer.store import DeadLetter
from relayer.testing import FakeTransport, Harness, build_scheduler, target
from relayer.transport.base import OutcomeKind

#: Slack for comparing clock times computed in different orders.
EPS = 1e-6

#: Three targets that differ in every setting that changes behaviour: the failure policy, the
#: batch caps (by count and by bytes) and the backoff policy, with and without jitter.
CONFIGS = [
    target(
        "a",
        max_events=3,
        backoff=BackoffPolicy(initial=1.0, multiplier=2.0, maximum=30.0, jitter=0.5),
    ),
    target(
        "b",
        max_events=5,
        max_bytes=256,
        failure_policy=FailurePolicy.BLOCK,
        backoff=BackoffPolicy(initial=2.0, multiplier=3.0, maximum=100.0, jitter=0.2),
    ),
    target("c", max_events=2, backoff=BackoffPolicy.constant(5.0)),
]
POLICY = {c.target_id: c.backoff for c in CONFIGS}
POLICY_ON_REFUSAL = {c.target_id: c.failure_policy for c in CONFIGS}
TARGETS = [c.target_id for c in CONFIGS]
LONGEST_WAIT = max(p.maximum for p in POLICY.values())

target_ids = st.sampled_from(TARGETS)
#: Padding makes events differ in size, so that the byte cap of "b" cuts batches too.
pads = st.integers(min_value=0, max_value=80)
#: Retry-After values: seconds (within and beyond every cap), a past HTTP date, garbage.
retry_afters = st.sampled_from([None, "0", "3", "1000", "Thu, 01 Jan 1970 00:00:01 GMT", "soon"])
#: Statuses of each class: transient (some honouring Retry-After), too large, permanent.
statuses_ = st.sampled_from([500, 502, 503, 408, 429, 413, 400, 403, 404, 409])
delays = st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0, 30.0, 120.0, 1000.0])


@attrs.define
class Completion:
    """How a send ended: at what clock time, and with which outcome."""

    at: float
    kind: str  # an OutcomeKind value, "error" (an exception), "timeout" or "cancelled"
    retry_after: float | None
    n_events: int


class RecordingTransport(FakeTransport):
    """A FakeTransport that records when and how each send to each target ended."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.completions: dict[str, list[Completion]] = {t: [] for t in TARGETS}

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        d = super().send(target, txn_id, body)

        n_events = len(events_of_body(body))
        started = self.clock.seconds() if self.clock is not None else 0.0

        def record(result: SendOutcome | Failure) -> SendOutcome | Failure:
            at = self.clock.seconds() if self.clock is not None else 0.0
            if isinstance(result, Failure):
                kind = "error"
                if result.check(CancelledError):
                    # The scheduler cancels a send at its request timeout (a failure), or
                    # abandons it when it stops (not one).
                    timed_out = at - started >= target.request_timeout - EPS
                    kind = "timeout" if timed_out else "cancelled"
                completion = Completion(at, kind, None, n_events)
            else:
                completion = Completion(at, result.kind.value, result.retry_after, n_events)
            self.completions[target.target_id].append(completion)
            return result

        return d.addBoth(record)


@attrs.define
class Backoff:
    """What the model knows of a target's backoff."""

    #: The last failed attempt.
    failure: Completion | None = None
    #: Whether that failure followed a wake during its send (the retry is then due at once).
    woken: bool = False
    #: After a check: the failure count and retry time the status showed.
    failures: int | None = None
    next_retry_at: float | None = None
    #: The time of the last restart since then: a retry that was due before it is due then.
    floor: float = -math.inf


@provider(ILogObserver)
class ErrorLog:
    """Collects the log events that report errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if (
            event.get("log_failure") is not None
            or event.get("isError")
            or event.get("log_level") in (LogLevel.error, LogLevel.critical)
        ):
            self.errors.append(str(event.get("log_format") or event))


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that the inline pool has already fired."""
    assert d.called, "with the inline pool, this should have completed at once"
    box: list[Any] = []
    d.addBoth(box.append)
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.errors = ErrorLog()
        globalLogPublisher.addObserver(self.errors)
        self.h: Harness | None = None
        self.transport: RecordingTransport | None = None
        self.acked: dict[str, list[int]] = {t: [] for t in TARGETS}
        self.next_n = dict.fromkeys(TARGETS, 0)
        self.backoff = {t: Backoff() for t in TARGETS}
        self.woken_in_flight = dict.fromkeys(TARGETS, False)
        self.seen_completions = dict.fromkeys(TARGETS, 0)

    # -- set-up ---------------------------------------------------------------------------------

    @initialize(seed=st.integers(min_value=0, max_value=2**32 - 1))
    def start(self, seed: int) -> None:
        clock = Clock()
        self.transport = RecordingTransport(clock)
        self.h = build_scheduler(
            CONFIGS, clock=clock, transport=self.transport, random=random.Random(seed).random
        )

    @property
    def harness(self) -> Harness:
        assert self.h is not None
        return self.h

    @property
    def rt(self) -> RecordingTransport:
        assert self.transport is not None
        return self.transport

    def now(self) -> float:
        return self.harness.clock.seconds()

    # -- submitting -----------------------------------------------------------------------------

    def _event(self, target_id: str, pad: int) -> dict[str, Any]:
        n = self.next_n[target_id]
        self.next_n[target_id] += 1
        return {"t": target_id, "n": n, "pad": "x" * pad}

    def _acked(self, d: Deferred[None], events: list[dict[str, Any]]) -> None:
        result_of(d)  # the submit's Deferred fired: the events are acknowledged
        for event in events:
            self.acked[event["t"]].append(event["n"])

    @rule(target_id=target_ids, pad=pads)
    def submit(self, target_id: str, pad: int) -> None:
        event = self._event(target_id, pad)
        self._acked(self.harness.scheduler.submit(target_id, event), [event])

    @rule(pairs=st.lists(st.tuples(target_ids, pads), min_size=1, max_size=25))
    def submit_many(self, pairs: list[tuple[str, int]]) -> None:
        events = [self._event(t, pad) for t, pad in pairs]
        d = self.harness.scheduler.submit_many([(e["t"], e) for e in events])
        self._acked(d, events)

    @rule(target_id=target_ids, count=st.integers(min_value=4, max_value=12), pad=pads)
    def submit_burst(self, target_id: str, count: int, pad: int) -> None:
        # More events than one transaction holds, in one commit: a backlog behind the head.
        events = [self._event(target_id, pad) for _ in range(count)]
        d = self.harness.scheduler.submit_many([(target_id, e) for e in events])
        self._acked(d, events)

    # -- the targets ----------------------------------------------------------------------------

    @rule(target_id=target_ids)
    def target_up(self, target_id: str) -> None:
        self.rt[target_id].up()

    @rule(target_id=target_ids)
    def target_down(self, target_id: str) -> None:
        self.rt[target_id].down()

    @rule(target_id=target_ids)
    def target_holds(self, target_id: str) -> None:
        self.rt[target_id].hold()

    @rule(target_id=target_ids, seconds=st.sampled_from([0.5, 3.0, 40.0]))
    def target_slow(self, target_id: str, seconds: float) -> None:
        self.rt[target_id].slow(seconds)

    @rule(target_id=target_ids)
    def target_releases(self, target_id: str) -> None:
        self.rt[target_id].release()

    @rule(target_id=target_ids, status=statuses_, retry_after=retry_afters)
    def target_fails_with(self, target_id: str, status: int, retry_after: str | None) -> None:
        self.rt[target_id].fail_with(status, retry_after)

    @rule(target_id=target_ids, status=statuses_, retry_after=retry_afters)
    def target_responds_once(self, target_id: str, status: int, retry_after: str | None) -> None:
        self.rt[target_id].respond(status, retry_after)

    @rule(target_id=target_ids)
    def target_refuses_the_next_as_too_large(self, target_id: str) -> None:
        # Once: a transaction of several events is split, and delivery goes on.
        self.rt[target_id].respond(413)

    # -- time, restarts, operators ---------------------------------------------------------------

    @rule(seconds=delays)
    def time_passes(self, seconds: float) -> None:
        self.harness.clock.advance(seconds)

    @rule()
    def restart_after_stop(self) -> None:
        h = self.harness
        stopping = h.scheduler.stop()
        if not stopping.called:
            # A send is in flight: stop() gives it stop_timeout seconds, then abandons it.
            h.clock.advance(DEFAULT_STOP_TIMEOUT)
        result_of(stopping)
        self._restarting()
        self._restarted(h.restart())

    @rule()
    def restart_after_crash(self) -> None:
        self._restarting()
        self._restarted(self.harness.restart(stop=False))

    def _restarting(self) -> None:
        # What ended before the restart happened to the old scheduler.
        self._take_completions()
        for target_id in TARGETS:
            # A wake is not persisted: it goes with the old scheduler.
            self.woken_in_flight[target_id] = False

    def _restarted(self, h: Harness) -> None:
        self.h = h
        for model in self.backoff.values():
            # A retry that was due (or in flight) when the scheduler went is due at once.
            model.floor = self.now()

    @rule(target_id=target_ids)
    def wake(self, target_id: str) -> None:
        if self.rt[target_id].in_flight:
            self.woken_in_flight[target_id] = True
        self.harness.scheduler.wake(target_id)

    # -- invariants -----------------------------------------------------------------------------

    def statuses(self) -> dict[str, TargetStatus]:
        return {s.target_id: s for s in result_of(self.harness.scheduler.status())}

    def all_dead_letters(self, target_id: str) -> list[DeadLetter]:
        """Every dead letter of a target, a page at a time."""
        letters: list[DeadLetter] = []
        while True:
            after = letters[-1].txn_id if letters else None
            page = result_of(self.harness.scheduler.dead_letters(target_id, 1000, after=after))
            letters.extend(page)
            if len(page) < 1000:
                return letters

    def dead_lettered(self, target_id: str) -> list[int]:
        letters = self.all_dead_letters(target_id)
        return [json.loads(e)["n"] for d in letters for e in events_of_body(d.body)]

    def _take_completions(self) -> None:
        """Fold the sends that ended since the last step into the backoff model."""
        for target_id in TARGETS:
            done = self.rt.completions[target_id]
            for c in done[self.seen_completions[target_id] :]:
                if c.kind == OutcomeKind.DELIVERED.value:
                    self.woken_in_flight[target_id] = False
                    self.backoff[target_id] = Backoff()
                elif POLICY_ON_REFUSAL[target_id] is FailurePolicy.BLOCK and (
                    c.kind == OutcomeKind.PERMANENT.value
                    or (c.kind == OutcomeKind.TOO_LARGE.value and c.n_events == 1)
                ):
                    # The target is BLOCKED: a wake during that send is spent.
                    self.woken_in_flight[target_id] = False
                elif c.kind in (OutcomeKind.RETRY.value, "error", "timeout"):
                    self.backoff[target_id] = Backoff(
                        failure=c, woken=self.woken_in_flight[target_id]
                    )
                    self.woken_in_flight[target_id] = False
            self.seen_completions[target_id] = len(done)

    @invariant()
    def checks(self) -> None:
        if self.h is None:
            return
        self._take_completions()
        statuses = self.statuses()
        assert set(statuses) == set(TARGETS)
        assert self.errors.errors == []
        for target_id in TARGETS:
            self.check_target(target_id, statuses[target_id])

    def check_target(self, target_id: str, s: TargetStatus) -> None:
        fake = self.rt[target_id]
        now = self.now()

        # At most one transaction in flight per target, and retries resend the same bytes.
        assert fake.violations == []
        assert fake.max_in_flight <= 1
        assert s.in_flight == (fake.in_flight > 0)

        # Per-target order: each event once, in submit order, and only acknowledged ones.
        delivered = [e["n"] for e in fake.events]
        assert all(e["t"] == target_id for e in fake.events)
        assert delivered == sorted(set(delivered)), f"{target_id} out of order: {delivered}"

        # Nothing acknowledged is lost: it is delivered, dead-lettered or pending; never twice.
        dead = self.dead_lettered(target_id)
        acked = self.acked[target_id]
        assert set(delivered) <= set(acked)
        assert set(dead) <= set(acked)
        assert not set(delivered) & set(dead)
        assert len(delivered) + len(dead) + s.pending_events == len(acked), (
            f"{target_id}: {len(acked)} acknowledged, {len(delivered)} delivered, "
            f"{len(dead)} dead-lettered, {s.pending_events} pending"
        )
        assert s.dead_letters == len(self.all_dead_letters(target_id))

        if s.state is TargetState.UP:
            # No stranded work: an UP target with anything pending is sending it right now.
            assert s.pending_events == 0 or s.in_flight, f"{target_id} is UP with stranded work"
            assert s.next_retry_at is None
        elif s.state is TargetState.BLOCKED:
            # The refused transaction stays at the head of the queue.
            assert s.pending_transactions >= 1
        else:
            assert s.pending_events >= 1
            if s.in_flight:
                # A retry is being sent or, after a success, the next transaction: the target
                # is UP again once its backlog is delivered.
                return
            # Every DOWN target has its retry scheduled...
            assert s.next_retry_at is not None, f"{target_id} is DOWN without a retry"
            # ...and within the policy's bounds.
            policy = POLICY[target_id]
            assert -EPS <= s.next_retry_at - now <= policy.maximum + EPS, (
                f"{target_id}: next retry at {s.next_retry_at}, now is {now}"
            )
            self.check_backoff(target_id, s)

    def check_backoff(self, target_id: str, s: TargetStatus) -> None:
        model = self.backoff[target_id]
        policy = POLICY[target_id]
        assert s.next_retry_at is not None
        # A retry that was overdue when the scheduler restarted is spread over a window after
        # the restart, so that targets down together are not retried as a herd.
        spread = min(DEFAULT_RECOVERY_SPREAD, policy.maximum)
        if model.next_retry_at is not None:
            # Checked before: nothing failed since, and a restart neither reset nor forgot it.
            assert s.consecutive_failures == model.failures
            if model.next_retry_at > model.floor + spread:
                assert math.isclose(s.next_retry_at, model.next_retry_at, abs_tol=EPS), (
                    f"{target_id}: next retry at {s.next_retry_at}, "
                    f"expected {model.next_retry_at}"
                )
            else:
                high = max(model.next_retry_at, model.floor + spread)
                assert model.floor - EPS <= s.next_retry_at <= high + EPS, (
                    f"{target_id}: next retry at {s.next_retry_at}, expected from "
                    f"{model.floor} to {high}"
                )
        elif model.failure is None:
            # The last send succeeded, and the scheduler restarted before the next one: the
            # recovery goes on within the spread.
            assert s.consecutive_failures == 0
            assert model.floor - EPS <= s.next_retry_at <= model.floor + spread + EPS
        else:
            failure = model.failure
            assert s.consecutive_failures >= 1
            if model.woken:
                # Woken while the failed send was in flight: the retry is due at once.
                low = high = 0.0
            elif failure.retry_after is not None:
                # Retry-After is honoured, within [initial, maximum] of the policy.
                low = high = min(max(failure.retry_after, policy.initial), policy.maximum)
            else:
                high = policy.base_delay(s.consecutive_failures)
                low = (1 - policy.jitter) * high
            if failure.at + low <= model.floor:
                # Overdue at a restart since: spread after it.
                high = max(failure.at + high, model.floor + spread)
            else:
                high = failure.at + high
            low = max(failure.at + low, model.floor)
            assert low - EPS <= s.next_retry_at <= high + EPS, (
                f"{target_id}: after failure {s.consecutive_failures} at {failure.at} "
                f"(Retry-After {failure.retry_after}, woken {model.woken}), the next retry "
                f"is at {s.next_retry_at}, outside [{low}, {high}]; "
                f"{self.rt.completions[target_id][-6:]} {self.rt[target_id].times[-6:]}"
            )
        model.failures = s.consecutive_failures
        model.next_retry_at = s.next_retry_at
        model.floor = -math.inf

    # -- the end --------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.h is not None:
                self.drain_and_check()
        finally:
            globalLogPublisher.removeObserver(self.errors)
            if self.h is not None:
                shutil.rmtree(Path(self.h.path).parent, ignore_errors=True)

    def drain_and_check(self) -> None:
        h = self.harness
        for target_id in TARGETS:
            fake = self.rt[target_id]
            fake.up()
            fake.release()
        for _ in range(200):
            statuses = self.statuses()
            if all(
                s.pending_events == 0 and not s.in_flight and s.state is TargetState.UP
                for s in statuses.values()
            ):
                break
            for target_id, s in statuses.items():
                if s.state is TargetState.BLOCKED:
                    h.scheduler.wake(target_id)
            h.clock.advance(LONGEST_WAIT)
            self.checks()
        else:
            raise AssertionError(f"not drained: {self.statuses()}")
        # Let answers scheduled by slow targets go; nothing is left to send.
        h.clock.advance(LONGEST_WAIT)
        self.checks()
        for target_id in TARGETS:
            delivered = [e["n"] for e in self.rt[target_id].events]
            dead = self.dead_lettered(target_id)
            # Every acknowledged event was delivered, or is visibly dead-lettered.
            assert sorted(delivered + dead) == sorted(self.acked[target_id])
            assert delivered == sorted(delivered)
        result_of(h.scheduler.stop())
        # stop() cancelled every timer of the scheduler's.
        assert h.clock.getDelayedCalls() == []


TestDeliveryMachine = DeliveryMachine.TestCase
TestDeliveryMachine.settings = settings(
    # 60 runs of 50 steps: 3,000 steps, the same ones every time. Set RELAYER_STATEFUL_EXAMPLES
    # to search longer.
    max_examples=int(os.environ.get("RELAYER_STATEFUL_EXAMPLES", "60")),
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
