"""
The EventGrouper: batches submitted events per target and stores them with group commit.

Submitted events are stored before they are acknowledged. The grouper keeps at most one write
in progress: events submitted while a write is in progress wait for the next write, which takes
all of them in one database transaction. An idle grouper writes at once, so there is no timer and
no polling, and under load many submits share one commit.

If the store is unavailable (a locked database, a full disk, a lost connection), a write is
retried with backoff for up to ``retry_timeout`` seconds; only then do its submits fail, and
then nothing of theirs was stored.

Each target's events are stored as runs no longer than one transaction of that target (by count
and bytes), so forming a transaction never has to read more than it sends.

A target that is idle when its events are written has its first transaction claimed in the same
database transaction as the events (when the store can: ``add_events_claiming``), so that the
send starts once they are committed, without a second wait for the database.
"""

from __future__ import annotations

import random as _random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from operator import add
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from relayer import _encoding, _faults
from relayer import _logevents as ev
from relayer.config import BackoffPolicy
from relayer.errors import StoreError, StoreUnavailable
from relayer.store.base import Claim, EventBatch, IStore

#: The most events one write takes, so that one commit stays a reasonable size. A single
#: ``submit_many`` larger than this is still written in one commit.
MAX_EVENTS_PER_WRITE = 20_000

#: The most targets whose first transactions one write of events claims with them. The others
#: claim theirs once the events are stored, so that a write to many idle targets (a fan-out)
#: is not made to wait for the forming of all their transactions.
MAX_FIRST_CLAIMS_PER_WRITE = 32

#: The default backoff between attempts of a write that failed because the store was
#: unavailable: 50 ms, doubling, up to 5 s.
DEFAULT_STORE_RETRY = BackoffPolicy(initial=0.05, multiplier=2.0, maximum=5.0, jitter=0.2)
#: How long, by default, a write is retried before its submits fail: 60 s.
DEFAULT_STORE_RETRY_TIMEOUT = 60.0


class FirstClaims(Protocol):
    """
    Who delivers the stored events, when the first transaction of an idle target may be
    claimed with them (the :class:`relayer.controller.TransactionController`).
    """

    def reserve_first_claims(
        self, target_ids: Iterable[str], most: int
    ) -> dict[str, tuple[int, int, float | None]]:
        """Reserve up to ``most`` idle ones of these targets; give their claim limits and TTL."""

    def first_claims(self, target_ids: Iterable[str], claimed: Mapping[str, Claim]) -> None:
        """Hand the reserved targets their claims; those without one claim for themselves."""


@attrs.define
class _Submission:
    #: The encoded events, once each.
    bodies: list[bytes]
    #: Each target's events, as indices into ``bodies``, in submit order.
    per_target: dict[str, list[int]]
    #: The targets of the events submitted for several, by index.
    targets: dict[int, tuple[str, ...]]
    #: The application's ids, by index.
    event_ids: dict[int, str]
    #: The deadlines, by index.
    expires_at: dict[int, float]
    done: Deferred[list[str]]

    @property
    def count(self) -> int:
        return len(self.bodies)


def runs_for(events: Sequence[bytes], max_events: int, max_bytes: int) -> list[Sequence[bytes]]:
    """
    Cut a target's events, in order, into runs that each fit one transaction.

    Each run is as long as it can be: it ends where it reaches ``max_events``, or where the
    next event would take its body past ``max_bytes`` (an event larger than that alone is a run
    of its own).
    """
    return [events[a:b] for a, b in run_bounds(events, max_events, max_bytes)]


def run_bounds(events: Sequence[bytes], max_events: int, max_bytes: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` bounds of the runs that :func:`runs_for` cuts ``events`` into."""
    sep = len(_encoding.SEPARATOR)
    room = max_bytes + sep - _encoding.ENVELOPE_BYTES
    n = len(events)
    # ends[j]: the bytes of the first j events, each with a separator. A run of events i..j-1
    # has a body of ends[j] - ends[i] - sep + ENVELOPE_BYTES bytes, so the longest run from i
    # that fits is found by bisection. Most runs are cut by count alone, and a whole slice of
    # max_events events that fits is taken without them: they are made, in C, only once a
    # slice does not fit.
    ends: list[int] | None = None
    runs: list[tuple[int, int]] = []
    start = 0
    while start < n:
        stop = min(start + max_events, n)
        part = events[start:stop]
        if ends is None and sum(map(len, part)) + sep * len(part) <= room:
            runs.append((start, stop))
            start = stop
            continue
        if ends is None:
            lengths = accumulate(map(len, events), initial=0)
            ends = list(map(add, lengths, range(0, sep * (n + 1), sep)))
        if ends[stop] - ends[start] > room:
            stop = max(start + 1, bisect_right(ends, ends[start] + room, start, stop) - 1)
        runs.append((start, stop))
        start = stop
    return runs


class EventGrouper:
    """
    Stores submitted events, per target and in submit order, with group commit.

    Args:
        clock: Gives the time events are stored at.
        store: Where events are stored.
        limits: Gives a target's ``(max_events, max_bytes)``.
        on_stored: Called with the ids of the targets that have new events, after each commit.
        retry: The backoff between attempts of a write that failed because the store was
            unavailable (locked, full, disconnected).
        retry_timeout: How long a write is retried before its submits fail with
            :class:`relayer.errors.StoreError`.
        random: The jitter source for ``retry``.
        first_claims: Reserves the idle targets whose first transaction is claimed with their
            events, and is handed those claims; None claims nothing with the events. It is
            used only with a store that has ``add_events_claiming``.
    """

    log = Logger(namespace="relayer.grouper")

    def __init__(
        self,
        clock: IReactorTime,
        store: IStore,
        limits: Callable[[str], tuple[int, int]],
        on_stored: Callable[[Iterable[str]], None],
        *,
        retry: BackoffPolicy = DEFAULT_STORE_RETRY,
        retry_timeout: float = DEFAULT_STORE_RETRY_TIMEOUT,
        random: Callable[[], float] = _random.random,
        first_claims: FirstClaims | None = None,
    ) -> None:
        self._clock = clock
        self._store = store
        self._first_claims = first_claims if hasattr(store, "add_events_claiming") else None
        self._limits = limits
        self._on_stored = on_stored
        self.retry = retry
        self.retry_timeout = retry_timeout
        self._random = random
        self._queue: list[_Submission] = []
        # Running totals, so that reading them is O(1) on every submit: the events queued
        # for a write, and those queued or being written.
        self._queued = 0
        self._unstored = 0
        self._busy = False
        self._idle: list[Deferred[None]] = []

    @property
    def waiting(self) -> int:
        """How many events wait for a write."""
        return self._queued

    @property
    def unstored(self) -> int:
        """How many events handed over are not stored yet: waiting, or being written."""
        return self._unstored

    def add(self, items: Sequence[tuple[str, bytes]]) -> Deferred[list[str]]:
        """
        Store encoded events, each for one target.

        Args:
            items: ``(target_id, encoded_event)`` pairs, in submit order.

        Returns:
            A Deferred that fires with the events' ids once every one of them is durably stored
            (they are stored together, in one database transaction), or fails with
            :class:`relayer.errors.StoreError` if none of them was stored.
        """
        bodies: list[bytes] = []
        per_target: dict[str, list[int]] = {}
        for target_id, event in items:
            per_target.setdefault(target_id, []).append(len(bodies))
            bodies.append(event)
        return self.add_grouped(bodies, per_target)

    def add_grouped(
        self,
        bodies: list[bytes],
        per_target: dict[str, list[int]],
        targets: dict[int, tuple[str, ...]] | None = None,
        event_ids: dict[int, str] | None = None,
        expires_at: dict[int, float] | None = None,
    ) -> Deferred[list[str]]:
        """
        Store encoded events already grouped by target.

        Args:
            bodies: The encoded events, each once, whatever the number of its targets.
            per_target: Each target's events, as indices into ``bodies``, in submit order.
            targets: The targets of each event submitted for several, by index.
            event_ids: The application's ids of the events that have one, by index.
            expires_at: The deadlines of the events that have one, by index.

        The grouper takes the lists and dicts over: the caller must not change them afterwards.

        Returns:
            As :meth:`add`.
        """
        done: Deferred[list[str]] = Deferred()
        submission = _Submission(
            bodies, per_target, targets or {}, event_ids or {}, expires_at or {}, done
        )
        count = len(bodies)
        self._queue.append(submission)
        self._queued += count
        self._unstored += count
        if not self._busy:
            self._write()
        return done

    def flushed(self) -> Deferred[None]:
        """A Deferred that fires once every event handed over so far has been written."""
        if not self._busy and not self._queue:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        d = Deferred()
        self._idle.append(d)
        return d

    def _write(self) -> None:
        batch: list[_Submission] = []
        count = 0
        while self._queue and (not batch or count + self._queue[0].count <= MAX_EVENTS_PER_WRITE):
            submission = self._queue.pop(0)
            batch.append(submission)
            count += submission.count
        self._queued -= count
        if len(batch) == 1:
            merged = batch[0]
        else:
            merged = _merge(batch)
        bodies = merged.bodies
        runs: list[tuple[str, Sequence[int]]] = []
        for target_id, indices in merged.per_target.items():
            max_events, max_bytes = self._limits(target_id)
            events = list(map(bodies.__getitem__, indices))
            runs.extend(
                (target_id, indices[a:b]) for a, b in run_bounds(events, max_events, max_bytes)
            )
        events_batch = EventBatch(bodies, runs, merged.targets, merged.event_ids, merged.expires_at)
        self._busy = True
        d = Deferred.fromCoroutine(
            self._store_batch(batch, events_batch, list(merged.per_target), count)
        )
        d.addErrback(
            lambda f: self.log.failure(
                "The event grouper failed", f, relayer_event=ev.GROUPER_FAILED
            )
        )

    async def _store_batch(
        self,
        batch: list[_Submission],
        events: EventBatch,
        target_ids: list[str],
        count: int,
    ) -> None:
        started = self._clock.seconds()
        attempt = 0
        settled = False
        # The first attempt also claims the first transaction of each target that is idle;
        # any other attempt stores the events alone.
        reserved: dict[str, tuple[int, int, float | None]] = {}
        if self._first_claims is not None:
            reserved = self._first_claims.reserve_first_claims(
                target_ids, MAX_FIRST_CLAIMS_PER_WRITE
            )
        claimed: Mapping[str, Claim] = {}

        def hand_over() -> None:
            # The reserved loops go on: with their claims, or claiming for themselves.
            nonlocal reserved
            if reserved:
                ids, reserved = list(reserved), {}
                try:
                    assert self._first_claims is not None
                    self._first_claims.first_claims(ids, claimed)
                except Exception:
                    self.log.failure(
                        "Handing over the first transactions of {targets} targets failed",
                        relayer_event=ev.SUBMIT_HANDOVER_FAILED,
                        targets=len(ids),
                    )

        def settle() -> None:
            # Before the submits' Deferreds fire: a submit made from their callbacks must not
            # find these events still counted as waiting.
            nonlocal settled
            if not settled:
                settled = True
                self._unstored -= count

        try:
            while True:
                try:
                    if reserved:
                        ids, claimed = await self._store.add_events_claiming(  # type: ignore[attr-defined]
                            events, self._clock.seconds(), reserved
                        )
                    else:
                        ids = await self._store.add_events(events, self._clock.seconds())
                except StoreUnavailable as e:
                    hand_over()
                    attempt += 1
                    waited = self._clock.seconds() - started
                    if waited >= self.retry_timeout:
                        self.log.error(
                            "Storing {events} submitted events failed for {waited:.1f}s "
                            "({error}); their submits fail",
                            relayer_event=ev.SUBMIT_FAILED,
                            events=count,
                            error=str(e),
                            waited=waited,
                        )
                        settle()
                        self._fail(
                            batch,
                            f"the events were not stored: the store was unavailable for "
                            f"{waited:.1f}s ({e})",
                        )
                        return
                    delay = min(
                        self.retry.delay(attempt, self._random), self.retry_timeout - waited
                    )
                    self.log.warn(
                        "Storing {events} submitted events failed ({error}); retrying in "
                        "{delay:.2f}s",
                        relayer_event=ev.SUBMIT_RETRYING,
                        events=count,
                        error=str(e),
                        delay=delay,
                        waited=waited,
                    )
                    await deferLater(self._clock, delay)
                except Exception as e:
                    if reserved:
                        # The claims failed the events' database transaction: the events are
                        # stored alone, at once, and the targets claim for themselves.
                        hand_over()
                        continue
                    self.log.failure(
                        "Storing {events} submitted events failed; their submits fail",
                        relayer_event=ev.SUBMIT_FAILED,
                        events=count,
                        error=str(e),
                        waited=self._clock.seconds() - started,
                    )
                    settle()
                    self._fail(batch, f"the events were not stored: {e}")
                    return
                else:
                    _faults.checkpoint("submit.stored")
                    settle()
                    offset = 0
                    for submission in batch:
                        n = submission.count
                        submission.done.callback(ids[offset : offset + n])
                        offset += n
                    hand_over()
                    try:
                        # A target claimed with the events has seen every one of them.
                        self._on_stored(
                            [t for t in target_ids if t not in claimed] if claimed else target_ids
                        )
                    except Exception:
                        self.log.failure(
                            "Handing over the stored events of {targets} targets failed",
                            relayer_event=ev.SUBMIT_HANDOVER_FAILED,
                            targets=len(target_ids),
                        )
                    return
        finally:
            settle()
            hand_over()
            self._busy = False
            if self._queue:
                self._write()
            elif not self._busy:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)

    @staticmethod
    def _fail(batch: list[_Submission], message: str) -> None:
        error = StoreError(message)
        for submission in batch:
            submission.done.errback(error)


def _merge(batch: list[_Submission]) -> _Submission:
    """One submission of several, their events in order."""
    bodies: list[bytes] = []
    per_target: dict[str, list[int]] = {}
    targets: dict[int, tuple[str, ...]] = {}
    event_ids: dict[int, str] = {}
    expires_at: dict[int, float] = {}
    for submission in batch:
        offset = len(bodies)
        bodies.extend(submission.bodies)
        for target_id, indices in submission.per_target.items():
            shifted = [i + offset for i in indices] if offset else indices
            merged = per_target.get(target_id)
            if merged is None:
                per_target[target_id] = list(shifted)
            else:
                merged.extend(shifted)
        pairs: list[tuple[dict[int, Any], dict[int, Any]]] = [
            (targets, submission.targets),
            (event_ids, submission.event_ids),
            (expires_at, submission.expires_at),
        ]
        for mine, theirs in pairs:
            for i, value in theirs.items():
                mine[i + offset] = value
    done: Deferred[list[str]] = Deferred()
    return _Submission(bodies, per_target, targets, event_ids, expires_at, done)
