"""
What the scenarios share: the sink process, a counting transport, events, and checks.

This is benchmark code, not library code: it may use the global reactor.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from relayer import _encoding
from relayer.config import TargetConfig
from relayer.transport.base import ITransport, OutcomeKind, SendOutcome

#: The content shared by every benchmark event.
CONTENT = {
    "msgtype": "m.text",
    "body": "A benchmark message, about as long as a short chat line is.",
}


_TEMPLATE: dict[str, Any] = {
    "s": 0,
    "type": "m.room.message",
    "room_id": "!benchmark:example.org",
    "sender": "@bench:example.org",
    "event_id": "$4Rf0cBmKkR7dUYwLp3xZqS9a",
    "origin_server_ts": 1700000000000,
    "content": CONTENT,
}


def make_event(seq: int) -> dict[str, Any]:
    """A Matrix-like event of about 250 bytes as compact JSON, numbered ``seq``."""
    event = _TEMPLATE.copy()
    event["s"] = seq
    return event


def event_bytes() -> int:
    """The encoded size of a typical benchmark event."""
    return len(_encoding.encode_event(make_event(123456), 1 << 20))


def interleaved(names: Sequence[str], per_target: int, start: int = 0) -> Iterator[tuple[str, Any]]:
    """``(target, event)`` pairs, round-robin over the targets, each target's in seq order."""
    for seq in range(start, start + per_target):
        for name in names:
            yield name, make_event(seq)


def encoded_event(seq: int) -> bytes:
    """The JSON bytes of ``make_event(seq)``, as an application holding them would have them."""
    return _ENCODED_HEAD + str(seq).encode() + _ENCODED_TAIL


# The encoded template, cut where the sequence number goes: "s" is its first member.
_ENCODED_HEAD = b'{"s":'
_ENCODED_TAIL = _encoding.encode_event(make_event(0), 1 << 20)[len(_ENCODED_HEAD) + 1 :]


def interleaved_encoded(
    names: Sequence[str], per_target: int, start: int = 0
) -> Iterator[tuple[str, bytes]]:
    """As :func:`interleaved`, with each event as its JSON bytes (``encoded_event``)."""
    for seq in range(start, start + per_target):
        for name in names:
            yield name, encoded_event(seq)


def blocks(names: Sequence[str], per_target: int, block: int) -> Iterator[tuple[str, Any]]:
    """
    ``(target, event)`` pairs, ``block`` events of one target at a time, round-robin over the
    targets: every target's traffic comes in bursts of one full transaction.
    """
    for start in range(0, per_target, block):
        stop = min(start + block, per_target)
        for name in names:
            for seq in range(start, stop):
                yield name, make_event(seq)


def fanned_out(names: Sequence[str], n_events: int) -> Iterator[tuple[Sequence[str], Any]]:
    """``(targets, event)`` items: each event, in seq order, for every one of ``names`` at once."""
    for seq in range(n_events):
        yield names, make_event(seq)


class Sink:
    """The sink process (``python -m benchmarks.sink``), started and stopped from here."""

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(16)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.sink", f"--token={self.token}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("READY "):
            self._process.kill()
            raise RuntimeError(f"the sink did not start: {line!r}")
        ready = json.loads(line[len("READY ") :])
        self.port: int = ready["port"]
        self.flap_port: int = ready["flap_port"]
        self.pid = self._process.pid

    def url(self, name: str, down: bool = False) -> str:
        """The base URL of target ``name``: on the port that is up, or on the one that is down."""
        return f"http://127.0.0.1:{self.flap_port if down else self.port}/t/{name}"

    async def control(self, reactor: Any, method: str, what: str) -> Any:
        """Call a control endpoint (``report``, ``up``, ``down``); return its JSON answer."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        response = await client.request(method, f"http://127.0.0.1:{self.port}/_control/{what}")
        data = await treq.content(response)
        if response.code != 200:
            raise RuntimeError(f"the sink answered {response.code} to {method} {what}")
        return json.loads(data)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def targets(
    sink: Sink, names: Sequence[str], max_events: int, down: bool = False, **options: Any
) -> list[TargetConfig]:
    """Target configurations for ``names``, served by the sink (on its closed port if down)."""
    return [
        TargetConfig(name, sink.url(name, down), sink.token, max_events=max_events, **options)
        for name in names
    ]


@implementer(ITransport)
class CountingTransport:
    """
    Wraps the real transport and counts the events delivered, so that a scenario knows when it
    is done without asking the sink. It adds a ``bytes.count`` per delivered transaction.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.delivered = 0
        self.transactions = 0
        self.failures = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.last_send_at = 0.0
        self._waiters: list[tuple[int, Deferred[None]]] = []
        # A transaction sent again (its answer was lost) is counted once.
        self._last_txn: dict[str, int] = {}

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        self.last_send_at = time.monotonic()
        d: Deferred[SendOutcome] = self._inner.send(target, txn_id, body)

        def seen(outcome: SendOutcome) -> SendOutcome:
            if outcome.kind is OutcomeKind.DELIVERED:
                if self._last_txn.get(target.target_id, 0) >= txn_id:
                    return outcome
                self._last_txn[target.target_id] = txn_id
                self.transactions += 1
                self.delivered += body.count(b"\n") + 1  # events are joined by b",\\n"
                self.last_at = time.monotonic()
                if self.first_at is None:
                    self.first_at = self.last_at
                if self._waiters:
                    self._wake()
            else:
                self.failures += 1
            return outcome

        def failed(f: Any) -> Any:
            self.failures += 1
            return f

        return d.addCallbacks(seen, failed)

    def wait_for(self, count: int) -> Deferred[None]:
        """A Deferred that fires once ``count`` events have been delivered."""
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        self._wake()
        return d

    def _wake(self) -> None:
        ready = [w for w in self._waiters if self.delivered >= w[0]]
        if ready:
            self._waiters = [w for w in self._waiters if self.delivered < w[0]]
            for _, d in ready:
                d.callback(None)


def check_report(report: dict[str, Any], expected: dict[str, int]) -> list[str]:
    """
    What is wrong in the sink's report, given how many events each target should have had
    (targets not in ``expected`` must have received nothing). Empty if all is well.
    """
    problems = [f"sink: {v}" for v in report["violations"]]
    if report["n_violations"] > len(report["violations"]):
        problems.append(f"... {report['n_violations']} violations in all")
    got = report["targets"]
    for name, n in expected.items():
        count, next_seq = got.get(name, [0, 0])[:2]
        if count != n or next_seq != n:
            problems.append(f"{name}: received {count} events up to s={next_seq - 1}, expected {n}")
    for name in got.keys() - expected.keys():
        problems.append(f"{name}: received {got[name][0]} events, expected none")
    return problems[:50]


def thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by each of this process's Python threads, by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    result: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime and stime are fields 14 and 15 of stat; 12 and 13 after the ")".
        result[thread.name] = (int(fields[11]) + int(fields[12])) / tick
    return result


class GCTimer:
    """Measures the time spent in Python's cyclic garbage collector, from now on."""

    def __init__(self) -> None:
        import gc

        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1


def written_bytes() -> int | None:
    """Bytes this process has caused to be written to storage so far, or None if unknown."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def stored_bytes(path: str | os.PathLike[str], checkpoint: bool = True) -> dict[str, Any]:
    """
    What a SQLite database holds: the bytes of relayer's tables, and the size of the database.

    The tables are those named ``relayer_*``, each with its indexes; their bytes are the pages
    their b-trees take, from SQLite's ``dbstat`` table (None if this SQLite was built without
    it). The database's size is its page count times its page size: what the file holds once
    its WAL is checkpointed into it.

    Args:
        path: The database file.
        checkpoint: Whether to run ``PRAGMA wal_checkpoint(TRUNCATE)`` first; only once no other
            connection writes to the file.

    Returns:
        ``tables`` (bytes by table, or None without ``dbstat``), ``table_bytes`` (their sum, or
        None), ``database_bytes``, and ``file_bytes``: the file and its WAL on disk, now.
    """
    conn = sqlite3.connect(os.fspath(path), isolation_level=None)
    try:
        if checkpoint:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
        owner = dict(
            conn.execute(
                "SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"
            )
        )
        try:
            pages = conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
        except sqlite3.OperationalError:  # no such table: dbstat
            tables: dict[str, int] | None = None
        else:
            tables = {}
            for name, size in pages:
                table = owner.get(name, name)
                if table.startswith("relayer_"):
                    tables[table] = tables.get(table, 0) + size
    finally:
        conn.close()
    on_disk = 0
    for suffix in ("", "-wal"):
        try:
            on_disk += os.path.getsize(os.fspath(path) + suffix)
        except OSError:
            pass
    return {
        "tables": tables,
        "table_bytes": None if tables is None else sum(tables.values()),
        "database_bytes": page_size * page_count,
        "file_bytes": on_disk,
    }


def run_child(name: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """
    Run scenario ``name`` in a fresh process (``python -m benchmarks._run``) and return its
    result; RuntimeError, with the end of its output, if it crashed or timed out.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks._run", name, json.dumps(params)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name} timed out after {timeout:g}s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{name} exited with status {done.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def own_peak_rss_mb() -> float:
    """
    This process's own peak resident set size, in MiB: ``VmHWM``, the high-water mark of its
    memory since it was started (``ru_maxrss`` if the kernel does not say).

    ``ru_maxrss`` is not a process's own after an ``exec``: Linux keeps in it the peak of the
    process it was forked from, so that a scenario's child started by a process of 300 MB
    reports 300 MB at least, whatever it uses itself.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_mb()


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / (1024 * 1024), 1)
    except (OSError, ValueError, IndexError):
        pass
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "twisted": version("twisted"),
        "treq": version("treq"),
        "sqlalchemy": version("sqlalchemy"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
