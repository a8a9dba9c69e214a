"""
Deterministic test doubles: an inline database pool and a scriptable in-memory target.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from relayer._encoding import events_of_body
from relayer.config import TargetConfig
from relayer.transport.base import ITransport, SendOutcome, classify_status

T = TypeVar("T")


class InlineDatabasePool:
    """
    A database pool that runs work at once, on the calling thread.

    With it, every store call completes before it returns, so tests on
    :class:`twisted.internet.task.Clock` need no threads and no running reactor.
    """

    def __init__(self) -> None:
        self.running = False
        self.calls = 0

    def start(self) -> None:
        self.running = True

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        self.calls += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            return fail()
        return succeed(result)

    def stop(self) -> Deferred[None]:
        self.running = False
        return succeed(None)


@attrs.frozen
class Received:
    """
    A transaction a :class:`FakeTarget` accepted.

    Attributes:
        txn_id: Its id.
        events: Its decoded events.
        body: Its bytes, as sent.
    """

    txn_id: int
    events: list[Any]
    body: bytes = attrs.field(repr=False)


@attrs.define(eq=False)
class _Held:
    txn_id: int
    body: bytes
    result: Deferred[SendOutcome]
    timer: IDelayedCall | None = None


class FakeTarget:
    """
    A scriptable target, reached through :class:`FakeTransport`.

    By default it is up and accepts every transaction. On command it can be:

    - ``down()``: every request fails as a refused connection;
    - ``fail_with(status)``: every request gets that HTTP status (``retry_after`` adds the
      header), classified as relayer's HTTP transport classifies it;
    - ``respond(status, ...)``: the next request gets that status, once (queue several);
    - ``hold()``: requests stay in flight until ``release()``;
    - ``slow(seconds)``: requests are answered after ``seconds`` of the clock;
    - ``up()``: back to accepting everything.

    It deduplicates by transaction id, as a receiver should: a transaction id seen before is
    acknowledged but not counted again, and one resent with different bytes is recorded in
    :attr:`violations`.

    Attributes:
        target_id: The target's id.
        requests: Every request seen, as ``(txn_id, body)``, duplicates included.
        times: The clock time of each request in :attr:`requests`.
        received: The transactions accepted, once each, in order.
        events: The events accepted, once each, in order.
        violations: Broken guarantees seen: a resend with other bytes, two requests in flight.
        in_flight: How many requests are in flight now.
        max_in_flight: The most requests ever in flight at once.
    """

    def __init__(self, target_id: str, transport: FakeTransport) -> None:
        self.target_id = target_id
        self.requests: list[tuple[int, bytes]] = []
        self.times: list[float] = []
        self.received: list[Received] = []
        self.events: list[Any] = []
        self.violations: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._transport = transport
        self._bodies: dict[int, bytes] = {}
        self._mode: Callable[[], SendOutcome | None] = lambda: None
        self._script: list[tuple[int, str | None]] = []
        self._refuse = False
        self._hold = False
        self._delay = 0.0
        self._held: list[_Held] = []

    def __repr__(self) -> str:
        return f"<FakeTarget {self.target_id!r} received={len(self.events)} events>"

    # -- scripting ------------------------------------------------------------------------------

    def up(self) -> None:
        """Accept every transaction from now on (held requests stay held until released)."""
        self._refuse = False
        self._hold = False
        self._delay = 0.0
        self._mode = lambda: None

    def down(self) -> None:
        """Refuse connections from now on."""
        self._refuse = True

    def fail_with(self, status: int, retry_after: str | None = None) -> None:
        """Answer every request with ``status`` from now on."""
        self._refuse = False
        self._mode = lambda: classify_status(status, retry_after, self._now())

    def respond(self, status: int, retry_after: str | None = None) -> None:
        """Answer the next request with ``status``, once; calls queue up in order."""
        self._script.append((status, retry_after))

    def hold(self) -> None:
        """Keep requests in flight until :meth:`release`."""
        self._hold = True

    def slow(self, seconds: float) -> None:
        """Answer each request after ``seconds`` on the clock."""
        if self._transport.clock is None:
            raise ValueError("slow() needs a FakeTransport made with a clock")
        self._delay = seconds

    def drop(self) -> int:
        """
        Forget the requests in flight without answering them, as when the sending process dies.

        Returns how many were dropped. Their Deferreds never fire.
        """
        held, self._held = self._held, []
        for h in held:
            if h.timer is not None and h.timer.active():
                h.timer.cancel()
        self.in_flight -= len(held)
        return len(held)

    def release(self, keep_holding: bool = False) -> int:
        """
        Answer every held request as the target is scripted now; return how many.

        Args:
            keep_holding: Hold the requests that come after these, too; by default they are
                answered at once.
        """
        self._hold = keep_holding
        held, self._held = self._held, []
        for h in held:
            self._answer(h)
        return len(held)

    @property
    def held(self) -> int:
        """How many requests are held."""
        return len(self._held)

    @property
    def txn_ids(self) -> list[int]:
        """The ids of the transactions accepted, in order."""
        return [r.txn_id for r in self.received]

    # -- receiving ------------------------------------------------------------------------------

    def _now(self) -> float:
        clock = self._transport.clock
        return clock.seconds() if clock is not None else 0.0

    def _receive(self, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        self.requests.append((txn_id, body))
        self.times.append(self._now())
        if self.in_flight:
            self.violations.append(f"transaction {txn_id} sent while another was in flight")
        if self._refuse:
            return fail(ConnectionRefusedError("connection refused (FakeTarget is down)"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        held = _Held(txn_id, body, Deferred(lambda d: self._cancel(held)))
        if self._hold:
            self._held.append(held)
        elif self._delay and self._transport.clock is not None:
            self._held.append(held)
            held.timer = self._transport.clock.callLater(self._delay, self._answer_one, held)
        else:
            self._answer(held)
        return held.result

    def _cancel(self, held: _Held) -> None:
        if held in self._held:
            self._held.remove(held)
        if held.timer is not None and held.timer.active():
            held.timer.cancel()
        self.in_flight -= 1

    def _answer_one(self, held: _Held) -> None:
        if held in self._held:
            self._held.remove(held)
            self._answer(held)

    def _answer(self, held: _Held) -> None:
        self.in_flight -= 1
        if self._refuse:
            held.result.errback(ConnectionRefusedError("connection refused (FakeTarget is down)"))
            return
        if self._script:
            status, retry_after = self._script.pop(0)
            outcome: SendOutcome | None = classify_status(status, retry_after, self._now())
        else:
            outcome = self._mode()
        if outcome is None:
            outcome = self._accept(held.txn_id, held.body)
        elif outcome.kind.value == "delivered":
            self._accept(held.txn_id, held.body)
        held.result.callback(outcome)

    def _accept(self, txn_id: int, body: bytes) -> SendOutcome:
        seen = self._bodies.get(txn_id)
        if seen is not None:
            if seen != body:
                self.violations.append(f"transaction {txn_id} was resent with different bytes")
            return SendOutcome.delivered("HTTP 200 (duplicate)")
        if self.received and txn_id <= self.received[-1].txn_id:
            self.violations.append(f"transaction {txn_id} arrived after {self.received[-1].txn_id}")
        self._bodies[txn_id] = body
        events = [json.loads(e) for e in events_of_body(body)]
        self.received.append(Received(txn_id, events, body))
        self.events.extend(events)
        return SendOutcome.delivered("HTTP 200")


@implementer(ITransport)
class FakeTransport:
    """
    An in-memory transport: each target is a scriptable :class:`FakeTarget`.

    Args:
        clock: The clock for :meth:`FakeTarget.slow` and ``Retry-After`` dates.

    Attributes:
        clock: That clock; it may be replaced, as :meth:`relayer.testing.Harness.restart` does.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock = clock
        self._targets: dict[str, FakeTarget] = {}

    def __getitem__(self, target_id: str) -> FakeTarget:
        """The fake target with this id, made on first use."""
        target = self._targets.get(target_id)
        if target is None:
            target = self._targets[target_id] = FakeTarget(target_id, self)
        return target

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        return self[target.target_id]._receive(txn_id, body)
