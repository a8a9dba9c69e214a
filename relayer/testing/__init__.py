"""
Helpers for testing an application that embeds relayer.

They let a test suite drive relayer deterministically: :class:`InlineDatabasePool` runs database
work synchronously, :class:`FakeTransport` gives each target a scriptable :class:`FakeTarget`,
and :func:`build_scheduler` puts them together with a SQLite file and a
:class:`twisted.internet.task.Clock`, so hours of retries take milliseconds; :func:`step` moves
that clock from one timer to the next, so that each retry happens at its own time.

For integration tests over real HTTP, :class:`Receiver` is a twisted.web target that checks
what it is sent, deduplicates by transaction id and records order; :func:`listen_receiver`
serves it on 127.0.0.1 and can take it down and bring it back.

A complete test::

    from relayer.testing import build_scheduler

    def test_delivery_survives_an_outage(tmp_path):
        h = build_scheduler(["bridge"], path=tmp_path / "relayer.db")
        h.transport["bridge"].down()
        h.scheduler.submit("bridge", {"body": "hello"})
        h.clock.pump([1.0] * 60)                  # a minute of retries with backoff, failing
        h.transport["bridge"].up()
        h.clock.advance(600)                      # the next retry delivers
        assert h.transport["bridge"].events == [{"body": "hello"}]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.task import Clock

from relayer.config import Retention, TargetConfig
from relayer.dbpool import DatabasePool
from relayer.scheduler import DEFAULT_STOP_TIMEOUT, Scheduler
from relayer.store.sql import SQLStore
from relayer.store.sqlite import SQLiteStore
from relayer.testing._clock import step
from relayer.testing._fakes import FakeTarget, FakeTransport, InlineDatabasePool, Received
from relayer.testing._receiver import (
    DeliveryReport,
    ReceivedTransaction,
    ReceivedWebhook,
    Receiver,
    ReceiverServer,
    listen_receiver,
    verify_delivery,
)

__all__ = [
    "DeliveryReport",
    "FakeTarget",
    "FakeTransport",
    "Harness",
    "InlineDatabasePool",
    "Received",
    "ReceivedTransaction",
    "ReceivedWebhook",
    "Receiver",
    "ReceiverServer",
    "build_scheduler",
    "listen_receiver",
    "open_store",
    "release_process_lock",
    "step",
    "target",
    "verify_delivery",
]


def target(target_id: str, **settings: Any) -> TargetConfig:
    """
    A :class:`~relayer.TargetConfig` for tests, with a placeholder URL and token.

    Args:
        target_id: The target's id.
        settings: Any other :class:`~relayer.TargetConfig` field, such as ``max_events``.
    """
    settings.setdefault("base_url", f"http://{target_id}.example.invalid")
    settings.setdefault("token", "test-token")
    return TargetConfig(target_id=target_id, **settings)


@attrs.define
class Harness:
    """
    A scheduler on a fake clock, with its store and transport. Made by :func:`build_scheduler`.

    Attributes:
        scheduler: The running scheduler.
        clock: The fake clock; ``clock.advance(seconds)`` drives retries.
        transport: The fake transport; ``transport[target_id]`` scripts a target.
        path: The SQLite file, or the PostgreSQL URL.
        targets: The targets' configurations.
        random: The jitter source.
        retention: The scheduler's retention, or None.
        options: The other arguments the scheduler was made with.
    """

    scheduler: Scheduler
    clock: Clock
    transport: FakeTransport
    path: Path | str
    targets: list[TargetConfig]
    random: Callable[[], float]
    retention: Retention | None = None
    options: dict[str, Any] = attrs.field(factory=dict)

    def restart(self, *, stop: bool = True) -> Harness:
        """
        Start a new scheduler on the same file and transport, as after a restart.

        Args:
            stop: Stop the old scheduler first, as a graceful restart does. If a send is in
                flight, the stop waits for it up to its stop timeout: the clock is advanced by
                that timeout (the send is abandoned, and stays pending), so that the new
                scheduler never sends while the old one still does. With False the old
                scheduler is abandoned as it is, as if its process had died: the new one gets a
                new clock at the same time, so the old one's timers never fire, and requests in
                flight are dropped. Either way the fake targets keep what they received, and
                the confirmations they owe go to the new scheduler (those that fall due while
                there is none wait for it).

        Returns:
            A new harness; this one should not be used any more.
        """
        clock = self.clock
        # Confirmations that fall due between the two schedulers wait for the new one.
        self.transport.confirmer = None
        if stop:
            if self.scheduler.running:
                stopping = self.scheduler.stop()
                if not stopping.called:
                    clock.advance(DEFAULT_STOP_TIMEOUT)
                assert stopping.called, "the old scheduler did not stop"
        else:
            # The dead process's locks go with it.
            release_process_lock(self.scheduler)
            clock = Clock()
            clock.advance(self.clock.seconds())
            self.transport.clock = clock
            for target_id in {t.target_id for t in self.targets}:
                self.transport[target_id].drop()
        return _start(
            self.path,
            clock,
            self.transport,
            self.targets,
            self.random,
            self.retention,
            self.options,
        )


def release_process_lock(scheduler: Scheduler) -> None:
    """
    Release the process lock of an abandoned scheduler's store, as the operating system does
    when a process dies.

    A test that simulates a crash by abandoning a scheduler and starting another on the same
    database, in the same process, calls this first: the abandoned store still holds its lock,
    and the new scheduler would be refused with :class:`relayer.errors.DatabaseInUse`.
    """
    release = getattr(scheduler._store, "release_process_lock", None)
    if release is not None:
        release()


def build_scheduler(
    targets: Iterable[str | TargetConfig] = ("target",),
    *,
    path: str | os.PathLike[str] | None = None,
    clock: Clock | None = None,
    transport: FakeTransport | None = None,
    random: Callable[[], float] = lambda: 0.0,
    retention: Retention | None = None,
    options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Harness:
    """
    Build and start a :class:`~relayer.Scheduler` on a fake clock and a SQLite file.

    Database work runs inline, so the scheduler is started when this returns, and every
    ``submit`` is stored (its Deferred has fired) by the time it returns. The transport's
    :attr:`~FakeTransport.confirmer` is set to the scheduler's ``confirm``, so fake targets
    told to ``confirm_later()`` confirm to it.

    Args:
        targets: Target ids (given placeholder URLs and tokens, and ``settings``), or configs.
        path: The SQLite file, or a ``postgresql://`` URL; by default a new SQLite file in a
            new temporary folder.
        clock: The clock; by default a new :class:`~twisted.internet.task.Clock` at 0.
        transport: The transport; by default a new :class:`FakeTransport`.
        random: The jitter source; by default always 0, which makes backoff exact.
        retention: The scheduler's :class:`~relayer.Retention`; by default none.
        options: Other arguments of :class:`~relayer.Scheduler`, by name, such as
            ``{"observers": [observer]}``; kept for :meth:`Harness.restart`.
        settings: Settings for targets given by id, such as ``max_events=10``.
    """
    clock = clock if clock is not None else Clock()
    transport = transport if transport is not None else FakeTransport(clock)
    configs = [t if isinstance(t, TargetConfig) else target(t, **settings) for t in targets]
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="relayer-test-")) / "relayer.db"
    if not (isinstance(path, str) and "://" in path):
        path = Path(path)
    return _start(path, clock, transport, configs, random, retention, dict(options or {}))


def open_store(
    clock: Any,
    database: str | os.PathLike[str],
    *,
    pool: DatabasePool | None = None,
) -> SQLStore:
    """
    Open a store for tests: a SQLite file, or a PostgreSQL database given by URL.

    Args:
        clock: The clock or reactor.
        database: A SQLite file's path, or a ``postgresql://`` URL.
        pool: Where database work runs; by default an :class:`InlineDatabasePool`.
    """
    pool = pool if pool is not None else InlineDatabasePool()
    if isinstance(database, str) and "://" in database:
        if database.startswith("sqlite:///"):
            return SQLiteStore.open_path(clock, database[len("sqlite:///") :], pool=pool)
        from relayer.store.postgres import PostgresStore

        return PostgresStore.open_url(clock, database, pool=pool, pool_size=1)
    return SQLiteStore.open_path(clock, database, pool=pool)


def _start(
    path: Path | str,
    clock: Clock,
    transport: FakeTransport,
    targets: list[TargetConfig],
    random: Callable[[], float],
    retention: Retention | None = None,
    options: dict[str, Any] | None = None,
) -> Harness:
    store = open_store(clock, path)
    options = options or {}
    scheduler = Scheduler(
        clock, store, transport, targets, random=random, retention=retention, **options
    )
    started = scheduler.start()
    failures: list[Any] = []
    started.addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    transport.confirmer = scheduler.confirm
    return Harness(scheduler, clock, transport, path, targets, random, retention, options)
