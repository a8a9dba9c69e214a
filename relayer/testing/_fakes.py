"""
Deterministic test doubles: an inline database pool and a scriptable in-memory target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from relayer._encoding import events_of_body
from relayer.config import TargetConfig
from relayer.formats import MATRIX, IWireFormat, WireRequest
from relayer.transport.base import (
    IRequestTransport,
    ITransport,
    OutcomeKind,
    SendOutcome,
    classify_status,
)

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
        events: Its decoded events: for a request of a wire format other than Matrix (a
            webhook), the one event that is its body.
        body: Its bytes, as sent.
        headers: For a request of a wire format other than Matrix, its headers by lower-case
            name, as sent the first time it was accepted; empty for a Matrix transaction.
    """

    txn_id: int
    events: list[Any]
    body: bytes = attrs.field(repr=False)
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)


@attrs.define(eq=False)
class _Held:
    txn_id: int
    body: bytes
    result: Deferred[SendOutcome]
    timer: IDelayedCall | None = None
    headers: Mapping[str, str] | None = None


@attrs.define(eq=False)
class _Awaiting:
    """A transaction answered accepted, whose confirmation has not been sent yet."""

    #: When its confirmation falls due, on the transport's clock; None: never on its own.
    due: float | None
    timer: IDelayedCall | None = None


class FakeTarget:
    """
    A scriptable target, reached through :class:`FakeTransport`.

    By default it is up and accepts every transaction. On command it can be:

    - ``down()``: every request fails as a refused connection;
    - ``fail_with(status)``: every request gets that HTTP status (``retry_after`` adds the
      header), classified as relayer's HTTP transport classifies it;
    - ``respond(status, ...)``: the next request gets that status, once (queue several);
    - ``lose_responses(count)``: the next ``count`` transactions it accepts are accepted, but
      their answers are lost, so the sender sees a failure and resends them;
    - ``hold()``: requests stay in flight until ``release()``;
    - ``slow(seconds)``: requests are answered after ``seconds`` of the clock;
    - ``confirm_later(seconds)``: transactions are accepted with the confirmation pending
      (``HTTP 202``), and each is confirmed ``seconds`` later, through
      :attr:`FakeTransport.confirmer`;
    - ``never_confirm()``: transactions are accepted with the confirmation pending, and
      confirmed only by ``confirm()``;
    - ``up()``: back to accepting everything, at once, as delivered.

    It deduplicates by transaction id, as a receiver should: a transaction id accepted before is
    acknowledged but not recorded again. Each such repeat with the same bytes is counted in
    :attr:`duplicates`; one with different bytes is recorded in :attr:`violations`. A repeat of
    a transaction whose confirmation is still pending is answered ``HTTP 202`` again (while the
    target confirms transactions), and one whose confirmation was sent is answered ``HTTP 200``:
    the target has finished with it, whatever the sender answered the confirmation.

    The target sees confirmations as a receiver does: the sender may answer one False (the
    transaction no longer awaits confirmation there: it was abandoned, say), which is recorded
    in :attr:`confirmations` like any other answer.

    Attributes:
        target_id: The target's id.
        requests: Every request seen, as ``(txn_id, body)``, duplicates included.
        times: The clock time of each request in :attr:`requests`.
        received: The transactions accepted, once each, in order (with the confirmation
            pending, too: the target has them).
        events: The events of the transactions accepted, in order: once each, unless the
            sender put one in a second transaction (as it does with the live events of a
            transaction it abandoned after the target had accepted it).
        duplicates: How many requests the target accepted for a transaction it had accepted
            before, with the same bytes: resends of what it had already.
        duplicate_txn_ids: The transaction id of each of those requests, in order.
        confirmations: The confirmations sent, as ``(txn_id, answer)``, in the order they were
            answered; the answer is the sender's: True, delivered; False, not awaiting
            confirmation (unknown, or abandoned).
        violations: Broken guarantees seen: a resend with other bytes, transaction ids going
            backwards, two requests in flight, a confirmation that failed instead of being
            answered.
        in_flight: How many requests are in flight now.
        max_in_flight: The most requests ever in flight at once.
        wire_requests: Every request of a wire format other than Matrix, as the format built
            it (method, URL, headers, body), duplicates included, in the order they came.
    """

    def __init__(self, target_id: str, transport: FakeTransport) -> None:
        self.target_id = target_id
        self.requests: list[tuple[int, bytes]] = []
        self.wire_requests: list[WireRequest] = []
        self.times: list[float] = []
        self.received: list[Received] = []
        self.events: list[Any] = []
        self.duplicates = 0
        self.duplicate_txn_ids: list[int] = []
        self.confirmations: list[tuple[int, bool]] = []
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
        self._lose = 0
        # None: accepted transactions are delivered; else the delay of their confirmations
        # (infinite: never on its own).
        self._confirm_after: float | None = None
        # The transactions whose confirmation has not been sent, oldest first.
        self._awaiting: dict[int, _Awaiting] = {}

    def __repr__(self) -> str:
        return f"<FakeTarget {self.target_id!r} received={len(self.events)} events>"

    # -- scripting ------------------------------------------------------------------------------

    def up(self) -> None:
        """
        Accept every transaction from now on, at once, as delivered.

        It ends ``down``, ``fail_with``, ``hold``, ``slow``, ``confirm_later`` and
        ``never_confirm``. Held requests stay held until released, queued ``respond`` and
        ``lose_responses`` answers stay queued, and transactions already awaiting confirmation
        are still confirmed as they were to be (a resend of one is answered delivered).
        """
        self._refuse = False
        self._hold = False
        self._delay = 0.0
        self._mode = lambda: None
        self._confirm_after = None

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

    def lose_responses(self, count: int = 1) -> None:
        """
        Lose the answers to the next ``count`` transactions that the target accepts.

        Each is accepted (recorded in :attr:`received`, or counted as a duplicate), but its
        request fails as a lost connection, a transient failure: the sender resends it, and the
        resend is a duplicate. Calls add up.

        Raises:
            ValueError: ``count`` is negative.
        """
        if count < 0:
            raise ValueError(f"lose_responses() takes a count of 0 or more, not {count!r}")
        self._lose += count

    def hold(self) -> None:
        """Keep requests in flight until :meth:`release`."""
        self._hold = True

    def slow(self, seconds: float) -> None:
        """Answer each request after ``seconds`` on the clock."""
        if self._transport.clock is None:
            raise ValueError("slow() needs a FakeTransport made with a clock")
        self._delay = seconds

    def confirm_later(self, seconds: float) -> None:
        """
        From now on, accept each transaction with the confirmation pending, and confirm it
        ``seconds`` later.

        A transaction that the target accepts is answered ``HTTP 202``
        (:attr:`~relayer.transport.base.OutcomeKind.ACCEPTED`), whether the target accepts it by
        default or through a scripted 2xx, and ``seconds`` later on the transport's clock the
        target calls :attr:`FakeTransport.confirmer` with ``(target_id, txn_id)``; with 0, at
        the clock's next advance, never during the send. A confirmation that falls due while
        the transport has no confirmer is sent when one is set. Transactions already awaiting
        confirmation keep their own times.

        Args:
            seconds: The delay, a finite number, 0 or more.

        Raises:
            ValueError: The transport has no clock, or ``seconds`` is negative or not finite.
        """
        if self._transport.clock is None:
            raise ValueError("confirm_later() needs a FakeTransport made with a clock")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"confirm_later() takes a finite delay, 0 or more, not {seconds!r}")
        self._confirm_after = float(seconds)

    def never_confirm(self) -> None:
        """
        From now on, accept each transaction with the confirmation pending (``HTTP 202``), and
        never confirm it on its own: :meth:`confirm` does, when the test calls it.
        """
        self._confirm_after = math.inf

    def confirm(self, txn_id: int | None = None) -> Deferred[bool]:
        """
        Confirm a transaction awaiting confirmation, now.

        Args:
            txn_id: The transaction; by default the oldest one awaiting confirmation.

        Returns:
            The confirmer's Deferred: True if the sender took the transaction as delivered,
            False if it was not awaiting confirmation there (it was abandoned, say). Either way
            the target is done with it, and the answer is recorded in :attr:`confirmations`.

        Raises:
            ValueError: No transaction awaits confirmation, or not that one.
            RuntimeError: The transport has no confirmer.
        """
        if txn_id is None:
            if not self._awaiting:
                raise ValueError(f"no transaction awaits confirmation at {self.target_id!r}")
            txn_id = next(iter(self._awaiting))
        elif txn_id not in self._awaiting:
            raise ValueError(
                f"transaction {txn_id} does not await confirmation at {self.target_id!r};"
                f" these do: {self.unconfirmed}"
            )
        if self._transport.confirmer is None:
            raise RuntimeError(
                "FakeTransport.confirmer is not set: set it to the scheduler's confirm"
                " (build_scheduler does)"
            )
        return self._send_confirmation(txn_id)

    def drop(self) -> int:
        """
        Forget the requests in flight without answering them, as when the sending process dies.

        Returns how many were dropped. Their Deferreds never fire. Transactions awaiting
        confirmation are not requests in flight: they are still confirmed.
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

    @property
    def unconfirmed(self) -> list[int]:
        """The ids of the transactions accepted whose confirmation is not sent yet, in order."""
        return list(self._awaiting)

    # -- receiving ------------------------------------------------------------------------------

    def _now(self) -> float:
        clock = self._transport.clock
        return clock.seconds() if clock is not None else 0.0

    def _receive(
        self, txn_id: int, body: bytes, request: WireRequest | None = None
    ) -> Deferred[SendOutcome]:
        self.requests.append((txn_id, body))
        self.times.append(self._now())
        headers = None
        if request is not None:
            self.wire_requests.append(request)
            headers = {name.lower(): value for name, value in request.headers}
        if self.in_flight:
            self.violations.append(f"transaction {txn_id} sent while another was in flight")
        if self._refuse:
            return fail(ConnectionRefusedError("connection refused (FakeTarget is down)"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        held = _Held(txn_id, body, Deferred(lambda d: self._cancel(held)), headers=headers)
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
        if outcome is None or outcome.kind is OutcomeKind.DELIVERED:
            if held.headers is None:
                # As before there were webhooks: subclasses may override _accept so.
                outcome = self._accept(held.txn_id, held.body, outcome)
            else:
                outcome = self._accept(held.txn_id, held.body, outcome, held.headers)
            if self._lose:
                self._lose -= 1
                held.result.errback(ConnectionLost("the answer was lost (lose_responses)"))
                return
        held.result.callback(outcome)

    def _accept(
        self,
        txn_id: int,
        body: bytes,
        answer: SendOutcome | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> SendOutcome:
        """
        Accept a transaction; return the answer (``answer``, a scripted 2xx, by default).

        With ``headers`` (a request of a format other than Matrix), the body is one event.
        """
        seen = self._bodies.get(txn_id)
        if seen is not None:
            if seen != body:
                self.violations.append(f"transaction {txn_id} was resent with different bytes")
                return SendOutcome.delivered("HTTP 200 (duplicate)")
            self.duplicates += 1
            self.duplicate_txn_ids.append(txn_id)
            if txn_id in self._awaiting:
                if self._confirm_after is not None:
                    return SendOutcome.accepted("HTTP 202 (duplicate)")
                # Delivering plainly now: this answer is its confirmation.
                self._forget(txn_id)
            return SendOutcome.delivered("HTTP 200 (duplicate)")
        if self.received and txn_id <= self.received[-1].txn_id:
            self.violations.append(f"transaction {txn_id} arrived after {self.received[-1].txn_id}")
        self._bodies[txn_id] = body
        if headers is None:
            events = [json.loads(e) for e in events_of_body(body)]
            self.received.append(Received(txn_id, events, body))
        else:
            events = [json.loads(body)]
            self.received.append(Received(txn_id, events, body, headers))
        self.events.extend(events)
        if self._confirm_after is not None:
            self._await(txn_id, self._confirm_after)
            return SendOutcome.accepted("HTTP 202")
        return answer if answer is not None else SendOutcome.delivered("HTTP 200")

    # -- confirming -----------------------------------------------------------------------------

    def _await(self, txn_id: int, delay: float) -> None:
        clock = self._transport.clock
        if math.isinf(delay) or clock is None:
            self._awaiting[txn_id] = _Awaiting(None)
            return
        entry = self._awaiting[txn_id] = _Awaiting(clock.seconds() + delay)
        entry.timer = clock.callLater(delay, self._fall_due, txn_id)

    def _forget(self, txn_id: int) -> None:
        entry = self._awaiting.pop(txn_id)
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()

    def _fall_due(self, txn_id: int) -> None:
        entry = self._awaiting.get(txn_id)
        if entry is None:
            return
        entry.timer = None
        if self._transport.confirmer is not None:
            # A failure is recorded in violations; there is no one else to tell.
            self._send_confirmation(txn_id).addErrback(lambda _: None)

    def _send_due(self) -> None:
        """Send the confirmations that fell due while the transport had no confirmer."""
        for txn_id, entry in list(self._awaiting.items()):
            if self._transport.confirmer is None:
                return
            if entry.due is not None and entry.timer is None and txn_id in self._awaiting:
                self._send_confirmation(txn_id).addErrback(lambda _: None)

    def _move_timers(self, clock: IReactorTime) -> None:
        """Move the pending confirmations' timers to ``clock``, at the same times."""
        for txn_id, entry in self._awaiting.items():
            if entry.timer is not None and entry.timer.active() and entry.due is not None:
                entry.timer.cancel()
                delay = max(0.0, entry.due - clock.seconds())
                entry.timer = clock.callLater(delay, self._fall_due, txn_id)

    def _send_confirmation(self, txn_id: int) -> Deferred[bool]:
        confirmer = self._transport.confirmer
        assert confirmer is not None
        self._forget(txn_id)

        def answered(answer: bool) -> bool:
            self.confirmations.append((txn_id, answer))
            return answer

        def failed(failure: Failure) -> Failure:
            self.violations.append(
                f"the confirmation of transaction {txn_id} failed: {failure.getErrorMessage()}"
            )
            return failure

        confirming: Deferred[bool] = maybeDeferred(confirmer, self.target_id, txn_id)
        confirming.addCallbacks(answered, failed)
        return confirming


@implementer(ITransport, IRequestTransport)
class FakeTransport:
    """
    An in-memory transport: each target is a scriptable :class:`FakeTarget`.

    It serves targets of every wire format. A Matrix transaction goes to :meth:`send`; a
    request of another format (a webhook) is taken as one event, its body, and recorded with
    its headers (:attr:`Received.headers`, and every attempt in
    :attr:`FakeTarget.wire_requests`), under the id of the transaction it is an attempt of.

    Args:
        clock: The clock for :meth:`FakeTarget.slow`, confirmations and ``Retry-After`` dates.

    Attributes:
        clock: That clock. It may be replaced, as :meth:`relayer.testing.Harness.restart` does;
            the confirmations pending then move to the new clock, at the same times.
        confirmer: What the targets call to confirm a transaction that they accepted with the
            confirmation pending, as ``confirmer(target_id, txn_id)``, which returns a Deferred
            that fires with True or False: the scheduler's ``confirm``, as
            :func:`relayer.testing.build_scheduler` sets it. While it is None, confirmations
            that fall due wait; they are sent when it is set.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock
        self._confirmer: Callable[[str, int], Deferred[bool]] | None = None
        self._targets: dict[str, FakeTarget] = {}

    @property
    def clock(self) -> IReactorTime | None:
        return self._clock

    @clock.setter
    def clock(self, clock: IReactorTime | None) -> None:
        self._clock = clock
        if clock is not None:
            for target in self._targets.values():
                target._move_timers(clock)

    @property
    def confirmer(self) -> Callable[[str, int], Deferred[bool]] | None:
        return self._confirmer

    @confirmer.setter
    def confirmer(self, confirmer: Callable[[str, int], Deferred[bool]] | None) -> None:
        self._confirmer = confirmer
        if confirmer is not None:
            for target in list(self._targets.values()):
                target._send_due()

    def __getitem__(self, target_id: str) -> FakeTarget:
        """The fake target with this id, made on first use."""
        target = self._targets.get(target_id)
        if target is None:
            target = self._targets[target_id] = FakeTarget(target_id, self)
        return target

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        """Send a Matrix transaction to the fake target of that id."""
        return self[target.target_id]._receive(txn_id, body)

    def send_request(
        self, target: TargetConfig, request: WireRequest, wire_format: IWireFormat
    ) -> Deferred[SendOutcome]:
        """
        Send a wire format's request to the fake target of that id.

        A Matrix request goes through :meth:`send`, as it did before there were other
        formats. Scripted statuses are classified as relayer's HTTP transport classifies them,
        whatever the format.

        Raises:
            ValueError: The request does not say which transaction it is an attempt of.
        """
        if request.txn_id is None:
            raise ValueError("FakeTransport needs requests that carry their txn_id")
        if wire_format is MATRIX:
            return self.send(target, request.txn_id, request.body)
        return self[target.target_id]._receive(request.txn_id, request.body, request)
