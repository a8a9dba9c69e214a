"""
Configuration of targets and of their retry behaviour.

All configuration objects are frozen attrs classes whose validators raise
:class:`relayer.errors.ConfigurationError` (or its subclass
:class:`relayer.errors.InvalidTarget`) at construction, with a message that says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import re
from collections.abc import Callable
from typing import Any, Union
from urllib.parse import urlsplit

import attrs

from relayer.errors import ConfigurationError, InvalidTarget

#: Default cap on the number of events in one transaction.
DEFAULT_MAX_EVENTS = 100
#: Default cap on the encoded size of one transaction, in bytes (1 MiB).
DEFAULT_MAX_BYTES = 1024 * 1024
#: Default time, in seconds, that one HTTP request may take before it counts as a timeout.
DEFAULT_REQUEST_TIMEOUT = 30.0

_MAX_EVENTS_LIMIT = 100_000
_MIN_BYTES = 64
_MAX_BYTES_LIMIT = 1024 * 1024 * 1024
_MAX_SECONDS = 7 * 24 * 3600.0


def _number(error: type[ConfigurationError], name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number, not {type(value).__name__}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise error(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _seconds(error: type[ConfigurationError], name: str, low: float, value: Any) -> None:
    v = _number(error, name, value)
    if not (low < v <= _MAX_SECONDS):
        raise error(
            f"{name} must be more than {low:g} and at most {_MAX_SECONDS:g} seconds, not {v!r}"
        )


def _integer(error: type[ConfigurationError], name: str, low: int, high: int, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an int, not {type(value).__name__}")
    if not (low <= value <= high):
        raise error(f"{name} must be from {low} to {high}, not {value}")


class FailurePolicy(enum.Enum):
    """
    What a target does with a transaction that failed permanently.

    A permanent failure is an answer about the content of a transaction: a 400 or a 422, or a
    413 for a transaction that holds a single event. Every other failure is retried with
    backoff: 401 and 403 (a wrong token) and 404 (a wrong base URL) are faults of the target's
    registration, not of its events, and mark the target DOWN, with ``last_error`` saying what
    the target answered; so do the other 4xx (405, 409, 410, ...), 408, 429 and 5xx, as
    Synapse backs off on any answer that is not a 2xx.
    """

    #: Move the transaction to the dead letters (kept in the store, listed by
    #: :meth:`relayer.Scheduler.dead_letters`, replayable with :meth:`relayer.Scheduler.replay`)
    #: and go on with the next one. This is the default.
    DEAD_LETTER = "dead_letter"
    #: Keep the transaction at the head of the target's queue and stop delivering to the target
    #: (state ``BLOCKED``) until :meth:`relayer.Scheduler.wake` is called.
    BLOCK = "block"


def _draw(random: Callable[[], float]) -> float:
    """
    A draw from a jitter source, within ``[0, 1]`` whatever the source returns.

    A source out of range, or one that returns NaN, cannot take a delay out of its bounds.
    """
    r = random()
    return min(max(r, 0.0), 1.0) if r == r else 0.0


def _backoff_number(name: str, low: float, inclusive: bool) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        v = _number(ConfigurationError, f"backoff {name}", value)
        if v < low or (v == low and not inclusive):
            op = ">=" if inclusive else ">"
            raise ConfigurationError(f"backoff {name} must be {op} {low:g}, not {v!r}")
        if v > _MAX_SECONDS:
            raise ConfigurationError(f"backoff {name} must be at most {_MAX_SECONDS:g}, not {v!r}")

    return check


@attrs.frozen
class BackoffPolicy:
    """
    Exponential backoff with jitter and a cap, per target.

    After the ``n``-th consecutive failure (``n`` >= 1) the next attempt waits::

        base = min(initial * multiplier ** (n - 1), maximum)
        delay = base * (1 - jitter * r)

    where ``r`` is drawn from the scheduler's jitter source, uniform in ``[0, 1)``. The delay
    therefore lies in ``[base * (1 - jitter), base]`` and never exceeds ``maximum``. The defaults
    follow Synapse's application-service recoverer: 2 s, doubling, capped at 512 s; relayer adds
    up to 20% of jitter so that targets that failed together do not retry together.

    Attributes:
        initial: The delay after the first failure, in seconds. Default 2.
        multiplier: The factor by which the delay grows with each further failure. Default 2.
        maximum: The cap on the delay, in seconds; also the cap on a ``Retry-After``. Default 512.
        jitter: The fraction of the delay that is randomised, from 0 (none) to below 1. Default 0.2.
    """

    initial: float = attrs.field(default=2.0, validator=_backoff_number("initial", 0.0, False))
    multiplier: float = attrs.field(default=2.0, validator=_backoff_number("multiplier", 1.0, True))
    maximum: float = attrs.field(default=512.0, validator=_backoff_number("maximum", 0.0, False))
    jitter: float = attrs.field(default=0.2)

    @jitter.validator
    def _check_jitter(self, attribute: Any, value: Any) -> None:
        v = _number(ConfigurationError, "backoff jitter", value)
        if not (0.0 <= v < 1.0):
            raise ConfigurationError(f"backoff jitter must be from 0 to below 1, not {v!r}")

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.initial:
            raise ConfigurationError(
                f"backoff maximum ({self.maximum!r}) must not be below initial ({self.initial!r})"
            )

    @classmethod
    def constant(cls, delay: float) -> BackoffPolicy:
        """A policy that always waits ``delay`` seconds, without jitter."""
        return cls(initial=delay, multiplier=1.0, maximum=delay, jitter=0.0)

    def base_delay(self, failures: int) -> float:
        """The delay after ``failures`` consecutive failures, before jitter."""
        if failures < 1:
            return 0.0
        try:
            base = self.initial * float(self.multiplier) ** (failures - 1)
        except OverflowError:
            return self.maximum
        return min(base, self.maximum)

    def delay(self, failures: int, random: Callable[[], float]) -> float:
        """
        The delay after ``failures`` consecutive failures, with jitter.

        Args:
            failures: How many consecutive failures the target has had, 1 or more.
            random: The jitter source; returns a float in ``[0, 1)``.
        """
        return self.base_delay(failures) * (1.0 - self.jitter * _draw(random))


def _check_delays(instance: Any, attribute: Any, value: Any) -> None:
    if not value:
        raise ConfigurationError("a delay schedule needs at least one delay")
    if len(value) > 1000:
        raise ConfigurationError(f"a delay schedule holds at most 1000 delays, not {len(value)}")
    for i, delay in enumerate(value):
        v = _number(ConfigurationError, f"delay {i + 1} of the schedule", delay)
        if not (0.0 <= v <= _MAX_SECONDS):
            raise ConfigurationError(
                f"delay {i + 1} of the schedule must be from 0 to {_MAX_SECONDS:g} seconds, "
                f"not {v!r}"
            )


def _to_delays(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


@attrs.frozen
class DelaySchedule:
    """
    A fixed list of delays between retries, as webhook senders publish theirs.

    After the ``n``-th consecutive failure the next attempt waits ``delays[n - 1]``; once the
    list is used up, its last delay repeats. With ``jitter``, each delay is shortened by up to
    that fraction, as :class:`BackoffPolicy` does. For example, a schedule of 5 seconds, 5
    minutes, 30 minutes, 2 hours, 5 hours and then 10 hours::

        DelaySchedule((5, 300, 1800, 7200, 18000, 36000))

    Pair it with a :class:`relayer.GiveUp` rule to stop after the last one.

    Attributes:
        delays: The delays, in seconds, each from 0 to 7 days (a retry waits at least 0.01 seconds).
        jitter: The fraction of each delay that is randomised, from 0 (the default) to below 1.
    """

    delays: tuple[float, ...] = attrs.field(converter=_to_delays, validator=_check_delays)
    jitter: float = attrs.field(default=0.0)

    @jitter.validator
    def _check_jitter(self, attribute: Any, value: Any) -> None:
        v = _number(ConfigurationError, "schedule jitter", value)
        if not (0.0 <= v < 1.0):
            raise ConfigurationError(f"schedule jitter must be from 0 to below 1, not {v!r}")

    @property
    def initial(self) -> float:
        """The shortest delay: the least a ``Retry-After`` can make a retry wait."""
        return float(min(self.delays))

    @property
    def maximum(self) -> float:
        """The longest delay: the most a ``Retry-After`` can make a retry wait."""
        return float(max(self.delays))

    def base_delay(self, failures: int) -> float:
        """The delay after ``failures`` consecutive failures, before jitter."""
        if failures < 1:
            return 0.0
        return float(self.delays[min(failures, len(self.delays)) - 1])

    def delay(self, failures: int, random: Callable[[], float]) -> float:
        """The delay after ``failures`` consecutive failures, with jitter."""
        return self.base_delay(failures) * (1.0 - self.jitter * _draw(random))


#: A backoff: exponential, or a fixed schedule.
Backoff = Union[BackoffPolicy, DelaySchedule]  # noqa: UP007 - a runtime alias


def _check_target_id(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidTarget(f"target_id must be a str, not {type(value).__name__}")
    if not value or len(value) > 255:
        raise InvalidTarget(f"target_id must be 1 to 255 characters long, not {len(value)}")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidTarget(f"target_id {value!r} holds a control character or a lone surrogate")


def _check_base_url(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidTarget(f"base_url must be a str, not {type(value).__name__}")
    # Credentials in the URL are refused before anything else, and never echoed.
    authority = value.split("://", 1)[-1].split("/", 1)[0]
    if "@" in authority:
        raise InvalidTarget("base_url must not hold credentials; give the token as token=")
    # A query string may hold a secret (an access_token=...): it is never echoed either.
    shown = value.split("?", 1)[0].split("#", 1)[0]
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise InvalidTarget(f"base_url {shown!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidTarget(f"base_url must be an http:// or https:// URL, not {shown!r}")
    if not parts.hostname:
        raise InvalidTarget(f"base_url {shown!r} has no host")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise InvalidTarget(
            f"base_url {shown!r} must not have a query string or a fragment; "
            "give the token as token="
        )
    if any(ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise InvalidTarget(f"base_url {value!r} holds white space or a control character")


def _check_token(instance: Any, attribute: Any, value: Any) -> None:
    # The token itself never appears in a message. An empty one is refused in
    # __attrs_post_init__, for the Matrix format only.
    if not isinstance(value, str):
        raise InvalidTarget(f"token must be a str, not {type(value).__name__}")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value):
        raise InvalidTarget(
            "token must be printable ASCII without white space (it is sent in an HTTP header)"
        )


_FORMAT_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


def _check_format(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidTarget(f"format must be a str, not {type(value).__name__}")
    if not 1 <= len(value) <= 64 or not set(value) <= _FORMAT_CHARACTERS:
        raise InvalidTarget(
            f"format must be 1 to 64 characters of a-z, 0-9, '.', '_' and '-', not {value!r}"
        )


def _to_secrets(value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _check_secrets(instance: Any, attribute: Any, value: Any) -> None:
    # A secret never appears in a message: only its position does.
    if not isinstance(value, tuple):
        raise InvalidTarget(
            f"secrets must be a list or tuple of str (or one str), not {type(value).__name__}"
        )
    for i, secret in enumerate(value):
        try:
            secret_key(secret)
        except InvalidTarget as e:
            raise InvalidTarget(f"secrets[{i}] is not valid: {e}") from None
    if len(set(value)) != len(value):
        raise InvalidTarget("secrets holds the same secret twice")


#: What a Standard Webhooks secret starts with; the rest is its key, in standard base64.
SECRET_PREFIX = "whsec_"
#: The shortest and the longest key of a Standard Webhooks secret, in bytes.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64


def secret_key(secret: str) -> bytes:
    """
    The key of a Standard Webhooks secret: the base64 after ``whsec_``, decoded.

    Padding may be left out. The message of the error never shows the secret.

    Raises:
        relayer.errors.InvalidTarget: It is not ``whsec_`` and the standard base64 of 24 to
            64 bytes.
    """
    if not isinstance(secret, str):
        raise InvalidTarget(f"a secret must be a str, not {type(secret).__name__}")
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidTarget(f"a secret must start with {SECRET_PREFIX!r}")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidTarget(
            f"a secret must be {SECRET_PREFIX!r} followed by standard base64 (A-Z, a-z, 0-9, "
            "+ and /)"
        ) from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise InvalidTarget(
            f"a secret's key must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {len(key)}"
        )
    return key


def _check_max_events(instance: Any, attribute: Any, value: Any) -> None:
    _integer(InvalidTarget, "max_events", 1, _MAX_EVENTS_LIMIT, value)


def _check_max_bytes(instance: Any, attribute: Any, value: Any) -> None:
    _integer(InvalidTarget, "max_bytes", _MIN_BYTES, _MAX_BYTES_LIMIT, value)


def _check_timeout(instance: Any, attribute: Any, value: Any) -> None:
    _seconds(InvalidTarget, "request_timeout", 0.0, value)


def _check_backoff(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, (BackoffPolicy, DelaySchedule)):
        raise InvalidTarget(
            f"backoff must be a BackoffPolicy or a DelaySchedule, not {type(value).__name__}"
        )


#: The longest time to live that a target's default may give an event (a year).
MAX_TTL = 366 * 24 * 3600.0
#: Default time a transaction may await its confirmation before it is sent again.
DEFAULT_CONFIRMATION_TIMEOUT = 300.0


def _check_ttl(instance: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    v = _number(InvalidTarget, "default_ttl", value)
    if not (0 < v <= MAX_TTL):
        raise InvalidTarget(
            f"default_ttl must be None, or more than 0 and at most {MAX_TTL:g} seconds, not {v!r}"
        )


def _check_confirmation_timeout(instance: Any, attribute: Any, value: Any) -> None:
    _seconds(InvalidTarget, "confirmation_timeout", 0.0, value)


#: The longest retention of final events, a century (for ever is ``None``).
MAX_RETENTION = 100 * 366 * 24 * 3600.0


def _retention_seconds(error: type[ConfigurationError], name: str, value: Any) -> None:
    if value is None:
        return
    v = _number(error, name, value)
    if not (0 < v <= MAX_RETENTION):
        raise error(
            f"{name} must be None, or more than 0 and at most {MAX_RETENTION:g} seconds, not {v!r}"
        )


def _check_target_retention(instance: Any, attribute: Any, value: Any) -> None:
    _retention_seconds(InvalidTarget, "retention", value)


def _to_policy(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return FailurePolicy(value)
        except ValueError:
            pass
    return value


def _check_policy(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, FailurePolicy):
        choices = ", ".join(repr(p.value) for p in FailurePolicy)
        raise InvalidTarget(
            f"failure_policy must be a FailurePolicy or one of {choices}, not {value!r}"
        )


def _check_retry_policy(instance: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if not _PLUGIN_NAME.fullmatch(value):
            raise InvalidTarget(
                f"retry_policy {value!r} is not a policy name: 1 to 64 of a-z, 0-9, '.', '_', '-'"
            )
        return
    from relayer.policy import IRetryPolicy

    if not IRetryPolicy.providedBy(value):
        raise InvalidTarget(
            "retry_policy must be None, the name of a policy, or an object that provides "
            f"relayer.IRetryPolicy, not {type(value).__name__}"
        )


#: What the names of wire formats and retry policies are made of.
_PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@attrs.frozen
class TargetConfig:
    """
    A remote target and its delivery settings.

    Attributes:
        target_id: The target's id, unique within a scheduler and stable across restarts: the
            store keys the target's queue by it. 1 to 255 characters, no control characters.
        base_url: The target's base URL, ``http://`` or ``https://``. The default HTTP transport
            sends to ``{base_url}/_matrix/app/v1/transactions/{txn_id}``.
        token: The access token sent as ``Authorization: Bearer {token}``. It never appears in a
            repr, a log line or an exception. Required by the Matrix format; other formats
            send it if it is given (the default is ``""``, none).
        max_events: The cap on the number of events in one transaction. Default 100.
        max_bytes: The cap on the encoded size of one transaction's body. Default 1 MiB.
        request_timeout: Seconds one request may take before it fails as a timeout. Default 30.
        backoff: The retry schedule while the target is DOWN.
        failure_policy: What to do with a transaction that failed permanently; by default it is
            dead-lettered and delivery goes on (:attr:`FailurePolicy.DEAD_LETTER`).
        default_ttl: The time to live, in seconds from submit, of an event submitted without a
            deadline of its own; None (the default) for no deadline. An event past its
            deadline is never sent to the target: it is recorded as expired.
        confirmation_timeout: Seconds a transaction that the transport reported accepted,
            with its confirmation to come (:meth:`relayer.SendOutcome.accepted`), may wait for
            :meth:`relayer.Scheduler.confirm` before it is sent again. Default 300.
        retry_policy: What each failed attempt leads to (a retry after a backoff, a dead
            letter, the target blocked or disabled): an object that provides
            :class:`relayer.IRetryPolicy` such as a :class:`relayer.RetryPolicy`, or the name of
            a policy that a plugin provides (see :doc:`plugins`). None (the default) builds one
            from ``backoff`` and ``failure_policy``, which must then be left at their defaults
            when a policy is given.
        retention: Seconds the target's final events (delivered, expired or discarded there)
            are kept before retention may purge or archive them; None (the default) for the
            scheduler's :attr:`relayer.Retention.keep`. An event sent to several targets is
            kept until it has passed the retention of each.
        format: The target's wire format, by name (see :mod:`relayer.formats`):
            ``"matrix"`` (the default), ``"standard-webhooks"``, or one given to the
            :class:`~relayer.Scheduler` in ``formats``. The scheduler refuses, at
            registration, a format it does not know or a target that lacks what its format
            needs.
        secrets: The Standard Webhooks secrets that sign each request, each ``whsec_``
            followed by the standard base64 of a key of 24 to 64 bytes; a lone str is one
            secret. With several (during a rotation), the request carries one signature per
            secret, in order. They never appear in a repr, a log line or an exception.
    """

    target_id: str = attrs.field(validator=_check_target_id)
    base_url: str = attrs.field(validator=_check_base_url)
    token: str = attrs.field(default="", validator=_check_token, repr=False)
    max_events: int = attrs.field(default=DEFAULT_MAX_EVENTS, validator=_check_max_events)
    max_bytes: int = attrs.field(default=DEFAULT_MAX_BYTES, validator=_check_max_bytes)
    request_timeout: float = attrs.field(default=DEFAULT_REQUEST_TIMEOUT, validator=_check_timeout)
    backoff: Backoff = attrs.field(factory=BackoffPolicy, validator=_check_backoff)
    failure_policy: FailurePolicy = attrs.field(
        default=FailurePolicy.DEAD_LETTER, converter=_to_policy, validator=_check_policy
    )
    default_ttl: float | None = attrs.field(default=None, validator=_check_ttl)
    confirmation_timeout: float = attrs.field(
        default=DEFAULT_CONFIRMATION_TIMEOUT, validator=_check_confirmation_timeout
    )
    retention: float | None = attrs.field(default=None, validator=_check_target_retention)
    retry_policy: Any = attrs.field(default=None, validator=_check_retry_policy)
    format: str = attrs.field(default="matrix", validator=_check_format)
    secrets: tuple[str, ...] = attrs.field(
        default=(), converter=_to_secrets, validator=_check_secrets, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if self.format == "matrix" and not self.token:
            raise InvalidTarget("token must not be empty: every target needs its access token")
        if self.retry_policy is not None and (
            self.backoff != BackoffPolicy() or self.failure_policy is not FailurePolicy.DEAD_LETTER
        ):
            raise InvalidTarget(
                "give the backoff and what a permanent failure does in the retry_policy, not "
                "also as backoff= or failure_policy= of the target"
            )


#: How many event numbers one database transaction of a retention run looks at, by default.
DEFAULT_RETENTION_CHUNK = 2000


def _check_keep(instance: Any, attribute: Any, value: Any) -> None:
    _retention_seconds(ConfigurationError, "keep", value)


def _check_interval(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None:
        _seconds(ConfigurationError, "interval", 0.0, value)


def _check_chunk(instance: Any, attribute: Any, value: Any) -> None:
    _integer(ConfigurationError, "chunk", 1, 100_000, value)


def _check_archive(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"archive must be True or False, not {value!r}")


@attrs.frozen
class Retention:
    """
    How long final events are kept, and what becomes of them then.

    An event is final at a target once it is delivered, expired or discarded there (a dead
    letter is not final: it can be replayed). Once it is final at every target it was submitted
    for, and each target's retention has passed since, a retention run purges it (or archives
    it, with ``archive``), with its transactions' and expiries' records. Nothing else is ever
    purged, however old: pending events, transactions in flight or awaiting confirmation, and
    dead letters stay.

    Attributes:
        keep: Seconds a final event is kept; None (the default) keeps final events for ever,
            except at targets with a :attr:`relayer.TargetConfig.retention` of their own.
        archive: Move final events to the archive tables instead of deleting them. Status
            queries read live and archived events alike.
        interval: Seconds between a scheduler's retention runs (default an hour), at most a
            week; None for none: retention then runs only when asked, with
            :meth:`relayer.Scheduler.purge` or ``relayer purge``.
        chunk: How many event numbers one database transaction of a run looks at: the bound on
            how long a run holds the database at a time.
    """

    keep: float | None = attrs.field(default=None, validator=_check_keep)
    archive: bool = attrs.field(default=False, validator=_check_archive)
    interval: float | None = attrs.field(default=3600.0, validator=_check_interval)
    chunk: int = attrs.field(default=DEFAULT_RETENTION_CHUNK, validator=_check_chunk)
