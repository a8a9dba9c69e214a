"""
The child process of the crash tests: a real scheduler that may be killed with SIGKILL.

One *run* starts a :class:`relayer.Scheduler` on the global reactor, with a SQLite file on a
:class:`relayer.ThreadedDatabasePool` and the HTTP transport, submits events to its targets,
waits until the store has nothing pending, stops, and exits with 0. It is configured by one JSON
object (see :func:`run`); if that says so, it kills itself with ``SIGKILL``:

- ``{"point": NAME, "at": N}``: at the Nth pass of the checkpoint NAME (``"*"`` counts every
  checkpoint), through the hook of :mod:`relayer._faults`;
- ``{"after": SECONDS}``: after that many seconds on the reactor's clock.

Every event whose submit Deferred fired is appended to the ``acks`` file (``"{target} {n}"`` a
line) at once, with an unbuffered ``write``: a line in that file means the scheduler acknowledged
the event. The file survives the process's death: the page cache is the kernel's, and SIGKILL
does not drop it (only a power loss would, which these tests do not simulate).

Events are ``{"n": N, "t": TARGET, "p": PADDING}``; ``n`` goes from ``first`` to
``first + events - 1``, in submit order, for every target.

Two ways to start it:

- ``python crash_child.py CONFIG_JSON``: one run in this process.
- ``python crash_child.py --zygote``: a fork server. It imports everything once, then reads one
  config a line on standard input; for each it forks a child that does the run (with its standard
  output and error sent to the config's ``log`` file) and writes ``pid PID`` and, once the child
  is gone, ``exit PID STATUS`` (the raw wait status) on standard output. No reactor is made
  before the fork: each child makes its own. This spares each run the second or so of imports.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater

from relayer import _faults
from relayer.config import BackoffPolicy, TargetConfig
from relayer.scheduler import Scheduler
from relayer.store.sqlite import SQLiteStore
from relayer.transport.http import HTTPTransport

EXIT_OK = 0
EXIT_ERROR = 3


def install_kill(kill: dict[str, Any] | None) -> None:
    """Install the checkpoint hook that kills this process, as ``kill`` says."""
    if not kill or "point" not in kill:
        return
    point: str = kill["point"]
    at: int = kill["at"]
    lock = threading.Lock()
    passes = [0]

    def hook(name: str) -> None:
        if point != "*" and name != point:
            return
        with lock:
            passes[0] += 1
            n = passes[0]
        if n == at:
            os.kill(os.getpid(), signal.SIGKILL)

    _faults.install(hook)


def event(rng: random.Random, target: str, n: int) -> dict[str, Any]:
    return {"n": n, "t": target, "p": "x" * rng.randrange(0, 60)}


async def main(reactor: Any, config: dict[str, Any]) -> int:
    kill = config.get("kill") or {}
    if "after" in kill:
        reactor.callLater(kill["after"], os.kill, os.getpid(), signal.SIGKILL)
    install_kill(kill)
    rng = random.Random(config["seed"])
    backoff = BackoffPolicy(**config["backoff"])
    targets = [
        TargetConfig(
            t["id"],
            t["base_url"],
            t["token"],
            max_events=config["max_events"],
            backoff=backoff,
            request_timeout=10.0,
        )
        for t in config["targets"]
    ]
    acks = os.open(config["acks"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    store = SQLiteStore.open_path(reactor, config["db"])
    transport = HTTPTransport(reactor)
    scheduler = Scheduler(
        reactor, store, transport, targets, random=random.Random(rng.random()).random
    )

    def acked(_: object, lines: bytes) -> None:
        os.write(acks, lines)

    await scheduler.start()
    first, events, chunk = config["first"], config["events"], config["chunk"]
    ids = [t.target_id for t in targets]
    for start in range(first, first + events, chunk):
        numbers = range(start, min(start + chunk, first + events))
        pending: list[Deferred[Any]] = []
        if (start // chunk) % 2:
            pairs = [(t, event(rng, t, n)) for n in numbers for t in ids]
            lines = "".join(f"{t} {e['n']}\n" for t, e in pairs).encode()
            pending.append(scheduler.submit_many(pairs).addCallback(acked, lines))
        else:
            for n in numbers:
                for t in ids:
                    d = scheduler.submit(t, event(rng, t, n))
                    pending.append(d.addCallback(acked, f"{t} {n}\n".encode()))
        await DeferredList(pending, fireOnOneErrback=True, consumeErrors=True)

    while True:
        statuses = await scheduler.status()
        if all(
            s.pending_events == 0 and s.pending_transactions == 0 and not s.in_flight
            for s in statuses
        ):
            break
        await deferLater(reactor, 0.02, lambda: None)
    await scheduler.stop()
    await transport.close()
    os.close(acks)
    return EXIT_OK


def run(config: dict[str, Any]) -> int:
    """
    Do one run on the global reactor; return the exit status.

    ``config`` holds: ``db`` (the SQLite file), ``targets`` (``id``, ``base_url``, ``token``
    each), ``max_events``, ``backoff`` (:class:`relayer.BackoffPolicy` arguments), ``first``,
    ``events`` and ``chunk`` (the events to submit, per target, and how many per target are
    submitted at once), ``acks`` (the acknowledgement file), ``seed``, ``log`` (relayer's log)
    and ``kill`` (see the module's docstring; null for none).
    """
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
        textFileLogObserver(log), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    result: list[int] = []

    async def go() -> None:
        try:
            result.append(await main(reactor, config))
        except BaseException as e:  # noqa: BLE001 - reported, and the exit status says so
            print(f"crash child failed: {type(e).__name__}: {e}", file=log)
            import traceback

            traceback.print_exc(file=log)
            result.append(EXIT_ERROR)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(go()))
    reactor.run()
    log.flush()
    return result[0] if result else EXIT_ERROR


def redirect(config: dict[str, Any]) -> None:
    """Read standard input from nowhere, and write standard output and error to the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    out = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def zygote() -> int:
    """Serve runs: fork a child for each config line on standard input."""
    for line in sys.stdin:
        if not line.strip():
            continue
        config = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = EXIT_ERROR
            try:
                redirect(config)
                code = run(config)
            finally:
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        sys.exit(zygote())
    config = json.loads(sys.argv[1])
    redirect(config)
    sys.exit(run(config))
