"""
Tests of the HTTP transport against a real twisted.web server on 127.0.0.1, and of the
classification of statuses and ``Retry-After`` headers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from relayer.config import TargetConfig
from relayer.errors import ConfigurationError
from relayer.transport import (
    HTTPSendError,
    HTTPTransport,
    ITransport,
    OutcomeKind,
    SendOutcome,
    classify_status,
    parse_retry_after,
)
from relayer.transport.http import transaction_url

TOKEN = "s3cr3t-T0KEN-do-not-leak"
#: A bound on each test, so that a bug shows as a failure rather than a hang.
DEADLINE = 20.0


# -- a scriptable server --------------------------------------------------------------------


@attrs.define
class Seen:
    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes
    client_port: int


class Scripted(Resource):
    """Records each request and answers it with ``self.handler``."""

    isLeaf = True

    def __init__(self, handler: Callable[[Request], bytes | int] | None = None) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.handler = handler or (lambda request: b"{}")

    def render(self, request: Request) -> bytes | int:
        assert request.content is not None
        address: Any = request.getClientAddress()
        self.seen.append(
            Seen(
                method=request.method,
                path=request.uri,
                headers={k: list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                body=request.content.read(),
                client_port=address.port,
            )
        )
        return self.handler(request)


def answer(status: int, body: bytes = b"{}", **headers: str) -> Callable[[Request], bytes]:
    def handler(request: Request) -> bytes:
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name.replace("_", "-"), value)
        return body

    return handler


class Harness:
    """A server on 127.0.0.1 and a transport, closed at the end of a test."""

    def __init__(self, reactor: Any, resource: Resource | None = None, **transport: Any) -> None:
        self.reactor = reactor
        self.resource: Any = resource if resource is not None else Scripted()
        self.site = Site(self.resource)
        self.port: IListeningPort = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.base_url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.transport = HTTPTransport(reactor, **transport)

    def target(self, **settings: Any) -> TargetConfig:
        settings.setdefault("base_url", self.base_url)
        return TargetConfig("t1", token=TOKEN, **settings)

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        return self.transport.send(target, txn_id, body).addTimeout(DEADLINE, self.reactor)

    async def close(self) -> None:
        await self.transport.close()
        await stop_listening(self.port)


async def stop_listening(port: IListeningPort) -> None:
    result = port.stopListening()
    if result is not None:
        await result


def reactor_() -> Any:
    from twisted.internet import reactor

    return reactor


async def failure_of(d: Deferred[Any]) -> Any:
    """The failure of ``d`` (typed Any, for its value's attributes)."""
    try:
        result = await d
    except Exception:
        return Failure()
    raise AssertionError(f"expected a failure, got {result!r}")


def assert_no_token(failure: Any) -> None:
    for text in (str(failure.value), repr(failure.value), failure.getTraceback()):
        assert TOKEN not in text
    assert failure.value.__context__ is None
    assert failure.value.__cause__ is None


# -- unit tests --------------------------------------------------------------------------------


def test_provides_itransport() -> None:
    assert verifyObject(ITransport, HTTPTransport(reactor_()))


def test_repr_and_url() -> None:
    assert "HTTPTransport" in repr(HTTPTransport(reactor_()))
    assert transaction_url("http://h:1/", 7) == "http://h:1/_matrix/app/v1/transactions/7"
    assert transaction_url("http://h:1/a/b", 7) == "http://h:1/a/b/_matrix/app/v1/transactions/7"


def test_bad_arguments() -> None:
    transport = HTTPTransport(reactor_())
    target = TargetConfig("t1", "http://127.0.0.1:1", TOKEN)
    with pytest.raises(TypeError):
        transport.send(target, "1", b"{}")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        transport.send(target, True, b"{}")
    with pytest.raises(TypeError):
        transport.send(target, 1, "{}")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_response_bytes"):
        HTTPTransport(reactor_(), max_response_bytes=-1)
    with pytest.raises(ConfigurationError, match="max_response_bytes"):
        HTTPTransport(reactor_(), max_response_bytes=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, OutcomeKind.DELIVERED),
        (204, OutcomeKind.DELIVERED),
        (299, OutcomeKind.DELIVERED),
        (400, OutcomeKind.PERMANENT),
        (401, OutcomeKind.RETRY),
        (403, OutcomeKind.RETRY),
        (404, OutcomeKind.RETRY),
        (405, OutcomeKind.RETRY),
        (409, OutcomeKind.RETRY),
        (410, OutcomeKind.RETRY),
        (422, OutcomeKind.PERMANENT),
        (408, OutcomeKind.RETRY),
        (413, OutcomeKind.TOO_LARGE),
        (429, OutcomeKind.RETRY),
        (500, OutcomeKind.RETRY),
        (502, OutcomeKind.RETRY),
        (503, OutcomeKind.RETRY),
        (599, OutcomeKind.RETRY),
        (100, OutcomeKind.RETRY),
        (301, OutcomeKind.RETRY),
    ],
)
def test_classify_status(status: int, kind: OutcomeKind) -> None:
    outcome = classify_status(status)
    assert outcome.kind is kind
    assert outcome.reason.startswith(f"HTTP {status}")
    assert outcome.retry_after is None


@pytest.mark.parametrize(("status", "says"), [(401, "token"), (403, "token"), (404, "base URL")])
def test_classify_status_names_a_registration_fault(status: int, says: str) -> None:
    outcome = classify_status(status)
    assert outcome.kind is OutcomeKind.RETRY
    assert says in outcome.reason


def test_classify_status_retry_after() -> None:
    assert classify_status(429, "7").retry_after == 7.0
    assert classify_status(503, "7").retry_after == 7.0
    # Only 429 and 503 honour Retry-After.
    assert classify_status(500, "7").retry_after is None
    assert classify_status(200, "7").retry_after is None
    assert classify_status(429, "soon").retry_after is None


def test_parse_retry_after() -> None:
    now = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now) == 60.0
    # A date in the past means "now".
    assert parse_retry_after("Sun, 06 Nov 1994 08:48:37 GMT", now) == 0.0
    for bad in ("", "-5", "1.5", "soon", "Sun, 06 Nov 1994 08:50:37", "99 Bottles"):
        assert parse_retry_after(bad, now) is None, bad


# -- against a real server ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_request_shape() -> None:
    h = Harness(reactor_())
    try:
        body = b'{"events":[{"n":1,"s":"\xc3\xa9 \\u00e9"},\n{"n":2}]}'
        outcome = await h.send(h.target(), 42, body)
        assert outcome.kind is OutcomeKind.DELIVERED
        [seen] = h.resource.seen
        assert seen.method == b"PUT"
        assert seen.path == b"/_matrix/app/v1/transactions/42"
        assert seen.headers[b"Authorization"] == [f"Bearer {TOKEN}".encode()]
        assert seen.headers[b"Content-Type"] == [b"application/json"]
        assert seen.headers[b"Content-Length"] == [str(len(body)).encode()]
        assert seen.body == body
    finally:
        await h.close()


@pytest_twisted.ensureDeferred
async def test_base_url_path_kept_and_trailing_slash_dropped() -> None:
    root = Resource()
    inner = Scripted()
    root.putChild(b"hooks", inner)
    h = Harness(reactor_(), root)
    try:
        await h.send(h.target(base_url=h.base_url + "/hooks/"), 3, b'{"events":[]}')
        assert [s.path for s in inner.seen] == [b"/hooks/_matrix/app/v1/transactions/3"]
    finally:
        await h.close()


@pytest_twisted.ensureDeferred
async def test_connection_is_reused() -> None:
    h = Harness(reactor_())
    try:
        for txn_id in (1, 2, 3):
            outcome = await h.send(h.target(), txn_id, b'{"events":[]}')
            assert outcome.kind is OutcomeKind.DELIVERED
        assert len({s.client_port for s in h.resource.seen}) == 1
    finally:
        await h.close()


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after"),
    [
        (200, {}, OutcomeKind.DELIVERED, None),
        (202, {}, OutcomeKind.DELIVERED, None),
        (400, {}, OutcomeKind.PERMANENT, None),
        (403, {}, OutcomeKind.RETRY, None),
        (422, {}, OutcomeKind.PERMANENT, None),
        (408, {}, OutcomeKind.RETRY, None),
        (413, {}, OutcomeKind.TOO_LARGE, None),
        (429, {"Retry_After": "12"}, OutcomeKind.RETRY, 12.0),
        (429, {}, OutcomeKind.RETRY, None),
        (503, {"Retry_After": "3"}, OutcomeKind.RETRY, 3.0),
        (500, {"Retry_After": "3"}, OutcomeKind.RETRY, None),
        (302, {"Location": "http://127.0.0.1:1/elsewhere"}, OutcomeKind.RETRY, None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_status_classification(
    status: int, headers: dict[str, str], kind: OutcomeKind, retry_after: float | None
) -> None:
    h = Harness(reactor_(), Scripted(answer(status, b'{"errcode":"M_X"}', **headers)))
    try:
        outcome = await h.send(h.target(), 1, b'{"events":[]}')
        assert outcome.kind is kind
        assert outcome.reason.startswith(f"HTTP {status}")
        assert outcome.retry_after == retry_after
        # Redirects are not followed: exactly one request.
        assert len(h.resource.seen) == 1
    finally:
        await h.close()


@pytest_twisted.ensureDeferred
async def test_failure_reason_has_a_snippet_without_the_token() -> None:
    error = b'{"errcode":"M_FORBIDDEN","error":"bad token ' + TOKEN.encode() + b'"}'
    h = Harness(reactor_(), Scripted(answer(403, error)))
    try:
        outcome = await h.send(h.target(), 1, b'{"events":[]}')
        assert outcome.kind is OutcomeKind.RETRY
        assert "M_FORBIDDEN" in outcome.reason
        assert TOKEN not in outcome.reason
    finally:
        await h.close()


@pytest_twisted.ensureDeferred
async def test_connection_refused() -> None:
    reactor = reactor_()
    h = Harness(reactor)
    await stop_listening(h.port)
    try:
        failure = await failure_of(h.send(h.target(), 1, b'{"events":[]}'))
        assert failure.check(HTTPSendError)
        assert "connection refused" in str(failure.value)
        assert "/_matrix/app/v1/transactions/1" in str(failure.value)
        assert not failure.value.timed_out
        assert_no_token(failure)
    finally:
        await h.transport.close()


class Silent(Resource):
    """Accepts requests and never answers them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.lost: list[Failure] = []
        self.arrived: Deferred[None] = Deferred()

    def render(self, request: Request) -> int:
        request.notifyFinish().addErrback(self.lost.append)
        if not self.arrived.called:
            self.arrived.callback(None)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_timeout() -> None:
    silent = Silent()
    h = Harness(reactor_(), silent)
    try:
        failure = await failure_of(h.send(h.target(request_timeout=0.2), 1, b'{"events":[]}'))
        assert failure.check(HTTPSendError)
        assert failure.value.timed_out
        assert "timeout" in str(failure.value)
        assert_no_token(failure)
        assert silent.arrived.called
    finally:
        await h.close()


class StallingBody(Resource):
    """Answers 200 with headers, then never finishes the body."""

    isLeaf = True

    def render(self, request: Request) -> int:
        request.setResponseCode(200)
        request.write(b"{")
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_a_stalled_body_does_not_hang_a_delivered_status() -> None:
    h = Harness(reactor_(), StallingBody())
    try:
        outcome = await h.send(h.target(request_timeout=0.2), 1, b'{"events":[]}')
        assert outcome.kind is OutcomeKind.DELIVERED
    finally:
        await h.close()


@pytest_twisted.ensureDeferred
async def test_cancel_abandons_the_request() -> None:
    silent = Silent()
    h = Harness(reactor_(), silent)
    try:
        d = h.transport.send(h.target(), 1, b'{"events":[]}')
        await silent.arrived
        d.cancel()
        failure = await failure_of(d)
        assert not failure.check(HTTPSendError)
    finally:
        await h.close()


class Endless(Resource):
    """Answers with a body that never ends, as long as the client reads it."""

    isLeaf = True

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status
        self.lost: Deferred[None] = Deferred()

    def render(self, request: Request) -> int:
        request.setResponseCode(self.status)
        chunk = b"x" * 65536

        class Producer:
            stopped = False

            def resumeProducing(self) -> None:
                if not self.stopped:
                    request.write(chunk)

            def pauseProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                self.stopped = True

        producer = Producer()
        request.registerProducer(producer, False)

        def lost(reason: Failure) -> None:
            producer.stopped = True
            self.lost.callback(None)

        request.notifyFinish().addErrback(lost)
        return NOT_DONE_YET


@pytest.mark.parametrize("status", [200, 500])
@pytest_twisted.ensureDeferred
async def test_huge_body_is_not_read_past_the_limit(status: int) -> None:
    # With an hour of request timeout, only the body limit can end the attempt before the
    # test's deadline.
    endless = Endless(status)
    h = Harness(reactor_(), endless, max_response_bytes=1024)
    try:
        outcome = await h.send(h.target(request_timeout=3600), 1, b'{"events":[]}')
        assert outcome.kind is classify_status(status).kind
        # The client closed the connection rather than read on.
        await endless.lost.addTimeout(DEADLINE, h.reactor)
    finally:
        await h.close()


class Garbage(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"NOT HTTP AT ALL " + TOKEN.encode() + b"\r\n\r\n")
        self.transport.loseConnection()


class Hangup(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


@pytest.mark.parametrize("protocol", [Garbage, Hangup])
@pytest_twisted.ensureDeferred
async def test_invalid_response_or_reset_is_a_failure(protocol: type[Protocol]) -> None:
    reactor = reactor_()
    port = reactor.listenTCP(0, Factory.forProtocol(protocol), interface="127.0.0.1")
    transport = HTTPTransport(reactor)
    target = TargetConfig("t1", f"http://127.0.0.1:{port.getHost().port}", TOKEN)
    try:
        failure = await failure_of(
            transport.send(target, 1, b'{"events":[]}').addTimeout(DEADLINE, reactor)
        )
        assert failure.check(HTTPSendError)
        assert not failure.value.timed_out
        assert_no_token(failure)
    finally:
        await transport.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_wire_format_whose_classify_fails_does_not_keep_the_connection() -> None:
    from zope.interface import implementer

    from relayer.formats import MATRIX, IWireFormat

    @implementer(IWireFormat)
    class Failing:
        name = "failing"
        max_events = None

        def check(self, target: TargetConfig) -> None:
            pass

        def request(self, target: TargetConfig, txn: Any, now: float) -> Any:
            return MATRIX.request(target, txn, now)

        def classify(self, status: int, retry_after: str | None, now: float) -> SendOutcome:
            raise RuntimeError("a bug in a plugin's format")

    h = Harness(reactor_())
    try:
        t = h.target()
        sending = h.transport.send_request(t, MATRIX.request_of(t, 1, b"{}"), Failing())
        failure = await failure_of(sending.addTimeout(DEADLINE, h.reactor))
        assert failure.check(RuntimeError)
        # The response was read to its end: its connection is reused, not left open for ever.
        outcome = await h.send(t, 2, b'{"events":[]}')
        assert outcome.kind is OutcomeKind.DELIVERED
        assert len({s.client_port for s in h.resource.seen}) == 1
    finally:
        await h.close()
