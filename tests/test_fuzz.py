"""
Bad input, fuzzed: whatever is passed to relayer's public calls, the result is acceptance or an
exception from :mod:`relayer.errors`, raised at the call. Nothing else is raised, no error is
logged inside the reactor, and the store is not damaged: afterwards, good events are still
delivered, in order, and the status counts add up.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from relayer import (
    BackoffPolicy,
    FailurePolicy,
    RelayerError,
    Scheduler,
    SQLiteStore,
    TargetConfig,
    TargetState,
)
from relayer.testing import FakeTransport, Harness, InlineDatabasePool, build_scheduler, target

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# -- strategies ------------------------------------------------------------------------------------

#: Any character, lone surrogates included (and made more likely).
any_char = st.one_of(st.characters(exclude_categories=()), st.sampled_from('\ud800\udfff\x00\n"'))
any_text = st.text(any_char, max_size=30)
#: Numbers JSON cannot hold, or that overflow a float or a 64-bit integer.
bad_numbers = st.sampled_from(
    [math.nan, math.inf, -math.inf, 10**400, -(10**400), 2**63, -(2**63) - 1]
)
numbers = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    bad_numbers,
    st.sampled_from([0, -1, -0.0, 1, 5e-324, 1e308, sys.maxsize, True, False]),
)


class HostileMapping(dict):  # type: ignore[type-arg]
    """A dict whose items cannot be read."""

    def items(self) -> Any:
        raise RuntimeError("these items cannot be read")


def not_json() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.binary(max_size=10),
        st.builds(object),
        st.sets(st.integers(), max_size=3),
        st.complex_numbers(max_magnitude=10),
        st.builds(HostileMapping, st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
        st.just(type),
        st.just(len),
    )


keys = st.one_of(
    any_text,
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.tuples(st.integers()),
    st.binary(max_size=3),
    st.frozensets(st.integers(), max_size=2),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, any_text, not_json())
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)
anything = st.one_of(
    values,
    numbers,
    any_text,
    st.text(any_char, min_size=1, max_size=300),
    st.none(),
    st.builds(list),
    st.lists(st.tuples(any_text, values), max_size=3),
)

# -- helpers ---------------------------------------------------------------------------------------


@provider(ILogObserver)
class Errors:
    """Collects every log event at error level or above, or that carries a failure."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        if (
            event.get("log_failure") is not None
            or event.get("isError")
            or level in (LogLevel.error, LogLevel.critical)
        ):
            self.events.append(event)


@pytest.fixture
def logged_errors() -> Iterator[Errors]:
    errors = Errors()
    globalLogPublisher.addObserver(errors)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(errors)


#: What :func:`outcome` returns when the call raised a RelayerError.
REFUSED = object()


def outcome(call: Callable[[], Any]) -> Any:
    """
    Call ``call``; return its value (a Deferred's result), or REFUSED if it raised a
    RelayerError. Any other exception fails the test, and so does a Deferred that failed with
    anything but a RelayerError.
    """
    try:
        result = call()
    except RelayerError:
        return REFUSED
    except BaseException as e:  # noqa: BLE001 - the point is to catch everything else
        pytest.fail(f"raised {type(e).__name__} instead of a RelayerError: {e!r}")
    if isinstance(result, Deferred):
        box: list[Any] = []
        result.addBoth(box.append)
        assert box, "with the inline pool, the Deferred has fired"
        if isinstance(box[0], Failure):
            assert box[0].check(RelayerError), f"failed with {box[0].value!r}"
            return REFUSED
        return box[0]
    return result


def statuses(h: Harness) -> dict[str, Any]:
    return {s.target_id: s for s in outcome(h.scheduler.status)}


def assert_healthy(h: Harness, accepted: dict[str, list[Any]], errors: Errors) -> None:
    """The store is intact: good events still go out in order, and the counts add up."""
    for t in accepted:
        for n in range(5):
            event = {"after": n, "target": t}
            assert outcome(lambda t=t, e=event: h.scheduler.submit(t, e)) is not REFUSED
            accepted[t].append(event)
    h.clock.advance(0)
    for t, expected in accepted.items():
        # Events are compared as JSON gives them back (tuples become lists, for example).
        assert h.transport[t].events == [as_json(e) for e in expected], f"{t}: delivery differs"
        assert h.transport[t].violations == []
    for s in statuses(h).values():
        assert s.state is TargetState.UP
        assert s.pending_events == 0 and s.pending_transactions == 0
        assert s.dead_letters == 0
    assert errors.events == [], [e.get("log_format") for e in errors.events]


def as_json(value: Any) -> Any:
    """A value as it comes back from JSON."""
    return json.loads(json.dumps(value, ensure_ascii=False, allow_nan=False))


def delivered(h: Harness) -> dict[str, int]:
    return {t: len(h.transport[t].events) for t in ("t1", "t2")}


# -- events ----------------------------------------------------------------------------------------


def test_submit_takes_a_good_event_or_refuses_it(db_path: Path, logged_errors: Errors) -> None:
    h = build_scheduler(["t1", "t2"], path=db_path, max_bytes=4096)
    accepted: dict[str, list[Any]] = {"t1": [], "t2": []}

    @FUZZ
    @given(target_id=st.one_of(st.sampled_from(["t1", "t2"]), anything), event=anything)
    def submit(target_id: Any, event: Any) -> None:
        before = delivered(h)
        result = outcome(lambda: h.scheduler.submit(target_id, event))
        after = delivered(h)
        if result is REFUSED:
            assert after == before  # refused at the call: nothing was stored
            return
        # Accepted: acknowledged, and (the target being up) delivered at once, as JSON.
        assert target_id in accepted
        assert after[target_id] == before[target_id] + 1
        assert h.transport[target_id].events[-1] == as_json(event)
        accepted[target_id].append(event)

    submit()
    assert_healthy(h, accepted, logged_errors)


def test_submit_many_is_all_or_nothing(db_path: Path, logged_errors: Errors) -> None:
    h = build_scheduler(["t1", "t2"], path=db_path, max_bytes=4096)
    accepted: dict[str, list[Any]] = {"t1": [], "t2": []}
    good = st.tuples(st.sampled_from(["t1", "t2"]), st.integers().map(lambda n: {"n": n}))

    @FUZZ
    @given(
        pairs=st.one_of(
            st.lists(st.one_of(good, good, st.tuples(anything, anything), anything), max_size=6),
            anything,
        )
    )
    def submit_many(pairs: Any) -> None:
        before = delivered(h)
        try:
            listed = list(pairs)
        except TypeError:
            listed = None  # not iterable: must be refused
        result = outcome(lambda: h.scheduler.submit_many(pairs))
        after = delivered(h)
        if result is REFUSED:
            assert after == before  # nothing at all was stored
            return
        assert listed is not None
        for t, event in listed:
            accepted[t].append(event)
        for t in accepted:
            assert h.transport[t].events == [as_json(e) for e in accepted[t]]

    submit_many()
    assert_healthy(h, accepted, logged_errors)


def test_a_bad_pair_stores_none_of_the_batch(db_path: Path) -> None:
    h = build_scheduler(["t1"], path=db_path)
    h.transport["t1"].down()
    for bad in [("t1", {"x": math.nan}), ("nope", {}), ("t1",), 42, ("t1", "\ud800")]:
        with pytest.raises(RelayerError):
            h.scheduler.submit_many([("t1", {"n": 1}), ("t1", {"n": 2}), bad])
    assert statuses(h)["t1"].pending_events == 0


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deep_nesting_is_refused(db_path: Path, depth: int) -> None:
    h = build_scheduler(["t1"], path=db_path, max_bytes=64 * 1024 * 1024)
    event: Any = 0
    for _ in range(depth):
        event = [event]
    with pytest.raises(RelayerError):
        h.scheduler.submit("t1", event)
    nested: Any = {}
    for _ in range(depth):
        nested = {"a": nested}
    with pytest.raises(RelayerError):
        h.scheduler.submit("t1", nested)
    h.scheduler.submit("t1", {"still": "working"})
    assert h.transport["t1"].events == [{"still": "working"}]


def test_moderate_nesting_is_delivered(db_path: Path) -> None:
    h = build_scheduler(["t1"], path=db_path)
    event: Any = "leaf"
    for _ in range(100):
        event = {"k": [event]}
    h.scheduler.submit("t1", event)
    assert h.transport["t1"].events == [event]


@pytest.mark.parametrize(
    "event",
    [
        {"x": math.nan},
        {"x": math.inf},
        [-math.inf],
        {"s": "lone \udc80 surrogate"},
        {"\ud83d": "lone high surrogate in a key"},
        {"n": 10**5000},
        {(1, 2): "tuple key"},
        {"b": b"bytes"},
        {"set": {1, 2}},
        HostileMapping(a=1),
    ],
    ids=[
        "nan",
        "inf",
        "-inf",
        "lone-surrogate",
        "lone-surrogate-key",
        "5000-digit-int",
        "tuple-key",
        "bytes",
        "set",
        "unreadable-mapping",
    ],
)
def test_values_json_cannot_hold_are_refused_at_the_call(db_path: Path, event: Any) -> None:
    h = build_scheduler(["t1"], path=db_path)
    with pytest.raises(RelayerError):
        h.scheduler.submit("t1", event)
    with pytest.raises(RelayerError):
        h.scheduler.submit_many([("t1", event)])
    assert statuses(h)["t1"].pending_events == 0


def test_huge_strings(db_path: Path, logged_errors: Errors) -> None:
    h = build_scheduler(["t1"], path=db_path)  # max_bytes: 1 MiB
    with pytest.raises(RelayerError):
        h.scheduler.submit("t1", {"x": "x" * (2 * 1024 * 1024)})
    with pytest.raises(RelayerError):
        h.scheduler.submit("t1", {"x" * (2 * 1024 * 1024): 1})
    # Just under the cap: accepted and delivered, byte for byte.
    big = "\u00e9" * ((1024 * 1024 - 100) // 2)
    h.scheduler.submit("t1", {"b": big})
    assert h.transport["t1"].events == [{"b": big}]
    assert_healthy(h, {"t1": [{"b": big}]}, logged_errors)


# -- configuration ---------------------------------------------------------------------------------

config_values = st.one_of(numbers, any_text, st.none(), st.builds(object), st.just(BackoffPolicy()))
urls = st.one_of(
    any_text,
    st.sampled_from(
        [
            "http://ok.example",
            "https://ok.example/prefix/",
            "ftp://x.example",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "http://",
            "http://[::1",
            "http://host:99999",
            "http://host:-1",
            "http://user:pw@host",
            "http://host/?q=1",
            "http://host/#frag",
            "http://ho st",
            "http://host\n.example",
            "http://\u0430\u0440\u0440\u04cf\u0435.example",
            "http://ex\uff03ample",
            "HTTP://UPPER.example",
            "//no-scheme.example",
            "http://" + "a" * 5000,
        ]
    ),
)


@FUZZ
@given(
    target_id=st.one_of(any_text, st.text(any_char, min_size=250, max_size=300), config_values),
    base_url=st.one_of(urls, config_values),
    token=st.one_of(any_text, config_values, st.just("ok-token")),
    max_events=config_values,
    max_bytes=config_values,
    request_timeout=config_values,
    backoff=config_values,
    failure_policy=st.one_of(
        st.sampled_from(["block", "dead_letter", "nope", FailurePolicy.BLOCK]), config_values
    ),
)
def test_target_config_is_valid_or_refused(
    target_id: Any,
    base_url: Any,
    token: Any,
    max_events: Any,
    max_bytes: Any,
    request_timeout: Any,
    backoff: Any,
    failure_policy: Any,
) -> None:
    def build() -> TargetConfig:
        return TargetConfig(
            target_id,
            base_url,
            token,
            max_events=max_events,
            max_bytes=max_bytes,
            request_timeout=request_timeout,
            backoff=backoff,
            failure_policy=failure_policy,
        )

    config = outcome(build)
    for field in ("target_id", "base_url", "token"):
        # Each field alone, with good values for the rest.
        good: dict[str, Any] = {"target_id": "t", "base_url": "http://h.example", "token": "k"}
        good[field] = {"target_id": target_id, "base_url": base_url, "token": token}[field]
        outcome(lambda good=good: TargetConfig(**good))
    for name, value in (
        ("max_events", max_events),
        ("max_bytes", max_bytes),
        ("request_timeout", request_timeout),
        ("backoff", backoff),
        ("failure_policy", failure_policy),
    ):
        outcome(lambda name=name, value=value: target("t", **{name: value}))
    if config is not REFUSED:
        # What is accepted is usable: sane limits and an http(s) URL.
        assert 1 <= config.max_events and 64 <= config.max_bytes
        assert 0 < config.request_timeout < math.inf
        assert config.base_url.lower().startswith(("http://", "https://"))
        assert isinstance(config.failure_policy, FailurePolicy)


@FUZZ
@given(
    initial=st.one_of(numbers, config_values),
    multiplier=st.one_of(numbers, config_values),
    maximum=st.one_of(numbers, config_values),
    jitter=st.one_of(numbers, config_values, st.floats(0, 1)),
    failures=st.integers(min_value=1, max_value=10_000),
    r=st.one_of(st.floats(0, 1, exclude_max=True), bad_numbers, st.sampled_from([-1.0, 1.0, 7.0])),
)
def test_backoff_policy_is_valid_or_refused_and_bounded(
    initial: Any, multiplier: Any, maximum: Any, jitter: Any, failures: int, r: Any
) -> None:
    for kwargs in (
        {"initial": initial},
        {"multiplier": multiplier},
        {"maximum": maximum},
        {"jitter": jitter},
        {"initial": initial, "multiplier": multiplier, "maximum": maximum, "jitter": jitter},
    ):
        policy = outcome(lambda kwargs=kwargs: BackoffPolicy(**kwargs))
        if policy is REFUSED:
            continue
        # Whatever the jitter source returns, the delay is a number within [0, maximum].
        delay = policy.delay(failures, lambda: r)
        assert isinstance(delay, float) and 0.0 <= delay <= policy.maximum, delay
        assert policy.base_delay(failures) <= policy.maximum


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -1, "10", None, True, 10**400, object()],
    ids=["nan", "inf", "-1", "str", "None", "True", "10**400", "object"],
)
@pytest.mark.parametrize("name", ["stop_timeout", "store_retry_timeout", "random"])
def test_scheduler_settings_are_checked(tmp_path: Path, name: str, value: Any) -> None:
    clock = Clock()
    store = SQLiteStore.open_path(
        clock,  # type: ignore[arg-type]
        tmp_path / "relayer.db",
        pool=InlineDatabasePool(),
    )
    with pytest.raises(RelayerError):
        Scheduler(clock, store, FakeTransport(clock), [target("t")], **{name: value})


@pytest.mark.parametrize(
    "jitter",
    [lambda: math.nan, lambda: math.inf, lambda: -math.inf, lambda: -5.0, lambda: 5.0],
    ids=["nan", "inf", "-inf", "negative", "above-one"],
)
def test_a_bad_jitter_source_keeps_backoff_in_bounds(
    db_path: Path, jitter: Callable[[], float], logged_errors: Errors
) -> None:
    policy = BackoffPolicy(initial=1.0, multiplier=2.0, maximum=8.0, jitter=0.5)
    h = build_scheduler(["t"], path=db_path, random=jitter, backoff=policy)
    fake = h.transport["t"]
    fake.down()
    h.scheduler.submit("t", {"n": 1})
    for _ in range(6):
        s = statuses(h)["t"]
        assert s.state is TargetState.DOWN
        assert s.next_retry_at is not None
        wait = s.next_retry_at - h.clock.seconds()
        assert 0.5 * policy.base_delay(s.consecutive_failures) <= wait <= policy.maximum
        h.clock.advance(wait)
    fake.up()
    h.clock.advance(policy.maximum)
    assert fake.events == [{"n": 1}]
    assert_healthy(h, {"t": [{"n": 1}]}, logged_errors)


# -- operator calls --------------------------------------------------------------------------------


def test_operator_calls_take_any_argument(db_path: Path, logged_errors: Errors) -> None:
    h = build_scheduler(["t1"], path=db_path)

    @FUZZ
    @given(
        target_id=st.one_of(anything, st.just("t1")),
        limit=st.one_of(numbers, config_values),
    )
    def operate(target_id: Any, limit: Any) -> None:
        outcome(lambda: h.scheduler.wake(target_id))
        outcome(lambda: h.scheduler.dead_letters(target_id))
        outcome(lambda: h.scheduler.dead_letters("t1", limit))
        outcome(lambda: h.scheduler.dead_letters(target_id, limit))
        outcome(lambda: h.scheduler.replay(target_id))
        outcome(lambda: h.scheduler.add_target(target_id))
        assert set(statuses(h)) == {"t1"}

    operate()
    assert_healthy(h, {"t1": []}, logged_errors)


def test_add_target_while_running_refuses_duplicates(db_path: Path) -> None:
    h = build_scheduler(["t1"], path=db_path)
    with pytest.raises(RelayerError):
        h.scheduler.add_target(target("t1"))
    h.scheduler.add_target(target("t2", max_events=1))
    h.scheduler.submit_many([("t2", {"n": 1}), ("t2", {"n": 2})])
    assert h.transport["t2"].events == [{"n": 1}, {"n": 2}]
    assert len(h.transport["t2"].received) == 2
