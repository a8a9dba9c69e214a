"""The EventGrouper and transaction forming: batching, caps, order and group commit."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _support import delivery_timers
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayer import Scheduler
from relayer._encoding import ENVELOPE_BYTES, SEPARATOR
from relayer.grouper import runs_for
from relayer.testing import FakeTransport, build_scheduler, open_store, target


def sizes(h: Any, target_id: str = "target") -> list[int]:
    return [len(r.events) for r in h.transport[target_id].received]


def test_idle_target_sends_at_once(db_path: Path) -> None:
    """An idle target's batch goes out as soon as it is stored: no timer, no polling."""
    h = build_scheduler(["target"], path=db_path)
    d = h.scheduler.submit("target", {"n": 1})
    assert d.called
    assert h.transport["target"].events == [{"n": 1}]
    assert delivery_timers(h.clock) == []


def test_250_events_during_a_send_go_out_as_100_100_50(db_path: Path) -> None:
    h = build_scheduler(["target"], path=db_path)
    fake = h.transport["target"]
    fake.hold()
    h.scheduler.submit("target", {"n": -1})
    assert fake.held == 1
    for n in range(250):
        h.scheduler.submit("target", {"n": n})
    # Nothing more goes out while the first transaction is in flight.
    assert len(fake.requests) == 1
    fake.release()
    assert sizes(h) == [1, 100, 100, 50]
    assert fake.events == [{"n": n} for n in range(-1, 250)]
    assert fake.txn_ids == [1, 2, 3, 4]
    assert fake.max_in_flight == 1
    assert fake.violations == []


def test_transactions_are_capped_by_bytes(db_path: Path) -> None:
    max_bytes = 1000
    h = build_scheduler(["target"], path=db_path, max_bytes=max_bytes)
    fake = h.transport["target"]
    fake.hold()
    h.scheduler.submit("target", {"first": True})
    events = [{"n": n, "pad": "x" * (n % 50)} for n in range(300)]
    h.scheduler.submit_many(("target", e) for e in events)
    fake.release()
    assert fake.events == [{"first": True}, *events]
    bodies = [r.body for r in fake.received]
    assert all(len(b) <= max_bytes for b in bodies)
    # Each transaction is full: the next event would not have fitted.
    for body, following in zip(bodies[1:-1], fake.received[2:], strict=False):
        next_event = json.dumps(following.events[0], separators=(",", ":")).encode()
        assert len(body) + 2 + len(next_event) > max_bytes
    assert len(bodies) > 3


def test_an_event_at_the_exact_byte_cap_is_sent_alone(db_path: Path) -> None:
    max_bytes = 200
    h = build_scheduler(["target"], path=db_path, max_bytes=max_bytes)
    big = {"s": "y" * (max_bytes - ENVELOPE_BYTES - len('{"s":""}'))}
    h.transport["target"].hold()
    h.scheduler.submit("target", {"n": 0})
    h.scheduler.submit("target", {"n": 1})
    h.scheduler.submit("target", big)
    h.scheduler.submit("target", {"n": 2})
    h.transport["target"].release()
    assert sizes(h) == [1, 1, 1, 1]
    assert len(h.transport["target"].received[2].body) == max_bytes
    assert h.transport["target"].events == [{"n": 0}, {"n": 1}, big, {"n": 2}]


def test_submit_many_keeps_each_targets_order(db_path: Path) -> None:
    h = build_scheduler(["a", "b"], path=db_path)
    pairs = [("a" if n % 3 else "b", {"n": n}) for n in range(500)]
    h.scheduler.submit_many(pairs)
    for t in ("a", "b"):
        assert h.transport[t].events == [e for tid, e in pairs if tid == t]
        assert h.transport[t].violations == []


class ManualPool:
    """A database pool whose work runs only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def start(self) -> None:
        pass

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((lambda: f(*args, **kwargs), d))
        return d

    def step(self) -> None:
        f, d = self.jobs.pop(0)
        try:
            result = f()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)

    def drain(self) -> None:
        while self.jobs:
            self.step()

    def stop(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


def test_submits_are_acknowledged_only_after_commit_and_share_commits(db_path: Path) -> None:
    clock = Clock()
    pool = ManualPool()
    store = open_store(clock, db_path, pool=pool)  # type: ignore[arg-type]
    writes: list[int] = []
    add_events, add_events_claiming = store.add_events, store.add_events_claiming

    def counting_add_events(runs: Any, now: float) -> Deferred[None]:
        writes.append(len(runs.bodies))
        return add_events(runs, now)

    def counting_add_events_claiming(runs: Any, now: float, claims: Any) -> Deferred[Any]:
        writes.append(len(runs.bodies))
        return add_events_claiming(runs, now, claims)

    store.add_events = counting_add_events  # type: ignore[method-assign]
    store.add_events_claiming = counting_add_events_claiming  # type: ignore[method-assign]
    transport = FakeTransport(clock)
    scheduler = Scheduler(clock, store, transport, [target("target")])
    started = scheduler.start()
    pool.drain()
    assert started.called

    first = scheduler.submit("target", {"n": 0})
    rest = [scheduler.submit("target", {"n": n}) for n in range(1, 10)]
    # Not acknowledged before the write has committed.
    assert not first.called and not any(d.called for d in rest)
    assert writes == [1]
    pool.step()  # commits the first write; the other nine wait in one write
    assert first.called and not any(d.called for d in rest)
    assert writes == [1, 9]
    pool.drain()
    assert all(d.called for d in rest)
    assert transport["target"].events == [{"n": n} for n in range(10)]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=60), max_size=120),
    max_events=st.integers(min_value=1, max_value=25),
    spare=st.integers(min_value=0, max_value=200),
)
def test_runs_keep_order_and_each_fits_one_transaction(
    sizes: list[int], max_events: int, spare: int
) -> None:
    """
    The grouper's runs: every event once, in order, no run larger than one transaction by
    count or by bytes, and each as long as it can be.
    """
    events = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes)]
    # Large enough for any one event alone, as submit guarantees.
    max_bytes = ENVELOPE_BYTES + max(sizes, default=1) + spare

    def body_size(run: Sequence[bytes]) -> int:
        return ENVELOPE_BYTES + sum(map(len, run)) + len(SEPARATOR) * (len(run) - 1)

    runs = runs_for(events, max_events, max_bytes)
    assert [e for run in runs for e in run] == events
    for run in runs:
        assert 1 <= len(run) <= max_events
        assert body_size(run) <= max_bytes
    # Each run is as long as it can be: it ends early only where the next event would not fit.
    position = 0
    for run in runs:
        position += len(run)
        if len(run) < max_events and position < len(events):
            assert body_size([*run, events[position]]) > max_bytes
