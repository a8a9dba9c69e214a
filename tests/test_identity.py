"""Events with identity: the ids submit returns, idempotent submits, and the ids refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from _support import GatedStore, count_events, result_of
from twisted.internet.task import Clock

from relayer import DeliveryState, Event, InvalidEvent, Scheduler
from relayer.testing import FakeTransport, Harness, build_scheduler, open_store, target

GENERATED = re.compile(r"^relayer-([1-9][0-9]*)$")


def submit(h: Harness, *args: Any, **kwargs: Any) -> str:
    return result_of(h.scheduler.submit(*args, **kwargs))


def submit_many(h: Harness, pairs: list[tuple[Any, Any]]) -> list[str]:
    return result_of(h.scheduler.submit_many(pairs))


def number(event_id: str) -> int:
    m = GENERATED.match(event_id)
    assert m is not None, f"{event_id!r} is not a generated id"
    return int(m.group(1))


# -- the ids submit returns ---------------------------------------------------------------------


def test_an_event_without_an_id_gets_relayer_n(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    first = submit(h, "a", {"n": 1})
    second = submit(h, "a", {"n": 2})
    many = submit_many(h, [("a", {"n": 3}), ("a", {"n": 4})])
    ids = [first, second, *many]
    numbers = [number(i) for i in ids]
    assert numbers == sorted(numbers) and len(set(numbers)) == 4
    # Each id names its event.
    for event_id in ids:
        status = result_of(h.scheduler.event_status(event_id))
        assert status is not None and status.event_id == event_id
        assert status.deliveries["a"].state is DeliveryState.DELIVERED
    assert h.transport["a"].events == [{"n": n} for n in range(1, 5)]


def test_an_event_with_an_id_gets_that_id(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    assert submit(h, "a", {"n": 1}, event_id="$event:example.org") == "$event:example.org"
    assert submit(h, "a", Event({"n": 2}, event_id="order-2")) == "order-2"
    # (An Event before a plain event for the same target is the subject of another test.)
    ids = submit_many(h, [("a", {"n": 3}), ("a", Event({"n": 4}, event_id="order-4"))])
    assert number(ids[0]) > 0 and ids[1] == "order-4"
    for event_id in ("$event:example.org", "order-2", "order-4"):
        status = result_of(h.scheduler.event_status(event_id))
        assert status is not None and status.event_id == event_id
        assert status.deliveries["a"].state is DeliveryState.DELIVERED
    assert h.transport["a"].events == [{"n": n} for n in range(1, 5)]


def test_ids_of_255_bytes_and_of_any_script_are_accepted(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    longest = "é" * 127 + "x"  # 255 bytes of UTF-8
    assert len(longest.encode("utf-8")) == 255
    for event_id in (longest, "x", "事件-1", "RELAYER-1", "relayer", " relayer-1"):
        assert submit(h, "a", {"id": event_id}, event_id=event_id) == event_id
    assert [e["id"] for e in h.transport["a"].events] == [
        longest,
        "x",
        "事件-1",
        "RELAYER-1",
        "relayer",
        " relayer-1",
    ]


# -- idempotent submit --------------------------------------------------------------------------


def test_a_repeated_id_stores_nothing_and_returns_the_same_id(db_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    assert submit(h, "a", {"n": 1}, event_id="e1") == "e1"
    # The repeat's body and targets are ignored.
    assert submit(h, "a", {"n": "other"}, event_id="e1") == "e1"
    assert submit(h, ["a", "b"], {"n": 1}, event_id="e1") == "e1"
    assert submit(h, "b", Event({"n": 1}, event_id="e1")) == "e1"
    assert h.transport["a"].events == [{"n": 1}]
    assert h.transport["a"].txn_ids == [1]
    assert h.transport["b"].requests == []
    assert count_events(db_path) == 1
    status = result_of(h.scheduler.event_status("e1"))
    assert status is not None and list(status.deliveries) == ["a"]


def test_a_repeat_within_one_submit_many_stores_nothing(db_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    ids = submit_many(
        h,
        [
            ("a", Event({"n": 1}, event_id="e1")),
            ("a", Event({"n": 2}, event_id="e2")),
            ("a", Event({"n": "again"}, event_id="e1")),
            (["a", "b"], Event({"n": "again"}, event_id="e2")),
            ("b", Event({"n": 3}, event_id="e3")),
        ],
    )
    assert ids == ["e1", "e2", "e1", "e2", "e3"]
    assert h.transport["a"].events == [{"n": 1}, {"n": 2}]
    assert h.transport["b"].events == [{"n": 3}]
    assert count_events(db_path) == 3


def test_an_event_with_an_id_before_a_plain_one_in_a_submit_many_is_delivered(
    db_path: Path,
) -> None:
    h = build_scheduler(["a"], path=db_path)
    ids = submit_many(h, [("a", Event({"n": 1}, event_id="e1")), ("a", {"n": 2})])
    assert ids[0] == "e1"
    h.clock.advance(60)
    assert h.transport["a"].events == [{"n": 1}, {"n": 2}]
    status = result_of(h.scheduler.event_status("e1"))
    assert status is not None
    assert status.deliveries["a"].state is DeliveryState.DELIVERED


def test_a_plain_event_before_an_event_with_an_id_in_a_submit_many_is_delivered(
    db_path: Path,
) -> None:
    h = build_scheduler(["a"], path=db_path)
    ids = submit_many(h, [("a", {"n": 1}), ("a", Event({"n": 2}, event_id="e2")), ("a", {"n": 3})])
    assert ids[1] == "e2"
    assert h.transport["a"].events == [{"n": 1}, {"n": 2}, {"n": 3}]
    status = result_of(h.scheduler.event_status("e2"))
    assert status is not None
    assert status.deliveries["a"].state is DeliveryState.DELIVERED


def test_a_repeat_while_the_first_is_still_pending_stores_nothing(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    fake = h.transport["a"]
    fake.down()
    assert submit(h, "a", {"n": 1}, event_id="e1") == "e1"
    h.clock.advance(2.0)
    assert submit(h, "a", {"n": 1}, event_id="e1") == "e1"
    assert submit_many(h, [("a", Event({"n": 1}, event_id="e1"))]) == ["e1"]
    fake.up()
    h.clock.advance(600)
    assert fake.events == [{"n": 1}]
    assert fake.violations == []
    assert count_events(db_path) == 1


def test_a_repeat_submitted_while_the_first_is_being_stored_stores_nothing(
    db_path: Path,
) -> None:
    clock = Clock()
    store: Any = GatedStore(open_store(clock, db_path))
    transport = FakeTransport(clock)
    scheduler = Scheduler(clock, store, transport, [target("a"), target("b")])
    assert scheduler.start().called
    # The store is slow: submits wait to be stored (the first write also claims a's first
    # transaction, a being idle).
    store.hold_calls("add_events_claiming")
    store.hold_calls("add_events")
    first = scheduler.submit("a", {"n": 1}, event_id="e1")
    again = scheduler.submit("b", {"n": "again"}, event_id="e1")
    many = scheduler.submit_many([("a", {"n": 2}), ("a", Event({"n": "again"}, event_id="e1"))])
    assert not first.called
    store.release()
    clock.advance(1.0)
    assert (result_of(first), result_of(again), result_of(many)[1]) == ("e1", "e1", "e1")
    assert transport["a"].events == [{"n": 1}, {"n": 2}]
    assert transport["b"].requests == []
    assert count_events(db_path) == 2
    result_of(scheduler.stop())


def test_a_repeat_after_a_restart_stores_nothing(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    fake = h.transport["a"]
    assert submit(h, "a", {"n": 1}, event_id="e1") == "e1"
    fake.down()
    assert submit(h, "a", {"n": 2}, event_id="e2") == "e2"  # still pending at the restart
    h = h.restart()
    assert submit(h, "a", {"n": 1}, event_id="e1") == "e1"
    assert submit(h, "a", {"n": 2}, event_id="e2") == "e2"
    assert submit_many(h, [("a", Event({"n": 1}, event_id="e1"))]) == ["e1"]
    fake.up()
    h.clock.advance(600)
    assert fake.events == [{"n": 1}, {"n": 2}]
    assert count_events(db_path) == 2
    # And after a restart that follows a crash.
    h = h.restart(stop=False)
    assert submit(h, "a", {"n": 2}, event_id="e2") == "e2"
    h.clock.advance(600)
    assert fake.events == [{"n": 1}, {"n": 2}]
    assert count_events(db_path) == 2


def test_ids_are_unique_in_a_store_across_restarts(db_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    ids = [submit(h, "a", {"n": 0})]
    ids += submit_many(h, [("a", {"n": 1}), (["a", "b"], {"n": 2}), ("b", {"n": 3})])
    ids.append(submit(h, ["a", "b"], {"n": 4}, event_id="mine"))
    h = h.restart()
    ids.append(submit(h, "b", {"n": 5}))
    ids += submit_many(h, [("a", {"n": 6}), ("b", Event({"n": 7}))])
    h = h.restart(stop=False)
    ids.append(submit(h, "a", {"n": 8}))
    assert len(set(ids)) == len(ids) == 9
    generated = [i for i in ids if i != "mine"]
    assert [number(i) for i in generated] == sorted(number(i) for i in generated)
    assert count_events(db_path) == 9
    # Each id still names its own event: its targets are the ones it was submitted for.
    targets = [{"a"}, {"a"}, {"a", "b"}, {"b"}, {"a", "b"}, {"b"}, {"a"}, {"b"}, {"a"}]
    for event_id, expected in zip(ids, targets, strict=True):
        status = result_of(h.scheduler.event_status(event_id))
        assert status is not None and set(status.deliveries) == expected


# -- ids refused ----------------------------------------------------------------------------------

BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 256, id="256-bytes"),
    pytest.param("é" * 128, id="256-bytes-of-128-characters"),
    pytest.param(7, id="int"),
    pytest.param(b"e1", id="bytes"),
    pytest.param(["e1"], id="list"),
    pytest.param("e\x001", id="nul"),
    pytest.param("relayer-1", id="generated-prefix"),
    pytest.param("relayer-", id="the-prefix-alone"),
    pytest.param("relayer-mine", id="prefix-and-text"),
    pytest.param("\ud800", id="lone-surrogate"),
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_bad_id_is_refused_and_nothing_is_stored(db_path: Path, bad: Any) -> None:
    h = build_scheduler(["a"], path=db_path)
    with pytest.raises(InvalidEvent):
        h.scheduler.submit("a", {"n": 1}, event_id=bad)
    with pytest.raises(InvalidEvent):
        h.scheduler.submit("a", Event({"n": 1}, event_id=bad))
    with pytest.raises(InvalidEvent):
        h.scheduler.submit(["a"], {"n": 1}, event_id=bad)
    # In a submit_many, the whole submit is refused, the good events with it.
    with pytest.raises(InvalidEvent):
        h.scheduler.submit_many([("a", {"n": 0}), ("a", Event({"n": 1}, event_id=bad))])
    h.clock.advance(60)
    assert h.transport["a"].requests == []
    assert count_events(db_path) == 0
    # The scheduler goes on.
    assert submit(h, "a", {"n": 2}, event_id="good") == "good"
    assert h.transport["a"].events == [{"n": 2}]


def test_an_events_options_beside_an_event_are_refused(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    with pytest.raises(InvalidEvent):
        h.scheduler.submit("a", Event({"n": 1}, event_id="e1"), event_id="e2")
    with pytest.raises(InvalidEvent):
        h.scheduler.submit("a", Event({"n": 1}), event_id="e2")
    assert count_events(db_path) == 0
    assert h.transport["a"].requests == []
