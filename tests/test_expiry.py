"""Expiry: an event's deadline (expires_at, ttl, a target's default_ttl) and what it does."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from _support import GatedStore, count_events, result_of, run_clock
from twisted.internet.task import Clock

from relayer import DeliveryState, Event, InvalidEvent, InvalidTarget, Scheduler, TargetState
from relayer.testing import FakeTarget, FakeTransport, Harness, build_scheduler, open_store, target


def submit(h: Harness, *args: Any, **kwargs: Any) -> str:
    return result_of(h.scheduler.submit(*args, **kwargs))


def delivery(h: Harness, event_id: str, target_id: str = "a") -> Any:
    status = result_of(h.scheduler.event_status(event_id))
    assert status is not None
    return status.deliveries[target_id]


def sent(fake: FakeTarget) -> list[tuple[float, int, list[Any]]]:
    """Every request: its time, its transaction id and its events."""
    return [
        (at, txn_id, json.loads(body)["events"])
        for at, (txn_id, body) in zip(fake.times, fake.requests, strict=True)
    ]


def expired_ids(h: Harness, target_id: str = "a") -> list[tuple[str, float | None]]:
    page = result_of(h.scheduler.target_events(target_id, DeliveryState.EXPIRED, limit=1000))
    assert page.next is None
    return [(e.event_id, e.at) for e in page.entries]


def test_a_queued_event_past_its_expires_at_is_skipped(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=10)
    fake = h.transport["a"]
    fake.down()
    first = submit(h, "a", {"n": 0})  # formed and failing: the others queue behind it
    late = submit(h, "a", {"n": 1}, expires_at=10.0)
    after = submit(h, "a", {"n": 2})
    status = result_of(h.scheduler.event_status(late))
    assert status is not None and status.expires_at == 10.0
    run_clock(h.clock, 12.0)
    fake.up()
    run_clock(h.clock, 10.0)  # the retry at 14 delivers
    assert fake.events == [{"n": 0}, {"n": 2}]
    assert [txn_id for txn_id, _ in fake.requests] == [1, 1, 1, 1, 2]
    d = delivery(h, late)
    assert d.state is DeliveryState.EXPIRED
    assert d.expired_at == 14.0
    assert (d.txn_id, d.delivered_at) == (None, None)
    assert delivery(h, first).state is DeliveryState.DELIVERED
    assert delivery(h, after).state is DeliveryState.DELIVERED
    assert expired_ids(h) == [(late, 14.0)]
    assert result_of(h.scheduler.status())[0].state is TargetState.UP


def test_ttl_is_counted_from_the_submit(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    fake = h.transport["a"]
    run_clock(h.clock, 3.0)
    fake.down()
    submit(h, "a", {"n": 0})
    live = submit(h, "a", {"n": 1}, ttl=100.0)
    dead = submit(h, "a", Event({"n": 2}, ttl=5.0))
    for event_id, deadline in ((live, 103.0), (dead, 8.0)):
        status = result_of(h.scheduler.event_status(event_id))
        assert status is not None and status.expires_at == deadline
        assert status.submitted_at == 3.0
    run_clock(h.clock, 5.5)  # the retry at 3 + 2 fails
    fake.up()
    run_clock(h.clock, 4.0)  # the retry at 3 + 2 + 4 = 9 finds the second one expired
    assert fake.events == [{"n": 0}, {"n": 1}]
    assert delivery(h, dead).expired_at == 9.0
    assert delivery(h, live).state is DeliveryState.DELIVERED


def test_a_targets_default_ttl_applies_there_only(db_path: Path) -> None:
    h = build_scheduler([target("a", default_ttl=30.0), target("b")], path=db_path)
    for t in "ab":
        h.transport[t].down()
        submit(h, t, {"n": 0})
    plain = submit(h, ["a", "b"], {"n": 1})
    own = submit(h, ["a", "b"], {"n": 2}, expires_at=100.0)
    status = result_of(h.scheduler.event_status(plain))
    assert status is not None and status.expires_at is None
    run_clock(h.clock, 40.0)
    for t in "ab":
        h.transport[t].up()
    run_clock(h.clock, 30.0)  # the retries at 62
    # At a, the events without a deadline of their own expired 30 s after their submit; an
    # event's own deadline comes before the target's default, even when it is later.
    assert h.transport["a"].events == [{"n": 2}]
    assert h.transport["b"].events == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert delivery(h, plain, "a").state is DeliveryState.EXPIRED
    # Found expired by the retry at 30, the deadline itself.
    assert delivery(h, plain, "a").expired_at == 30.0
    assert delivery(h, plain, "b").state is DeliveryState.DELIVERED
    assert delivery(h, own, "a").state is DeliveryState.DELIVERED
    assert expired_ids(h, "b") == []


def test_an_event_already_past_its_deadline_at_submit_is_never_sent(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    run_clock(h.clock, 50.0)
    gone = submit(h, "a", {"n": 1}, expires_at=10.0)
    now = submit(h, "a", {"n": 2}, expires_at=50.0)  # a deadline is exclusive
    kept = submit(h, "a", {"n": 3})
    assert h.transport["a"].events == [{"n": 3}]
    assert h.transport["a"].txn_ids == [1]
    assert expired_ids(h) == [(gone, 50.0), (now, 50.0)]
    assert delivery(h, kept).state is DeliveryState.DELIVERED


def test_a_formed_transaction_with_an_expired_event_is_abandoned_before_its_retry(
    db_path: Path,
) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=10)
    fake = h.transport["a"]
    fake.down()
    ids = result_of(
        h.scheduler.submit_many([("a", {"n": 1}), ("a", Event({"n": 2}, ttl=5.0)), ("a", {"n": 3})])
    )
    behind = submit(h, "a", {"n": 4})  # queued behind transaction 1
    run_clock(h.clock, 2.0)
    assert sent(fake) == [(0.0, 1, [{"n": 1}, {"n": 2}, {"n": 3}])] * 1 + [
        (2.0, 1, [{"n": 1}, {"n": 2}, {"n": 3}])
    ]
    fake.up()
    run_clock(h.clock, 4.0)  # the retry at 6, after the deadline at 5
    # Transaction 1 was abandoned: its live events went out, in order, under a new id, with
    # the events queued behind them.
    assert sent(fake)[2:] == [(6.0, 2, [{"n": 1}, {"n": 3}, {"n": 4}])]
    assert fake.events == [{"n": 1}, {"n": 3}, {"n": 4}]
    assert fake.txn_ids == [2]
    run_clock(h.clock, 600)
    assert [txn_id for _, txn_id, _ in sent(fake)] == [1, 1, 2]
    assert delivery(h, ids[1]).state is DeliveryState.EXPIRED
    assert delivery(h, ids[1]).expired_at == 6.0
    for event_id in (ids[0], ids[2], behind):
        d = delivery(h, event_id)
        assert (d.state, d.txn_id, d.attempts) == (DeliveryState.DELIVERED, 2, 1)
    assert fake.violations == []


def test_an_abandoned_transaction_is_not_sent_again_when_the_target_stays_down(
    db_path: Path,
) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=10)
    fake = h.transport["a"]
    fake.down()
    ids = result_of(
        h.scheduler.submit_many([("a", Event({"n": 1}, ttl=6.0)), ("a", Event({"n": 2}))])
    )
    run_clock(h.clock, 60.0)
    # A deadline equal to the retry's time counts as passed: the retry at 6 is the new one.
    assert [(at, txn_id) for at, txn_id, _ in sent(fake)] == [
        (0.0, 1),
        (2.0, 1),
        (6.0, 2),
        (14.0, 2),
        (30.0, 2),
    ]
    assert all(events == [{"n": 2}] for _, txn_id, events in sent(fake) if txn_id == 2)
    d = delivery(h, ids[1])
    assert (d.state, d.txn_id, d.attempts, d.last_attempt_at) == (
        DeliveryState.PENDING,
        2,
        3,
        30.0,
    )
    assert d.next_attempt_at == 62.0
    assert delivery(h, ids[0]).expired_at == 6.0


def test_a_transaction_whose_events_all_expired_is_abandoned_and_the_target_goes_on(
    db_path: Path,
) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=10)
    fake = h.transport["a"]
    fake.down()
    ids = result_of(
        h.scheduler.submit_many([("a", Event({"n": 1}, ttl=3.0)), ("a", Event({"n": 2}, ttl=4.0))])
    )
    run_clock(h.clock, 10.0)
    # The retry at 6 found nothing left to send.
    assert [(at, txn_id) for at, txn_id, _ in sent(fake)] == [(0.0, 1), (2.0, 1)]
    assert expired_ids(h) == [(ids[0], 6.0), (ids[1], 6.0)]
    fake.up()
    submit(h, "a", {"n": 3})
    # The target never answered: it stays DOWN, and the new event waits for its next retry
    # rather than go out at once.
    assert fake.received == []
    run_clock(h.clock, 600)
    assert fake.received[-1].events == [{"n": 3}]
    assert fake.txn_ids == [2]
    assert [txn_id for _, txn_id, _ in sent(fake)] == [1, 1, 2]


def test_expiry_is_kept_across_restarts(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=10)
    fake = h.transport["a"]
    fake.down()
    gone = submit(h, "a", {"n": 1}, ttl=1.0)  # formed, failing
    later = submit(h, "a", {"n": 2}, expires_at=20.0)  # queued
    kept = submit(h, "a", {"n": 3})
    run_clock(h.clock, 3.0)
    h = h.restart()
    run_clock(h.clock, 10.0)
    h = h.restart(stop=False)
    run_clock(h.clock, 15.0)
    fake = h.transport["a"]
    fake.up()
    run_clock(h.clock, 600)
    assert fake.events == [{"n": 3}]
    # Nothing was ever sent at or after its deadline.
    for at, _, events in sent(fake):
        if {"n": 1} in events:
            assert at < 1.0
        if {"n": 2} in events:
            assert at < 20.0
    assert delivery(h, gone).state is DeliveryState.EXPIRED
    assert delivery(h, later).state is DeliveryState.EXPIRED
    assert delivery(h, kept).state is DeliveryState.DELIVERED
    h = h.restart()
    assert [e for e, _ in expired_ids(h)] == [gone, later]


def test_no_send_of_an_event_starts_at_or_after_its_deadline(db_path: Path) -> None:
    rng = random.Random(10)
    h = build_scheduler([target("a", max_events=4, default_ttl=40.0), target("b")], path=db_path)
    deadlines: dict[int, float] = {}
    default_ttl = {"a": 40.0, "b": math.inf}
    submitted: dict[str, list[int]] = {"a": [], "b": []}
    ids = {}
    for n in range(120):
        targets = rng.choice([["a"], ["b"], ["a", "b"]])
        choice = rng.random()
        now = h.clock.seconds()
        if choice < 0.3:
            ttl = rng.choice([1.0, 3.0, 7.5, 20.0])
            ids[n] = submit(h, targets, {"n": n}, ttl=ttl)
            deadlines[n] = now + ttl
        elif choice < 0.5:
            at = now + rng.choice([0.0, 2.0, 10.0, 60.0])
            ids[n] = submit(h, targets, {"n": n}, expires_at=at)
            deadlines[n] = at
        else:
            ids[n] = submit(h, targets, {"n": n})
        for t in targets:
            submitted[t].append(n)
        for t in "ab":
            if rng.random() < 0.15:
                h.transport[t].down()
            elif rng.random() < 0.3:
                h.transport[t].up()
        run_clock(h.clock, rng.choice([0.0, 0.5, 1.0, 4.0]))
    for t in "ab":
        h.transport[t].up()
    run_clock(h.clock, 1200, step=2.0)
    for t in "ab":
        fake = h.transport[t]
        for at, _, events in sent(fake):
            for e in events:
                n = e["n"]
                # Its own deadline, else the target's default.
                deadline = deadlines.get(n, default_ttl[t] + _submitted_at(h, ids[n]))
                assert at < deadline, f"event {n} was sent to {t} at {at}, its deadline {deadline}"
        # Each event is delivered or expired there, in order, once.
        delivered = [e["n"] for e in fake.events]
        assert delivered == sorted(delivered)
        expired = {n for n in submitted[t] if delivery(h, ids[n], t).state is DeliveryState.EXPIRED}
        assert set(delivered) | expired == set(submitted[t])
        assert not set(delivered) & expired
        assert fake.violations == []
    assert len(h.transport["a"].events) > 10
    assert any(delivery(h, ids[n], "a").state is DeliveryState.EXPIRED for n in submitted["a"])


def _submitted_at(h: Harness, event_id: str) -> float:
    status = result_of(h.scheduler.event_status(event_id))
    assert status is not None
    return float(status.submitted_at)


BAD_DEADLINES = [
    pytest.param({"expires_at": 10.0, "ttl": 5.0}, id="both"),
    pytest.param({"ttl": 0}, id="ttl-zero"),
    pytest.param({"ttl": -1.0}, id="ttl-negative"),
    pytest.param({"ttl": math.nan}, id="ttl-nan"),
    pytest.param({"ttl": math.inf}, id="ttl-inf"),
    pytest.param({"ttl": "5"}, id="ttl-str"),
    pytest.param({"ttl": True}, id="ttl-bool"),
    pytest.param({"expires_at": math.nan}, id="expires-nan"),
    pytest.param({"expires_at": math.inf}, id="expires-inf"),
    pytest.param({"expires_at": "soon"}, id="expires-str"),
    pytest.param({"expires_at": 10**400}, id="expires-huge-int"),
]


@pytest.mark.parametrize("options", BAD_DEADLINES)
def test_a_bad_deadline_is_refused_and_nothing_is_stored(
    db_path: Path, options: dict[str, Any]
) -> None:
    h = build_scheduler(["a"], path=db_path)
    with pytest.raises(InvalidEvent):
        h.scheduler.submit("a", {"n": 1}, **options)
    with pytest.raises(InvalidEvent):
        h.scheduler.submit_many([("a", {"n": 0}), ("a", Event({"n": 1}, **options))])
    assert count_events(db_path) == 0
    assert h.transport["a"].requests == []


@pytest.mark.parametrize("ttl", [0, -5.0, math.nan, math.inf, "30"])
def test_a_bad_default_ttl_is_refused(ttl: Any) -> None:
    with pytest.raises(InvalidTarget):
        target("a", default_ttl=ttl)


def test_a_deadline_that_passes_while_the_store_claims_stops_the_send(db_path: Path) -> None:
    clock = Clock()
    store: Any = GatedStore(open_store(clock, db_path))
    transport = FakeTransport(clock)
    scheduler = Scheduler(clock, store, transport, [target("a")], random=lambda: 0.0)
    assert scheduler.start().called
    fake = transport["a"]
    fake.down()
    ids = result_of(
        scheduler.submit_many([("a", {"n": 1}), ("a", Event({"n": 2}, expires_at=5.0))])
    )
    fake.up()
    store.hold_calls("claim")
    run_clock(clock, 2.0)  # the retry claims transaction 1, and the claim takes until 6
    assert [name for name, _ in store.held] == ["claim"]
    run_clock(clock, 4.0)
    store.release()
    # The claim answered with transaction 1, as of 2; at 6 its deadline has passed, so it was
    # not sent: its live event went out alone, under a new id.
    assert [(at, txn_id) for at, txn_id, _ in sent(fake)] == [(0.0, 1), (6.0, 2)]
    assert fake.events == [{"n": 1}]
    status = result_of(scheduler.event_status(ids[1]))
    assert status is not None
    assert status.deliveries["a"].state is DeliveryState.EXPIRED
    assert result_of(scheduler.stop()) is None
