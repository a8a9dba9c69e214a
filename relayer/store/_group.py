"""
Group commit: many units of database work in one database transaction.

A store's unit of work is a function of a connection that must run inside one database
transaction, all or nothing. With a single database thread (SQLite's single writer), units queue
up while that thread is busy, and each would pay for a commit of its own: with
``synchronous=FULL``, an fsync each. :class:`GroupCommit` runs every unit that is waiting, in the
order they came, inside one database transaction, and commits once. Each unit's Deferred fires
only after that commit, so a result is never reported before it is durable.

A unit that fails must not take the others with it, and must leave nothing behind: if anything in
a group fails, the whole database transaction is rolled back, and

- if the store was unavailable (a lock held too long, a full disk, a lost connection), every unit
  of the group fails with that error: nothing of theirs was stored, and their callers retry them,
  as they would any unit that found the store unavailable;
- otherwise every unit of the group is run again, on its own, in the same order, exactly as if
  they had never been grouped; only the one at fault fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.python.failure import Failure

from relayer.errors import StoreUnavailable

#: The most units one database transaction takes.
MAX_UNITS = 500

_Unit = tuple[Callable[..., Any], tuple[Any, ...], "Deferred[Any]"]


class GroupCommit:
    """
    Runs units of database work, grouping those that wait into one database transaction.

    Args:
        run: Runs one function of a connection in one database transaction, off the reactor
            thread, and returns a Deferred of its result (a store's ``_run``). Groups are handed
            to it one at a time.
        max_units: The most units one database transaction takes.
    """

    def __init__(self, run: Callable[..., Deferred[Any]], max_units: int = MAX_UNITS) -> None:
        self._run = run
        self._max_units = max_units
        self._queue: list[_Unit] = []
        self._busy = False
        self._pumping = False
        self._idle: list[Deferred[None]] = []

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``f(connection, *args)`` inside a database transaction; fire with its result."""
        done: Deferred[Any] = Deferred()
        self._queue.append((f, args, done))
        self._pump()
        return done

    def idle(self) -> Deferred[None]:
        """A Deferred that fires once every unit handed over so far has finished."""
        d: Deferred[None] = Deferred()
        if not self._busy and not self._queue:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    def _pump(self) -> None:
        # A loop rather than recursion: with a pool that runs work at once (in tests), each
        # group finishes inside this call, and hands over the next one from here.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._queue and not self._busy:
                units = self._queue[: self._max_units]
                del self._queue[: self._max_units]
                self._busy = True
                if len(units) == 1:
                    f, args, done = units[0]
                    self._call(f, *args).addBoth(self._finished_one, done)
                else:
                    self._call(_together, [(f, args) for f, args, _ in units]).addBoth(
                        self._finished, units
                    )
            if not self._busy and not self._queue and self._idle:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)
        finally:
            self._pumping = False

    def _call(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        try:
            return self._run(f, *args)
        except BaseException:
            return fail()

    def _finished_one(self, result: Any, done: Deferred[Any]) -> None:
        done.callback(result)  # a Failure errbacks
        self._next()

    def _finished(self, result: Any, units: list[_Unit]) -> None:
        if not isinstance(result, Failure):
            for value, (_, _, done) in zip(result, units, strict=True):
                done.callback(value)
            self._next()
        elif result.check(StoreUnavailable):
            for _, _, done in units:
                done.errback(result)
            self._next()
        else:
            # Run each again on its own, in order (the pool runs them in the order given).
            alone = [self._call(f, *args) for f, args, _ in units]
            for d, (_, _, done) in zip(alone, units, strict=True):
                d.chainDeferred(done)
            DeferredList(alone, consumeErrors=True).addCallback(lambda _: self._next())

    def _next(self) -> None:
        self._busy = False
        self._pump()


def _together(conn: Any, units: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """Run the units one after the other on one connection, in one database transaction."""
    return [f(conn, *args) for f, args in units]
