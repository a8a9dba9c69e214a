"""
A process whose reactor stops while a scheduler still runs exits, and loses nothing acknowledged.

The database pool's threads are not daemon threads: without a shutdown trigger, a process whose
application stopped the reactor without stopping its scheduler would hang at exit, waiting for
them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from _support import reactor_
from twisted.internet.task import Clock

from relayer.dbpool import ThreadedDatabasePool
from relayer.testing import open_store

CHILD = textwrap.dedent(
    """
    import sys

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from relayer import BackoffPolicy, HTTPTransport, Scheduler, TargetConfig
    from relayer.dbpool import ThreadedDatabasePool
    from relayer.testing import open_store

    store = open_store(reactor, sys.argv[1], pool=ThreadedDatabasePool(reactor))
    # Nothing listens on port 9 of 127.0.0.1: every attempt is refused.
    target = TargetConfig(
        "t", "http://127.0.0.1:9/", "token", backoff=BackoffPolicy(initial=600, maximum=600)
    )
    scheduler = Scheduler(reactor, store, HTTPTransport(reactor), [target])


    async def main():
        try:
            await scheduler.start()
            await scheduler.submit_many([("t", {"n": n}) for n in range(3)])
            print("acknowledged", flush=True)
            # Work still in flight on the database thread when the reactor stops.
            scheduler.submit("t", {"n": 3}).addErrback(lambda f: None)
        finally:
            # The application stops the reactor; it never stops the scheduler.
            reactor.stop()


    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()
    print("exited", flush=True)
    """
)


def test_the_process_exits_when_the_reactor_stops_under_a_running_scheduler(
    tmp_path: Path, db_path: Path | str
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run(
        [sys.executable, str(script), str(db_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["acknowledged", "exited"]

    # The three acknowledged events are stored; the fourth may or may not be.
    store = open_store(Clock(), db_path)
    store.open()
    try:
        counts = store.queue_counts().result  # type: ignore[attr-defined]
        assert counts["t"].pending_events in (3, 4)
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_stopped_pool_cannot_be_started_again() -> None:
    pool = ThreadedDatabasePool(reactor_())
    pool.start()
    stopping = pool.stop()
    # Not even while the work queued before stop() is still draining.
    with pytest.raises(RuntimeError, match="cannot be started again"):
        pool.start()
    await stopping
    with pytest.raises(RuntimeError, match="cannot be started again"):
        pool.start()
