"""
The fairness scenario: healthy targets' latency while a fifth of the targets fail and recover.

Many targets (10k; 2k in quick mode) get a steady offered load, spread evenly over them, one
event at a time. In the main run, the targets named ``f...`` (20% of them) fail and recover over
and over: the sink answers them HTTP 500, or closes the connection, for ``down_s`` seconds, then
accepts them for ``up_s`` seconds (see :mod:`benchmarks.sink`). Their events build up while
they fail, their retries and their backlogs come back when they recover. The baseline run is the
same with no target failing. Either way only the healthy targets' events (``h...``) are timed,
from submit to the sink's acceptance, as the latency scenario times them; the ratio of the two
runs' percentiles says how much the failing targets slow the healthy ones down.

Once the load ends, the failing stops, and every event of every target must be delivered, in
order, for the run to verify.

Besides the plan's parameters, a run takes ``max_sends_in_flight`` (a count, or ``"none"``; the
scheduler's default otherwise), ``hang_s`` (the failing targets' refusals come after that many
seconds, as from receivers that hang) and ``backoff`` (every target's initial and maximum retry
delay), to compare settings.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from benchmarks._harness import (
    CountingTransport,
    Sink,
    check_report,
    make_event,
    peak_rss_mb,
    targets,
)
from relayer import BackoffPolicy, HTTPTransport, Scheduler, SQLiteStore
from relayer.scheduler import DEFAULT_MAX_SENDS_IN_FLIGHT
from relayer.transport.http import DEFAULT_PERSISTENT_PER_HOST

#: Every target's backoff, by default (``backoff``: initial and maximum delay): short, so that
#: the failing targets retry often while they fail (a herd of retries), and catch up soon once
#: they recover.
BACKOFF = (0.5, 2.0)

#: How often the offered load is submitted, in seconds.
TICK = 0.01


def _percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 to 1) of ``values``, by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(q * len(ordered) + 0.5))))
    return ordered[rank - 1]


def _limit(params: dict[str, Any]) -> int | None:
    """The scheduler's ``max_sends_in_flight``: ``"none"`` for no bound, else a count."""
    value = params.get("max_sends_in_flight", DEFAULT_MAX_SENDS_IN_FLIGHT)
    return None if value in (None, "none") else int(value)


async def fair(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Healthy targets' end-to-end latency, with ``failing`` of the targets failing or none."""
    n_targets = params["targets"]
    n_failing = round(n_targets * params["failing"])
    # The same names in both runs: in the baseline the f targets are healthy, but not timed.
    n_flaky = round(n_targets * params.get("flaky_names", params["failing"]))
    flaky = [f"f{i}" for i in range(n_flaky)]
    healthy = [f"h{i}" for i in range(n_targets - n_flaky)]
    # Interleaved, so that every stretch of the load goes to both kinds alike.
    names = [
        name for pair in itertools.zip_longest(healthy, flaky) for name in pair if name is not None
    ]
    rate, seconds, warmup = params["rate"], params["seconds"], params["warmup"]
    limit = _limit(params)
    sink = Sink()
    initial, maximum = params.get("backoff", BACKOFF)
    backoff = BackoffPolicy(initial=initial, maximum=maximum)
    configs = targets(sink, names, params["batch"], backoff=backoff)
    folder = tempfile.TemporaryDirectory(prefix="relayer-bench-", dir=params.get("db_dir"))
    per_host = max(DEFAULT_PERSISTENT_PER_HOST, n_targets)
    http = HTTPTransport(reactor, max_persistent_per_host=per_host)
    counting = CountingTransport(http)
    store = SQLiteStore.open_path(
        reactor, Path(folder.name) / "relayer.db", synchronous=params["synchronous"]
    )
    scheduler = Scheduler(reactor, store, counting, configs, max_sends_in_flight=limit)
    seq = dict.fromkeys(names, 0)
    submits: list[Deferred[Any]] = []
    most_in_flight = most_waiting = most_first_waiting = 0
    cycle = itertools.cycle(names)
    try:
        await scheduler.start()
        if n_failing:
            down, up = params["down_s"], params["up_s"]
            hang = params.get("hang_s", 0)
            await sink.control(reactor, "POST", f"flaky?prefix=f&down={down}&up={up}&hang={hang}")
        cpu0, t0 = time.process_time(), time.monotonic()
        timed_from = t0 + warmup
        submitted = 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            due = int((now - t0) * rate) - submitted
            if due > 0:
                pairs = []
                for name in itertools.islice(cycle, due):
                    event = make_event(seq[name])
                    seq[name] += 1
                    if name[0] == "h" and now >= timed_from:
                        event["ts"] = time.monotonic()
                    pairs.append((name, event))
                submits.append(scheduler.submit_many(pairs))
                submitted += due
            sends = scheduler.sends
            most_in_flight = max(most_in_flight, sends.in_flight)
            most_waiting = max(most_waiting, sends.waiting)
            most_first_waiting = max(most_first_waiting, sends.waiting - sends.retries_waiting)
            await deferLater(reactor, TICK, lambda: None)
        load_s = time.monotonic() - t0
        cpu1 = time.process_time()
        for d in submits:
            await d
        if n_failing:
            await sink.control(reactor, "POST", "flaky?down=0")
        await counting.wait_for(submitted)
        drained_s = time.monotonic() - t0 - load_s
        await scheduler.stop()
        report = await sink.control(reactor, "GET", "report")
    finally:
        if scheduler.running:
            await scheduler.stop()
        await http.close()
        folder.cleanup()
        sink.stop()
    problems = check_report(report, {name: n for name, n in seq.items() if n})
    timed = report["latencies"]
    if not timed:
        problems.append("no healthy event was timed")
        timed = [float("nan")]
    ms = 1000.0
    return {
        "targets": n_targets,
        "failing_targets": n_failing,
        "max_sends_in_flight": limit,
        "offered_events_per_s": rate,
        "events": submitted,
        "load_s": load_s,
        "drain_s": drained_s,
        "healthy_timed": len(report["latencies"]),
        "healthy_p50_ms": _percentile(timed, 0.50) * ms,
        "healthy_p90_ms": _percentile(timed, 0.90) * ms,
        "healthy_p99_ms": _percentile(timed, 0.99) * ms,
        "healthy_max_ms": max(timed) * ms,
        "healthy_mean_ms": statistics.fmean(timed) * ms,
        "most_sends_in_flight": most_in_flight,
        "most_sends_waiting": most_waiting,
        # Of those, first attempts (sampled every tick, as the two above).
        "most_first_attempts_waiting": most_first_waiting,
        "failed_attempts": counting.failures,
        "sink_refused": report.get("flaky_refused", 0),
        "transactions": counting.transactions,
        "cpu_us_per_event": (cpu1 - cpu0) / max(1, submitted) * 1e6,
        "sink_cpu_s": report["cpu_s"],
        "peak_rss_mb": peak_rss_mb(),
        "problems": problems,
    }
