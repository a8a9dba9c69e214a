"""
Latency under load: single events to an idle target while another target drains a backlog.

A backlog of ``events`` builds up for one target while it is down (as in the drain scenario);
then the target comes back and is woken, and while it drains, single events are submitted to a
second, idle target, one at a time with a short pause between them (``gap``). Each one's latency
is measured from submit to the sink's acceptance, as the latency scenario measures it (the sink,
in another process, compares its clock with the reading the event carries), with the steps in
between: the submit's Deferred fires (stored), the transport's send starts, the answer is back.
Each target has a sink process of its own, as two targets would be two servers.

Probing stops once ``probes`` events are measured, or once ``stop_at`` of the backlog is
delivered, whichever comes first, so that the drain is in progress during the whole
measurement; the result says how much of the backlog was delivered before the first probe and
how much was left after the last one, and the drain's rate meanwhile.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface import implementer

from benchmarks._harness import (
    CountingTransport,
    Sink,
    check_report,
    interleaved,
    make_event,
    peak_rss_mb,
)
from benchmarks.scenarios import _WAKE_ONLY, _percentile, _produce, _Relayer
from relayer import HTTPTransport, Scheduler, SQLiteStore, TargetConfig
from relayer.store.base import TargetState
from relayer.transport.base import ITransport, OutcomeKind, SendOutcome
from relayer.transport.http import DEFAULT_PERSISTENT_PER_HOST

#: The target that drains the backlog, and the idle one that the probes go to.
BACKLOG = "backlog"
PROBE = "probe"

#: The fewest probes (or ``probes``, if fewer are asked for) that must be measured while the
#: backlog drains: fewer is a failed run, since their 99th percentile would mean little.
MIN_PROBES = 100

#: The share of the backlog delivered at which probing stops, unless ``stop_at`` says.
STOP_AT = 0.9


@implementer(ITransport)
class _ProbeWatch:
    """
    Wraps the scenario's counting transport: notes when a send to the probe target starts and
    when its answer is back, and counts the events delivered to each target.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.delivered: dict[str, int] = {BACKLOG: 0, PROBE: 0}
        self.last_probe_send = 0.0
        self._probe_waiter: tuple[int, Deferred[float]] | None = None

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        name = target.target_id
        if name == PROBE:
            self.last_probe_send = time.monotonic()
        d: Deferred[SendOutcome] = self._inner.send(target, txn_id, body)

        def seen(outcome: SendOutcome) -> SendOutcome:
            if outcome.kind is OutcomeKind.DELIVERED:
                self.delivered[name] = self.delivered.get(name, 0) + body.count(b"\n") + 1
                waiter = self._probe_waiter
                if name == PROBE and waiter is not None and self.delivered[PROBE] >= waiter[0]:
                    self._probe_waiter = None
                    waiter[1].callback(time.monotonic())
            return outcome

        return d.addCallback(seen)

    def probe_delivered(self, count: int) -> Deferred[float]:
        """Fires with the time the answer came back once ``count`` probes are delivered."""
        d: Deferred[float] = Deferred()
        if self.delivered[PROBE] >= count:
            d.callback(time.monotonic())
        else:
            self._probe_waiter = (count, d)
        return d


class _WatchedRelayer(_Relayer):
    """The scenarios' relayer, sending through a :class:`_ProbeWatch` around its transport."""

    def __init__(self, reactor: Any, configs: list[TargetConfig], params: dict[str, Any]) -> None:
        # What _Relayer.__init__ does, with the watch between the counting and the HTTP
        # transports.
        self.folder = tempfile.TemporaryDirectory(prefix="relayer-bench-", dir=params.get("db_dir"))
        self.path = Path(self.folder.name) / "relayer.db"
        per_host = params.get("max_persistent") or max(DEFAULT_PERSISTENT_PER_HOST, len(configs))
        self.http = HTTPTransport(reactor, max_persistent_per_host=per_host)
        self.watch = _ProbeWatch(self.http)
        self.counting = CountingTransport(self.watch)
        store = SQLiteStore.open_path(reactor, self.path, synchronous=params["synchronous"])
        self.scheduler = Scheduler(reactor, store, self.counting, configs)
        self._stopped = False
        self._params = params


async def loaded(reactor: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Latency of single events to an idle target while another drains a backlog."""
    n = params["events"]
    warmup, probes, gap = params["warmup"], params["probes"], params["gap"]
    stop_at = params.get("stop_at", STOP_AT)
    # Each target has a sink process of its own, as two targets would be two servers: the
    # probes must not wait in the sink behind the decoding of the backlog's transactions.
    sink = Sink()
    probe_sink = Sink()
    configs = [
        TargetConfig(
            BACKLOG,
            sink.url(BACKLOG, down=True),
            sink.token,
            max_events=params["batch"],
            backoff=_WAKE_ONLY,
        ),
        TargetConfig(PROBE, probe_sink.url(PROBE), probe_sink.token, max_events=params["batch"]),
    ]
    relayer = _WatchedRelayer(reactor, configs, params)
    watch = relayer.watch
    acks: list[float] = []
    sends: list[float] = []
    responses: list[float] = []
    try:
        await relayer.start()
        t0 = time.monotonic()
        await _produce(relayer.scheduler, interleaved([BACKLOG], n), params)
        stored = time.monotonic()
        while True:
            status = {s.target_id: s for s in await relayer.scheduler.status()}[BACKLOG]
            if status.state is TargetState.DOWN and not status.in_flight:
                break
            await deferLater(reactor, 0.05, lambda: None)
        backlog = status.pending_events
        await sink.control(reactor, "POST", "up")
        cpu0 = time.process_time()
        woken = time.monotonic()
        relayer.scheduler.wake(BACKLOG)
        seq = 0
        first_at = last_at = woken
        before_first = after_last = 0
        while seq < warmup + probes and watch.delivered[BACKLOG] < stop_at * n:
            event = make_event(seq)
            measured = seq >= warmup
            started = time.monotonic()
            if measured:
                event["ts"] = started
                if seq == warmup:
                    first_at, before_first = started, watch.delivered[BACKLOG]
            await relayer.scheduler.submit(PROBE, event)
            acked = time.monotonic()
            answered = await watch.probe_delivered(seq + 1)
            seq += 1
            if measured:
                acks.append(acked - started)
                sends.append(watch.last_probe_send - started)
                responses.append(answered - started)
                last_at, after_last = answered, watch.delivered[BACKLOG]
            await deferLater(reactor, gap, lambda: None)
        await relayer.counting.wait_for(n + seq)
        done, cpu1 = time.monotonic(), time.process_time()
        await relayer.stop()
        report = await sink.control(reactor, "GET", "report")
        probe_report = await probe_sink.control(reactor, "GET", "report")
    finally:
        await relayer.stop()
        sink.stop()
        probe_sink.stop()
    accepted = probe_report["latencies"]
    measured_n = len(acks)
    problems = check_report(report, {BACKLOG: n}) + check_report(probe_report, {PROBE: seq})
    if backlog != n:
        problems.append(f"the backlog was {backlog} events before the wake, not {n}")
    if measured_n < min(probes, MIN_PROBES):
        problems.append(f"only {measured_n} probes were measured while the backlog drained")
    if len(accepted) != measured_n:
        problems.append(f"the sink timed {len(accepted)} probes, not {measured_n}")
    left_after = n - after_last
    if measured_n and (before_first == 0 or left_after == 0):
        problems.append(
            f"the drain was not in progress during the whole measurement: {before_first} "
            f"backlog events delivered before the first probe, {left_after} left after the last"
        )
    ms = 1000.0
    if not accepted:
        accepted = [float("nan")]
    measuring_s = last_at - first_at
    return {
        "events": n,
        "probes": measured_n,
        "build_up_s": stored - t0,
        "p50_ms": _percentile(accepted, 0.50) * ms,
        "p90_ms": _percentile(accepted, 0.90) * ms,
        "p99_ms": _percentile(accepted, 0.99) * ms,
        "max_ms": max(accepted) * ms,
        # The steps, as in the latency scenario: stored (the submit's Deferred fires), the
        # transport's send starts, the answer is back.
        "ack_p50_ms": _percentile(acks, 0.50) * ms if acks else None,
        "ack_p99_ms": _percentile(acks, 0.99) * ms if acks else None,
        "send_start_p50_ms": _percentile(sends, 0.50) * ms if sends else None,
        "send_start_p99_ms": _percentile(sends, 0.99) * ms if sends else None,
        "response_p50_ms": _percentile(responses, 0.50) * ms if responses else None,
        "response_p99_ms": _percentile(responses, 0.99) * ms if responses else None,
        # The drain during the measurement: how far it was at the first probe, how much was
        # left after the last, and its rate in between.
        "backlog_delivered_before_first_probe": before_first,
        "backlog_left_after_last_probe": left_after,
        "measuring_s": measuring_s,
        "drain_events_per_s_while_probing": (
            (after_last - before_first) / measuring_s if measuring_s > 0 else None
        ),
        "drain_s": done - woken,
        "drain_events_per_s": n / (done - woken),
        "cpu_us_per_event": (cpu1 - cpu0) / n * 1e6,
        "peak_rss_mb": peak_rss_mb(),
        "problems": problems,
    }
