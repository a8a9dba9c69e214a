"""
The transport interface, and the outcome of one attempt to send a transaction.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

from relayer import _encoding
from relayer.config import TargetConfig

if TYPE_CHECKING:
    from relayer.formats import IWireFormat, WireRequest


class OutcomeKind(enum.Enum):
    """How an attempt to send a transaction ended."""

    #: The target accepted the transaction.
    DELIVERED = "delivered"
    #: The target accepted the transaction and will confirm it later, through another channel
    #: (:meth:`relayer.Scheduler.confirm`); it is sent again if the confirmation does not come
    #: within the target's ``confirmation_timeout``.
    ACCEPTED = "accepted"
    #: A transient failure; the target is marked DOWN and retried with backoff.
    RETRY = "retry"
    #: The target refused the transaction as too large; it is split, if it can be.
    TOO_LARGE = "too_large"
    #: The target refused the transaction for good; the target's failure policy applies.
    PERMANENT = "permanent"


class FailureClass(enum.Enum):
    """
    What kind of failure an attempt met: what a :class:`relayer.IRetryPolicy` decides on, and
    what observers and metrics count by. The values are stable names, fit for a metric's label.
    """

    #: No response within the target's request timeout.
    TIMEOUT = "timeout"
    #: No response: the connection was refused, reset or lost, a name did not resolve, TLS failed.
    CONNECTION = "connection"
    #: 429 Too Many Requests, or 503 Service Unavailable (both honour ``Retry-After``).
    RATE_LIMITED = "rate_limited"
    #: Another 5xx.
    SERVER_ERROR = "server_error"
    #: 401 or 403: the target refused the token or the signature.
    UNAUTHORIZED = "unauthorized"
    #: 404: the target has no such endpoint.
    NOT_FOUND = "not_found"
    #: 413: the target refused the transaction as too large.
    TOO_LARGE = "too_large"
    #: 400 or 422: the target refused the content for good.
    REJECTED = "rejected"
    #: Any other answer that is not a success: another 4xx, a 1xx or a 3xx.
    CLIENT_ERROR = "client_error"
    #: A transient failure that the transport did not classify further.
    TRANSIENT = "transient"
    #: A permanent failure that the transport did not classify further.
    PERMANENT = "permanent"


_DEFAULT_CLASSES = {
    "retry": FailureClass.TRANSIENT,
    "too_large": FailureClass.TOO_LARGE,
    "permanent": FailureClass.PERMANENT,
}


@attrs.frozen
class SendOutcome:
    """
    The outcome of one attempt to send a transaction.

    A transport reports an attempt that ended in a response (any response) as a ``SendOutcome``.
    An attempt that failed with an exception (connection refused, a timeout, a reset) is a
    transient failure: the scheduler treats it as :attr:`OutcomeKind.RETRY`.

    Attributes:
        kind: How it ended.
        reason: A short description for logs and status, such as ``HTTP 503``; never a secret.
        retry_after: For RETRY, the delay in seconds the target asked for, or None.
        failure: For a failure, its class, or None to have it derived from ``kind``
            (see :attr:`failure_class`).
    """

    kind: OutcomeKind
    reason: str = ""
    retry_after: float | None = None
    failure: FailureClass | None = None

    @property
    def failure_class(self) -> FailureClass | None:
        """
        The class of a failure: ``failure`` if given, else TRANSIENT for RETRY, TOO_LARGE for
        TOO_LARGE and PERMANENT for PERMANENT; None for a success.
        """
        if self.failure is not None:
            return self.failure
        return _DEFAULT_CLASSES.get(self.kind.value)

    @classmethod
    def delivered(cls, reason: str = "") -> SendOutcome:
        """The target accepted the transaction."""
        return cls(OutcomeKind.DELIVERED, reason)

    @classmethod
    def accepted(cls, reason: str = "") -> SendOutcome:
        """The target accepted the transaction; its confirmation comes later."""
        return cls(OutcomeKind.ACCEPTED, reason)

    @classmethod
    def retry(cls, reason: str, retry_after: float | None = None) -> SendOutcome:
        """A transient failure, retried after the backoff (or ``retry_after`` seconds)."""
        return cls(OutcomeKind.RETRY, reason, retry_after)

    @classmethod
    def too_large(cls, reason: str) -> SendOutcome:
        """The target refused the transaction as too large."""
        return cls(OutcomeKind.TOO_LARGE, reason)

    @classmethod
    def permanent(cls, reason: str) -> SendOutcome:
        """The target refused the transaction for good."""
        return cls(OutcomeKind.PERMANENT, reason)


class ITransport(Interface):
    """
    Sends a transaction to a target.

    A transport sends the body as it is given: the Matrix framing of the transaction's stored
    events, built the same way on every attempt, so a retry of the same transaction carries
    the same bytes. Only one transaction is in flight
    per target at a time; transactions to different targets are sent concurrently.
    """

    def send(target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        """
        Send one transaction.

        Args:
            target: The target's configuration (its URL, token and request timeout).
            txn_id: The transaction's id, unique per target.
            body: The transaction's wire bytes, the JSON document ``{"events": [...]}``
                (see :func:`matrix_body`).

        Returns:
            A Deferred that fires with the attempt's :class:`SendOutcome`, or fails with the
            exception that stopped it, which counts as a transient failure. Cancelling the
            Deferred abandons the attempt.
        """


class IRequestTransport(Interface):
    """
    Sends the request that a target's wire format built (see :mod:`relayer.formats`).

    A transport that provides it serves targets of every wire format; one that provides only
    :class:`ITransport` serves targets of the Matrix format only, and the scheduler refuses
    a target of another format with it. When a transport provides both, the scheduler sends
    with :meth:`send_request`, for every format. As with :class:`ITransport`, only one
    request is in flight per target at a time.
    """

    def send_request(
        target: TargetConfig, request: WireRequest, wire_format: IWireFormat
    ) -> Deferred[SendOutcome]:
        """
        Send one request, as it is given.

        Args:
            target: The target's configuration (its request timeout, and its token and
                secrets, which the transport keeps out of every message).
            request: The request: method, URL, headers and body.
            wire_format: The format that built it, whose
                :meth:`~relayer.formats.IWireFormat.classify` classifies the answer.

        Returns:
            A Deferred that fires with the attempt's :class:`SendOutcome`, or fails with the
            exception that stopped it, which counts as a transient failure. Cancelling the
            Deferred abandons the attempt.
        """


def matrix_body(events: Sequence[bytes]) -> bytes:
    """
    The Matrix application-service framing of a transaction's events: ``{"events": [...]}``.

    The events are the stored, encoded events, joined as they are: the same events always
    give the same bytes.
    """
    return _encoding.transaction_body(_encoding.join_events(events))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    Parse an HTTP ``Retry-After`` header value into a delay in seconds.

    Args:
        value: The header's value: a whole number of seconds, or an HTTP date.
        now: The current time, as seconds since the epoch, for an HTTP date.

    Returns:
        The delay, at least 0; None if the value is missing or not valid.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    delay = when.timestamp() - now
    return max(0.0, delay) if math.isfinite(delay) else None


def classify_status(status: int, retry_after: str | None = None, now: float = 0.0) -> SendOutcome:
    """
    Classify an HTTP status code.

    ======================================  ==============================================
    Status                                  Outcome
    ======================================  ==============================================
    2xx                                     delivered
    408, 429, 5xx                           retried; 429 and 503 honour ``Retry-After``
    401, 403, 404                           retried: a fault of the target's registration
                                            (a wrong token, a wrong base URL), not of the
                                            events; the reason says so
    413                                     too large: a transaction of several events is
                                            split; one event alone is permanent
    400, 422                                permanent: the target refuses the content; its
                                            failure policy decides what happens
    any other 4xx (405, 409, 410, ...)      retried, as Synapse retries any non-2xx
    anything else (1xx, 3xx: redirects      retried, since it is more likely a
    are not followed)                       misconfiguration that will be fixed than a
                                            verdict on the transaction
    ======================================  ==============================================

    Only an answer about the content itself is permanent: an answer about who is asking, or
    where, would dead-letter every event at full speed, and a later replay would deliver them
    out of order.
    """
    reason = f"HTTP {status}"
    if 200 <= status < 300:
        return SendOutcome.delivered(reason)
    if status in (429, 503):
        delay = parse_retry_after(retry_after, now)
        return SendOutcome(OutcomeKind.RETRY, reason, delay, FailureClass.RATE_LIMITED)
    if status == 413:
        return SendOutcome(OutcomeKind.TOO_LARGE, reason, failure=FailureClass.TOO_LARGE)
    if status in PERMANENT_STATUSES:
        return SendOutcome(OutcomeKind.PERMANENT, reason, failure=FailureClass.REJECTED)
    hint = _CONFIGURATION_HINTS.get(status)
    if status in (401, 403):
        failure = FailureClass.UNAUTHORIZED
    elif status == 404:
        failure = FailureClass.NOT_FOUND
    elif 500 <= status < 600:
        failure = FailureClass.SERVER_ERROR
    else:
        failure = FailureClass.CLIENT_ERROR
    return SendOutcome(OutcomeKind.RETRY, f"{reason} ({hint})" if hint else reason, None, failure)


#: The statuses that refuse a transaction's content for good: the failure policy applies.
PERMANENT_STATUSES = frozenset({400, 422})

_CONFIGURATION_HINTS = {
    401: "the target refused the token: check the target's token",
    403: "the target refused the token: check the target's token",
    404: "the target has no such endpoint: check the target's base URL",
}
