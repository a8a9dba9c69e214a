"""
Stateful property tests: random sequences of submits, target failures, time, restarts, store
outages and operator actions (wake, replay, adding a target), with the delivery guarantees
checked after every step.

A hypothesis :class:`~hypothesis.stateful.RuleBasedStateMachine` drives a scheduler built by
:func:`relayer.testing.build_scheduler` (a :class:`~twisted.internet.task.Clock`, an inline
database pool and the test database: a SQLite file, or a fresh PostgreSQL schema for each
example when ``RELAYER_TEST_DATABASE_URL`` names one). With the inline pool every store call
completes before it returns, so between two steps the only work not finished is a send held by
a target (``hold``) or answered later (``slow``), and submits waiting for the store to come
back: everything the invariants look at is exactly observable.

Every event carries its target and a per-target sequence number ``n``, so order and loss can be
checked by number.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import sqlalchemy as sa
from _support import RememberingTransport
from conftest import POSTGRES, _admin_engine, postgres_schema_url
from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from relayer import BackoffPolicy, FailurePolicy, SendOutcome, TargetState, TargetStatus
from relayer._encoding import events_of_body
from relayer.config import TargetConfig
from relayer.controller import DEFAULT_RECOVERY_SPREAD, LOOP_RETRY_MAX
from relayer.errors import StoreError, StoreUnavailable
from relayer.grouper import DEFAULT_STORE_RETRY_TIMEOUT
from relayer.scheduler import DEFAULT_STOP_TIMEOUT
from relayer.store import DeadLetter
from relayer.testing import Harness, build_scheduler, target
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
#: Targets an operator adds while the scheduler runs.
ADDED = [
    target("d", max_events=4, backoff=BackoffPolicy(initial=1.0, maximum=20.0, jitter=0.3)),
    target(
        "e",
        max_events=1,
        failure_policy=FailurePolicy.BLOCK,
        backoff=BackoffPolicy.constant(3.0),
    ),
]
ALL_CONFIGS = CONFIGS + ADDED
POLICY = {c.target_id: c.backoff for c in ALL_CONFIGS}
POLICY_ON_REFUSAL = {c.target_id: c.failure_policy for c in ALL_CONFIGS}
TARGETS = [c.target_id for c in CONFIGS]
ALL_TARGETS = [c.target_id for c in ALL_CONFIGS]
LONGEST_WAIT = max(p.maximum for p in POLICY.values())

#: Any target; a rule that needs a registered one takes the one of the first three in its place
#: while an added target is not registered yet.
target_ids = st.sampled_from(ALL_TARGETS)
#: Padding makes events differ in size, so that the byte cap of "b" cuts batches too.
pads = st.integers(min_value=0, max_value=80)
#: Retry-After values: seconds (within and beyond every cap), a past HTTP date, garbage.
retry_afters = st.sampled_from([None, "0", "3", "1000", "Thu, 01 Jan 1970 00:00:01 GMT", "soon"])
#: Statuses of each class: transient (some honouring Retry-After), too large, permanent.
statuses_ = st.sampled_from([500, 502, 503, 408, 429, 413, 400, 422, 403, 404, 409])
delays = st.sampled_from(
    [0.0, 0.5, 1.0, 2.5, 7.0, 30.0, DEFAULT_STORE_RETRY_TIMEOUT, 120.0, 1000.0]
)
#: How long the store stays unavailable: shorter and longer than the submit retry timeout.
outages = st.sampled_from(
    [0.5, 3.0, 20.0, DEFAULT_STORE_RETRY_TIMEOUT + 15.0, 3 * DEFAULT_STORE_RETRY_TIMEOUT]
)

#: The grouper's message when it gives up storing submitted events: expected after an outage
#: longer than the store retry timeout (those submits fail, and were never acknowledged).
GAVE_UP = "Storing {count} submitted events failed for"


@attrs.define
class Completion:
    """How a send ended: at what clock time, and with which outcome."""

    at: float
    kind: str  # an OutcomeKind value, "error" (an exception), "timeout" or "cancelled"
    retry_after: float | None
    n_events: int


class RecordingTransport(RememberingTransport):
    """A FakeTransport that records when and how each send to each target ended."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.completions: dict[str, list[Completion]] = {t: [] for t in ALL_TARGETS}

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
    #: A store outage got in the way since the last send ended: the next check learns the
    #: backoff from the status (within the policy's bounds) instead of predicting it.
    unknown: bool = False


@attrs.define
class StoreOutage:
    """
    Makes every statement of a store fail while the clock is before :attr:`until`, as a locked
    or unreachable database does: the driver's own OperationalError, which the store reports as
    :class:`relayer.errors.StoreUnavailable`.
    """

    now: Any
    until: float = -math.inf
    #: Statements that failed so far.
    failed: int = 0
    #: While set, statements go through: the checks read the store during an outage.
    suspended: bool = False

    @property
    def active(self) -> bool:
        return self.now() < self.until

    def attach(self, store: Any) -> None:
        engine = store._engine
        dbapi = engine.dialect.dbapi

        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if self.active and not self.suspended:
                self.failed += 1
                raise dbapi.OperationalError("the database is unavailable (injected outage)")

        sa.event.listen(engine, "before_cursor_execute", before)

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        self.suspended = True
        try:
            yield
        finally:
            self.suspended = False


@attrs.define
class PendingSubmit:
    """A submit whose Deferred has not fired: the store was unavailable."""

    events: list[dict[str, Any]]
    at: float


@provider(ILogObserver)
class ErrorLog:
    """Collects the log events that report errors, except those the model expects."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.expected: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if (
            event.get("log_failure") is not None
            or event.get("isError")
            or event.get("log_level") in (LogLevel.error, LogLevel.critical)
        ):
            text = str(event.get("log_format") or event)
            if text.startswith(GAVE_UP):
                self.expected.append(text)
            else:
                self.errors.append(text)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that the inline pool has already fired."""
    assert d.called, "with the inline pool, this should have completed at once"
    box: list[Any] = []
    d.addBoth(box.append)
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class Database:
    """The database of one example: a new SQLite file, or a new PostgreSQL schema."""

    def __init__(self) -> None:
        self.schema: str | None = None
        self.folder: Path | None = None
        if POSTGRES:
            self.schema = f"relayer_sm_{uuid.uuid4().hex[:12]}"
            self._admin("CREATE SCHEMA")
            self.location: Path | str = postgres_schema_url(self.schema)
        else:
            import tempfile

            self.folder = Path(tempfile.mkdtemp(prefix="relayer-sm-"))
            self.location = self.folder / "relayer.db"

    def _admin(self, verb: str, suffix: str = "") -> None:
        engine = _admin_engine()
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'{verb} "{self.schema}"{suffix}'))
        finally:
            engine.dispose()

    def drop(self) -> None:
        if self.schema is not None:
            self._admin("DROP SCHEMA", " CASCADE")
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.errors = ErrorLog()
        globalLogPublisher.addObserver(self.errors)
        self.h: Harness | None = None
        self.db: Database | None = None
        self.transport: RecordingTransport | None = None
        self.outage = StoreOutage(self.now)
        self.registered = list(TARGETS)
        self.acked: dict[str, list[int]] = {t: [] for t in ALL_TARGETS}
        #: Each acknowledged event's place in its target's queue: its rank in the order of
        #: acknowledgements and replays. Delivery must follow it.
        self.rank: dict[str, dict[int, int]] = {t: {} for t in ALL_TARGETS}
        self.next_rank = dict.fromkeys(ALL_TARGETS, 0)
        self.next_n = dict.fromkeys(ALL_TARGETS, 0)
        self.pending: list[PendingSubmit] = []
        self.failed_submits = 0
        self.problems: list[str] = []
        self.backoff = {t: Backoff() for t in ALL_TARGETS}
        self.woken_in_flight = dict.fromkeys(ALL_TARGETS, False)
        self.seen_completions = dict.fromkeys(ALL_TARGETS, 0)
        #: Statement failures seen at the last check, and the targets an outage got in the
        #: way of since (their delivery loop may be waiting to retry the store).
        self.seen_failures = 0
        self.disturbed: set[str] = set()

    # -- set-up ---------------------------------------------------------------------------------

    @initialize(seed=st.integers(min_value=0, max_value=2**32 - 1))
    def start(self, seed: int) -> None:
        clock = Clock()
        self.transport = RecordingTransport(clock)
        self.db = Database()
        self.h = build_scheduler(
            list(CONFIGS),
            path=self.db.location,
            clock=clock,
            transport=self.transport,
            random=random.Random(seed).random,
        )
        self.outage.attach(self.h.scheduler._store)

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

    def _registered(self, target_id: str) -> str:
        """``target_id`` if it is registered; else the one of the first three it stands for."""
        if target_id in self.registered:
            return target_id
        return TARGETS[ALL_TARGETS.index(target_id) % len(TARGETS)]

    # -- submitting -----------------------------------------------------------------------------

    def _event(self, target_id: str, pad: int) -> dict[str, Any]:
        n = self.next_n[target_id]
        self.next_n[target_id] += 1
        return {"t": target_id, "n": n, "pad": "x" * pad}

    def _submitted(self, d: Deferred[None], events: list[dict[str, Any]]) -> None:
        if not d.called and not (self.outage.active or self.pending):
            self.problems.append("a submit was not stored at once while the store was up")
        if not d.called:
            note("a submit waited for the store")
        pending = PendingSubmit(events, self.now())
        self.pending.append(pending)
        d.addCallbacks(self._acked, self._not_stored, (pending,), None, (pending,), None)

    def _acked(self, result: None, pending: PendingSubmit) -> None:
        # The submit's Deferred fired: the events are acknowledged, in submit order.
        if self.pending[0] is not pending:
            self.problems.append("submits were acknowledged out of order")
        self.pending.remove(pending)
        for event in pending.events:
            target_id, n = event["t"], event["n"]
            self.acked[target_id].append(n)
            self.rank[target_id][n] = self.next_rank[target_id]
            self.next_rank[target_id] += 1

    def _not_stored(self, failure: Failure, pending: PendingSubmit) -> None:
        # A submit may fail only once the store was unavailable for the whole retry timeout;
        # its events were not stored, and are not acknowledged.
        self.pending.remove(pending)
        self.failed_submits += 1
        note("a submit failed: the store was unavailable for too long")
        waited = self.now() - pending.at
        if not failure.check(StoreError):
            self.problems.append(f"a submit failed with {failure!r}")
        if waited < DEFAULT_STORE_RETRY_TIMEOUT - EPS:
            self.problems.append(f"a submit failed after {waited}s, before the retry timeout")

    @rule(target_id=target_ids, pad=pads)
    def submit(self, target_id: str, pad: int) -> None:
        event = self._event(self._registered(target_id), pad)
        self._submitted(self.harness.scheduler.submit(event["t"], event), [event])

    @rule(pairs=st.lists(st.tuples(target_ids, pads), min_size=1, max_size=25))
    def submit_many(self, pairs: list[tuple[str, int]]) -> None:
        events = [self._event(self._registered(t), pad) for t, pad in pairs]
        d = self.harness.scheduler.submit_many([(e["t"], e) for e in events])
        self._submitted(d, events)

    @rule(target_id=target_ids, count=st.integers(min_value=4, max_value=12), pad=pads)
    def submit_burst(self, target_id: str, count: int, pad: int) -> None:
        # More events than one transaction holds, in one commit: a backlog behind the head.
        target_id = self._registered(target_id)
        events = [self._event(target_id, pad) for _ in range(count)]
        d = self.harness.scheduler.submit_many([(target_id, e) for e in events])
        self._submitted(d, events)

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

    @rule(target_id=target_ids, status=st.sampled_from([400, 422]))
    def target_refuses_the_next(self, target_id: str, status: int) -> None:
        # Once: the content is refused, and the transaction dead-lettered (or the target
        # blocked), so that there are dead letters to replay.
        self.rt[target_id].respond(status)

    # -- the store ------------------------------------------------------------------------------

    @precondition(lambda self: not self.outage.active)
    @rule(seconds=outages)
    def store_fails_for(self, seconds: float) -> None:
        # Every statement fails for a while of the clock, then the store is back by itself.
        self.outage.until = self.now() + seconds

    # -- time, restarts, operators ---------------------------------------------------------------

    @rule(seconds=delays)
    def time_passes(self, seconds: float) -> None:
        self.harness.clock.advance(seconds)

    @precondition(lambda self: not self.outage.active)
    @rule()
    def restart_after_stop(self) -> None:
        h = self.harness
        stopping = h.scheduler.stop()
        # Submits waiting for the store are written first, then a send in flight gets
        # stop_timeout seconds before it is abandoned.
        for _ in range(3):
            if stopping.called:
                break
            h.clock.advance(DEFAULT_STOP_TIMEOUT)
        result_of(stopping)
        assert self.pending == [], "stop() returned before the submits were stored"
        self._restarting()
        self._restarted(h.restart())

    @precondition(lambda self: not self.outage.active)
    @rule()
    def restart_after_crash(self) -> None:
        old = self.harness.scheduler._store
        self._restarting()
        self._restarted(self.harness.restart(stop=False))
        # The process died: its submits waiting for the store were never acknowledged.
        self.pending.clear()
        # Its connections go with it.
        old._engine.dispose()

    def _restarting(self) -> None:
        # What ended before the restart happened to the old scheduler.
        self._take_completions()
        for target_id in ALL_TARGETS:
            # A wake is not persisted: it goes with the old scheduler.
            self.woken_in_flight[target_id] = False

    def _restarted(self, h: Harness) -> None:
        self.h = h
        self.outage.attach(h.scheduler._store)
        for model in self.backoff.values():
            # A retry that was due (or in flight) when the scheduler went is due at once.
            model.floor = self.now()

    @rule(target_id=target_ids)
    def wake(self, target_id: str) -> None:
        target_id = self._registered(target_id)
        if self.rt[target_id].in_flight:
            self.woken_in_flight[target_id] = True
        self.harness.scheduler.wake(target_id)

    @rule(target_id=target_ids)
    def replay(self, target_id: str) -> None:
        target_id = self._registered(target_id)
        with self.outage.bypassed():
            dead = self.dead_lettered(target_id)
            if not dead:
                # Replay a target that has dead letters, if one has.
                for other in self.registered:
                    dead = self.dead_lettered(other)
                    if dead:
                        target_id = other
                        break
        d = self.harness.scheduler.replay(target_id)
        if self.outage.active:
            # Nothing was queued again; the dead letters stay.
            with pytest.raises(StoreUnavailable):
                result_of(d)
            return
        assert result_of(d) == len(dead)
        if dead:
            note("dead letters were replayed")
        # The dead letters go to the end of the queue, oldest first, after everything queued
        # before the replay.
        for n in dead:
            self.rank[target_id][n] = self.next_rank[target_id]
            self.next_rank[target_id] += 1

    @precondition(lambda self: len(self.registered) < len(ALL_TARGETS))
    @rule()
    def add_target(self) -> None:
        config = ADDED[len(self.registered) - len(TARGETS)]
        self.harness.scheduler.add_target(config)
        note("a target was added while the scheduler ran")
        self.registered.append(config.target_id)
        # The application registers it again at every start.
        self.harness.targets.append(config)

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
        for target_id in ALL_TARGETS:
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

    def _take_outage(self) -> None:
        """Note which targets an outage may have got in the way of since the last check."""
        if self.outage.failed != self.seen_failures:
            self.seen_failures = self.outage.failed
            self.disturbed = set(ALL_TARGETS)
        else:
            controller = self.harness.scheduler._controller
            for target_id in list(self.disturbed):
                t = controller.targets.get(target_id)
                if t is None or t.loop_retry is None or not t.loop_retry.active():
                    # Its delivery loop no longer waits for the store.
                    self.disturbed.discard(target_id)
        for target_id in self.disturbed:
            self.backoff[target_id].unknown = True

    @invariant()
    def checks(self) -> None:
        if self.h is None:
            return
        assert self.problems == []
        assert self.errors.errors == []
        with self.outage.bypassed():
            self._take_completions()
            self._take_outage()
            statuses = self.statuses()
            assert set(statuses) == set(self.registered)
            for target_id in self.registered:
                self.check_target(target_id, statuses[target_id])

    def check_target(self, target_id: str, s: TargetStatus) -> None:
        fake = self.rt[target_id]
        now = self.now()
        disturbed = target_id in self.disturbed

        # At most one transaction in flight per target, and retries resend the same bytes.
        assert fake.violations == []
        assert fake.max_in_flight <= 1
        assert s.in_flight == (fake.in_flight > 0)

        # Per-target order: each event once, in queue order (submit order, and replayed dead
        # letters after what was queued before the replay), and only acknowledged ones.
        delivered = [e["n"] for e in fake.events]
        assert all(e["t"] == target_id for e in fake.events)
        assert len(set(delivered)) == len(delivered), f"{target_id} delivered twice: {delivered}"
        rank = self.rank[target_id]
        assert set(delivered) <= set(rank), f"{target_id} got unacknowledged events"
        ranks = [rank[n] for n in delivered]
        assert ranks == sorted(ranks), f"{target_id} out of order: {delivered}"

        # Nothing acknowledged is lost: it is delivered, dead-lettered or pending; never twice.
        dead = self.dead_lettered(target_id)
        acked = self.acked[target_id]
        assert set(dead) <= set(acked)
        assert not set(delivered) & set(dead)
        assert len(delivered) + len(dead) + s.pending_events == len(acked), (
            f"{target_id}: {len(acked)} acknowledged, {len(delivered)} delivered, "
            f"{len(dead)} dead-lettered, {s.pending_events} pending"
        )
        assert s.dead_letters == len(self.all_dead_letters(target_id))

        if s.state is TargetState.UP:
            if disturbed and s.pending_events and not s.in_flight:
                # The delivery loop stopped on the unavailable store: it retries it soon.
                assert s.next_retry_at is not None, f"{target_id} is UP with stranded work"
                assert -EPS <= s.next_retry_at - now <= LOOP_RETRY_MAX + EPS
                return
            # No stranded work: an UP target with anything pending is sending it right now.
            assert s.pending_events == 0 or s.in_flight, f"{target_id} is UP with stranded work"
            if not disturbed:
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
            # ...and within the policy's bounds (or the store retry's, after an outage).
            policy = POLICY[target_id]
            longest = max(policy.maximum, LOOP_RETRY_MAX) if disturbed else policy.maximum
            assert -EPS <= s.next_retry_at - now <= longest + EPS, (
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
        if model.unknown:
            # An outage got in the way: learn the backoff from here on.
            pass
        elif model.next_retry_at is not None:
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
        model.unknown = target_id in self.disturbed

    # -- the end --------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.h is not None:
                self.drain_and_check()
        finally:
            globalLogPublisher.removeObserver(self.errors)
            if self.h is not None:
                self.h.scheduler._store._engine.dispose()
            if self.db is not None:
                self.db.drop()

    def drain_and_check(self) -> None:
        h = self.harness
        for target_id in ALL_TARGETS:
            fake = self.rt[target_id]
            fake.up()
            fake.release()
        for _ in range(200):
            statuses = self.statuses() if not self.outage.active else {}
            if (
                statuses
                and not self.pending
                and all(
                    s.pending_events == 0 and not s.in_flight and s.state is TargetState.UP
                    for s in statuses.values()
                )
            ):
                break
            for target_id, s in statuses.items():
                if s.state is TargetState.BLOCKED:
                    h.scheduler.wake(target_id)
            h.clock.advance(LONGEST_WAIT)
            self.checks()
        else:
            raise AssertionError(f"not drained: {self.statuses()}, {len(self.pending)} submits")
        # Let answers scheduled by slow targets go; nothing is left to send.
        h.clock.advance(LONGEST_WAIT)
        self.checks()
        for target_id in self.registered:
            delivered = [e["n"] for e in self.rt[target_id].events]
            dead = self.dead_lettered(target_id)
            # Every acknowledged event was delivered, or is visibly dead-lettered.
            assert sorted(delivered + dead) == sorted(self.acked[target_id])
        # The events of failed submits were not stored, so nothing of theirs is anywhere.
        assert self.errors.expected == [] or self.failed_submits
        result_of(h.scheduler.stop())
        # stop() cancelled every timer of the scheduler's.
        assert h.clock.getDelayedCalls() == []


TestDeliveryMachine = DeliveryMachine.TestCase
TestDeliveryMachine.settings = settings(
    # 60 runs of 50 steps on SQLite, fewer on PostgreSQL (each store call is a round trip
    # there): the same ones every time. Set RELAYER_STATEFUL_EXAMPLES to search longer.
    max_examples=int(os.environ.get("RELAYER_STATEFUL_EXAMPLES", "30" if POSTGRES else "60")),
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
