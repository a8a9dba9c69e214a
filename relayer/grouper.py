"""
The EventGrouper: batches submitted events per target and stores them with group commit.

Submitted events are stored before they are acknowledged. The grouper keeps at most one write
in progress: events submitted while a write is in progress wait for the next write, which takes
all of them in one database transaction. An idle grouper writes at once, so there is no timer and
no polling, and under load many submits share one commit.

Each target's events are stored as runs no longer than one transaction of that target (by count
and bytes), so forming a transaction never has to read more than it sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayer import _encoding
from relayer.errors import StoreError
from relayer.store.base import IStore

#: The most events one write takes, so that one commit stays a reasonable size. A single
#: ``submit_many`` larger than this is still written in one commit.
MAX_EVENTS_PER_WRITE = 20_000


@attrs.define
class _Submission:
    items: Sequence[tuple[str, bytes]]
    done: Deferred[None]


def runs_for(events: Sequence[bytes], max_events: int, max_bytes: int) -> list[list[bytes]]:
    """Cut a target's events, in order, into runs that each fit one transaction."""
    runs: list[list[bytes]] = []
    current: list[bytes] = []
    size = _encoding.ENVELOPE_BYTES
    sep = len(_encoding.SEPARATOR)
    for event in events:
        extra = len(event) + (sep if current else 0)
        if current and (len(current) >= max_events or size + extra > max_bytes):
            runs.append(current)
            current = []
            size = _encoding.ENVELOPE_BYTES
            extra = len(event)
        current.append(event)
        size += extra
    if current:
        runs.append(current)
    return runs


class EventGrouper:
    """
    Stores submitted events, per target and in submit order, with group commit.

    Args:
        clock: Gives the time events are stored at.
        store: Where events are stored.
        limits: Gives a target's ``(max_events, max_bytes)``.
        on_stored: Called with the ids of the targets that have new events, after each commit.
    """

    log = Logger(namespace="relayer.grouper")

    def __init__(
        self,
        clock: IReactorTime,
        store: IStore,
        limits: Callable[[str], tuple[int, int]],
        on_stored: Callable[[Iterable[str]], None],
    ) -> None:
        self._clock = clock
        self._store = store
        self._limits = limits
        self._on_stored = on_stored
        self._queue: list[_Submission] = []
        self._writing: Deferred[None] | None = None
        self._idle: list[Deferred[None]] = []

    @property
    def waiting(self) -> int:
        """How many events wait for a write."""
        return sum(len(s.items) for s in self._queue)

    def add(self, items: Sequence[tuple[str, bytes]]) -> Deferred[None]:
        """
        Store encoded events.

        Args:
            items: ``(target_id, encoded_event)`` pairs, in submit order.

        Returns:
            A Deferred that fires once every one of the events is durably stored (they are
            stored together, in one database transaction), or fails with
            :class:`relayer.errors.StoreError` if none of them was stored.
        """
        done: Deferred[None] = Deferred()
        self._queue.append(_Submission(items, done))
        if self._writing is None:
            self._write()
        return done

    def flushed(self) -> Deferred[None]:
        """A Deferred that fires once every event handed over so far has been written."""
        if self._writing is None and not self._queue:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        d = Deferred()
        self._idle.append(d)
        return d

    def _write(self) -> None:
        batch: list[_Submission] = []
        count = 0
        while self._queue and (
            not batch or count + len(self._queue[0].items) <= MAX_EVENTS_PER_WRITE
        ):
            submission = self._queue.pop(0)
            batch.append(submission)
            count += len(submission.items)
        per_target: dict[str, list[bytes]] = {}
        for submission in batch:
            for target_id, event in submission.items:
                per_target.setdefault(target_id, []).append(event)
        runs: list[tuple[str, Sequence[bytes]]] = []
        for target_id, events in per_target.items():
            max_events, max_bytes = self._limits(target_id)
            runs.extend((target_id, run) for run in runs_for(events, max_events, max_bytes))

        writing = self._store.add_events(runs, self._clock.seconds())
        self._writing = writing

        def written(result: object) -> None:
            self._writing = None
            if isinstance(result, Failure):
                self.log.failure(
                    "Storing {count} submitted events failed; their submits fail",
                    result,
                    count=count,
                )
                error = StoreError(f"the events were not stored: {result.getErrorMessage()}")
                for submission in batch:
                    submission.done.errback(error)
            else:
                for submission in batch:
                    submission.done.callback(None)
                self._on_stored(per_target.keys())
            if self._writing is None:
                if self._queue:
                    self._write()
                else:
                    idle, self._idle = self._idle, []
                    for d in idle:
                        d.callback(None)

        writing.addBoth(written)
