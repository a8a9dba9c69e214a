"""
Wire formats: how one attempt of a transaction becomes an HTTP request.

A target's :attr:`~relayer.TargetConfig.format` names its wire format. Two are built in:

- ``"matrix"`` (:data:`MATRIX`, the default): the Matrix application-service API, one
  ``PUT {base_url}/_matrix/app/v1/transactions/{txn_id}`` per transaction of up to
  ``max_events`` events, with ``Authorization: Bearer {token}``;
- ``"standard-webhooks"`` (:data:`STANDARD_WEBHOOKS`): `Standard Webhooks 1.0
  <https://www.standardwebhooks.com/>`_, one ``POST {base_url}`` per event, its body the event
  as stored, signed with the target's :attr:`~relayer.TargetConfig.secrets`.

A format builds a :class:`WireRequest` for each attempt, from the stored transaction and the
scheduler's clock, and classifies the answer; a transport that provides
:class:`relayer.transport.IRequestTransport` sends the request as it is given.

:func:`sign` and :func:`verify` are the Standard Webhooks signature, for receivers too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
from collections.abc import Iterable
from urllib.parse import quote

import attrs
from zope.interface import Attribute, Interface, implementer

from relayer._version import __version__
from relayer.config import TargetConfig, secret_key
from relayer.errors import InvalidSignature, InvalidTarget
from relayer.store.base import Transaction
from relayer.transport.base import SendOutcome, classify_status, matrix_body

#: The ``User-Agent`` of every request of the built-in formats.
USER_AGENT = f"relayer/{__version__}"

#: How far a webhook's timestamp may be from a receiver's clock, in seconds, by default: the
#: five minutes of the specification.
DEFAULT_TOLERANCE = 300.0

_TRANSACTIONS_PATH = "/_matrix/app/v1/transactions/"
#: The characters a webhook id is sent with as they are: printable ASCII but space and comma.
_ID_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ",%")
_MAX_ID_LENGTH = 255


def _headers_repr(headers: tuple[tuple[str, str], ...]) -> str:
    # Only the names: the values hold tokens and signatures.
    return "<headers " + ", ".join(name for name, _ in headers) + ">"


@attrs.frozen
class WireRequest:
    """
    One HTTP request, as a wire format built it for one attempt of a transaction.

    Its repr shows the header names but never their values, which hold tokens and signatures.

    Attributes:
        method: The HTTP method, such as ``"PUT"`` or ``"POST"``.
        url: The URL to send it to.
        headers: The headers, as ``(name, value)`` pairs, in order.
        body: The body, sent as it is.
        txn_id: The transaction it is an attempt of, for transports and tests that report by
            transaction; None if not given. It is sent only where the format puts it (the
            Matrix format's URL).
    """

    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = attrs.field(repr=_headers_repr)
    body: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    txn_id: int | None = None

    def header(self, name: str) -> str | None:
        """The value of the first header of this name (any case), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class IWireFormat(Interface):
    """
    How a target's transactions go on the wire: the request of each attempt, and what its
    answer means.

    A format's requests for the attempts of one transaction carry the same body; what may
    change from one attempt to the next is what depends on the time (a signed timestamp).
    """

    name = Attribute("The format's name, as TargetConfig.format gives it: 'matrix', ...")
    max_events = Attribute(
        "The most events one request carries (an int >= 1), or None for the target's "
        "max_events. A target's transactions hold at most the smaller of the two."
    )

    def check(target: TargetConfig) -> None:
        """
        Check that the target has what the format needs, when it is registered.

        Raises:
            relayer.errors.InvalidTarget: It lacks something (no secrets, no token, ...); the
                message never shows a secret.
        """

    def request(target: TargetConfig, txn: Transaction, now: float) -> WireRequest:
        """
        The request for one attempt of a transaction.

        Args:
            target: The target's configuration.
            txn: The transaction, as stored: the same events, in the same order, on every
                attempt.
            now: The time of this attempt, in seconds since the epoch, from the scheduler's
                clock.
        """

    def classify(status: int, retry_after: str | None, now: float) -> SendOutcome:
        """
        The outcome of an HTTP answer.

        Args:
            status: The HTTP status code.
            retry_after: The ``Retry-After`` header's value, if any.
            now: The current time, for a ``Retry-After`` date.
        """


def transaction_url(base_url: str, txn_id: int) -> str:
    """
    The URL a Matrix transaction is sent to.

    Args:
        base_url: The target's base URL; a trailing slash is ignored.
        txn_id: The transaction's id.

    Returns:
        ``{base_url}/_matrix/app/v1/transactions/{txn_id}``, with the id percent-encoded.

    Example:
        >>> transaction_url("https://as.example.org/hooks/", 42)
        'https://as.example.org/hooks/_matrix/app/v1/transactions/42'
    """
    return base_url.rstrip("/") + _TRANSACTIONS_PATH + quote(str(txn_id), safe="")


def claim_limits(target: TargetConfig, wire: IWireFormat) -> tuple[int, int]:
    """
    A target's limits on one transaction: its most events and its most bytes.

    The most events is the smaller of the target's ``max_events`` and the format's.
    """
    most = target.max_events
    if wire.max_events is not None:
        most = min(most, wire.max_events)
    return most, target.max_bytes


@implementer(IWireFormat)
@attrs.frozen
class MatrixFormat:
    """
    The Matrix application-service API: one ``PUT`` of ``{"events": [...]}`` per transaction.

    The request is::

        PUT {base_url}/_matrix/app/v1/transactions/{txn_id}
        Authorization: Bearer {token}
        Content-Type: application/json
        User-Agent: relayer/{version}

        {"events":[...]}

    Its body is :func:`relayer.transport.matrix_body` of the transaction's events: the same
    bytes on every attempt.
    """

    name: str = "matrix"
    max_events: int | None = None

    def check(self, target: TargetConfig) -> None:
        """A Matrix target needs its token (which :class:`~relayer.TargetConfig` checks)."""
        if not target.token:
            raise InvalidTarget("token must not be empty: every target needs its access token")

    def request(self, target: TargetConfig, txn: Transaction, now: float) -> WireRequest:
        """The ``PUT`` of the transaction."""
        return self.request_of(target, txn.txn_id, matrix_body(txn.events))

    def request_of(self, target: TargetConfig, txn_id: int, body: bytes) -> WireRequest:
        """The ``PUT`` of a transaction given by its id and its body (:func:`matrix_body`)."""
        return WireRequest(
            "PUT",
            transaction_url(target.base_url, txn_id),
            (
                ("Authorization", "Bearer " + target.token),
                ("Content-Type", "application/json"),
                ("User-Agent", USER_AGENT),
            ),
            body,
            txn_id,
        )

    def classify(self, status: int, retry_after: str | None, now: float) -> SendOutcome:
        """See :func:`relayer.transport.classify_status`."""
        return classify_status(status, retry_after, now)


#: The Matrix application-service format, the default of every target.
MATRIX = MatrixFormat()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """
    The Standard Webhooks signature of a message, with one secret.

    Args:
        secret: The secret, ``whsec_...``.
        msg_id: The ``webhook-id``.
        timestamp: The ``webhook-timestamp``, in whole seconds since the epoch.
        body: The body, as sent.

    Returns:
        ``v1,`` and the standard base64 of the HMAC-SHA256 of ``{msg_id}.{timestamp}.{body}``
        keyed with the secret's key.

    Example:
        >>> sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
        ...      1614265330, b'{"test": 2432232314}')
        'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE='
    """
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_header(secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per secret, in order, space-separated."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def verify(
    secrets: Iterable[str],
    msg_id: str | None,
    timestamp: str | None,
    body: bytes,
    signature: str | None,
    *,
    now: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> None:
    """
    Verify a Standard Webhooks message, as a receiver does.

    It is valid if one of the signatures in ``signature`` (space-separated ``v1,...``) is the
    signature with one of ``secrets``, and, when ``now`` is given, its timestamp is within
    ``tolerance`` seconds of ``now``.

    Args:
        secrets: The secrets the receiver accepts.
        msg_id: The ``webhook-id`` header.
        timestamp: The ``webhook-timestamp`` header.
        body: The body, as received.
        signature: The ``webhook-signature`` header.
        now: The receiver's time, in seconds since the epoch; None not to check the timestamp.
        tolerance: How far the timestamp may be from ``now``, either way.

    Raises:
        relayer.errors.InvalidSignature: A header is missing or not valid, the timestamp is too
            old or too new, or no signature matches.
    """
    if not msg_id or not timestamp or not signature:
        raise InvalidSignature(
            "a webhook needs the webhook-id, webhook-timestamp and webhook-signature headers"
        )
    if not timestamp.isascii() or not timestamp.isdigit():
        raise InvalidSignature("webhook-timestamp is not a whole number of seconds")
    when = int(timestamp)
    if now is not None:
        if when < now - tolerance:
            raise InvalidSignature("webhook-timestamp is too old")
        if when > now + tolerance:
            raise InvalidSignature("webhook-timestamp is too new")
    given = []
    for part in signature.split(" "):
        version, _, encoded = part.partition(",")
        if version != "v1":
            continue
        try:
            given.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    for secret in secrets:
        expected = base64.b64decode(sign(secret, msg_id, when, body)[3:])
        if any(hmac.compare_digest(expected, g) for g in given):
            return
    raise InvalidSignature("no signature of the webhook matches")


def webhook_id(event_id: str) -> str:
    """
    The ``webhook-id`` of an event: its id, percent-encoded if it is not 1 to 255 characters
    of printable ASCII without space, comma or ``%`` (so that no two ids are sent alike).

    An encoded id longer than 255 characters is replaced by ``relayer-sha256-`` and the hex
    SHA-256 of the id. Either way the same event always gets the same webhook id.
    """
    if 1 <= len(event_id) <= _MAX_ID_LENGTH and all(
        " " < c <= "~" and c not in ",%" for c in event_id
    ):
        return event_id
    encoded = quote(event_id, safe=_ID_SAFE)
    if len(encoded) > _MAX_ID_LENGTH:
        return "relayer-sha256-" + hashlib.sha256(event_id.encode("utf-8")).hexdigest()
    return encoded


@implementer(IWireFormat)
@attrs.frozen
class StandardWebhooksFormat:
    """
    `Standard Webhooks 1.0 <https://www.standardwebhooks.com/>`_: one signed ``POST`` per event.

    The request is::

        POST {base_url}
        Content-Type: application/json
        User-Agent: relayer/{version}
        webhook-id: {the event's id}
        webhook-timestamp: {the attempt's time, whole seconds}
        webhook-signature: v1,{signature} [v1,{signature with the next secret} ...]
        Authorization: Bearer {token}          (only if the target has a token)

        {the event, as stored}

    The URL is the target's ``base_url`` exactly. The ``webhook-id`` is the event's id (the
    application's, or ``relayer-{n}``): the same on every attempt and after restarts, so that
    a receiver can drop repeats. The timestamp is the time of each attempt, on the scheduler's
    clock, and the signature is computed anew with it: a retry hours later is still within a
    receiver's tolerance. Each secret of the target signs, in order: during a rotation, a
    receiver that knows either secret verifies the message.
    """

    name: str = "standard-webhooks"
    max_events: int | None = 1

    def check(self, target: TargetConfig) -> None:
        """A webhook target needs at least one secret."""
        if not target.secrets:
            raise InvalidTarget(
                f"target {target.target_id!r} uses the {self.name!r} wire format, which needs "
                "at least one secret to sign with: secrets=['whsec_...']"
            )
        for secret in target.secrets:
            secret_key(secret)

    def request(self, target: TargetConfig, txn: Transaction, now: float) -> WireRequest:
        """The signed ``POST`` of the transaction's one event."""
        if txn.n_events != 1:
            raise ValueError(f"a webhook carries one event, not {txn.n_events}")
        body = txn.events[0]
        msg_id = webhook_id(txn.event_ids[0])
        timestamp = math.floor(now)
        headers: list[tuple[str, str]] = [
            ("Content-Type", "application/json"),
            ("User-Agent", USER_AGENT),
            ("webhook-id", msg_id),
            ("webhook-timestamp", str(timestamp)),
            ("webhook-signature", signature_header(target.secrets, msg_id, timestamp, body)),
        ]
        if target.token:
            headers.append(("Authorization", "Bearer " + target.token))
        return WireRequest("POST", target.base_url, tuple(headers), body, txn.txn_id)

    def classify(self, status: int, retry_after: str | None, now: float) -> SendOutcome:
        """
        See :func:`relayer.transport.classify_status`; a 401 or 403 says to check the secrets.
        """
        outcome = classify_status(status, retry_after, now)
        if status in (401, 403):
            outcome = attrs.evolve(
                outcome,
                reason=f"HTTP {status} (the target refused the request's signature or token: "
                "check the target's secrets and token)",
            )
        return outcome


#: The Standard Webhooks format.
STANDARD_WEBHOOKS = StandardWebhooksFormat()

#: The built-in formats, by name.
BUILTIN_FORMATS: dict[str, IWireFormat] = {
    MATRIX.name: MATRIX,
    STANDARD_WEBHOOKS.name: STANDARD_WEBHOOKS,
}


__all__ = [
    "BUILTIN_FORMATS",
    "DEFAULT_TOLERANCE",
    "IWireFormat",
    "MATRIX",
    "MatrixFormat",
    "STANDARD_WEBHOOKS",
    "StandardWebhooksFormat",
    "USER_AGENT",
    "WireRequest",
    "claim_limits",
    "secret_key",
    "sign",
    "signature_header",
    "transaction_url",
    "verify",
    "webhook_id",
]
