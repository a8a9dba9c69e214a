"""
A real HTTP receiver of transactions, for tests and the demo.

:class:`Receiver` is a :class:`twisted.web.resource.Resource` that plays one target of the
Matrix application-service API. It accepts ``PUT /_matrix/app/v1/transactions/{txn_id}``, checks
what a correct sender must get right, and records what it received:

- the path, the ``Authorization: Bearer`` token and that the body is JSON ``{"events": [...]}``;
- transaction ids: a repeated id with the same bytes is acknowledged (200) but not recorded
  again, as a receiver that remembers ids does; a repeated id with *different* bytes is a
  violation;
- order: a new transaction id lower than one already seen is a violation, and so is an event
  whose ``order_key`` (say, a sequence number) is not greater than the previous event's;
- concurrency: two requests in flight at once is a violation. A request is in flight from its
  arrival until its answer, so this is only observable while answers are delayed (:meth:`slow`).

Given ``webhook_secrets``, it plays a Standard Webhooks receiver instead: it accepts ``POST``
to where it is mounted, verifies each signature with :func:`relayer.formats.verify` (and the
timestamp, with a ``clock``), refuses a bad one with 401, deduplicates by ``webhook-id`` and
checks the order of the events in the same way.

It can be scripted to fail (:meth:`Receiver.fail_with`, :meth:`Receiver.fail_randomly`,
:meth:`Receiver.fail_next`), to answer slowly (:meth:`Receiver.slow`), to lose its answers
(:meth:`Receiver.lose_responses`), to refuse large bodies with 413 (:meth:`Receiver.limit_body`),
and, once listening with
:func:`listen_receiver`, to go down (connection refused) and come back up on the same port.

Example::

    receiver = Receiver(token="secret", order_key="n")
    server = listen_receiver(reactor, receiver)
    target = TargetConfig("t1", server.base_url, "secret")
    ...  # submit {"n": 0}, {"n": 1}, ... to "t1" through a scheduler
    await receiver.wait_for_events(100)
    report = receiver.verify([{"n": i} for i in range(100)])
    assert report.ok, report.summary()
    await server.stop()
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
)
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from relayer.errors import InvalidSignature
from relayer.formats import DEFAULT_TOLERANCE, verify

_PATH = [b"_matrix", b"app", b"v1", b"transactions"]


def _canonical(event: Any) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@attrs.frozen
class DeliveryReport:
    """
    How the events a target received compare with the events it should have received.

    Made by :func:`verify_delivery` and :meth:`Receiver.verify`. Events are compared by value
    (as canonical JSON).

    Attributes:
        expected: How many events were expected.
        received: How many events were received (duplicates included).
        missing: Expected events that were never received, in expected order.
        duplicated: Events received more than once, each listed once.
        out_of_order: Events received after an event that was expected later than them.
        unexpected: Received events that were not expected at all.
    """

    expected: int
    received: int
    missing: list[Any] = attrs.field(factory=list)
    duplicated: list[Any] = attrs.field(factory=list)
    out_of_order: list[Any] = attrs.field(factory=list)
    unexpected: list[Any] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        """True if every expected event was received exactly once, in order, and no other."""
        return not (self.missing or self.duplicated or self.out_of_order or self.unexpected)

    def summary(self, limit: int = 3) -> str:
        """
        A one-line description, listing at most ``limit`` events of each problem.

        Example:
            >>> verify_delivery([{"n": 1}, {"n": 2}], [{"n": 2}]).summary()
            '1/2 received; 1 missing (e.g. {"n":1})'
        """
        parts = [f"{self.received}/{self.expected} received"]
        for name, events in (
            ("missing", self.missing),
            ("duplicated", self.duplicated),
            ("out of order", self.out_of_order),
            ("unexpected", self.unexpected),
        ):
            if events:
                shown = ", ".join(_canonical(e) for e in events[:limit])
                more = ", ..." if len(events) > limit else ""
                parts.append(f"{len(events)} {name} (e.g. {shown}{more})")
        if self.ok:
            parts.append("all exactly once, in order")
        return "; ".join(parts)


def verify_delivery(expected: Sequence[Any], received: Sequence[Any]) -> DeliveryReport:
    """
    Compare the events a target received with those it should have received, in order.

    Args:
        expected: The events in the order they were submitted. They should be distinct, for
            example by carrying a sequence number.
        received: The events in the order they were received.

    Returns:
        A :class:`DeliveryReport`; its ``ok`` is True if each expected event was received exactly
        once, in the expected order, and nothing else was received.

    Example:
        >>> report = verify_delivery([{"n": 1}, {"n": 2}, {"n": 3}], [{"n": 1}, {"n": 3}, {"n": 2}])
        >>> report.ok, report.out_of_order
        (False, [{'n': 2}])
        >>> verify_delivery([{"n": 1}], [{"n": 1}, {"n": 1}]).duplicated
        [{'n': 1}]
    """
    position: dict[str, int] = {}
    for i, event in enumerate(expected):
        position.setdefault(_canonical(event), i)
    counts: Counter[str] = Counter()
    duplicated: list[Any] = []
    out_of_order: list[Any] = []
    unexpected: list[Any] = []
    highest = -1
    for event in received:
        key = _canonical(event)
        counts[key] += 1
        if counts[key] == 2:
            duplicated.append(event)
        if counts[key] > 1:
            continue
        where = position.get(key)
        if where is None:
            unexpected.append(event)
        elif where < highest:
            out_of_order.append(event)
        else:
            highest = where
    missing = [e for e in expected if counts[_canonical(e)] == 0]
    return DeliveryReport(
        expected=len(expected),
        received=len(received),
        missing=missing,
        duplicated=duplicated,
        out_of_order=out_of_order,
        unexpected=unexpected,
    )


@attrs.frozen
class ReceivedTransaction:
    """
    A transaction the receiver accepted and recorded (its first delivery).

    Attributes:
        txn_id: The transaction's id, from the path.
        events: The transaction's events, decoded from JSON.
        size: The size of the body, in bytes.
    """

    txn_id: int
    events: list[Any]
    size: int


@attrs.frozen
class ReceivedWebhook:
    """
    A webhook the receiver accepted and recorded (its first delivery).

    Attributes:
        webhook_id: Its ``webhook-id``.
        timestamp: Its ``webhook-timestamp``, in seconds.
        event: Its event, its body decoded from JSON.
        size: The size of the body, in bytes.
    """

    webhook_id: str
    timestamp: int
    event: Any
    size: int


@attrs.define
class _Failing:
    status: int
    retry_after: str | None
    rate: float = 1.0
    random: Callable[[], float] | None = None
    remaining: int | None = None


class Receiver(Resource):
    """
    One target of the application-service API, as a twisted.web resource.

    Serve it with :func:`listen_receiver`, or mount it anywhere in a resource tree: it handles
    ``PUT _matrix/app/v1/transactions/{txn_id}`` relative to where it is mounted.

    Args:
        token: The token the sender must send as ``Authorization: Bearer {token}``; for a
            webhook receiver, ``""`` (the default) for none.
        order_key: If given, each event is expected to be a JSON object holding a number under
            this key that grows from one event to the next; an event whose number does not is a
            violation.
        check_txn_order: Whether a new transaction id lower than one already seen is a
            violation. Default True.
        webhook_secrets: Play a Standard Webhooks receiver that accepts a message signed with
            any of these secrets (``whsec_...``), rather than a Matrix one.
        clock: For a webhook receiver: the clock a message's timestamp must be within
            ``tolerance`` seconds of (the sender's clock, in a test); without one, timestamps
            are not checked.
        tolerance: How far a webhook's timestamp may be from ``clock``; five minutes by default,
            as in the specification.

    Attributes:
        events: The events received, in order, each transaction counted once.
        transactions: The transactions accepted, in order, each counted once.
        violations: Descriptions of what a correct sender should never have done.
        requests: How many requests arrived (on the transactions path or not).
        duplicates: How many requests repeated a transaction already accepted.
        failed: How many requests were answered with a scripted failure.
        lost: How many accepted transactions were not answered (see :meth:`lose_responses`).
        too_large: How many requests were answered 413 (see :meth:`limit_body`).
        rejected: How many requests were refused as malformed (bad path, token or body).
        in_flight: How many requests are in flight now.
        max_in_flight: The most requests that were in flight at once.
        webhooks: The webhooks accepted, in order, each counted once.
        webhook_attempts: The ``(webhook-id, webhook-timestamp)`` of every webhook whose
            signature verified, duplicates and scripted failures included, in order.
        bad_signatures: How many webhooks were refused with 401 for their signature or
            timestamp.
    """

    isLeaf = True

    def __init__(
        self,
        token: str = "",
        *,
        order_key: str | None = None,
        check_txn_order: bool = True,
        webhook_secrets: Sequence[str] | None = None,
        clock: IReactorTime | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        super().__init__()
        if webhook_secrets is not None:
            webhook_secrets = tuple(webhook_secrets)
            if not webhook_secrets:
                raise ValueError("webhook_secrets must hold at least one secret")
        self._secrets = webhook_secrets
        self._webhook_clock = clock
        self._tolerance = tolerance
        self.webhooks: list[ReceivedWebhook] = []
        self.webhook_attempts: list[tuple[str, int]] = []
        self.bad_signatures = 0
        self._seen_ids: dict[str, bytes] = {}
        self._token = token.encode("utf-8")
        self._order_key = order_key
        self._check_txn_order = check_txn_order
        self.events: list[Any] = []
        self.transactions: list[ReceivedTransaction] = []
        self.violations: list[str] = []
        self.requests = 0
        self.duplicates = 0
        self.failed = 0
        self.rejected = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: dict[int, bytes] = {}
        self._highest_txn: int | None = None
        self._last_order: Any = None
        self.lost = 0
        self.too_large = 0
        self._lose = 0
        self._max_body: int | None = None
        self._failing: _Failing | None = None
        self._delay: tuple[float, IReactorTime] | None = None
        self._pending_answers: set[IDelayedCall] = set()
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def __repr__(self) -> str:
        return (
            f"<Receiver events={len(self.events)} transactions={len(self.transactions)} "
            f"violations={len(self.violations)}>"
        )

    # -- scripting -----------------------------------------------------------------------------

    def healthy(self) -> None:
        """Answer normally again: no scripted failures, no lost answers, no delay."""
        self._failing = None
        self._lose = 0
        self._delay = None

    def fail_with(self, status: int, retry_after: str | None = None) -> None:
        """
        Answer every well-formed request with ``status`` (without recording it), until
        :meth:`healthy` is called.

        Args:
            status: The HTTP status to answer, such as 500, 503 or 400.
            retry_after: A ``Retry-After`` header value to send with it, if any.

        Example:
            >>> r = Receiver(token="t")
            >>> r.fail_with(503, retry_after="1")
        """
        self._failing = _Failing(status, retry_after)

    def limit_body(self, max_bytes: int | None) -> None:
        """
        Answer 413 to any request whose body is larger than ``max_bytes``, as a proxy with a
        body size limit does; None lifts the limit.
        """
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, not {max_bytes!r}")
        self._max_body = max_bytes

    def lose_responses(self, count: int) -> None:
        """
        Accept and record the next ``count`` new transactions, but hang up instead of answering.

        The sender sees its connection lost and must send the same transaction again: the
        repeat is acknowledged as a duplicate, not recorded twice. This checks that retries
        carry the same id and the same bytes.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count!r}")
        self._lose = count

    def fail_next(self, count: int, status: int = 500, retry_after: str | None = None) -> None:
        """Answer the next ``count`` well-formed requests with ``status``, then answer normally."""
        self._failing = _Failing(status, retry_after, remaining=count)

    def fail_randomly(
        self,
        rate: float,
        status: int = 500,
        *,
        random: Callable[[], float],
        retry_after: str | None = None,
    ) -> None:
        """
        Answer a random share of the well-formed requests with ``status``.

        Args:
            rate: The share of requests that fail, from 0 to 1.
            status: The HTTP status of a failure.
            random: The source of randomness, returning floats in ``[0, 1)``; pass a seeded
                ``random.Random(seed).random`` for a repeatable run.
            retry_after: A ``Retry-After`` header value to send with a failure, if any.

        Example:
            >>> import random
            >>> r = Receiver(token="t")
            >>> r.fail_randomly(0.3, 500, random=random.Random(1).random)
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be from 0 to 1, not {rate!r}")
        self._failing = _Failing(status, retry_after, rate=rate, random=random)

    def slow(self, seconds: float, clock: IReactorTime) -> None:
        """
        Answer each request only after ``seconds`` on ``clock``.

        The transaction is processed (and recorded) when the answer is sent; if the sender gives
        up first, it is not.
        """
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds!r}")
        self._delay = (seconds, clock)

    def wait_for_events(self, count: int) -> Deferred[None]:
        """
        A Deferred that fires once at least ``count`` events have been received.

        Combine it with ``Deferred.addTimeout`` to bound the wait.
        """
        if len(self.events) >= count:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        return d

    def verify(self, expected: Sequence[Any]) -> DeliveryReport:
        """
        Compare the events received with ``expected``; see :func:`verify_delivery`.

        The receiver's :attr:`violations` are not part of the report: check them too.
        """
        return verify_delivery(expected, self.events)

    # -- serving -------------------------------------------------------------------------------

    def render_PUT(self, request: Request) -> bytes | int:
        if self._secrets is not None:
            self.requests += 1
            return self._refuse(request, 405, "M_UNRECOGNIZED", "webhooks are sent with POST")
        return self._serve(request, self._answer)

    def render_POST(self, request: Request) -> bytes | int:
        if self._secrets is None:
            return self.render_GET(request)
        return self._serve(request, self._answer_webhook)

    def _serve(self, request: Request, answer_of: Callable[[Request], bytes | None]) -> bytes | int:
        self.requests += 1
        self.in_flight += 1
        if self.in_flight > 1:
            self.violations.append(
                f"{self.in_flight} requests in flight at once (at request {self.requests})"
            )
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self._delay is None or self._delay[0] == 0:
            try:
                answer = answer_of(request)
            finally:
                self.in_flight -= 1
            return self._hang_up(request) if answer is None else answer
        seconds, clock = self._delay
        call: IDelayedCall | None = None

        def answer_later() -> None:
            if call is not None:
                self._pending_answers.discard(call)
            self.in_flight -= 1
            answer = answer_of(request)
            if answer is None:
                self._hang_up(request)
            else:
                request.write(answer)
                request.finish()

        def gone(reason: Failure) -> None:
            if call is not None and call.active():
                call.cancel()
                self._pending_answers.discard(call)
                self.in_flight -= 1

        call = clock.callLater(seconds, answer_later)
        self._pending_answers.add(call)
        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET

    @staticmethod
    def _hang_up(request: Request) -> int:
        transport: Any = request.transport
        transport.abortConnection()
        return NOT_DONE_YET

    def render_GET(self, request: Request) -> bytes:
        self.requests += 1
        return self._refuse(request, 405, "M_UNRECOGNIZED", "transactions are sent with PUT")

    def _answer_webhook(self, request: Request) -> bytes | None:
        """Process a webhook; return the answer's body, or None to hang up without one."""
        assert self._secrets is not None
        path = request.postpath or []
        if path not in ([], [b""]):
            shown = b"/".join(path).decode("utf-8", "replace")
            self.violations.append(f"webhook to an unexpected path: /{shown}")
            return self._refuse(request, 404, "M_UNRECOGNIZED", "not the webhook URL")
        if self._token:
            auth = request.getHeader(b"authorization")
            if auth is None or not hmac.compare_digest(auth, b"Bearer " + self._token):
                self.violations.append("a webhook has a missing or wrong Authorization header")
                return self._refuse(request, 403, "M_FORBIDDEN", "wrong access token")

        def header(name: bytes) -> str | None:
            value = request.getHeader(name)
            return value.decode("latin-1") if value is not None else None

        assert request.content is not None
        body = request.content.read()
        msg_id = header(b"webhook-id")
        timestamp = header(b"webhook-timestamp")
        clock = self._webhook_clock
        try:
            verify(
                self._secrets,
                msg_id,
                timestamp,
                body,
                header(b"webhook-signature"),
                now=clock.seconds() if clock is not None else None,
                tolerance=self._tolerance,
            )
        except InvalidSignature as e:
            self.bad_signatures += 1
            self.violations.append(f"webhook {msg_id!r} does not verify: {e}")
            return self._refuse(request, 401, "M_UNAUTHORIZED", "bad webhook signature")
        assert msg_id is not None and timestamp is not None
        self.webhook_attempts.append((msg_id, int(timestamp)))
        if self._max_body is not None and len(body) > self._max_body:
            self.too_large += 1
            request.setResponseCode(413)
            return self._json(request, {"errcode": "M_TOO_LARGE", "error": "body too large"})
        try:
            event = json.loads(body)
        except ValueError:
            self.violations.append(f"webhook {msg_id!r} is not JSON")
            return self._refuse(request, 400, "M_NOT_JSON", "expected JSON")

        scripted = self._scripted_failure(request)
        if scripted is not None:
            return scripted

        digest = hashlib.sha256(body).digest()
        seen = self._seen_ids.get(msg_id)
        if seen is not None:
            self.duplicates += 1
            if seen != digest:
                self.violations.append(f"webhook {msg_id!r} was sent again with different content")
            return self._json(request, {})
        self._seen_ids[msg_id] = digest
        self._check_order(f"webhook {msg_id!r}", [event])
        self.webhooks.append(ReceivedWebhook(msg_id, int(timestamp), event, len(body)))
        self.events.append(event)
        self._notify()
        if self._lose > 0:
            self._lose -= 1
            self.lost += 1
            return None
        return self._json(request, {})

    def _answer(self, request: Request) -> bytes | None:
        """Process a request; return the answer's body, or None to hang up without one."""
        path = request.postpath or []
        if len(path) != 5 or path[:4] != _PATH:
            shown = b"/".join(path).decode("utf-8", "replace")
            self.violations.append(f"request to an unexpected path: /{shown}")
            return self._refuse(request, 404, "M_UNRECOGNIZED", "not a transactions path")
        raw_id = path[4]
        if not raw_id.isdigit() or not raw_id.isascii():
            self.violations.append(f"transaction id is not a number: {raw_id!r}")
            return self._refuse(request, 400, "M_INVALID_PARAM", "bad transaction id")
        txn_id = int(raw_id)

        auth = request.getHeader(b"authorization")
        if auth is None:
            self.violations.append(f"transaction {txn_id} has no Authorization header")
            return self._refuse(request, 401, "M_MISSING_TOKEN", "no access token")
        if not hmac.compare_digest(auth, b"Bearer " + self._token):
            self.violations.append(f"transaction {txn_id} has a wrong Authorization header")
            return self._refuse(request, 403, "M_FORBIDDEN", "wrong access token")

        assert request.content is not None
        body = request.content.read()
        if self._max_body is not None and len(body) > self._max_body:
            self.too_large += 1
            request.setResponseCode(413)
            return self._json(request, {"errcode": "M_TOO_LARGE", "error": "body too large"})
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict) or not isinstance(document.get("events"), list):
            self.violations.append(f'transaction {txn_id} is not JSON {{"events": [...]}}')
            return self._refuse(request, 400, "M_NOT_JSON", 'expected {"events": [...]}')

        scripted = self._scripted_failure(request)
        if scripted is not None:
            return scripted

        digest = hashlib.sha256(body).digest()
        seen = self._seen.get(txn_id)
        if seen is not None:
            self.duplicates += 1
            if seen != digest:
                self.violations.append(
                    f"transaction {txn_id} was sent again with different content"
                )
            return self._json(request, {})

        if self._check_txn_order and self._highest_txn is not None and txn_id < self._highest_txn:
            self.violations.append(
                f"transaction {txn_id} arrived after transaction {self._highest_txn}"
            )
        self._highest_txn = txn_id if self._highest_txn is None else max(self._highest_txn, txn_id)
        self._seen[txn_id] = digest
        events: list[Any] = document["events"]
        self._check_order(f"transaction {txn_id}", events)
        self.transactions.append(ReceivedTransaction(txn_id, events, len(body)))
        self.events.extend(events)
        self._notify()
        if self._lose > 0:
            self._lose -= 1
            self.lost += 1
            return None
        return self._json(request, {})

    def _scripted_failure(self, request: Request) -> bytes | None:
        """The answer of a scripted failure, if this request is to fail; else None."""
        failing = self._failing
        if failing is None or not self._should_fail(failing):
            return None
        self.failed += 1
        request.setResponseCode(failing.status)
        if failing.retry_after is not None:
            request.setHeader(b"Retry-After", failing.retry_after.encode("ascii"))
        return self._json(request, {"errcode": "M_UNKNOWN", "error": "scripted failure"})

    def _should_fail(self, failing: _Failing) -> bool:
        if failing.remaining is not None:
            if failing.remaining <= 0:
                self._failing = None
                return False
            failing.remaining -= 1
            return True
        if failing.random is None:
            return True
        return failing.random() < failing.rate

    def _check_order(self, what: str, events: Iterable[Any]) -> None:
        key = self._order_key
        if key is None:
            return
        for event in events:
            value = event.get(key) if isinstance(event, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                self.violations.append(f"{what} has an event without {key!r}")
                continue
            if self._last_order is not None and value <= self._last_order:
                self.violations.append(
                    f"{what}: event {key}={value!r} came after {key}={self._last_order!r}"
                )
            self._last_order = value

    def _notify(self) -> None:
        ready = [(n, d) for n, d in self._waiters if len(self.events) >= n]
        if ready:
            self._waiters = [(n, d) for n, d in self._waiters if len(self.events) < n]
            for _, d in ready:
                if not d.called:  # not cancelled meanwhile
                    d.callback(None)

    def _refuse(self, request: Request, status: int, errcode: str, error: str) -> bytes:
        self.rejected += 1
        request.setResponseCode(status)
        return self._json(request, {"errcode": errcode, "error": error})

    @staticmethod
    def _json(request: Request, document: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(document).encode("utf-8")

    def cancel_pending(self) -> None:
        """Drop the delayed answers not yet sent (their requests get no answer)."""
        for call in list(self._pending_answers):
            if call.active():
                call.cancel()
                self.in_flight -= 1
        self._pending_answers.clear()


@attrs.define(eq=False)
class ReceiverServer:
    """
    A :class:`Receiver` listening on TCP; made by :func:`listen_receiver`.

    It can go down (the port is closed and open connections are cut, so that senders see
    connection refused) and come back up on the same port.

    Attributes:
        receiver: The receiver it serves.
        port: The TCP port number, the same while down and after coming back up.
        interface: The address it listens on.
        base_url: The URL to give as the target's ``base_url``.
    """

    receiver: Receiver
    port: int
    interface: str
    base_url: str
    _reactor: IReactorTCP
    _factory: WrappingFactory
    _listening: IListeningPort | None

    @property
    def is_up(self) -> bool:
        """Whether it is listening."""
        return self._listening is not None

    def down(self) -> Deferred[None]:
        """
        Stop listening and cut the connections that are open: from now on, connecting is refused.

        Returns:
            A Deferred that fires once the port is closed.
        """
        listening, self._listening = self._listening, None
        for protocol in list(self._factory.protocols):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        self.receiver.cancel_pending()
        if listening is None:
            return succeed(None)
        d: Deferred[None] = Deferred.fromCoroutine(_stop_listening(listening))
        return d

    def up(self) -> None:
        """
        Listen again, on the same port.

        Raises:
            twisted.internet.error.CannotListenError: Something else took the port meanwhile.
        """
        if self._listening is None:
            self._listening = self._reactor.listenTCP(
                self.port, cast(Any, self._factory), interface=self.interface
            )

    def stop(self) -> Deferred[None]:
        """Stop for good: the same as :meth:`down`."""
        return self.down()


class _QuietSite(Site):
    """A site that keeps no access log: the receiver records what matters."""

    def log(self, request: http.Request) -> None:
        pass


async def _stop_listening(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result


def listen_receiver(
    reactor: IReactorTCP,
    receiver: Receiver,
    *,
    port: int = 0,
    interface: str = "127.0.0.1",
    prefix: str | None = None,
) -> ReceiverServer:
    """
    Serve a receiver over HTTP.

    Args:
        reactor: The reactor to listen with.
        receiver: The receiver to serve.
        port: The TCP port; 0 (the default) lets the system choose a free one.
        interface: The address to listen on; by default only the loopback.
        prefix: If given, the receiver is served under ``/{prefix}``, which ends the base URL
            (for example ``http://127.0.0.1:PORT/t1``), to check that the sender keeps the
            base URL's path.

    Returns:
        The running :class:`ReceiverServer`, whose ``base_url`` is the target's base URL.

    Example::

        server = listen_receiver(reactor, Receiver(token="secret"), prefix="t1")
        target = TargetConfig("t1", server.base_url, "secret")
    """
    if prefix is not None:
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be one non-empty path segment, not {prefix!r}")
        root = Resource()
        root.putChild(prefix.encode("utf-8"), receiver)
        site = _QuietSite(root)
    else:
        site = _QuietSite(receiver)
    site.displayTracebacks = False
    site.noisy = False
    factory = WrappingFactory(site)
    factory.noisy = False
    listening = reactor.listenTCP(port, cast(Any, factory), interface=interface)
    number = listening.getHost().port  # type: ignore[attr-defined]
    host = f"[{interface}]" if ":" in interface else interface
    base_url = f"http://{host}:{number}" + (f"/{prefix}" if prefix is not None else "")
    return ReceiverServer(
        receiver=receiver,
        port=number,
        interface=interface,
        base_url=base_url,
        reactor=reactor,
        factory=factory,
        listening=listening,
    )


__all__ = [
    "DeliveryReport",
    "ReceivedTransaction",
    "ReceivedWebhook",
    "Receiver",
    "ReceiverServer",
    "listen_receiver",
    "verify_delivery",
]
