"""
One scheduler process of a scale-out test: several of these share one PostgreSQL database.

Run as ``python tests/scaleout/node.py --database URL --node-id a --targets 300 --receiver URL``
(add ``--submit N`` to make this node submit N events, spread over the targets). It prints
``ready`` once started, ``acked N`` as its submits are acknowledged, and runs until SIGTERM,
when it stops gracefully, or SIGKILL.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react

from relayer import BackoffPolicy, HTTPTransport, Scheduler, TargetConfig
from relayer.lease import LeaseSettings
from relayer.store.postgres import PostgresStore


def target_ids(n: int) -> list[str]:
    return [f"t{i:04d}" for i in range(n)]


async def run(reactor: Any, args: argparse.Namespace) -> None:
    store = PostgresStore.open_url(reactor, args.database, pool_size=4)
    transport = HTTPTransport(reactor)
    targets = [
        TargetConfig(
            t,
            f"{args.receiver}/{t}",
            "scale-out-token",
            request_timeout=args.request_timeout,
            backoff=BackoffPolicy(initial=0.1, maximum=1.0),
        )
        for t in target_ids(args.targets)
    ]
    scheduler = Scheduler(
        reactor,
        store,
        transport,
        targets,
        leases=LeaseSettings(
            node_id=args.node_id,
            timeout=args.lease_timeout,
            renew_interval=args.renew_interval or args.lease_timeout / 4,
        ),
    )
    await scheduler.start()
    stopped: Deferred[None] = Deferred()

    async def shutdown() -> None:
        await scheduler.stop()
        await transport.close()

    reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(shutdown()))
    print("ready", flush=True)
    if args.submit and args.submit_when:
        # Wait for the go-ahead: the test starts the traffic once the targets are shared out.
        while not os.path.exists(args.submit_when):
            await deferLater(reactor, 0.05, lambda: None)
    if args.submit:
        ids = target_ids(args.targets)
        seq = dict.fromkeys(ids, 0)
        acked = 0
        chunk: list[tuple[str, dict[str, Any]]] = []
        for n in range(args.submit):
            t = ids[n % len(ids)]
            chunk.append((t, {"target": t, "seq": seq[t]}))
            seq[t] += 1
            if len(chunk) == 5000 or n == args.submit - 1:
                await scheduler.submit_many(chunk)
                acked += len(chunk)
                chunk = []
                print(f"acked {acked}", flush=True)
    await stopped  # until the process is told to stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--targets", type=int, required=True)
    parser.add_argument("--receiver", required=True)
    parser.add_argument("--submit", type=int, default=0)
    parser.add_argument("--submit-when", help="submit once this file exists")
    parser.add_argument("--lease-timeout", type=float, default=4.0)
    parser.add_argument("--renew-interval", type=float, default=None)
    parser.add_argument("--request-timeout", type=float, default=1.0)
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    sys.exit(main())
