"""Confirmations: transactions a target accepted and confirms later, through Scheduler.confirm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _support import ConfirmingTransport, result_of, run_clock
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from relayer import (
    ConfigurationError,
    DeliveryState,
    Event,
    NotRunning,
    Scheduler,
    SendOutcome,
    TargetState,
    UnknownTarget,
)
from relayer.lease import LeaseSettings
from relayer.testing import Harness, build_scheduler, open_store, target

TIMEOUT = 60.0


def harness(db_path: Path, *target_ids: str, **settings: Any) -> tuple[Harness, Any]:
    """A scheduler whose targets accept transactions and confirm them later."""
    clock = Clock()
    transport = ConfirmingTransport(clock)
    settings.setdefault("confirmation_timeout", TIMEOUT)
    configs = [target(t, **settings) for t in target_ids or ("a",)]
    transport_: Any = transport
    return build_scheduler(configs, path=db_path, clock=clock, transport=transport_), transport


def submit(h: Harness, *args: Any, **kwargs: Any) -> str:
    return result_of(h.scheduler.submit(*args, **kwargs))


def confirm(h: Harness, target_id: str, txn_id: int) -> bool:
    return result_of(h.scheduler.confirm(target_id, txn_id))


def delivery(h: Harness, event_id: str, target_id: str = "a") -> Any:
    status = result_of(h.scheduler.event_status(event_id))
    assert status is not None
    return status.deliveries[target_id]


def test_an_accepted_transaction_holds_the_target_until_it_is_confirmed(db_path: Path) -> None:
    h, transport = harness(db_path)
    a = transport["a"]
    first = submit(h, "a", {"n": 1})
    second = submit(h, "a", {"n": 2})
    third = submit(h, "a", {"n": 3})
    run_clock(h.clock, 30.0)
    assert a.txn_ids == [1]
    d = delivery(h, first)
    assert (d.state, d.txn_id, d.attempts, d.confirm_by) == (
        DeliveryState.AWAITING_CONFIRMATION,
        1,
        1,
        TIMEOUT,
    )
    assert delivery(h, second).state is DeliveryState.PENDING
    assert confirm(h, "a", 1) is True
    # The next ones go out at once, together.
    assert a.txn_ids == [1, 2]
    assert a.requests[1].events == [{"n": 2}, {"n": 3}]
    assert a.requests[1].at == 30.0
    d = delivery(h, first)
    assert (d.state, d.txn_id, d.delivered_at, d.confirm_by) == (
        DeliveryState.DELIVERED,
        1,
        30.0,
        None,
    )
    assert delivery(h, third).state is DeliveryState.AWAITING_CONFIRMATION
    assert confirm(h, "a", 2) is True
    assert delivery(h, third).state is DeliveryState.DELIVERED
    run_clock(h.clock, 600)
    assert a.txn_ids == [1, 2]
    assert a.max_in_flight == 1


def test_a_target_awaiting_a_confirmation_does_not_hold_the_others(db_path: Path) -> None:
    h, transport = harness(db_path, "a", "b")
    transport["b"].answer = SendOutcome.delivered("HTTP 200")
    for n in range(4):
        submit(h, ["a", "b"], {"n": n})
    assert transport["a"].txn_ids == [1]
    assert transport["b"].txn_ids == [1, 2, 3, 4]
    status = {s.target_id: s for s in result_of(h.scheduler.status())}
    assert status["a"].pending_events == 4  # one awaiting its confirmation, three queued
    assert status["b"].pending_events == 0


def test_an_unconfirmed_transaction_is_sent_again_with_the_same_id_and_bytes(
    db_path: Path,
) -> None:
    h, transport = harness(db_path)
    a = transport["a"]
    first = submit(h, "a", {"n": 1})
    submit(h, "a", {"n": 2})
    run_clock(h.clock, TIMEOUT - 0.5)
    assert a.txn_ids == [1]
    run_clock(h.clock, 0.5)
    # Sent again at its confirmation timeout, not later: it is not a failure, and has no
    # backoff.
    assert [(r.txn_id, r.at) for r in a.requests] == [(1, 0.0), (1, TIMEOUT)]
    assert a.requests[1].body == a.requests[0].body
    d = delivery(h, first)
    assert (d.state, d.attempts, d.last_attempt_at, d.confirm_by) == (
        DeliveryState.AWAITING_CONFIRMATION,
        2,
        TIMEOUT,
        2 * TIMEOUT,
    )
    status = result_of(h.scheduler.status())[0]
    assert (status.state, status.consecutive_failures) == (TargetState.UP, 0)
    run_clock(h.clock, TIMEOUT)
    assert [(r.txn_id, r.at) for r in a.requests] == [(1, 0.0), (1, TIMEOUT), (1, 2 * TIMEOUT)]
    assert len({r.body for r in a.requests}) == 1
    assert delivery(h, first).attempts == 3
    assert confirm(h, "a", 1) is True
    assert a.txn_ids == [1, 1, 1, 2]
    assert delivery(h, first).state is DeliveryState.DELIVERED


def test_order_per_target_holds_through_confirmations_and_resends(db_path: Path) -> None:
    h, transport = harness(db_path, max_events=3)
    a = transport["a"]
    for n in range(4):
        submit(h, "a", {"n": n})
    confirmed: list[int] = []
    n = 4
    while len(confirmed) < 5:
        run_clock(h.clock, 10.0)
        submit(h, "a", {"n": n})
        n += 1
        head = a.requests[-1].txn_id
        if head not in confirmed and len(a.requests) % 3 != 0:
            assert confirm(h, "a", head) is True
            confirmed.append(head)
        else:
            run_clock(h.clock, TIMEOUT)  # a resend, with the same id
    # Each transaction went out only once the one before it was confirmed.
    for i, request in enumerate(a.requests):
        earlier = {r.txn_id for r in a.requests[:i]} - {request.txn_id}
        assert earlier <= set(confirmed)
    assert a.txn_ids == sorted(a.txn_ids)
    assert len(a.txn_ids) > len(set(a.txn_ids))  # some were sent again
    firsts: dict[int, list[Any]] = {}
    for r in a.requests:
        firsts.setdefault(r.txn_id, r.events)
    events = [e["n"] for txn_id in sorted(firsts) for e in firsts[txn_id]]
    assert events == list(range(len(events)))
    assert a.max_in_flight == 1


def test_confirming_an_unknown_or_finished_transaction(db_path: Path) -> None:
    h, transport = harness(db_path, "a", "b")
    a = transport["a"]
    submit(h, "a", {"n": 1})
    assert confirm(h, "a", 99) is False  # never formed
    assert confirm(h, "b", 1) is False  # another target's numbering
    assert confirm(h, "unregistered", 1) is False
    assert confirm(h, "a", 1) is True
    assert confirm(h, "a", 1) is True  # confirmed already
    assert a.txn_ids == [1]
    # A transaction delivered outright is delivered: confirming it changes nothing.
    a.answer = SendOutcome.delivered("HTTP 200")
    submit(h, "a", {"n": 2})
    assert confirm(h, "a", 2) is True
    # A dead letter is not one the target accepted.
    a.answer = SendOutcome.permanent("HTTP 400")
    dead = submit(h, "a", {"n": 3})
    assert delivery(h, dead).state is DeliveryState.DEAD_LETTERED
    assert confirm(h, "a", 3) is False
    assert delivery(h, dead).state is DeliveryState.DEAD_LETTERED


def test_confirming_an_abandoned_transaction_returns_false(db_path: Path) -> None:
    h, transport = harness(db_path, max_events=10)
    a = transport["a"]
    ids = result_of(
        h.scheduler.submit_many(
            [("a", {"n": 1}), ("a", Event({"n": 2}, ttl=TIMEOUT / 2)), ("a", {"n": 3})]
        )
    )
    assert a.txn_ids == [1]
    run_clock(h.clock, TIMEOUT)
    # Not confirmed in time, and an event of it expired meanwhile: it is abandoned instead of
    # sent again, and its live events go out under a new id.
    assert [(r.txn_id, r.at) for r in a.requests] == [(1, 0.0), (2, TIMEOUT)]
    assert a.requests[1].events == [{"n": 1}, {"n": 3}]
    assert confirm(h, "a", 1) is False
    assert delivery(h, ids[1]).state is DeliveryState.EXPIRED
    assert delivery(h, ids[0]).txn_id == 2
    assert confirm(h, "a", 2) is True
    assert delivery(h, ids[0]).state is DeliveryState.DELIVERED
    run_clock(h.clock, 600)
    assert a.txn_ids == [1, 2]


def test_a_confirmation_that_comes_before_the_answer_is_refused_and_can_be_made_again(
    db_path: Path,
) -> None:
    h, transport = harness(db_path)
    a = transport["a"]
    a.holding = True
    first = submit(h, "a", {"n": 1})
    assert a.held == 1
    # Not accepted yet: a confirmation cannot deliver what the target may never have had.
    assert confirm(h, "a", 1) is False
    assert delivery(h, first).state is DeliveryState.PENDING
    a.release()  # the transport's "accepted" comes now
    assert delivery(h, first).state is DeliveryState.AWAITING_CONFIRMATION
    assert confirm(h, "a", 1) is True
    assert delivery(h, first).state is DeliveryState.DELIVERED
    # The target is not held: the next event goes out at once.
    submit(h, "a", {"n": 2})
    assert a.txn_ids == [1, 2]
    assert confirm(h, "a", 2) is True
    run_clock(h.clock, 3 * TIMEOUT)
    assert a.txn_ids == [1, 2]


def test_a_confirmation_that_comes_during_a_resend_is_kept(db_path: Path) -> None:
    h, transport = harness(db_path)
    a = transport["a"]
    first = submit(h, "a", {"n": 1})
    a.holding = True
    run_clock(h.clock, TIMEOUT)
    assert a.txn_ids == [1, 1] and a.held == 1
    assert confirm(h, "a", 1) is True
    a.release()
    assert delivery(h, first).state is DeliveryState.DELIVERED
    submit(h, "a", {"n": 2})
    assert a.txn_ids == [1, 1, 2]


def test_a_resend_that_fails_is_retried_with_backoff(db_path: Path) -> None:
    h, transport = harness(db_path)
    a = transport["a"]
    first = submit(h, "a", {"n": 1})
    a.answer = ConnectionRefusedError("refused")
    run_clock(h.clock, TIMEOUT + 1.0)
    assert [r.at for r in a.requests] == [0.0, TIMEOUT]
    status = result_of(h.scheduler.status())[0]
    assert (status.state, status.next_retry_at) == (TargetState.DOWN, TIMEOUT + 2.0)
    d = delivery(h, first)
    assert (d.state, d.attempts, d.next_attempt_at) == (
        DeliveryState.PENDING,
        2,
        TIMEOUT + 2.0,
    )
    a.answer = SendOutcome.accepted("HTTP 202")
    run_clock(h.clock, 1.0)
    assert [r.at for r in a.requests] == [0.0, TIMEOUT, TIMEOUT + 2.0]
    assert len({r.body for r in a.requests}) == 1
    d = delivery(h, first)
    assert (d.state, d.attempts, d.confirm_by) == (
        DeliveryState.AWAITING_CONFIRMATION,
        3,
        2 * TIMEOUT + 2.0,
    )


def test_a_confirmation_survives_a_restart(db_path: Path) -> None:
    h, transport = harness(db_path)
    a = transport["a"]
    first = submit(h, "a", {"n": 1})
    run_clock(h.clock, 10.0)
    assert confirm(h, "a", 1) is True
    second = submit(h, "a", {"n": 2})
    h = h.restart()
    run_clock(h.clock, 3 * TIMEOUT)
    # 1 was never sent again; 2 was, at its timeout, since it was not confirmed.
    assert a.txn_ids == [1, 2, 2, 2, 2]
    assert delivery(h, first).state is DeliveryState.DELIVERED
    assert delivery(h, first).delivered_at == 10.0
    assert confirm(h, "a", 2) is True
    h = h.restart(stop=False)
    run_clock(h.clock, 3 * TIMEOUT)
    assert a.txn_ids == [1, 2, 2, 2, 2]
    assert delivery(h, second).state is DeliveryState.DELIVERED


def test_a_target_awaiting_a_confirmation_is_still_held_after_a_restart(db_path: Path) -> None:
    h, transport = harness(db_path)
    a = transport["a"]
    first = submit(h, "a", {"n": 1})
    run_clock(h.clock, 10.0)
    h = h.restart()
    second = submit(h, "a", {"n": 2})
    run_clock(h.clock, 20.0)
    assert a.txn_ids == [1]
    d = delivery(h, first)
    assert (d.state, d.confirm_by) == (DeliveryState.AWAITING_CONFIRMATION, TIMEOUT)
    assert confirm(h, "a", 1) is True
    assert a.txn_ids == [1, 2]
    assert delivery(h, second).state is DeliveryState.AWAITING_CONFIRMATION


def test_an_unconfirmed_transaction_is_sent_again_after_a_crash(db_path: Path) -> None:
    h, transport = harness(db_path)
    a = transport["a"]
    first = submit(h, "a", {"n": 1})
    submit(h, "a", {"n": 2})
    run_clock(h.clock, 10.0)
    h = h.restart(stop=False)
    run_clock(h.clock, TIMEOUT - 10.0 - 0.5)
    assert a.txn_ids == [1]
    run_clock(h.clock, 0.5)
    assert [(r.txn_id, r.at) for r in a.requests] == [(1, 0.0), (1, TIMEOUT)]
    assert a.requests[0].body == a.requests[1].body
    assert delivery(h, first).attempts == 2
    assert confirm(h, "a", 1) is True
    assert a.txn_ids == [1, 1, 2]


@pytest.mark.parametrize("txn_id", [0, -1, 2**63, "1", 1.0, True, None])
def test_a_bad_transaction_id_is_refused(db_path: Path, txn_id: Any) -> None:
    h, _ = harness(db_path)
    with pytest.raises(ConfigurationError):
        h.scheduler.confirm("a", txn_id)


def test_confirm_needs_a_running_scheduler_and_a_target_id(db_path: Path) -> None:
    h, _ = harness(db_path)
    bad: Any = 5
    with pytest.raises(UnknownTarget):
        h.scheduler.confirm(bad, 1)
    with pytest.raises(UnknownTarget):
        h.scheduler.confirm("", 1)
    result_of(h.scheduler.stop())
    with pytest.raises(NotRunning):
        h.scheduler.confirm("a", 1)


def test_a_confirmation_from_another_process_releases_the_target(db_path: Path) -> None:
    clock = Clock()
    transport = ConfirmingTransport(clock)
    transport_: Any = transport
    configs = [target("a", request_timeout=1.0, confirmation_timeout=300.0)]

    def node(name: str) -> Scheduler:
        scheduler = Scheduler(
            clock,
            open_store(clock, db_path),
            transport_,
            configs,
            random=lambda: 0.0,
            leases=LeaseSettings(node_id=name, timeout=10.0, renew_interval=2.5),
        )
        assert scheduler.start().called
        return scheduler

    one, two = node("one"), node("two")
    try:
        owner, other = (one, two) if "a" in one.owned_targets else (two, one)
        assert "a" in owner.owned_targets
        result_of(owner.submit("a", {"n": 1}))
        result_of(owner.submit("a", {"n": 2}))
        assert transport["a"].txn_ids == [1]
        run_clock(clock, 5.0)
        assert result_of(other.confirm("a", 1)) is True
        # Within a sweep interval (30 s), well before the confirmation timeout at 300.
        run_clock(clock, 60.0)
        assert transport["a"].txn_ids == [1, 2]
    finally:
        for scheduler in (one, two):
            stopping = scheduler.stop()
            run_clock(clock, 11.0)
            assert stopping.called
