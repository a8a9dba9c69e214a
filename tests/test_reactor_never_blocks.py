"""
The reactor never blocks on the database: every statement runs on the store's thread pool, and
a database that stalls leaves the reactor running (it only delays acknowledgements).

These tests run a scheduler on the real reactor, with a SQLite file on the default threaded
database pool, delivering over HTTP to a receiver on 127.0.0.1.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from _support import DEADLINE, eventually, reactor_
from twisted.internet.task import deferLater

from relayer import (
    BackoffPolicy,
    HTTPTransport,
    Scheduler,
    SQLiteStore,
    TargetConfig,
    TargetState,
    ThreadedDatabasePool,
)
from relayer.store.sqlite import sqlite_engine
from relayer.testing import Receiver, listen_receiver

pytestmark = [pytest.mark.integration, pytest.mark.sqlite_only]

FAST = BackoffPolicy(initial=0.05, maximum=0.2)


class Stack:
    """A scheduler whose SQLite engine reports the thread of every statement it runs."""

    def __init__(self, path: Path) -> None:
        reactor = reactor_()
        self.receiver = Receiver("token", order_key="n")
        self.server = listen_receiver(reactor, self.receiver)
        self.engine = sqlite_engine(str(path))
        self.threads: list[int] = []
        self.gate: threading.Event | None = None
        sa.event.listen(self.engine, "before_cursor_execute", self._executing)
        self.transport = HTTPTransport(reactor)
        self.scheduler = Scheduler(
            reactor,
            SQLiteStore(self.engine, ThreadedDatabasePool(reactor)),
            self.transport,
            [TargetConfig("t", self.server.base_url, "token", backoff=FAST, max_events=10)],
        )

    def _executing(self, *args: Any) -> None:
        self.threads.append(threading.get_ident())
        gate = self.gate
        if gate is not None:
            # Stall the database thread until the test opens the gate (bounded, so that a
            # failing test cannot hang the suite).
            gate.wait(DEADLINE)

    async def drained(self) -> bool:
        s = (await self.scheduler.status())[0]
        return s.pending_events == 0 and s.state is TargetState.UP and not s.in_flight

    async def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if self.scheduler.running:
            await self.scheduler.stop()
        await self.transport.close()
        await self.server.stop()


@pytest_twisted.ensureDeferred
async def test_no_statement_runs_on_the_reactor_thread(tmp_path: Path) -> None:
    reactor_thread = threading.get_ident()
    stack = Stack(tmp_path / "relayer.db")
    scheduler = stack.scheduler
    try:
        await scheduler.start()
        # Every kind of database work: submits, deliveries, failures and backoff, a dead
        # letter and its replay, status queries, and stopping.
        stack.receiver.fail_next(2, 500)
        await scheduler.submit("t", {"n": 0})
        await scheduler.submit_many([("t", {"n": n}) for n in range(1, 30)])
        await eventually(stack.drained, "the backlog to drain")
        stack.receiver.fail_next(1, 400)
        await scheduler.submit("t", {"n": 30})
        await eventually(
            lambda: scheduler.status().addCallback(lambda s: s[0].dead_letters == 1),
            "a dead letter",
        )
        assert len(await scheduler.dead_letters("t")) == 1
        assert await scheduler.replay("t") == 1
        await eventually(stack.drained, "the replay to drain")
        await scheduler.stop()
    finally:
        await stack.close()
    assert len(stack.receiver.events) == 31
    assert stack.receiver.violations == []
    assert len(stack.threads) > 50
    assert reactor_thread not in stack.threads
    assert len(set(stack.threads)) == 1  # SQLite: a single writer thread


@pytest_twisted.ensureDeferred
async def test_a_stalled_database_does_not_stall_the_reactor(tmp_path: Path) -> None:
    reactor = reactor_()
    stack = Stack(tmp_path / "relayer.db")
    scheduler = stack.scheduler
    try:
        await scheduler.start()
        gate = stack.gate = threading.Event()
        acked = scheduler.submit("t", {"n": 0})
        # The database thread is stuck; the reactor is not: timers fire and HTTP is served.
        for _ in range(5):
            await deferLater(reactor, 0.01, lambda: None)
        probe = Receiver("probe")
        probe_server = listen_receiver(reactor, probe)
        try:
            probe_config = TargetConfig("probe", probe_server.base_url, "probe")
            outcome = await stack.transport.send(probe_config, 1, b'{"events":[{"p":1}]}')
            assert outcome.reason == "HTTP 200"
            assert probe.events == [{"p": 1}]
        finally:
            await probe_server.stop()
        # The event is not acknowledged before it is stored.
        assert not acked.called
        stack.gate = None
        gate.set()
        await acked
        await eventually(stack.drained, "the event to be delivered")
        assert stack.receiver.events == [{"n": 0}]
    finally:
        await stack.close()
