"""
One view across live and archived events, while retention runs, with real threads.

A store holds a few thousand events at four targets, some of them for two or three targets,
delivered, expired (unsent, and after a send), discarded, dead-lettered, pending and awaiting
confirmation. Retention then runs, a small chunk at a time and over several times, in one
thread (two for archiving), while other threads, each with a store and a connection of its own
on the same database, ask event_counts, event_status and target_events (every page) thousands
of times. After each chunk commits, the archiver waits until a read that began after that
commit has finished, so that every state the database passes through is read.

- Archiving changes no answer: every count, status and listing stays what it was before
  retention ran, while it runs and after; at the end the archive tables hold the events and
  the live tables do not.
- Purging removes only final events: what is not final is never touched, however old; final
  counts only drop, never by more than was purged; a listing holds each event once, in order.
- One snapshot per query: a purge (or a claim) committed between two statements of a status
  query does not change its answer; on PostgreSQL, without the repeatable-read snapshot, the
  same interleaving gives answers that no state of the database ever had. An archive chunk
  committed there changes no answer even without it: each statement reads a view whole.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import sqlalchemy as sa
from _support import database_engine, result_of
from twisted.internet.task import Clock

from relayer import Delivery, DeliveryState, EventStatus
from relayer.event import GENERATED_ID_PREFIX
from relayer.store import EventBatch, EventCounts, PurgeReport, RetentionRule, SQLStore, _seqs
from relayer.store.base import Awaiting, Claim, EventEntry, TargetEventsPage, Transaction
from relayer.store.postgres import PostgresStore
from relayer.testing import open_store

TARGETS = ("a", "b", "c", "d")
#: The targets of the events of a round, by index modulo 10.
SETS = [("a",)] * 4 + [("b",)] * 2 + [("c",), ("d",), ("a", "b"), ("a", "b", "c")]
ROUNDS = 10
PER_ROUND = 240
MAX_EVENTS = 20
BIG = 10**7
START = 1000.0
STEP = 100.0
#: Final events stay 150 seconds; at c, 450.
RULE = RetentionRule(150.0, {"c": 450.0})
#: The windows that counts are asked for.
WINDOWS: list[tuple[float | None, float | None]] = [
    (None, None),
    (START + 3 * STEP, START + 8 * STEP),
    (None, START + 5 * STEP),
    (START + 9 * STEP + 4, None),
]
#: The times retention runs at, one run each: final events go in many steps.
RUN_TIMES = [START + STEP * k for k in range(3, ROUNDS + 6, 3)] + [1e9]
CHUNK = 97
#: How many reads (a listing's pages one each) the reading threads make at least, in all.
READS = 2000
READERS = 3
#: How long a thread waits for another before the test fails.
WAIT = 120.0
STATES = list(DeliveryState)
FINAL = [s for s in STATES if s.final]
#: The states counted as they are now, whatever the window.
BACKLOG = (DeliveryState.PENDING, DeliveryState.AWAITING_CONFIRMATION)


def events_of_round(r: int) -> EventBatch:
    """The events of round ``r``: ids, targets and deadlines by index, in one batch."""
    at = START + STEP * r
    bodies = []
    ids: dict[int, str] = {}
    fanned: dict[int, tuple[str, ...]] = {}
    expires: dict[int, float] = {}
    per_target: dict[str, list[int]] = {t: [] for t in TARGETS}
    for i in range(PER_ROUND):
        bodies.append(b'{"r":%d,"i":%d}' % (r, i))
        if i % 7 != 3:
            # The others have the ids the store makes up.
            ids[i] = f"r{r}-{i}"
        targets = SETS[i % 10]
        if len(targets) > 1:
            fanned[i] = targets
        for t in targets:
            per_target[t].append(i)
        if i % 13 == 0:
            # Expires unsent.
            expires[i] = at + 0.5
        elif i % 19 == 1:
            # Sent once, and then expires in its transaction, which is abandoned.
            expires[i] = at + 3
    runs = [
        (t, per_target[t][k : k + MAX_EVENTS])
        for t in TARGETS
        for k in range(0, len(per_target[t]), MAX_EVENTS)
    ]
    return EventBatch(bodies, runs, fanned, ids, expires)


@attrs.define
class Tally:
    """What the building sent where: counted from its own calls, to check the store's answers."""

    delivered: dict[str, list[tuple[float, int]]] = attrs.field(factory=dict)
    dead: dict[str, list[tuple[float, int]]] = attrs.field(factory=dict)
    discarded: dict[str, list[tuple[float, int]]] = attrs.field(factory=dict)

    def add(self, kind: dict[str, list[tuple[float, int]]], t: str, at: float, n: int) -> None:
        kind.setdefault(t, []).append((at, n))


def in_window(at: float | None, window: tuple[float | None, float | None]) -> bool:
    since, until = window
    return at is not None and (since is None or at >= since) and (until is None or at < until)


def deliver_round(store: SQLStore, r: int, tally: Tally, serial: list[int]) -> None:
    """Send each target's events of round ``r`` as the scheduler would, with fixed outcomes."""
    at = START + STEP * r
    last = r == ROUNDS - 1
    for t in TARGETS:
        if last and t == "d":
            # Left queued.
            continue
        dead: list[tuple[int, int]] = []
        claim: Claim = result_of(store.claim(t, MAX_EVENTS, BIG, at + 1))
        retry = False
        while isinstance(claim, Transaction):
            txn = claim
            serial[0] += 1
            k = serial[0]
            if last and t == "c":
                # Left pending, sent once.
                break
            if last and t == "b":
                claim = result_of(store.accepted(t, txn.txn_id, at + 500, MAX_EVENTS, BIG, at + 2))
                assert isinstance(claim, Awaiting)
                break
            if not retry and txn.deadline is not None and txn.deadline == at + 3:
                # Fails, and is retried after its deadline.
                result_of(store.fail(t, txn.txn_id, 1, at + 5, "HTTP 503", at + 1))
                retry = True
                claim = result_of(store.claim(t, MAX_EVENTS, BIG, at + 5))
                continue
            now = at + (6 if retry else 2)
            if k % 9 == 4:
                claim = result_of(
                    store.dead_letter(t, txn.txn_id, "HTTP 400", MAX_EVENTS, BIG, now)
                )
                if k % 18 == 4:
                    dead.append((txn.txn_id, len(txn.seqs)))
                else:
                    tally.add(tally.dead, t, now, len(txn.seqs))
            else:
                claim = result_of(store.complete(t, txn.txn_id, MAX_EVENTS, BIG, now))
                tally.add(tally.delivered, t, now, len(txn.seqs))
        for txn_id, n in dead:
            # Given up.
            assert result_of(store.discard(t, txn_id, at + 7))
            tally.add(tally.discarded, t, at + 7, n)


def walk(store: SQLStore, target_id: str, state: DeliveryState, limit: int) -> list[EventEntry]:
    """Every entry of a target's events in ``state``, page by page."""
    entries: list[EventEntry] = []
    after = None
    while True:
        page = result_of(store.target_events(target_id, state, after, limit))
        entries.extend(page.entries)
        if page.next is None:
            return entries
        after = page.next


@attrs.frozen
class Baseline:
    """The answers before retention runs, which archiving must never change."""

    counts: dict[tuple[str, tuple[float | None, float | None]], EventCounts]
    listings: dict[tuple[str, DeliveryState], list[EventEntry]]
    statuses: dict[str, EventStatus]
    #: Events final at every target, and the others.
    final: set[str]
    not_final: set[str]


def build(db: Path | str) -> Baseline:
    """Store and send the events, and read every answer; check them against the tally."""
    store = open_store(Clock(), db)
    result_of(store.open())
    try:
        result_of(store.register_targets(list(TARGETS)))
        tally = Tally()
        serial = [0]
        for r in range(ROUNDS):
            batch = events_of_round(r)
            result_of(store.add_events(batch, START + STEP * r))
            deliver_round(store, r, tally, serial)
        listings = {(t, s): walk(store, t, s, 500) for t in TARGETS for s in STATES}
        counts = {(t, w): result_of(store.event_counts(t, *w)) for t in TARGETS for w in WINDOWS}
        where: dict[str, dict[str, DeliveryState]] = {}
        for (t, s), entries in listings.items():
            for e in entries:
                # Each event in one state at each of its targets.
                assert t not in where.setdefault(e.event_id, {}), (e, t)
                where[e.event_id][t] = s
        assert len(where) == ROUNDS * PER_ROUND
        for t in TARGETS:
            # Every event once at each of its targets; the counts say what the listings do, and
            # what was sent.
            mine = [e for e, at in where.items() if t in at]
            assert len(mine) == ROUNDS * sum(t in SETS[i % 10] for i in range(PER_ROUND))
            for w in WINDOWS:
                c = counts[(t, w)]
                for s in STATES:
                    listed = listings[(t, s)]
                    if s in BACKLOG:
                        assert c.of(s) == len(listed), (t, s)
                    else:
                        assert c.of(s) == sum(in_window(e.at, w) for e in listed), (t, w, s)
                for s, kind in (
                    (DeliveryState.DELIVERED, tally.delivered),
                    (DeliveryState.DEAD_LETTERED, tally.dead),
                    (DeliveryState.DISCARDED, tally.discarded),
                ):
                    assert c.of(s) == sum(n for at, n in kind.get(t, []) if in_window(at, w))
        final = {e for e, at in where.items() if all(s.final for s in at.values())}
        not_final = set(where) - final
        # Every state is there, at some target; events expired unsent, and in a transaction.
        for s in STATES:
            assert any(listings[(t, s)] for t in TARGETS), s
        assert {t is None for (t,) in rows(db, "relayer_expired", "txn_id")} == {True, False}
        rng = random.Random(5)
        sample = rng.sample(sorted(final), 100) + rng.sample(sorted(not_final), 40)
        statuses = {}
        for event_id in sample:
            status = result_of(store.event_status(event_id))
            assert status is not None
            assert {t: d.state for t, d in status.deliveries.items()} == where[event_id]
            statuses[event_id] = status
        return Baseline(counts, listings, statuses, final, not_final)
    finally:
        result_of(store.close())


# -- what the tables hold ---------------------------------------------------------------------


def rows(db: Path | str, table: str, columns: str) -> list[tuple[Any, ...]]:
    engine = database_engine(db)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(f"SELECT {columns} FROM {table}"))]
    finally:
        engine.dispose()


@attrs.frozen
class Tables:
    """What the tables that retention changes hold, live and archived, read with SQL."""

    #: Each block's events, as (number, id).
    blocks: list[list[tuple[int, str]]]
    archived_blocks: list[list[tuple[int, str]]]
    #: Transaction records, by (target, txn id): their events' numbers.
    txns: dict[tuple[str, int], set[int]]
    archived_txns: dict[tuple[str, int], set[int]]
    #: Expiry records, as (target, number).
    expired: set[tuple[str, int]]
    archived_expired: set[tuple[str, int]]
    ids: set[str]

    @classmethod
    def read(cls, db: Path | str) -> Tables:
        def blocks(table: str) -> list[list[tuple[int, str]]]:
            found = []
            for seqs, ids in rows(db, table, "seqs, ids"):
                numbers = _seqs.decode(seqs)
                named = json.loads(ids) if ids else [None] * len(numbers)
                found.append(
                    [
                        (s, n or f"{GENERATED_ID_PREFIX}{s}")
                        for s, n in zip(numbers, named, strict=True)
                    ]
                )
            return found

        def txns(table: str) -> dict[tuple[str, int], set[int]]:
            found = rows(db, table, "target_id, txn_id, seqs")
            return {(t, int(x)): set(_seqs.decode(seqs)) for t, x, seqs in found}

        def expired(table: str) -> set[tuple[str, int]]:
            return {(t, int(seq)) for t, seq in rows(db, table, "target_id, seq")}

        return cls(
            blocks("relayer_events"),
            blocks("relayer_archived_events"),
            txns("relayer_txns"),
            txns("relayer_archived_txns"),
            expired("relayer_expired"),
            expired("relayer_archived_expired"),
            {e for (e,) in rows(db, "relayer_event_ids", "event_id")},
        )

    def kept(self) -> set[int]:
        """The numbers of the live events."""
        return {s for b in self.blocks for s, _ in b}

    def check(self, before: Tables, baseline: Baseline, archived: bool) -> int:
        """
        Check what retention left, against what was there before it ran (nothing archived)
        and the events that were final everywhere, once the last run has made every final
        event due; return how many events went.

        Every event is in one block, live or gone (archived, when archiving); a block that is
        left holds an event that is not final, and a block that went only final events; a
        transaction record goes with the last of its events, an expiry record with its event,
        each once; purged events' ids go with them, archived ones' stay.
        """
        assert not before.archived_blocks and not before.archived_txns
        every = [e for b in before.blocks for e in b]
        assert len(every) == len({e for _, e in every}) == ROUNDS * PER_ROUND
        live = [e for b in self.blocks for e in b]
        for b in self.blocks:
            assert not {e for _, e in b} <= baseline.final, f"a block of final events is left: {b}"
        left = {tuple(b) for b in self.blocks}
        gone = [b for b in before.blocks if tuple(b) not in left]
        for b in gone:
            assert {e for _, e in b} <= baseline.final, f"an event not final went: {b}"
        assert sorted(live + [e for b in gone for e in b]) == sorted(every)
        if archived:
            assert sorted(map(sorted, self.archived_blocks)) == sorted(map(sorted, gone))
        else:
            assert not self.archived_blocks
        kept = self.kept()
        assert self.txns == {k: v for k, v in before.txns.items() if v & kept}
        assert self.expired == {k for k in before.expired if k[1] in kept}
        if archived:
            assert self.archived_txns == {k: v for k, v in before.txns.items() if not v & kept}
            assert self.archived_expired == before.expired - self.expired
            assert self.ids == before.ids
        else:
            assert not self.archived_txns and not self.archived_expired
            assert self.ids == {e for _, e in live if e in before.ids}
        return len(every) - len(live)


# -- threads ----------------------------------------------------------------------------------


class Steps:
    """
    The chunks that retention has committed, and the reads meanwhile.

    After each chunk commits, the thread that ran it waits in :meth:`committed` until a read
    that began after the commit has finished: every state the database passes through is
    read, while the other readers' reads run across the commits.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.chunks = 0
        self._read_at = 0
        self.reads = 0
        #: Reads during which a chunk committed.
        self.across = 0
        #: What each target had purged after each chunk, in order of the chunks.
        self.history: list[dict[str, int]] = [{}]
        self.errors: list[str] = []

    def committed(self, purged: dict[str, int] | None = None) -> None:
        with self._cond:
            if purged is not None:
                self.history.append(purged)
            self.chunks += 1
            n = self.chunks
            if not self._cond.wait_for(lambda: self._read_at >= n or bool(self.errors), WAIT):
                self.errors.append(f"no read finished after chunk {n}")

    def read(self, f: Callable[[], Any]) -> tuple[Any, int]:
        """``f()``, and how many chunks had committed when it finished."""
        with self._cond:
            began = self.chunks
        result = f()
        with self._cond:
            self.reads += 1
            ended = self.chunks
            if ended != began:
                self.across += 1
            if began > self._read_at:
                self._read_at = began
                self._cond.notify_all()
        return result, ended

    def fail(self, message: str) -> None:
        with self._cond:
            self.errors.append(message)
            self._cond.notify_all()


def run_threads(targets: list[Callable[[], None]], steps: Steps) -> None:
    """Run each function on a thread of its own; record what any of them raised."""

    def guarded(f: Callable[[], None]) -> None:
        try:
            f()
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            steps.fail(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=guarded, args=(f,), daemon=True) for f in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 4)
    assert not any(t.is_alive() for t in threads), "a thread never ended"


def call(f: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A function that calls the store's method ``f`` and returns what it fired with."""
    return lambda: result_of(f(*args))


def open_stores(db: Path | str, n: int) -> list[SQLStore]:
    stores = []
    for _ in range(n):
        store = open_store(Clock(), db)
        result_of(store.open())
        stores.append(store)
    return stores


def pages(
    steps: Steps, store: SQLStore, target_id: str, state: DeliveryState, limit: int
) -> list[EventEntry]:
    """A full listing, each page a read of its own."""
    entries: list[EventEntry] = []
    after = None
    while True:
        page, _ = steps.read(call(store.target_events, target_id, state, after, limit))
        assert len(page.entries) <= limit
        entries.extend(page.entries)
        if page.next is None:
            return entries
        after = page.next


class Reads:
    """What the reading threads ask, chosen at random: counts, statuses and listings."""

    def __init__(self, baseline: Baseline, seed: int) -> None:
        self.baseline = baseline
        self.rng = random.Random(seed)
        self.sample = sorted(baseline.statuses)

    def choose(self) -> tuple[str, Any]:
        rng = self.rng
        roll = rng.random()
        t = rng.choice(TARGETS)
        if roll < 0.45:
            return "counts", (t, rng.choice(WINDOWS))
        if roll < 0.9:
            return "status", rng.choice(self.sample)
        # Mostly delivered events; pages that end inside a transaction, and at its end.
        state = DeliveryState.DELIVERED if rng.random() < 0.7 else rng.choice(STATES)
        return "listing", (t, state, rng.choice([20, 113, 400]))


def test_archiving_changes_no_answer_while_it_runs(db_path: Path | str) -> None:
    baseline = build(db_path)
    before = Tables.read(db_path)
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    archivers = open_stores(db_path, 2)
    readers = open_stores(db_path, READERS)
    steps = Steps()
    archived = threading.Event()
    running = [len(archivers)]
    guard = threading.Lock()
    start = threading.Barrier(len(archivers), timeout=WAIT)
    reports: list[PurgeReport] = []

    def archive(store: SQLStore) -> Callable[[], None]:
        def run() -> None:
            try:
                for now in RUN_TIMES:
                    # Both start each run together: on PostgreSQL, one of them gives way.
                    start.wait()
                    report = result_of(
                        store.purge(
                            RULE,
                            now,
                            archive=True,
                            chunk=CHUNK,
                            progress=lambda _: steps.committed(),
                            keep_going=lambda: not steps.errors,
                        )
                    )
                    with guard:
                        reports.append(report)
            except BaseException:
                start.abort()
                raise
            finally:
                with guard:
                    running[0] -= 1
                    if not running[0]:
                        archived.set()

        return run

    def read(store: SQLStore, n: int) -> Callable[[], None]:
        def run() -> None:
            reads = Reads(baseline, seed + n)
            while not steps.errors and not (archived.is_set() and steps.reads >= READS):
                kind, arg = reads.choose()
                if kind == "counts":
                    got, _ = steps.read(call(store.event_counts, arg[0], *arg[1]))
                    want: Any = baseline.counts[arg]
                elif kind == "status":
                    got, _ = steps.read(call(store.event_status, arg))
                    want = baseline.statuses[arg]
                else:
                    got = pages(steps, store, *arg)
                    want = baseline.listings[arg[:2]]
                if got != want:
                    steps.fail(f"{kind} {arg} (seed {seed}): {got} instead of {want}")

        return run

    try:
        run_threads(
            [archive(s) for s in archivers] + [read(s, n) for n, s in enumerate(readers)], steps
        )
    finally:
        for store in archivers + readers:
            result_of(store.close())
    assert steps.errors == []
    print(
        f"{steps.reads} reads, {steps.across} across a commit; {steps.chunks} chunks; "
        f"{sum(r.events for r in reports)} events archived"
    )
    assert steps.reads >= READS
    assert len(reports) == len(archivers) * len(RUN_TIMES)
    assert steps.chunks == sum(r.chunks for r in reports) > 3 * len(RUN_TIMES)
    assert steps.across > 0
    assert all(r.archived for r in reports)
    # Each event was archived once, by one run; the ids stay, so that a repeat is recognised.
    assert Tables.read(db_path).check(before, baseline, True) == sum(r.events for r in reports)
    # And every answer is still what it was.
    (store,) = open_stores(db_path, 1)
    try:
        for (t, w), counts in baseline.counts.items():
            assert result_of(store.event_counts(t, *w)) == counts
        for e, status in baseline.statuses.items():
            assert result_of(store.event_status(e)) == status
        for (t, s), entries in baseline.listings.items():
            assert walk(store, t, s, 71) == entries
    finally:
        result_of(store.close())


class Purged:
    """What one reading thread saw while events were purged, to check each answer against."""

    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline
        #: The lowest count of each final state seen, by target and window.
        self.lowest: dict[tuple[str, Any, DeliveryState], int] = {}
        #: Sample events seen gone, and events missing from listings.
        self.gone: set[str] = set()
        self.missing: dict[tuple[str, DeliveryState], set[str]] = {}
        #: (target, how far its final count fell, chunks committed when that was read).
        self.drops: list[tuple[str, int, int]] = []

    def counts(self, key: tuple[str, Any], got: EventCounts, ended: int) -> str | None:
        want = self.baseline.counts[key]
        for s in STATES:
            if not s.final and got.of(s) != want.of(s):
                return f"{s.value} changed"
        for s in FINAL:
            where = (key[0], key[1], s)
            lowest = self.lowest.get(where, want.of(s))
            if got.of(s) > lowest:
                return f"{s.value} rose from {lowest}"
            self.lowest[where] = got.of(s)
        if key[1] == (None, None):
            drop = sum(want.of(s) - got.of(s) for s in FINAL)
            self.drops.append((key[0], drop, ended))
        return None

    def status(self, event_id: str, got: EventStatus | None) -> str | None:
        want = self.baseline.statuses[event_id]
        if event_id in self.baseline.not_final:
            return None if got == want else "a status that is not final changed"
        if got is None:
            self.gone.add(event_id)
            return None
        if event_id in self.gone:
            return "a purged event is back"
        return None if got == want else "a final status changed"

    def listing(self, key: tuple[str, DeliveryState], got: list[EventEntry]) -> str | None:
        want = self.baseline.listings[key]
        if not key[1].final:
            return None if got == want else "a listing of events that are not final changed"
        # The events still there, each once, in their order, as they were.
        index = {e.event_id: n for n, e in enumerate(want)}
        at = [index.get(e.event_id, -1) for e in got]
        if (
            at != sorted(set(at))
            or -1 in at
            or any(want[n] != e for n, e in zip(at, got, strict=True))
        ):
            return "not the events that were there, each once, in order"
        missing = set(index) - {e.event_id for e in got}
        if not self.missing.get(key, set()) <= missing:
            return "a purged event is listed again"
        self.missing[key] = missing
        return None


def test_purging_removes_only_final_events_and_counts_each_once(db_path: Path | str) -> None:
    baseline = build(db_path)
    before = Tables.read(db_path)
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    (purger,) = open_stores(db_path, 1)
    readers = open_stores(db_path, READERS)
    steps = Steps()
    purged = threading.Event()
    reports: list[PurgeReport] = []
    seen = [Purged(baseline) for _ in readers]
    # The runs as before, and then one that keeps nothing, long after: all the final events go,
    # and nothing else, however old.
    runs = [(RULE, now) for now in RUN_TIMES] + [(RetentionRule(0.0), 1e12)]

    def purge() -> None:
        total: dict[str, int] = {}

        def progress(report: PurgeReport) -> None:
            steps.committed({t: total.get(t, 0) + report.by_target.get(t, 0) for t in TARGETS})

        try:
            for rule, now in runs:
                report = result_of(
                    purger.purge(
                        rule,
                        now,
                        chunk=CHUNK,
                        progress=progress,
                        keep_going=lambda: not steps.errors,
                    )
                )
                reports.append(report)
                for t, n in report.by_target.items():
                    total[t] = total.get(t, 0) + n
        finally:
            purged.set()

    def read(store: SQLStore, n: int) -> Callable[[], None]:
        def run() -> None:
            reads = Reads(baseline, seed + n)
            check = seen[n]
            while not steps.errors and not (purged.is_set() and steps.reads >= READS):
                kind, arg = reads.choose()
                if kind == "counts":
                    got, ended = steps.read(call(store.event_counts, arg[0], *arg[1]))
                    wrong = check.counts(arg, got, ended)
                elif kind == "status":
                    got, _ = steps.read(call(store.event_status, arg))
                    wrong = check.status(arg, got)
                else:
                    got = pages(steps, store, *arg)
                    wrong = check.listing(arg[:2], got)
                if wrong:
                    steps.fail(f"{kind} {arg} (seed {seed}): {wrong}: {got}")

        return run

    try:
        run_threads([purge] + [read(s, n) for n, s in enumerate(readers)], steps)
    finally:
        for store in [purger, *readers]:
            result_of(store.close())
    assert steps.errors == []
    print(
        f"{steps.reads} reads, {steps.across} across a commit; {steps.chunks} chunks; "
        f"{sum(r.events for r in reports)} events purged"
    )
    assert steps.reads >= READS
    assert len(reports) == len(runs)
    assert steps.chunks == sum(r.chunks for r in reports) > 3 * len(runs)
    assert steps.across > 0
    # A count fell by no more than had been purged at the target when it was read (the chunk
    # then under way included).
    history = steps.history
    for check in seen:
        for t, drop, ended in check.drops:
            assert 0 <= drop <= history[min(ended + 1, len(history) - 1)].get(t, 0)
    after = Tables.read(db_path)
    assert after.check(before, baseline, False) == sum(r.events for r in reports)
    assert reports[-1].not_final > 0
    kept = {e for b in after.blocks for _, e in b}
    (store,) = open_stores(db_path, 1)
    try:
        for e, status in baseline.statuses.items():
            assert result_of(store.event_status(e)) == (status if e in kept else None)
        for (t, s), entries in baseline.listings.items():
            assert walk(store, t, s, 71) == [e for e in entries if e.event_id in kept]
        for t, w in baseline.counts:
            got = result_of(store.event_counts(t, *w))
            for s in STATES:
                left = sum(
                    e.event_id in kept and (s in BACKLOG or in_window(e.at, w))
                    for e in baseline.listings[(t, s)]
                )
                assert got.of(s) == left, (t, w, s)
    finally:
        result_of(store.close())


def test_counts_after_a_purge_are_of_what_is_kept(db_path: Path | str) -> None:
    """
    A delivered transaction whose events are purged in part keeps its record (it goes with the
    last of its events), and event_counts counts only the events still kept.
    """
    store = open_store(Clock(), db_path)
    result_of(store.open())
    try:
        result_of(store.register_targets(["a", "b"]))
        # One transaction at a, of events for a alone and of events for a and b.
        both = {i: ("a", "b") for i in range(1, 10, 2)}
        bodies = [b'{"n":%d}' % i for i in range(10)]
        runs = [("a", list(range(10))), ("b", sorted(both))]
        ids = {i: f"e{i}" for i in range(10)}
        result_of(store.add_events(EventBatch(bodies, runs, both, ids), 1.0))
        txn = result_of(store.claim("a", 10, BIG, 2.0))
        assert result_of(store.complete("a", txn.txn_id, 10, BIG, 3.0)) is None
        # Dead at b: the events for both are not final.
        txn = result_of(store.claim("b", 10, BIG, 2.0))
        assert result_of(store.dead_letter("b", txn.txn_id, "HTTP 400", 10, BIG, 3.0)) is None
        report = result_of(store.purge(RetentionRule(0.0), 100.0))
        assert report.events == 5
        assert result_of(store.event_status("e0")) is None
        listed = walk(store, "a", DeliveryState.DELIVERED, 100)
        assert [e.event_id for e in listed] == [f"e{i}" for i in range(1, 10, 2)]
        # EventCounts: "purged events are no longer counted".
        assert result_of(store.event_counts("a", None, None)).delivered == len(listed)
        # The rest go once final: then the record too.
        letter = result_of(store.dead_letters("b", 10))[0]
        assert result_of(store.discard("b", letter.txn_id, 4.0))
        assert result_of(store.purge(RetentionRule(0.0), 100.0)).events == 5
        assert result_of(store.event_counts("a", None, None)).delivered == 0
        assert result_of(store.event_counts("b", None, None)).discarded == 0
    finally:
        result_of(store.close())


# -- one snapshot per query -------------------------------------------------------------------


class Pause:
    """
    Holds a thread that reads through ``engine`` at the first statement that names
    ``needle``, before it runs (or after), until :meth:`go`.
    """

    def __init__(self, engine: sa.Engine, needle: str, after: bool) -> None:
        self.engine = engine
        self.needle = needle
        self.when = "after_cursor_execute" if after else "before_cursor_execute"
        self.reached = threading.Event()
        self._go = threading.Event()
        self._done = False
        sa.event.listen(engine, self.when, self._statement)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not self._done and self.needle in statement:
            self._done = True
            self.reached.set()
            assert self._go.wait(WAIT), "never let go"

    def go(self) -> None:
        self._go.set()

    def remove(self) -> None:
        sa.event.remove(self.engine, self.when, self._statement)


def small(store: SQLStore) -> None:
    """At a, four events delivered and two expired; at b, four queued."""
    result_of(store.register_targets(["a", "b"]))
    bodies = [b'{"n":%d}' % i for i in range(10)]
    ids = {i: f"a{i}" if i < 6 else f"b{i - 6}" for i in range(10)}
    runs = [("a", list(range(6))), ("b", list(range(6, 10)))]
    result_of(store.add_events(EventBatch(bodies, runs, {}, ids, {4: 1.5, 5: 1.5}), 1.0))
    txn = result_of(store.claim("a", 10, BIG, 2.0))
    assert len(txn.seqs) == 4
    assert result_of(store.complete("a", txn.txn_id, 10, BIG, 3.0)) is None


def purge_all(store: SQLStore) -> None:
    report = result_of(store.purge(RetentionRule(0.0), 100.0))
    assert report.events == 6


def claim_b(store: SQLStore) -> None:
    assert len(result_of(store.claim("b", 10, BIG, 5.0)).seqs) == 4


def archive_all(store: SQLStore) -> None:
    report = result_of(store.purge(RetentionRule(0.0), 100.0, archive=True))
    assert report.events == 6


@attrs.frozen
class Interleaving:
    """A read held at one of its statements while another store commits a change."""

    read: Callable[[SQLStore], Any]
    #: The statement it is held at (before it runs, or after).
    needle: str
    after: bool
    change: Callable[[SQLStore], None]
    #: What it answers without a snapshot, from the answers before and after the change; None
    #: if it answers as it did before, all the same.
    torn: Callable[[Any, Any], Any] | None


def torn_status(before: EventStatus, after: None) -> EventStatus:
    # Found, and then its transaction record gone: as if it had never been sent.
    return attrs.evolve(before, deliveries={"a": Delivery("a", DeliveryState.PENDING)})


#: Reads of a0 (delivered at a): its status, held before its transactions are read; a's
#: counts, held before the expired events are counted; the first page of a's delivered
#: events, held after their transactions are read and before the events are.
STATUS = (lambda s: result_of(s.event_status("a0")), "FROM relayer_all_txns", False)
COUNTS = (lambda s: result_of(s.event_counts("a", None, None)), "FROM relayer_all_expired", False)
LISTING = (
    lambda s: result_of(s.target_events("a", DeliveryState.DELIVERED, None, 2)),
    "FROM relayer_all_txns",
    True,
)

INTERLEAVINGS = {
    # The event is found, and then its delivery is looked for, after it was purged.
    "status-purge": Interleaving(*STATUS, purge_all, torn_status),
    # Delivered events counted before the purge, expired ones after.
    "counts-purge": Interleaving(
        *COUNTS, purge_all, lambda before, after: attrs.evolve(before, expired=after.expired)
    ),
    # The transactions read before the purge, their events after.
    "listing-purge": Interleaving(
        *LISTING, purge_all, lambda before, after: TargetEventsPage([], before.next)
    ),
    # The queue counted before a claim, and the transaction it formed after: each event twice.
    "pending-claim": Interleaving(
        lambda s: result_of(s.event_counts("b", None, None)),
        "FROM relayer_txns",
        False,
        claim_b,
        lambda before, after: attrs.evolve(before, pending=before.pending + after.pending),
    ),
    # Archiving moves rows from one table of a view to the other in one transaction, and each
    # statement reads the view whole: no statement of these reads sees a change in them.
    "status-archive": Interleaving(*STATUS, archive_all, None),
    "counts-archive": Interleaving(*COUNTS, archive_all, None),
    "listing-archive": Interleaving(*LISTING, archive_all, None),
}


@pytest.mark.parametrize(
    "snapshot",
    [True, pytest.param(False, marks=pytest.mark.postgres_only)],
    ids=["snapshot", "no-snapshot"],
)
@pytest.mark.parametrize("name", list(INTERLEAVINGS))
def test_a_change_committed_during_a_query_does_not_change_its_answer(
    db_path: Path | str, name: str, snapshot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = INTERLEAVINGS[name]
    writer, reader = open_stores(db_path, 2)
    try:
        small(writer)
        before = case.read(reader)
        if not snapshot:
            monkeypatch.setattr(PostgresStore, "_begin_snapshot", lambda self, conn: None)
        pause = Pause(reader._read_engine, case.needle, case.after)
        answers: list[Any] = []
        thread = threading.Thread(target=lambda: answers.append(case.read(reader)), daemon=True)
        thread.start()
        try:
            assert pause.reached.wait(WAIT), "the read never reached the statement"
            case.change(writer)
        finally:
            pause.go()
            thread.join(WAIT)
            pause.remove()
        # (The change asserts what it did.)
        after = case.read(reader)
        (answer,) = answers
        if case.torn is None:
            # Archived: nothing changed, and nothing changed under the read.
            assert answer == after == before
        elif snapshot:
            # As if it had run before the change, all of it.
            assert answer == before
        else:
            # An answer that no state of the database ever had.
            assert answer == case.torn(before, after)
            assert answer not in (before, after)
    finally:
        for store in (writer, reader):
            result_of(store.close())
