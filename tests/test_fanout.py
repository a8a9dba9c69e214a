"""Fan-out: one event for several targets, stored once, delivered to each independently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _support import cells_holding, count_events, result_of, run_clock

from relayer import DeliveryState, Event, EventTooLarge, InvalidEvent, TargetState, UnknownTarget
from relayer.testing import Harness, build_scheduler, target


def submit(h: Harness, *args: Any, **kwargs: Any) -> str:
    return result_of(h.scheduler.submit(*args, **kwargs))


def state_of(h: Harness, target_id: str) -> TargetState:
    return {s.target_id: s for s in result_of(h.scheduler.status())}[target_id].state


def deliveries(h: Harness, event_id: str) -> dict[str, Any]:
    status = result_of(h.scheduler.event_status(event_id))
    assert status is not None
    return dict(status.deliveries)


def test_an_event_for_several_targets_is_stored_once(db_path: Path) -> None:
    h = build_scheduler(["a", "b", "c"], path=db_path, max_events=10)
    h.transport["a"].down()
    h.transport["b"].down()
    marker = "fan-out-marker-5d0c"
    # Before it, one event each, so that the fan-out event is queued at a and b (behind a
    # formed transaction) and sent at c.
    for t in "abc":
        submit(h, t, {"n": 0})
    event_id = submit(h, ["a", "b", "c"], {"body": marker})
    assert h.transport["c"].events == [{"n": 0}, {"body": marker}]
    assert count_events(db_path) == 4
    # The event's bytes are in one cell of the whole database, whatever the number of its
    # targets and whatever each of them has done with it.
    assert cells_holding(db_path, marker.encode()) == [("relayer_events", "bodies")]
    h.clock.advance(2.0)  # a and b retry their first transaction, and fail
    assert cells_holding(db_path, marker.encode()) == [("relayer_events", "bodies")]
    h.transport["a"].up()
    h.transport["b"].up()
    h.clock.advance(600)
    for t in "abc":
        assert h.transport[t].events == [{"n": 0}, {"body": marker}]
    assert cells_holding(db_path, marker.encode()) == [("relayer_events", "bodies")]
    assert count_events(db_path) == 4
    assert set(deliveries(h, event_id)) == {"a", "b", "c"}


def test_a_fanned_out_event_is_stored_once_from_submit_many(db_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    ids = result_of(
        h.scheduler.submit_many(
            [(["a", "b"], {"body": "m-1"}), (("b", "a"), Event({"body": "m-2"}, event_id="two"))]
        )
    )
    assert ids[1] == "two"
    assert count_events(db_path) == 2
    assert cells_holding(db_path, b"m-1") == [("relayer_events", "bodies")]
    assert cells_holding(db_path, b"m-2") == [("relayer_events", "bodies")]
    for t in "ab":
        assert h.transport[t].events == [{"body": "m-1"}, {"body": "m-2"}]


def test_each_target_gets_its_events_in_order_with_ids_of_its_own(db_path: Path) -> None:
    h = build_scheduler(["a", "b", "c"], path=db_path, max_events=3)
    for t in "abc":
        h.transport[t].hold()
    expected: dict[str, list[Any]] = {"a": [], "b": [], "c": []}
    ids = []
    for n in range(12):
        targets = [["a", "b", "c"], ["a"], ["c", "b"], ["b"]][n % 4]
        ids.append(submit(h, targets, {"n": n}))
        for t in targets:
            expected[t].append({"n": n})
    # One transaction in flight per target, each target on its own.
    for t in "abc":
        assert h.transport[t].in_flight == 1
    while any(h.transport[t].held for t in "abc"):
        for t in "abc":
            h.transport[t].release(keep_holding=True)
    for t in "abc":
        fake = h.transport[t]
        assert fake.events == expected[t]
        assert fake.max_in_flight == 1
        assert fake.violations == []
        # Each target numbers its own transactions from 1.
        assert fake.txn_ids == list(range(1, len(fake.received) + 1))
    # The first event went out as transaction 1 at every target.
    assert {t: d.txn_id for t, d in deliveries(h, ids[0]).items()} == {"a": 1, "b": 1, "c": 1}


def test_each_target_has_its_own_backoff(db_path: Path) -> None:
    h = build_scheduler(["a", "b", "c"], path=db_path)
    h.transport["a"].down()
    submit(h, ["a", "b", "c"], {"n": 1})
    run_clock(h.clock, 5.0)
    h.transport["b"].fail_with(503)
    submit(h, ["a", "b", "c"], {"n": 2})
    run_clock(h.clock, 30.0 - h.clock.seconds())
    # a failed at 0 and retries at 2, 6, 14, 30; b failed at 5 and retries at 7, 11, 19.
    assert h.transport["a"].times == [0.0, 2.0, 6.0, 14.0, 30.0]
    assert h.transport["b"].times == [0.0, 5.0, 7.0, 11.0, 19.0]
    assert h.transport["c"].times == [0.0, 5.0]
    assert h.transport["c"].events == [{"n": 1}, {"n": 2}]
    status = {s.target_id: s for s in result_of(h.scheduler.status())}
    assert (status["a"].consecutive_failures, status["a"].next_retry_at) == (5, 62.0)
    assert (status["b"].consecutive_failures, status["b"].next_retry_at) == (4, 35.0)
    assert status["c"].state is TargetState.UP


def test_a_target_down_for_hours_does_not_hold_the_others(db_path: Path) -> None:
    h = build_scheduler(["down", "x", "y"], path=db_path, max_events=5)
    down, x, y = (h.transport[t] for t in ("down", "x", "y"))
    down.down()
    expected: dict[str, list[Any]] = {"down": [], "x": [], "y": []}
    for n in range(36):  # one event every 5 minutes for 3 hours
        targets = ["down", "x", "y"] if n % 3 else ["down", "x"]
        submit(h, targets, {"n": n})
        for t in targets:
            expected[t].append({"n": n})
        # The others have it at once.
        assert x.events == expected["x"]
        assert y.events == expected["y"]
        requests = (len(x.requests), len(y.requests))
        run_clock(h.clock, 300, step=1.0)
        # The down target's retries during these five minutes went to it alone.
        assert (len(x.requests), len(y.requests)) == requests
    assert state_of(h, "down") is TargetState.DOWN
    # It was retried all along, at the backoff cap of 512 s in the end.
    assert len(down.requests) > 20
    assert down.times[-1] >= h.clock.seconds() - 512
    assert down.events == []
    down.up()
    run_clock(h.clock, 512, step=1.0)  # at most the backoff cap
    # It gets exactly what it missed, in order, once each.
    assert down.events == expected["down"]
    assert state_of(h, "down") is TargetState.UP
    for fake in (down, x, y):
        assert fake.violations == []
    # The others saw each transaction once: no retry of the down target reached them.
    for fake, t in ((x, "x"), (y, "y")):
        assert fake.events == expected[t]
        assert len(fake.requests) == len(fake.received)
        assert [json.loads(body)["events"] for _, body in fake.requests] == [
            r.events for r in fake.received
        ]


def test_a_retry_goes_only_to_the_targets_that_have_not_accepted(db_path: Path) -> None:
    h = build_scheduler(["a", "b", "c"], path=db_path)
    h.transport["a"].fail_with(500)
    h.transport["b"].respond(500)  # b fails once, then accepts
    event_id = submit(h, ["a", "b", "c"], {"n": 1})
    assert len(h.transport["c"].requests) == 1
    h.clock.advance(2.0)
    assert len(h.transport["b"].requests) == 2
    assert h.transport["b"].events == [{"n": 1}]
    states = {t: d.state for t, d in deliveries(h, event_id).items()}
    assert states == {
        "a": DeliveryState.PENDING,
        "b": DeliveryState.DELIVERED,
        "c": DeliveryState.DELIVERED,
    }
    run_clock(h.clock, 120)
    assert len(h.transport["a"].requests) > 3
    assert len(h.transport["b"].requests) == 2
    assert len(h.transport["c"].requests) == 1
    h.transport["a"].up()
    run_clock(h.clock, 512)
    assert h.transport["a"].events == [{"n": 1}]
    assert len(h.transport["b"].requests) == 2
    assert len(h.transport["c"].requests) == 1
    assert all(d.state is DeliveryState.DELIVERED for d in deliveries(h, event_id).values())


def test_a_target_named_twice_gets_the_event_once(db_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    event_id = submit(h, ["a", "b", "a", "b"], {"n": 1})
    assert h.transport["a"].events == [{"n": 1}]
    assert h.transport["b"].events == [{"n": 1}]
    assert set(deliveries(h, event_id)) == {"a", "b"}
    assert count_events(db_path) == 1


def test_bad_target_lists_are_refused_and_nothing_is_stored(db_path: Path) -> None:
    h = build_scheduler(["a", target("small", max_bytes=200)], path=db_path)
    with pytest.raises(InvalidEvent):
        h.scheduler.submit([], {"n": 1})
    with pytest.raises(UnknownTarget):
        h.scheduler.submit(["a", "nobody"], {"n": 1})
    with pytest.raises(UnknownTarget):
        bad: list[Any] = ["a", 5]
        h.scheduler.submit_many([(["a"], {"n": 0}), (bad, {"n": 1})])
    # An event must fit every one of its targets.
    with pytest.raises(EventTooLarge):
        h.scheduler.submit(["a", "small"], {"body": "x" * 500})
    h.clock.advance(60)
    assert count_events(db_path) == 0
    assert h.transport["a"].requests == []
    assert h.transport["small"].requests == []


def test_a_fanned_out_event_survives_a_restart_at_the_targets_that_wait(db_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    h.transport["a"].down()
    event_id = submit(h, ["a", "b"], {"n": 1})
    submit(h, ["a", "b"], {"n": 2})
    h = h.restart(stop=False)
    h.transport["a"].up()
    h.clock.advance(600)
    assert h.transport["a"].events == [{"n": 1}, {"n": 2}]
    assert h.transport["b"].events == [{"n": 1}, {"n": 2}]
    assert len(h.transport["b"].requests) == 2
    assert all(d.state is DeliveryState.DELIVERED for d in deliveries(h, event_id).values())


def test_a_fanned_out_event_before_a_plain_one_in_a_submit_many_reaches_every_target(
    db_path: Path,
) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    ids = result_of(h.scheduler.submit_many([(["a", "b"], {"n": 1}), ("a", {"n": 2})]))
    h.clock.advance(60)
    assert h.transport["b"].events == [{"n": 1}]
    assert h.transport["a"].events == [{"n": 1}, {"n": 2}]
    assert all(d.state is DeliveryState.DELIVERED for d in deliveries(h, ids[0]).values())
