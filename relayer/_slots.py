"""
Send slots: a bound on the sends in flight across every target, shared fairly.

Every send takes a slot for as long as its request is open, and gives it back when the request
ends (answered, failed, timed out or abandoned). When every slot is taken, a send waits for one.
Sends come in two classes:

- a *first attempt*: a transaction sent for the first time to a target that is UP and has not
  failed for :data:`RECOVERY_PROBATION` seconds;
- a *retry*: a transaction sent again, or any send to a target that is not UP (a DOWN target's
  probe, or the backlog of a target that is recovering), or to one that failed less than
  :data:`RECOVERY_PROBATION` seconds ago (a target that flaps, back UP between failures).

Retries may hold at most :data:`RETRY_SHARE` of the slots, so that a burst of retries (many
targets coming back at once, or a herd of probes) never takes the slots that first attempts of
healthy targets need. When a slot comes free, a waiting first attempt takes it before a waiting
retry; but a retry that could go (retries hold less than their share) is passed over at most
:data:`RETRY_TURN` times in a row, so that retries still go out while first attempts keep
coming. Within a class, sends go in the order they came.

A waiter is a Deferred; cancelling it withdraws it. Nothing here uses a clock: waiting for a
slot takes no time of its own, and the caller starts a send's timeout only once it has its slot.
"""

from __future__ import annotations

import enum
from collections import deque

import attrs
from twisted.internet.defer import Deferred, succeed

#: The share of the slots that retries may hold at once (at least one slot).
RETRY_SHARE = 0.5

#: How many first attempts may take a slot in a row while a retry waits that could go.
RETRY_TURN = 4

#: For how many seconds after a failed attempt a target's sends count as retries, even once it
#: is UP again: a target that flaps (or hangs now and then) takes the retries' share of the
#: slots, not the healthy targets'.
RECOVERY_PROBATION = 60.0


class SendClass(enum.Enum):
    """Which queue a send waits in for its slot."""

    #: A transaction sent for the first time to a target that is UP and has not failed lately.
    FIRST = "first"
    #: A transaction sent again, or a send to a target that is not UP or failed lately.
    RETRY = "retry"


@attrs.frozen
class SendSlotsStatus:
    """
    How the send slots are used, at one moment.

    Attributes:
        limit: How many sends may be in flight at once; None if there is no limit.
        in_flight: Sends in flight now (holding a slot).
        retries_in_flight: Of those, retries.
        waiting: Sends waiting for a slot.
        retries_waiting: Of those, retries.
    """

    limit: int | None
    in_flight: int
    retries_in_flight: int
    waiting: int
    retries_waiting: int


class SendSlots:
    """
    A bound on the sends in flight at once, with first attempts served before retries.

    Args:
        limit: How many sends may be in flight at once, at least 1; None for no bound (every
            slot is granted at once, and only counted).
    """

    def __init__(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"limit must be an int or None, not {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        self.limit = limit
        #: The most retries in flight at once.
        self.retry_limit = None if limit is None else max(1, int(limit * RETRY_SHARE))
        self.in_flight = 0
        self.retries_in_flight = 0
        self._first: deque[Deferred[None]] = deque()
        self._retry: deque[Deferred[None]] = deque()
        # First attempts granted in a row while a retry that could go waited.
        self._passed = 0
        self._granting = False

    def status(self) -> SendSlotsStatus:
        """How the slots are used now."""
        return SendSlotsStatus(
            self.limit,
            self.in_flight,
            self.retries_in_flight,
            len(self._first) + len(self._retry),
            len(self._retry),
        )

    def acquire(self, kind: SendClass) -> Deferred[None]:
        """
        Take a slot for a send of this class.

        Returns:
            A Deferred that fires once the caller holds the slot (at once if one is free and
            no send that goes first waits). The caller must :meth:`release` it when its send
            ends. Cancelling the Deferred before it fires withdraws the wait; it then fails
            with :class:`~twisted.internet.defer.CancelledError`, and no slot is held.
        """
        if self.limit is None:
            self._take(kind)
            return succeed(None)
        queue = self._retry if kind is SendClass.RETRY else self._first

        def withdraw(d: Deferred[None]) -> None:
            try:
                queue.remove(d)
            except ValueError:
                pass

        waiter: Deferred[None] = Deferred(withdraw)
        queue.append(waiter)
        self._grant()
        return waiter

    def release(self, kind: SendClass) -> None:
        """Give back a slot taken for a send of this class, and hand it to the next waiter."""
        self.in_flight -= 1
        if kind is SendClass.RETRY:
            self.retries_in_flight -= 1
        assert self.in_flight >= 0 and self.retries_in_flight >= 0, "a slot released twice"
        self._grant()

    def cancel_all(self) -> None:
        """Withdraw every waiter: each fails with CancelledError."""
        waiters = list(self._first) + list(self._retry)
        for waiter in waiters:
            waiter.cancel()

    def _take(self, kind: SendClass) -> None:
        self.in_flight += 1
        if kind is SendClass.RETRY:
            self.retries_in_flight += 1

    def _grant(self) -> None:
        """Hand the free slots to the waiters, in turn."""
        if self._granting or self.limit is None:
            # A waiter given a slot just now released one, or asked for another: the loop
            # below goes on with it, rather than granting inside that waiter's call. (Without
            # a limit, nobody waits.)
            return
        self._granting = True
        try:
            while True:
                kind = self._next()
                if kind is None:
                    return
                queue = self._retry if kind is SendClass.RETRY else self._first
                waiter = queue.popleft()
                self._take(kind)
                waiter.callback(None)
        finally:
            self._granting = False

    def _next(self) -> SendClass | None:
        """The class of the waiter that takes the next free slot; None if none can."""
        assert self.limit is not None and self.retry_limit is not None
        if self.in_flight >= self.limit:
            return None
        retry_may_go = bool(self._retry) and self.retries_in_flight < self.retry_limit
        if self._first and not (retry_may_go and self._passed >= RETRY_TURN):
            if retry_may_go:
                self._passed += 1
            return SendClass.FIRST
        if retry_may_go:
            self._passed = 0
            return SendClass.RETRY
        return None
