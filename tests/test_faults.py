"""
The fault-injection checkpoints: where the library passes them, on a fake clock.

The crash tests (``test_crash.py``) kill a process at these points; this checks, quickly and
deterministically, that each point is passed where and when its name says.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relayer import _faults
from relayer.store.base import TargetState
from relayer.testing import build_scheduler


@pytest.fixture
def passed() -> Iterator[list[str]]:
    """The names of the checkpoints passed while the test runs."""
    seen: list[str] = []
    _faults.install(seen.append)
    try:
        yield seen
    finally:
        _faults.install(None)


def test_installing_replaces_and_none_removes(db_path: Path) -> None:
    first: list[str] = []
    second: list[str] = []
    try:
        _faults.install(first.append)
        _faults.checkpoint("a")
        _faults.install(second.append)
        _faults.checkpoint("b")
        _faults.install(None)
        _faults.checkpoint("c")
        # Without a hook, the library passes its checkpoints and goes on as usual.
        h = build_scheduler(["a"], path=db_path)
        h.scheduler.submit("a", {"n": 1})
    finally:
        _faults.install(None)
    assert (first, second) == (["a"], ["b"])
    assert h.transport["a"].events == [{"n": 1}]


def test_a_failure_and_a_recovery_pass_every_point_in_order(
    passed: list[str], db_path: Path
) -> None:
    h = build_scheduler(["a"], path=db_path)
    h.transport["a"].respond(500)
    h.scheduler.submit("a", {"n": 1})
    statuses: list[Any] = []
    h.scheduler.status().addCallback(statuses.append)
    assert [s.state for s in statuses[0]] == [TargetState.DOWN]
    h.clock.advance(60)
    assert h.transport["a"].events == [{"n": 1}]
    assert passed == [
        "submit.stored",
        "txn.stored",
        "send.started",
        "backoff.write",
        # The retry: the same transaction, taken again from the store.
        "txn.stored",
        "send.started",
        "send.accepted",
        "up.transition",
    ]
    # Every point but the lease takeover's, which a process without leases never passes: the
    # crash suite's shared runs cover it.
    assert set(passed) == set(_faults.POINTS) - {"lease.acquired"}


def test_an_up_target_does_not_pass_the_up_transition(passed: list[str], db_path: Path) -> None:
    h = build_scheduler(["a"], path=db_path)
    h.scheduler.submit("a", {"n": 1})
    h.scheduler.submit("a", {"n": 2})
    assert h.transport["a"].events == [{"n": 1}, {"n": 2}]
    assert "up.transition" not in passed and "backoff.write" not in passed
    assert passed.count("submit.stored") == 2
    assert passed.count("send.accepted") == passed.count("txn.stored") >= 1
