"""
Scale-out on PostgreSQL: the same work delivered by 1, 2 and 4 relayer processes.

``python -m benchmarks.postgres --database postgresql://postgres@127.0.0.1:5432/test`` runs it
on its own; ``python -m benchmarks --postgres URL`` adds it to the other scenarios.

Each run gets a fresh schema in that database (dropped afterwards), a sink process, and N node
processes (``python -m benchmarks.postgres node PARAMS``), each a :class:`relayer.Scheduler` on a
:class:`relayer.PostgresStore` with :class:`relayer.LeaseSettings`, sharing the targets through
leases. Once the targets are shared out, node 0 submits every event (each node delivers its own
targets' events, woken by ``NOTIFY``); the run ends when the sink has verified every event, in
order, once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from benchmarks._harness import Sink, check_report, interleaved


def _schema_url(database: str, schema: str) -> str:
    url = sa.make_url(database)
    query = dict(url.query)
    query["options"] = f"-csearch_path={schema}"
    return url.set(query=query).render_as_string(hide_password=False)


def _admin(database: str) -> sa.Engine:
    return sa.create_engine(
        sa.make_url(database).set(drivername="postgresql+psycopg"),
        poolclass=sa.pool.NullPool,
        isolation_level="AUTOCOMMIT",
    )


def _report(sink: Sink) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/_control/report") as answer:
        result: dict[str, Any] = json.loads(answer.read())
    return result


def _owners(url: str) -> list[str | None]:
    engine = _admin(url)
    try:
        with engine.connect() as conn:
            now = time.time()
            rows = conn.execute(sa.text("SELECT owner, expires_at FROM relayer_leases")).all()
        return [owner if expires > now else None for owner, expires in rows]
    finally:
        engine.dispose()


def run(database: str, processes: int, events: int, n_targets: int, batch: int) -> dict[str, Any]:
    """One run: ``events`` events to ``n_targets`` targets, delivered by ``processes`` nodes."""
    schema = f"relayer_bench_{uuid.uuid4().hex[:10]}"
    admin = _admin(database)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = _schema_url(database, schema)
    sink = Sink()
    nodes: list[subprocess.Popen[str]] = []
    folder = tempfile.TemporaryDirectory(prefix="relayer-bench-pg-")
    go = Path(folder.name) / "go"
    per_target = events // n_targets
    total = per_target * n_targets
    names = [f"t{i}" for i in range(n_targets)]
    try:
        for i in range(processes):
            params = {
                "database": url,
                "node_id": f"node{i}",
                "targets": names,
                "sink_port": sink.port,
                "token": sink.token,
                "batch": batch,
                "submit": per_target if i == 0 else 0,
                "go": str(go),
            }
            node = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.postgres", "node", json.dumps(params)],
                stdout=subprocess.PIPE,
                text=True,
            )
            nodes.append(node)
        for node in nodes:
            assert node.stdout is not None
            line = node.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"a node did not start: {line!r}")
        # Wait for the targets to be shared out before the traffic starts.
        deadline = time.monotonic() + 60
        share = n_targets // processes
        while True:
            owners = _owners(url)
            counts = [owners.count(f"node{i}") for i in range(processes)]
            if all(c >= share for c in counts):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the targets were not shared out: {counts}")
            time.sleep(0.1)
        t0 = time.monotonic()
        go.touch()
        deadline = t0 + max(120.0, total / 500)
        while True:
            report = _report(sink)
            received = sum(v[0] for v in report["targets"].values())
            if received >= total or report["n_violations"]:
                break
            if time.monotonic() > deadline or any(n.poll() is not None for n in nodes):
                break
            time.sleep(0.05)
        t1 = time.monotonic()
        report = _report(sink)
        problems = check_report(report, dict.fromkeys(names, per_target))
        crashed = [i for i, n in enumerate(nodes) if n.poll() is not None]
        if crashed:
            problems.append(f"nodes {crashed} exited during the run")
    finally:
        for node in nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        sink.stop()
        folder.cleanup()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return {
        "processes": processes,
        "events": total,
        "targets": n_targets,
        "seconds": t1 - t0,
        "events_per_s": total / (t1 - t0),
        "problems": problems,
    }


def node(params: dict[str, Any]) -> None:
    """A node process: deliver the targets this process holds leases on; node 0 submits."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import deferLater

    from relayer import HTTPTransport, LeaseSettings, PostgresStore, Scheduler, TargetConfig

    async def main() -> None:
        store = PostgresStore.open_url(reactor, params["database"], pool_size=4)
        transport = HTTPTransport(reactor)
        configs = [
            TargetConfig(
                name,
                f"http://127.0.0.1:{params['sink_port']}/t/{name}",
                params["token"],
                max_events=params["batch"],
                request_timeout=5.0,
            )
            for name in params["targets"]
        ]
        scheduler = Scheduler(
            reactor,
            store,
            transport,
            configs,
            leases=LeaseSettings(node_id=params["node_id"], timeout=20.0, renew_interval=2.0),
        )
        await scheduler.start()

        async def shutdown() -> None:
            await scheduler.stop()
            await transport.close()

        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: Deferred.fromCoroutine(shutdown())
        )
        print("READY", flush=True)
        if params["submit"]:
            while not os.path.exists(params["go"]):
                await deferLater(reactor, 0.01, lambda: None)
            pending: list[Deferred[list[str]]] = []
            chunk: list[tuple[str, Any]] = []
            for pair in interleaved(params["targets"], params["submit"]):
                chunk.append(pair)
                if len(chunk) == 2000:
                    pending.append(scheduler.submit_many(chunk))
                    chunk = []
                    if len(pending) >= 4:
                        await pending.pop(0)
            if chunk:
                pending.append(scheduler.submit_many(chunk))
            for d in pending:
                await d

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "node":
        node(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postgres")
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    results = [run(args.database, n, args.events, args.targets, args.batch) for n in args.processes]
    for r in results:
        status = "verified" if not r["problems"] else f"FAILED: {r['problems'][:3]}"
        print(
            f"postgres x{r['processes']}: {r['events']} events to {r['targets']} targets in "
            f"{r['seconds']:.2f}s, {r['events_per_s']:,.0f} events/s, {status}"
        )
    return 0 if all(not r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
