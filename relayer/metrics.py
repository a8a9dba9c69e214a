"""
Prometheus metrics for a scheduler: the optional extra ``metrics``.

Install it with ``pip install 'relayer[metrics]'`` (it adds ``prometheus_client``). Then::

    from relayer.metrics import PrometheusMetrics

    metrics = PrometheusMetrics(reactor)
    scheduler = Scheduler(reactor, store, transport, targets, observers=[metrics])
    await scheduler.start()
    metrics.watch(scheduler)          # reads the backlog every refresh_interval seconds
    ...
    body, content_type = metrics.exposition(request.getHeader(b"accept"))

:class:`PrometheusMetrics` is fed from two sides:

- as an observer (:class:`relayer.IDeliveryObserver`), it counts attempts by outcome, delivered,
  expired and dead-lettered events, and transaction latencies, and follows each target's state
  as the scheduler tells it;
- :meth:`PrometheusMetrics.watch` reads :meth:`relayer.Scheduler.status` every
  ``refresh_interval`` seconds, a page at a time, for the backlog (pending events and
  transactions, the age of the oldest pending event, dead letters) and for the state of the
  targets that this process does not deliver to.

It is a custom collector: a scrape reads only what it holds in memory, and never touches the
store, however many targets or events there are.

The metrics, their labels and the bound on their number of series are described in the
operations guide (``docs/operations.md``, section *Metrics*).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

try:
    import prometheus_client  # noqa: F401 - the check that the extra is installed
except ImportError as e:  # pragma: no cover - exercised in a test with the module hidden
    raise ImportError(
        "relayer.metrics needs prometheus_client, which the extra 'metrics' installs: "
        "pip install 'relayer[metrics]'"
    ) from e

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from relayer import _logevents as ev
from relayer.errors import ConfigurationError, NotRunning, StoreError
from relayer.observer import DeliveryObserver
from relayer.scheduler import Scheduler
from relayer.store.base import TargetState
from relayer.transport.base import FailureClass

if TYPE_CHECKING:
    from relayer.scheduler import TargetStatus

#: The label value that the targets beyond ``max_labelled_targets`` are counted under.
OTHER_TARGET = "_other"

#: The ``outcome`` label values of ``relayer_attempts_total``, ``delivered`` and then each
#: :class:`relayer.FailureClass` value.
OUTCOMES: tuple[str, ...] = ("delivered", *(c.value for c in FailureClass))

#: The value of ``relayer_target_state`` for each state.
STATE_CODES: dict[TargetState, int] = {
    TargetState.UP: 0,
    TargetState.DOWN: 1,
    TargetState.BLOCKED: 2,
    TargetState.DISABLED: 3,
}

#: The default upper bounds of the latency histogram's buckets, in seconds, from a quick
#: delivery to an outage of an hour (``+Inf`` is added).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

#: The series of one target label value: 7 gauges (6 for ``_other``, which has no state),
#: 4 counters, one ``relayer_attempts_total`` per outcome, and the histogram's buckets
#: (``+Inf`` included), ``_sum`` and ``_count``.
_GAUGES_PER_TARGET = 7
_COUNTERS_PER_TARGET = 4
#: The series that have no target label: ``relayer_targets`` (one per state),
#: ``relayer_status_age_seconds``, ``relayer_status_refresh_duration_seconds``,
#: ``relayer_status_refresh_errors_total``; and ``relayer_other_targets`` in "targets" mode.
_AGGREGATE_SERIES = len(STATE_CODES) + 3

_LABEL_MODES = ("targets", "aggregate")
_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_MAX_INTERVAL = 7 * 24 * 3600.0


class _Series:
    """The counters and the histogram of one target label value."""

    __slots__ = (
        "attempts",
        "delivered_events",
        "expired_events",
        "dead_transactions",
        "dead_events",
        "buckets",
        "latency_sum",
    )

    def __init__(self, n_buckets: int) -> None:
        self.attempts = dict.fromkeys(OUTCOMES, 0)
        self.delivered_events = 0
        self.expired_events = 0
        self.dead_transactions = 0
        self.dead_events = 0
        # One count per bucket, not cumulative; the last is +Inf's.
        self.buckets = [0] * (n_buckets + 1)
        self.latency_sum = 0.0


class _Target:
    """What is known of one target: from the last status refresh, and from the observer since."""

    __slots__ = (
        "series",
        "label",
        "state",
        "failures",
        "down_since",
        "pending_events",
        "pending_transactions",
        "oldest_pending_age",
        "dead_letters",
        "changed",
        "seen",
    )

    def __init__(self, series: _Series, label: str | None) -> None:
        self.series = series
        #: The target label value of its series: its id, OTHER_TARGET, or None (aggregate).
        self.label = label
        self.state = TargetState.UP
        self.failures = 0
        self.down_since: float | None = None
        self.pending_events = 0
        self.pending_transactions = 0
        self.oldest_pending_age = 0.0
        self.dead_letters = 0
        #: The observer generation of its last change of state, told by the scheduler.
        self.changed = 0
        #: The refresh in which status last reported it (0: never).
        self.seen = 0


class PrometheusMetrics(DeliveryObserver):
    """
    A scheduler's metrics, for Prometheus: an observer and a custom collector.

    Give it to the scheduler as an observer, then have it watch the scheduler::

        metrics = PrometheusMetrics(reactor)
        scheduler = Scheduler(reactor, store, transport, targets, observers=[metrics])
        await scheduler.start()
        metrics.watch(scheduler)

    It registers itself with ``registry``: by default a new
    :class:`prometheus_client.CollectorRegistry` of its own (:attr:`registry`), which
    :meth:`exposition` and :class:`MetricsResource` serve. To add relayer's metrics to an
    application's own (the global ``prometheus_client.REGISTRY``, served by
    ``prometheus_client.start_http_server`` or another exporter), pass that registry:
    ``PrometheusMetrics(reactor, registry=prometheus_client.REGISTRY)``. Two objects in one
    registry need different namespaces.

    A scrape reads only memory: never the store. Collection copies what it reads, so a
    registry may also be scraped from another thread (as ``start_http_server`` does); such a
    scrape may see a refresh's page half applied.

    **Bounded series.** With ``labels="targets"``, per-target metrics carry a ``target``
    label: the first ``max_labelled_targets`` target ids that the object meets (through the
    scheduler's calls or a status refresh, which goes through targets in order of id) get their
    own label value, and keep it for the object's lifetime; every other target, and a target
    whose id is ``"_other"``, is counted under ``target="_other"`` (its counters and histogram
    added in, its backlog summed, its age, time DOWN and consecutive failures as the largest).
    With ``labels="aggregate"`` no metric has a ``target`` label: each is summed (or the
    largest taken) over all targets. A scrape shows at most
    ``(max_labelled_targets + 1) * (26 + B) + 7`` series in "targets" mode and ``32 + B`` in
    "aggregate" mode, B being the number of histogram buckets (15 by default): see
    :meth:`max_series`.

    Args:
        clock: The reactor, or a clock; schedules the status refreshes, and gives the time for
            ages and time DOWN.
        registry: The registry to register with; by default a new one, owned by this object.
        labels: ``"targets"`` for a ``target`` label on per-target metrics, ``"aggregate"`` for
            none.
        max_labelled_targets: In "targets" mode, the most target label values besides
            ``"_other"``; 0 counts every target under ``"_other"``.
        refresh_interval: Seconds between status refreshes (see :meth:`watch`).
        namespace: The prefix of every metric name (``relayer_...``); ``""`` for none.
        buckets: The latency histogram's bucket upper bounds, in seconds, increasing.
        page_size: Targets per :meth:`relayer.Scheduler.status` page in a refresh.

    Raises:
        ConfigurationError: An argument is not valid.

    Attributes:
        registry: The registry it is registered with.
        clock: The clock it was given.
        labels: ``"targets"`` or ``"aggregate"``.
        max_labelled_targets: The most target label values besides ``"_other"``.
        refresh_interval: Seconds between status refreshes.
        namespace: The prefix of the metric names.
        page_size: Targets per status page.
    """

    log = Logger(namespace="relayer.metrics")

    #: The label value that the targets beyond ``max_labelled_targets`` are counted under.
    OTHER_TARGET = OTHER_TARGET

    def __init__(
        self,
        clock: IReactorTime,
        *,
        registry: CollectorRegistry | None = None,
        labels: str = "targets",
        max_labelled_targets: int = 1000,
        refresh_interval: float = 15.0,
        namespace: str = "relayer",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        page_size: int = 1000,
    ) -> None:
        if labels not in _LABEL_MODES:
            raise ConfigurationError(f'labels must be "targets" or "aggregate", not {labels!r}')
        _check_int("max_labelled_targets", max_labelled_targets, 0, 10_000_000)
        _check_int("page_size", page_size, 1, Scheduler.MAX_STATUS_PAGE)
        if (
            isinstance(refresh_interval, bool)
            or not isinstance(refresh_interval, (int, float))
            or not 0 < refresh_interval <= _MAX_INTERVAL
        ):
            raise ConfigurationError(
                f"refresh_interval must be a number of seconds more than 0 and at most "
                f"{_MAX_INTERVAL:g}, not {refresh_interval!r}"
            )
        if not isinstance(namespace, str) or (namespace and not _NAMESPACE.match(namespace)):
            raise ConfigurationError(
                f"namespace must be empty or a metric name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*), "
                f"not {namespace!r}"
            )
        self._bounds = _check_buckets(buckets)
        self.clock = clock
        self.labels = labels
        self.max_labelled_targets = max_labelled_targets
        self.refresh_interval = float(refresh_interval)
        self.namespace = namespace
        self.page_size = page_size
        self._prefix = f"{namespace}_" if namespace else ""
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._targets: dict[str, _Target] = {}
        # The series of each label value; in aggregate mode one, under None.
        self._series: dict[str | None, _Series] = {}
        self._generation = 0
        self._refreshes = 0
        self._refreshed_at: float | None = None
        self._refresh_duration: float | None = None
        self._refresh_errors = 0
        self._scheduler: Scheduler | None = None
        self._loop: LoopingCall | None = None
        self._refreshing: Deferred[None] | None = None
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    # -- the series ----------------------------------------------------------------------------

    def _target(self, target_id: str) -> _Target:
        t = self._targets.get(target_id)
        if t is None:
            label = self._label_for(target_id)
            series = self._series.get(label)
            if series is None:
                series = self._series[label] = _Series(len(self._bounds))
            t = self._targets[target_id] = _Target(series, label)
        return t

    def _label_for(self, target_id: str) -> str | None:
        if self.labels == "aggregate":
            return None
        if target_id in self._series:
            # Labelled before: it keeps its label.
            return target_id
        if target_id == OTHER_TARGET or self._labelled() >= self.max_labelled_targets:
            return OTHER_TARGET
        return target_id

    def _labelled(self) -> int:
        return len(self._series) - (OTHER_TARGET in self._series)

    def _changed(self, target_id: str) -> _Target:
        self._generation += 1
        t = self._target(target_id)
        t.changed = self._generation
        return t

    def max_series(self) -> int:
        """
        The most series that a scrape can show, however many targets there are.

        Each target label value has 7 gauges (``_other`` 6: it has no state), 4 counters,
        ``relayer_attempts_total`` for each of the 12 outcomes, and the latency histogram's
        ``B + 3`` series (its B buckets, ``+Inf``, ``_sum`` and ``_count``): ``26 + B``. There are
        at most ``max_labelled_targets + 1`` label values (``_other`` included), and 8 series
        without a target label: ``(max_labelled_targets + 1) * (26 + B) + 7`` in all. In
        "aggregate" mode the per-target metrics have one series each, without
        ``relayer_target_state``, and 7 series come besides: ``32 + B``.
        """
        per_label = _GAUGES_PER_TARGET + _COUNTERS_PER_TARGET + len(OUTCOMES) + len(self._les) + 2
        if self.labels == "aggregate":
            return per_label - 1 + _AGGREGATE_SERIES
        return (self.max_labelled_targets + 1) * per_label - 1 + _AGGREGATE_SERIES + 1

    # -- the observer --------------------------------------------------------------------------

    def delivered(
        self, target_id: str, txn_id: int, n_events: int, attempts: int, latency: float
    ) -> None:
        t = self._changed(target_id)
        t.failures = 0
        t.down_since = None
        if t.state in (TargetState.BLOCKED, TargetState.DISABLED):
            # Unblocked: the rest of its backlog drains as after an outage.
            t.state = TargetState.DOWN
        s = t.series
        s.attempts["delivered"] += 1
        s.delivered_events += n_events
        latency = max(0.0, float(latency))
        s.buckets[bisect.bisect_left(self._bounds, latency)] += 1
        s.latency_sum += latency

    def failed(
        self, target_id: str, txn_id: int, failure: FailureClass, reason: str, failures: int
    ) -> None:
        t = self._changed(target_id)
        t.failures = failures
        # A run of failures begins when the target is told DOWN or DISABLED (target_down,
        # target_disabled), as the scheduler records it; a target BLOCKED at once has none.
        t.series.attempts[FailureClass(failure).value] += 1

    def dead_lettered(self, target_id: str, txn_id: int, n_events: int, reason: str) -> None:
        s = self._target(target_id).series
        s.dead_transactions += 1
        s.dead_events += n_events

    def expired(self, target_id: str, count: int) -> None:
        self._target(target_id).series.expired_events += count

    def target_down(self, target_id: str, reason: str) -> None:
        t = self._changed(target_id)
        t.state = TargetState.DOWN
        if t.down_since is None:
            t.down_since = self.clock.seconds()

    def target_up(self, target_id: str) -> None:
        t = self._changed(target_id)
        t.state = TargetState.UP
        t.failures = 0
        t.down_since = None

    def target_blocked(self, target_id: str, txn_id: int, reason: str) -> None:
        t = self._changed(target_id)
        t.state = TargetState.BLOCKED

    def target_disabled(self, target_id: str, reason: str) -> None:
        t = self._changed(target_id)
        t.state = TargetState.DISABLED
        if t.down_since is None:
            t.down_since = self.clock.seconds()

    # -- the status refresh --------------------------------------------------------------------

    def watch(self, scheduler: Scheduler) -> None:
        """
        Refresh the backlog gauges from ``scheduler`` now, then every ``refresh_interval``.

        A refresh reads :meth:`relayer.Scheduler.status` a page of ``page_size`` targets at a
        time, and updates each page's targets as it comes: memory stays bounded by a page
        (beyond a few numbers per target), and a refresh takes one store query per page.
        Refreshes come every ``refresh_interval`` seconds from the call (a
        :class:`~twisted.internet.task.LoopingCall` on the clock), and never overlap: one that
        takes longer than the interval delays the next to the first interval's end after it.
        A target that a complete refresh did not report (one gone from the store and from the
        scheduler), and that the scheduler told nothing of meanwhile, loses its gauges; its
        counters stay.

        A refresh that fails (the store unavailable, say) is logged and counted in
        ``relayer_status_refresh_errors_total``; the gauges keep their values, and the next
        refresh comes as usual. While the scheduler is not running (not yet started, or
        stopped), refreshes read nothing.

        Args:
            scheduler: The scheduler to read: the one this object observes.

        Raises:
            ConfigurationError: This object already watches a scheduler (call :meth:`stop`
                first).
        """
        if self._loop is not None:
            raise ConfigurationError(
                "this PrometheusMetrics already watches a scheduler: stop() it first"
            )
        self._scheduler = scheduler
        loop = self._loop = LoopingCall(self._refresh)
        loop.clock = self.clock
        loop.start(self.refresh_interval, now=True)

    def stop(self) -> Deferred[None]:
        """
        Stop the status refreshes.

        The next refresh is cancelled; one in progress ends after the page it is reading. The
        metrics stay registered and keep their values, and the observer goes on counting; to
        remove them from a registry, call ``registry.unregister(metrics)``.

        Returns:
            A Deferred that fires once no refresh is in progress.
        """
        loop, self._loop = self._loop, None
        self._scheduler = None
        if loop is not None and loop.running:
            loop.stop()
        running = self._refreshing
        if running is None:
            return succeed(None)
        idle: Deferred[None] = Deferred()

        def ended(result: object) -> object:
            idle.callback(None)
            return result

        running.addBoth(ended)
        return idle

    @property
    def watching(self) -> bool:
        """Whether status refreshes are scheduled: between :meth:`watch` and :meth:`stop`."""
        return self._loop is not None

    def _refresh(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._refresh_once())
        if not d.called:
            self._refreshing = d

            def ended(result: object) -> object:
                if self._refreshing is d:
                    self._refreshing = None
                return result

            d.addBoth(ended)
        # _refresh_once never fails, so that the LoopingCall goes on.
        return d

    async def _refresh_once(self) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        self._refreshes += 1
        refresh = self._refreshes
        started_at = self.clock.seconds()
        generation = self._generation
        after: str | None = None
        try:
            while True:
                page_generation = self._generation
                page = await scheduler.status(after=after, limit=self.page_size)
                if self._scheduler is not scheduler:
                    # Stopped meanwhile.
                    return
                self._apply(page, refresh, page_generation)
                if len(page) < self.page_size:
                    break
                after = page[-1].target_id
        except NotRunning:
            self.log.debug(
                "Metrics: the scheduler is not running; its status is not read",
                relayer_event=ev.METRICS_NOT_RUNNING,
            )
            return
        except StoreError as e:
            self._refresh_errors += 1
            self.log.warn(
                "Metrics: reading the scheduler's status failed ({error}); the backlog "
                "gauges keep their values until the next refresh",
                relayer_event=ev.METRICS_REFRESH_FAILED,
                error=str(e),
            )
            return
        except Exception as e:
            self._refresh_errors += 1
            self.log.failure(
                "Metrics: reading the scheduler's status failed",
                relayer_event=ev.METRICS_REFRESH_FAILED,
                error=str(e),
            )
            return
        # Forget the targets that this complete refresh did not report, and that the
        # scheduler told nothing of since it began.
        gone = [
            target_id
            for target_id, t in self._targets.items()
            if t.seen != refresh and t.changed <= generation
        ]
        for target_id in gone:
            del self._targets[target_id]
        now = self.clock.seconds()
        self._refreshed_at = now
        self._refresh_duration = max(0.0, now - started_at)

    def _apply(self, page: Iterable[TargetStatus], refresh: int, generation: int) -> None:
        for status in page:
            t = self._target(status.target_id)
            t.seen = refresh
            t.pending_events = status.pending_events
            t.pending_transactions = status.pending_transactions
            t.oldest_pending_age = status.oldest_pending_age or 0.0
            t.dead_letters = status.dead_letters
            if t.changed <= generation:
                # Nothing told since the page was asked for: the status is the latest news.
                t.state = status.state
                t.failures = status.consecutive_failures
                t.down_since = status.down_since

    # -- the collector -------------------------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (for the registry's check of names)."""
        return iter(self._families().values())

    def collect(self) -> Iterator[Metric]:
        """The metric families with their samples, from memory only."""
        now = self.clock.seconds()
        # Copies, so that a scrape from another thread reads a list that does not change.
        targets = list(self._targets.values())
        series = list(self._series.items())
        f = self._families()

        # The gauges of each label value: summed, or the largest.
        gauges: dict[str | None, list[float]] = {}
        counts = dict.fromkeys(STATE_CODES, 0)
        n_other = 0
        for t in targets:
            target_state = t.state
            counts[target_state] += 1
            down_since = t.down_since
            down = max(0.0, now - down_since) if down_since is not None else 0.0
            row = gauges.get(t.label)
            if row is None:
                row = gauges[t.label] = [0, 0, 0.0, 0, 0.0, 0]
            row[0] += t.pending_events
            row[1] += t.pending_transactions
            row[2] = max(row[2], t.oldest_pending_age)
            row[3] += t.dead_letters
            row[4] = max(row[4], down)
            row[5] = max(row[5], t.failures)
            if t.label == OTHER_TARGET:
                n_other += 1
            elif t.label is not None:
                f["target_state"].add_metric([t.label], STATE_CODES[target_state])
        for label, row in sorted(gauges.items(), key=_label_order):
            values = [] if label is None else [label]
            f["backlog_events"].add_metric(values, row[0])
            f["backlog_transactions"].add_metric(values, row[1])
            f["oldest_pending_age_seconds"].add_metric(values, row[2])
            f["dead_letters"].add_metric(values, row[3])
            f["target_down_seconds"].add_metric(values, row[4])
            f["consecutive_failures"].add_metric(values, row[5])

        for label, s in sorted(series, key=_label_order):
            values = [] if label is None else [label]
            outcomes = dict(s.attempts)
            for outcome in OUTCOMES:
                f["attempts"].add_metric([*values, outcome], outcomes[outcome])
            f["delivered_events"].add_metric(values, s.delivered_events)
            f["expired_events"].add_metric(values, s.expired_events)
            f["dead_lettered_transactions"].add_metric(values, s.dead_transactions)
            f["dead_lettered_events"].add_metric(values, s.dead_events)
            cumulative = []
            total = 0
            for le, count in zip(self._les, list(s.buckets), strict=True):
                total += count
                cumulative.append((le, float(total)))
            f["transaction_latency_seconds"].add_metric(values, cumulative, s.latency_sum)

        for target_state, n in counts.items():
            f["targets"].add_metric([target_state.value], n)
        if "other_targets" in f:
            f["other_targets"].add_metric([], n_other)
        refreshed_at = self._refreshed_at
        if refreshed_at is not None:
            f["status_age_seconds"].add_metric([], max(0.0, now - refreshed_at))
        if self._refresh_duration is not None:
            f["status_refresh_duration_seconds"].add_metric([], self._refresh_duration)
        f["status_refresh_errors"].add_metric([], self._refresh_errors)
        return iter(f.values())

    def _families(self) -> dict[str, Any]:
        """The metric families, by name without the namespace, in the order of exposition."""
        by_target = self.labels == "targets"
        t = ["target"] if by_target else []
        specs: list[tuple[Any, str, str, list[str]]] = [
            (GaugeMetricFamily, "backlog_events", "Events stored and not yet delivered.", t),
            (
                GaugeMetricFamily,
                "backlog_transactions",
                "Transactions formed and not yet delivered.",
                t,
            ),
            (
                GaugeMetricFamily,
                "oldest_pending_age_seconds",
                "Age of the oldest pending event at the last status refresh (0 for none).",
                t,
            ),
            (GaugeMetricFamily, "dead_letters", "Dead-lettered transactions, not replayed.", t),
        ]
        if by_target:
            specs.append(
                (
                    GaugeMetricFamily,
                    "target_state",
                    "The target's state: 0 UP, 1 DOWN, 2 BLOCKED, 3 DISABLED.",
                    t,
                )
            )
        specs += [
            (
                GaugeMetricFamily,
                "target_down_seconds",
                "Seconds since the target's current run of failures began (0 for none).",
                t,
            ),
            (
                GaugeMetricFamily,
                "consecutive_failures",
                "Failed attempts since the target's last success.",
                t,
            ),
            (
                CounterMetricFamily,
                "attempts",
                "Attempts to send a transaction, by outcome: delivered, or the failure class.",
                [*t, "outcome"],
            ),
            (
                CounterMetricFamily,
                "delivered_events",
                "Events in transactions delivered (or accepted, their confirmation to come).",
                t,
            ),
            (
                CounterMetricFamily,
                "expired_events",
                "Events that passed their deadline before they were sent.",
                t,
            ),
            (
                CounterMetricFamily,
                "dead_lettered_transactions",
                "Transactions moved to the dead letters.",
                t,
            ),
            (
                CounterMetricFamily,
                "dead_lettered_events",
                "Events in transactions moved to the dead letters.",
                t,
            ),
            (
                HistogramMetricFamily,
                "transaction_latency_seconds",
                "Seconds from the submit of a delivered transaction's oldest event to its "
                "delivery.",
                t,
            ),
            (GaugeMetricFamily, "targets", "Targets in each state.", ["state"]),
        ]
        if by_target:
            specs.append(
                (
                    GaugeMetricFamily,
                    "other_targets",
                    f'Targets counted under target="{OTHER_TARGET}".',
                    [],
                )
            )
        specs += [
            (
                GaugeMetricFamily,
                "status_age_seconds",
                "Seconds since the last complete status refresh ended (the backlog's age).",
                [],
            ),
            (
                GaugeMetricFamily,
                "status_refresh_duration_seconds",
                "How long the last complete status refresh took.",
                [],
            ),
            (CounterMetricFamily, "status_refresh_errors", "Status refreshes that failed.", []),
        ]
        p = self._prefix
        return {
            name: kind(f"{p}{name}", documentation, labels=labels)
            for kind, name, documentation, labels in specs
        }

    # -- serving -------------------------------------------------------------------------------

    def exposition(self, accept: bytes | str | None = None) -> tuple[bytes, str]:
        """
        The registry's metrics, in the format that an ``Accept`` header asks for.

        The Prometheus text format by default; OpenMetrics when ``accept`` asks for
        ``application/openmetrics-text``. It reads memory only.

        Args:
            accept: The request's ``Accept`` header, or None.

        Returns:
            The body, and its content type (for the ``Content-Type`` header).
        """
        if isinstance(accept, bytes):
            accept = accept.decode("latin-1")
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def __repr__(self) -> str:
        return (
            f"<PrometheusMetrics labels={self.labels!r} namespace={self.namespace!r} "
            f"targets={len(self._targets)}>"
        )


class MetricsResource(Resource):
    """
    A twisted.web resource that serves a :class:`PrometheusMetrics`' registry (``GET``).

    For an application that wants to serve the metrics alone, on a port of their own::

        from twisted.web.server import Site

        reactor.listenTCP(9108, Site(MetricsResource(metrics)), interface="127.0.0.1")

    It asks for no token: listen on an interface that only the scraper reaches, or put it
    behind something that checks one. The admin resource serves the same metrics at
    ``/metrics``, behind its bearer token.

    Args:
        metrics: The metrics to serve.
    """

    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")

    def __init__(self, metrics: PrometheusMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render(self, request: Request) -> bytes:
        """``GET`` (and ``HEAD``) serve the metrics; another method is answered 405."""
        if request.method not in self.allowedMethods:
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(self.allowedMethods))
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"405 Method Not Allowed: GET the metrics\n"
        return self.render_GET(request)

    def render_GET(self, request: Request) -> bytes:
        """The exposition, in the format the request's ``Accept`` header asks for."""
        body, content_type = self.metrics.exposition(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


def _label_order(item: tuple[str | None, Any]) -> tuple[bool, str]:
    """Label values in order, ``_other`` last."""
    label = item[0]
    return (label == OTHER_TARGET, label or "")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be an int from {low} to {high}, not {value!r}")


def _check_buckets(buckets: Any) -> list[float]:
    try:
        bounds = [float(b) for b in buckets if not isinstance(b, bool)]
        valid = len(bounds) == len(buckets)
    except (TypeError, ValueError):
        valid = False
    if (
        not valid
        or not bounds
        or any(not math.isfinite(b) or b <= 0 for b in bounds)
        or any(a >= b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    ):
        raise ConfigurationError(
            f"buckets must be increasing finite numbers of seconds, more than 0 (+Inf is "
            f"added), not {buckets!r}"
        )
    return bounds


__all__ = [
    "DEFAULT_BUCKETS",
    "OTHER_TARGET",
    "OUTCOMES",
    "STATE_CODES",
    "MetricsResource",
    "PrometheusMetrics",
]
