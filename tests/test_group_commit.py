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
