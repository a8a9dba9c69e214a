"""
Observers: what the scheduler tells the application about its deliveries.

An observer provides :class:`IDeliveryObserver` (subclassing :class:`DeliveryObserver` gives a
no-op for each method, so that one only writes what one needs, and keeps working when methods
are added). The scheduler calls its observers on the reactor thread, after what they are told of
is stored: an observer told that a transaction was delivered can rely on it. ``failed`` is the
exception: it is called as soon as an attempt has failed, before what the failure leads to (a
retry, a dead letter, the target blocked or disabled) is stored and told.

Observers never hold delivery up, and never lose an event: an observer that raises, or returns a
Deferred that fails, is logged, and delivery goes on as if it had not been called. A Deferred
that an observer returns is not waited for. An observer is called synchronously, so it should
be quick: hand slow work (a notification by e-mail, a page) to something that runs on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from relayer import _logevents as ev
from relayer.errors import ConfigurationError
from relayer.transport.base import FailureClass


class IDeliveryObserver(Interface):
    """Told of deliveries, failures and changes of a target's state."""

    def delivered(
        target_id: str, txn_id: int, n_events: int, attempts: int, latency: float
    ) -> None:
        """
        A transaction was delivered (or accepted, with its confirmation to come).

        Args:
            target_id: The target.
            txn_id: The transaction.
            n_events: How many events it held.
            attempts: How many times it was sent, this time included.
            latency: Seconds from the submit of its oldest event to now.
        """

    def failed(
        target_id: str, txn_id: int, failure: FailureClass, reason: str, failures: int
    ) -> None:
        """
        An attempt failed. It is called as soon as the attempt's answer is in, before what it
        leads to is stored; the other methods tell of that once it is.

        Args:
            failure: The failure's class.
            reason: What the target answered, or why there was no answer.
            failures: The target's consecutive failed attempts, this one included.
        """

    def dead_lettered(target_id: str, txn_id: int, n_events: int, reason: str) -> None:
        """A transaction was moved to the dead letters."""

    def expired(target_id: str, count: int) -> None:
        """``count`` events passed their deadline before they were sent to the target."""

    def target_down(target_id: str, reason: str) -> None:
        """The target failed and is DOWN: it is retried with backoff."""

    def target_up(target_id: str) -> None:
        """A DOWN, BLOCKED or DISABLED target delivered its backlog and is UP again."""

    def target_blocked(target_id: str, txn_id: int, reason: str) -> None:
        """The target refused a transaction for good and is BLOCKED until it is woken."""

    def target_disabled(target_id: str, reason: str) -> None:
        """
        The target was disabled by its retry policy (a give-up rule, an action for a failure
        class, or a policy's own decision): nothing is sent until it is woken.
        """

    def failures_crossed(target_id: str, failures: int, threshold: int) -> None:
        """The target's consecutive failures reached ``threshold`` (one of the scheduler's)."""


@implementer(IDeliveryObserver)
class DeliveryObserver:
    """An observer that does nothing: subclass it and override what you need."""

    def delivered(
        self, target_id: str, txn_id: int, n_events: int, attempts: int, latency: float
    ) -> None:
        pass

    def failed(
        self, target_id: str, txn_id: int, failure: FailureClass, reason: str, failures: int
    ) -> None:
        pass

    def dead_lettered(self, target_id: str, txn_id: int, n_events: int, reason: str) -> None:
        pass

    def expired(self, target_id: str, count: int) -> None:
        pass

    def target_down(self, target_id: str, reason: str) -> None:
        pass

    def target_up(self, target_id: str) -> None:
        pass

    def target_blocked(self, target_id: str, txn_id: int, reason: str) -> None:
        pass

    def target_disabled(self, target_id: str, reason: str) -> None:
        pass

    def failures_crossed(self, target_id: str, failures: int, threshold: int) -> None:
        pass


class Observers:
    """
    Calls each of a scheduler's observers in turn, shielding delivery from their failures.

    Its methods are those of :class:`IDeliveryObserver`.
    """

    log = Logger(namespace="relayer.observer")

    def __init__(self, observers: Iterable[Any] = ()) -> None:
        checked = []
        for observer in observers:
            try:
                verifyObject(IDeliveryObserver, observer)
            except Exception as e:
                raise ConfigurationError(
                    f"{observer!r} is not an observer: it must provide "
                    f"relayer.IDeliveryObserver ({e})"
                ) from None
            checked.append(observer)
        self._observers = tuple(checked)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def _call(self, method: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                result = getattr(observer, method)(*args)
            except Exception:
                self.log.failure(
                    "Observer {observer} failed in {method}",
                    relayer_event=ev.OBSERVER_FAILED,
                    observer=repr(observer),
                    method=method,
                )
                continue
            if isinstance(result, Deferred):
                result.addErrback(self._failed, observer, method)

    def _failed(self, failure: Failure, observer: Any, method: str) -> None:
        self.log.failure(
            "Observer {observer} failed in {method}",
            failure,
            relayer_event=ev.OBSERVER_FAILED,
            observer=repr(observer),
            method=method,
        )

    def delivered(
        self, target_id: str, txn_id: int, n_events: int, attempts: int, latency: float
    ) -> None:
        self._call("delivered", target_id, txn_id, n_events, attempts, latency)

    def failed(
        self, target_id: str, txn_id: int, failure: FailureClass, reason: str, failures: int
    ) -> None:
        self._call("failed", target_id, txn_id, failure, reason, failures)

    def dead_lettered(self, target_id: str, txn_id: int, n_events: int, reason: str) -> None:
        self._call("dead_lettered", target_id, txn_id, n_events, reason)

    def expired(self, target_id: str, count: int) -> None:
        self._call("expired", target_id, count)

    def target_down(self, target_id: str, reason: str) -> None:
        self._call("target_down", target_id, reason)

    def target_up(self, target_id: str) -> None:
        self._call("target_up", target_id)

    def target_blocked(self, target_id: str, txn_id: int, reason: str) -> None:
        self._call("target_blocked", target_id, txn_id, reason)

    def target_disabled(self, target_id: str, reason: str) -> None:
        self._call("target_disabled", target_id, reason)

    def failures_crossed(self, target_id: str, failures: int, threshold: int) -> None:
        self._call("failures_crossed", target_id, failures, threshold)


__all__ = ["DeliveryObserver", "IDeliveryObserver"]
