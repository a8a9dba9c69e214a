"""
Exceptions raised by relayer.

Every exception relayer raises on purpose derives from :class:`RelayerError`, so that an
application can catch them all in one place. Errors in the caller's input are raised at the
call, before anything is stored, and the scheduler keeps running.
"""

from __future__ import annotations


class RelayerError(Exception):
    """Base class of every exception that relayer raises on purpose."""


class ConfigurationError(RelayerError, ValueError):
    """A configuration value (a limit, a backoff parameter, a policy) is not valid."""


class InvalidTarget(ConfigurationError):
    """A target's registration is not valid: a bad id, base URL, token or setting."""


class DuplicateTarget(ConfigurationError):
    """A target with the same id is already registered with this scheduler."""


class InvalidSignature(RelayerError, ValueError):
    """
    A webhook's signature does not verify: a header is missing, its timestamp is out of the
    tolerance, or no signature matches (see :func:`relayer.formats.verify`).
    """


class UnknownTarget(RelayerError, KeyError):
    """An operation names a target that is not registered with the scheduler."""

    def __str__(self) -> str:
        # KeyError quotes its argument; show the message as written instead.
        return str(self.args[0]) if self.args else ""


class InvalidEvent(RelayerError, ValueError):
    """An event cannot be encoded as JSON: an unsupported type, NaN, a lone surrogate..."""


class EventTooLarge(InvalidEvent):
    """An encoded event is larger than its target's ``max_bytes`` transaction cap."""


class NotRunning(RelayerError):
    """The scheduler is not running: it has not been started yet, or it has been stopped."""


class StoreError(RelayerError):
    """The store failed to carry out an operation; nothing that was acknowledged is lost."""


class StoreUnavailable(StoreError):
    """
    The store failed for a reason that may pass: a locked or busy database, a full disk, a lost
    connection. Operations that fail this way are retried with backoff.
    """


class Backpressure(RelayerError):
    """
    Too many submitted events wait to be stored, as when the store has been unavailable for a
    while: the submit is refused at once, and nothing of it is stored. Submit again once the
    store has caught up; the bound is :class:`relayer.Scheduler`'s ``max_waiting_events``.
    """


class LeaseLost(RelayerError):
    """
    This process no longer owns the target it acted on: its lease expired, or another process
    took it over. Nothing was changed; the new owner carries on.
    """


class DatabaseInUse(StoreError):
    """
    Another process uses the database in a way that excludes this one: a scheduler without
    leases is alone on its database, and schedulers with leases share it only with each other.
    """


class SchemaVersionError(StoreError):
    """The database was written by a newer relayer, whose schema this version cannot read."""
