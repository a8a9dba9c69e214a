"""
The child process of the soak test: one scheduler delivering to many targets over HTTP.

It runs a real :class:`relayer.Scheduler` on the global reactor, with a SQLite file on the
threaded database pool and the HTTP transport, for ``targets`` targets served by one HTTP server
(``{base_url}/{target_id}``). It submits ``events`` events to each target, in ``chunks`` group
submits that interleave the targets, waits until the store has nothing pending, stops, and exits
with 0. Event ``n`` of target ``t`` is ``{"n": n, "t": t}``.

It samples its resident set size (RSS, from ``/proc/self/status``) and prints each sample as a
line ``rss LABEL KIB SUBMITTED PENDING``: after start, after each chunk is stored, every half a
second of the run (``tN``), and at the end. A final line ``done ...`` gives totals.

Usage: ``python soak_child.py CONFIG_JSON``, with ``db``, ``base_url``, ``token``, ``targets``,
``events``, ``chunks``, ``backoff`` (:class:`relayer.BackoffPolicy` arguments), ``seed``, ``log``
(relayer's log file) and ``max_persistent`` (the HTTP connection pool's cached connections per
host).
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from relayer.config import BackoffPolicy, TargetConfig
from relayer.scheduler import Scheduler
from relayer.store.base import TargetState
from relayer.store.sqlite import SQLiteStore
from relayer.transport.http import HTTPTransport


def rss_kib() -> int:
    """This process's resident set size, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(reactor: Any, config: dict[str, Any]) -> int:
    backoff = BackoffPolicy(**config["backoff"])
    ids = [f"t{i:04d}" for i in range(config["targets"])]
    targets = [
        TargetConfig(t, f"{config['base_url']}/{t}", config["token"], backoff=backoff) for t in ids
    ]
    # Every target is behind the same loopback host and port here, where each would have its
    # own host in production: let the pool keep a connection per target, as it would then.
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = config["max_persistent"]
    transport = HTTPTransport(reactor, client=HTTPClient(Agent(reactor, pool=pool)))
    store = SQLiteStore.open_path(reactor, config["db"], synchronous="NORMAL")
    scheduler = Scheduler(
        reactor, store, transport, targets, random=random.Random(config["seed"] + 1).random
    )
    submitted = 0
    pending = 0
    woken = 0
    rng = random.Random(config["seed"])

    def sample(label: str) -> None:
        say(f"rss {label} {rss_kib()} {submitted} {pending}")

    await scheduler.start()
    sample("start")
    ticks = [0]

    def tick() -> None:
        ticks[0] += 1
        sample(f"t{ticks[0]}")

    sampler = LoopingCall(tick)
    sampler.clock = reactor
    sampler.start(0.5, now=False)
    per_chunk = config["events"] // config["chunks"]
    for c in range(config["chunks"]):
        first = c * per_chunk
        last = config["events"] if c == config["chunks"] - 1 else first + per_chunk
        await scheduler.submit_many(
            [(t, {"n": n, "t": t}) for n in range(first, last) for t in ids]
        )
        submitted += (last - first) * len(ids)
        sample(f"chunk{c}")
        # Wake some targets whatever their state: DOWN ones retry at once, one with a send in
        # flight retries at once if that send fails, and UP ones look for work.
        for t in rng.sample(ids, len(ids) // 10):
            scheduler.wake(t)
            woken += 1

    polls = 0
    while True:
        statuses = await scheduler.status()
        pending = sum(s.pending_events for s in statuses)
        if pending == 0 and not any(s.in_flight for s in statuses):
            break
        if polls == 0:
            # Everything is submitted: give the targets that are DOWN a retry now rather than
            # after their backoff, as an operator who knows they are back would.
            for s in statuses:
                if s.state is TargetState.DOWN:
                    scheduler.wake(s.target_id)
                    woken += 1
        polls += 1
        await deferLater(reactor, 0.1, lambda: None)
    sampler.stop()
    await scheduler.stop()
    await pool.closeCachedConnections()
    sample("end")
    say(f"done submitted={submitted} woken={woken}")
    return 0


def run(config: dict[str, Any]) -> int:
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    log = open(config["log"], "a", buffering=1)  # noqa: SIM115 - open for the process's life
    observer = FilteringLogObserver(
        textFileLogObserver(log), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    result: list[int] = []

    async def go() -> None:
        try:
            result.append(await main(reactor, config))
        except BaseException as e:  # noqa: BLE001 - reported, and the exit status says so
            import traceback

            print(f"soak child failed: {type(e).__name__}: {e}", file=log)
            traceback.print_exc(file=log)
            result.append(3)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(go()))
    reactor.run()
    return result[0] if result else 3


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
