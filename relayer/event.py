"""
An event to submit, with the options that give it an identity and a life time.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from relayer.errors import InvalidEvent

#: The prefix of the ids relayer gives to events submitted without one; an application's own
#: ids may not start with it.
GENERATED_ID_PREFIX = "relayer-"
#: The longest id, in UTF-8 bytes.
MAX_EVENT_ID_BYTES = 255


def check_event_id(value: Any) -> str:
    """Return ``value`` if it is a valid event id of an application's; else raise InvalidEvent."""
    if not isinstance(value, str):
        raise InvalidEvent(f"event_id must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEvent("event_id must be valid Unicode (it holds a lone surrogate)") from None
    if not 1 <= size <= MAX_EVENT_ID_BYTES:
        raise InvalidEvent(
            f"event_id must be 1 to {MAX_EVENT_ID_BYTES} bytes of UTF-8, not {size} bytes"
        )
    if "\x00" in value:
        raise InvalidEvent("event_id must not hold a NUL character")
    if value.startswith(GENERATED_ID_PREFIX):
        raise InvalidEvent(
            f"event_id {value!r} starts with {GENERATED_ID_PREFIX!r}, which relayer keeps for "
            "the ids it gives to events submitted without one"
        )
    return value


def _finite(name: str, value: Any, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEvent(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or (positive and v <= 0):
        raise InvalidEvent(
            f"{name} must be a finite number{' > 0' if positive else ''}, not {value!r}"
        )
    return v


def deadline_of(now: float, expires_at: Any, ttl: Any) -> float | None:
    """
    The deadline given by ``expires_at`` (clock seconds) or ``ttl`` (seconds from ``now``).

    Raises:
        InvalidEvent: Both are given, or one is not a finite number (a ttl must be > 0).
    """
    if expires_at is not None and ttl is not None:
        raise InvalidEvent("give an event expires_at or ttl, not both")
    if expires_at is not None:
        return _finite("expires_at", expires_at, positive=False)
    if ttl is not None:
        return now + _finite("ttl", ttl, positive=True)
    return None


@attrs.frozen
class Event:
    """
    An event with the options of its submit, for :meth:`relayer.Scheduler.submit` and
    :meth:`relayer.Scheduler.submit_many`.

    Attributes:
        body: The event: a JSON object, or its JSON as bytes, as
            :meth:`relayer.Scheduler.submit` takes them.
        event_id: Your id for it (a Matrix event id, an order id): submitting an id that the
            store holds already stores nothing and returns the same id. None to let relayer
            give it one (``relayer-<n>``).
        expires_at: Its deadline, in clock seconds: it is never sent at or after this time.
        ttl: Or its time to live, in seconds from the submit.
    """

    body: Any
    event_id: str | None = attrs.field(default=None, kw_only=True)
    expires_at: float | None = attrs.field(default=None, kw_only=True)
    ttl: float | None = attrs.field(default=None, kw_only=True)
