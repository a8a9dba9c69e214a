"""
End-to-end tests: a scheduler on a SQLite file (real thread pool) and the HTTP transport,
delivering to real twisted.web receivers on 127.0.0.1.

Also tests of the :class:`relayer.testing._receiver.Receiver` itself, over HTTP.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from _support import eventually, reactor_

from relayer.config import BackoffPolicy, TargetConfig
from relayer.scheduler import Scheduler, TargetStatus
from relayer.store.base import TargetState
from relayer.store.sqlite import SQLiteStore
from relayer.testing._receiver import Receiver, ReceiverServer, listen_receiver
from relayer.transport.http import HTTPTransport

pytestmark = pytest.mark.integration

#: A bound on every wait, so that a bug shows as a failure rather than a hang.
FAST = BackoffPolicy(initial=0.05, maximum=0.2)


async def statuses(scheduler: Scheduler) -> dict[str, TargetStatus]:
    return {s.target_id: s for s in await scheduler.status()}


def drained(scheduler: Scheduler) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(
            s.pending_events == 0 and s.pending_transactions == 0 and not s.in_flight
            for s in (await statuses(scheduler)).values()
        )

    return check


class Stack:
    """Receivers, a transport and a scheduler on a file, all cleaned up by ``close``."""

    def __init__(self, path: Path) -> None:
        self.reactor = reactor_()
        self.path = path
        self.receivers: dict[str, Receiver] = {}
        self.servers: dict[str, ReceiverServer] = {}
        self.configs: list[TargetConfig] = []
        self.transport = HTTPTransport(self.reactor)
        self.scheduler: Scheduler | None = None

    def add(self, target_id: str, *, prefix: str | None = None, **settings: Any) -> Receiver:
        token = f"token-{target_id}"
        receiver = Receiver(token, order_key="n")
        server = listen_receiver(self.reactor, receiver, prefix=prefix)
        self.receivers[target_id] = receiver
        self.servers[target_id] = server
        settings.setdefault("backoff", FAST)
        self.configs.append(TargetConfig(target_id, server.base_url, token, **settings))
        return receiver

    async def start(self) -> Scheduler:
        store = SQLiteStore.open_path(self.reactor, self.path)
        self.scheduler = Scheduler(
            self.reactor, store, self.transport, self.configs, random=random.Random(0).random
        )
        await self.scheduler.start()
        return self.scheduler

    async def stop_scheduler(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            await self.scheduler.stop()

    async def close(self) -> None:
        try:
            await self.stop_scheduler()
        finally:
            await self.transport.close()
            for server in self.servers.values():
                await server.stop()

    def assert_delivered(self, expected: dict[str, list[Any]]) -> None:
        for target_id, events in expected.items():
            receiver = self.receivers[target_id]
            report = receiver.verify(events)
            assert report.ok, f"{target_id}: {report.summary()}"
            assert receiver.violations == [], f"{target_id}: {receiver.violations}"


def events_for(target_id: str, first: int, count: int) -> list[dict[str, Any]]:
    return [
        {"n": i, "target": target_id, "body": f"é {i} \u2603"} for i in range(first, first + count)
    ]


@pytest_twisted.ensureDeferred
async def test_two_targets_one_refusing_at_first_woken(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "relayer.db")
    a = stack.add("a", prefix="hooks", max_events=7)
    b = stack.add("b", max_events=7)
    await stack.servers["b"].down()
    try:
        scheduler = await stack.start()
        expected = {"a": events_for("a", 0, 150), "b": events_for("b", 0, 150)}
        # A mix of single submits and group submits, interleaving the targets.
        for i in range(50):
            await scheduler.submit("a", expected["a"][i])
            await scheduler.submit("b", expected["b"][i])
        await scheduler.submit_many(
            [(t, expected[t][i]) for i in range(50, 150) for t in ("a", "b")]
        )

        # "a" gets everything while "b" refuses connections.
        await eventually(lambda: len(a.events) >= 150, "target a to receive its events")

        async def b_is_down() -> bool:
            s = (await statuses(scheduler))["b"]
            return s.state is TargetState.DOWN and s.consecutive_failures >= 2

        await eventually(b_is_down, "target b to be DOWN")
        s = (await statuses(scheduler))["b"]
        assert s.pending_events + s.pending_transactions > 0
        assert s.last_error is not None and "token-b" not in s.last_error
        assert b.events == []

        stack.servers["b"].up()
        scheduler.wake("b")
        await eventually(drained(scheduler), "every target to be drained")
        assert {s.target_id: s.state for s in (await statuses(scheduler)).values()} == {
            "a": TargetState.UP,
            "b": TargetState.UP,
        }
        stack.assert_delivered(expected)
        # Batches were capped at max_events.
        assert max(len(t.events) for t in b.transactions) <= 7
    finally:
        await stack.close()


@pytest_twisted.ensureDeferred
async def test_a_target_comes_back_and_backoff_retries_it(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "relayer.db")
    stack.add("a")
    b = stack.add("b")
    await stack.servers["b"].down()
    try:
        scheduler = await stack.start()
        expected = {"a": events_for("a", 0, 40), "b": events_for("b", 0, 40)}
        await scheduler.submit_many([(t, e) for t in ("a", "b") for e in expected[t]])

        async def b_failed() -> bool:
            return (await statuses(scheduler))["b"].consecutive_failures >= 1

        await eventually(b_failed, "a failed attempt to b")
        stack.servers["b"].up()  # no wake: the recoverer's next retry finds it up
        await eventually(drained(scheduler), "every target to be drained")
        stack.assert_delivered(expected)
        assert len(b.events) == 40
    finally:
        await stack.close()


@pytest_twisted.ensureDeferred
async def test_server_errors_and_lost_answers_are_retried_exactly_once(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "relayer.db")
    a = stack.add("a", max_events=10)
    a.fail_next(3, 500)
    try:
        scheduler = await stack.start()
        expected = {"a": events_for("a", 0, 50)}
        await scheduler.submit_many([("a", e) for e in expected["a"]])
        await eventually(drained(scheduler), "target a to be drained")
        a.lose_responses(2)
        more = events_for("a", 50, 50)
        expected["a"] += more
        await scheduler.submit_many([("a", e) for e in more])
        await eventually(drained(scheduler), "target a to be drained again")
        stack.assert_delivered(expected)
        assert a.failed == 3
        assert a.lost == 2
        # Each lost answer made the same transaction (same id, same bytes) come again.
        assert a.duplicates >= 2
    finally:
        await stack.close()


@pytest_twisted.ensureDeferred
async def test_a_413_splits_the_transaction(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "relayer.db")
    a = stack.add("a", max_events=16)
    events = events_for("a", 0, 16)
    one = len(json.dumps(events[0], separators=(",", ":")).encode())
    # Room for about four events a transaction, not sixteen.
    a.limit_body(4 * (one + 2) + 20)
    try:
        scheduler = await stack.start()
        await scheduler.submit_many([("a", e) for e in events])
        await eventually(drained(scheduler), "target a to be drained")
        stack.assert_delivered({"a": events})
        assert a.too_large >= 1
        assert all(len(t.events) <= 4 for t in a.transactions)
        assert (await statuses(scheduler))["a"].dead_letters == 0
    finally:
        await stack.close()


@pytest_twisted.ensureDeferred
async def test_one_request_in_flight_per_target(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "relayer.db")
    a = stack.add("a", max_events=3)
    a.slow(0.02, reactor_())
    try:
        scheduler = await stack.start()
        expected = {"a": events_for("a", 0, 30)}
        for event in expected["a"]:
            await scheduler.submit("a", event)
        await eventually(drained(scheduler), "target a to be drained")
        stack.assert_delivered(expected)
        assert a.max_in_flight == 1
    finally:
        await stack.close()


@pytest_twisted.ensureDeferred
async def test_restart_resumes_a_backlog_with_growing_txn_ids(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "relayer.db")
    a = stack.add("a", max_events=5)
    try:
        scheduler = await stack.start()
        first = events_for("a", 0, 20)
        await scheduler.submit_many([("a", e) for e in first])
        await eventually(drained(scheduler), "target a to be drained")
        ids_before = [t.txn_id for t in a.transactions]

        # Down while events are submitted, then stopped with a backlog.
        await stack.servers["a"].down()
        second = events_for("a", 20, 20)
        await scheduler.submit_many([("a", e) for e in second])

        async def failed() -> bool:
            return (await statuses(scheduler))["a"].consecutive_failures >= 1

        await eventually(failed, "a failed attempt")
        await stack.stop_scheduler()

        # A new scheduler on the same file delivers the backlog without new traffic.
        stack.servers["a"].up()
        scheduler = await stack.start()
        await eventually(drained(scheduler), "the backlog to be delivered after the restart")
        stack.assert_delivered({"a": first + second})
        ids_after = [t.txn_id for t in a.transactions][len(ids_before) :]
        assert min(ids_after) > max(ids_before)
    finally:
        await stack.close()


# -- the receiver itself -------------------------------------------------------------------------


class Client:
    """Sends raw requests to a receiver."""

    def __init__(self, server: ReceiverServer) -> None:
        self.server = server
        self.reactor = reactor_()

    async def put(
        self, path: str, body: bytes, token: str | None = "tok", method: str = "PUT"
    ) -> int:
        headers: dict[str | bytes, str | bytes] = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = await treq.request(
            method,
            self.server.base_url + path,
            data=body,
            headers=headers,
            reactor=self.reactor,
            persistent=False,
        )
        await response.content()
        return int(response.code)


TXN = "/_matrix/app/v1/transactions/"


@pytest_twisted.ensureDeferred
async def test_receiver_checks_and_deduplicates() -> None:
    receiver = Receiver("tok", order_key="n")
    server = listen_receiver(reactor_(), receiver, prefix="t1")
    client = Client(server)
    try:
        one = json.dumps({"events": [{"n": 1}, {"n": 2}]}).encode()
        assert await client.put(TXN + "1", one) == 200
        assert await client.put(TXN + "1", one) == 200  # a retry: acknowledged, not recorded
        assert receiver.events == [{"n": 1}, {"n": 2}]
        assert receiver.duplicates == 1
        assert receiver.violations == []

        assert await client.put(TXN + "2", b'{"events":[{"n":3}]}', token="wrong") == 403
        assert await client.put(TXN + "2", b'{"events":[{"n":3}]}', token=None) == 401
        assert await client.put(TXN + "2", b"not json") == 400
        assert await client.put(TXN + "x", b'{"events":[]}') == 400
        assert await client.put("/_matrix/app/v1/other/2", b'{"events":[]}') == 404
        assert await client.put(TXN + "2", b'{"events":[]}', method="POST") == 405
        assert receiver.rejected == 6
        assert len(receiver.violations) == 5  # the POST is refused, not a violation

        receiver.violations.clear()
        # The same id with other bytes, an id going backwards, and an event out of order.
        assert await client.put(TXN + "1", b'{"events":[{"n":9}]}') == 200
        assert await client.put(TXN + "5", b'{"events":[{"n":4}]}') == 200
        assert await client.put(TXN + "4", b'{"events":[{"n":3}]}') == 200
        assert receiver.events == [{"n": 1}, {"n": 2}, {"n": 4}, {"n": 3}]
        assert any("different content" in v for v in receiver.violations)
        assert any("arrived after transaction 5" in v for v in receiver.violations)
        assert any("n=3 came after n=4" in v for v in receiver.violations)

        receiver.fail_with(503, retry_after="2")
        assert await client.put(TXN + "6", b'{"events":[{"n":5}]}') == 503
        receiver.healthy()
        assert await client.put(TXN + "6", b'{"events":[{"n":5}]}') == 200
        assert receiver.failed == 1
        assert receiver.events[-1] == {"n": 5}
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_receiver_fails_randomly_and_waits() -> None:
    receiver = Receiver("tok")
    server = listen_receiver(reactor_(), receiver)
    client = Client(server)
    try:
        receiver.fail_randomly(0.5, 500, random=iter([0.9, 0.1, 0.7]).__next__)
        waiting = receiver.wait_for_events(2)
        assert await client.put(TXN + "1", b'{"events":[1]}') == 200
        assert await client.put(TXN + "2", b'{"events":[2]}') == 500
        assert not waiting.called
        assert await client.put(TXN + "2", b'{"events":[2]}') == 200
        assert waiting.called
        assert receiver.events == [1, 2]
        assert receiver.verify([1, 2]).ok
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_receiver_goes_down_and_comes_back_on_the_same_port() -> None:
    receiver = Receiver("tok")
    server = listen_receiver(reactor_(), receiver)
    client = Client(server)
    port = server.port
    try:
        await server.down()
        assert not server.is_up
        with pytest.raises(Exception, match="refused"):
            await client.put(TXN + "1", b'{"events":[1]}')
        server.up()
        assert server.port == port and server.is_up
        assert await client.put(TXN + "1", b'{"events":[1]}') == 200
    finally:
        await server.stop()
