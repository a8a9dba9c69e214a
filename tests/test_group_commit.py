"""Group commit: units of database work that wait run together in one database transaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
import sqlalchemy as sa
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure

from relayer.errors import StoreError, StoreUnavailable
from relayer.store._group import GroupCommit, _together


class _Database:
    """
    A scripted database thread: each call to ``run`` is one database transaction, which runs
    (on a list standing for the connection) and commits only when the test says so.
    """

    def __init__(self) -> None:
        self.committed: list[Any] = []
        self.transactions: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def run(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.transactions.append((f, args, d))
        return d

    def finish_next(self) -> None:
        """Run the oldest waiting transaction, and commit it unless it raised."""
        f, args, d = self.transactions.pop(0)
        conn: list[Any] = []
        try:
            result = f(conn, *args)
        except BaseException:
            d.errback(Failure())
            return
        self.committed.extend(conn)
        d.callback(result)


def _unit(value: Any) -> Any:
    def unit(conn: list[Any]) -> Any:
        conn.append(value)
        return value

    return unit


def _failing(error: BaseException) -> Any:
    def unit(conn: list[Any]) -> Any:
        conn.append("half-done")
        raise error

    return unit


def _results(ds: list[Deferred[Any]]) -> list[Any]:
    out: list[Any] = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_units_that_wait_run_in_one_transaction_in_order() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    first = group.run(_unit("a"))
    waiting = [group.run(_unit(v)) for v in "bcd"]
    assert len(db.transactions) == 1  # b, c and d wait for a's transaction
    results = _results([first, *waiting])
    db.finish_next()
    assert results == ["a"]
    assert len(db.transactions) == 1  # b, c and d together
    db.finish_next()
    assert results == ["a", "b", "c", "d"]
    assert db.committed == ["a", "b", "c", "d"]
    assert not db.transactions


def test_a_result_is_reported_only_after_its_commit() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    group.run(_unit("a"))
    results = _results([group.run(_unit("b")), group.run(_unit("c"))])
    db.finish_next()
    assert results == []
    db.finish_next()
    assert results == ["b", "c"]


def test_a_failing_unit_fails_alone_and_leaves_nothing_behind() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    group.run(_unit("first"))
    results = _results(
        [group.run(_unit("b")), group.run(_failing(StoreError("bad"))), group.run(_unit("d"))]
    )
    db.finish_next()
    db.finish_next()  # the group fails as a whole: nothing of it is committed
    assert db.committed == ["first"]
    assert results == []
    # Each unit is run again on its own, in order.
    assert len(db.transactions) == 3
    while db.transactions:
        db.finish_next()
    assert results[0] == "b"
    assert isinstance(results[1], Failure) and results[1].check(StoreError)
    assert results[2] == "d"
    assert db.committed == ["first", "b", "d"]


def test_an_unavailable_store_fails_the_whole_group_without_running_it_again() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    group.run(_unit("first"))
    results = _results([group.run(_unit("b")), group.run(_failing(StoreUnavailable("locked")))])
    db.finish_next()
    db.finish_next()
    assert len(results) == 2
    assert all(isinstance(r, Failure) and r.check(StoreUnavailable) for r in results)
    assert not db.transactions
    assert db.committed == ["first"]


def test_a_group_takes_at_most_max_units() -> None:
    db = _Database()
    group = GroupCommit(db.run, max_units=2)
    group.run(_unit(0))
    results = _results([group.run(_unit(i)) for i in range(1, 6)])
    db.finish_next()
    sizes = []
    while db.transactions:
        f, args, _ = db.transactions[0]
        sizes.append(len(args[0]) if f is _together else 1)
        db.finish_next()
    assert sizes == [2, 2, 1]
    assert results == [1, 2, 3, 4, 5]


def test_idle_fires_once_everything_handed_over_is_done() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    assert _results([group.idle()]) == [None]
    group.run(_unit("a"))
    group.run(_unit("b"))
    idle = _results([group.idle()])
    db.finish_next()
    assert idle == []
    db.finish_next()
    assert idle == [None]


def test_work_done_at_once_does_not_recurse() -> None:
    # With a pool that runs work at once (as tests use), each group finishes inside the
    # group's own loop; a long chain of units, each handed over by the callback of the one
    # before, must be handed over by that loop rather than by recursion.
    db = _Database()
    calls = 0

    def run(f: Any, *args: Any) -> Deferred[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return db.run(f, *args)  # the first one waits for the test
        d: Deferred[Any] = Deferred()
        d.callback(f([], *args))
        return d

    group = GroupCommit(run)
    done: list[int] = []

    def step(n: int) -> None:
        done.append(n)
        if n < 5000:
            group.run(_unit(n + 1)).addCallback(step)

    group.run(_unit(0)).addCallback(step)
    db.finish_next()
    assert done == list(range(5001))


@pytest_twisted.ensureDeferred
async def test_a_sqlite_store_commits_waiting_work_together(tmp_path: Path) -> None:
    from twisted.internet import reactor

    from relayer.store.sqlite import SQLiteStore

    store = SQLiteStore.open_path(reactor, tmp_path / "relayer.db")
    commits: list[None] = []
    sa.event.listen(store._engine, "commit", lambda conn: commits.append(None))
    await store.open()
    try:
        names = [f"t{i}" for i in range(50)]
        await store.register_targets(names)
        await store.add_events([(name, [b'{"n":1}']) for name in names], 1.0)
        commits.clear()
        claims = [store.claim(name, 100, 1 << 20, 2.0) for name in names]
        results = await DeferredList(claims, fireOnOneErrback=True)
        txns = [txn for _, txn in results]
        assert [t.target_id for t in txns] == names
        assert all(t.txn_id == 1 and t.n_events == 1 for t in txns)
        # 50 claims, far fewer commits: those that waited were committed together.
        assert len(commits) < len(names) / 2
    finally:
        await store.close()


def test_units_with_priority_go_ahead_in_a_transaction_of_their_own() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    group.run(_unit("busy"))
    results = _results([group.run(_unit("b")), group.first(_unit("x")), group.run(_unit("c"))])
    first = _results([group.first(_unit("y"))])
    db.finish_next()
    # x and y, alone: b and c wait.
    assert len(db.transactions) == 1
    db.finish_next()
    assert first == ["y"]
    assert results == ["x"]
    assert db.committed == ["busy", "x", "y"]
    # Then b and c, together, in the order they came.
    assert len(db.transactions) == 1
    db.finish_next()
    assert results == ["x", "b", "c"]
    assert db.committed == ["busy", "x", "y", "b", "c"]
    assert not db.transactions


def test_units_without_priority_are_passed_over_only_once() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    group.run(_unit("busy"))
    waiting = _results([group.run(_unit("b"))])
    order: list[Any] = []

    def then_another(value: Any) -> Any:
        # Handed over while x's result is reported: it goes ahead of b too, but b follows
        # right behind it, before any further unit with priority.
        order.append(value)
        group.first(_unit("y")).addCallback(order.append)
        return value

    group.first(_unit("x")).addCallback(then_another)
    db.finish_next()  # busy
    db.finish_next()  # x, alone
    assert order == ["x"]
    assert len(db.transactions) == 2  # y, then b right behind it
    db.finish_next()
    group.first(_unit("z")).addCallback(order.append)
    db.finish_next()
    assert order == ["x", "y"]
    assert waiting == ["b"]
    db.finish_next()
    assert order == ["x", "y", "z"]
    assert db.committed == ["busy", "x", "y", "b", "z"]


def test_idle_waits_for_units_with_priority_too() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    group.run(_unit("busy"))
    group.first(_unit("x"))
    idle = _results([group.idle()])
    db.finish_next()
    assert idle == []
    db.finish_next()
    assert idle == [None]


class _ScriptedPool:
    """A database pool whose work runs, on the calling thread, only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def start(self) -> None:
        pass

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_next(self) -> None:
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def run_all(self) -> None:
        while self.jobs:
            self.run_next()

    def stop(self) -> Deferred[None]:
        self.run_all()
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


def test_a_sqlite_store_commits_submits_and_claims_ahead_of_a_backlogs_transactions(
    tmp_path: Path,
) -> None:
    from twisted.internet.task import Clock

    from relayer.store.base import Transaction
    from relayer.store.sqlite import SQLiteStore

    pool = _ScriptedPool()
    store = SQLiteStore.open_path(Clock(), tmp_path / "relayer.db", pool=pool)
    opened = _results([store.open()])
    pool.run_all()
    registered = _results([store.register_targets(["backlog", "idle"])])
    pool.run_all()
    assert opened == [None] and len(registered) == 1
    stored = _results([store.add_events([("backlog", [b'{"n":%d}' % i for i in range(6)])], 1.0)])
    pool.run_all()
    claimed = _results([store.claim("backlog", 2, 1 << 20, 2.0)])
    pool.run_all()
    (txn,) = claimed
    assert len(stored) == 1 and isinstance(txn, Transaction) and txn.n_events == 2

    # The database thread is busy; the backlog's next transaction waits behind it, then a
    # submit for the idle target comes.
    order: list[str] = []
    busy = store.confirm("backlog", txn.txn_id, 3.0)
    busy.addCallback(lambda _: order.append("busy"))
    store.complete("backlog", txn.txn_id, 2, 1 << 20, 3.0).addCallback(
        lambda _: order.append("complete")
    )

    def submitted(ids: list[str]) -> None:
        order.append("submit")
        # The idle target's first claim goes ahead of the backlog's transaction too.
        store.claim("idle", 2, 1 << 20, 3.0).addCallback(lambda _: order.append("claim"))

    store.add_events([("idle", [b'{"n":0}'])], 3.0).addCallback(submitted)
    pool.run_next()  # busy
    assert order == ["busy"]
    pool.run_next()  # the submit, alone
    assert order == ["busy", "submit"]
    pool.run_all()
    assert order == ["busy", "submit", "claim", "complete"]
    close = _results([store.close()])
    pool.run_all()
    assert close == [None]


def test_a_failing_group_with_priority_fails_alone_and_the_others_still_run() -> None:
    db = _Database()
    group = GroupCommit(db.run)
    group.run(_unit("busy"))
    passed = _results([group.run(_unit("b"))])
    results: list[Any] = []

    def then_two(value: Any) -> Any:
        # While x's result is reported: y, and a unit that fails, both with priority.
        results.append(value)
        group.first(_unit("y")).addBoth(results.append)
        group.first(_failing(StoreError("bad"))).addBoth(results.append)
        return value

    group.first(_unit("x")).addCallback(then_two)
    db.finish_next()  # busy
    db.finish_next()  # x, alone; b is passed over
    assert len(db.transactions) == 2  # y with the failing unit; b right behind them
    db.finish_next()  # rolled back: each is to be run again, alone
    while db.transactions:
        db.finish_next()
    assert passed == ["b"]
    assert results[:2] == ["x", "y"]
    assert isinstance(results[2], Failure) and results[2].check(StoreError)
    assert db.committed == ["busy", "x", "b", "y"]
    # Nothing is left waiting: the next unit runs at once.
    later = _results([group.run(_unit("c"))])
    db.finish_next()
    assert later == ["c"]
    assert _results([group.idle()]) == [None]
