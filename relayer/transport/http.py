"""
The default transport: HTTP on treq, for every wire format.

It sends the requests that a target's wire format builds (:mod:`relayer.formats`). For the
Matrix application-service API, the default, a transaction is sent as::

    PUT {base_url}/_matrix/app/v1/transactions/{txn_id}
    Authorization: Bearer {token}
    Content-Type: application/json

    {"events":[...]}

The body is sent exactly as stored, so a retry of a transaction carries the same bytes as its
first attempt. The response's status decides the outcome, as the format classifies it (see
:func:`relayer.transport.classify_status`); its body is read only up to a limit, and only so
that the connection can be reused and a short snippet can be shown in the outcome's reason.

An attempt that ends without a response (connection refused, a reset, a timeout, an invalid
response) fails with :class:`HTTPSendError`, whose message never holds the target's token or
secrets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

if TYPE_CHECKING:
    from relayer.formats import IWireFormat, WireRequest

# relayer.formats imports relayer.transport.base, and so this package: it is imported as a
# module, whose names are looked up when they are used.
from relayer import _logevents as ev
from relayer import formats as _formats
from relayer._scrub import REDACTED, hidden_values, scrub_target, without_token_start
from relayer.config import TargetConfig
from relayer.errors import ConfigurationError, RelayerError
from relayer.transport.base import IRequestTransport, ITransport, SendOutcome

#: The default cap on how much of a response body is read, in bytes (64 KiB).
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024

#: How many bytes of a response body are kept for the reason of a failed attempt.
SNIPPET_BYTES = 200

#: How many idle connections per host the default connection pool keeps for reuse (Twisted's
#: own default is 2). Targets that share a host each have a request in flight at a time, and
#: without enough kept connections most requests would open a new one.
DEFAULT_PERSISTENT_PER_HOST = 100


class _QuietClientFactory(webclient._HTTP11ClientFactory):
    """Twisted's HTTP/1.1 client factory, which does not log each connection it starts and stops."""

    noisy = False


class _QuietConnectionPool(webclient.HTTPConnectionPool):
    """
    A persistent connection pool, as Twisted's, whose connections are made quietly.

    Twisted's pool makes a factory per new connection, which logs ``Starting factory`` and
    ``Stopping factory`` at INFO: with many targets, or one retried while it is DOWN, those
    lines would flood the log. Nothing else differs.
    """

    _factory = _QuietClientFactory


class IHTTPReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    What :class:`HTTPTransport` needs of a reactor.

    Time (for request timeouts and ``Retry-After`` dates), and TCP with name resolution for the
    default :class:`twisted.web.client.Agent`. The global reactor provides all of these; with
    an injected ``client``, only :class:`~twisted.internet.interfaces.IReactorTime` is used.
    """


class HTTPSendError(RelayerError):
    """
    An attempt to send a transaction ended without an HTTP response.

    The scheduler treats it as a transient failure and retries the transaction. The message
    says what went wrong and where (the method and URL); it never holds the target's token or
    secrets, nor the underlying exception, which is not chained to it for that reason.

    Attributes:
        url: The URL of the request.
        reason: A short description, such as ``connection refused``.
        timed_out: True if the attempt took longer than the target's ``request_timeout``.
        method: The method of the request, such as ``PUT``.
    """

    def __init__(self, url: str, reason: str, timed_out: bool = False, method: str = "PUT") -> None:
        super().__init__(f"{method} {url} failed: {reason}")
        self.url = url
        self.reason = reason
        self.timed_out = timed_out
        self.method = method


@implementer(IBodyProducer)
class _BytesProducer:
    """
    Produces a request body from bytes already in memory, in one write.

    treq's default producer for bytes goes through a cooperator bound to the global reactor;
    this one needs no reactor at all, and lets the agent send a ``Content-Length``.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@attrs.frozen
class _Body:
    """What was read of a response body: its first bytes, and how much there was."""

    snippet: bytes
    size: int
    complete: bool


class _BoundedBodyReader(Protocol):
    """
    Reads a response body, keeping only its first bytes, and gives up past a limit.

    Reading the body to its end lets the connection go back to the pool. Past ``limit`` bytes
    the reader stops the transport, which closes the connection, and reports what it has.
    """

    def __init__(self, limit: int, keep: int, finished: Deferred[_Body]) -> None:
        self._limit = limit
        self._keep = keep
        self._finished = finished
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._size = 0
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._kept_size < self._keep:
            piece = data[: self._keep - self._kept_size]
            self._kept.append(piece)
            self._kept_size += len(piece)
        if self._size > self._limit:
            self._finish(complete=False)
            self.stop()

    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:  # noqa: B008
        if not self._done:
            # ResponseDone is a normal end; PotentialDataLoss is the end of a body without a
            # length. Anything else cut the body short, which does not matter here: the
            # status has already decided the outcome.
            complete = reason.check(webclient.ResponseDone, webclient.PotentialDataLoss) is not None
            self._finish(complete=complete)

    def stop(self) -> None:
        """Stop reading: the connection is closed rather than reused."""
        self._done = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _finish(self, complete: bool) -> None:
        self._done = True
        if not self._finished.called:
            self._finished.callback(_Body(b"".join(self._kept), self._size, complete))


def _read_body(response: IResponse, limit: int, keep: int) -> Deferred[_Body]:
    reader: _BoundedBodyReader | None = None

    def cancel(d: Deferred[_Body]) -> None:
        if reader is not None:
            reader.stop()

    finished: Deferred[_Body] = Deferred(cancel)
    reader = _BoundedBodyReader(limit, keep, finished)
    response.deliverBody(reader)
    return finished


def _cancelled(exc: BaseException) -> bool:
    """Whether a request failed because it was cancelled."""
    if isinstance(exc, (CancelledError, ierror.ConnectingCancelledError)):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(
        isinstance(r, Failure) and r.check(CancelledError, ierror.ConnectingCancelledError)
        for r in reasons
    )


def _describe(exc: BaseException) -> str:
    """A short description of why a request failed."""
    if isinstance(exc, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ierror.DNSLookupError):
        return "the host name could not be resolved"
    if isinstance(exc, (ierror.TimeoutError, ierror.TCPTimedOutError)):
        return "connecting timed out"
    if isinstance(exc, webclient.ResponseNeverReceived):
        return "the connection was lost before a response: " + _reasons(exc)
    if isinstance(exc, webclient.RequestTransmissionFailed):
        return "the request could not be sent: " + _reasons(exc)
    if isinstance(exc, webclient.ResponseFailed):
        return "the response was cut short or not valid: " + _reasons(exc)
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _reasons(exc: Any) -> str:
    reasons = getattr(exc, "reasons", None) or []
    parts = []
    for reason in reasons:
        value = reason.value if isinstance(reason, Failure) else reason
        text = str(value)
        name = type(value).__name__
        parts.append(f"{name}: {text}" if text else name)
    return "; ".join(parts) or type(exc).__name__


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


@attrs.define
class _Attempt:
    """Whether an attempt's deadline has passed."""

    timed_out: bool = False


def _outcome_or_failure(result: SendOutcome | HTTPSendError) -> SendOutcome | Failure:
    if isinstance(result, HTTPSendError):
        return Failure(result)
    return result


@implementer(ITransport, IRequestTransport)
class HTTPTransport:
    """
    Sends the requests of targets' wire formats over HTTP (:mod:`relayer.formats`): for the
    Matrix application-service API, the default, a ``PUT`` per transaction.

    One instance serves every target; connections are kept alive and reused, per host, by the
    client's connection pool. TLS certificates are verified, by the default agent's policy.

    Args:
        reactor: The reactor: its clock times requests out, and, without ``client``, it makes
            the connections.
        client: The treq client to send with. By default, a client on an
            :class:`twisted.web.client.Agent` with a persistent connection pool, which
            :meth:`close` closes.
        max_response_bytes: How much of a response body is read at most. A longer body is not
            read further: the connection is closed instead of being reused.
        max_persistent_per_host: How many idle connections per host the default connection
            pool keeps for reuse, at least 1 (:data:`DEFAULT_PERSISTENT_PER_HOST` by default).
            Raise it when more targets than that share one host: each has a request in flight
            at a time, and a request that finds no idle connection opens a new one. It cannot
            be given with ``client``, whose pool is the caller's own.

    Example:
        >>> transport = HTTPTransport(reactor)  # doctest: +SKIP
        >>> scheduler = Scheduler(reactor, store, transport, targets=[...])  # doctest: +SKIP
    """

    log = Logger(namespace="relayer.transport.http")

    def __init__(
        self,
        reactor: IHTTPReactor,
        client: HTTPClient | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_persistent_per_host: int | None = None,
    ) -> None:
        if max_persistent_per_host is not None and client is not None:
            raise ConfigurationError(
                "max_persistent_per_host sets the default connection pool; it cannot be given "
                "with client, whose pool is the caller's own"
            )
        if max_persistent_per_host is None:
            max_persistent_per_host = DEFAULT_PERSISTENT_PER_HOST
        # Twisted's pool fails on every response when it may keep no connection at all.
        if (
            isinstance(max_persistent_per_host, bool)
            or not isinstance(max_persistent_per_host, int)
            or max_persistent_per_host < 1
        ):
            raise ConfigurationError(
                f"max_persistent_per_host must be an int >= 1, not {max_persistent_per_host!r}"
            )
        if (
            isinstance(max_response_bytes, bool)
            or not isinstance(max_response_bytes, int)
            or max_response_bytes < 0
        ):
            raise ConfigurationError(
                f"max_response_bytes must be an int >= 0, not {max_response_bytes!r}"
            )
        self._reactor = reactor
        self._pool: webclient.HTTPConnectionPool | None = None
        if client is None:
            self._pool = _QuietConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = max_persistent_per_host
            client = HTTPClient(webclient.Agent(reactor, pool=self._pool))
        self._client = client
        self._max_response_bytes = max_response_bytes

    def __repr__(self) -> str:
        return f"<HTTPTransport max_response_bytes={self._max_response_bytes}>"

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        """
        Send one transaction to a target, in the Matrix format.

        The same as :meth:`send_request` with the Matrix request of the transaction
        (:class:`relayer.formats.MatrixFormat`).

        Args:
            target: The target: its base URL, token and request timeout.
            txn_id: The transaction's id.
            body: The transaction's wire bytes, sent unchanged.

        Returns:
            A Deferred that fires with the :class:`~relayer.transport.SendOutcome` classified
            from the response's status, or fails with :class:`HTTPSendError` if there was no
            response in time. Cancelling it abandons the request.

        Raises:
            TypeError: ``txn_id`` is not an int or ``body`` is not bytes.
        """
        if isinstance(txn_id, bool) or not isinstance(txn_id, int):
            raise TypeError(f"txn_id must be an int, not {type(txn_id).__name__}")
        if not isinstance(body, bytes):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        matrix = _formats.MATRIX
        return self.send_request(target, matrix.request_of(target, txn_id, body), matrix)

    def send_request(
        self, target: TargetConfig, request: WireRequest, wire_format: IWireFormat
    ) -> Deferred[SendOutcome]:
        """
        Send one request, as it is given, and classify the answer with its wire format.

        Redirects are not followed: a 3xx is an answer, classified as any other.

        Args:
            target: The target: its request timeout, and the token and secrets kept out of
                every message.
            request: The request.
            wire_format: The format that built it.

        Returns:
            A Deferred that fires with the :class:`~relayer.transport.SendOutcome` that
            ``wire_format.classify`` gives the response, or fails with :class:`HTTPSendError`
            if there was no response in time. Cancelling it abandons the request.

        Raises:
            TypeError: ``request`` is not a :class:`~relayer.formats.WireRequest`.
        """
        if not isinstance(request, _formats.WireRequest):
            raise TypeError(f"request must be a WireRequest, not {type(request).__name__}")
        attempt = _Attempt()
        d = Deferred.fromCoroutine(self._send(target, request, wire_format, attempt)).addCallback(
            _outcome_or_failure
        )
        if d.called:
            return d
        timer = self._reactor.callLater(target.request_timeout, self._expire, attempt, d)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    @staticmethod
    def _expire(attempt: _Attempt, d: Deferred[SendOutcome]) -> None:
        attempt.timed_out = True
        d.cancel()

    async def _send(
        self,
        target: TargetConfig,
        request: WireRequest,
        wire_format: IWireFormat,
        attempt: _Attempt,
    ) -> SendOutcome | HTTPSendError:
        url = request.url
        method = request.method
        headers = Headers()
        for name, value in request.headers:
            headers.addRawHeader(name.encode("ascii"), value.encode("latin-1"))
        failure: HTTPSendError | None = None
        try:
            response = await self._client.request(
                method,
                url,
                headers=headers,
                data=_BytesProducer(request.body),
                # A redirect would carry the token to another URL: a 3xx is an answer.
                allow_redirects=False,
                unbuffered=True,
                reactor=self._reactor,  # type: ignore[arg-type]
            )
        except Exception as e:
            if attempt.timed_out:
                failure = self._timeout(target, url, method)
            elif _cancelled(e):
                # The caller cancelled the attempt: that goes on up as a cancellation.
                raise CancelledError() from None
            else:
                failure = HTTPSendError(url, scrub_target(_describe(e), target), method=method)
        if failure is not None:
            # Returned rather than raised, so that the original exception, whose text is not
            # under our control, is not chained to it as its __context__.
            return failure

        status = response.code
        retry_after = response.headers.getRawHeaders(b"Retry-After")
        answered_at = self._reactor.seconds()
        hidden = hidden_values(target)
        # The longest secret's length more than the snippet is kept, so that a secret the
        # snippet's end would cut in two is whole, and scrubbed.
        longest = max((len(h) for h in hidden), default=0)
        body_d = _read_body(response, self._max_response_bytes, SNIPPET_BYTES + longest)
        read: _Body | None = None
        try:
            read = await body_d
        except CancelledError:
            # The deadline passed while the body was arriving: the status has been received,
            # and it decides the outcome. A cancellation from the caller goes on up.
            if not attempt.timed_out:
                raise
        # Classified once the body is read, so that a format that fails here (a plugin's) does
        # not leave the response unread and its connection open.
        outcome = wire_format.classify(
            status, retry_after[0].decode("latin-1") if retry_after else None, answered_at
        )
        self.log.debug(
            "{method} {url} -> {status} ({size} body bytes read)",
            relayer_event=ev.HTTP_RESPONSE,
            target=target.target_id,
            method=method,
            # A plugin format's query string may hold a secret: it is never logged.
            url=scrub_target(url.split("?", 1)[0].split("#", 1)[0], target, 2000),
            status=status,
            size=read.size if read is not None else 0,
        )
        if outcome.reason and read is not None and read.snippet and not 200 <= status < 300:
            text = _printable(read.snippet)
            for value in hidden:
                text = text.replace(value, REDACTED)
            if read.size > len(read.snippet):
                # The kept bytes may end in the first part of a secret: drop it.
                for value in hidden:
                    text = without_token_start(text, value)
            snippet = scrub_target(text, target, SNIPPET_BYTES)
            if snippet:
                outcome = attrs.evolve(outcome, reason=f"{outcome.reason}: {snippet}")
        return outcome

    @staticmethod
    def _timeout(target: TargetConfig, url: str, method: str) -> HTTPSendError:
        return HTTPSendError(
            url,
            f"no response within the request timeout of {target.request_timeout:g}s",
            True,
            method,
        )

    def close(self) -> Deferred[None]:
        """
        Close the idle connections of the transport's own connection pool.

        With an injected ``client``, the client's owner closes its connections, and this does
        nothing.
        """
        if self._pool is None:
            return succeed(None)
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d


def transaction_url(base_url: str, txn_id: int) -> str:
    """The URL a Matrix transaction is sent to: see :func:`relayer.formats.transaction_url`."""
    return _formats.transaction_url(base_url, txn_id)


__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "HTTPSendError",
    "HTTPTransport",
    "IHTTPReactor",
    "transaction_url",
]
