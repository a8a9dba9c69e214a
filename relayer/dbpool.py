"""
Where database work runs.

A store never touches the database on the reactor thread. It hands each unit of work (one
function that runs one database transaction) to a *database pool*, which runs it and returns a
Deferred of its result.

- :class:`ThreadedDatabasePool` runs the work on a dedicated
  :class:`twisted.python.threadpool.ThreadPool`, by default of one thread, which also makes it the
  single writer that SQLite wants.
- :class:`relayer.testing.InlineDatabasePool` runs the work at once, on the calling thread, so that
  tests on :class:`twisted.internet.task.Clock` stay synchronous and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class DatabasePool(Protocol):
    """What a store needs from the thing that runs its database work."""

    def start(self) -> None:
        """Make the pool ready to run work."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``f(*args, **kwargs)`` off the reactor thread; fire with its result."""

    def stop(self) -> Deferred[None]:
        """Finish the work already handed over, then release the pool's threads."""


class ThreadedDatabasePool:
    """
    Runs database work on a dedicated thread pool.

    Args:
        reactor: The reactor that results are delivered to.
        threads: How many threads to run. SQLite wants exactly one (a single writer).
        name: The threads' name, as shown by debuggers and ``py-spy``.

    The pool's threads are not daemon threads. If the reactor shuts down while the pool is
    still started (the application stopped the reactor without stopping its scheduler), the
    pool is stopped during the reactor's shutdown, as the reactor's own thread pool is, so that
    the process can exit: the work in progress finishes and the rest is dropped. What was
    dropped was never acknowledged, so nothing acknowledged is lost.
    """

    def __init__(
        self, reactor: IReactorFromThreads, threads: int = 1, name: str = "relayer-db"
    ) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=threads, maxthreads=threads, name=name)
        self._started = False
        self._stopped = False
        self._shutdown_trigger: Any = None

    def start(self) -> None:
        if self._stopped:
            # Twisted's thread pool cannot be started again once stopped.
            raise RuntimeError("a ThreadedDatabasePool cannot be started again after stop()")
        if not self._started:
            self._started = True
            self._pool.start()
            if IReactorCore.providedBy(self._reactor):
                self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                    "during", "shutdown", self._stop_at_shutdown
                )

    def _stop_at_shutdown(self) -> None:
        self._shutdown_trigger = None
        self._started = False
        self._stopped = True
        self._stop_threads()

    def _stop_threads(self) -> None:
        if self._pool.started:
            self._pool.stop()

    def _forget_shutdown_trigger(self) -> None:
        if self._shutdown_trigger is not None:
            trigger, self._shutdown_trigger = self._shutdown_trigger, None
            try:
                self._reactor.removeSystemEventTrigger(trigger)  # type: ignore[attr-defined]
            except (ValueError, KeyError, TypeError):
                pass  # the reactor is shutting down and has fired it already

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def stop(self) -> Deferred[None]:
        if not self._started:
            return Deferred.fromCoroutine(_nothing())
        self._started = False
        self._stopped = True

        async def drain() -> None:
            # Wait for every job already queued (the pool runs them in order), so that
            # joining the threads afterwards does not block the reactor.
            try:
                await self.run(lambda: None)
            finally:
                self._forget_shutdown_trigger()
                self._stop_threads()

        return Deferred.fromCoroutine(drain())


async def _nothing() -> None:
    return None
