"""
A scheduler in a process of its own, for tests of what acts on a live system from outside it.

Run as::

    python tests/live_node.py --database URL --receiver BASE_URL --targets a,b,c
        [--sweep-interval 0.5] [--leases NODE_ID] [--backoff-initial 0.2] [--backoff-maximum 2]
        [--admin-port 0 --admin-token TOKEN [--admin-metrics]]

``URL`` is a SQLite file path, a ``sqlite:///`` URL or a ``postgresql://`` URL. Each target
``T`` is a Matrix application-service target at ``{BASE_URL}/{T}`` with the token
:data:`TOKEN`. The process runs a :class:`relayer.Scheduler` with an HTTP transport on the real
reactor, and talks JSON lines:

- once started, it prints ``{"ready": true, "pid": ..., "targets": [...]}``, with
  ``"admin_port"`` when it serves :class:`relayer.admin.AdminResource` (``--admin-port``, 0 for
  any free port) at ``http://127.0.0.1:{admin_port}/admin/``, with the metrics of a
  :class:`relayer.metrics.PrometheusMetrics` at ``/admin/metrics`` with ``--admin-metrics``;
- ``submit TARGET[,TARGET...] N`` on stdin submits N events, ``{"target": ..., "n": k}``
  numbered from 0 up for each target list, with the ids ``{TARGET}-{k}`` (the target list
  joined by ``+``), and prints ``{"submitted": [ids]}`` once they are stored;
- ``wake TARGET`` calls :meth:`relayer.Scheduler.wake` and prints ``{"woken": TARGET}``;
- ``ping`` prints ``{"pong": true}``;
- a line it cannot do prints ``{"error": "..."}``.

It stops gracefully on SIGTERM or at the end of stdin, printing ``{"stopped": true}`` after the
scheduler has stopped, and exits 0. Its log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.internet.stdio import StandardIO
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from relayer import BackoffPolicy, HTTPTransport, Scheduler, TargetConfig
from relayer.dbcli import is_postgres, sqlite_path
from relayer.lease import LeaseSettings
from relayer.store.sql import SQLStore

#: The token of every target.
TOKEN = "live-token"


#: Where :func:`emit` writes: the standard output's transport, once there is one.
_out: list[Any] = []


def emit(document: dict[str, Any]) -> None:
    """Print one JSON line on stdout."""
    line = (json.dumps(document) + "\n").encode("utf-8")
    if _out:
        _out[0].write(line)
    else:
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


def open_store(reactor: Any, database: str) -> SQLStore:
    """A store on ``database``, as a scheduler of the application would open it."""
    if is_postgres(database):
        from relayer.store.postgres import PostgresStore

        return PostgresStore.open_url(reactor, database, pool_size=2)
    from relayer.store.sqlite import SQLiteStore

    return SQLiteStore.open_path(reactor, sqlite_path(database))


class Commands(LineReceiver):
    """The commands read from stdin."""

    delimiter = b"\n"

    def __init__(self, scheduler: Scheduler, done: Deferred[None]) -> None:
        self.scheduler = scheduler
        self.done = done
        self.counts: dict[str, int] = {}

    def lineReceived(self, line: bytes) -> None:
        words = line.decode("utf-8").split()
        if not words:
            return
        d = Deferred.fromCoroutine(self.run(words))
        d.addErrback(lambda f: emit({"error": f"{' '.join(words)}: {f.getErrorMessage()}"}))

    async def run(self, words: list[str]) -> None:
        match words:
            case ["submit", targets, n]:
                to = targets.split(",")
                name = "+".join(to)
                first = self.counts.get(name, 0)
                self.counts[name] = first + int(n)
                ids = [f"{name}-{k}" for k in range(first, first + int(n))]
                stored = [
                    self.scheduler.submit(to, {"target": name, "n": k}, event_id=event_id)
                    for k, event_id in zip(range(first, first + int(n)), ids, strict=True)
                ]
                for d in stored:
                    await d
                emit({"submitted": ids})
            case ["wake", target_id]:
                self.scheduler.wake(target_id)
                emit({"woken": target_id})
            case ["ping"]:
                emit({"pong": True})
            case _:
                emit({"error": f"unknown command: {' '.join(words)}"})

    def connectionLost(self, reason: Failure | None = None) -> None:
        # The end of stdin: stop.
        if not self.done.called:
            self.done.callback(None)


async def run(reactor: Any, args: argparse.Namespace) -> None:
    store = open_store(reactor, args.database)
    transport = HTTPTransport(reactor)
    backoff = BackoffPolicy(initial=args.backoff_initial, maximum=args.backoff_maximum)
    targets = [
        TargetConfig(
            t,
            f"{args.receiver}/{t}",
            TOKEN,
            request_timeout=args.request_timeout,
            backoff=backoff,
        )
        for t in args.targets.split(",")
    ]
    leases = None
    if args.leases:
        leases = LeaseSettings(node_id=args.leases, timeout=args.lease_timeout)
    metrics: Any = None
    if args.admin_metrics:
        from relayer.metrics import PrometheusMetrics

        metrics = PrometheusMetrics(reactor, refresh_interval=0.5)
    scheduler = Scheduler(
        reactor,
        store,
        transport,
        targets,
        leases=leases,
        sweep_interval=args.sweep_interval,
        observers=[metrics] if metrics is not None else [],
    )
    await scheduler.start()
    if metrics is not None:
        metrics.watch(scheduler)
    done: Deferred[None] = Deferred()
    stopping: list[Deferred[None]] = []

    async def shutdown() -> None:
        if metrics is not None:
            await metrics.stop()
        await scheduler.stop()
        await transport.close()
        emit({"stopped": True})

    def stop() -> Deferred[None]:
        if not stopping:
            stopping.append(Deferred.fromCoroutine(shutdown()))
        return stopping[0]

    # SIGTERM stops the reactor, which stops the scheduler before it shuts down.
    core: IReactorCore = reactor
    core.addSystemEventTrigger("before", "shutdown", stop)
    _out.append(StandardIO(Commands(scheduler, done), reactor=reactor))
    ready: dict[str, Any] = {
        "ready": True,
        "pid": os.getpid(),
        "targets": [c.target_id for c in targets],
    }
    if args.admin_port is not None:
        from relayer.admin import AdminResource

        root = Resource()
        root.putChild(b"admin", AdminResource(scheduler, args.admin_token, metrics=metrics))
        site = Site(root)
        site.noisy = False
        port = reactor.listenTCP(args.admin_port, site, interface="127.0.0.1")
        ready["admin_port"] = port.getHost().port
    emit(ready)
    await done
    await stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", required=True)
    parser.add_argument("--receiver", required=True, help="the targets' base URL, less /TARGET")
    parser.add_argument("--targets", required=True, help="target ids, separated by commas")
    parser.add_argument("--sweep-interval", type=float, default=0.5)
    parser.add_argument("--leases", metavar="NODE_ID", help="share targets by leases, as NODE_ID")
    parser.add_argument("--lease-timeout", type=float, default=10.0)
    parser.add_argument("--backoff-initial", type=float, default=0.2)
    parser.add_argument("--backoff-maximum", type=float, default=2.0)
    parser.add_argument("--request-timeout", type=float, default=5.0)
    parser.add_argument("--admin-port", type=int, help="serve the admin API on this port")
    parser.add_argument("--admin-token", default="", help="the admin API's token")
    parser.add_argument(
        "--admin-metrics", action="store_true", help="serve Prometheus metrics at /admin/metrics"
    )
    args = parser.parse_args()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
