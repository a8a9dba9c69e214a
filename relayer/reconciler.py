"""
The Reconciler: a periodic sweep for work that nothing is delivering.

Delivery is driven by events: a submit, a notification from another process (PostgreSQL's
``NOTIFY``), a retry timer, a lease takeover. If one of those is ever missed (a notification
lost while the listening connection was down, a listener that died, a registration or takeover
that failed on the store), a target's backlog could wait for a restart. The Reconciler runs a
sweep every ``interval`` seconds that finds such targets and resumes them.

The sweeps of processes that share a database are staggered: the first comes at a random
point of the first interval, and each later one after the interval with up to 20% of jitter,
so that they do not all query the database at once.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayer import _logevents as ev
from relayer.config import _draw
from relayer.errors import StoreUnavailable

#: How often, by default, a scheduler sweeps for stranded work, in seconds.
DEFAULT_SWEEP_INTERVAL = 30.0

_JITTER = 0.2


class Reconciler:
    """
    Runs ``sweep`` periodically, staggered, one sweep at a time.

    Args:
        clock: Schedules the sweeps.
        interval: Seconds between sweeps.
        random: The jitter source, returning floats in ``[0, 1)``.
        sweep: Runs one sweep; its Deferred fires when the sweep is done. A sweep that fails
            is logged, and the next one comes as usual.
        what: What a sweep is, for log messages.
        event: The name of the log event of a failed sweep (its ``relayer_event``).
    """

    log = Logger(namespace="relayer.reconciler")

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        random: Callable[[], float],
        sweep: Callable[[], Deferred[None]],
        what: str = "A sweep for stranded work",
        event: str = ev.SWEEP_FAILED,
    ) -> None:
        self.interval = interval
        self._what = what
        self._event = event
        self.sweeps = 0
        self._clock = clock
        self._random = random
        self._sweep = sweep
        self._call: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self._stopped = False

    def start(self) -> None:
        """Schedule the first sweep, at a random point of the first interval."""
        self._schedule(self.interval * _draw(self._random))

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._call = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        self.sweeps += 1
        try:
            d = self._sweep()
        except Exception as e:
            self.log.failure(
                "{what} failed",
                relayer_event=self._event,
                what=self._what,
                error=str(e),
                interval=self.interval,
            )
            self._next()
            return
        self._running = d

        def done(result: object) -> None:
            self._running = None
            if isinstance(result, Failure):
                if result.check(StoreUnavailable):
                    self.log.warn(
                        "{what} failed ({error}); the next one comes in {interval:.0f}s",
                        relayer_event=self._event,
                        what=self._what,
                        error=result.getErrorMessage(),
                        interval=self.interval,
                    )
                else:
                    self.log.failure(
                        "{what} failed",
                        result,
                        relayer_event=self._event,
                        what=self._what,
                        error=result.getErrorMessage(),
                        interval=self.interval,
                    )
            self._next()

        d.addBoth(done)

    def _next(self) -> None:
        self._schedule(self.interval * (1.0 - _JITTER * _draw(self._random)))

    def stop(self) -> Deferred[None]:
        """Cancel the next sweep; fire once a sweep in progress, if any, has ended."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        running = self._running

        async def wait() -> None:
            if running is not None:
                try:
                    await running
                except Exception:
                    pass  # logged by the sweep's own handler

        return Deferred.fromCoroutine(wait())
