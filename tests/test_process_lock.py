"""
The process lock: a scheduler without leases is alone on its database; schedulers with leases
share it with each other only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from relayer import DatabaseInUse, LeaseSettings, Scheduler, StoreError
from relayer.testing import FakeTransport, build_scheduler, open_store, target


def start(path: Path | str, leases: LeaseSettings | None = None) -> tuple[Scheduler, Any]:
    """Start a scheduler on the database; return it and what its start() gave."""
    clock = Clock()
    store = open_store(clock, path)
    scheduler = Scheduler(clock, store, FakeTransport(clock), [target("t")], leases=leases)
    results: list[Any] = []
    scheduler.start().addBoth(results.append)
    assert results, "start() did not finish"
    return scheduler, results[0]


def refused(result: Any) -> DatabaseInUse:
    assert result is not None, "the second scheduler was not refused"
    assert result.check(DatabaseInUse), result
    error = result.value
    assert isinstance(error, StoreError)
    assert "leases=LeaseSettings()" in str(error)
    return error  # type: ignore[no-any-return]


def test_a_second_scheduler_without_leases_is_refused(db_path: Path | str) -> None:
    first, result = start(db_path)
    assert result is None and first.running
    second, result = start(db_path)
    refused(result)
    assert not second.running
    # The first goes on: a submit is stored.
    assert first.submit("t", {"n": 1}).called
    assert first.stop().called


def test_after_the_first_stops_a_new_one_starts(db_path: Path | str) -> None:
    first, _ = start(db_path)
    assert first.stop().called
    second, result = start(db_path)
    assert result is None and second.running
    assert second.stop().called


def test_a_refused_start_leaves_no_lock_behind(db_path: Path | str) -> None:
    first, _ = start(db_path)
    _, result = start(db_path)
    refused(result)
    assert first.stop().called
    third, result = start(db_path)
    assert result is None and third.running
    assert third.stop().called


def test_a_crash_restart_in_one_process_releases_the_lock(db_path: Path | str) -> None:
    h = build_scheduler(["t"], path=db_path)
    assert h.scheduler.submit("t", {"n": 1}).called
    h2 = h.restart(stop=False)
    assert h2.scheduler.running
    assert h2.transport["t"].events[-1] == {"n": 1}


@pytest.mark.postgres_only
def test_schedulers_with_leases_share_the_database(db_path: str) -> None:
    a, result_a = start(db_path, LeaseSettings(node_id="a"))
    b, result_b = start(db_path, LeaseSettings(node_id="b"))
    assert result_a is None and result_b is None
    assert a.running and b.running
    # But one without leases is refused beside them.
    _, result = start(db_path)
    refused(result)
    assert a.stop().called and b.stop().called


@pytest.mark.postgres_only
def test_a_scheduler_with_leases_is_refused_beside_one_without(db_path: str) -> None:
    first, _ = start(db_path)
    _, result = start(db_path, LeaseSettings(node_id="b"))
    error = refused(result)
    assert "without leases" in str(error)
    assert first.stop().called


@pytest.mark.sqlite_only
def test_the_sqlite_lock_file_is_beside_the_database(db_path: Path) -> None:
    first, _ = start(db_path)
    assert (db_path.parent / (db_path.name + "-relayer.lock")).exists()
    assert first.stop().called
