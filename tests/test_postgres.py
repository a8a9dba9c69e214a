"""PostgreSQL specifics: connection errors, dropped connections, concurrent registration."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet.task import Clock, deferLater

from relayer import Scheduler, StoreUnavailable
from relayer.store.postgres import PostgresStore
from relayer.testing import FakeTransport, InlineDatabasePool, target


def test_an_unreachable_server_is_named_without_the_password() -> None:
    clock = Clock()
    store = PostgresStore.open_url(
        clock,  # type: ignore[arg-type]
        "postgresql://relayer:hunter2-secret@127.0.0.1:9/relayer",
        pool=InlineDatabasePool(),
    )
    scheduler = Scheduler(clock, store, FakeTransport(), [target("t")])
    failures: list[Any] = []
    scheduler.start().addErrback(failures.append)
    assert len(failures) == 1
    assert failures[0].check(StoreUnavailable)
    message = failures[0].getErrorMessage()
    assert "127.0.0.1:9" in message
    assert "PostgreSQL" in message
    assert "hunter2" not in message
    assert "hunter2" not in repr(store)


@pytest.mark.postgres_only
@pytest_twisted.ensureDeferred
async def test_dropped_connections_are_retried_without_loss(db_path: str) -> None:
    from twisted.internet import reactor

    store = PostgresStore.open_url(reactor, db_path, pool_size=2)
    transport = FakeTransport()
    scheduler = Scheduler(reactor, store, transport, [target("t")])
    await scheduler.start()
    try:
        for n in range(50):
            await scheduler.submit("t", {"n": n})
        admin = sa.create_engine(
            sa.make_url(db_path).set(drivername="postgresql+psycopg", query={}),
            poolclass=sa.pool.NullPool,
            isolation_level="AUTOCOMMIT",
        )
        try:
            with admin.connect() as conn:
                killed = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                        "AND application_name = 'relayer'"
                    )
                ).scalar()
        finally:
            admin.dispose()
        assert killed and killed >= 1
        for n in range(50, 100):
            await scheduler.submit("t", {"n": n})
        deadline = time.monotonic() + 30
        while len(transport["t"].events) < 100:
            assert time.monotonic() < deadline, len(transport["t"].events)
            await deferLater(reactor, 0.05, lambda: None)
        assert transport["t"].events == [{"n": n} for n in range(100)]
    finally:
        await scheduler.stop()


@pytest.mark.postgres_only
@pytest_twisted.ensureDeferred
async def test_the_listener_outlives_an_unexpected_error(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg
    from twisted.internet import reactor

    real = psycopg.Connection.notifies
    broken = [RuntimeError("an unexpected error in the listener")]

    def notifies(self: Any, *args: Any, **kwargs: Any) -> Any:
        if broken:
            raise broken.pop()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "notifies", notifies)
    store = PostgresStore.open_url(reactor, db_path, pool_size=1)
    await store.open()
    heard: list[list[str] | None] = []
    unlisten = store.listen(heard.append)
    try:
        deadline = time.monotonic() + 30
        # It listens again, and says that notifications may have been missed meanwhile.
        while None not in heard:
            assert time.monotonic() < deadline, heard
            await deferLater(reactor, 0.05, lambda: None)
        assert broken == []
        await store.register_targets(["t"])
        await store.add_events([("t", [b'{"n":1}'])], 0.0)
        while ["t"] not in heard:
            assert time.monotonic() < deadline, heard
            await deferLater(reactor, 0.05, lambda: None)
    finally:
        unlisten()
        await store.close()


class _ManualPool:
    """A database pool that runs each job only when the test says which one."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def start(self) -> None:
        pass

    def stop(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, kwargs, d))
        return d

    def step(self, index: int = 0) -> None:
        f, args, kwargs, d = self.jobs.pop(index)
        try:
            result = f(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's Deferred
            d.errback(e)
            return
        d.callback(result)

    def drain(self) -> None:
        while self.jobs:
            self.step()


@pytest.mark.postgres_only
def test_a_lease_taken_before_its_registration_commits_is_delivered(db_path: str) -> None:
    """
    The lease round runs on a connection of its own: it can take a new target's lease, and the
    takeover can load it, before the registration has committed. The takeover is retried.
    """
    from relayer.lease import LeaseSettings

    clock = Clock()
    pool = _ManualPool()
    store = PostgresStore.open_url(clock, db_path, pool=pool, pool_size=1)  # type: ignore[arg-type]
    transport = FakeTransport(clock)
    scheduler = Scheduler(
        clock,
        store,
        transport,
        [target("a", request_timeout=1.0)],
        random=lambda: 0.0,
        leases=LeaseSettings(node_id="n", timeout=10.0, renew_interval=1.0),
        # The sweep would find the target too, in time; this is about the takeover itself.
        sweep_interval=1000.0,
    )
    started = scheduler.start()
    pool.drain()
    assert started.called
    scheduler.add_target(target("new", request_timeout=1.0))  # its registration waits
    clock.advance(1.0)  # the next lease round waits behind it
    assert len(pool.jobs) == 2
    pool.step(1)  # the lease round takes the new target's lease...
    pool.step(1)  # ...and the takeover loads it, before the registration commits
    pool.drain()
    assert "new" in scheduler.owned_targets
    scheduler.submit("new", {"n": 1})
    pool.drain()
    for _ in range(5):
        clock.advance(1.0)
        pool.drain()
    assert transport["new"].events == [{"n": 1}]
    stopping = scheduler.stop()
    for _ in range(5):
        pool.drain()
        clock.advance(1.0)
    assert stopping.called


@pytest.mark.postgres_only
def test_a_retention_run_stops_and_says_so_while_another_holds_the_lock(db_path: str) -> None:
    from relayer.store import RetentionRule
    from relayer.store.postgres import _TRY_RETENTION_LOCK
    from relayer.testing import build_scheduler

    def result_of(d: Any) -> Any:
        found: list[Any] = []
        d.addBoth(found.append)
        assert found, "the Deferred has not fired"
        return found[0]

    h = build_scheduler(["t"], path=db_path)
    result_of(h.scheduler.submit("t", {"n": 1}))
    h.clock.advance(1.0)
    assert h.transport["t"].events == [{"n": 1}]
    store = h.scheduler._store
    rule = RetentionRule(10.0)
    other = sa.create_engine(sa.make_url(db_path).set(drivername="postgresql+psycopg"))
    try:
        with other.connect() as conn:
            # Another process's chunk holds the lock (to the end of its transaction).
            assert conn.execute(sa.text(_TRY_RETENTION_LOCK)).scalar()
            report = result_of(store.purge(rule, 1000.0))
            assert (report.events, report.chunks, report.stopped) == (0, 0, True)
            # A dry run takes no lock.
            report = result_of(store.purge(rule, 1000.0, dry_run=True))
            assert (report.events, report.stopped) == (1, False)
        # The run of a store in another schema of the same database holds a lock of its own.
        elsewhere = sa.make_url(db_path).set(drivername="postgresql+psycopg", query={})
        with sa.create_engine(elsewhere, poolclass=sa.pool.NullPool).connect() as conn:
            assert conn.execute(sa.text("SELECT current_schema()")).scalar() != db_schema(db_path)
            assert conn.execute(sa.text(_TRY_RETENTION_LOCK)).scalar()
            report = result_of(store.purge(rule, 1000.0))
            assert (report.events, report.stopped) == (1, False)
    finally:
        other.dispose()
    result_of(h.scheduler.stop())


def db_schema(url: str) -> str:
    """The schema a test database URL puts first on the search path."""
    options = sa.make_url(url).query["options"]
    assert isinstance(options, str) and options.startswith("-csearch_path=")
    return options[len("-csearch_path=") :]


@pytest.mark.postgres_only
def test_retention_in_one_schema_does_not_give_way_to_another_schema(db_path: str) -> None:
    """
    Retention gives way to a chunk under way in the same schema only: two deployments in two
    schemas of one database each purge their own at the same time.
    """
    import uuid

    from _support import database_engine, result_of

    from relayer.store import RetentionRule

    clock: Any = Clock()
    store = PostgresStore.open_url(clock, db_path, pool=InlineDatabasePool(), pool_size=1)
    other_schema = f"relayer_other_{uuid.uuid4().hex[:12]}"
    other = PostgresStore.open_url(
        clock, db_path, pool=InlineDatabasePool(), pool_size=1, schema=other_schema
    )
    admin = database_engine(db_path)
    try:
        result_of(store.open())
        result_of(other.open())
        result_of(store.register_targets(["t"]))
        result_of(store.add_events([("t", [b'{"n":1}'])], 1.0))
        txn = result_of(store.claim("t", 10, 10**6, 2.0))
        assert result_of(store.complete("t", txn.txn_id, 10, 10**6, 3.0)) is None
        # A chunk of the other schema's retention is under way...
        with other._engine.begin() as conn:
            assert conn.execute(sa.text("SELECT current_schema()")).scalar() == other_schema
            assert other._retention_lock(conn)
            # ...and this schema's purge runs all the same.
            report = result_of(store.purge(RetentionRule(0.0), 100.0))
        assert (report.events, report.chunks) == (1, 1)
        # In one schema, a run still gives way to another's chunk.
        result_of(store.add_events([("t", [b'{"n":2}'])], 4.0))
        txn = result_of(store.claim("t", 10, 10**6, 5.0))
        assert result_of(store.complete("t", txn.txn_id, 10, 10**6, 6.0)) is None
        with store._engine.begin() as conn:
            assert store._retention_lock(conn)
            report = result_of(store.purge(RetentionRule(0.0), 100.0))
        assert (report.events, report.chunks) == (0, 0)
    finally:
        result_of(store.close())
        result_of(other.close())
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{other_schema}" CASCADE'))
        admin.dispose()


@pytest.mark.postgres_only
def test_status_pages_follow_code_point_order_whatever_the_collation(db_path: str) -> None:
    # Many PostgreSQL databases sort text by a language's collation (en_US.UTF-8 is a common
    # default), where "a" sorts before "B"; Python, SQLite and "C" sort "B" first. Paging must
    # follow one order, or pages repeat and skip targets.
    from _support import database_engine, result_of

    ids = ["B", "a", "c", "D", "e"]
    clock = Clock()
    store = PostgresStore.open_url(clock, db_path, pool=InlineDatabasePool())
    scheduler = Scheduler(clock, store, FakeTransport(clock), [target(t) for t in ids])
    assert scheduler.start().called
    engine = database_engine(db_path)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "ALTER TABLE relayer_targets ALTER COLUMN target_id TYPE varchar(255) "
                    'COLLATE "und-x-icu"'
                )
            )
        seen: list[str] = []
        after = None
        for _ in range(len(ids) + 2):
            page = result_of(scheduler.status(after=after, limit=2))
            seen += [s.target_id for s in page]
            if len(page) < 2:
                break
            after = page[-1].target_id
        assert seen == sorted(ids)
        counts = result_of(store.queue_counts(None, 2))
        assert sorted(counts) == sorted(ids)[:2]
    finally:
        engine.dispose()
        result_of(scheduler.stop())


@pytest.mark.postgres_only
@pytest.mark.parametrize("lock", ["exclusive", "shared", "none"])
def test_only_a_store_alone_on_its_schema_stores_events_without_a_notify(
    db_path: str, lock: str
) -> None:
    import psycopg

    from relayer.store.postgres import postgres_url
    from tests._support import result_of

    store = PostgresStore.open_url(Clock(), db_path, pool=InlineDatabasePool(), pool_size=1)
    result_of(store.open())
    # Another process, listening as a scheduler with leases does.
    url = sa.make_url(postgres_url(db_path)).set(drivername="postgresql", query={})
    listener = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
    try:
        listener.execute(f'LISTEN "{store.channel}"')
        if lock != "none":
            result_of(store.hold_process_lock(shared=lock == "shared"))
        result_of(store.register_targets(["mine", "other"]))
        result_of(store.add_events([("mine", [b'{"n":1}'])], 0.0))
        # Then a store without the lock, as an operator's command or a second process has,
        # stores an event: its notification comes after any that the first store sent.
        store.release_process_lock()
        result_of(store.add_events([("other", [b'{"n":2}'])], 0.0))
        heard = []
        for note in listener.notifies(timeout=10.0):
            heard.append(note.payload)
            if note.payload == "other":
                break
        expected = ["other"] if lock == "exclusive" else ["mine", "other"]
        assert heard == expected
    finally:
        listener.close()
        result_of(store.close())
