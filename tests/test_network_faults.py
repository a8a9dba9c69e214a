"""
Network faults against real servers on 127.0.0.1: each one is classified as documented, by the
HTTP transport and in the scheduler's status, and the scheduler stays healthy through it.

The faults: connection refused; a connection reset in the middle of the request, of the response
head and of the response body; a server that accepts and never answers; a response that trickles
in byte by byte (in time, and too slowly); invalid HTTP; a self-signed certificate with
verification on; a response body that never ends.

Each scheduler test runs two targets in one scheduler, a faulty one and a healthy one. The
healthy one receives everything while the fault lasts (isolation); the faulty one is DOWN with
the fault as its ``last_error``; once the fault is fixed, it receives every event exactly once,
in order.
"""

from __future__ import annotations

import datetime
import ipaddress
import random
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from _support import DEADLINE, eventually, reactor_
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.server import Site
from zope.interface import implementer

from relayer import (
    BackoffPolicy,
    HTTPSendError,
    HTTPTransport,
    OutcomeKind,
    Scheduler,
    SendOutcome,
    SQLiteStore,
    TargetConfig,
    TargetState,
    TargetStatus,
)
from relayer.testing import Receiver, listen_receiver

pytestmark = pytest.mark.integration

TOKEN = "faulty-target-token"
HEALTHY_TOKEN = "healthy-target-token"
#: A bound on every wait, so that a bug shows as a failure rather than a hang.
FAST = BackoffPolicy(initial=0.05, maximum=0.2)
BODY = b'{"events":[{"n":0}]}'


async def outcome_of(d: Deferred[SendOutcome]) -> SendOutcome | Failure:
    """A send's outcome, or its failure."""
    try:
        return await d.addTimeout(DEADLINE, reactor_())
    except Exception:
        return Failure()


# -- misbehaving servers ---------------------------------------------------------------------------


class RequestReader(Protocol):
    """Reads one HTTP request, its head and then its body (by Content-Length)."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.head: bytes | None = None
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        if self.head is None:
            head, sep, _ = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head = head
            self.buffer = self.buffer[len(head) + len(sep) :]
            self.head_read()
            if self.done:
                return
        match = re.search(rb"(?im)^content-length:\s*(\d+)", self.head)
        if len(self.buffer) >= (int(match.group(1)) if match else 0):
            self.done = True
            self.request_read()

    def head_read(self) -> None:
        """Called once the request's head is in."""

    def request_read(self) -> None:
        """Called once the whole request is in."""

    def abort(self) -> None:
        self.done = True
        assert self.transport is not None
        self.transport.abortConnection()


class ResetDuringRequest(RequestReader):
    """Cuts the connection once the request's head is in, before the body is read."""

    def head_read(self) -> None:
        self.abort()


class Answers(RequestReader):
    """Writes ``answer`` once the request is in, then resets the connection if ``reset``."""

    answer = b""
    reset = True

    def request_read(self) -> None:
        assert self.transport is not None
        self.transport.write(self.answer)
        if self.reset:
            # A pull producer is asked for more once what was written has gone out: reset the
            # connection then, after the answer so far has reached the client.
            self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        # The first call comes at once, from registerProducer; the second once the answer
        # has been written out.
        self.asked = getattr(self, "asked", 0) + 1
        if self.asked == 2:
            assert self.transport is not None
            self.transport.unregisterProducer()
            self.abort()

    def stopProducing(self) -> None:
        pass


def answers(answer: bytes, reset: bool = True) -> type[Answers]:
    return type("Answer", (Answers,), {"answer": answer, "reset": reset})


#: Resets the connection half-way through the status line and headers.
ResetDuringHead = answers(b"HTTP/1.1 200 OK\r\nContent-Le")
#: Resets the connection half-way through a 500's body.
ResetDuringBody500 = answers(
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000\r\n\r\n" + b'{"errcode":"M_UN'
)
#: Resets the connection half-way through a 200's body.
ResetDuringBody200 = answers(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b'{"ok":')
#: Not HTTP at all.
NotHTTP = answers(b"SPDY/9 banana\r\n\r\n")
#: A status line whose status is not a number.
BadStatus = answers(b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", reset=False)


class Hangs(RequestReader):
    """Reads the request and never answers; counts the connections, and those the client closed."""

    opened = 0
    closed = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        type(self).opened += 1

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        type(self).closed += 1


class EndlessBody(RequestReader):
    """Answers 500 with a body that never ends, for as long as the client reads it."""

    closed: list[int] = []

    def request_read(self) -> None:
        assert self.transport is not None
        self.sent = 0
        self.transport.write(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        assert self.transport is not None
        chunk = b"x" * 65536
        self.sent += len(chunk)
        self.transport.write(chunk)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        type(self).closed.append(getattr(self, "sent", 0))


@attrs.define
class TricklingTransport:
    """Wraps a transport so that what is written goes out one byte per ``interval`` seconds."""

    transport: Any
    interval: float
    queue: bytearray = attrs.field(factory=bytearray)
    closing: bool = False
    pumping: Any = None

    def write(self, data: bytes) -> None:
        self.queue += data
        self._schedule()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.closing = True
        self._schedule()

    def _schedule(self) -> None:
        if self.pumping is None or not self.pumping.active():
            self.pumping = reactor_().callLater(self.interval, self._pump)

    def _pump(self) -> None:
        if self.queue:
            self.transport.write(bytes(self.queue[:1]))
            del self.queue[:1]
        if self.queue:
            self._schedule()
        elif self.closing:
            self.transport.loseConnection()

    def stop(self) -> None:
        if self.pumping is not None and self.pumping.active():
            self.pumping.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class FaultyServer:
    """
    A receiver on 127.0.0.1 that can misbehave.

    While ``fault`` is set, each new connection is handled by that protocol instead of the
    receiver; while ``trickle`` is set, the receiver's answers go out one byte at a time.
    ``down()`` closes the port (connecting is refused) and ``up()`` opens it again.
    """

    def __init__(self, token: str) -> None:
        self.receiver = Receiver(token, order_key="n")
        self.site = Site(self.receiver)
        self.site.noisy = False
        self.fault: type[Protocol] | None = None
        self.trickle: float | None = None
        self.trickling: list[TricklingTransport] = []
        self.port_number = 0
        self.listening: IListeningPort | None = None
        self.up()
        self.base_url = f"http://127.0.0.1:{self.port_number}"

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self.fault is not None:
            return self.fault()
        protocol = self.site.buildProtocol(addr)
        if protocol is not None and self.trickle is not None:
            interval = self.trickle
            make_connection = protocol.makeConnection

            def trickled(transport: Any) -> None:
                wrapped = TricklingTransport(transport, interval)
                self.trickling.append(wrapped)
                make_connection(wrapped)

            protocol.makeConnection = trickled  # type: ignore[method-assign]
        return protocol

    def up(self) -> None:
        factory = Factory()
        factory.buildProtocol = self.buildProtocol  # type: ignore[method-assign]
        factory.noisy = False
        self.listening = reactor_().listenTCP(self.port_number, factory, interface="127.0.0.1")
        self.port_number = self.listening.getHost().port  # type: ignore[attr-defined]

    async def down(self) -> None:
        listening, self.listening = self.listening, None
        if listening is not None:
            await listening.stopListening()

    async def close(self) -> None:
        for t in self.trickling:
            t.stop()
        await self.down()


# -- TLS -------------------------------------------------------------------------------------------


def self_signed() -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key, in PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@implementer(IPolicyForHTTPS)
@attrs.frozen
class TrustOnly:
    """A TLS policy that trusts one certificate, and verifies the host name against it."""

    cert_pem: bytes

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=ssl.Certificate.loadPEM(self.cert_pem)
        )


# -- a scheduler with a faulty target and a healthy one --------------------------------------------


class Stack:
    def __init__(self, path: Path, faulty_url: str, **faulty: Any) -> None:
        reactor = reactor_()
        self.healthy = Receiver(HEALTHY_TOKEN, order_key="n")
        self.healthy_server = listen_receiver(reactor, self.healthy)
        self.transport = HTTPTransport(
            reactor, max_response_bytes=faulty.pop("max_response", 65536)
        )
        faulty.setdefault("backoff", FAST)
        self.configs = [
            TargetConfig("faulty", faulty_url, TOKEN, **faulty),
            TargetConfig("healthy", self.healthy_server.base_url, HEALTHY_TOKEN, backoff=FAST),
        ]
        self.scheduler = Scheduler(
            reactor,
            SQLiteStore.open_path(reactor, path),
            self.transport,
            self.configs,
            random=random.Random(0).random,
        )
        self.expected: dict[str, list[dict[str, Any]]] = {"faulty": [], "healthy": []}

    async def submit(self, count: int, pad: int = 0) -> None:
        for _ in range(count):
            for t in ("faulty", "healthy"):
                event = {"n": len(self.expected[t]), "pad": "p" * pad}
                self.expected[t].append(event)
                await self.scheduler.submit(t, event)

    async def status(self) -> dict[str, TargetStatus]:
        return {s.target_id: s for s in await self.scheduler.status()}

    async def faulty_down_with(self, error: str) -> TargetStatus:
        """Wait for the healthy target to have everything, and the faulty one to be DOWN."""
        await eventually(
            lambda: len(self.healthy.events) >= len(self.expected["healthy"]),
            "the healthy target to receive its events",
        )

        async def down() -> TargetStatus | None:
            s = (await self.status())["faulty"]
            if s.state is TargetState.DOWN and s.consecutive_failures >= 2:
                return s
            return None

        s: TargetStatus = await eventually(down, "the faulty target to be DOWN")
        assert s.last_error is not None and error in s.last_error, s.last_error
        assert TOKEN not in s.last_error
        assert s.next_retry_at is not None
        assert s.pending_events >= 1
        # The fault holds nobody else up. (The target has the events before the store has
        # recorded its answer: the last delivery may take a moment to be committed.)

        async def healthy_done() -> TargetStatus | None:
            healthy = (await self.status())["healthy"]
            done = healthy.state is TargetState.UP and healthy.pending_events == 0
            return healthy if done else None

        await eventually(healthy_done, "the healthy target to have nothing pending")
        return s

    async def all_delivered(self, faulty: Receiver) -> None:
        self.scheduler.wake("faulty")

        async def drained() -> bool:
            return all(
                s.pending_events == 0 and not s.in_flight and s.state is TargetState.UP
                for s in (await self.status()).values()
            )

        await eventually(drained, "every target to be drained")
        for receiver, t in ((faulty, "faulty"), (self.healthy, "healthy")):
            report = receiver.verify(self.expected[t])
            assert report.ok, f"{t}: {report.summary()}"
            assert receiver.violations == []

    async def close(self) -> None:
        if self.scheduler.running:
            await self.scheduler.stop()
        await self.transport.close()
        await self.healthy_server.stop()


# -- faults, one by one ----------------------------------------------------------------------------


@attrs.frozen
class Fault:
    protocol: type[Protocol]
    #: What the transport gives: an HTTPSendError, or an outcome of this kind.
    outcome: OutcomeKind | None
    #: What the scheduler's last_error says.
    error: str
    big_events: bool = False


FAULTS = {
    "reset-during-request": Fault(
        ResetDuringRequest, None, "PUT http://127.0.0.1", big_events=True
    ),
    "reset-during-head": Fault(ResetDuringHead, None, "the response was cut short or not valid"),
    "reset-during-500-body": Fault(ResetDuringBody500, OutcomeKind.RETRY, "HTTP 500"),
    "not-http": Fault(NotHTTP, None, "PUT http://127.0.0.1"),
    "bad-status": Fault(BadStatus, None, "PUT http://127.0.0.1"),
    "endless-500-body": Fault(EndlessBody, OutcomeKind.RETRY, "HTTP 500: xxxx"),
}


@pytest.mark.parametrize("name", sorted(FAULTS))
@pytest_twisted.ensureDeferred
async def test_transport_classifies_the_fault(name: str) -> None:
    fault = FAULTS[name]
    server = FaultyServer(TOKEN)
    server.fault = fault.protocol
    transport = HTTPTransport(reactor_(), max_response_bytes=65536)
    config = TargetConfig("faulty", server.base_url, TOKEN)
    body = b'{"events":[{"pad":"' + b"p" * 2_000_000 + b'"}]}' if fault.big_events else BODY
    try:
        result = await outcome_of(transport.send(config, 1, body))
        if fault.outcome is None:
            # No response: a transient failure, raised as HTTPSendError (not a timeout).
            assert isinstance(result, Failure), result
            assert result.check(HTTPSendError), result
            assert not result.value.timed_out
            assert "/_matrix/app/v1/transactions/1" in str(result.value)
        else:
            assert isinstance(result, SendOutcome), result
            assert result.kind is fault.outcome
            assert fault.error in result.reason
        assert server.receiver.requests == 0
    finally:
        await transport.close()
        await server.close()


@pytest.mark.parametrize("name", sorted(FAULTS))
@pytest_twisted.ensureDeferred
async def test_scheduler_survives_the_fault(tmp_path: Path, name: str) -> None:
    fault = FAULTS[name]
    server = FaultyServer(TOKEN)
    server.fault = fault.protocol
    stack = Stack(tmp_path / "relayer.db", server.base_url)
    try:
        await stack.scheduler.start()
        await stack.submit(10, pad=100_000 if fault.big_events else 0)
        await stack.faulty_down_with(fault.error)
        assert server.receiver.events == []
        server.fault = None
        await stack.all_delivered(server.receiver)
    finally:
        await stack.close()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_a_reset_during_a_200_body_counts_as_delivered() -> None:
    # The status decides: a 2xx means the target took the transaction, whatever became of
    # the rest of the answer.
    server = FaultyServer(TOKEN)
    server.fault = ResetDuringBody200
    transport = HTTPTransport(reactor_())
    try:
        result = await outcome_of(
            transport.send(TargetConfig("faulty", server.base_url, TOKEN), 1, BODY)
        )
        assert isinstance(result, SendOutcome) and result.kind is OutcomeKind.DELIVERED
    finally:
        await transport.close()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_connection_refused(tmp_path: Path) -> None:
    server = FaultyServer(TOKEN)
    await server.down()
    transport = HTTPTransport(reactor_())
    try:
        result = await outcome_of(
            transport.send(TargetConfig("faulty", server.base_url, TOKEN), 1, BODY)
        )
        assert isinstance(result, Failure) and result.check(HTTPSendError)
        assert result.value.reason == "connection refused"
        assert not result.value.timed_out
    finally:
        await transport.close()

    stack = Stack(tmp_path / "relayer.db", server.base_url)
    try:
        await stack.scheduler.start()
        await stack.submit(10)
        await stack.faulty_down_with("connection refused")
        server.up()
        await stack.all_delivered(server.receiver)
    finally:
        await stack.close()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    Hangs.opened = Hangs.closed = 0
    server = FaultyServer(TOKEN)
    server.fault = Hangs
    transport = HTTPTransport(reactor_())
    try:
        result = await outcome_of(
            transport.send(
                TargetConfig("faulty", server.base_url, TOKEN, request_timeout=0.3), 1, BODY
            )
        )
        assert isinstance(result, Failure) and result.check(HTTPSendError)
        assert result.value.timed_out
        # The client gave up the connection; it does not linger.
        await eventually(lambda: Hangs.closed == Hangs.opened == 1, "the connection to close")
    finally:
        await transport.close()

    stack = Stack(tmp_path / "relayer.db", server.base_url, request_timeout=0.3)
    try:
        await stack.scheduler.start()
        await stack.submit(10)
        await stack.faulty_down_with("no response within the request timeout of 0.3s")
        server.fault = None
        await stack.all_delivered(server.receiver)
        # Every hung connection was closed by the client: none is left open.
        assert Hangs.opened >= 3
        await eventually(lambda: Hangs.closed == Hangs.opened, "hung connections to close")
    finally:
        await stack.close()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_a_trickling_answer_is_awaited_within_the_timeout() -> None:
    server = FaultyServer(TOKEN)
    server.trickle = 0.001
    transport = HTTPTransport(reactor_())
    try:
        result = await outcome_of(
            transport.send(TargetConfig("faulty", server.base_url, TOKEN), 1, BODY)
        )
        assert isinstance(result, SendOutcome) and result.kind is OutcomeKind.DELIVERED
        assert server.receiver.events == [{"n": 0}]
    finally:
        await transport.close()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_an_answer_trickling_past_the_timeout_is_retried_exactly_once(
    tmp_path: Path,
) -> None:
    # The target takes each transaction but answers too slowly: the attempt times out however
    # steadily bytes arrive, and the retry carries the same id, so the target keeps one copy.
    server = FaultyServer(TOKEN)
    server.trickle = 0.05
    stack = Stack(tmp_path / "relayer.db", server.base_url, request_timeout=0.5)
    try:
        await stack.scheduler.start()
        await stack.submit(10)
        await stack.faulty_down_with("no response within the request timeout of 0.5s")
        server.trickle = None
        await stack.all_delivered(server.receiver)
        assert server.receiver.duplicates >= 1
    finally:
        await stack.close()
        await server.close()


@pytest_twisted.ensureDeferred
async def test_an_endless_body_is_not_read_past_the_limit() -> None:
    EndlessBody.closed = []
    server = FaultyServer(TOKEN)
    server.fault = EndlessBody
    transport = HTTPTransport(reactor_(), max_response_bytes=1024)
    try:
        # With an hour of request timeout, only the body limit can end the attempt in time.
        result = await outcome_of(
            transport.send(
                TargetConfig("faulty", server.base_url, TOKEN, request_timeout=3600), 1, BODY
            )
        )
        assert isinstance(result, SendOutcome) and result.kind is OutcomeKind.RETRY
        assert result.reason.startswith("HTTP 500: xxx")
        # The client hung up rather than read on.
        await eventually(lambda: EndlessBody.closed, "the client to close the connection")
    finally:
        await transport.close()
        await server.close()


# -- TLS -------------------------------------------------------------------------------------------


class TLSServer:
    """A receiver served over TLS with a self-signed certificate."""

    def __init__(self, token: str) -> None:
        self.cert_pem, key_pem = self_signed()
        self.receiver = Receiver(token, order_key="n")
        site = Site(self.receiver)
        site.noisy = False
        self.connections = 0
        factory = Factory()

        def build(addr: Any) -> Any:
            self.connections += 1
            return site.buildProtocol(addr)

        factory.buildProtocol = build  # type: ignore[method-assign]
        options = ssl.PrivateCertificate.loadPEM(self.cert_pem + key_pem).options()
        self.port: IListeningPort = reactor_().listenSSL(0, factory, options, interface="127.0.0.1")
        self.base_url = f"https://localhost:{self.port.getHost().port}"  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.port.stopListening()


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_a_self_signed_certificate_is_refused(tmp_path: Path) -> None:
    server = TLSServer(TOKEN)
    transport = HTTPTransport(reactor_())
    try:
        # Verification is on by default: the handshake fails, a transient failure, and the
        # request (with its token) is never sent.
        result = await outcome_of(
            transport.send(TargetConfig("faulty", server.base_url, TOKEN), 1, BODY)
        )
        assert isinstance(result, Failure) and result.check(HTTPSendError), result
        assert "certificate verify failed" in result.value.reason
        assert not result.value.timed_out
        assert server.connections >= 1
        assert server.receiver.requests == 0

        # The same server, with its certificate trusted, is a working target: the failure was
        # the verification.
        pool = HTTPConnectionPool(reactor_(), persistent=False)
        trusting = HTTPTransport(
            reactor_(),
            client=HTTPClient(
                Agent(reactor_(), contextFactory=TrustOnly(server.cert_pem), pool=pool)
            ),
        )
        result = await outcome_of(
            trusting.send(TargetConfig("faulty", server.base_url, TOKEN), 1, BODY)
        )
        assert isinstance(result, SendOutcome) and result.kind is OutcomeKind.DELIVERED
        assert server.receiver.events == [{"n": 0}]
    finally:
        await transport.close()

    stack = Stack(tmp_path / "relayer.db", server.base_url)
    try:
        await stack.scheduler.start()
        await stack.submit(10)
        s = await stack.faulty_down_with("certificate verify failed")
        assert s.pending_events == 10
        assert server.receiver.events == [{"n": 0}]  # nothing more reached it
        # The healthy target, in the same scheduler, got everything.
        assert stack.healthy.verify(stack.expected["healthy"]).ok
    finally:
        await stack.close()
        await server.close()
