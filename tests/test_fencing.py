"""
Fencing: no send outlives its deadline, and a process that lost a target records nothing for it.

A transport may ignore its request timeout, and a process may be stalled (an overloaded host, a
SIGSTOP) for longer than its lease while its request is open at the receiver. The scheduler
enforces the deadline itself; a process that takes over an expired lease waits until the
previous owner's last request has passed its deadline too; and a stalled process that wakes up
after losing its lease cannot record an outcome for the target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from relayer import BackoffPolicy, FailurePolicy, Scheduler, SendOutcome, TargetConfig, TargetState
from relayer.lease import LeaseSettings
from relayer.testing import FakeTransport, build_scheduler, open_store, target
from relayer.transport.base import ITransport, OutcomeKind

TIMEOUT = 10.0
INTERVAL = 2.5
REQUEST_TIMEOUT = 1.0


@implementer(ITransport)
class DeafTransport:
    """A plugin transport that never answers, ignores its timeout and cannot be cancelled."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        self.sent.append((target.target_id, txn_id))
        return Deferred()


def test_the_request_timeout_is_enforced_whatever_the_transport(db_path: Path) -> None:
    clock = Clock()
    transport = DeafTransport()
    config = target("t", request_timeout=5.0, backoff=BackoffPolicy.constant(2.0))
    scheduler = Scheduler(clock, open_store(clock, db_path), transport, [config])
    assert scheduler.start().called
    scheduler.submit("t", {"n": 1})
    assert transport.sent == [("t", 1)]
    clock.advance(4.999)
    assert scheduler.status().result[0].in_flight  # type: ignore[attr-defined]
    clock.advance(0.001)
    s = scheduler.status().result[0]  # type: ignore[attr-defined]
    assert not s.in_flight
    assert s.state is TargetState.DOWN
    assert s.last_error == "no response within the request timeout of 5s"
    # Retried after the backoff, with the same transaction.
    clock.advance(2.0)
    assert transport.sent == [("t", 1), ("t", 1)]


def test_a_fake_target_that_holds_a_request_times_out(tmp_path: Path) -> None:
    h = build_scheduler(["t"], path=tmp_path / "r.db", request_timeout=3.0)
    fake = h.transport["t"]
    fake.hold()
    h.scheduler.submit("t", {"n": 1})
    assert fake.in_flight == 1
    h.clock.advance(3.0)
    # The request was abandoned at its deadline: the connection is closed.
    assert fake.in_flight == 0
    fake.up()
    h.clock.advance(2.0)
    assert fake.events == [{"n": 1}]


@attrs.define
class Node:
    name: str
    clock: Clock
    scheduler: Scheduler
    alive: bool = True


@attrs.define
class Cluster:
    """Schedulers sharing one database on clocks of their own, advanced together."""

    path: Path | str
    #: The receiver's clock: the time as the targets see it.
    world: Clock = attrs.Factory(Clock)
    transport: FakeTransport = attrs.field(init=False)
    nodes: list[Node] = attrs.Factory(list)
    now: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.transport = FakeTransport(self.world)

    def start(self, name: str, targets: list[str], **settings: Any) -> Node:
        clock = Clock()
        clock.advance(self.now)
        configs = [
            target(
                t,
                request_timeout=REQUEST_TIMEOUT,
                backoff=BackoffPolicy.constant(1.0),
                **settings,
            )
            for t in targets
        ]
        scheduler = Scheduler(
            clock,
            open_store(clock, self.path),
            self.transport,
            configs,
            random=lambda: 0.0,
            leases=LeaseSettings(node_id=name, timeout=TIMEOUT, renew_interval=INTERVAL),
        )
        assert scheduler.start().called
        node = Node(name, clock, scheduler)
        self.nodes.append(node)
        return node

    def advance(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            self.world.advance(self.now - self.world.seconds())
            for node in self.nodes:
                if node.alive:
                    node.clock.advance(self.now - node.clock.seconds())


def stored(node: Node, target_id: str) -> Any:
    return node.scheduler._store.load_targets([target_id]).result[target_id]  # type: ignore[attr-defined]


@pytest.mark.parametrize("stall", [TIMEOUT + 0.5, TIMEOUT + REQUEST_TIMEOUT - 0.1])
def test_a_stalled_owner_never_overlaps_the_new_owner(db_path: Path, stall: float) -> None:
    """
    A process stalls, with a request open at the receiver, for longer than its lease (but no
    longer than the lease plus the request timeout). The process that takes the target over
    sends nothing until that request has ended; the stalled one, woken, records nothing.
    """
    cluster = Cluster(db_path)
    a = cluster.start("a", ["t"])
    fake = cluster.transport["t"]
    fake.hold()
    a.scheduler.submit("t", {"n": 1})
    assert fake.in_flight == 1
    sent_at = cluster.now
    b = cluster.start("b", ["t"])
    # a stalls: its clock stops, and its request stays open at the receiver.
    a.alive = False
    fake.up()
    # b takes the lease once it has expired, but waits out a's request timeout.
    cluster.advance(stall)
    assert "t" in b.scheduler.owned_targets
    assert [txn for txn, _ in fake.requests] == [1]
    # a wakes up: its request passed its deadline long ago, so it abandons it at once, and
    # it may not record that failure, since the target is b's now.
    a.alive = True
    cluster.advance(0.05)
    assert fake.in_flight == 0
    assert stored(b, "t").failures == 0
    assert stored(b, "t").state is TargetState.UP
    # b's first send comes after the lease expired plus the request timeout.
    cluster.advance(REQUEST_TIMEOUT + 0.5)
    assert fake.violations == []
    assert fake.max_in_flight == 1
    assert fake.events == [{"n": 1}]
    first = fake.times[1]
    assert first >= sent_at + TIMEOUT - INTERVAL + REQUEST_TIMEOUT
    # The one transaction was sent twice: first by a, then again, unchanged, by b.
    assert [txn for txn, _ in fake.requests] == [1, 1]
    assert fake.requests[0][1] == fake.requests[1][1]


def test_a_longer_stall_shows_the_receiver_only_a_resend_of_the_same_transaction(
    db_path: Path,
) -> None:
    """
    The worst case, documented in docs/scaling.md: a stall longer than the lease plus the request
    timeout. The receiver may then see the new owner resend the transaction that the stalled
    process has open (same id, same bytes), but nothing after it until that is acknowledged.
    """
    cluster = Cluster(db_path)
    a = cluster.start("a", ["t"])
    fake = cluster.transport["t"]
    fake.hold()
    a.scheduler.submit("t", {"n": 1})
    b = cluster.start("b", ["t"])
    a.alive = False
    cluster.advance(TIMEOUT + REQUEST_TIMEOUT + 0.5)
    # b resent transaction 1 while a's copy of it is still open: the same bytes.
    assert [txn for txn, _ in fake.requests] == [1, 1]
    assert fake.requests[0][1] == fake.requests[1][1]
    assert fake.violations == ["transaction 1 sent while another was in flight"]
    b.scheduler.submit("t", {"n": 2})
    # b holds transaction 2 back: transaction 1 is not acknowledged yet.
    cluster.advance(0.2)
    assert [txn for txn, _ in fake.requests] == [1, 1]
    fake.release()
    cluster.advance(0.2)
    assert fake.txn_ids == [1, 2]
    assert fake.events == [{"n": 1}, {"n": 2}]
    # Nothing else overlapped: transaction 2 went out once transaction 1 was acknowledged.
    assert fake.violations == ["transaction 1 sent while another was in flight"]
    # a wakes up; whatever its request's outcome, it records nothing for b's target.
    before = stored(b, "t")
    a.alive = True
    cluster.advance(0.5)
    assert stored(b, "t") == before


def test_a_blocked_target_woken_during_a_takeover_fence_shows_as_retrying(db_path: Path) -> None:
    cluster = Cluster(db_path)
    a = cluster.start("a", ["t"], failure_policy=FailurePolicy.BLOCK)
    fake = cluster.transport["t"]
    fake.respond(400)
    a.scheduler.submit("t", {"n": 1})
    assert a.scheduler.status().result[0].state is TargetState.BLOCKED  # type: ignore[attr-defined]
    b = cluster.start("b", ["t"], failure_policy=FailurePolicy.BLOCK)
    a.alive = False  # a dies; its lease expires
    cluster.advance(TIMEOUT + 0.2)
    assert "t" in b.scheduler.owned_targets
    b.scheduler.wake("t")
    # The resend waits for the fence, but the target is no longer shown as blocked.
    s = b.scheduler.status().result[0]  # type: ignore[attr-defined]
    assert s.state is TargetState.DOWN
    assert s.next_retry_at is not None and s.next_retry_at > cluster.now
    cluster.advance(REQUEST_TIMEOUT)
    assert fake.events == [{"n": 1}]
    assert b.scheduler.status().result[0].state is TargetState.UP  # type: ignore[attr-defined]


@implementer(ITransport)
class OddTransport:
    """Plugin transports that get their Deferreds wrong in the ways plugins do."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sent: list[int] = []

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        self.sent.append(txn_id)
        if self.mode == "chained":
            # Called, but waiting on an inner Deferred that never fires, as
            # succeed(None).addCallback(lambda _: agent.request(...)) is.
            inner: Deferred[SendOutcome] = Deferred()
            return succeed(None).addCallback(lambda _: inner)
        if self.mode == "bad-canceller":
            return Deferred(lambda d: 1 / 0)
        if self.mode == "no-reason":
            return succeed(SendOutcome(OutcomeKind.DELIVERED, None))  # type: ignore[arg-type]
        return succeed(None)  # type: ignore[arg-type]  # "not-an-outcome"


@pytest.mark.parametrize("mode", ["chained", "bad-canceller"])
def test_no_transport_can_hold_a_send_past_its_deadline(db_path: Path, mode: str) -> None:
    clock = Clock()
    transport = OddTransport(mode)
    config = target("t", request_timeout=5.0, backoff=BackoffPolicy.constant(2.0))
    scheduler = Scheduler(clock, open_store(clock, db_path), transport, [config])
    assert scheduler.start().called
    scheduler.submit("t", {"n": 1})
    clock.advance(5.0)
    s = scheduler.status().result[0]  # type: ignore[attr-defined]
    assert not s.in_flight
    assert s.state is TargetState.DOWN
    clock.advance(2.0)
    assert transport.sent == [1, 1]


@pytest.mark.parametrize("mode", ["no-reason", "not-an-outcome"])
def test_a_malformed_outcome_is_not_resent_for_ever(db_path: Path, mode: str) -> None:
    clock = Clock()
    transport = OddTransport(mode)
    config = target("t", backoff=BackoffPolicy.constant(2.0))
    scheduler = Scheduler(clock, open_store(clock, db_path), transport, [config])
    assert scheduler.start().called
    scheduler.submit("t", {"n": 1})
    s = scheduler.status().result[0]  # type: ignore[attr-defined]
    if mode == "no-reason":
        # Delivered is delivered, whatever the reason says.
        assert s.state is TargetState.UP and s.pending_events == 0
        assert transport.sent == [1]
    else:
        assert s.state is TargetState.DOWN
        assert s.last_error == "the transport answered NoneType, not a SendOutcome"
