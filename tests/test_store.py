"""The SQLite store: schema versions and upgrades, and its operations, driven directly."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from relayer import (
    DeliveryState,
    Scheduler,
    SchemaVersionError,
    SQLiteStore,
    StoreError,
    TargetState,
)
from relayer._encoding import ENVELOPE_BYTES, events_of_body, join_events, transaction_body
from relayer.errors import ConfigurationError, NotRunning
from relayer.store import DeadLetter, QueueCounts, SQLStore, Transaction, schema
from relayer.store.postgres import postgres_url
from relayer.store.schema import SCHEMA_VERSION
from relayer.testing import FakeTransport, InlineDatabasePool, build_scheduler, target
from relayer.testing import open_store as open_test_store

T = TypeVar("T")
BIG = 1024 * 1024


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    """A fresh SQLite file: these tests are about the SQLite store, whatever the test database."""
    return tmp_path / "relayer.db"


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that has fired already (the inline pool makes them fire)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def open_store(path: Path) -> SQLiteStore:
    store = SQLiteStore.open_path(Clock(), path, pool=InlineDatabasePool())  # type: ignore[arg-type]
    result_of(store.open())
    return store


@pytest.fixture
def store(sqlite_file: Path) -> Iterator[SQLiteStore]:
    s = open_store(sqlite_file)
    result_of(s.register_targets(["t"]))
    yield s
    result_of(s.close())


def ev(n: int, pad: int = 0) -> bytes:
    """An encoded event, ``{"n":n}`` or with padding to make it longer."""
    return b'{"n":%d}' % n if not pad else b'{"n":%d,"p":"%s"}' % (n, b"x" * pad)


def numbers(txn: Transaction | None) -> list[int]:
    """The event numbers a transaction holds."""
    assert txn is not None
    return [json.loads(e)["n"] for e in events_of_body(txn.body)]


def drain(store: SQLiteStore, target_id: str, max_events: int, max_bytes: int) -> list[Transaction]:
    """Claim and complete every transaction of a target, in order; return them."""
    sent = []
    txn = result_of(store.claim(target_id, max_events, max_bytes, 100.0))
    while txn is not None:
        sent.append(txn)
        txn = result_of(store.complete(target_id, txn.txn_id, max_events, max_bytes, 100.0))
    return sent


def dump(path: Path) -> list[str]:
    """Every table's schema and rows, as SQL, to compare a database before and after."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def sql(path: Path, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        with conn:
            return conn.execute(statement, args).fetchall()
    finally:
        conn.close()


# -- schema versions --------------------------------------------------------------------------


def test_a_fresh_database_gets_the_current_schema_version(sqlite_file: Path) -> None:
    s = open_store(sqlite_file)
    result_of(s.close())
    assert sql(sqlite_file, "SELECT value FROM relayer_meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    tables = {r[0] for r in sql(sqlite_file, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(schema.metadata.tables) <= tables
    # Opening it again changes nothing.
    before = dump(sqlite_file)
    result_of(open_store(sqlite_file).close())
    assert dump(sqlite_file) == before


def newer_database(sqlite_file: Path) -> list[str]:
    """A database with data in it, then marked as written by a newer relayer; its dump."""
    h = build_scheduler(["t"], path=sqlite_file)
    h.transport["t"].down()
    h.scheduler.submit("t", {"n": 1})
    h.scheduler.submit("t", {"n": 2})
    result_of(h.scheduler.stop())
    newer = SCHEMA_VERSION + 1
    sql(sqlite_file, "UPDATE relayer_meta SET value = ? WHERE name = 'schema_version'", str(newer))
    sql(sqlite_file, "CREATE TABLE relayer_from_the_future (x INTEGER)")
    sql(sqlite_file, "INSERT INTO relayer_from_the_future VALUES (42)")
    return dump(sqlite_file)


def assert_names_both_versions(error: BaseException) -> None:
    message = str(error)
    assert str(SCHEMA_VERSION + 1) in message
    assert str(SCHEMA_VERSION) in message
    assert message.index(str(SCHEMA_VERSION + 1)) != message.index(str(SCHEMA_VERSION))


def test_a_newer_schema_is_refused_by_store_open(sqlite_file: Path) -> None:
    before = newer_database(sqlite_file)
    s = SQLiteStore.open_path(Clock(), sqlite_file, pool=InlineDatabasePool())  # type: ignore[arg-type]
    with pytest.raises(SchemaVersionError) as excinfo:
        result_of(s.open())
    assert isinstance(excinfo.value, StoreError)
    assert_names_both_versions(excinfo.value)
    result_of(s.close())
    assert dump(sqlite_file) == before


def test_a_newer_schema_is_refused_by_scheduler_start(sqlite_file: Path) -> None:
    before = newer_database(sqlite_file)
    clock = Clock()
    transport = FakeTransport(clock)
    store = SQLiteStore.open_path(clock, sqlite_file, pool=InlineDatabasePool())  # type: ignore[arg-type]
    scheduler = Scheduler(clock, store, transport, [target("t")])
    with pytest.raises(SchemaVersionError) as excinfo:
        result_of(scheduler.start())
    assert_names_both_versions(excinfo.value)
    assert not scheduler.running
    with pytest.raises(NotRunning):
        scheduler.submit("t", {"n": 3})
    clock.advance(3600)
    assert transport["t"].requests == []
    assert dump(sqlite_file) == before


def test_a_newer_schema_is_refused_by_build_scheduler(sqlite_file: Path) -> None:
    before = newer_database(sqlite_file)
    with pytest.raises(SchemaVersionError) as excinfo:
        build_scheduler(["t"], path=sqlite_file)
    assert_names_both_versions(excinfo.value)
    assert dump(sqlite_file) == before


BODY_7 = transaction_body(join_events([ev(1), ev(2)]))


def version_1_database(sqlite_file: Path) -> None:
    """A database as relayer's schema version 1 wrote it, with a backlog."""
    engine = sa.create_engine(f"sqlite:///{sqlite_file}")
    v1 = schema.define_tables(sa.MetaData(), 1).tables
    try:
        with engine.begin() as conn:
            assert schema.upgrade(conn, to_version=1) == (0, 1)
            assert "last_error" not in {
                c["name"] for c in sa.inspect(conn).get_columns("relayer_targets")
            }
            conn.execute(
                sa.insert(v1["relayer_targets"]),
                [
                    {
                        "target_id": "t",
                        "state": "up",
                        "failures": 0,
                        "next_attempt_at": None,
                        "last_success_at": 5.0,
                        "last_txn_id": 7,
                    }
                ],
            )
            conn.execute(
                sa.insert(v1["relayer_transactions"]),
                [
                    {
                        "target_id": "t",
                        "txn_id": 7,
                        "n_events": 2,
                        "body": BODY_7,
                        "oldest_at": 1.0,
                        "created_at": 2.0,
                        "attempts": 1,
                        "last_attempt_at": 2.0,
                    }
                ],
            )
            conn.execute(
                sa.insert(v1["relayer_queue"]),
                [
                    {
                        "target_id": "t",
                        "pos": 0,
                        "n_events": 2,
                        "events": join_events([ev(3), ev(4)]),
                        "oldest_at": 3.0,
                    },
                    {
                        "target_id": "t",
                        "pos": 0,
                        "n_events": 1,
                        "events": ev(5),
                        "oldest_at": 4.0,
                    },
                ],
            )
            conn.execute(
                sa.insert(v1["relayer_dead_letters"]),
                [
                    {
                        "target_id": "t",
                        "txn_id": 6,
                        "n_events": 1,
                        "body": transaction_body(ev(0)),
                        "oldest_at": 0.5,
                        "attempts": 3,
                        "reason": "HTTP 400",
                        "dead_at": 2.5,
                    }
                ],
            )
    finally:
        engine.dispose()
    assert sql(sqlite_file, "SELECT value FROM relayer_meta") == [("1",)]


def test_a_version_1_database_is_upgraded_without_loss(sqlite_file: Path) -> None:
    version_1_database(sqlite_file)
    s = open_store(sqlite_file)
    assert sql(sqlite_file, "SELECT value FROM relayer_meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    counts = result_of(s.queue_counts())
    assert counts == {
        "t": QueueCounts(
            pending_events=5, pending_transactions=1, oldest_pending_at=1.0, dead_letters=1
        )
    }
    records = result_of(s.register_targets(["t"]))
    assert records["t"].last_txn_id == 7
    assert records["t"].last_success_at == 5.0
    assert records["t"].last_error is None
    assert records["t"].has_pending
    dead = result_of(s.dead_letters("t", 10))
    assert [(d.txn_id, d.n_events, d.attempts, d.reason, d.dead_at, d.body) for d in dead] == [
        (6, 1, 3, "HTTP 400", 2.5, transaction_body(ev(0)))
    ]
    result_of(s.close())


def test_a_scheduler_on_an_upgraded_database_delivers_the_backlog_in_order(
    sqlite_file: Path,
) -> None:
    version_1_database(sqlite_file)
    h = build_scheduler(["t"], path=sqlite_file)
    fake = h.transport["t"]
    # The stored transaction first, resent with its id and exact bytes; then the queued events,
    # with the next id.
    assert fake.requests[0] == (7, BODY_7)
    assert fake.txn_ids == [7, 8]
    assert fake.received[0].body == BODY_7
    assert fake.events == [{"n": n} for n in range(1, 6)]
    assert fake.violations == []
    # New events go on from there.
    h.scheduler.submit("t", {"n": 6})
    assert fake.txn_ids == [7, 8, 9]
    statuses = result_of(h.scheduler.status())
    assert [(s.target_id, s.pending_events, s.dead_letters) for s in statuses] == [("t", 0, 1)]


# -- claiming ---------------------------------------------------------------------------------


def test_claim_on_an_empty_queue_returns_none(store: SQLiteStore) -> None:
    assert result_of(store.claim("t", 100, BIG, 1.0)) is None
    assert result_of(store.queue_counts()).get("t", QueueCounts()) == QueueCounts()


def test_claim_on_an_empty_queue_marks_a_down_target_up(store: SQLiteStore) -> None:
    result_of(store.add_events([("t", [ev(1)])], 1.0))
    txn = result_of(store.claim("t", 100, BIG, 1.0))
    assert txn is not None
    result_of(store.fail("t", txn.txn_id, 3, 50.0, "HTTP 503", 2.0))
    record = result_of(store.register_targets(["t"]))["t"]
    assert (record.state, record.failures, record.next_attempt_at) == (TargetState.DOWN, 3, 50.0)
    assert result_of(store.complete("t", txn.txn_id, 100, BIG, 60.0)) is None
    record = result_of(store.register_targets(["t"]))["t"]
    assert (record.state, record.failures, record.next_attempt_at) == (TargetState.UP, 0, None)
    assert not record.has_pending


def test_claim_returns_the_same_transaction_until_it_is_completed(
    store: SQLiteStore, sqlite_file: Path
) -> None:
    result_of(store.add_events([("t", [ev(1), ev(2)])], 1.0))
    first = result_of(store.claim("t", 100, BIG, 2.0))
    again = result_of(store.claim("t", 100, BIG, 3.0))
    assert first is not None and again is not None
    assert (first.txn_id, first.body, first.attempts) == (1, again.body, 1)
    assert (again.txn_id, again.attempts) == (1, 2)
    # The attempt count is durable.
    result_of(store.close())
    reopened = open_store(sqlite_file)
    third = result_of(reopened.claim("t", 100, BIG, 4.0))
    assert third is not None
    assert (third.txn_id, third.body, third.attempts) == (1, first.body, 3)
    result_of(reopened.close())


def test_claim_caps_transactions_by_count(store: SQLiteStore) -> None:
    result_of(store.add_events([("t", [ev(n) for n in range(10)])], 1.0))
    result_of(store.add_events([("t", [ev(10), ev(11)])], 2.0))
    sent = drain(store, "t", 3, BIG)
    assert [numbers(t) for t in sent] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert [t.n_events for t in sent] == [3, 3, 3, 3]


def test_claim_takes_whole_runs_and_splits_runs_as_needed(store: SQLiteStore) -> None:
    for start, n in [(0, 2), (2, 3), (5, 1), (6, 4)]:
        result_of(store.add_events([("t", [ev(i) for i in range(start, start + n)])], 1.0))
    sent = drain(store, "t", 4, BIG)
    assert [numbers(t) for t in sent] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_claim_caps_transactions_by_bytes(store: SQLiteStore) -> None:
    events = [ev(n, pad=10) for n in range(10, 20)]
    size = len(events[0])
    assert all(len(e) == size for e in events)
    three = ENVELOPE_BYTES + 3 * size + 2 * 2  # three events and two separators
    result_of(store.add_events([("t", events)], 1.0))
    sent = drain(store, "t", 100, three)
    assert [t.n_events for t in sent] == [3, 3, 3, 1]
    assert [len(t.body) for t in sent[:3]] == [three] * 3
    assert [n for t in sent for n in numbers(t)] == list(range(10, 20))

    result_of(store.add_events([("t", events)], 2.0))
    sent = drain(store, "t", 100, three - 1)
    assert [t.n_events for t in sent] == [2, 2, 2, 2, 2]
    assert all(len(t.body) < three for t in sent)


def test_an_event_larger_than_the_cap_still_goes_out_alone(store: SQLiteStore) -> None:
    result_of(store.add_events([("t", [ev(1, pad=500), ev(2), ev(3, pad=500), ev(4)])], 1.0))
    sent = drain(store, "t", 100, 64)
    assert [numbers(t) for t in sent] == [[1], [2], [3], [4]]
    assert len(sent[0].body) > 64


def test_transactions_hold_their_events_in_submit_order_across_targets(
    store: SQLiteStore,
) -> None:
    result_of(store.register_targets(["u"]))
    result_of(store.add_events([("t", [ev(1)]), ("u", [ev(100)]), ("t", [ev(2), ev(3)])], 1.0))
    result_of(store.add_events([("u", [ev(101)]), ("t", [ev(4)])], 2.0))
    assert [numbers(t) for t in drain(store, "t", 100, BIG)] == [[1, 2, 3, 4]]
    assert [numbers(t) for t in drain(store, "u", 100, BIG)] == [[100, 101]]


# -- transaction ids --------------------------------------------------------------------------


def test_transaction_ids_increase_and_are_never_reused(sqlite_file: Path) -> None:
    s = open_store(sqlite_file)
    result_of(s.register_targets(["t", "u"]))
    result_of(s.add_events([("t", [ev(n) for n in range(5)]), ("u", [ev(9)])], 1.0))
    assert [t.txn_id for t in drain(s, "t", 2, BIG)] == [1, 2, 3]
    assert [t.txn_id for t in drain(s, "u", 2, BIG)] == [1]  # ids are per target
    result_of(s.close())
    # Nothing is open: the ids must not start again from the delivered ones.
    assert sql(
        sqlite_file, "SELECT COUNT(*) FROM relayer_txns WHERE state IN ('pending', 'awaiting')"
    ) == [(0,)]
    assert sql(sqlite_file, "SELECT COUNT(*) FROM relayer_runs") == [(0,)]

    s = open_store(sqlite_file)
    result_of(s.register_targets(["t", "u"]))
    result_of(s.add_events([("t", [ev(n) for n in range(5, 8)])], 2.0))
    assert [t.txn_id for t in drain(s, "t", 2, BIG)] == [4, 5]
    result_of(s.close())

    # Even with the rows deleted by hand, and the targets re-registered.
    sql(sqlite_file, "DELETE FROM relayer_txns")
    s = open_store(sqlite_file)
    result_of(s.register_targets(["t"]))
    result_of(s.add_events([("t", [ev(8)])], 3.0))
    assert [t.txn_id for t in drain(s, "t", 2, BIG)] == [6]
    result_of(s.close())


# -- splitting --------------------------------------------------------------------------------


def test_split_puts_the_second_half_back_at_the_head(store: SQLiteStore) -> None:
    result_of(store.add_events([("t", [ev(n) for n in range(8)])], 1.0))
    txn = result_of(store.claim("t", 8, BIG, 2.0))
    assert txn is not None and numbers(txn) == list(range(8))
    # Events that arrive meanwhile go after the ones already in the transaction.
    result_of(store.add_events([("t", [ev(8), ev(9)])], 3.0))

    first = result_of(store.split("t", txn.txn_id, 4.0))
    assert first is not None
    assert (first.txn_id, numbers(first), first.attempts) == (2, [0, 1, 2, 3], 1)
    assert first.oldest_at == txn.oldest_at
    # The first half is split again: its second half goes before the earlier second half.
    again = result_of(store.split("t", first.txn_id, 5.0))
    assert again is not None
    assert (again.txn_id, numbers(again)) == (3, [0, 1])
    once_more = result_of(store.split("t", again.txn_id, 6.0))
    assert once_more is not None
    assert (once_more.txn_id, numbers(once_more)) == (4, [0])
    # A single event cannot be split: the transaction stays as it is.
    assert result_of(store.split("t", once_more.txn_id, 7.0)) is None
    head = result_of(store.claim("t", 100, BIG, 8.0))
    assert head is not None and (head.txn_id, numbers(head)) == (4, [0])

    counts = result_of(store.queue_counts())["t"]
    assert (counts.pending_events, counts.pending_transactions) == (10, 1)
    rest = result_of(store.complete("t", head.txn_id, 100, BIG, 9.0))
    assert rest is not None
    assert (rest.txn_id, numbers(rest)) == (5, list(range(1, 10)))


def test_splitting_a_transaction_that_is_gone_returns_none(store: SQLiteStore) -> None:
    assert result_of(store.split("t", 99, 1.0)) is None


# -- dead letters -----------------------------------------------------------------------------


def test_dead_letter_and_replay_round_trip(store: SQLiteStore) -> None:
    result_of(store.add_events([("t", [ev(1), ev(2)])], 1.0))
    bad = result_of(store.claim("t", 2, BIG, 2.0))
    assert bad is not None and bad.txn_id == 1
    result_of(store.claim("t", 2, BIG, 3.0))  # a second attempt
    result_of(store.add_events([("t", [ev(3)])], 4.0))

    following = result_of(store.dead_letter("t", bad.txn_id, "HTTP 400", 2, BIG, 5.0))
    assert following is not None and (following.txn_id, numbers(following)) == (2, [3])
    assert result_of(store.dead_letters("t", 10)) == [
        DeadLetter("t", 1, 2, "HTTP 400", 5.0, bad.events, bad.event_ids)
    ]
    counts = result_of(store.queue_counts())["t"]
    assert (counts.pending_events, counts.pending_transactions, counts.dead_letters) == (1, 1, 1)
    assert result_of(store.complete("t", following.txn_id, 2, BIG, 6.0)) is None

    assert result_of(store.replay("t", 7.0)) == 2
    assert result_of(store.dead_letters("t", 10)) == []
    counts = result_of(store.queue_counts())["t"]
    assert (counts.pending_events, counts.dead_letters) == (2, 0)
    replayed = result_of(store.claim("t", 2, BIG, 8.0))
    assert replayed is not None
    # The same events, in a new transaction with a new id.
    assert replayed.txn_id == 3
    assert replayed.body == bad.body
    assert result_of(store.complete("t", replayed.txn_id, 2, BIG, 9.0)) is None
    assert result_of(store.replay("t", 10.0)) == 0


def test_replayed_events_go_after_those_already_queued(store: SQLiteStore) -> None:
    result_of(store.add_events([("t", [ev(1)])], 1.0))
    bad = result_of(store.claim("t", 100, BIG, 1.0))
    assert bad is not None
    result_of(store.dead_letter("t", bad.txn_id, "HTTP 403", 100, BIG, 2.0))
    result_of(store.add_events([("t", [ev(2)])], 3.0))
    assert result_of(store.replay("t", 4.0)) == 1
    assert [numbers(t) for t in drain(store, "t", 100, BIG)] == [[2, 1]]


def test_dead_letters_are_listed_oldest_first_up_to_the_limit(store: SQLiteStore) -> None:
    for n in range(3):
        result_of(store.add_events([("t", [ev(n)])], float(n)))
        txn = result_of(store.claim("t", 100, BIG, float(n)))
        assert txn is not None
        result_of(store.dead_letter("t", txn.txn_id, f"HTTP 40{n}", 100, BIG, float(n)))
    listed = result_of(store.dead_letters("t", 2))
    assert [(d.txn_id, d.reason) for d in listed] == [(1, "HTTP 400"), (2, "HTTP 401")]
    assert len(result_of(store.dead_letters("t", 100))) == 3
    assert result_of(store.dead_letters("nobody", 100)) == []


# -- counts -----------------------------------------------------------------------------------


def test_queue_counts(store: SQLiteStore) -> None:
    result_of(store.register_targets(["a", "b", "c", "d"]))
    result_of(store.add_events([("a", [ev(1), ev(2), ev(3)])], 10.0))
    result_of(store.add_events([("a", [ev(4), ev(5)]), ("b", [ev(6)])], 20.0))
    txn = result_of(store.claim("a", 2, BIG, 30.0))
    assert txn is not None and txn.oldest_at == 10.0
    result_of(store.add_events([("d", [ev(7)])], 40.0))
    dead = result_of(store.claim("d", 100, BIG, 41.0))
    assert dead is not None
    result_of(store.dead_letter("d", dead.txn_id, "HTTP 400", 100, BIG, 42.0))

    counts = result_of(store.queue_counts())
    assert counts["a"] == QueueCounts(
        pending_events=5, pending_transactions=1, oldest_pending_at=10.0, dead_letters=0
    )
    assert counts["b"] == QueueCounts(
        pending_events=1, pending_transactions=0, oldest_pending_at=20.0, dead_letters=0
    )
    assert counts.get("c", QueueCounts()) == QueueCounts()
    assert counts["d"] == QueueCounts(
        pending_events=0, pending_transactions=0, oldest_pending_at=None, dead_letters=1
    )
    assert counts.get("t", QueueCounts()) == QueueCounts()

    # Delivering the transaction leaves the rest, and the oldest is now the next event.
    after = result_of(store.complete("a", txn.txn_id, 2, BIG, 50.0))
    assert after is not None
    counts = result_of(store.queue_counts())
    assert counts["a"] == QueueCounts(
        pending_events=3, pending_transactions=1, oldest_pending_at=10.0, dead_letters=0
    )


# -- replay: atomic, serialised, in chunks ----------------------------------------------------


def store_on(db_path: Path | str) -> SQLStore:
    """An opened store on the test database (SQLite or PostgreSQL), with target "t"."""
    s = open_test_store(Clock(), db_path)
    result_of(s.open())
    result_of(s.register_targets(["t"]))
    return s


def dead_letter_events(s: SQLStore, numbers_: list[int], target_id: str = "t") -> None:
    """Dead-letter one transaction per number, each holding that one event."""
    for n in numbers_:
        result_of(s.add_events([(target_id, [ev(n)])], float(n)))
        txn = result_of(s.claim(target_id, 1, BIG, float(n)))
        assert txn is not None and numbers(txn) == [n]
        assert result_of(s.dead_letter(target_id, txn.txn_id, "HTTP 400", 1, BIG, float(n))) is None


def drained_numbers(s: SQLStore, target_id: str = "t") -> list[int]:
    return [n for txn in drain(s, target_id, 100, BIG) for n in numbers(txn)]  # type: ignore[arg-type]


def other_engine(db_path: Path | str) -> sa.Engine:
    """An engine on the same database, as another process has."""
    if isinstance(db_path, Path):
        return sa.create_engine(f"sqlite:///{db_path}", poolclass=sa.pool.NullPool)
    return sa.create_engine(postgres_url(db_path), poolclass=sa.pool.NullPool)


@pytest.mark.postgres_only
def test_a_dead_letter_stored_while_a_replay_runs_is_not_lost(db_path: str) -> None:
    s = store_on(db_path)
    dead_letter_events(s, [1, 2])
    other = other_engine(db_path)
    stored: list[str] = []

    def store_another(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # Another process dead-letters a transaction after the replay read the dead letters,
        # before it marked them replayed; READ COMMITTED lets the update see it.
        # (Schema 4 marks replayed dead letters instead of deleting them.)
        marking = statement.lstrip().upper().startswith("UPDATE RELAYER_TXNS SET STATE")
        if marking and "replayed" in str(args) and not stored:
            stored.append(statement)
            with other.begin() as c:
                c.execute(
                    sa.insert(schema.events).values(
                        first_seq=999,
                        last_seq=999,
                        seqs="999",
                        n_events=1,
                        bodies=ev(99),
                        submitted_at=50.0,
                        expires=None,
                        ids=None,
                        set_id=sa.select(schema.target_sets.c.set_id)
                        .where(schema.target_sets.c.targets == "t")
                        .scalar_subquery(),
                    )
                )
                c.execute(
                    sa.insert(schema.txns).values(
                        target_id="t",
                        txn_id=99,
                        state="dead",
                        seqs="999",
                        first_seq=999,
                        last_seq=999,
                        n_events=1,
                        size=len(ev(99)),
                        oldest_at=50.0,
                        created_at=50.0,
                        attempts=1,
                        last_attempt_at=50.0,
                        done_at=51.0,
                        reason="HTTP 400",
                    )
                )

    sa.event.listen(s._engine, "before_cursor_execute", store_another)
    try:
        assert result_of(s.replay("t", 60.0)) == 2
    finally:
        sa.event.remove(s._engine, "before_cursor_execute", store_another)
        other.dispose()
    assert stored
    # The one stored meanwhile was not replayed, and it is still there to be replayed.
    assert [d.txn_id for d in result_of(s.dead_letters("t", 10))] == [99]
    assert drained_numbers(s) == [1, 2]
    assert result_of(s.replay("t", 70.0)) == 1
    assert drained_numbers(s) == [99]
    result_of(s.close())


@pytest.mark.postgres_only
def test_two_replays_at_once_queue_each_event_once(db_path: str) -> None:
    first, second = store_on(db_path), store_on(db_path)
    dead_letter_events(first, [1, 2, 3])
    monitor = other_engine(db_path)
    read = {id(first): threading.Event(), id(second): threading.Event()}
    other_of = {id(first): second, id(second): first}

    def blocks_another(pid: int) -> bool:
        with monitor.connect() as c:
            waiting = c.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
                ),
                {"pid": pid},
            ).scalar_one()
        return bool(waiting)

    def hook(store: SQLStore) -> Any:
        def wait_for_the_other(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # Each replay, once it has read the dead letters (it is about to queue them), waits
            # until the other has read them too, or is held up by this one's lock.
            if not statement.lstrip().upper().startswith("INSERT INTO RELAYER_QUEUE"):
                return
            mine = read[id(store)]
            if mine.is_set():
                return
            mine.set()
            theirs = read[id(other_of[id(store)])]
            pid = cursor.connection.info.backend_pid
            for _ in range(10_000):
                if theirs.wait(0.01) or blocks_another(pid):
                    return

        return wait_for_the_other

    hooks = [(s, hook(s)) for s in (first, second)]
    for s, h in hooks:
        sa.event.listen(s._engine, "before_cursor_execute", h)
    results: dict[int, Any] = {}
    start = threading.Barrier(2)

    def replay(s: SQLStore) -> None:
        start.wait()
        d = s.replay("t", 10.0)
        d.addBoth(lambda r: results.__setitem__(id(s), r))

    threads = [threading.Thread(target=replay, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, h in hooks:
        sa.event.remove(s._engine, "before_cursor_execute", h)
    monitor.dispose()
    assert all(isinstance(r, int) for r in results.values()), results
    assert sorted(results.values()) == [0, 3]
    assert drained_numbers(first) == [1, 2, 3]
    assert result_of(first.dead_letters("t", 10)) == []
    result_of(first.close())
    result_of(second.close())


def test_a_long_replay_moves_dead_letters_in_chunks_in_order(db_path: Path | str) -> None:
    s = store_on(db_path)
    dead_letter_events(s, list(range(10)))
    result_of(s.add_events([("t", [ev(100)])], 20.0))
    s.replay_chunk = 3  # type: ignore[misc]
    chunks: list[int] = []
    take = s._take_dead_letters

    def counting(*args: Any) -> list[Any]:
        rows = take(*args)
        chunks.append(len(rows))
        return rows

    s._take_dead_letters = counting  # type: ignore[method-assign]
    assert result_of(s.replay("t", 30.0)) == 10
    # Read three at a time, never all of them at once.
    assert chunks == [3, 3, 3, 1]
    assert drained_numbers(s) == [100, *range(10)]
    assert result_of(s.dead_letters("t", 100)) == []
    result_of(s.close())


def test_status_is_paged_by_target_id(db_path: Path | str) -> None:
    h = build_scheduler(["a", "b", "c", "d", "e"], path=db_path)
    for t in ("a", "b", "c", "d", "e"):
        h.transport[t].down()
        h.scheduler.submit(t, {"n": 1})
    result_of(h.scheduler.stop())
    # Only "a" is registered again; b..e are not, but have data.
    transport = FakeTransport(h.clock)
    transport["a"].down()
    h = build_scheduler(["a"], path=db_path, clock=h.clock, transport=transport)
    pages = []
    after = None
    while True:
        page = result_of(h.scheduler.status(after=after, limit=2))
        pages.append([(st.target_id, st.registered, st.pending_events) for st in page])
        if len(page) < 2:
            break
        after = page[-1].target_id
    assert pages == [
        [("a", True, 1), ("b", False, 1)],
        [("c", False, 1), ("d", False, 1)],
        [("e", False, 1)],
    ]
    # Without arguments: the first page, of up to 1000.
    assert [st.target_id for st in result_of(h.scheduler.status())] == ["a", "b", "c", "d", "e"]
    assert result_of(h.scheduler.status(after="e")) == []
    for bad in ({"limit": 0}, {"limit": True}, {"limit": 10_001}, {"limit": 2.0}, {"after": 3}):
        with pytest.raises(ConfigurationError):
            h.scheduler.status(**bad)  # type: ignore[arg-type]
    result_of(h.scheduler.stop())


def test_status_pages_include_registered_targets_not_stored_yet(db_path: Path | str) -> None:
    h = build_scheduler(["b", "d"], path=db_path)
    store = h.scheduler._store
    # A target added while running, whose registration in the store has not happened yet.
    h.scheduler._configs["c"] = target("c")
    assert [st.target_id for st in result_of(h.scheduler.status(limit=2))] == ["b", "c"]
    assert [st.target_id for st in result_of(h.scheduler.status(after="c", limit=2))] == ["d"]
    assert set(result_of(store.queue_counts("b", 1))) == {"d"}
    del h.scheduler._configs["c"]
    result_of(h.scheduler.stop())


@pytest.mark.sqlite_only
def test_queue_counts_read_only_the_page_s_targets_by_index(db_path: Path) -> None:
    s = store_on(db_path)
    result_of(s.register_targets(["a", "b", "c"]))
    result_of(s.add_events([("a", [ev(1)]), ("b", [ev(2)]), ("c", [ev(3)])], 1.0))
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        statements.append((statement, parameters))

    sa.event.listen(s._read_engine, "before_cursor_execute", record)
    counts = result_of(s.queue_counts("a", 1))
    sa.event.remove(s._read_engine, "before_cursor_execute", record)
    assert counts == {"b": QueueCounts(1, 0, 1.0, 0)}
    conn = sqlite3.connect(db_path)
    try:
        plans = [
            row[-1]
            for statement, parameters in statements
            if statement.lstrip().upper().startswith("SELECT")
            for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
        ]
    finally:
        conn.close()
    # Every table is searched through an index, none scanned whole.
    assert plans and all(not p.startswith("SCAN") for p in plans), plans
    result_of(s.close())


def sqlite_steps(engine: sa.Engine) -> list[int]:
    """
    Counts the SQLite virtual machine's steps on ``engine``'s connections, from now on: a
    measure of a query's work that, unlike its time, is the same on every run.
    """
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        dbapi_connection.set_progress_handler(count, 1)

    def checkin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.set_progress_handler(None, 1)

    sa.event.listen(engine, "checkout", checkout)
    sa.event.listen(engine, "checkin", checkin)
    return steps


@pytest.mark.sqlite_only
@pytest.mark.parametrize("with_events", [False, True], ids=["ids", "bodies"])
def test_a_page_deep_in_a_listing_costs_what_the_first_page_costs(
    store: SQLiteStore, with_events: bool
) -> None:
    # 300 blocks of 5 delivered events, each block in its own transaction; a page is 5
    # events. Finding a page's first block once read every block before it, through the view
    # of live and archived events: the last page cost a hundred times the first.
    blocks, per = 300, 5
    for b in range(blocks):
        batch = [("t", [ev(b * per + i, pad=200) for i in range(per)])]
        result_of(store.add_events(batch, 1.0))
    claim = result_of(store.claim("t", per, BIG, 2.0))
    while isinstance(claim, Transaction):
        claim = result_of(store.complete("t", claim.txn_id, per, BIG, 2.0))
    steps = sqlite_steps(store._read_engine)
    cursor: str | None = None
    costs: list[int] = []
    listed: list[int] = []
    while True:
        before = steps[0]
        page = result_of(
            store.target_events("t", DeliveryState.DELIVERED, cursor, per, with_events=with_events)
        )
        costs.append(steps[0] - before)
        listed.extend(int(e.event_id.rsplit("-", 1)[1]) for e in page.entries)
        if with_events:
            bodies = [e.event for e in page.entries]
            assert bodies == [ev(n - 1, pad=200) for n in listed[-len(page.entries) :]]
        if page.next is None:
            break
        cursor = page.next
    assert listed == list(range(1, blocks * per + 1))
    assert len(costs) == blocks
    assert max(costs) <= 2 * costs[0], (costs[0], costs[len(costs) // 2], costs[-1])


def test_dead_letters_are_paged_by_transaction_id(db_path: Path | str) -> None:
    h = build_scheduler(["t"], path=db_path, max_events=1)
    h.transport["t"].fail_with(400)
    for n in range(5):
        h.scheduler.submit("t", {"n": n})
    first = result_of(h.scheduler.dead_letters("t", 2))
    assert [d.txn_id for d in first] == [1, 2]
    second = result_of(h.scheduler.dead_letters("t", 2, after=first[-1].txn_id))
    assert [d.txn_id for d in second] == [3, 4]
    assert [d.txn_id for d in result_of(h.scheduler.dead_letters("t", 2, after=4))] == [5]
    assert result_of(h.scheduler.dead_letters("t", 2, after=5)) == []
    assert len(result_of(h.scheduler.dead_letters("t", Scheduler.MAX_DEAD_LETTERS_PAGE))) == 5
    for limit in (0, Scheduler.MAX_DEAD_LETTERS_PAGE + 1, 2**63, True):
        with pytest.raises(ConfigurationError):
            h.scheduler.dead_letters("t", limit)
    for after in (-1, "2", True, 2.0):
        with pytest.raises(ConfigurationError):
            h.scheduler.dead_letters("t", 2, after=after)  # type: ignore[arg-type]
    result_of(h.scheduler.stop())


# -- reads beside the writer ------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_reads_answer_while_another_connection_holds_the_write_lock(db_path: Path) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    store = SQLiteStore.open_path(
        clock,  # type: ignore[arg-type]
        db_path,
        pool=InlineDatabasePool(),
        busy_timeout_ms=0,
    )
    scheduler = Scheduler(clock, store, transport, [target("t", max_events=1)])
    result_of(scheduler.start())
    transport["t"].fail_with(400)
    result_of(scheduler.submit("t", {"n": 1}))
    lock = sqlite3.connect(db_path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        # With the write lock held elsewhere (and no waiting for it), reads still answer.
        (status,) = result_of(scheduler.status())
        assert (status.target_id, status.dead_letters) == ("t", 1)
        assert [d.txn_id for d in result_of(scheduler.dead_letters("t"))] == [1]
        assert set(result_of(store.register_targets(["t"]))) == {"t"}
        assert set(result_of(store.load_targets(["t"]))) == {"t"}
        # A write does wait for the lock: registering a new target is a write.
        with pytest.raises(StoreError):
            result_of(store.register_targets(["new"]))
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    assert set(result_of(store.register_targets(["new"]))) == {"t", "new"}
    result_of(scheduler.stop())


@pytest.mark.sqlite_only
@pytest_twisted.ensureDeferred
async def test_reads_on_the_read_thread_do_not_wait_for_the_writer(tmp_path: Path) -> None:
    from twisted.internet import reactor

    path = tmp_path / "relayer.db"
    store = SQLiteStore.open_path(reactor, path, busy_timeout_ms=0)  # type: ignore[arg-type]
    await store.open()
    await store.register_targets(["t"])
    await store.add_events([("t", [ev(1)])], 1.0)
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        counts = await store.queue_counts()
        assert counts["t"].pending_events == 1
        assert await store.dead_letters("t", 10) == []
        assert set(await store.register_targets(["t"])) == {"t"}
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    await store.close()
    assert store._read_pool is not None and not store._read_pool._started  # type: ignore[attr-defined]


def test_a_retention_run_reports_whether_it_stopped_before_the_end(sqlite_file: Path) -> None:
    from relayer.store import RetentionRule

    h = build_scheduler(["t"], path=sqlite_file)
    for n in range(3):
        result_of(h.scheduler.submit("t", {"n": n}))
        h.clock.advance(1.0)  # each event in a block and a transaction of its own
    assert len(h.transport["t"].events) == 3
    result_of(h.scheduler.stop())
    store = open_store(sqlite_file)
    rule = RetentionRule(10.0)
    # Told to stop after the first chunk (of one event number), the run says so.
    report = result_of(store.purge(rule, 1000.0, chunk=1, keep_going=lambda: False))
    assert (report.events, report.chunks, report.stopped) == (1, 1, True)
    # Run to the end, it does not; keep_going is not asked after the last chunk.
    asked: list[bool] = []

    def keep_going() -> bool:
        asked.append(True)
        return True

    report = result_of(store.purge(rule, 1000.0, chunk=1, keep_going=keep_going))
    assert (report.events, report.stopped) == (2, False)
    assert len(asked) == report.chunks - 1
    result_of(store.close())
