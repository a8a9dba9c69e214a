"""
Prometheus metrics: what a scrape shows of a scheduler's targets, read from memory only, with a
bounded number of series however many targets there are.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from relayer import (
    BackoffPolicy,
    FailureClass,
    FailurePolicy,
    IDeliveryObserver,
    Scheduler,
    TargetState,
)
from relayer.errors import ConfigurationError, StoreUnavailable
from relayer.metrics import OUTCOMES, MetricsResource, PrometheusMetrics
from relayer.scheduler import TargetStatus
from relayer.testing import (
    FakeTransport,
    InlineDatabasePool,
    build_scheduler,
    open_store,
    step,
    target,
)
from tests._support import GatedStore, reactor_, result_of

ROOT = Path(__file__).resolve().parent.parent

#: The clock's time when the tests start: far from 0, so that ages are not clock times.
START = 10_000.0


def samples(metrics: PrometheusMetrics, accept: bytes | None = None) -> dict[Any, float]:
    """Every sample of a scrape, as ``{(name, (sorted labels)): value}``."""
    body, _ = metrics.exposition(accept)
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            found[s.name, tuple(sorted(s.labels.items()))] = s.value
    return found


def value(metrics: PrometheusMetrics, name: str, **labels: str) -> float | None:
    """One sample of a scrape, or None if the scrape has none with these labels."""
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def clock_at_start() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


def start(
    db_path: Any, targets: list[Any], *, watch: bool = True, **metrics_options: Any
) -> tuple[Any, PrometheusMetrics]:
    """A scheduler with metrics observing it, and watching it (refreshed every 15 s)."""
    clock = clock_at_start()
    metrics = PrometheusMetrics(clock, **metrics_options)
    h = build_scheduler(targets, path=db_path, clock=clock, options={"observers": [metrics]})
    if watch:
        metrics.watch(h.scheduler)
    return h, metrics


class CountingPool(InlineDatabasePool):
    """An inline pool that counts each unit of database work."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.runs += 1
        return super().run(f, *args, **kwargs)


class StubScheduler:
    """Answers ``status()`` from a list of target statuses, counting the calls."""

    def __init__(self, statuses: list[TargetStatus]) -> None:
        self.statuses = sorted(statuses, key=lambda s: s.target_id)
        self.calls: list[tuple[str | None, int]] = []
        self.answer: Deferred[list[TargetStatus]] | None = None

    def status(self, *, after: str | None = None, limit: int = 1000) -> Deferred[Any]:
        self.calls.append((after, limit))
        page = [s for s in self.statuses if after is None or s.target_id > after][:limit]
        if self.answer is not None:
            answer, self.answer = self.answer, None
            return answer.addCallback(lambda _: page)
        return succeed(page)


def status_of(target_id: str, **fields: Any) -> TargetStatus:
    values: dict[str, Any] = {
        "target_id": target_id,
        "state": TargetState.UP,
        "registered": True,
        "in_flight": False,
        "pending_events": 0,
        "pending_transactions": 0,
        "oldest_pending_age": None,
        "last_success_at": None,
        "consecutive_failures": 0,
        "next_retry_at": None,
        "last_error": None,
        "dead_letters": 0,
        "down_since": None,
    }
    values.update(fields)
    return TargetStatus(**values)


@pytest.fixture
def warnings_logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if str(event.get("log_namespace")).startswith("relayer.metrics"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# -- the observer and the registry ----------------------------------------------------------------


def test_it_is_an_observer_that_a_scheduler_takes(db_path: Path) -> None:
    h, metrics = start(db_path, ["a"])
    assert verifyObject(IDeliveryObserver, metrics)
    h.scheduler.submit("a", {"n": 1})
    assert h.transport["a"].events == [{"n": 1}]
    assert value(metrics, "relayer_attempts_total", target="a", outcome="delivered") == 1
    assert value(metrics, "relayer_delivered_events_total", target="a") == 1


def test_it_registers_with_a_registry_of_its_own_or_the_one_given() -> None:
    clock = clock_at_start()
    own = PrometheusMetrics(clock)
    assert isinstance(own.registry, CollectorRegistry)
    shared = CollectorRegistry()
    one = PrometheusMetrics(clock, registry=shared)
    two = PrometheusMetrics(clock, registry=shared, namespace="other")
    one.delivered("a", 1, 3, 1, 0.5)
    two.delivered("b", 1, 2, 1, 0.5)
    assert one.registry is two.registry is shared
    found = samples(one)
    assert found["relayer_delivered_events_total", (("target", "a"),)] == 3
    assert found["other_delivered_events_total", (("target", "b"),)] == 2
    assert value(own, "relayer_delivered_events_total", target="a") is None
    # Two objects of one namespace in one registry would repeat each other's names.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusMetrics(clock, registry=shared)
    shared.unregister(two)
    assert ("other_delivered_events_total", (("target", "b"),)) not in samples(one)


def test_the_exposition_format_follows_the_accept_header() -> None:
    metrics = PrometheusMetrics(clock_at_start())
    metrics.delivered("a", 1, 1, 1, 0.5)
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b'relayer_delivered_events_total{target="a"} 1.0' in body
    body, content_type = metrics.exposition(b"application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b'relayer_delivered_events_total{target="a"} 1.0' in body
    assert metrics.exposition("text/plain")[1] == metrics.exposition(None)[1]


def test_the_metrics_resource_serves_the_exposition() -> None:
    metrics = PrometheusMetrics(clock_at_start())
    metrics.delivered("a", 1, 4, 1, 0.5)
    resource = MetricsResource(metrics)
    request = DummyRequest([b""])
    body = resource.render(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"
    ]
    assert b'relayer_delivered_events_total{target="a"} 4.0' in body
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text"])
    body = resource.render(request)
    content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_metrics_resource_over_http() -> None:
    reactor = reactor_()
    metrics = PrometheusMetrics(reactor)
    metrics.failed("a", 1, FailureClass.TIMEOUT, "timed out", 1)
    port = reactor.listenTCP(0, Site(MetricsResource(metrics)), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/"
        response = await treq.get(url)
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        [sample] = [
            s
            for s in families["relayer_attempts"].samples
            if s.labels == {"target": "a", "outcome": "timeout"}
        ]
        assert sample.value == 1
        response = await treq.head(url)
        assert response.code == 200
        assert await response.content() == b""
        response = await treq.post(url, b"")
        assert response.code == 405
        assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
        await response.content()
    finally:
        await port.stopListening()


# -- what a scrape shows ------------------------------------------------------------------------


def test_the_backlog_after_submits(db_path: Path) -> None:
    h, metrics = start(db_path, ["a", "b"])
    h.transport["a"].down()
    h.scheduler.submit_many([("a", {"n": i}) for i in range(3)])
    h.clock.advance(5)
    h.scheduler.submit("a", {"n": 3})
    h.scheduler.submit("b", {"n": 1})
    # Until the next refresh, the gauges show the last one's (before the submits).
    assert value(metrics, "relayer_backlog_events", target="a") == 0
    step(h.clock, 10)  # the refresh at 15 s
    assert value(metrics, "relayer_backlog_events", target="a") == 4
    # One transaction is formed (the one being retried); the other events wait in the queue.
    assert value(metrics, "relayer_backlog_transactions", target="a") == 1
    assert value(metrics, "relayer_oldest_pending_age_seconds", target="a") == 15
    assert value(metrics, "relayer_backlog_events", target="b") == 0
    assert value(metrics, "relayer_oldest_pending_age_seconds", target="b") == 0
    assert value(metrics, "relayer_status_age_seconds") == 0
    h.clock.advance(4)
    assert value(metrics, "relayer_status_age_seconds") == 4
    h.transport["a"].up()
    h.scheduler.wake("a")
    step(h.clock, 11)
    assert value(metrics, "relayer_backlog_events", target="a") == 0
    assert value(metrics, "relayer_backlog_transactions", target="a") == 0
    assert value(metrics, "relayer_delivered_events_total", target="a") == 4


def test_a_down_target_and_how_long_it_has_been_down(db_path: Path) -> None:
    h, metrics = start(
        db_path, [target("a", backoff=BackoffPolicy.constant(10.0)), "b"], refresh_interval=3600
    )
    h.transport["a"].fail_with(500)
    h.scheduler.submit("a", {"n": 1})
    # Told by the scheduler, with no refresh since.
    assert value(metrics, "relayer_target_state", target="a") == 1
    assert value(metrics, "relayer_target_state", target="b") == 0
    assert value(metrics, "relayer_targets", state="down") == 1
    assert value(metrics, "relayer_targets", state="up") == 1
    assert value(metrics, "relayer_target_down_seconds", target="a") == 0
    step(h.clock, 125)
    # Seconds DOWN grow with the clock, between refreshes.
    assert value(metrics, "relayer_target_down_seconds", target="a") == 125
    assert value(metrics, "relayer_consecutive_failures", target="a") == 13
    assert value(metrics, "relayer_target_down_seconds", target="b") == 0
    h.transport["a"].up()
    step(h.clock, 10)
    assert value(metrics, "relayer_target_state", target="a") == 0
    assert value(metrics, "relayer_target_down_seconds", target="a") == 0
    assert value(metrics, "relayer_consecutive_failures", target="a") == 0
    assert value(metrics, "relayer_targets", state="up") == 2
    assert value(metrics, "relayer_targets", state="down") == 0


def test_attempts_by_outcome_and_failure_class(db_path: Path) -> None:
    h, metrics = start(db_path, [target("a", backoff=BackoffPolicy.constant(1.0))])
    fake = h.transport["a"]
    for status in (429, 503, 500, 401, 404):
        fake.respond(status)
    h.scheduler.submit("a", {"n": 1})  # answered 429, then retried every second
    step(h.clock, 4.5)
    fake.down()
    step(h.clock, 1)
    fake.up()
    step(h.clock, 1)
    assert fake.events == [{"n": 1}]
    attempts = {
        outcome: value(metrics, "relayer_attempts_total", target="a", outcome=outcome)
        for outcome in OUTCOMES
    }
    assert attempts == {
        "delivered": 1,
        "timeout": 0,
        "connection": 1,
        "rate_limited": 2,
        "server_error": 1,
        "unauthorized": 1,
        "not_found": 1,
        "too_large": 0,
        "rejected": 0,
        "client_error": 0,
        "transient": 0,
        "permanent": 0,
    }


def test_dead_letters_counted_and_current(db_path: Path) -> None:
    h, metrics = start(db_path, [target("a", failure_policy=FailurePolicy.DEAD_LETTER)])
    fake = h.transport["a"]
    fake.respond(400)
    h.scheduler.submit_many([("a", {"n": i}) for i in range(3)])
    assert fake.events == []
    assert value(metrics, "relayer_attempts_total", target="a", outcome="rejected") == 1
    assert value(metrics, "relayer_dead_lettered_transactions_total", target="a") == 1
    assert value(metrics, "relayer_dead_lettered_events_total", target="a") == 3
    step(h.clock, 15)
    assert value(metrics, "relayer_dead_letters", target="a") == 1
    assert result_of(h.scheduler.replay("a")) == 3
    step(h.clock, 15)
    assert len(fake.events) == 3
    assert value(metrics, "relayer_dead_letters", target="a") == 0
    # The counter counts what happened; the gauge, what is left.
    assert value(metrics, "relayer_dead_lettered_transactions_total", target="a") == 1


def test_a_blocked_then_woken_target(db_path: Path) -> None:
    h, metrics = start(db_path, [target("a", failure_policy=FailurePolicy.BLOCK)])
    fake = h.transport["a"]
    fake.respond(400)
    h.scheduler.submit("a", {"n": 1})
    assert value(metrics, "relayer_target_state", target="a") == 2
    assert value(metrics, "relayer_targets", state="blocked") == 1
    # Refused at once, with no run of failures before: as the scheduler records it.
    assert value(metrics, "relayer_target_down_seconds", target="a") == 0
    step(h.clock, 15)
    assert value(metrics, "relayer_target_state", target="a") == 2
    assert value(metrics, "relayer_target_down_seconds", target="a") == 0
    h.scheduler.wake("a")
    assert fake.events == [{"n": 1}]
    assert value(metrics, "relayer_target_state", target="a") == 0
    assert value(metrics, "relayer_targets", state="blocked") == 0


def test_expired_events(db_path: Path) -> None:
    h, metrics = start(db_path, [target("a", default_ttl=30.0)])
    h.transport["a"].down()
    h.scheduler.submit_many([("a", {"n": i}) for i in range(2)])
    step(h.clock, 600)
    assert value(metrics, "relayer_expired_events_total", target="a") == 2
    assert value(metrics, "relayer_backlog_events", target="a") == 0


def test_the_latency_histogram(db_path: Path) -> None:
    h, metrics = start(db_path, [target("a", backoff=BackoffPolicy.constant(4.0))])
    fake = h.transport["a"]
    h.scheduler.submit("a", {"n": 0})  # delivered at once
    fake.down()
    h.scheduler.submit("a", {"n": 1})
    step(h.clock, 3)
    fake.up()
    step(h.clock, 1)  # delivered at the retry, 4 s after its submit
    assert len(fake.events) == 2

    def bucket(le: str) -> float | None:
        return value(metrics, "relayer_transaction_latency_seconds_bucket", target="a", le=le)

    assert bucket("0.01") == 1
    assert bucket("2.5") == 1
    assert bucket("5.0") == 2
    assert bucket("+Inf") == 2
    assert value(metrics, "relayer_transaction_latency_seconds_count", target="a") == 2
    assert value(metrics, "relayer_transaction_latency_seconds_sum", target="a") == 4


def test_a_target_that_another_process_delivers_to(db_path: Path) -> None:
    """
    A target that this scheduler does not deliver to: another process stored its events and
    its failures. A refresh shows its backlog and its state as that process stored them.
    """
    h, metrics = start(db_path, ["a"])
    child = (
        "import sys\n"
        "from relayer.dbcli import open_store, wait\n"
        "store = open_store(sys.argv[1])\n"
        "now = float(sys.argv[2])\n"
        "wait(store.register_targets(['elsewhere']))\n"
        "events = [b'{\"n\": 1}', b'{\"n\": 2}']\n"
        "wait(store.add_events([('elsewhere', events)], now))\n"
        "txn = wait(store.claim('elsewhere', 100, 1 << 20, now))\n"
        "wait(store.fail('elsewhere', txn.txn_id, 3, now + 600, 'HTTP 503', now + 30,\n"
        "                down_since=now))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", child, str(db_path), str(START - 60)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert value(metrics, "relayer_backlog_events", target="elsewhere") is None
    step(h.clock, 15)
    assert value(metrics, "relayer_backlog_events", target="elsewhere") == 2
    assert value(metrics, "relayer_backlog_transactions", target="elsewhere") == 1
    assert value(metrics, "relayer_oldest_pending_age_seconds", target="elsewhere") == 75
    assert value(metrics, "relayer_target_state", target="elsewhere") == 1
    assert value(metrics, "relayer_consecutive_failures", target="elsewhere") == 3
    assert value(metrics, "relayer_target_down_seconds", target="elsewhere") == 75
    assert value(metrics, "relayer_targets", state="down") == 1
    assert value(metrics, "relayer_targets", state="up") == 1


# -- bounded series -----------------------------------------------------------------------------


def test_targets_beyond_the_cap_are_folded_into_other(db_path: Path) -> None:
    ids = ["a", "b", "c", "d", "_other"]
    configs = [target(t, backoff=BackoffPolicy.constant(100.0)) for t in ids]
    h, metrics = start(db_path, configs, max_labelled_targets=2)
    for target_id in ("c", "d"):
        h.transport[target_id].down()
    h.scheduler.submit_many([(t, {"n": 1}) for t in ids] + [("d", {"n": 2})])
    step(h.clock, 15)
    labels = {dict(k[1]).get("target") for k in samples(metrics)} - {None}
    # The first two target ids met (the refresh goes by id) keep their label.
    assert labels == {"_other", "a", "b"}
    # "_other", c and d: the counters added, the backlog summed, the age the largest.
    assert value(metrics, "relayer_other_targets") == 3
    assert value(metrics, "relayer_attempts_total", target="_other", outcome="delivered") == 1
    assert value(metrics, "relayer_attempts_total", target="_other", outcome="connection") == 2
    assert value(metrics, "relayer_backlog_events", target="_other") == 3
    assert value(metrics, "relayer_oldest_pending_age_seconds", target="_other") == 15
    assert value(metrics, "relayer_target_state", target="_other") is None
    assert value(metrics, "relayer_targets", state="down") == 2
    # A target met later is folded too, and a labelled one keeps its label.
    h.scheduler.add_target(target("e"))
    h.scheduler.submit("e", {"n": 1})
    h.scheduler.submit("a", {"n": 2})
    step(h.clock, 15)
    assert value(metrics, "relayer_other_targets") == 4
    assert value(metrics, "relayer_attempts_total", target="_other", outcome="delivered") == 2
    assert value(metrics, "relayer_attempts_total", target="a", outcome="delivered") == 2
    assert value(metrics, "relayer_backlog_events", target="e") is None


def test_the_aggregate_mode_has_no_target_label(db_path: Path) -> None:
    h, metrics = start(
        db_path,
        [target(t, backoff=BackoffPolicy.constant(10.0)) for t in "abc"],
        labels="aggregate",
    )
    h.transport["b"].down()
    h.transport["c"].fail_with(500)
    h.scheduler.submit_many([(t, {"n": 1}) for t in "abc"] + [("c", {"n": 2})])
    step(h.clock, 15)
    found = samples(metrics)
    assert all("target" not in dict(labels) for _, labels in found)
    assert value(metrics, "relayer_backlog_events") == 3
    assert value(metrics, "relayer_attempts_total", outcome="delivered") == 1
    assert value(metrics, "relayer_attempts_total", outcome="connection") == 2
    assert value(metrics, "relayer_attempts_total", outcome="server_error") == 2
    assert value(metrics, "relayer_target_down_seconds") == 15
    assert value(metrics, "relayer_targets", state="down") == 2
    assert not any(name == "relayer_target_state" for name, _ in found)
    assert not any(name == "relayer_other_targets" for name, _ in found)
    assert len(found) <= metrics.max_series() == 32 + 15


def test_ten_thousand_targets_stay_within_the_bound(db_path: Path) -> None:
    ids = [f"t{i:05d}" for i in range(10_000)]
    h, metrics = start(db_path, ids)
    busy = ids[::50]
    for target_id in busy[::2]:
        h.transport[target_id].down()
    h.scheduler.submit_many([(t, {"n": 1}) for t in busy])
    step(h.clock, 15)
    found = samples(metrics)
    # (1000 + 1) label values of 26 + 15 series (the "_other" one without a state), and 8 more.
    assert metrics.max_series() == 1001 * 41 + 7
    assert len(found) == metrics.max_series()
    assert found["relayer_other_targets", ()] == 9_000
    assert found["relayer_targets", (("state", "down"),)] == 100
    assert found["relayer_targets", (("state", "up"),)] == 9_900
    # The first thousand ids have labels: t00000 (down), t00050 (delivered), ...
    assert found.get(("relayer_backlog_events", (("target", "t00000"),))) == 1
    assert found.get(("relayer_backlog_events", (("target", "t00050"),))) == 0
    assert found.get(("relayer_backlog_events", (("target", "t00999"),))) == 0
    assert found.get(("relayer_backlog_events", (("target", "t01000"),))) is None
    # ... and the backlog of the others is folded: 90 of the 100 down targets.
    assert found.get(("relayer_backlog_events", (("target", "_other"),))) == 90
    assert found["relayer_attempts_total", (("outcome", "delivered"), ("target", "_other"))] == 90
    aggregate = PrometheusMetrics(h.clock, labels="aggregate")
    aggregate.watch(h.scheduler)
    assert len(samples(aggregate)) == aggregate.max_series() == 47
    assert value(aggregate, "relayer_backlog_events") == 100


def test_a_refresh_reads_the_status_a_page_at_a_time() -> None:
    statuses = [status_of(f"t{i:04d}", pending_events=1) for i in range(2500)]
    scheduler = StubScheduler(statuses)
    metrics = PrometheusMetrics(clock_at_start(), page_size=1000, labels="aggregate")
    metrics.watch(scheduler)  # type: ignore[arg-type]
    assert scheduler.calls == [(None, 1000), ("t0999", 1000), ("t1999", 1000)]
    assert value(metrics, "relayer_backlog_events") == 2500
    # A target gone from the status loses its gauges at the end of the next complete refresh.
    scheduler.statuses = scheduler.statuses[:10]
    metrics.clock.advance(15)  # type: ignore[attr-defined]
    assert value(metrics, "relayer_backlog_events") == 10
    assert value(metrics, "relayer_targets", state="up") == 10


def test_news_from_the_scheduler_during_a_refresh_is_not_overwritten() -> None:
    scheduler = StubScheduler([status_of("a"), status_of("b")])
    clock = clock_at_start()
    metrics = PrometheusMetrics(clock, refresh_interval=60)
    answer: Deferred[None] = Deferred()
    scheduler.answer = answer
    metrics.watch(scheduler)  # type: ignore[arg-type]
    # The page was asked for; before it comes, the scheduler tells that "a" is DOWN.
    clock.advance(5)
    metrics.failed("a", 1, FailureClass.CONNECTION, "refused", 1)
    metrics.target_down("a", "refused")
    answer.callback(None)
    assert value(metrics, "relayer_target_state", target="a") == 1
    assert value(metrics, "relayer_target_state", target="b") == 0
    # The next refresh's news is the latest.
    clock.advance(55)
    assert value(metrics, "relayer_target_state", target="a") == 0


# -- a scrape reads memory only -------------------------------------------------------------------


def test_a_scrape_makes_no_store_call(db_path: Path) -> None:
    clock = clock_at_start()
    pool = CountingPool()
    store = GatedStore(open_store(clock, db_path, pool=pool))
    transport = FakeTransport(clock)
    metrics = PrometheusMetrics(clock)
    configs = [target(t, backoff=BackoffPolicy.constant(10.0)) for t in ("a", "b")]
    scheduler = Scheduler(
        clock,
        store,
        transport,
        configs,
        random=lambda: 0.0,
        observers=[metrics],  # type: ignore[arg-type]
    )
    assert scheduler.start().called
    metrics.watch(scheduler)
    transport["a"].down()
    scheduler.submit_many([("a", {"n": 1}), ("b", {"n": 1})])
    step(clock, 20)
    assert "queue_counts" in store.calls  # the refreshes read the store
    calls, runs = len(store.calls), pool.runs
    for accept in (None, b"application/openmetrics-text"):
        body, _ = metrics.exposition(accept)
        assert b'relayer_backlog_events{target="a"} 1.0' in body
    list(metrics.registry.collect())
    assert (len(store.calls), pool.runs) == (calls, runs)


# -- the refresh loop ---------------------------------------------------------------------------


def test_stop_cancels_the_refreshes(db_path: Path) -> None:
    h, metrics = start(db_path, ["a"], watch=False)
    counting = StubScheduler([])
    counting.status = wrap_count(h.scheduler.status, counting.calls)  # type: ignore[method-assign]
    metrics.watch(counting)  # type: ignore[arg-type]
    step(h.clock, 30)
    assert len(counting.calls) == 3  # at 0, 15 and 30 s
    timers = len(h.clock.getDelayedCalls())
    assert metrics.watching
    stopped = metrics.stop()
    assert stopped.called
    assert not metrics.watching
    assert len(h.clock.getDelayedCalls()) == timers - 1
    step(h.clock, 60)
    assert len(counting.calls) == 3
    # The observer goes on counting, and the metrics stay.
    h.scheduler.submit("a", {"n": 1})
    assert value(metrics, "relayer_delivered_events_total", target="a") == 1


def wrap_count(status: Any, calls: list[Any]) -> Any:
    def counted(*, after: str | None = None, limit: int = 1000) -> Any:
        calls.append((after, limit))
        return status(after=after, limit=limit)

    return counted


def test_stop_during_a_refresh_ends_it_after_its_page() -> None:
    statuses = [status_of(f"t{i:02d}") for i in range(25)]
    scheduler = StubScheduler(statuses)
    clock = clock_at_start()
    metrics = PrometheusMetrics(clock, page_size=10)
    answer: Deferred[None] = Deferred()
    scheduler.answer = answer
    metrics.watch(scheduler)  # type: ignore[arg-type]
    assert len(scheduler.calls) == 1
    stopped = metrics.stop()
    assert not stopped.called
    answer.callback(None)
    assert stopped.called
    assert len(scheduler.calls) == 1
    assert clock.getDelayedCalls() == []
    # It can watch again.
    metrics.watch(scheduler)  # type: ignore[arg-type]
    assert len(scheduler.calls) == 1 + 3
    assert value(metrics, "relayer_targets", state="up") == 25
    with pytest.raises(ConfigurationError, match="already watches"):
        metrics.watch(scheduler)  # type: ignore[arg-type]
    assert metrics.stop().called


def test_a_failed_refresh_is_logged_and_counted_and_the_next_one_comes(
    db_path: Path, warnings_logged: list[LogEvent]
) -> None:
    clock = clock_at_start()
    store = GatedStore(open_store(clock, db_path))
    transport = FakeTransport(clock)
    metrics = PrometheusMetrics(clock)
    scheduler = Scheduler(
        clock,
        store,
        transport,
        [target("a")],
        random=lambda: 0.0,
        observers=[metrics],  # type: ignore[arg-type]
    )
    assert scheduler.start().called
    transport["a"].down()
    scheduler.submit("a", {"n": 1})
    metrics.watch(scheduler)
    assert value(metrics, "relayer_backlog_events", target="a") == 1
    store.fail_calls("queue_counts", StoreUnavailable("the database is away"))
    clock.advance(15)
    assert value(metrics, "relayer_status_refresh_errors_total") == 1
    assert value(metrics, "relayer_backlog_events", target="a") == 1
    assert value(metrics, "relayer_status_age_seconds") == 15
    assert [e["log_level"].name for e in warnings_logged] == ["warn"]
    assert "the database is away" in str(warnings_logged[0]["error"])
    scheduler.submit("a", {"n": 2})
    clock.advance(15)
    assert value(metrics, "relayer_backlog_events", target="a") == 2
    assert value(metrics, "relayer_status_age_seconds") == 0
    assert value(metrics, "relayer_status_refresh_errors_total") == 1


def test_an_unexpected_error_in_a_refresh_is_logged_with_its_traceback(
    warnings_logged: list[LogEvent],
) -> None:
    class Broken:
        def status(self, **kwargs: Any) -> Any:
            raise RuntimeError("broken")

    clock = clock_at_start()
    metrics = PrometheusMetrics(clock)
    metrics.watch(Broken())  # type: ignore[arg-type]
    clock.advance(15)
    assert value(metrics, "relayer_status_refresh_errors_total") == 2
    assert [e["log_level"].name for e in warnings_logged] == ["critical", "critical"]
    assert metrics.watching


def test_watching_a_scheduler_before_it_starts(db_path: Path) -> None:
    clock = clock_at_start()
    metrics = PrometheusMetrics(clock)
    store = open_store(clock, db_path)
    transport = FakeTransport(clock)
    transport["a"].down()
    scheduler = Scheduler(clock, store, transport, [target("a")], observers=[metrics])
    metrics.watch(scheduler)
    assert value(metrics, "relayer_status_refresh_errors_total") == 0
    assert value(metrics, "relayer_status_age_seconds") is None
    assert scheduler.start().called
    scheduler.submit("a", {"n": 1})
    clock.advance(15)
    assert value(metrics, "relayer_backlog_events", target="a") == 1
    assert value(metrics, "relayer_status_age_seconds") == 0
    assert metrics.stop().called
    assert scheduler.stop().called


# -- configuration and packaging ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"labels": "per-target"},
        {"max_labelled_targets": -1},
        {"max_labelled_targets": True},
        {"refresh_interval": 0},
        {"refresh_interval": float("nan")},
        {"refresh_interval": "15"},
        {"namespace": "my-app"},
        {"namespace": 3},
        {"buckets": []},
        {"buckets": [1.0, 0.5]},
        {"buckets": [0.0, 1.0]},
        {"buckets": [1.0, float("inf")]},
        {"buckets": ["a"]},
        {"page_size": 0},
        {"page_size": 10_001},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        PrometheusMetrics(Clock(), **options)


def test_without_prometheus_client_the_import_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "relayer.metrics")
    with pytest.raises(ImportError, match=re.escape("pip install 'relayer[metrics]'")):
        importlib.import_module("relayer.metrics")


def test_the_operations_guide_documents_every_metric() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(relayer_[a-z_]+)`", section, re.M))
    names = set()
    for labels in ("targets", "aggregate"):
        metrics = PrometheusMetrics(Clock(), labels=labels)
        for family in metrics.describe():
            suffix = "_total" if family.type == "counter" else ""
            names.add(family.name + suffix)
    assert documented == names
