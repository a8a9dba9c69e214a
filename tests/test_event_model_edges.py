"""Edges of the event model: mixed submits, the history of expired events, drained targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relayer import DeliveryState, Event, TargetState
from relayer.testing import build_scheduler, step


def result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_submit_many_keeps_an_event_with_options_before_a_plain_one_for_the_same_target(
    db_path: Path | str,
) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    ids = result(
        h.scheduler.submit_many(
            [
                ("a", Event({"n": 1}, event_id="first")),
                (["a", "b"], {"n": 2}),
                ("a", {"n": 3}),
                ("b", {"n": 4}),
            ]
        )
    )
    assert ids[0] == "first" and len(set(ids)) == 4
    assert h.transport["a"].events == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert h.transport["b"].events == [{"n": 2}, {"n": 4}]


def test_an_expired_event_keeps_the_history_of_the_transaction_it_was_sent_in(
    db_path: Path | str,
) -> None:
    h = build_scheduler(["t"], path=db_path)
    h.transport["t"].down()
    event_id = result(h.scheduler.submit("t", {"n": 1}, ttl=60))
    step(h.clock, 120)
    status = result(h.scheduler.event_status(event_id))
    delivery = status.deliveries["t"]
    assert delivery.state is DeliveryState.EXPIRED
    # It went out in transaction 1, several times, before its deadline.
    sent = [txn for txn, _ in h.transport["t"].requests]
    assert sent and set(sent) == {1}
    assert delivery.txn_id == 1
    assert delivery.attempts == len(sent)
    assert delivery.last_attempt_at is not None and delivery.last_attempt_at < 60
    assert delivery.expired_at is not None and delivery.expired_at >= 60
    # The listing of expired events says the same.
    [entry] = result(h.scheduler.target_events("t", "expired")).entries
    assert (entry.event_id, entry.txn_id, entry.attempts, entry.last_attempt_at, entry.at) == (
        event_id,
        1,
        delivery.attempts,
        delivery.last_attempt_at,
        delivery.expired_at,
    )


def test_a_down_target_whose_backlog_expired_stays_down_with_its_backoff(
    db_path: Path | str,
) -> None:
    h = build_scheduler(["t"], path=db_path)
    target = h.transport["t"]
    target.down()
    result(h.scheduler.submit("t", {"n": 1}, ttl=60))
    step(h.clock, 120)
    (status,) = result(h.scheduler.status())
    # It never answered: it is still DOWN, with its failures, not UP.
    assert status.state is TargetState.DOWN
    assert status.consecutive_failures >= 3
    assert status.next_retry_at is not None and status.next_retry_at > h.clock.seconds()
    before = len(target.requests)
    # A new event waits for the next retry instead of going out at once.
    result(h.scheduler.submit("t", {"n": 2}))
    assert len(target.requests) == before
    target.up()
    step(h.clock, status.next_retry_at - h.clock.seconds() + 1)
    assert target.events == [{"n": 2}]


def test_events_whose_numbers_interleave_with_another_writers_are_all_found(
    db_path: Path | str,
) -> None:
    # On PostgreSQL two processes that store events at once draw numbers from one sequence,
    # so that one write's numbers may surround another's: here 1-3 and 6-7, around 4-5.
    h = build_scheduler(["a", "b"], path=db_path)
    h.transport["a"].down()
    h.transport["b"].down()
    store = h.scheduler._store
    drawn = iter([[1, 2, 3, 6, 7], [4, 5]])
    store._allocate_seqs = lambda conn, n: next(drawn)  # type: ignore[method-assign]
    ids_a = result(h.scheduler.submit_many([("a", {"a": i}) for i in range(5)]))
    ids_b = result(h.scheduler.submit_many([("b", {"b": i}) for i in range(2)]))
    assert ids_a == [f"relayer-{n}" for n in (1, 2, 3, 6, 7)]
    assert ids_b == ["relayer-4", "relayer-5"]
    for event_id in ids_a + ids_b:
        status = result(h.scheduler.event_status(event_id))
        assert status is not None, event_id
        assert [d.state for d in status.deliveries.values()] == [DeliveryState.PENDING]
    h.transport["a"].up()
    h.transport["b"].up()
    step(h.clock, 600)
    assert h.transport["a"].events == [{"a": i} for i in range(5)]
    assert h.transport["b"].events == [{"b": i} for i in range(2)]
