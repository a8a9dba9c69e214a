"""Delivery status: event_status and target_events, across restarts and from other processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _support import ConfirmingTransport, result_of, run_clock
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from relayer import (
    ConfigurationError,
    Delivery,
    DeliveryState,
    Event,
    EventStatus,
    InvalidEvent,
    NotRunning,
    Scheduler,
    SendOutcome,
    UnknownTarget,
)
from relayer.lease import LeaseSettings
from relayer.testing import FakeTransport, Harness, build_scheduler, open_store, target

TIMEOUT = 60.0
#: The targets of :func:`every_state`, and where its event stands at each.
EVERY_STATE = {
    "ok": DeliveryState.DELIVERED,
    "down": DeliveryState.PENDING,
    "await": DeliveryState.AWAITING_CONFIRMATION,
    "dead": DeliveryState.DEAD_LETTERED,
    "exp": DeliveryState.EXPIRED,
    "behind": DeliveryState.PENDING,
}


def submit(h: Harness, *args: Any, **kwargs: Any) -> str:
    return result_of(h.scheduler.submit(*args, **kwargs))


def status_of(h: Harness, event_id: str) -> EventStatus:
    status = result_of(h.scheduler.event_status(event_id))
    assert status is not None
    return status


def walk(h: Harness, target_id: str, state: Any, limit: int = 2) -> list[Any]:
    """Every entry of a target's events in a state, a page of ``limit`` at a time."""
    entries: list[Any] = []
    after = None
    for _ in range(1000):
        page = result_of(h.scheduler.target_events(target_id, state, after=after, limit=limit))
        assert len(page.entries) <= limit
        entries.extend(page.entries)
        if page.next is None:
            return entries
        assert page.entries, "a page before the last is empty"
        after = page.next
    raise AssertionError("the pages never end")


def every_state(db_path: Path) -> tuple[Harness, str]:
    """
    A scheduler with one event that stands somewhere else at each of its six targets: see
    :data:`EVERY_STATE`. The clock is at 7.
    """
    clock = Clock()
    transport = ConfirmingTransport(clock)
    transport["ok"].answer = SendOutcome.delivered("HTTP 200")
    transport["down"].answer = ConnectionRefusedError("refused")
    transport["dead"].answer = SendOutcome.permanent("HTTP 400")
    transport["exp"].answer = ConnectionRefusedError("refused")
    configs = [
        target(t, confirmation_timeout=TIMEOUT, default_ttl=5.0 if t == "exp" else None)
        for t in EVERY_STATE
    ]
    transport_: Any = transport
    h = build_scheduler(configs, path=db_path, clock=clock, transport=transport_)
    # Ahead of it at "behind", an event that awaits its confirmation: the event waits there
    # in the queue.
    submit(h, "behind", {"n": 0})
    event_id = submit(h, list(EVERY_STATE), {"n": 1}, event_id="the-event")
    run_clock(h.clock, 7.0)  # "down" retries at 2 and 6; "exp" finds it expired at 6
    return h, event_id


def test_an_event_in_every_state(db_path: Path) -> None:
    h, event_id = every_state(db_path)
    status = status_of(h, event_id)
    assert (status.event_id, status.submitted_at, status.expires_at) == ("the-event", 0.0, None)
    assert {t: d.state for t, d in status.deliveries.items()} == EVERY_STATE
    d = status.deliveries
    assert d["ok"] == Delivery(
        "ok", DeliveryState.DELIVERED, txn_id=1, attempts=1, last_attempt_at=0.0, delivered_at=0.0
    )
    assert d["down"] == Delivery(
        "down",
        DeliveryState.PENDING,
        txn_id=1,
        attempts=3,
        last_attempt_at=6.0,
        next_attempt_at=14.0,
    )
    target_status = {s.target_id: s for s in result_of(h.scheduler.status())}
    assert d["down"].next_attempt_at == target_status["down"].next_retry_at
    assert d["await"] == Delivery(
        "await",
        DeliveryState.AWAITING_CONFIRMATION,
        txn_id=1,
        attempts=1,
        last_attempt_at=0.0,
        confirm_by=TIMEOUT,
    )
    assert d["dead"] == Delivery(
        "dead",
        DeliveryState.DEAD_LETTERED,
        txn_id=1,
        attempts=1,
        last_attempt_at=0.0,
        reason="HTTP 400",
    )
    # Expired after it was sent, in transaction 1, which was abandoned.
    assert d["exp"].state is DeliveryState.EXPIRED and d["exp"].expired_at == 6.0
    assert d["exp"].txn_id == 1 and d["exp"].attempts >= 1
    assert d["behind"] == Delivery("behind", DeliveryState.PENDING)


def test_the_status_moves_on_with_the_deliveries(db_path: Path) -> None:
    h, event_id = every_state(db_path)
    transport: Any = h.transport
    transport["down"].answer = SendOutcome.delivered("HTTP 200")
    assert result_of(h.scheduler.confirm("behind", 1)) is True
    behind = status_of(h, event_id).deliveries["behind"]
    assert (behind.state, behind.txn_id, behind.attempts, behind.confirm_by) == (
        DeliveryState.AWAITING_CONFIRMATION,
        2,
        1,
        7.0 + TIMEOUT,
    )
    assert result_of(h.scheduler.confirm("await", 1)) is True
    run_clock(h.clock, 10.0)  # "down" is retried at 14
    d = status_of(h, event_id).deliveries
    assert d["down"] == Delivery(
        "down",
        DeliveryState.DELIVERED,
        txn_id=1,
        attempts=4,
        last_attempt_at=14.0,
        delivered_at=14.0,
    )
    assert (d["await"].state, d["await"].delivered_at) == (DeliveryState.DELIVERED, 7.0)
    # A dead letter replayed goes out again, under a new id.
    transport["dead"].answer = SendOutcome.delivered("HTTP 200")
    assert result_of(h.scheduler.replay("dead")) == 1
    d = status_of(h, event_id).deliveries
    assert (d["dead"].state, d["dead"].txn_id, d["dead"].reason) == (
        DeliveryState.DELIVERED,
        2,
        None,
    )


def test_the_status_is_the_same_after_a_restart(db_path: Path) -> None:
    h, event_id = every_state(db_path)
    before = status_of(h, event_id)
    pages = {state: walk(h, t, state) for t, state in EVERY_STATE.items()}
    h = h.restart()
    assert status_of(h, event_id) == before
    assert {state: walk(h, t, state) for t, state in EVERY_STATE.items()} == pages
    h = h.restart(stop=False)
    assert status_of(h, event_id) == before
    assert {state: walk(h, t, state) for t, state in EVERY_STATE.items()} == pages


def test_another_store_on_the_database_reads_the_same_status(db_path: Path) -> None:
    h, event_id = every_state(db_path)
    mine = status_of(h, event_id)
    other = open_store(Clock(), db_path)
    result_of(other.open())
    try:
        assert result_of(other.event_status(event_id)) == mine
        for t, state in EVERY_STATE.items():
            page = result_of(other.target_events(t, state, None, 100))
            assert page.entries == walk(h, t, state)
        assert result_of(other.event_status("no-such-event")) is None
    finally:
        result_of(other.close())


def test_another_scheduler_sharing_the_database_reports_the_same_status(db_path: Path) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    configs = [target(t, request_timeout=1.0) for t in ("t1", "t2", "t3")]

    def node(name: str) -> Scheduler:
        scheduler = Scheduler(
            clock,
            open_store(clock, db_path),
            transport,
            configs,
            random=lambda: 0.0,
            leases=LeaseSettings(node_id=name, timeout=10.0, renew_interval=2.5),
        )
        assert scheduler.start().called
        return scheduler

    a = node("a")
    b = node("b")
    try:
        transport["t2"].down()
        ids = [result_of(a.submit(["t1", "t2", "t3"], {"n": 1}))]
        run_clock(clock, 30.0)
        ids.append(result_of(b.submit(["t1", "t2"], {"n": 2}, event_id="two")))
        run_clock(clock, 30.0)
        for event_id in ids:
            from_a = result_of(a.event_status(event_id))
            assert from_a is not None
            assert result_of(b.event_status(event_id)) == from_a
        states = {t: d.state for t, d in result_of(b.event_status(ids[0])).deliveries.items()}
        assert states == {
            "t1": DeliveryState.DELIVERED,
            "t2": DeliveryState.PENDING,
            "t3": DeliveryState.DELIVERED,
        }
        for scheduler in (a, b):
            entries = result_of(scheduler.target_events("t2", DeliveryState.PENDING)).entries
            assert [e.event_id for e in entries] == ids
        assert transport["t1"].events == [{"n": 1}, {"n": 2}]
    finally:
        for scheduler in (a, b):
            stopping = scheduler.stop()
            run_clock(clock, 11.0)
            assert stopping.called


def test_next_attempt_at_follows_a_down_target_while_it_stays_down(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    h.transport["a"].down()
    sending = submit(h, "a", {"n": 1})
    queued = submit(h, "a", {"n": 2})
    for retry_at, attempts in ((2.0, 1), (6.0, 2), (14.0, 3), (30.0, 4)):
        for event_id, expected_attempts in ((sending, attempts), (queued, 0)):
            d = status_of(h, event_id).deliveries["a"]
            assert (d.state, d.attempts, d.next_attempt_at) == (
                DeliveryState.PENDING,
                expected_attempts,
                retry_at,
            )
        assert result_of(h.scheduler.status())[0].next_retry_at == retry_at
        run_clock(h.clock, retry_at - h.clock.seconds())
    d = status_of(h, sending).deliveries["a"]
    assert (d.last_attempt_at, d.attempts, d.txn_id) == (30.0, 5, 1)


def test_next_attempt_at_after_a_restart_is_the_retry_that_is_scheduled(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path, random=lambda: 0.5)
    h.transport["a"].down()
    event_id = submit(h, "a", {"n": 1})
    run_clock(h.clock, 3.0)
    result_of(h.scheduler.stop())
    clock = Clock()
    clock.advance(100.0)  # the process was down for a while: the retry at 5.6 is overdue
    h.transport.clock = clock
    h = build_scheduler(["a"], path=db_path, clock=clock, transport=h.transport, random=lambda: 0.5)
    retry_at = result_of(h.scheduler.status())[0].next_retry_at
    assert retry_at == 115.0  # spread over recovery_spread: 100 + 30 * 0.5
    assert status_of(h, event_id).deliveries["a"].next_attempt_at == retry_at


def test_a_queued_event_and_one_in_flight(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    fake = h.transport["a"]
    fake.hold()
    run_clock(h.clock, 1.0)
    sending = submit(h, "a", {"n": 1})
    queued = submit(h, "a", {"n": 2}, expires_at=500.0)
    assert status_of(h, sending).deliveries["a"] == Delivery(
        "a", DeliveryState.PENDING, txn_id=1, attempts=1, last_attempt_at=1.0
    )
    status = status_of(h, queued)
    assert (status.submitted_at, status.expires_at) == (1.0, 500.0)
    assert status.deliveries["a"] == Delivery("a", DeliveryState.PENDING)
    fake.release()
    assert all(
        status_of(h, e).deliveries["a"].state is DeliveryState.DELIVERED for e in (sending, queued)
    )


def test_an_unknown_event_id_has_no_status(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    submit(h, "a", {"n": 1}, event_id="mine")  # the store's event number 1
    submit(h, "a", {"n": 2})
    assert status_of(h, "relayer-2").event_id == "relayer-2"
    unknown_ids = ["nope", "relayer-1", "relayer-3", "relayer-0", "relayer-", "relayer-x", "mine "]
    for unknown in unknown_ids:
        assert result_of(h.scheduler.event_status(unknown)) is None, unknown
    assert result_of(h.scheduler.event_status("relayer-" + "9" * 30)) is None
    bad: Any = 5
    with pytest.raises(InvalidEvent):
        h.scheduler.event_status(bad)
    result_of(h.scheduler.stop())
    with pytest.raises(NotRunning):
        h.scheduler.event_status("mine")


# -- target_events, a page at a time ------------------------------------------------------------


def test_delivered_events_page_by_page_oldest_first(db_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=db_path, max_events=3)
    fake = h.transport["a"]
    ids = [submit(h, "a", {"n": 0})]
    fake.down()
    ids += result_of(h.scheduler.submit_many([("a", {"n": n}) for n in range(1, 5)]))
    submit(h, "b", {"n": "other"})
    ids += [submit(h, ["b", "a"], {"n": n}) for n in range(5, 8)]
    fake.up()
    run_clock(h.clock, 60.0)
    assert len(fake.received) > 2  # batches of several sizes
    for limit in (1, 2, 3, 1000):
        entries = walk(h, "a", DeliveryState.DELIVERED, limit)
        assert [e.event_id for e in entries] == ids
    entries = walk(h, "a", "delivered")
    by_txn = {r.txn_id: r for r in fake.received}
    for entry, n in zip(entries, range(8), strict=True):
        assert {"n": n} in by_txn[entry.txn_id].events
        assert entry.at == entry.last_attempt_at is not None
        assert entry.submitted_at == 0.0
    assert walk(h, "a", DeliveryState.PENDING) == []
    assert walk(h, "a", DeliveryState.EXPIRED) == []


def test_pending_events_in_a_transaction_and_queued_page_by_page(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=2)
    h.transport["a"].down()
    ids = [submit(h, "a", {"n": n}) for n in range(7)]  # transaction 1 holds the first alone
    for limit in (2, 3, 7, 100):
        entries = walk(h, "a", DeliveryState.PENDING, limit)
        assert [e.event_id for e in entries] == ids
    entries = walk(h, "a", DeliveryState.PENDING, 100)
    assert (entries[0].txn_id, entries[0].attempts) == (1, 1)
    assert all((e.txn_id, e.attempts, e.at) == (None, 0, None) for e in entries[1:])


@pytest.mark.parametrize("limit", [1, 2])
def test_pending_events_after_a_page_filled_by_transactions(db_path: Path, limit: int) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=2)
    h.transport["a"].down()
    ids = result_of(h.scheduler.submit_many([("a", {"n": n}) for n in range(2)]))
    ids += [submit(h, "a", {"n": n}) for n in range(2, 7)]
    entries = walk(h, "a", DeliveryState.PENDING, limit)
    assert [e.event_id for e in entries] == ids


def test_expired_events_page_by_page(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=3)
    fake = h.transport["a"]
    fake.down()
    ids = [submit(h, "a", {"n": n}, ttl=1.0 + n % 2) for n in range(7)]
    kept = submit(h, "a", {"n": 7})
    fake.up()
    run_clock(h.clock, 10.0)
    assert fake.events == [{"n": 7}]
    for limit in (1, 2, 3, 1000):
        entries = walk(h, "a", DeliveryState.EXPIRED, limit)
        assert [e.event_id for e in entries] == ids
        assert all(e.at == 2.0 for e in entries)
        # Each names the abandoned transaction it had been sent in, if any, as its status does.
        for e in entries:
            delivery = result_of(h.scheduler.event_status(e.event_id)).deliveries["a"]
            assert (e.txn_id, e.attempts) == (delivery.txn_id, delivery.attempts)
        assert any(e.txn_id is not None and e.attempts >= 1 for e in entries)
    assert [e.event_id for e in walk(h, "a", DeliveryState.DELIVERED)] == [kept]


def test_dead_lettered_events_page_by_page(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path, max_events=2)
    fake = h.transport["a"]
    fake.fail_with(400)
    fake.hold()
    ids = [submit(h, "a", {"n": 0})]
    ids += result_of(h.scheduler.submit_many([("a", {"n": n}) for n in range(1, 6)]))
    while fake.held:
        run_clock(h.clock, 1.0)
        fake.release(keep_holding=True)
    dead = result_of(h.scheduler.dead_letters("a"))
    assert [n for d in dead for n in d.event_ids] == ids
    for limit in (1, 2, 1000):
        entries = walk(h, "a", DeliveryState.DEAD_LETTERED, limit)
        assert [e.event_id for e in entries] == ids
    dead_at = {d.txn_id: d.dead_at for d in dead}
    assert all(e.at == dead_at[e.txn_id] for e in walk(h, "a", DeliveryState.DEAD_LETTERED))
    assert status_of(h, ids[3]).deliveries["a"].reason == "HTTP 400"


def test_events_awaiting_confirmation_page_by_page(db_path: Path) -> None:
    clock = Clock()
    transport: Any = ConfirmingTransport(clock)
    h = build_scheduler(
        [target("a", confirmation_timeout=TIMEOUT)], path=db_path, clock=clock, transport=transport
    )
    transport["a"].holding = True
    submit(h, "a", {"n": 0})
    ids = result_of(h.scheduler.submit_many([("a", {"n": n}) for n in range(1, 6)]))
    transport["a"].release()
    assert result_of(h.scheduler.confirm("a", 1)) is True
    entries = walk(h, "a", DeliveryState.AWAITING_CONFIRMATION, 2)
    assert [e.event_id for e in entries] == ids
    assert {e.txn_id for e in entries} == {2}
    assert len(walk(h, "a", DeliveryState.DELIVERED)) == 1


BAD_CURSORS = ["", "garbage", "t:1", "t:a:0", "t:1:0:0", "x:1:2", "q:0:1", "x:", "t:1.5:0", ":"]


@pytest.mark.parametrize("after", BAD_CURSORS)
def test_a_bad_cursor_is_refused(db_path: Path, after: str) -> None:
    h = build_scheduler(["a"], path=db_path)
    submit(h, "a", {"n": 1})
    state = DeliveryState.PENDING if after.startswith("q") else DeliveryState.DELIVERED
    # Raised by the call, or by the Deferred it returns.
    with pytest.raises(ConfigurationError):
        result_of(h.scheduler.target_events("a", state, after=after))


@pytest.mark.parametrize(
    "options",
    [
        {"state": "nope"},
        {"state": None},
        {"limit": 0},
        {"limit": 1001},
        {"limit": True},
        {"limit": 2.0},
        {"after": 5},
    ],
)
def test_bad_target_events_arguments_are_refused(db_path: Path, options: dict[str, Any]) -> None:
    h = build_scheduler(["a"], path=db_path)
    state = options.pop("state", DeliveryState.PENDING)
    with pytest.raises(ConfigurationError):
        result_of(h.scheduler.target_events("a", state, **options))


def test_target_events_of_a_target_that_is_not_there(db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    submit(h, "a", {"n": 1})
    page = result_of(h.scheduler.target_events("nobody", DeliveryState.DELIVERED))
    assert (page.entries, page.next) == ([], None)
    bad: Any = 5
    with pytest.raises(UnknownTarget):
        h.scheduler.target_events(bad, DeliveryState.DELIVERED)


def test_an_events_options_show_in_its_status(db_path: Path) -> None:
    h = build_scheduler([target("a", default_ttl=100.0)], path=db_path)
    run_clock(h.clock, 4.0)
    ids = result_of(
        h.scheduler.submit_many(
            [
                ("a", Event({"n": 1}, event_id="e1", ttl=10.0)),
                ("a", Event({"n": 2}, expires_at=50.0)),
                ("a", Event({"n": 3})),
            ]
        )
    )
    assert ids[0] == "e1"
    expires = [status_of(h, i).expires_at for i in ids]
    # The target's default_ttl is not the event's own: it is not shown as its expires_at.
    assert expires == [14.0, 50.0, None]
    assert all(status_of(h, i).submitted_at == 4.0 for i in ids)
