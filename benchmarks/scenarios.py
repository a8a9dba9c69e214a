"""
The scenarios and the baselines.

Each one runs in a fresh process of its own (see :mod:`benchmarks._run`), so that its memory
figures are its own, and starts its own sink process. Each returns a dict of results, holding
``problems``: what failed verification (empty if every delivery verified).

The relayer scenarios run a real :class:`relayer.Scheduler` on the global reactor, with a
:class:`relayer.SQLiteStore` on a file, the default :class:`relayer.HTTPTransport`, and targets
served by the sink on 127.0.0.1.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from benchmarks._harness import (
    CountingTransport,
    GCTimer,
    Sink,
    blocks,
    check_report,
    current_rss_mb,
    event_bytes,
    fanned_out,
    interleaved,
    interleaved_encoded,
    make_event,
    own_peak_rss_mb,
    peak_rss_mb,
    run_child,
    stored_bytes,
    targets,
    thread_cpu,
    written_bytes,
)
from benchmarks.fair import fair
from relayer import (
    BackoffPolicy,
    Backpressure,
    DeliveryState,
    HTTPTransport,
    IStore,
    Scheduler,
    SQLiteStore,
    TargetConfig,
    _encoding,
)
from relayer.event import GENERATED_ID_PREFIX
from relayer.scheduler import DEFAULT_MAX_WAITING_EVENTS
from relayer.store.base import EventBatch, TargetState, Transaction
from relayer.testing import InlineDatabasePool

# The same body producer as relayer's transport, so that the baseline writes bodies alike.
from relayer.transport.http import DEFAULT_PERSISTENT_PER_HOST, _BytesProducer

T = TypeVar("T")


def _percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 to 1) of ``values``, by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(q * len(ordered) + 0.5))))
    return ordered[rank - 1]


class _Relayer:
    """A scheduler on a fresh SQLite file, delivering through a counting HTTP transport."""

    def __init__(
        self,
        reactor: Any,
        configs: list[TargetConfig],
        params: dict[str, Any],
        make_store: Any = None,
    ) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="relayer-bench-", dir=params.get("db_dir"))
        self.path = Path(self.folder.name) / "relayer.db"
        # The sink plays every target on one host. A deployment whose targets share a host
        # keeps a connection for each of them (HTTPTransport's max_persistent_per_host), and so
        # does the benchmark; "max_persistent" overrides it.
        per_host = params.get("max_persistent") or max(DEFAULT_PERSISTENT_PER_HOST, len(configs))
        self.http = HTTPTransport(reactor, max_persistent_per_host=per_host)
        self.counting = CountingTransport(self.http)
        # Another store than SQLite's, if the scenario makes one (benchmarks/pg_throughput.py).
        store = (
            make_store(reactor)
            if make_store is not None
            else SQLiteStore.open_path(reactor, self.path, synchronous=params["synchronous"])
        )
        self.scheduler = Scheduler(reactor, store, self.counting, configs)
        self._stopped = False
        self._params = params

    async def start(self) -> None:
        await self.scheduler.start()
        if self._params.get("gc_freeze"):
            import gc

            gc.freeze()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.scheduler.running:
            await self.scheduler.stop()
        await self.http.close()
        self.folder.cleanup()


async def _produce(
    scheduler: Scheduler, pairs: Iterator[tuple[str, Any]], params: dict[str, Any]
) -> int:
    """
    Submit every pair, ``chunk`` at a time, with at most ``window`` submits waiting for their
    commit; return how many were submitted. With ``submit_mode`` ``single`` each event is its own
    ``submit`` call (a Deferred each); with ``many`` (the default) a chunk is one ``submit_many``.
    """
    chunk = params["chunk"]
    window = params["window"]
    single = params.get("submit_mode") == "single"
    # Each holds the events' ids, unused here.
    waiting: collections.deque[Deferred[Any]] = collections.deque()
    count = 0
    while True:
        batch = list(itertools.islice(pairs, chunk))
        if not batch:
            break
        if single:
            last: Deferred[str] | None = None
            for target_id, event in batch:
                last = scheduler.submit(target_id, event)
            assert last is not None
            waiting.append(last)
        else:
            waiting.append(scheduler.submit_many(batch))
        count += len(batch)
        if len(waiting) >= window:
            await waiting.popleft()
    while waiting:
        await waiting.popleft()
    return count


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# -- relayer scenarios -----------------------------------------------------------------------------


async def throughput(
    reactor: Any, params: dict[str, Any], make_store: Any = None
) -> dict[str, Any]:
    """
    Steady throughput: events to 10 targets, as fast as they are delivered; on a SQLite file,
    or on the store that ``make_store(reactor)`` makes.
    """
    n_targets = params["targets"]
    per_target = params["events"] // n_targets
    total = per_target * n_targets
    sink = Sink()
    names = _names("t", n_targets)
    relayer = _Relayer(reactor, targets(sink, names, params["batch"]), params, make_store)
    try:
        await relayer.start()
        gc_timer = GCTimer()
        threads0 = thread_cpu()
        written0 = written_bytes()
        cpu0, t0 = time.process_time(), time.monotonic()
        # With ``encoded``, the events are submitted as their JSON bytes, checked, not encoded.
        make = interleaved_encoded if params.get("encoded") else interleaved
        await _produce(relayer.scheduler, make(names, per_target), params)
        stored = time.monotonic()
        delivered_while_storing = relayer.counting.delivered
        await relayer.counting.wait_for(total)
        t1, cpu1 = time.monotonic(), time.process_time()
        threads1 = thread_cpu()
        written1 = written_bytes()
        await relayer.stop()
        report = await sink.control(reactor, "GET", "report")
    finally:
        await relayer.stop()
        sink.stop()
    written = None if written0 is None or written1 is None else written1 - written0
    return {
        "events": total,
        "targets": n_targets,
        # What the store wrote to disk (WAL, checkpoints), per event: SQLite's write volume.
        "disk_bytes_written_per_event": None if written is None else written / total,
        "seconds": t1 - t0,
        "events_per_s": total / (t1 - t0),
        "store_events_per_s": total / (stored - t0),
        # How delivery shares the process with submits: its rate until the last submit is
        # stored, and afterwards, when only the backlog is left.
        "delivered_while_storing": delivered_while_storing,
        "deliver_while_storing_events_per_s": delivered_while_storing / (stored - t0),
        "deliver_after_storing_events_per_s": (total - delivered_while_storing) / (t1 - stored),
        "cpu_us_per_event": (cpu1 - cpu0) / total * 1e6,
        "thread_cpu_us_per_event": {
            name: round((threads1[name] - threads0.get(name, 0.0)) / total * 1e6, 2)
            for name in threads1
            if threads1[name] > threads0.get(name, 0.0)
        },
        "gc_us_per_event": gc_timer.seconds / total * 1e6,
        "gc_collections": gc_timer.collections,
        "transactions": relayer.counting.transactions,
        "mean_batch": total / max(1, relayer.counting.transactions),
        "sink_cpu_s": report["cpu_s"],
        "peak_rss_mb": peak_rss_mb(),
        "problems": check_report(report, {n: per_target for n in names}),
    }


async def _produce_fanned_out(
    scheduler: Scheduler, items: Iterator[tuple[Sequence[str], Any]], params: dict[str, Any]
) -> list[str]:
    """
    Submit every ``(targets, event)`` item, ``chunk`` items to a ``submit_many`` call, with at
    most ``window`` calls waiting for their commit, and at most ``max_waiting`` events in them
    (the scheduler's ``max_waiting_events``: a call beyond it would be refused with
    :class:`relayer.Backpressure`). Return the event ids, in submit order.
    """
    chunk, window, max_waiting = params["chunk"], params["window"], params["max_waiting"]
    waiting: collections.deque[tuple[Deferred[list[str]], int]] = collections.deque()
    in_waiting = 0
    ids: list[str] = []
    waits = 0

    async def wait_oldest() -> None:
        nonlocal in_waiting
        d, n = waiting.popleft()
        in_waiting -= n
        ids.extend(await d)

    while True:
        batch = list(itertools.islice(items, chunk))
        if not batch:
            break
        # The scheduler counts the events waiting to be stored, one for each item.
        n = len(batch)
        while waiting and (len(waiting) >= window or in_waiting + n > max_waiting):
            await wait_oldest()
        while True:
            try:
                d = scheduler.submit_many(batch)
            except Backpressure:
                # The store lags behind: wait for the oldest call, then try again.
                if not waiting:
                    raise
                waits += 1
                await wait_oldest()
            else:
                break
        waiting.append((d, n))
        in_waiting += n
    while waiting:
        await wait_oldest()
    params["backpressure_waits"] = waits
    return ids


async def _wait_until_recorded(reactor: Any, scheduler: Scheduler) -> int:
    """Wait (10 s at most) until no target has events pending; return how many are left."""
    pending = -1
    for _ in range(100):
        pending = sum(st.pending_events for st in await scheduler.status(limit=10_000))
        if pending == 0:
            break
        await deferLater(reactor, 0.1, lambda: None)
    return pending


async def fanout(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """
    Fan-out: every event submitted for all the targets at once (one ``submit_many`` item with
    the list of targets), delivered to each of them through the same path as throughput's.
    Besides the delivery rate, it measures what the store keeps for each event: the bytes of
    relayer's tables after the run, less those before it.
    """
    n_targets = params["targets"]
    n_events = params["events"]
    total = n_events * n_targets
    sink = Sink()
    names = _names("t", n_targets)
    relayer = _Relayer(reactor, targets(sink, names, params["batch"]), params)
    produce = {**params, "max_waiting": params.get("max_waiting", DEFAULT_MAX_WAITING_EVENTS)}
    try:
        await relayer.start()
        before = stored_bytes(relayer.path, checkpoint=False)
        written0 = written_bytes()
        cpu0, t0 = time.process_time(), time.monotonic()
        ids = await _produce_fanned_out(relayer.scheduler, fanned_out(names, n_events), produce)
        stored = time.monotonic()
        await relayer.counting.wait_for(total)
        t1, cpu1 = time.monotonic(), time.process_time()
        written1 = written_bytes()
        pending = await _wait_until_recorded(reactor, relayer.scheduler)
        await relayer.scheduler.stop()
        after = stored_bytes(relayer.path)
        await relayer.stop()
        report = await sink.control(reactor, "GET", "report")
    finally:
        await relayer.stop()
        sink.stop()
    problems = check_report(report, {name: n_events for name in names})
    if pending:
        problems.append(f"{pending} events still pending once all were delivered")
    if len(ids) != n_events or len(set(ids)) != n_events:
        problems.append(f"{len(set(ids))} distinct event ids in {len(ids)}, for {n_events} events")
    written = None if written0 is None or written1 is None else written1 - written0
    file_growth = (after["database_bytes"] - before["database_bytes"]) / n_events
    tables = after["tables"]
    if tables is not None and before["tables"] is not None:
        stored_per_event = (after["table_bytes"] - before["table_bytes"]) / n_events
        method = "dbstat"
    else:
        stored_per_event, method = file_growth, "file"
    return {
        "events": n_events,
        "targets": n_targets,
        "deliveries": total,
        "seconds": t1 - t0,
        "deliveries_per_s": total / (t1 - t0),
        "events_per_s": n_events / (t1 - t0),
        "store_events_per_s": n_events / (stored - t0),
        "cpu_us_per_delivery": (cpu1 - cpu0) / total * 1e6,
        # What relayer's tables hold after the run, less what they held before it, per event
        # (from dbstat; without it, the growth of the checkpointed database file).
        "stored_bytes_per_event": stored_per_event,
        "stored_bytes_method": method,
        "stored_bytes_by_table": tables,
        # The database file's growth, free pages included: its high-water mark.
        "file_growth_bytes_per_event": file_growth,
        "disk_bytes_written_per_event": None if written is None else written / n_events,
        "backpressure_waits": produce["backpressure_waits"],
        "transactions": relayer.counting.transactions,
        "mean_batch": total / max(1, relayer.counting.transactions),
        "sink_cpu_s": report["cpu_s"],
        "peak_rss_mb": peak_rss_mb(),
        "problems": problems,
    }


async def latency(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Latency at light load: one event at a time, from submit until the sink accepts it."""
    sink = Sink()
    relayer = _Relayer(reactor, targets(sink, ["lat"], params["batch"]), params)
    warmup, n = params["warmup"], params["events"]
    acks: list[float] = []
    sends: list[float] = []
    responses: list[float] = []
    try:
        await relayer.start()
        for seq in range(warmup + n):
            event = make_event(seq)
            started = time.monotonic()
            if seq >= warmup:
                event["ts"] = started
            await relayer.scheduler.submit("lat", event)
            acked = time.monotonic()
            await relayer.counting.wait_for(seq + 1)
            answered = time.monotonic()
            if seq >= warmup:
                acks.append(acked - started)
                sends.append(relayer.counting.last_send_at - started)
                responses.append(answered - started)
            # A pause between events, so that each is alone in the system.
            await deferLater(reactor, params["gap"], lambda: None)
        await relayer.stop()
        report = await sink.control(reactor, "GET", "report")
    finally:
        await relayer.stop()
        sink.stop()
    accepted = report["latencies"]
    problems = check_report(report, {"lat": warmup + n})
    if len(accepted) != n:
        problems.append(f"the sink timed {len(accepted)} events, not {n}")
    ms = 1000.0
    return {
        "events": n,
        "p50_ms": _percentile(accepted, 0.50) * ms,
        "p90_ms": _percentile(accepted, 0.90) * ms,
        "p99_ms": _percentile(accepted, 0.99) * ms,
        "max_ms": max(accepted) * ms,
        "mean_ms": statistics.fmean(accepted) * ms,
        # Where the time goes: stored (the submit's Deferred fires), then the transport's send
        # starts (after the claim), then the sink accepts, then the answer is back.
        "ack_p50_ms": _percentile(acks, 0.50) * ms,
        "send_start_p50_ms": _percentile(sends, 0.50) * ms,
        "ack_p99_ms": _percentile(acks, 0.99) * ms,
        "response_p50_ms": _percentile(responses, 0.50) * ms,
        "response_p99_ms": _percentile(responses, 0.99) * ms,
        "problems": problems,
    }


#: The drain scenario's target retries only when woken: its first backoff is long enough that
#: no scheduled retry can come between bringing it up and waking it.
_WAKE_ONLY = BackoffPolicy(initial=600.0, maximum=600.0, jitter=0.0)


async def drain(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Recovery drain: a backlog builds up while the target is down; then it comes back."""
    n = params["events"]
    sink = Sink()
    config = TargetConfig(
        "drain",
        sink.url("drain", down=True),
        sink.token,
        max_events=params["batch"],
        backoff=_WAKE_ONLY,
    )
    relayer = _Relayer(reactor, [config], params)
    try:
        await relayer.start()
        t0 = time.monotonic()
        await _produce(relayer.scheduler, interleaved(["drain"], n), params)
        stored = time.monotonic()
        while True:
            (status,) = await relayer.scheduler.status()
            if status.state is TargetState.DOWN and not status.in_flight:
                break
            await deferLater(reactor, 0.05, lambda: None)
        backlog = status.pending_events
        await sink.control(reactor, "POST", "up")
        cpu0 = time.process_time()
        woken = time.monotonic()
        relayer.scheduler.wake("drain")
        await relayer.counting.wait_for(n)
        done, cpu1 = time.monotonic(), time.process_time()
        await relayer.stop()
        report = await sink.control(reactor, "GET", "report")
    finally:
        await relayer.stop()
        sink.stop()
    first_at, last_at = report["targets"].get("drain", [0, 0, 0, 0, None, None])[4:6]
    problems = check_report(report, {"drain": n})
    if backlog != n:
        problems.append(f"the backlog was {backlog} events before the wake, not {n}")
    first_ms = (first_at - woken) * 1000.0 if first_at is not None else float("nan")
    last = last_at if last_at is not None else done
    return {
        "events": n,
        "build_up_s": stored - t0,
        "build_up_events_per_s": n / (stored - t0),
        "drain_s": last - woken,
        "events_per_s": n / (last - woken),
        "first_delivery_ms": first_ms,
        "cpu_us_per_event": (cpu1 - cpu0) / n * 1e6,
        "transactions": relayer.counting.transactions,
        "peak_rss_mb": peak_rss_mb(),
        "problems": problems,
    }


async def memory(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """
    Memory: many targets, half of them down, a large backlog pending for the down half. Every
    target gets the same number of events, in bursts of at most one transaction, and the up and
    down targets take turns.
    """
    n_targets = params["targets"]
    per_target = 2 * params["pending"] // n_targets
    up = _names("u", n_targets // 2)
    down = _names("d", n_targets - len(up))
    names = [name for pair in itertools.zip_longest(up, down) for name in pair if name]
    sink = Sink()
    down_options = {}
    if params.get("down_backoff"):
        down_options["backoff"] = BackoffPolicy(initial=params["down_backoff"], maximum=600.0)
    configs = targets(sink, up, params["batch"]) + targets(
        sink, down, params["batch"], True, **down_options
    )
    relayer = _Relayer(reactor, configs, params)
    try:
        await relayer.start()
        started_rss = current_rss_mb()
        t0 = time.monotonic()
        burst = min(params["batch"], per_target)
        await _produce(relayer.scheduler, blocks(names, per_target, burst), params)
        stored = time.monotonic()
        await relayer.counting.wait_for(per_target * len(up))
        delivered = time.monotonic()
        # Measured before anything below (reports, status) allocates for the check itself.
        peak = peak_rss_mb()
        now_rss = current_rss_mb()
        # The last deliveries may not be recorded yet: wait (a little) until they are.
        for _ in range(100):
            statuses = await relayer.scheduler.status()
            if sum(st.pending_events for st in statuses if st.target_id.startswith("u")) == 0:
                break
            await deferLater(reactor, 0.1, lambda: None)
        db_mb = os.path.getsize(relayer.path) / 1e6
        await relayer.stop()
        report = await sink.control(reactor, "GET", "report")
    finally:
        await relayer.stop()
        sink.stop()
    problems = check_report(report, {name: per_target for name in up})
    pending = 0
    for s in statuses:
        pending += s.pending_events
        want = per_target if s.target_id.startswith("d") else 0
        if s.pending_events != want:
            problems.append(f"{s.target_id}: {s.pending_events} events pending, expected {want}")
            if len(problems) > 50:
                break
    return {
        "targets": n_targets,
        "down_targets": len(down),
        "events": per_target * n_targets,
        "pending_events": pending,
        "peak_rss_mb": peak,
        "rss_after_start_mb": started_rss,
        "rss_at_end_mb": now_rss,
        "store_s": stored - t0,
        "deliver_s": delivered - t0,
        "db_mb": db_mb,
        "problems": problems,
    }


async def scale(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """
    Per-event cost with a given number of targets sharing the traffic. Each target's events
    come in bursts of one full transaction (``batch`` events), so that every target count sends
    the same transactions and only the number of targets differs.
    """
    n_targets = params["targets"]
    batch = params["batch"]
    per_target = params["events"] // n_targets // batch * batch
    total = per_target * n_targets
    names = _names("t", n_targets)
    sink = Sink()
    relayer = _Relayer(reactor, targets(sink, names, batch), params)
    try:
        await relayer.start()
        cpu0, t0 = time.process_time(), time.monotonic()
        await _produce(relayer.scheduler, blocks(names, per_target, batch), params)
        await relayer.counting.wait_for(total)
        t1, cpu1 = time.monotonic(), time.process_time()
        await relayer.stop()
        report = await sink.control(reactor, "GET", "report")
    finally:
        await relayer.stop()
        sink.stop()
    return {
        "targets": n_targets,
        "events": total,
        "cpu_us_per_event": (cpu1 - cpu0) / total * 1e6,
        "wall_us_per_event": (t1 - t0) / total * 1e6,
        "events_per_s": total / (t1 - t0),
        "transactions": relayer.counting.transactions,
        "mean_batch": total / max(1, relayer.counting.transactions),
        "problems": check_report(report, {n: per_target for n in names}),
    }


# -- listing a target's events ---------------------------------------------------------------------

#: The listing scenario's targets: the one whose events are all delivered, and the one whose
#: events are all dead-lettered.
LISTED_TARGET = "listed"
DEAD_TARGET = "dead"

#: Events per ``add_events`` call while the listing scenario fills its database.
_FILL_CHUNK = 100_000


def _fired(d: Deferred[T]) -> T:
    """The result of a Deferred that has fired already: the store's work runs inline."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("the store's work did not complete inline")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def _seq_of(event_id: str) -> int | None:
    """The sequence number in an id that relayer generated, or None if it is not one."""
    if not event_id.startswith(GENERATED_ID_PREFIX):
        return None
    try:
        return int(event_id[len(GENERATED_ID_PREFIX) :])
    except ValueError:
        return None


def _fill(
    store: IStore, target_id: str, n: int, per_txn: int, now: float, dead: bool
) -> dict[str, Any]:
    """
    Store ``n`` events for ``target_id``, then claim them ``per_txn`` at a time, as the
    scheduler does, and record each transaction delivered, or dead-lettered if ``dead``.

    Returns:
        ``first_seq`` and ``last_seq``, the sequence numbers of the first and the last event
        (in between, every one is the target's), and ``transactions``.
    """
    body = _encoding.encode_event(make_event(0), 1 << 20)
    ids: list[str] = []
    for start in range(0, n, _FILL_CHUNK):
        stop = min(start + _FILL_CHUNK, n)
        runs = [
            (target_id, [body] * (min(s + per_txn, stop) - s)) for s in range(start, stop, per_txn)
        ]
        added = _fired(store.add_events(EventBatch.of_runs(runs), now))
        ids.extend((added[0], added[-1]))
    max_bytes = 4 * per_txn * len(body)
    claim = _fired(store.claim(target_id, per_txn, max_bytes, now))
    events = transactions = 0
    while isinstance(claim, Transaction):
        events += len(claim.events)
        transactions += 1
        if dead:
            claim = _fired(
                store.dead_letter(target_id, claim.txn_id, "HTTP 400", per_txn, max_bytes, now)
            )
        else:
            claim = _fired(store.complete(target_id, claim.txn_id, per_txn, max_bytes, now))
    if events != n or claim is not None:
        raise RuntimeError(f"{target_id}: {events} of {n} events claimed, then {claim!r}")
    first, last = _seq_of(ids[0]), _seq_of(ids[-1])
    if first is None or last is None or last - first + 1 != n:
        raise RuntimeError(f"{target_id}: the events' ids run from {ids[0]} to {ids[-1]}")
    return {"first_seq": first, "last_seq": last, "transactions": transactions}


def listing(params: dict[str, Any]) -> dict[str, Any]:
    """
    Listing: a database holding ``events`` delivered events of one target (and as many
    dead-lettered events of another, with ``dead_letters``), filled through the store's own
    API; then, in a fresh process for each, every one of them listed page by page, by a
    running scheduler (see :func:`list_events`). The peak RSS of each listing's process is
    the listing's own: if a listing read every row at once, it would grow with the events.
    """
    # The store hands its inline pool's results to no reactor; it takes one all the same.
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    n, per_txn = params["events"], params["batch"]
    folder = tempfile.TemporaryDirectory(prefix="relayer-bench-", dir=params.get("db_dir"))
    try:
        path = Path(folder.name) / "relayer.db"
        t0 = time.monotonic()
        # NORMAL: the filling is not measured, and the file is read afterwards, not recovered.
        store = SQLiteStore.open_path(
            reactor, path, pool=InlineDatabasePool(), synchronous="NORMAL"
        )
        _fired(store.open())
        _fired(store.register_targets([LISTED_TARGET, DEAD_TARGET]))
        now = time.time()
        filled = {LISTED_TARGET: _fill(store, LISTED_TARGET, n, per_txn, now, dead=False)}
        if params.get("dead_letters"):
            filled[DEAD_TARGET] = _fill(store, DEAD_TARGET, n, per_txn, now, dead=True)
        _fired(store.close())
        fill_s = time.monotonic() - t0
        database_bytes = stored_bytes(path)["database_bytes"]
        child = {
            "path": str(path),
            "targets": [LISTED_TARGET, DEAD_TARGET],
            "events": n,
            "limit": params["limit"],
            "log": params.get("log"),
        }
        timeout = params.get("child_timeout", 600)
        runs = {"list": run_child("list_events", {**child, **filled[LISTED_TARGET]}, timeout)}
        if DEAD_TARGET in filled:
            dead = {**child, **filled[DEAD_TARGET], "dead_letters": True}
            runs["dead"] = run_child(
                "list_events", {**dead, "limit": params["dead_limit"]}, timeout
            )
    finally:
        folder.cleanup()
    result: dict[str, Any] = {
        "events": n,
        "batch": per_txn,
        "transactions": filled[LISTED_TARGET]["transactions"],
        "fill_s": fill_s,
        "database_mb": database_bytes / 1e6,
        "problems": [],
    }
    for prefix, run in runs.items():
        result["problems"].extend(f"{prefix}: {p}" for p in run.pop("problems"))
        result.update({f"{prefix}_{key}": value for key, value in run.items()})
    return result


class _ListingCheck:
    """
    What a listing saw: every event, counted, must follow the one before it, from
    ``first_seq`` on; the RSS is sampled every ``every`` pages.
    """

    def __init__(self, first_seq: int, every: int) -> None:
        self.last_seq = first_seq - 1
        self.last_txn = 0
        self.count = 0
        self.pages = 0
        self.every = every
        self.samples: list[float] = []
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)

    def event(self, event_id: str, txn_id: int | None) -> None:
        seq = _seq_of(event_id)
        if seq is None or seq != self.last_seq + 1:
            self.problem(f"event {event_id} after seq {self.last_seq}")
        if seq is not None:
            self.last_seq = seq
        if txn_id is None or txn_id < self.last_txn:
            self.problem(f"event {event_id} in transaction {txn_id}, after {self.last_txn}")
        else:
            self.last_txn = txn_id
        self.count += 1

    def page(self) -> None:
        self.pages += 1
        if self.pages % self.every == 0:
            self.samples.append(round(current_rss_mb(), 1))


async def _list_delivered(
    scheduler: Scheduler, target_id: str, limit: int, check: _ListingCheck
) -> None:
    """Every delivered event of the target, ``limit`` a page, until ``next`` is None."""
    cursor: str | None = None
    while True:
        page = await scheduler.target_events(
            target_id, DeliveryState.DELIVERED, after=cursor, limit=limit
        )
        for entry in page.entries:
            check.event(entry.event_id, entry.txn_id)
        check.page()
        if page.next is None:
            return
        cursor = page.next


async def _list_dead(scheduler: Scheduler, target_id: str, limit: int, check: _ListingCheck) -> int:
    """Every dead letter of the target, ``limit`` a page, until a page is short; how many."""
    after: int | None = None
    letters = 0
    while True:
        found = await scheduler.dead_letters(target_id, limit, after=after)
        for letter in found:
            if letter.txn_id <= check.last_txn:
                check.problem(f"dead letter {letter.txn_id} after {check.last_txn}")
            if len(letter.event_ids) != letter.n_events:
                check.problem(
                    f"dead letter {letter.txn_id}: {letter.n_events} events, "
                    f"{len(letter.event_ids)} ids"
                )
            for event_id in letter.event_ids:
                check.event(event_id, letter.txn_id)
            letters += 1
        check.page()
        if len(found) < limit:
            return letters
        after = found[-1].txn_id


async def list_events(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """
    The listing scenario's child: a scheduler on the database at ``path``, listing every
    delivered event of the first target with ``target_events``, ``limit`` a page, until the
    page's ``next`` is None; or, with ``dead_letters``, every dead letter of the second target
    with ``dead_letters``, ``limit`` a page, until a page is short. Every event is counted,
    and each must follow the one before it: ``events`` of them, ``first_seq`` to ``last_seq``.

    Its baseline RSS is measured once the scheduler has started, before the first page; its
    peak RSS is its own high-water mark (see :func:`benchmarks._harness.own_peak_rss_mb`).
    """
    dead = bool(params.get("dead_letters"))
    target_id = params["targets"][1 if dead else 0]
    limit = params["limit"]
    # No event is pending, so nothing is sent; the closed port would refuse it.
    http = HTTPTransport(reactor)
    counting = CountingTransport(http)
    configs = [TargetConfig(t, f"http://127.0.0.1:9/{t}", "unused") for t in params["targets"]]
    scheduler = Scheduler(
        reactor, SQLiteStore.open_path(reactor, params["path"]), counting, configs
    )
    # The RSS every tenth of the way: flat if the listing streams.
    listed = params["transactions"] if dead else params["events"]
    check = _ListingCheck(params["first_seq"], max(1, -(-listed // limit) // 10))
    letters = None
    await scheduler.start()
    try:
        baseline_rss = current_rss_mb()
        peak_before = own_peak_rss_mb()
        t0, cpu0 = time.monotonic(), time.process_time()
        if dead:
            letters = await _list_dead(scheduler, target_id, limit, check)
        else:
            await _list_delivered(scheduler, target_id, limit, check)
        t1, cpu1 = time.monotonic(), time.process_time()
        peak = own_peak_rss_mb()
        ru_maxrss = peak_rss_mb()
    finally:
        await scheduler.stop()
        await http.close()
    if check.count != params["events"]:
        check.problem(f"{check.count} events listed, not {params['events']}")
    if check.last_seq != params["last_seq"]:
        check.problem(f"the last event listed is seq {check.last_seq}, not {params['last_seq']}")
    if counting.transactions or counting.failures:
        check.problem(f"{counting.transactions + counting.failures} transactions were sent")
    result = {
        "events": check.count,
        "pages": check.pages,
        "seconds": t1 - t0,
        "events_per_s": check.count / (t1 - t0),
        "cpu_us_per_event": (cpu1 - cpu0) / max(1, check.count) * 1e6,
        "baseline_rss_mb": baseline_rss,
        "peak_rss_before_mb": peak_before,
        "peak_rss_mb": peak,
        "rss_growth_mb": peak - baseline_rss,
        # Not the listing's own: at least the peak of the process that started this one.
        "ru_maxrss_mb": ru_maxrss,
        "rss_samples_mb": check.samples,
        "problems": check.problems,
    }
    if letters is not None:
        result["letters"] = letters
    return result


# -- baselines -------------------------------------------------------------------------------------


async def send_only(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """
    The transport's ceiling: treq PUTs the same transactions to the same sink, one in flight
    per target, with bodies encoded beforehand; no store and no relayer.
    """
    n_targets = params["targets"]
    batch = params["batch"]
    per_target = params["events"] // n_targets // batch * batch
    total = per_target * n_targets
    names = _names("t", n_targets)
    bodies = {
        name: [
            b'{"events":['
            + b",\n".join(
                json.dumps(make_event(s), separators=(",", ":")).encode()
                for s in range(start, start + batch)
            )
            + b"]}"
            for start in range(0, per_target, batch)
        ]
        for name in names
    }
    sink = Sink()
    pool = HTTPConnectionPool(reactor, persistent=True)
    # The same connection reuse as relayer's transport gets (see _Relayer).
    pool.maxPersistentPerHost = max(DEFAULT_PERSISTENT_PER_HOST, n_targets)
    client = HTTPClient(Agent(reactor, pool=pool))
    headers = Headers(
        {
            b"Authorization": [b"Bearer " + sink.token.encode()],
            b"Content-Type": [b"application/json"],
        }
    )

    async def one_target(name: str) -> None:
        url = sink.url(name)
        for txn_id, body in enumerate(bodies[name], start=1):
            response = await client.request(
                "PUT",
                f"{url}/_matrix/app/v1/transactions/{txn_id}",
                headers=headers,
                data=_BytesProducer(body),
                unbuffered=True,
            )
            await treq.content(response)
            if response.code != 200:
                raise RuntimeError(f"the sink answered {response.code}")

    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        loops = [Deferred.fromCoroutine(one_target(name)) for name in names]
        for d in loops:
            await d
        t1, cpu1 = time.monotonic(), time.process_time()
        await pool.closeCachedConnections()
        report = await sink.control(reactor, "GET", "report")
    finally:
        sink.stop()
    return {
        "events": total,
        "targets": n_targets,
        "batch": batch,
        "seconds": t1 - t0,
        "events_per_s": total / (t1 - t0),
        "requests_per_s": total / batch / (t1 - t0),
        "cpu_us_per_event": (cpu1 - cpu0) / total * 1e6,
        "sink_cpu_s": report["cpu_s"],
        "problems": check_report(report, {n: per_target for n in names}),
    }


def sqlite_insert(params: dict[str, Any]) -> dict[str, Any]:
    """
    SQLite's ceiling from Python: rows of one event each, inserted ``batch`` rows to a
    transaction with ``executemany``, on a WAL file with the same ``synchronous`` setting; and
    how many single-row transactions commit per second.
    """
    folder = tempfile.TemporaryDirectory(prefix="relayer-bench-", dir=params.get("db_dir"))
    try:
        conn = sqlite3.connect(os.path.join(folder.name, "raw.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {params['synchronous']}")
        conn.execute(
            "CREATE TABLE queue (id INTEGER PRIMARY KEY, target_id TEXT NOT NULL, "
            "oldest_at REAL NOT NULL, events BLOB NOT NULL)"
        )
        conn.execute("CREATE INDEX queue_order ON queue (target_id, id)")
        payload = json.dumps(make_event(123456), separators=(",", ":")).encode()
        n, batch = params["events"], params["batch"]
        rows = [(f"t{i % 10}", 1.0, payload) for i in range(batch)]
        t0 = time.monotonic()
        for _ in range(n // batch):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO queue (target_id, oldest_at, events) VALUES (?, ?, ?)", rows
            )
            conn.execute("COMMIT")
        t1 = time.monotonic()
        inserted = n // batch * batch
        commits = params["commits"]
        c0 = time.monotonic()
        for i in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE queue SET oldest_at = ? WHERE id = ?", (float(i), i + 1))
            conn.execute("COMMIT")
        c1 = time.monotonic()
        conn.close()
    finally:
        folder.cleanup()
    return {
        "rows": inserted,
        "rows_per_batch": batch,
        "row_bytes": len(payload),
        "rows_per_s": inserted / (t1 - t0),
        "commits_per_s": commits / (c1 - c0),
        "problems": [],
    }


async def loaded(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Latency under load: see :mod:`benchmarks.loaded`."""
    from benchmarks.loaded import loaded as run

    return await run(reactor, params)


async def pg_throughput(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The throughput scenario on PostgreSQL: see :mod:`benchmarks.pg_throughput`."""
    from benchmarks import pg_throughput as pg

    return await pg.run(reactor, params)


RELAYER_SCENARIOS = {
    "throughput": throughput,
    "pg_throughput": pg_throughput,
    "latency": latency,
    "loaded": loaded,
    "drain": drain,
    "memory": memory,
    "scale": scale,
    "fanout": fanout,
    "send_only": send_only,
    "list_events": list_events,
    "fair": fair,
}

#: The scenarios that run without a reactor, by name.
PLAIN_SCENARIOS = {
    "sqlite_insert": sqlite_insert,
    "listing": listing,
}

__all__ = ["PLAIN_SCENARIOS", "RELAYER_SCENARIOS", "event_bytes", "listing", "sqlite_insert"]
