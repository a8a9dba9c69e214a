"""
Observers: told of deliveries, failures and changes of state, after they are stored; never
holding delivery up, and never losing an event when they fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relayer import (
    BackoffPolicy,
    DeliveryObserver,
    FailureClass,
    FailurePolicy,
    GiveUp,
    IDeliveryObserver,
    RetryPolicy,
)
from relayer.errors import ConfigurationError
from relayer.testing import build_scheduler, step, target
from tests._support import database_engine, result_of

result = result_of

METHODS = [name for name in IDeliveryObserver.names()]


class Recorder(DeliveryObserver):
    """Records every call, with what the store held for the target at that moment."""

    def __init__(self, db_path: Any = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.db_path = db_path
        self.stored_state: list[tuple[str, str | None]] = []

    def _stored(self, target_id: str) -> None:
        if self.db_path is None:
            return
        engine = database_engine(self.db_path)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    sa.text("SELECT state FROM relayer_targets WHERE target_id = :t"),
                    {"t": target_id},
                ).first()
        finally:
            engine.dispose()
        self.stored_state.append((target_id, row[0] if row else None))

    def delivered(self, *args: Any) -> None:
        self.calls.append(("delivered", *args))

    def failed(self, *args: Any) -> None:
        self.calls.append(("failed", *args))

    def dead_lettered(self, *args: Any) -> None:
        self.calls.append(("dead_lettered", *args))

    def expired(self, *args: Any) -> None:
        self.calls.append(("expired", *args))

    def target_down(self, target_id: str, reason: str) -> None:
        self._stored(target_id)
        self.calls.append(("target_down", target_id, reason))

    def target_up(self, target_id: str) -> None:
        self._stored(target_id)
        self.calls.append(("target_up", target_id))

    def target_blocked(self, *args: Any) -> None:
        self.calls.append(("target_blocked", *args))

    def target_disabled(self, target_id: str, reason: str) -> None:
        self._stored(target_id)
        self.calls.append(("target_disabled", target_id, reason))

    def failures_crossed(self, *args: Any) -> None:
        self.calls.append(("failures_crossed", *args))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


def test_the_base_observer_provides_the_interface_and_does_nothing() -> None:
    observer = DeliveryObserver()
    assert verifyObject(IDeliveryObserver, observer)
    assert set(METHODS) == {
        "delivered",
        "failed",
        "dead_lettered",
        "expired",
        "target_down",
        "target_up",
        "target_blocked",
        "target_disabled",
        "failures_crossed",
    }


def test_an_outage_is_observed_in_order_after_it_is_stored(db_path: Any) -> None:
    recorder = Recorder(db_path)
    h = build_scheduler(
        [target("t", backoff=BackoffPolicy.constant(10.0))],
        path=db_path,
        options={"observers": [recorder], "failure_thresholds": (2,)},
    )
    h.clock.advance(1000)
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 15)
    h.transport["t"].up()
    step(h.clock, 10)
    assert recorder.calls == [
        ("failed", "t", 1, FailureClass.SERVER_ERROR, "HTTP 500", 1),
        ("target_down", "t", "HTTP 500"),
        ("failed", "t", 1, FailureClass.SERVER_ERROR, "HTTP 500", 2),
        ("failures_crossed", "t", 2, 2),
        ("delivered", "t", 1, 1, 3, 20.0),
        ("target_up", "t"),
    ]
    # When the observer hears of it, it is in the store.
    assert recorder.stored_state == [("t", "down"), ("t", "up")]


def test_failure_classes_of_what_a_target_answers(db_path: Any) -> None:
    recorder = Recorder()
    h = build_scheduler(
        [target("t", backoff=BackoffPolicy.constant(1.0), max_events=1)],
        path=db_path,
        options={"observers": [recorder], "failure_thresholds": ()},
    )
    for status in (503, 429, 401, 404, 409, 302):
        h.transport["t"].respond(status)
    h.transport["t"].lose_responses(1)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 20)
    classes = [c[3] for c in recorder.calls if c[0] == "failed"]
    assert classes == [
        FailureClass.RATE_LIMITED,
        FailureClass.RATE_LIMITED,
        FailureClass.UNAUTHORIZED,
        FailureClass.NOT_FOUND,
        FailureClass.CLIENT_ERROR,
        FailureClass.CLIENT_ERROR,
        FailureClass.CONNECTION,
    ]
    h.transport["t"].down()
    h.scheduler.submit("t", {"n": 1})
    step(h.clock, 5)
    failed = [c for c in recorder.calls if c[0] == "failed"]
    assert failed[-1][3] is FailureClass.CONNECTION
    assert "connection refused (FakeTarget is down)" in failed[-1][4]


def test_dead_letters_blocks_disables_and_expiries_are_observed(db_path: Any) -> None:
    recorder = Recorder(db_path)
    give_up = RetryPolicy(
        backoff=BackoffPolicy.constant(5.0),
        give_up=(GiveUp(attempts=2), GiveUp(attempts=3, then="disable")),
    )
    h = build_scheduler(
        [
            target("dl", max_events=1),
            target("blk", failure_policy=FailurePolicy.BLOCK),
            target("off", retry_policy=give_up, max_events=1),
            target("ttl"),
        ],
        path=db_path,
        options={"observers": [recorder], "failure_thresholds": ()},
    )
    h.transport["dl"].respond(400)
    h.transport["blk"].respond(422)
    h.transport["off"].fail_with(500)
    h.transport["ttl"].down()
    h.scheduler.submit("dl", {"n": 0})
    h.scheduler.submit("blk", {"n": 0})
    for n in range(3):
        h.scheduler.submit("off", {"n": n})
    h.scheduler.submit("ttl", {"n": 0}, ttl=5.0)
    h.scheduler.submit("ttl", {"n": 1}, ttl=5.0)
    step(h.clock, 30)
    by_target: dict[str, list[tuple[Any, ...]]] = {}
    for call in recorder.calls:
        by_target.setdefault(call[1], []).append(call)
    assert [c[0] for c in by_target["dl"]] == ["failed", "dead_lettered"]
    assert by_target["dl"][1] == ("dead_lettered", "dl", 1, 1, "HTTP 400")
    assert [c[0] for c in by_target["blk"]] == ["failed", "target_blocked"]
    assert by_target["blk"][1] == ("target_blocked", "blk", 1, "HTTP 422")
    # The first transaction: failed twice, then dead-lettered (given up), the target still
    # DOWN; the second fails once more and the target is disabled.
    assert [c[0] for c in by_target["off"]] == [
        "failed",
        "target_down",
        "failed",
        "dead_lettered",
        "failed",
        "target_disabled",
    ]
    assert by_target["off"][3] == (
        "dead_lettered",
        "off",
        1,
        1,
        "gave up after 2 attempts (HTTP 500)",
    )
    assert by_target["off"][5] == (
        "target_disabled",
        "off",
        "gave up after 3 consecutive failures (HTTP 500)",
    )
    assert ("off", "disabled") in recorder.stored_state
    # Both events of the DOWN target expired at its retry, reported once it was stored.
    assert ("expired", "ttl", 2) in by_target["ttl"]


@implementer(IDeliveryObserver)
class Exploding:
    """An observer whose every method raises, or returns a failing Deferred."""

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        if name not in METHODS:
            raise AttributeError(name)

        def method(*args: Any) -> Any:
            self.calls += 1
            if self.deferred:
                return fail(RuntimeError(f"observer {name} failed"))
            raise RuntimeError(f"observer {name} failed")

        return method


@pytest.mark.parametrize("deferred", [False, True], ids=["raises", "failing-deferred"])
def test_an_observer_that_fails_loses_nothing_and_holds_nothing_up(
    db_path: Any, deferred: bool
) -> None:
    bad = Exploding(deferred)
    good = Recorder()
    h = build_scheduler(
        [target("a", backoff=BackoffPolicy.constant(1.0), max_events=2), target("b")],
        path=db_path,
        options={"observers": [bad, good]},
    )
    h.transport["a"].fail_with(500)
    for n in range(5):
        h.scheduler.submit(["a", "b"], {"n": n})
    step(h.clock, 3)
    h.transport["a"].up()
    step(h.clock, 3)
    assert h.transport["a"].events == [{"n": n} for n in range(5)]
    assert h.transport["b"].events == [{"n": n} for n in range(5)]
    assert bad.calls > 0
    # The observer after the failing one was told everything.
    delivered = len(h.transport["a"].received) + len(h.transport["b"].received)
    assert good.kinds().count("delivered") == delivered
    assert h.scheduler.status  # the scheduler still answers
    result(h.scheduler.stop())


def test_an_observer_s_pending_deferred_is_not_waited_for(db_path: Any) -> None:
    never: list[Deferred[None]] = []

    class Slow(DeliveryObserver):
        def delivered(self, *args: Any) -> Deferred[None]:  # type: ignore[override]
            d: Deferred[None] = Deferred()
            never.append(d)
            return d

    h = build_scheduler(["t"], path=db_path, options={"observers": [Slow()]}, max_events=1)
    for n in range(3):
        h.scheduler.submit("t", {"n": n})
    step(h.clock, 0)
    assert h.transport["t"].events == [{"n": n} for n in range(3)]
    assert len(never) == 3
    result(h.scheduler.stop())


def test_something_that_is_not_an_observer_is_refused(db_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="IDeliveryObserver"):
        build_scheduler(["t"], path=db_path, options={"observers": [object()]})
    with pytest.raises(ConfigurationError, match="failure_thresholds"):
        build_scheduler(["t"], path=db_path, options={"failure_thresholds": (0,)})


@pytest.mark.parametrize("held", ["blocked", "disabled"])
def test_a_woken_held_target_whose_resend_fails_is_observed_going_down(
    db_path: Any, held: str
) -> None:
    recorder = Recorder()
    if held == "blocked":
        config = target("t", backoff=BackoffPolicy.constant(10.0), failure_policy="block")
    else:
        policy = RetryPolicy(
            backoff=BackoffPolicy.constant(10.0), give_up=GiveUp(attempts=2, then="disable")
        )
        config = target("t", retry_policy=policy)
    h = build_scheduler(
        [config], path=db_path, options={"observers": [recorder], "failure_thresholds": ()}
    )
    if held == "blocked":
        h.transport["t"].respond(400)
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 10)
    assert recorder.kinds()[-1] == f"target_{held}"
    h.scheduler.wake("t")
    step(h.clock, 0)
    [status] = result(h.scheduler.status())
    # The resend failed with a 500: the target is DOWN, retried with backoff, and observers,
    # told last that it was blocked or disabled, should be told that it is DOWN now.
    assert status.state.name == "DOWN"
    assert recorder.kinds()[-2:] == ["failed", "target_down"]


def test_a_down_target_whose_retry_is_accepted_is_up_once_it_is_stored_up(db_path: Any) -> None:
    """Accepted, with the confirmation to come, the target is not yet UP in the store."""
    recorder = Recorder(db_path)
    h = build_scheduler(
        [target("t", backoff=BackoffPolicy.constant(10.0), max_events=1)],
        path=db_path,
        options={"observers": [recorder], "failure_thresholds": ()},
    )
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 1)
    h.transport["t"].up()
    h.transport["t"].never_confirm()
    step(h.clock, 10)
    assert "target_up" not in recorder.kinds()
    assert [r.txn_id for r in h.transport["t"].received] == [1]
    h.transport["t"].confirm()
    step(h.clock, 1)
    assert recorder.kinds().count("target_up") == 1
    assert recorder.stored_state[-1] == ("t", "up")
