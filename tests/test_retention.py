"""
Retention: final events are purged or archived once past their retention; nothing else is,
whatever its age.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayer import (
    ConfigurationError,
    DeliveryState,
    Event,
    InvalidTarget,
    Retention,
    Scheduler,
    TargetConfig,
)
from relayer.testing import FakeTransport, build_scheduler, open_store, step, target
from tests._support import count_rows, result_of

DAY = 86400.0


result = result_of


def states(h: Any, event_id: str) -> dict[str, DeliveryState] | None:
    status = result(h.scheduler.event_status(event_id))
    if status is None:
        return None
    return {t: d.state for t, d in status.deliveries.items()}


def by_hand(**settings: Any) -> Retention:
    # These tests run retention themselves, with purge().
    return Retention(interval=None, **settings)


def test_final_events_past_their_retention_are_purged_with_their_records(
    db_path: Path | str,
) -> None:
    h = build_scheduler(["a", "b"], path=db_path, retention=by_hand(keep=DAY), max_events=3)
    ids = result(h.scheduler.submit_many([(["a", "b"], {"n": i}) for i in range(10)]))
    step(h.clock, 1)
    assert all(
        states(h, i) == {"a": DeliveryState.DELIVERED, "b": DeliveryState.DELIVERED} for i in ids
    )
    # Not yet: a day has not passed since they were delivered.
    step(h.clock, DAY - 10)
    assert result(h.scheduler.purge()).events == 0
    assert all(states(h, i) is not None for i in ids)
    step(h.clock, 20)
    report = result(h.scheduler.purge())
    assert report.events == 10
    assert report.by_target == {"a": 10, "b": 10}
    assert report.transactions == 8  # four of at most three events, at each target
    assert report.not_final == 0 and not report.archived and not report.dry_run
    assert all(states(h, i) is None for i in ids)
    for table in ("relayer_events", "relayer_txns", "relayer_event_ids"):
        assert count_rows(h.path, table) == 0, table
    # They went for good, and the targets go on as before.
    assert result(h.scheduler.purge()).events == 0
    later = result(h.scheduler.submit("a", {"n": "later"}))
    step(h.clock, 1)
    assert states(h, later) == {"a": DeliveryState.DELIVERED}
    assert h.transport["a"].events[-1] == {"n": "later"}
    assert h.transport["a"].txn_ids == sorted(set(h.transport["a"].txn_ids))


def test_nothing_that_is_not_final_is_purged_whatever_its_age(db_path: Path | str) -> None:
    names = ["queued", "in_flight", "awaiting", "dead", "replayed", "resent", "done"]
    h = build_scheduler(names, path=db_path, retention=by_hand(keep=60), max_events=1)
    t = h.transport
    t["queued"].down()
    t["in_flight"].hold()
    t["awaiting"].never_confirm()
    t["dead"].fail_with(400)
    t["replayed"].fail_with(400)
    t["resent"].never_confirm()
    ids = {name: result(h.scheduler.submit(name, {"at": name})) for name in names}
    step(h.clock, 1)
    assert states(h, ids["dead"]) == {"dead": DeliveryState.DEAD_LETTERED}
    # A dead letter looks final; replayed, it is pending again.
    t["replayed"].down()
    assert result(h.scheduler.replay("replayed")) == 1
    assert states(h, ids["replayed"]) == {"replayed": DeliveryState.PENDING}
    # Awaiting its confirmation past the timeout: sent again, awaiting again.
    step(h.clock, 400)
    assert len(t["resent"].requests) == 2
    expected = {
        "queued": DeliveryState.PENDING,
        "in_flight": DeliveryState.PENDING,
        "awaiting": DeliveryState.AWAITING_CONFIRMATION,
        "dead": DeliveryState.DEAD_LETTERED,
        "replayed": DeliveryState.PENDING,
        "resent": DeliveryState.AWAITING_CONFIRMATION,
        "done": DeliveryState.DELIVERED,
    }
    assert {n: states(h, i)[n] for n, i in ids.items()} == expected  # type: ignore[index]
    # Age them all far past the retention, and run it, in a dry run and for real.
    h.clock.advance(30 * DAY)
    dry = result(h.scheduler.purge(dry_run=True))
    assert (dry.events, dry.not_final, dry.dry_run) == (1, 6, True)
    report = result(h.scheduler.purge())
    assert (report.events, report.not_final) == (1, 6)
    assert states(h, ids["done"]) is None
    still = {n: states(h, i) for n, i in ids.items() if n != "done"}
    assert {n: s[n] for n, s in still.items() if s is not None} == {
        n: s for n, s in expected.items() if n != "done"
    }
    # Each is still deliverable.
    for name in names:
        t[name].up()
    t["in_flight"].release()
    result(t["awaiting"].confirm())
    t["resent"].confirm()
    assert result(h.scheduler.replay("dead")) == 1
    h.scheduler.wake("queued")
    h.scheduler.wake("replayed")
    step(h.clock, 120)
    for name in names:
        if name != "done":
            assert states(h, ids[name]) == {name: DeliveryState.DELIVERED}, name
            assert {"at": name} in t[name].events, name


def test_an_event_for_several_targets_is_kept_until_it_has_passed_each_ones_retention(
    db_path: Path | str,
) -> None:
    configs = [target("short"), target("long", retention=10 * DAY), target("late")]
    h = build_scheduler(configs, path=db_path, retention=by_hand(keep=DAY))
    h.transport["late"].down()
    event_id = result(h.scheduler.submit(["short", "long", "late"], {"n": 1}))
    only_short = result(h.scheduler.submit("short", {"n": 2}))
    step(h.clock, 1)
    # Delivered at two of its three targets: not final everywhere, kept.
    h.clock.advance(2 * DAY)
    report = result(h.scheduler.purge())
    assert (report.events, report.not_final, report.by_target) == (1, 1, {"short": 1})
    assert states(h, only_short) is None
    assert states(h, event_id) is not None
    h.transport["late"].up()
    h.scheduler.wake("late")
    step(h.clock, 1)
    assert set(states(h, event_id).values()) == {DeliveryState.DELIVERED}  # type: ignore[union-attr]
    # "long" keeps its final events ten days.
    h.clock.advance(7 * DAY)
    assert result(h.scheduler.purge()).events == 0
    h.clock.advance(2 * DAY)
    report = result(h.scheduler.purge())
    assert (report.events, report.by_target) == (1, {"short": 1, "long": 1, "late": 1})
    assert states(h, event_id) is None


def test_expired_and_discarded_events_are_final(db_path: Path | str) -> None:
    h = build_scheduler(["x", "d"], path=db_path, retention=by_hand(keep=DAY))
    h.transport["x"].down()
    h.transport["d"].fail_with(422)
    expiring = result(h.scheduler.submit("x", {"n": 1}, ttl=60))
    dead = result(h.scheduler.submit("d", {"n": 2}))
    step(h.clock, 120)
    assert states(h, expiring) == {"x": DeliveryState.EXPIRED}
    assert states(h, dead) == {"d": DeliveryState.DEAD_LETTERED}
    [letter] = result(h.scheduler.dead_letters("d"))
    h.clock.advance(2 * DAY)
    report = result(h.scheduler.purge())
    assert (report.events, report.expired, report.not_final) == (1, 1, 1)
    assert states(h, expiring) is None
    # Discarded, the dead letter is final: it goes once its retention has passed.
    assert result(h.scheduler.discard("d", letter.txn_id)) is True
    assert result(h.scheduler.discard("d", letter.txn_id)) is False
    status = result(h.scheduler.event_status(dead))
    delivery = status.deliveries["d"]
    assert delivery.state is DeliveryState.DISCARDED and delivery.state.final
    assert delivery.discarded_at == h.clock.seconds()
    assert delivery.reason == letter.reason and delivery.txn_id == letter.txn_id
    assert result(h.scheduler.dead_letters("d")) == []
    assert result(h.scheduler.replay("d")) == 0
    page = result(h.scheduler.target_events("d", "discarded"))
    assert [e.event_id for e in page.entries] == [dead]
    assert result(h.scheduler.purge()).events == 0
    step(h.clock, DAY + 1)
    assert result(h.scheduler.purge()).events == 1
    assert states(h, dead) is None
    assert count_rows(h.path, "relayer_expired") == 0
    assert count_rows(h.path, "relayer_txns") == 0


@pytest.mark.parametrize("archive", [False, True])
def test_purged_ids_are_forgotten_and_archived_ones_remembered(
    db_path: Path | str, archive: bool
) -> None:
    h = build_scheduler(["t"], path=db_path, retention=by_hand(keep=60, archive=archive))
    first = result(h.scheduler.submit("t", Event({"n": 1}, event_id="order-1")))
    step(h.clock, 120)
    assert result(h.scheduler.purge()).events == 1
    assert result(h.scheduler.submit("t", Event({"n": 2}, event_id=first))) == first
    step(h.clock, 1)
    # Purged, the id is new again: the event is stored and sent. Archived, it is a repeat.
    assert h.transport["t"].events == ([{"n": 1}] if archive else [{"n": 1}, {"n": 2}])


def test_archived_events_answer_as_before(db_path: Path | str) -> None:
    h = build_scheduler(["a", "b"], path=db_path, retention=by_hand(keep=DAY, archive=True))
    h.transport["b"].fail_with(400)
    ids = result(h.scheduler.submit_many([(["a", "b"], {"n": i}) for i in range(6)]))
    step(h.clock, 1)
    h.transport["a"].down()
    expiring = result(h.scheduler.submit("a", {"n": "x"}, ttl=5))
    step(h.clock, 10)
    h.transport["a"].up()
    [letter] = result(h.scheduler.dead_letters("b"))
    assert result(h.scheduler.discard("b", letter.txn_id))
    h.clock.advance(2 * DAY)

    def answers() -> Any:
        return (
            [result(h.scheduler.event_status(i)) for i in [*ids, expiring]],
            {t: result(h.scheduler.event_counts(t)) for t in "ab"},
            {t: result(h.scheduler.event_counts(t, since=0.5, until=20)) for t in "ab"},
            [
                result(h.scheduler.target_events(t, s, limit=4))
                for t in "ab"
                for s in ("delivered", "discarded", "expired")
            ],
        )

    before = answers()
    assert before[1]["a"].delivered == 6 and before[1]["a"].expired == 1
    assert before[1]["b"].discarded == 6
    report = result(h.scheduler.purge())
    assert report.archived and report.events == 7
    assert answers() == before
    assert count_rows(h.path, "relayer_events") == 0
    assert count_rows(h.path, "relayer_txns") == 0
    assert count_rows(h.path, "relayer_archived_events") > 0
    # Delivered at a, discarded at b, and abandoned at a when its event expired.
    assert count_rows(h.path, "relayer_archived_txns") == 3
    assert count_rows(h.path, "relayer_archived_expired") == 1
    # Archived events are never purged or archived twice.
    h.clock.advance(10 * DAY)
    assert result(h.scheduler.purge()).events == 0
    assert answers()[0] == before[0]


def test_counts_per_state_and_window(db_path: Path | str) -> None:
    h = build_scheduler(["t"], path=db_path, max_events=2)
    t = h.transport["t"]
    result(h.scheduler.submit_many([("t", {"n": i}) for i in range(4)]))  # delivered at 0
    step(h.clock, 10)
    t.fail_with(400)
    result(h.scheduler.submit_many([("t", {"n": i}) for i in range(3)]))  # dead at 10
    step(h.clock, 10)
    t.down()
    result(h.scheduler.submit("t", {"n": "x"}, ttl=5))  # expires at 25
    result(h.scheduler.submit("t", {"n": "y"}))  # pending
    step(h.clock, 30)
    counts = result(h.scheduler.event_counts("t"))
    assert (counts.delivered, counts.dead_lettered, counts.expired, counts.pending) == (4, 3, 1, 1)
    assert counts.of(DeliveryState.DELIVERED) == 4
    early = result(h.scheduler.event_counts("t", until=5))
    assert (early.delivered, early.dead_lettered, early.expired, early.pending) == (4, 0, 0, 1)
    middle = result(h.scheduler.event_counts("t", since=5, until=21))
    assert (middle.delivered, middle.dead_lettered, middle.expired) == (0, 3, 0)
    assert result(h.scheduler.event_counts("t", since=21)).expired == 1
    # Listings take the same window.
    listed = result(h.scheduler.target_events("t", "dead_lettered", since=5, until=21))
    assert len(listed.entries) == 3 and all(e.at == 10 for e in listed.entries)
    assert result(h.scheduler.target_events("t", "delivered", since=5)).entries == []
    assert len(result(h.scheduler.target_events("t", "expired", since=21)).entries) == 1
    assert result(h.scheduler.target_events("t", "expired", until=21)).entries == []
    with pytest.raises(ConfigurationError):
        h.scheduler.target_events("t", "pending", since=0)
    with pytest.raises(ConfigurationError):
        h.scheduler.target_events("t", "delivered", since=10, until=0)


def test_retention_runs_in_the_scheduler_on_its_interval(db_path: Path | str) -> None:
    h = build_scheduler(["t"], path=db_path, retention=Retention(keep=60, interval=3600))
    event_id = result(h.scheduler.submit("t", {"n": 1}))
    step(h.clock, 1)
    h.clock.advance(2 * 3600)
    assert states(h, event_id) is None
    # A stopped scheduler runs no more.
    kept = result(h.scheduler.submit("t", {"n": 2}))
    step(h.clock, 1)
    result(h.scheduler.stop())
    assert not h.clock.getDelayedCalls()
    h2 = h.restart()
    assert states(h2, kept) == {"t": DeliveryState.DELIVERED}
    h2.clock.advance(2 * 3600)
    assert states(h2, kept) is None


def test_a_run_reports_progress_chunk_by_chunk(db_path: Path | str) -> None:
    h = build_scheduler(["t"], path=db_path, retention=by_hand(keep=60, chunk=10))
    for i in range(5):
        result(h.scheduler.submit_many([("t", {"n": i, "k": k}) for k in range(10)]))
    step(h.clock, 120)
    seen: list[Any] = []
    report = result(h.scheduler.purge(progress=seen.append))
    assert report.events == 50 and report.chunks == len(seen) >= 5
    assert [r.events for r in seen] == sorted(r.events for r in seen)
    assert seen[-1] == report


def test_bad_settings_are_refused(db_path: Path | str) -> None:
    for bad in (0, -1, "30d", float("nan"), True):
        with pytest.raises(ConfigurationError):
            Retention(keep=bad)
        with pytest.raises(InvalidTarget):
            TargetConfig("t", "http://t.example", "tok", retention=bad)
    with pytest.raises(ConfigurationError):
        Retention(interval=0)
    with pytest.raises(ConfigurationError):
        Retention(chunk=0)
    with pytest.raises(ConfigurationError):
        Retention(archive="yes")  # type: ignore[arg-type]
    clock_store = open_store(None, db_path)
    with pytest.raises(ConfigurationError):
        Scheduler(None, clock_store, FakeTransport(), retention=3600)  # type: ignore[arg-type]
    h = build_scheduler(["t"], path=db_path)
    with pytest.raises(ConfigurationError):
        h.scheduler.event_counts("t", since=10, until=5)
    with pytest.raises(ConfigurationError):
        h.scheduler.event_counts("t", since="yesterday")  # type: ignore[arg-type]
    for txn in (0, -1, "1", 1.0, True):
        with pytest.raises(ConfigurationError):
            h.scheduler.discard("t", txn)  # type: ignore[arg-type]
    # Without a retention, purge() keeps everything.
    event_id = result(h.scheduler.submit("t", {"n": 1}))
    h.clock.advance(100 * DAY)
    assert result(h.scheduler.purge()).events == 0
    assert states(h, event_id) == {"t": DeliveryState.DELIVERED}


def test_exports_stream_live_and_archived_events_page_by_page(db_path: Path | str) -> None:
    h = build_scheduler(["t"], path=db_path, retention=by_hand(keep=60, archive=True))
    ids = result(h.scheduler.submit_many([("t", {"n": i, "s": "\n\u2028"}) for i in range(25)]))
    step(h.clock, 120)

    def export(**options: Any) -> tuple[list[bytes], int]:
        pages: list[bytes] = []
        n = result(h.scheduler.export_events("t", "delivered", pages.append, **options))
        return pages, n

    pages, n = export(page_size=10)
    assert n == 25 and len(pages) == 3
    lines = [line for p in pages for line in p.splitlines()]
    records = [json.loads(line) for line in lines]
    assert [r["event_id"] for r in records] == ids
    assert [r["event"] for r in records] == [{"n": i, "s": "\n\u2028"} for i in range(25)]
    assert {r["state"] for r in records} == {"delivered"}
    assert all(r["at"] is not None and r["txn_id"] for r in records)
    # Archived, the same lines.
    assert result(h.scheduler.purge()).events == 25
    assert export(page_size=10)[0] == pages
    # A window; a write that returns a Deferred holds the next page back until it fires.
    assert export(until=0)[1] == 0
    waiting: list[Any] = []

    def slow_write(data: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        waiting.append((data, d))
        return d

    done = h.scheduler.export_events("t", "delivered", slow_write, page_size=20)
    assert len(waiting) == 1 and not done.called
    waiting[0][1].callback(None)
    assert len(waiting) == 2 and not done.called
    waiting[1][1].callback(None)
    assert result(done) == 25
    assert b"".join(w[0] for w in waiting) == b"".join(pages)


class StepPool:
    """A database pool that runs queued work one unit at a time, when the test says."""

    def __init__(self) -> None:
        self.queue: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def start(self) -> None:
        pass

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((lambda: f(*args, **kwargs), (), d))
        return d

    def run_one(self) -> bool:
        if not self.queue:
            return False
        work, _, d = self.queue.pop(0)
        try:
            value = work()
        except BaseException as e:
            d.errback(e)
        else:
            d.callback(value)
        return True

    def drain(self) -> None:
        while self.run_one():
            pass

    def stop(self) -> Deferred[None]:
        self.drain()
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


def delivered_by_steps(
    db_path: Path | str, n: int
) -> tuple[Clock, StepPool, FakeTransport, Scheduler]:
    """A scheduler whose database work runs a unit at a time, with ``n`` events delivered
    and past their retention, and chunks of 10."""
    clock = Clock()
    pool = StepPool()
    transport = FakeTransport(clock)
    scheduler = Scheduler(
        clock,
        open_store(clock, db_path, pool=pool),
        transport,
        [target("t", max_events=10)],
        retention=Retention(keep=60, interval=None, chunk=10),
    )
    started = scheduler.start()
    pool.drain()
    assert started.called
    for i in range(n // 10):
        scheduler.submit_many([("t", {"n": i, "k": k}) for k in range(10)])
        pool.drain()
        clock.advance(0)
        pool.drain()
    assert len(transport["t"].events) == n
    clock.advance(120)
    pool.drain()
    return clock, pool, transport, scheduler


def test_submits_and_deliveries_wait_for_one_chunk_at_most(db_path: Path | str) -> None:
    clock, pool, transport, scheduler = delivered_by_steps(db_path, 200)
    chunks: list[int] = []
    run = scheduler.purge(progress=lambda r: chunks.append(r.chunks))
    pool.run_one()
    assert chunks == [1]
    submitted = scheduler.submit("t", {"n": "during"})
    stored_after: list[int] = []
    submitted.addCallback(lambda _: stored_after.append(len(chunks)))
    while not run.called:
        pool.run_one()
        clock.advance(0)
    assert result(run).events == 200 and len(chunks) >= 20
    # Stored after the chunk that was running when it came, and sent at once.
    assert stored_after == [2]
    pool.drain()
    clock.advance(0)
    pool.drain()
    assert transport["t"].events[-1] == {"n": "during"}
    stopped = scheduler.stop()
    pool.drain()
    assert stopped.called


def test_a_purge_after_an_archive_keeps_the_records_archived_events_need(
    db_path: Path | str,
) -> None:
    # A and B go to "t" in one transaction; B also to "d", which is down. Archiving takes A
    # (final) and leaves B: their transaction's record stays live, for B. Purging later (with
    # archiving turned off) takes B: the record moves to the archive, where A still needs it.
    h = build_scheduler(["t", "d"], path=db_path, retention=by_hand(keep=1, archive=True))
    h.transport["t"].down()
    h.transport["d"].down()
    result(
        h.scheduler.submit_many(
            [("t", Event({"n": "A"}, event_id="A")), (["t", "d"], Event({"n": "B"}, event_id="B"))]
        )
    )
    h.transport["t"].up()
    h.scheduler.wake("t")
    step(h.clock, 5)
    assert states(h, "A") == {"t": DeliveryState.DELIVERED}
    [a_txn] = {d.txn_id for d in result(h.scheduler.event_status("A")).deliveries.values()}
    assert result(h.scheduler.purge()).events == 1
    h.transport["d"].up()
    h.scheduler.wake("d")
    step(h.clock, 5)
    result(h.scheduler.stop())
    h2 = build_scheduler(
        ["t", "d"], path=db_path, clock=h.clock, transport=h.transport, retention=by_hand(keep=1)
    )
    assert result(h2.scheduler.purge()).events == 1
    assert states(h2, "B") is None
    status = result(h2.scheduler.event_status("A"))
    assert status.deliveries["t"].state is DeliveryState.DELIVERED
    assert status.deliveries["t"].txn_id == a_txn
    assert result(h2.scheduler.event_counts("t")).delivered == 1


def test_a_run_by_hand_stops_after_its_chunk_when_the_scheduler_stops(db_path: Path | str) -> None:
    clock, pool, _, scheduler = delivered_by_steps(db_path, 100)
    run_over_at_close: list[bool] = []
    store = scheduler._store
    close = store.close

    def closing() -> Deferred[None]:
        run_over_at_close.append(run.called)
        return close()

    store.close = closing  # type: ignore[method-assign]
    run = scheduler.purge()
    pool.run_one()
    stopped = scheduler.stop()
    while pool.run_one():
        clock.advance(0)
    assert stopped.called and run.called
    # The store stays open until the run has stopped.
    assert run_over_at_close == [True]
    report = result(run)
    assert report.stopped and 1 <= report.chunks < 10 and report.events < 100
