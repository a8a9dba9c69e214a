"""Bad input to the Scheduler fails at the call, stores nothing, and the scheduler keeps going."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from relayer import (
    ConfigurationError,
    DuplicateTarget,
    EventTooLarge,
    InvalidEvent,
    InvalidTarget,
    NotRunning,
    RelayerError,
    Scheduler,
    SQLiteStore,
    UnknownTarget,
)
from relayer._encoding import ENVELOPE_BYTES
from relayer.testing import FakeTransport, Harness, InlineDatabasePool, build_scheduler, target

T = TypeVar("T")
MAX_BYTES = 256


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    """A fresh SQLite file (the schedulers built by hand here use SQLiteStore)."""
    return tmp_path / "relayer.db"


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that has fired already (the inline pool makes them fire)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def pending(h: Harness) -> dict[str, tuple[int, int]]:
    """Each target's (pending events, pending transactions), as status() reports them."""
    return {
        s.target_id: (s.pending_events, s.pending_transactions)
        for s in result_of(h.scheduler.status())
    }


@pytest.fixture
def h(sqlite_file: Path) -> Harness:
    return build_scheduler(["t", "u"], path=sqlite_file, max_bytes=MAX_BYTES)


def assert_still_works(h: Harness, delivered_before: list[Any]) -> None:
    """Nothing of the bad call was stored, and a valid submit afterwards is delivered."""
    assert h.scheduler.running
    assert pending(h) == {"t": (0, 0), "u": (0, 0)}
    assert h.transport["t"].events == delivered_before
    assert h.transport["u"].events == []
    d = h.scheduler.submit("t", {"good": True})
    assert isinstance(result_of(d), str)
    assert h.transport["t"].events == [*delivered_before, {"good": True}]
    assert h.transport["u"].events == []
    assert pending(h) == {"t": (0, 0), "u": (0, 0)}
    assert h.transport["t"].violations == []


def too_big() -> dict[str, str]:
    # One byte over: alone in a transaction it would be MAX_BYTES + 1 bytes.
    return {"s": "x" * (MAX_BYTES - ENVELOPE_BYTES - len('{"s":""}') + 1)}


BAD_SUBMITS: list[tuple[str, type[RelayerError], Callable[[], tuple[Any, Any]]]] = [
    ("unknown-target", UnknownTarget, lambda: ("nobody", {"n": 1})),
    ("empty-target-id", UnknownTarget, lambda: ("", {"n": 1})),
    ("target-id-of-wrong-type", UnknownTarget, lambda: (42, {"n": 1})),
    ("unhashable-target-id", UnknownTarget, lambda: ({"t"}, {"n": 1})),
    ("object", InvalidEvent, lambda: ("t", {"x": object()})),
    ("set", InvalidEvent, lambda: ("t", {"x": {1, 2}})),
    ("bytes", InvalidEvent, lambda: ("t", b"raw")),
    ("nan", InvalidEvent, lambda: ("t", {"x": float("nan")})),
    ("infinity", InvalidEvent, lambda: ("t", {"x": float("inf")})),
    ("lone-surrogate", InvalidEvent, lambda: ("t", {"x": "\ud800"})),
    ("too-large", EventTooLarge, lambda: ("t", too_big())),
]


@pytest.mark.parametrize(
    ("error", "make"), [(e, m) for _, e, m in BAD_SUBMITS], ids=[i for i, _, _ in BAD_SUBMITS]
)
def test_a_bad_submit_raises_at_the_call_and_stores_nothing(
    h: Harness, error: type[RelayerError], make: Callable[[], tuple[Any, Any]]
) -> None:
    h.scheduler.submit("t", {"before": True})
    target_id, event = make()
    with pytest.raises(error) as excinfo:
        h.scheduler.submit(target_id, event)
    assert type(excinfo.value) is error
    assert str(excinfo.value)
    assert_still_works(h, [{"before": True}])


def test_unknown_target_message_names_the_target(h: Harness) -> None:
    with pytest.raises(UnknownTarget) as excinfo:
        h.scheduler.submit("nobody", {})
    assert "nobody" in str(excinfo.value)
    assert isinstance(excinfo.value, KeyError)


def test_too_large_message_gives_the_sizes(h: Harness) -> None:
    with pytest.raises(EventTooLarge) as excinfo:
        h.scheduler.submit("t", too_big())
    assert str(MAX_BYTES + 1) in str(excinfo.value)
    assert str(MAX_BYTES) in str(excinfo.value)


def test_an_event_exactly_at_max_bytes_is_accepted(h: Harness) -> None:
    event = {"s": "x" * (MAX_BYTES - ENVELOPE_BYTES - len('{"s":""}'))}
    h.scheduler.submit("t", event)
    assert h.transport["t"].events == [event]
    assert len(h.transport["t"].received[0].body) == MAX_BYTES


def test_max_bytes_is_per_target(sqlite_file: Path) -> None:
    h = build_scheduler(
        [target("small", max_bytes=MAX_BYTES), target("large", max_bytes=4 * MAX_BYTES)],
        path=sqlite_file,
    )
    with pytest.raises(EventTooLarge):
        h.scheduler.submit("small", too_big())
    h.scheduler.submit("large", too_big())
    assert h.transport["large"].events == [too_big()]
    assert h.transport["small"].events == []


@pytest.mark.parametrize(
    ("error", "make"), [(e, m) for _, e, m in BAD_SUBMITS], ids=[i for i, _, _ in BAD_SUBMITS]
)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_submit_many_with_one_bad_pair_stores_nothing(
    h: Harness, error: type[RelayerError], make: Callable[[], tuple[Any, Any]], where: str
) -> None:
    good = [("t", {"n": 1}), ("u", {"n": 2}), ("t", {"n": 3})]
    index = {"first": 0, "middle": 2, "last": 3}[where]
    pairs = [*good[:index], make(), *good[index:]]
    with pytest.raises(error):
        h.scheduler.submit_many(pairs)
    assert_still_works(h, [])


@pytest.mark.parametrize(
    "bad_pair",
    [None, "t", "tu", b"tu", {"t": 1, "u": 2}, {"t", "u"}, ("t",), ("t", {}, "extra"), 42],
    ids=repr,
)
def test_submit_many_with_something_that_is_not_a_pair(h: Harness, bad_pair: Any) -> None:
    with pytest.raises(InvalidEvent):
        h.scheduler.submit_many([("t", {"n": 1}), bad_pair])
    assert_still_works(h, [])


@pytest.mark.parametrize("events", ["tu", b"tu", {"tu": {"n": 1}}, {("t", "u")}], ids=repr)
def test_submit_many_refuses_what_does_not_iterate_as_pairs(h: Harness, events: Any) -> None:
    # A string iterates as characters, a mapping as its keys: "tu" would otherwise submit the
    # event "u" to the target "t".
    with pytest.raises(InvalidEvent, match="pairs"):
        h.scheduler.submit_many(events)
    assert_still_works(h, [])


def test_submit_many_from_a_generator_that_fails_stores_nothing(h: Harness) -> None:
    def pairs() -> Any:
        yield ("t", {"n": 1})
        yield ("u", {"n": 2})
        raise RuntimeError("the application's generator broke")

    with pytest.raises(RuntimeError):
        h.scheduler.submit_many(pairs())
    assert_still_works(h, [])


def test_submit_many_with_no_pairs_fires_at_once(h: Harness) -> None:
    assert result_of(h.scheduler.submit_many([])) == []
    assert_still_works(h, [])


def test_a_good_submit_many_after_a_bad_one_is_delivered_whole(h: Harness) -> None:
    with pytest.raises(UnknownTarget):
        h.scheduler.submit_many([("t", {"n": 0}), ("nobody", {})])
    result_of(h.scheduler.submit_many([("t", {"n": 1}), ("u", {"n": 2}), ("t", {"n": 3})]))
    assert h.transport["t"].events == [{"n": 1}, {"n": 3}]
    assert h.transport["u"].events == [{"n": 2}]
    assert pending(h) == {"t": (0, 0), "u": (0, 0)}


# -- not running ------------------------------------------------------------------------------


def unstarted(sqlite_file: Path) -> tuple[Scheduler, FakeTransport]:
    clock = Clock()
    transport = FakeTransport(clock)
    store = SQLiteStore.open_path(clock, sqlite_file, pool=InlineDatabasePool())  # type: ignore[arg-type]
    return Scheduler(clock, store, transport, [target("t")]), transport


def test_submit_before_start_raises_not_running(sqlite_file: Path) -> None:
    scheduler, transport = unstarted(sqlite_file)
    with pytest.raises(NotRunning, match="start"):
        scheduler.submit("t", {"n": 1})
    with pytest.raises(NotRunning):
        scheduler.submit_many([("t", {"n": 1})])
    assert not scheduler.running
    # Starting afterwards works, and nothing from before start() was stored.
    result_of(scheduler.start())
    assert scheduler.running
    assert [(s.target_id, s.pending_events) for s in result_of(scheduler.status())] == [("t", 0)]
    scheduler.submit("t", {"n": 2})
    assert transport["t"].events == [{"n": 2}]


def test_not_running_is_checked_before_the_event(sqlite_file: Path) -> None:
    scheduler, _ = unstarted(sqlite_file)
    with pytest.raises(NotRunning):
        scheduler.submit("nobody", {"x": object()})


def test_submit_after_stop_raises_not_running(h: Harness) -> None:
    h.scheduler.submit("t", {"n": 1})
    result_of(h.scheduler.stop())
    assert not h.scheduler.running
    with pytest.raises(NotRunning):
        h.scheduler.submit("t", {"n": 2})
    with pytest.raises(NotRunning):
        h.scheduler.submit_many([("t", {"n": 2})])
    assert h.transport["t"].events == [{"n": 1}]
    # A scheduler on the same file finds nothing of the refused submits.
    h2 = build_scheduler(["t", "u"], path=h.path, transport=h.transport, max_bytes=MAX_BYTES)
    assert pending(h2) == {"t": (0, 0), "u": (0, 0)}
    assert h.transport["t"].events == [{"n": 1}]


def test_submit_while_stopping_raises_not_running(h: Harness) -> None:
    h.transport["t"].hold()
    h.scheduler.submit("t", {"n": 1})
    stopping = h.scheduler.stop()
    assert not stopping.called  # a send is in flight
    with pytest.raises(NotRunning):
        h.scheduler.submit("t", {"n": 2})
    h.transport["t"].release()
    assert stopping.called
    assert h.transport["t"].events == [{"n": 1}]


def test_start_twice_and_stop_twice_raise_not_running(h: Harness) -> None:
    with pytest.raises(NotRunning):
        h.scheduler.start()
    result_of(h.scheduler.stop())
    with pytest.raises(NotRunning):
        h.scheduler.stop()


# -- targets and settings ---------------------------------------------------------------------


def test_adding_a_duplicate_target_raises(h: Harness) -> None:
    before = h.scheduler.targets
    with pytest.raises(DuplicateTarget) as excinfo:
        h.scheduler.add_target(target("t", max_events=5))
    assert "'t'" in str(excinfo.value)
    assert isinstance(excinfo.value, ConfigurationError)
    # The first registration stands.
    assert h.scheduler.targets == before
    assert h.scheduler.targets["t"].max_events == 100
    assert_still_works(h, [])


def test_a_duplicate_in_the_constructor_raises(sqlite_file: Path) -> None:
    clock = Clock()
    store = SQLiteStore.open_path(clock, sqlite_file, pool=InlineDatabasePool())  # type: ignore[arg-type]
    with pytest.raises(DuplicateTarget):
        Scheduler(clock, store, FakeTransport(clock), [target("t"), target("u"), target("t")])


@pytest.mark.parametrize("config", [None, "t", {"target_id": "t"}], ids=repr)
def test_adding_something_that_is_not_a_target_config_raises(h: Harness, config: Any) -> None:
    with pytest.raises(InvalidTarget):
        h.scheduler.add_target(config)
    assert_still_works(h, [])


@pytest.mark.parametrize(
    "stop_timeout", [-1, -0.001, float("nan"), float("inf"), True, "10", None], ids=repr
)
def test_a_bad_stop_timeout_raises(sqlite_file: Path, stop_timeout: Any) -> None:
    clock = Clock()
    store = SQLiteStore.open_path(clock, sqlite_file, pool=InlineDatabasePool())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="stop_timeout"):
        Scheduler(clock, store, FakeTransport(clock), [target("t")], stop_timeout=stop_timeout)


def test_a_zero_stop_timeout_is_accepted(sqlite_file: Path) -> None:
    clock = Clock()
    store = SQLiteStore.open_path(clock, sqlite_file, pool=InlineDatabasePool())  # type: ignore[arg-type]
    scheduler = Scheduler(clock, store, FakeTransport(clock), [target("t")], stop_timeout=0)
    result_of(scheduler.start())
    assert scheduler.running


def test_a_random_that_is_not_callable_raises(sqlite_file: Path) -> None:
    clock = Clock()
    store = SQLiteStore.open_path(clock, sqlite_file, pool=InlineDatabasePool())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="random"):
        Scheduler(clock, store, FakeTransport(clock), random=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://bridge.example", "http://bridge.example"),
        ("http://bridge.example", "http://bridge.example/"),
        ("http://bridge.example", "HTTP://Bridge.EXAMPLE"),
        ("http://bridge.example", "http://bridge.example:80"),
        ("https://bridge.example/hooks/", "https://BRIDGE.example:443/hooks"),
    ],
)
def test_two_targets_for_one_receiver_are_refused(h: Harness, first: str, second: str) -> None:
    token = "a-secret-token-for-both"
    h.scheduler.add_target(target("one", base_url=first, token=token))
    before = h.scheduler.targets
    with pytest.raises(DuplicateTarget) as excinfo:
        h.scheduler.add_target(target("two", base_url=second, token=token))
    message = str(excinfo.value)
    assert "'one'" in message and "'two'" in message and "registration" in message
    assert token not in message and token not in repr(excinfo.value)
    assert h.scheduler.targets == before
    assert "two" not in pending(h)


@pytest.mark.parametrize(
    ("first", "second", "token"),
    [
        ("http://bridge.example", "https://bridge.example", "same"),
        ("http://bridge.example", "http://bridge.example:8008", "same"),
        ("http://bridge.example/a", "http://bridge.example/b", "same"),
        ("http://bridge.example/A", "http://bridge.example/a", "same"),
        ("http://bridge.example", "http://bridge.example", "other"),
    ],
)
def test_targets_for_distinct_receivers_are_accepted(
    h: Harness, first: str, second: str, token: str
) -> None:
    h.scheduler.add_target(target("one", base_url=first, token="same"))
    h.scheduler.add_target(target("two", base_url=second, token=token))
    assert {"one", "two"} <= set(h.scheduler.targets)


def test_two_targets_for_one_receiver_in_the_constructor_are_refused(sqlite_file: Path) -> None:
    clock = Clock()
    store = SQLiteStore.open_path(clock, sqlite_file, pool=InlineDatabasePool())  # type: ignore[arg-type]
    same = {"base_url": "http://bridge.example", "token": "tok"}
    with pytest.raises(DuplicateTarget):
        Scheduler(clock, store, FakeTransport(clock), [target("t", **same), target("u", **same)])
