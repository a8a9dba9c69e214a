"""Restarts on the same SQLite file: after stop(), and after abandoning a scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from relayer import BackoffPolicy, TargetState
from relayer.testing import Harness, build_scheduler


def statuses(h: Harness) -> dict[str, Any]:
    result = h.scheduler.status()
    assert result.called
    return {s.target_id: s for s in result.result}


def build(db_path: Path) -> Harness:
    # "held": a send is in flight when the scheduler goes; "down": DOWN with a backlog;
    # "queued": UP, with events stored but not yet sent.
    h = build_scheduler(["held", "down", "queued"], path=db_path)
    h.transport["held"].hold()
    h.transport["down"].down()
    for n in range(3):
        h.scheduler.submit_many([(t, {"n": n}) for t in ("held", "down")])
    h.clock.advance(2.0)  # "down" fails a second time: failures 2, next retry at 6
    return h


@pytest.mark.parametrize("graceful", [True, False], ids=["stop", "abandon"])
def test_restart_loses_nothing_and_resumes(db_path: Path, graceful: bool) -> None:
    h = build(db_path)
    held, down = h.transport["held"], h.transport["down"]
    assert held.held == 1
    before = statuses(h)
    assert before["down"].consecutive_failures == 2
    assert before["down"].next_retry_at == pytest.approx(6.0)
    in_flight_request = held.requests[0]

    held.up()
    down.up()
    if graceful:
        stopping = h.scheduler.stop()
        assert not stopping.called  # it waits for the send in flight...
        h.clock.advance(10.0)  # ...up to stop_timeout, then abandons it
        assert stopping.called
        assert held.events == []
        h2 = h.restart()
    else:
        h2 = h.restart(stop=False)

    # The transaction that was in flight is resent at once on start-up, unchanged.
    assert held.requests[:2] == [in_flight_request, in_flight_request]
    assert held.events == [{"n": n} for n in range(3)]

    after = statuses(h2)
    # Nothing lost, backoff state restored.
    assert after["down"].pending_events == 3
    assert after["down"].state is TargetState.DOWN
    assert after["down"].consecutive_failures == 2
    # The stored retry time, or now if it has passed while the scheduler was stopping.
    assert after["down"].next_retry_at == pytest.approx(max(6.0, h2.clock.seconds()))

    # The DOWN target is retried at its stored time, without any new traffic.
    if h2.clock.seconds() < 6.0:
        h2.clock.advance(6.0 - h2.clock.seconds() - 0.01)
        assert down.events == []
    h2.clock.advance(0.01)
    for fake in (held, down):
        assert fake.events == [{"n": n} for n in range(3)]
        assert fake.violations == []
    # New transactions continue the id sequence.
    h2.scheduler.submit_many([("held", {"n": 3}), ("down", {"n": 3})])
    assert held.txn_ids[-1] > held.txn_ids[-2]
    assert down.txn_ids[-1] > down.txn_ids[-2]
    assert statuses(h2)["down"].state is TargetState.UP


def test_backoff_resumes_where_it_was(db_path: Path) -> None:
    policy = BackoffPolicy(initial=1.0, multiplier=2.0, maximum=1000.0, jitter=0.0)
    h = build_scheduler(["target"], path=db_path, backoff=policy)
    h.transport["target"].down()
    h.scheduler.submit("target", {"n": 1})
    h.clock.pump([1.0, 2.0, 4.0])  # failures at 0, 1, 3 and 7
    assert statuses(h)["target"].consecutive_failures == 4
    assert statuses(h)["target"].next_retry_at == pytest.approx(15.0)
    h2 = h.restart(stop=False)
    h2.clock.advance(15.0 - h2.clock.seconds())
    # The fifth failure waits 16 s, continuing the schedule rather than starting over.
    assert h2.transport["target"].times[-1] == 15.0
    assert statuses(h2)["target"].consecutive_failures == 5
    assert statuses(h2)["target"].next_retry_at == pytest.approx(31.0)


def test_an_overdue_retry_happens_at_start_up(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    h.transport["target"].down()
    h.scheduler.submit("target", {"n": 1})
    assert statuses(h)["target"].next_retry_at == pytest.approx(2.0)
    h.scheduler.stop()
    # The process comes back an hour later, and so does the target.
    clock = Clock()
    clock.advance(3600.0)
    h.transport["target"].up()
    h.transport.clock = clock
    later = build_scheduler(["target"], path=db_path, transport=h.transport, clock=clock)
    clock.advance(0)
    assert h.transport["target"].events == [{"n": 1}]
    assert h.transport["target"].times[-1] == 3600.0
    assert statuses(later)["target"].state is TargetState.UP


def test_transaction_ids_never_restart(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    for n in range(3):
        h.scheduler.submit("target", {"n": n})
    assert h.transport["target"].txn_ids == [1, 2, 3]
    # Everything is delivered and deleted; a restart must not reuse ids.
    for _ in range(2):
        h = h.restart()
        h.scheduler.submit("target", {"n": "again"})
    assert h.transport["target"].txn_ids == [1, 2, 3, 4, 5]
    assert h.transport["target"].violations == []


def test_pending_work_of_an_up_target_drains_at_start_up(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    h.transport["target"].hold()
    for n in range(150):
        h.scheduler.submit("target", {"n": n})
    h2 = h.restart(stop=False)
    fake = h2.transport["target"]
    # The transaction that was in flight is resent at once, held again; release it.
    fake.release()
    assert fake.events == [{"n": n} for n in range(150)]
    assert [len(r.events) for r in fake.received] == [1, 100, 49]


def test_stop_refuses_new_work_and_finishes_stored_events(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.hold()
    h.scheduler.submit("target", {"n": 1})
    stopping = h.scheduler.stop()
    fake.release()  # the send in flight finishes within the stop timeout
    assert stopping.called
    assert fake.events == [{"n": 1}]
    assert h.clock.getDelayedCalls() == []
