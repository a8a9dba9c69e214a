"""
The Recoverer: brings one DOWN target back.

While a target is DOWN, its Recoverer holds its backoff: how many consecutive attempts have
failed and when the next one is due. When that time comes, or when the target is woken, it asks
the controller to retry, which sends the target's oldest pending transaction first. The
target's retry policy sets each wait from the failure count; a success resets the count, and the
controller goes straight on with the next transaction until the target has nothing left and is
marked UP.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Recoverer:
    """
    The retry timer and failure count of one DOWN target.

    The target's retry policy (:class:`relayer.IRetryPolicy`) decides each delay; the
    Recoverer counts the failures and keeps the timer.

    Args:
        clock: Schedules the retries.
        target_id: The target it recovers.
        retry: Called when a retry is due.
        failures: Consecutive failures so far (restored from the store after a restart).
    """

    def __init__(
        self,
        clock: IReactorTime,
        target_id: str,
        retry: Callable[[], None],
        failures: int = 0,
    ) -> None:
        self.target_id = target_id
        self.failures = failures
        self.next_attempt_at: float | None = None
        self._clock = clock
        self._retry = retry
        self._call: IDelayedCall | None = None

    def __repr__(self) -> str:
        return (
            f"<Recoverer {self.target_id!r} failures={self.failures} "
            f"next_attempt_at={self.next_attempt_at!r}>"
        )

    @property
    def scheduled(self) -> bool:
        """Whether a retry is scheduled."""
        return self._call is not None and self._call.active()

    def failed(self, delay: float) -> float:
        """
        Count one more failure and return the time of the next attempt, ``delay`` seconds from
        now. Call :meth:`schedule` with the result once it is stored.
        """
        self.failures += 1
        self.next_attempt_at = self._clock.seconds() + delay
        return self.next_attempt_at

    def schedule(self, when: float | None) -> None:
        """Schedule the next retry at the time ``when`` (at once if None or past)."""
        self.cancel()
        now = self._clock.seconds()
        delay = 0.0 if when is None else max(0.0, when - now)
        # The time the retry really happens: an overdue one (after a restart) happens now.
        self.next_attempt_at = now + delay
        self._call = self._clock.callLater(delay, self._fire)

    def wake(self) -> None:
        """Retry now, instead of at the scheduled time."""
        self.cancel()
        self._retry()

    def cancel(self) -> None:
        """Cancel the scheduled retry, if any."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self._retry()
