"""
The throughput scenario on PostgreSQL: the same work as :func:`benchmarks.scenarios.throughput`
(the same targets, events, transactions and ``submit_many`` chunks, every submit durable before
it is acknowledged), delivered by one process on a :class:`relayer.PostgresStore`.

``python -m benchmarks --postgres URL`` runs it beside the SQLite throughput runs, and reports
``pg_throughput_events_per_s`` and ``pg_vs_sqlite`` (its ratio to the SQLite median of the same
run); ``--only pg_throughput`` runs it alone. Each run gets a schema of its own in that
database, dropped afterwards.

The result holds, besides the throughput scenario's own figures, the CPU time that the database
server's processes for the store's connections used (``server_cpu_us_per_event``), when they
run on this machine, since the client's CPU figures do not include them.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import sqlalchemy as sa

from benchmarks import postgres


def server_cpu() -> float | None:
    """
    The CPU seconds that PostgreSQL's processes on this machine have used so far: those
    running, and (through the postmaster's children times) those that have exited. None if no
    PostgreSQL process is visible (the server runs elsewhere).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    found = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name, _, rest = text.partition(" (")[2].rpartition(") ")
        if name != "postgres":
            continue
        fields = rest.split()
        # After the state: ppid is fields[1]; utime, stime, cutime, cstime are fields[11:15].
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        total += utime + stime
        if fields[1] == "1" or not _is_postgres(fields[1]):
            # The postmaster: its children's times hold those of the backends that exited.
            total += cutime + cstime
        found = True
    return total / tick if found else None


def _is_postgres(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "postgres"
    except OSError:
        return False


async def run(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Run the throughput scenario on a fresh schema of ``params["database"]``."""
    from benchmarks import scenarios
    from relayer import PostgresStore

    database = params["database"]
    schema = f"relayer_bench_{uuid.uuid4().hex[:10]}"
    admin = postgres._admin(database)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:

        def make_store(reactor: Any) -> PostgresStore:
            return PostgresStore.open_url(
                reactor, database, schema=schema, pool_size=params.get("pool_size", 4)
            )

        cpu0 = server_cpu()
        result = await scenarios.throughput(reactor, params, make_store)
        cpu1 = server_cpu()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    result["store"] = "postgresql"
    # PostgreSQL's share of the work: all of its processes' CPU during the run (those of other
    # clients included, if there are any), per event.
    result["server_cpu_us_per_event"] = (
        None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / result["events"] * 1e6
    )
    return result
