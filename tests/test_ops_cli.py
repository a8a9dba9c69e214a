"""
Tests of the operator commands (``relayer status``, ``wake``, ``replay``, ``discard``,
``dead-letters``, ``events``, ``event``) against a scheduler running in another process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from _live import LiveNodes, Receivers
from twisted.internet import reactor


@pytest.fixture
def nodes() -> Iterator[LiveNodes]:
    """The live nodes of a test, killed at teardown if they are still running."""
    started = LiveNodes(reactor)
    yield started
    started.kill_all()


@pytest_twisted.ensureDeferred
async def test_a_live_node_delivers_and_stops(db_path: Path | str, nodes: LiveNodes) -> None:
    receivers = Receivers.listen(reactor, ["a", "b"], order_key="n")
    try:
        node = await nodes.start(db_path, receivers)
        ids = await node.submit("a", 3)
        assert ids == ["a-0", "a-1", "a-2"]
        await receivers["a"].wait_for_events(3)
        assert receivers["a"].events == [{"target": "a", "n": k} for k in range(3)]
        assert await node.stop() == 0
    finally:
        await receivers.stop()
