"""
The Scheduler: relayer's public entry point.

It wires the :class:`~relayer.grouper.EventGrouper`, the
:class:`~relayer.controller.TransactionController` and the per-target
:class:`~relayer.recoverer.Recoverer` together over a store and a transport, all passed in.
"""

from __future__ import annotations

import json
import math
import random as _random
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayer import _encoding, plugins
from relayer import _logevents as ev
from relayer._slots import SendSlots, SendSlotsStatus
from relayer.config import Retention, TargetConfig, _check_target_id
from relayer.controller import (
    DEFAULT_RECOVERY_SPREAD,
    LOOP_RETRY_INITIAL,
    LOOP_RETRY_MAX,
    TargetRuntime,
    TransactionController,
    default_policy,
)
from relayer.errors import (
    Backpressure,
    ConfigurationError,
    DuplicateTarget,
    InvalidEvent,
    InvalidTarget,
    NotRunning,
    StoreError,
    UnknownTarget,
)
from relayer.event import Event, check_event_id, deadline_of
from relayer.formats import MATRIX, IWireFormat, claim_limits
from relayer.grouper import DEFAULT_STORE_RETRY_TIMEOUT, EventGrouper
from relayer.lease import LeaseManager, LeaseSettings
from relayer.observer import IDeliveryObserver, Observers
from relayer.policy import IRetryPolicy
from relayer.reconciler import DEFAULT_SWEEP_INTERVAL, Reconciler
from relayer.store._retention import RetentionRule
from relayer.store.base import (
    Command,
    DeadLetter,
    DeliveryState,
    EventCounts,
    EventStatus,
    ILeaseStore,
    IStore,
    PurgeReport,
    QueueCounts,
    TargetEventsPage,
    TargetState,
)
from relayer.store.sql import parse_cursor
from relayer.transport.base import IRequestTransport, ITransport

#: How long :meth:`Scheduler.stop` lets sends in flight finish before it abandons them.
DEFAULT_STOP_TIMEOUT = 10.0
#: How many submitted events may wait to be stored, by default, before submits are refused.
DEFAULT_MAX_WAITING_EVENTS = 100_000
#: How many sends may be in flight at once across all targets, by default. Each open request
#: holds a connection (a file descriptor); a process sends a few thousand requests a second at
#: most, so at receivers' usual response times of 10 to 100 ms far fewer than this are open at
#: once, and the bound only matters when many receivers are slow, or many targets retry at once.
DEFAULT_MAX_SENDS_IN_FLIGHT = 1000
#: The counts of consecutive failures at which observers are told, by default.
DEFAULT_FAILURE_THRESHOLDS = (10, 100)
#: How many pending commands are read from the store at a time.
_COMMAND_PAGE = 500


#: What iterates or unpacks, but not as pairs: characters, or a mapping's or a set's keys.
_NOT_PAIRS = (str, bytes, bytearray, Mapping, Set)

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _receiver_key(config: TargetConfig) -> tuple[str, str, int | None, str, str]:
    """
    What identifies the receiver a target sends to: its normalised base URL, and its token.

    The scheme and host are compared without case, a default port equals no port, and a
    trailing slash is ignored; the path is compared as written.
    """
    parts = urlsplit(config.base_url)
    scheme = parts.scheme.lower()
    port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(scheme)
    host = (parts.hostname or "").lower().rstrip(".")
    return (scheme, host, port, parts.path.rstrip("/"), config.token)


@attrs.frozen
class TargetStatus:
    """
    A snapshot of one target, as :meth:`Scheduler.status` reports it.

    Attributes:
        target_id: The target's id.
        state: UP, DOWN, BLOCKED or DISABLED.
        registered: False for a target that has data in the store but is not registered with
            this scheduler (its events wait until it is registered again).
        in_flight: Whether a transaction is being sent to it now.
        pending_events: Events stored and not yet delivered.
        pending_transactions: Transactions formed and not yet delivered.
        oldest_pending_age: Seconds since the oldest pending event was submitted, or None.
        last_success_at: When a transaction was last delivered (clock seconds), or None.
        consecutive_failures: Failed attempts since the last success.
        next_retry_at: When a DOWN target is next retried (clock seconds), or None.
        last_error: A short description of the last failure, or None.
        dead_letters: Transactions dead-lettered and not replayed.
        down_since: When the target's current run of failures began (clock seconds), or None
            while it is UP.
    """

    target_id: str
    state: TargetState
    registered: bool
    in_flight: bool
    pending_events: int
    pending_transactions: int
    oldest_pending_age: float | None
    last_success_at: float | None
    consecutive_failures: int
    next_retry_at: float | None
    last_error: str | None
    dead_letters: int
    down_since: float | None = None


class _Lifecycle:
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Scheduler:
    """
    Delivers events to targets: durably, in order per target, each target independently.

    Args:
        clock: The reactor, or any :class:`~twisted.internet.interfaces.IReactorTime` such as
            :class:`twisted.internet.task.Clock` in tests. The scheduler never imports the
            global reactor.
        store: Where events, transactions and delivery state are kept, for example
            :meth:`relayer.SQLiteStore.open_path`.
        transport: How transactions are sent, for example :class:`relayer.HTTPTransport`.
        targets: The targets to deliver to; more can be added with :meth:`add_target`.
        random: The jitter source for backoff, returning floats in ``[0, 1)``. Tests pass a
            fixed function to make the retry schedule exact.
        stop_timeout: How long :meth:`stop` waits for sends in flight before abandoning them
            (they stay pending, and are resent unchanged after a restart).
        store_retry_timeout: How long storing submitted events is retried while the store is
            unavailable (locked, full, disconnected) before those submits fail. Delivery work
            that fails on the store is retried with backoff for as long as it takes.
        leases: Share the store's targets with other processes (PostgreSQL, or SQLite
            processes on one machine): each target is delivered by the process that holds its
            lease. See :class:`relayer.lease.LeaseSettings`.
        recovery_spread: DOWN targets whose retry is overdue when the scheduler takes them in
            charge (at start-up, or when it takes over another process's targets) are retried
            at random points of this many seconds (at most each target's maximum backoff),
            rather than all at once. Default 30.
        sweep_interval: How often the scheduler sweeps the store for targets with pending work
            that nothing is delivering (a missed notification, a registration that failed on
            the store), in seconds. Default 30. Sweeps of several processes are staggered.
        max_waiting_events: How many submitted events may wait to be stored (while the store
            is slow or unavailable) before :meth:`submit` and :meth:`submit_many` refuse more
            at once with :class:`relayer.errors.Backpressure`, rather than hold them in
            memory. An int >= 1; default 100 000. A single ``submit_many`` larger than this
            is accepted when nothing else waits.
        retention: How long final events are kept, and whether they are archived; with it,
            the scheduler runs retention every ``retention.interval`` seconds (see
            :class:`relayer.Retention` and :meth:`purge`). None (the default) keeps every
            event.
        policies: Retry policies by name, for targets whose ``retry_policy`` names one; a name
            not found here is looked up among the plugins' (see :doc:`plugins`).
        observers: Objects that provide :class:`relayer.IDeliveryObserver`, told of
            deliveries, failures and changes of a target's state. Their failures never hold
            delivery up (see :mod:`relayer.observer`).
        failure_thresholds: Counts of consecutive failures at which the observers'
            ``failures_crossed`` is called, each time a target's count reaches one. Default 10
            and 100.
        formats: Wire formats by name, for targets whose :attr:`~relayer.TargetConfig.format`
            names one of them; the built-in ``"matrix"`` and ``"standard-webhooks"`` need not
            be given (see :mod:`relayer.formats`). A target of a format other than Matrix
            needs a transport that provides :class:`relayer.transport.IRequestTransport`, as
            :class:`relayer.HTTPTransport` does.
        max_sends_in_flight: How many sends may be in flight at once, across all targets (each
            target has at most one). A send that finds every slot taken waits for one: first
            attempts of targets that are UP go before retries (a transaction sent again, or any
            send to a target that is not UP or had an attempt fail in the last minute),
            retries hold at most half of the slots, and a
            waiting retry is passed over by at most 4 first attempts in a row. Waiting takes
            nothing from a send's ``request_timeout``, which starts when it has its slot, and
            does not make a target DOWN. An int >= 1, or None for no bound (every target with
            work sends at once, and retries are not held back); default 1000. See
            :ref:`sizing-sends-in-flight`.

    Example::

        scheduler = Scheduler(reactor, SQLiteStore.open_path(reactor, "relayer.db"),
                              HTTPTransport(reactor),
                              targets=[TargetConfig("bridge", "https://bridge.example", token)])
        await scheduler.start()
        await scheduler.submit("bridge", {"type": "m.room.message", "content": {...}})
    """

    log = Logger(namespace="relayer.scheduler")

    def __init__(
        self,
        clock: IReactorTime,
        store: IStore,
        transport: ITransport,
        targets: Iterable[TargetConfig] = (),
        *,
        random: Callable[[], float] = _random.random,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        store_retry_timeout: float = DEFAULT_STORE_RETRY_TIMEOUT,
        leases: LeaseSettings | None = None,
        recovery_spread: float = DEFAULT_RECOVERY_SPREAD,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
        max_waiting_events: int = DEFAULT_MAX_WAITING_EVENTS,
        retention: Retention | None = None,
        policies: Mapping[str, IRetryPolicy] | None = None,
        observers: Iterable[IDeliveryObserver] = (),
        failure_thresholds: Iterable[int] = DEFAULT_FAILURE_THRESHOLDS,
        formats: Mapping[str, IWireFormat] | None = None,
        max_sends_in_flight: int | None = DEFAULT_MAX_SENDS_IN_FLIGHT,
    ) -> None:
        _check_seconds("stop_timeout", stop_timeout)
        _check_seconds("store_retry_timeout", store_retry_timeout)
        _check_seconds("recovery_spread", recovery_spread)
        _check_seconds("sweep_interval", sweep_interval, positive=True)
        if (
            isinstance(max_waiting_events, bool)
            or not isinstance(max_waiting_events, int)
            or max_waiting_events < 1
        ):
            raise ConfigurationError(
                f"max_waiting_events must be an int >= 1, not {max_waiting_events!r}"
            )
        self._max_waiting = max_waiting_events
        if max_sends_in_flight is not None and (
            isinstance(max_sends_in_flight, bool)
            or not isinstance(max_sends_in_flight, int)
            or max_sends_in_flight < 1
        ):
            raise ConfigurationError(
                f"max_sends_in_flight must be an int >= 1, or None for no limit, not "
                f"{max_sends_in_flight!r}"
            )
        self._slots = SendSlots(max_sends_in_flight)
        if not callable(random):
            raise ConfigurationError("random must be a callable returning floats in [0, 1)")
        if leases is not None and not isinstance(leases, LeaseSettings):
            raise ConfigurationError(f"leases must be LeaseSettings, not {type(leases).__name__}")
        if leases is not None and not ILeaseStore.providedBy(store):
            raise ConfigurationError("leases need a store that supports them (ILeaseStore)")
        if retention is not None and not isinstance(retention, Retention):
            raise ConfigurationError(
                f"retention must be a Retention or None, not {type(retention).__name__}"
            )
        self._retention = retention
        self._policies = _check_policies(policies)
        thresholds = _check_thresholds(failure_thresholds)
        self._observers = Observers(observers)
        self._formats = _check_formats(formats)
        #: Each registered target's wire format.
        self._wire: dict[str, IWireFormat] = {}
        self._transport = transport
        self._clock = clock
        self._store = store
        self._stop_timeout = float(stop_timeout)
        self._configs: dict[str, TargetConfig] = {}
        #: Which target sends to each receiver (normalised base URL and token).
        self._receivers: dict[tuple[str, str, int | None, str, str], str] = {}
        self._lifecycle = _Lifecycle.NEW
        self._leases: LeaseManager | None = None
        if leases is not None:
            self._leases = LeaseManager(
                clock,
                store,  # type: ignore[arg-type]
                leases,
                targets=lambda: list(self._configs),
                acquired=self._leases_acquired,
                lost=self._leases_lost,
                shed=lambda ids: self._controller.remove(ids),
                renewed=lambda: self._controller.resume_paused(),
            )
        self._unlisten: Callable[[], None] | None = None
        #: The run applying operators' commands, if one is under way; and whether another
        #: should follow it (a command was announced meanwhile).
        self._command_run: Deferred[None] | None = None
        self._commands_again = False
        self._controller = TransactionController(
            clock,
            store,
            transport,
            random,
            may_send=self._may_send if self._leases is not None else None,
            recovery_spread=float(recovery_spread),
            policy_for=self._policy_for,
            observers=self._observers,
            failure_thresholds=thresholds,
            slots=self._slots,
        )
        listen_expired = getattr(store, "set_expired_listener", None)
        if self._observers and listen_expired is not None:
            listen_expired(self._observers.expired)
        # The sweeps are staggered by a source of their own, seeded by the node id, so that
        # processes sharing a database sweep at different times while each one's schedule (and
        # the backoff jitter drawn from ``random``) stays reproducible.
        stagger = _random.Random(self._leases.node_id if self._leases is not None else "relayer")
        self._reconciler = Reconciler(clock, float(sweep_interval), stagger.random, self._sweep)
        self._retention_runs: Reconciler | None = None
        if retention is not None and retention.interval is not None:
            self._retention_runs = Reconciler(
                clock,
                retention.interval,
                stagger.random,
                self._retention_run,
                "A retention run",
                ev.RETENTION_FAILED,
            )
        #: Retries of registrations and takeovers that failed on the store.
        self._retries: set[IDelayedCall] = set()
        #: Targets taken over from a process whose lease expired: no send before this time.
        self._fences: dict[str, float] = {}
        #: stop() calls waiting for a start in progress to finish.
        self._start_waiters: list[Deferred[None]] = []
        self._grouper = EventGrouper(
            clock,
            store,
            self._limits,
            self._controller.notify,
            retry_timeout=float(store_retry_timeout),
            random=random,
            first_claims=self._controller,
        )
        self._registering: set[Deferred[Any]] = set()
        for config in targets:
            self.add_target(config)

    # -- leases ---------------------------------------------------------------------------------

    @property
    def node_id(self) -> str | None:
        """This process's node id when it shares the database with others; else None."""
        return self._leases.node_id if self._leases is not None else None

    @property
    def owned_targets(self) -> frozenset[str]:
        """The ids of the targets this process delivers to: all, or those it holds leases on."""
        if self._leases is None:
            return frozenset(self._controller.targets)
        return frozenset(t for t in self._leases.owned if self._leases.owns(t))

    @property
    def sends(self) -> SendSlotsStatus:
        """
        The sends in flight now across all targets, and those waiting for a slot (see
        ``max_sends_in_flight``). Reading it is cheap: it counts nothing.
        """
        return self._slots.status()

    def _delivers_to(self, target_id: str) -> bool:
        """
        Whether this process delivers to the target now: it has it in charge and, with
        leases, still holds its lease (one that ran out, or is being given up, may have
        another owner already).
        """
        if target_id not in self._controller.targets:
            return False
        return self._leases is None or self._leases.owns(target_id)

    def _may_send(self, t: TargetRuntime) -> bool:
        assert self._leases is not None
        leases = self._leases
        return leases.owns(t.config.target_id) and leases.remaining() > t.config.request_timeout

    def _leases_acquired(self, target_ids: list[str], taken_over: Mapping[str, float]) -> None:
        # A target whose lease expired under another process (rather than being released)
        # may still have a request of that process open: the first send waits until that
        # request has passed its deadline too (its lease's expiry plus its request timeout).
        for t, expiry in taken_over.items():
            if t in self._configs:
                self._fences[t] = expiry + self._configs[t].request_timeout
        self._until_done(f"Taking over {len(target_ids)} targets", lambda: self._take(target_ids))

    async def _take(self, target_ids: Sequence[str]) -> None:
        """Take charge of the given targets that this process should deliver to and does not."""
        wanted = [t for t in target_ids if self._should_deliver(t)]
        if not wanted:
            return
        records = await self._store.load_targets(wanted)
        unknown = []
        taken = False
        for target_id in wanted:
            record = records.get(target_id)
            if record is None:
                # Its lease was taken before its registration had committed (the lease round
                # runs on a connection of its own): try again once it has.
                unknown.append(target_id)
                continue
            if not self._should_deliver(target_id):
                continue
            fence = self._fences.pop(target_id, None)
            self._controller.add(
                self._configs[target_id], record, fence, wire=self._wire[target_id]
            )
            # It may have events that arrived while another process owned it.
            self._controller.notify([target_id])
            taken = True
        if taken:
            # And commands recorded for it meanwhile.
            self._commands_announced()
        if unknown:
            raise StoreError(f"{len(unknown)} targets are not registered in the store yet")

    def _should_deliver(self, target_id: str) -> bool:
        """Whether this process should deliver to the target and has not taken charge of it."""
        if self._lifecycle != _Lifecycle.RUNNING and self._lifecycle != _Lifecycle.STARTING:
            return False
        if target_id not in self._configs or target_id in self._controller.targets:
            return False
        return self._leases is None or self._leases.owns(target_id)

    def _until_done(self, what: str, work: Callable[[], Awaitable[None]], attempt: int = 0) -> None:
        """
        Run ``work`` until it succeeds, with backoff between attempts, while running.

        Registering targets and taking over leases must not be given up on a store error,
        or the targets' events would wait for a restart while submits still succeed.
        """
        if self._lifecycle not in (_Lifecycle.RUNNING, _Lifecycle.STARTING):
            return

        async def run() -> None:
            await work()

        def failed(failure: Failure) -> None:
            if self._lifecycle not in (_Lifecycle.RUNNING, _Lifecycle.STARTING):
                return
            delay = min(LOOP_RETRY_INITIAL * 2 ** min(attempt, 16), LOOP_RETRY_MAX)
            self.log.warn(
                "{what} failed ({error}); retrying in {delay:.1f}s",
                relayer_event=ev.SCHEDULER_RETRYING,
                what=what,
                error=failure.getErrorMessage(),
                delay=delay,
            )

            def again() -> None:
                self._retries.discard(call)
                self._until_done(what, work, attempt + 1)

            call = self._clock.callLater(delay, again)
            self._retries.add(call)

        self._track(Deferred.fromCoroutine(run())).addErrback(failed)

    def _track(self, d: Deferred[None]) -> Deferred[None]:
        """Keep a background task in view, so that stop() waits for it."""
        self._registering.add(d)

        def done(result: object) -> object:
            self._registering.discard(d)
            return result

        return d.addBoth(done)

    def _leases_lost(self, target_ids: list[str]) -> None:
        for target_id in target_ids:
            self._fences.pop(target_id, None)
        self._controller.remove(target_ids, cancel=True)

    def _sweep(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._sweep_once())

    async def _sweep_once(self) -> None:
        """
        Resume every target that should be delivering and is not.

        - targets this process should deliver to but has not taken in charge (a registration
          or takeover that failed on the store, and whose retry has not come yet);
        - UP targets with nothing under way that have pending work in the store (events
          stored by another process whose notification was missed);
        - DOWN targets with no retry scheduled;
        - targets awaiting a confirmation, which another process may have recorded.
        """
        if self._lifecycle != _Lifecycle.RUNNING:
            return
        candidates = self._leases.owned if self._leases is not None else self._configs
        missing = [t for t in candidates if self._should_deliver(t)]
        if missing:
            # Registered again (a no-op for those the store has), then taken in charge.
            await self._register([self._configs[t] for t in missing])
        idle = self._controller.idle_targets()
        if idle:
            pending = await self._store.pending_targets(idle)
            if pending and self._lifecycle == _Lifecycle.RUNNING:
                still_idle = set(self._controller.idle_targets())
                stranded = sorted(t for t in pending if t in still_idle)
                if stranded:
                    self.log.info(
                        "A sweep found pending work for {targets} idle targets; delivering it",
                        relayer_event=ev.SWEEP_STRANDED,
                        targets=len(stranded),
                    )
                    self._controller.notify(stranded)
        self._controller.revive_stalled()
        self._controller.recheck_awaiting()
        await self._apply_commands()

    def _commands_announced(self) -> None:
        """Apply the pending commands now, or once the run under way has finished."""
        if self._lifecycle != _Lifecycle.RUNNING:
            return
        if self._command_run is not None:
            self._commands_again = True
            return

        def done(result: object) -> None:
            self._command_run = None
            if isinstance(result, Failure):
                self.log.failure(
                    "Applying operators' commands failed", result, relayer_event=ev.COMMAND_FAILED
                )
            if self._commands_again:
                self._commands_again = False
                self._commands_announced()

        run = Deferred.fromCoroutine(self._apply_commands())
        if not run.called:
            self._command_run = run
        run.addBoth(done)

    async def _apply_commands(self) -> None:
        """
        Apply the operators' commands recorded for the targets this process delivers to, and
        mark them done; those for other targets wait for their owner. Each is applied at least
        once (a command applied as its target changes hands may be applied by both owners:
        a wake is harmless twice).
        """
        after: int | None = None
        while self._lifecycle == _Lifecycle.RUNNING:
            page = await self._store.pending_commands(_COMMAND_PAGE, after)
            for command in page:
                if self._lifecycle != _Lifecycle.RUNNING:
                    return
                target_id = command.target_id
                if not self._delivers_to(target_id):
                    continue
                if command.action == "wake":
                    self._controller.wake(target_id)
                    result = "woken"
                else:
                    result = f"unknown action {command.action!r}: ignored"
                await self._store.finish_command(
                    command.command_id, self._clock.seconds(), self.node_id or "local", result
                )
                self.log.info(
                    "Applied command {command} ({action}) for target {target}: {result}",
                    relayer_event=ev.COMMAND_APPLIED,
                    command=command.command_id,
                    action=command.action,
                    target=target_id,
                    result=result,
                )
            if len(page) < _COMMAND_PAGE:
                return
            after = page[-1].command_id

    def _notified(self, target_ids: list[str] | None) -> None:
        if self._lifecycle != _Lifecycle.RUNNING:
            return
        self._controller.notify(
            target_ids if target_ids is not None else list(self._controller.targets)
        )

    # -- targets --------------------------------------------------------------------------------

    def add_target(self, config: TargetConfig) -> None:
        """
        Register a target.

        Targets registered before :meth:`start` are resumed by it; a target registered while the
        scheduler runs is resumed at once (its stored backlog, if any, is delivered).

        Raises:
            InvalidTarget: ``config`` is not a :class:`TargetConfig`, its ``format`` names no
                known wire format, or it lacks what its format needs (secrets, a token).
            ConfigurationError: Its format needs a transport that provides
                :class:`relayer.transport.IRequestTransport`, and the scheduler's does not.
            DuplicateTarget: A target with the same id is registered already, or one with the
                same base URL and token: one target is one registration with its receiver,
                since the receiver tells transactions apart by id alone.
            InvalidTarget: The target names a retry policy that neither ``policies`` nor a
                plugin provides.
        """
        if not isinstance(config, TargetConfig):
            raise InvalidTarget(f"add_target takes a TargetConfig, not {type(config).__name__}")
        if config.target_id in self._configs:
            raise DuplicateTarget(f"target {config.target_id!r} is registered already")
        wire = self._wire_format(config)
        receiver = _receiver_key(config)
        other = self._receivers.get(receiver)
        if other is not None:
            # The token is never shown; the URL holds no secret (no query, no credentials).
            raise DuplicateTarget(
                f"target {config.target_id!r} has the same base URL "
                f"({config.base_url!r}) and token as target {other!r}: a receiver "
                "tells transactions apart by id alone, and each target numbers its own, so "
                "the receiver would drop events as repeats. One target is one "
                "registration: send every event for it through one target"
            )
        self._policy_for(config)  # an unknown policy name is refused here
        self._receivers[receiver] = config.target_id
        self._configs[config.target_id] = config
        self._wire[config.target_id] = wire
        if self._lifecycle == _Lifecycle.RUNNING:
            self._until_done(
                f"Registering target {config.target_id!r}", lambda: self._register([config])
            )

    @property
    def targets(self) -> dict[str, TargetConfig]:
        """The registered targets' configurations, by id."""
        return dict(self._configs)

    def _policy_for(self, config: TargetConfig) -> IRetryPolicy:
        """The target's retry policy: its own object, a named one, or its default."""
        name = config.retry_policy
        if not isinstance(name, str):
            return default_policy(config)
        found = self._policies.get(name)
        if found is not None:
            return found
        return plugins.retry_policy(name)

    def _wire_format(self, config: TargetConfig) -> IWireFormat:
        """The target's wire format, once it is checked that the target can use it."""
        wire = plugins.wire_format(config.format, self._formats)
        # A plugin's format is checked here; the scheduler's own formats were at construction.
        _check_max_events(f"the wire format {config.format!r}", wire)
        wire.check(config)
        if wire is not MATRIX and not IRequestTransport.providedBy(self._transport):
            raise ConfigurationError(
                f"target {config.target_id!r} uses the wire format {config.format!r}, which "
                f"needs a transport that provides IRequestTransport; {self._transport!r} "
                "does not"
            )
        return wire

    def _limits(self, target_id: str) -> tuple[int, int]:
        return claim_limits(self._configs[target_id], self._wire[target_id])

    async def _register(self, configs: Sequence[TargetConfig]) -> None:
        records = await self._store.register_targets([c.target_id for c in configs])
        if self._leases is not None:
            # Which of them this process delivers to is up to its leases; those whose lease it
            # already holds are taken in charge now.
            await self._take([c.target_id for c in configs])
            return
        for config in configs:
            if not self._should_deliver(config.target_id):
                continue
            self._controller.add(
                config, records[config.target_id], wire=self._wire[config.target_id]
            )
        if self._lifecycle == _Lifecycle.RUNNING:
            # Events may have been stored for these targets while they were registering.
            self._controller.notify(c.target_id for c in configs)
        for target_id, record in records.items():
            if record.has_pending and target_id not in self._configs:
                self.log.warn(
                    "The store holds undelivered events for target {target}, which is not "
                    "registered; they wait until it is",
                    relayer_event=ev.TARGET_UNREGISTERED,
                    target=target_id,
                )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Open the store and resume every target's pending work.

        UP targets with pending events start draining at once; DOWN targets get their
        Recoverer, with the backoff state stored before the restart. Nothing waits for new
        traffic.

        Returns:
            A Deferred that fires once the scheduler runs and accepts submits.

        Raises:
            NotRunning: The scheduler was started before.
        """
        if self._lifecycle != _Lifecycle.NEW:
            raise NotRunning(f"a scheduler can be started once; this one is {self._lifecycle}")
        self._lifecycle = _Lifecycle.STARTING

        async def start() -> None:
            try:
                await self._store.open()
                if self._leases is not None:
                    self._leases.settings.check(c.request_timeout for c in self._configs.values())
                # Alone on the database without leases; shared only among those with leases.
                await self._store.hold_process_lock(self._leases is not None)
                await self._register(list(self._configs.values()))
                if self._leases is not None:
                    self._store.lease_owner = self._leases.node_id  # type: ignore[attr-defined]
                    await self._leases.start()
                listen = getattr(self._store, "listen", None)
                # A fake clock has no threads to hear notifications on: tests tell it. Without
                # leases, other processes store no events, but operators' commands and
                # replays still come from them.
                if listen is not None and IReactorFromThreads.providedBy(self._clock):
                    self._unlisten = listen(self._notified, self._commands_announced)
            except BaseException:
                await self._abort_start()
                raise
            self._lifecycle = _Lifecycle.RUNNING
            # Commands recorded while no process delivered to their targets.
            self._commands_announced()
            self._reconciler.start()
            if self._retention_runs is not None:
                self._retention_runs.start()
            self.log.info(
                "relayer scheduler started with {targets} targets",
                relayer_event=ev.SCHEDULER_STARTED,
                targets=len(self._configs),
            )

        def started(result: object) -> object:
            # A stop() called while starting goes on from here.
            waiters, self._start_waiters = self._start_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return result

        return Deferred.fromCoroutine(start()).addBoth(started)

    async def _abort_start(self) -> None:
        """Undo what a start that failed had begun: no timer, loop or lease is left behind."""
        self._lifecycle = _Lifecycle.STOPPED
        self._cancel_retries()
        self._controller.stop_timers()
        try:
            await self._controller.remove(list(self._controller.targets), cancel=True)
            if self._unlisten is not None:
                self._unlisten()
                self._unlisten = None
            if self._leases is not None:
                try:
                    await self._leases.stop()
                except Exception:
                    # The leases expire by themselves.
                    self.log.failure(
                        "Releasing the leases after a failed start failed",
                        relayer_event=ev.LEASE_RELEASE_FAILED,
                    )
        finally:
            await self._store.close()

    def _cancel_retries(self) -> None:
        retries, self._retries = self._retries, set()
        for call in retries:
            if call.active():
                call.cancel()

    def stop(self) -> Deferred[None]:
        """
        Stop gracefully.

        New submits are refused at once. Events already submitted are stored (their Deferreds
        fire). Sends in flight may finish for up to ``stop_timeout`` seconds; after that they are
        abandoned and stay pending, to be resent unchanged after a restart. Scheduled retries are
        cancelled and the store is closed.
        """
        if self._lifecycle in (_Lifecycle.STOPPING, _Lifecycle.STOPPED):
            raise NotRunning(f"the scheduler is {self._lifecycle} already")
        if self._lifecycle == _Lifecycle.NEW:
            self._lifecycle = _Lifecycle.STOPPED
            return Deferred.fromCoroutine(_nothing())
        if self._lifecycle == _Lifecycle.STARTING:
            # Stopping a scheduler that is still starting: let the start finish (or fail), so
            # that it cannot run again behind the stop, then stop.
            started: Deferred[None] = Deferred()
            self._start_waiters.append(started)

            async def stop_once_started() -> None:
                await started
                if self._lifecycle == _Lifecycle.RUNNING:
                    await self.stop()

            return Deferred.fromCoroutine(stop_once_started())
        self._lifecycle = _Lifecycle.STOPPING

        async def stop() -> None:
            await self._grouper.flushed()
            self._cancel_retries()
            await self._reconciler.stop()
            if self._retention_runs is not None:
                await self._retention_runs.stop()
            self._controller.stop_timers()
            loops = self._controller.running_loops() + list(self._registering)
            if self._command_run is not None:
                loops.append(self._command_run)
            if loops:
                timer = self._clock.callLater(self._stop_timeout, self._controller.cancel_sends)
                try:
                    await DeferredList(loops, consumeErrors=True)
                finally:
                    if timer.active():
                        timer.cancel()
            if self._unlisten is not None:
                self._unlisten()
            if self._leases is not None:
                await self._leases.stop()
            await self._store.close()
            self._lifecycle = _Lifecycle.STOPPED
            self.log.info("relayer scheduler stopped", relayer_event=ev.SCHEDULER_STOPPED)

        return Deferred.fromCoroutine(stop())

    @property
    def running(self) -> bool:
        """Whether the scheduler is started and not stopping."""
        return self._lifecycle == _Lifecycle.RUNNING

    def _check_running(self) -> None:
        if self._lifecycle != _Lifecycle.RUNNING:
            hint = {
                _Lifecycle.NEW: "call start() and wait for it first",
                _Lifecycle.STARTING: "wait for start() to finish",
            }.get(self._lifecycle, "it no longer accepts events")
            raise NotRunning(f"the scheduler is {self._lifecycle}: {hint}")

    def _config(self, target_id: str) -> TargetConfig:
        try:
            return self._configs[target_id]
        except (KeyError, TypeError):
            raise UnknownTarget(f"no target {target_id!r} is registered") from None

    # -- submitting -----------------------------------------------------------------------------

    def submit(
        self,
        targets: str | Sequence[str],
        event: Any,
        *,
        event_id: str | None = None,
        expires_at: float | None = None,
        ttl: float | None = None,
    ) -> Deferred[str]:
        """
        Submit one event for delivery to one target, or to several.

        The event is encoded as JSON at once, and stored before the returned Deferred fires.
        From then on it is delivered to each of its targets, in submit order there, even
        across crashes and restarts. An event for several targets is stored once.

        Args:
            targets: A registered target's id, or a list of them (duplicates are ignored).
            event: A JSON object, as Matrix events are: a dict whose keys are strings at every
                depth, with integers within +-(2**53 - 1), Matrix's canonical JSON range. Or
                the JSON of one, as ``bytes`` (or a ``bytearray`` or ``memoryview``, copied):
                UTF-8, compact (without a raw newline byte), checked and sent as given, byte
                for byte. Or an :class:`relayer.Event` that carries either with its options.
            event_id: Your id for the event (a Matrix event id, an order id). If the store
                holds an event with this id already, nothing is stored, and the Deferred fires
                with the same id: a repeated submit is harmless. None: relayer gives it an id.
            expires_at: A deadline, in clock seconds: the event is never sent at or after it.
            ttl: Or a time to live, in seconds from now. Without either, a target's
                ``default_ttl`` applies there.

        Returns:
            A Deferred that fires with the event's id once the event is durably stored.

        Raises:
            NotRunning: The scheduler is not started, or is stopping.
            UnknownTarget: A target has no such id.
            InvalidEvent: The event is not a dict, cannot be encoded as JSON, has a key that is
                not a string or an integer out of range (the message says where); bytes that
                are not one JSON object in UTF-8, or that hold a raw newline; the id, deadline
                or targets are not valid.
            EventTooLarge: The encoded event exceeds a target's ``max_bytes``.
            Backpressure: ``max_waiting_events`` submitted events wait to be stored already;
                nothing was stored.
        """
        self._check_running()
        if isinstance(event, Event):
            if event_id is not None or expires_at is not None or ttl is not None:
                raise InvalidEvent("give an Event's options in the Event, not beside it")
            event_id, expires_at, ttl, event = (
                event.event_id,
                event.expires_at,
                event.ttl,
                event.body,
            )
        acc = _Accumulator(self)
        acc.add(targets, event, event_id, expires_at, ttl)
        self._check_room(1)
        stored = acc.store()

        async def first() -> str:
            return (await stored)[0]

        return Deferred.fromCoroutine(first())

    def _check_room(self, count: int) -> None:
        """Refuse ``count`` more events if they would take the unstored ones past the bound."""
        unstored = self._grouper.unstored
        if unstored and unstored + count > self._max_waiting:
            raise Backpressure(
                f"{unstored} submitted events wait to be stored (the store is slow or "
                f"unavailable), and {count} more would exceed max_waiting_events of "
                f"{self._max_waiting}; nothing of this submit was stored: submit again later"
            )

    def submit_many(self, events: Iterable[tuple[str | Sequence[str], Any]]) -> Deferred[list[str]]:
        """
        Submit many events at once, stored together in one database transaction.

        Args:
            events: ``(targets, event)`` pairs, in submit order: ``targets`` is a target id or
                a list of them, and ``event`` a JSON object, its JSON as bytes (as
                :meth:`submit` takes them), or an :class:`relayer.Event` (for an id or a
                deadline of its own).

        Returns:
            A Deferred that fires with the events' ids, in order, once all of them are
            durably stored.

        Raises:
            NotRunning: The scheduler is not started, or is stopping.
            UnknownTarget: A pair names no registered target.
            InvalidEvent: A pair's event is refused as :meth:`submit` refuses it, a pair is not
                a pair, or ``events`` is a string or a mapping (pass a mapping's ``items()``).
            EventTooLarge: A pair's encoded event exceeds its target's ``max_bytes``.
            Backpressure: With these events, more than ``max_waiting_events`` submitted events
                would wait to be stored; none of them was stored.

        If any pair is bad, the exception is raised for the first one and nothing is stored.
        """
        self._check_running()
        if isinstance(events, _NOT_PAIRS):
            # Each would iterate as something else than pairs: characters, or a mapping's keys.
            raise InvalidEvent(
                f"submit_many takes an iterable of (target_id, event) pairs, "
                f"not {type(events).__name__}"
            )
        try:
            pairs = iter(events)
        except TypeError:
            raise InvalidEvent(
                f"submit_many takes an iterable of (target_id, event) pairs, "
                f"not {type(events).__name__}"
            ) from None
        # The common case, a plain event for one target, runs in this loop; anything else goes
        # through the accumulator. This loop runs once for every event.
        acc = _Accumulator(self)
        bodies = acc.bodies
        per_target = acc.per_target
        found: dict[str, tuple[Callable[[int], None], int]] = {}
        encode = _encoding.encode_event
        add_body = bodies.append
        for pair in pairs:
            try:
                if type(pair) is not tuple and isinstance(pair, _NOT_PAIRS):
                    # A two-character string, or a mapping or set of two keys, would unpack.
                    raise TypeError
                target_id, event = pair
            except (TypeError, ValueError):
                raise InvalidEvent(
                    f"submit_many takes (target_id, event) pairs, not {type(pair).__name__}"
                ) from None
            try:
                append, max_bytes = found[target_id]  # type: ignore[index]
            except (KeyError, TypeError):
                if type(target_id) is str and type(event) is not Event:
                    config = self._config(target_id)
                    # The target may have events already, added through the accumulator.
                    queued = per_target.setdefault(target_id, [])
                    append, max_bytes = found[target_id] = (queued.append, config.max_bytes)
                else:
                    if type(event) is Event:
                        acc.add(target_id, event.body, event.event_id, event.expires_at, event.ttl)
                    else:
                        acc.add(target_id, event, None, None, None)
                    continue
            if type(event) is Event:
                acc.add(target_id, event.body, event.event_id, event.expires_at, event.ttl)
                continue
            append(len(bodies))
            add_body(encode(event, max_bytes))
        if not bodies:
            return Deferred.fromCoroutine(_no_ids())
        self._check_room(len(bodies))
        return acc.store()

    # -- confirmations and event status ---------------------------------------------------------

    def confirm(self, target_id: str, txn_id: int) -> Deferred[bool]:
        """
        Confirm a transaction that its transport reported accepted, with its confirmation to
        come (:meth:`relayer.SendOutcome.accepted`).

        The confirmation is stored; the process that delivers to the target (this one, or
        another sharing the database) goes on with the target's next transactions at once.
        Until then, nothing else is sent to the target; a transaction not confirmed within the
        target's ``confirmation_timeout`` is sent again, with the same id and bytes.

        Args:
            target_id: The target.
            txn_id: The transaction's id, as the transport sent it.

        Returns:
            A Deferred firing with True if the transaction is delivered now (also if it was
            confirmed before), or False if it is not one the target accepted and that awaits
            its confirmation (or is being sent again after its timeout): an unknown id, a
            transaction the target has not accepted yet, or one abandoned because an event of
            it expired (its live events went out in a new one).

        Raises:
            NotRunning: The scheduler is not running.
            UnknownTarget: ``target_id`` is not a valid target id.
            ConfigurationError: ``txn_id`` is not an int >= 1.
        """
        self._check_running()
        self._check_stored_target(target_id)
        if isinstance(txn_id, bool) or not isinstance(txn_id, int) or not 1 <= txn_id < 2**63:
            raise ConfigurationError(
                f"txn_id must be a transaction id (an int >= 1), not {txn_id!r}"
            )

        async def confirm() -> bool:
            done = await self._store.confirm(target_id, txn_id, self._clock.seconds())
            if done:
                self._controller.confirmed(target_id)
            return done

        return Deferred.fromCoroutine(confirm())

    def event_status(self, event_id: str) -> Deferred[EventStatus | None]:
        """
        Report where an event stands at each of its targets, from the store.

        The answer is the same from any process sharing the database, and across restarts.

        Args:
            event_id: The id that :meth:`submit` returned.

        Returns:
            A Deferred firing with an :class:`relayer.EventStatus`, or None if the store holds
            no event with this id.

        Raises:
            NotRunning: The scheduler is neither running nor stopping.
            InvalidEvent: ``event_id`` is not a str.
        """
        self._check_inspectable()
        if not isinstance(event_id, str):
            raise InvalidEvent(f"event_id must be a str, not {type(event_id).__name__}")

        async def status() -> EventStatus | None:
            found = await self._store.event_status(event_id)
            if found is None:
                return None
            # The retries this process has scheduled are the true ones (after a restart, an
            # overdue retry is spread, and the store still holds the old time).
            deliveries = dict(found.deliveries)
            for target_id, d in found.deliveries.items():
                t = self._controller.targets.get(target_id)
                if t is not None and d.state is DeliveryState.PENDING:
                    at = t.next_attempt_at if t.state is not TargetState.UP else None
                    deliveries[target_id] = attrs.evolve(d, next_attempt_at=at)
            return attrs.evolve(found, deliveries=deliveries)

        return Deferred.fromCoroutine(status())

    #: The most entries one :meth:`target_events` call returns.
    MAX_EVENTS_PAGE = 1000

    def target_events(
        self,
        target_id: str,
        state: DeliveryState | str,
        *,
        after: str | None = None,
        limit: int = 100,
        since: float | None = None,
        until: float | None = None,
        with_events: bool = False,
    ) -> Deferred[TargetEventsPage]:
        """
        List a target's events in one state, oldest first (in the target's order), a page at
        a time.

        To list them all, call again with ``after`` set to the page's ``next``, until ``next``
        is None. Each page is read from the store by key, so memory stays bounded however many
        events there are.

        Args:
            target_id: The target.
            state: A :class:`relayer.DeliveryState` (or its value, such as ``"pending"``).
            after: The ``next`` of the page before; None for the first page.
            limit: The most entries to return, from 1 to :attr:`MAX_EVENTS_PAGE`.
            since: For delivered, expired, dead-lettered or discarded events: only those that
                reached that state at or after this time (their ``at``).
            until: Likewise, only those that reached it before this time.
            with_events: Give each entry its event's bytes (:attr:`relayer.EventEntry.event`).

        Raises:
            NotRunning: The scheduler is neither running nor stopping.
            UnknownTarget: ``target_id`` is not a valid target id.
            ConfigurationError: ``state``, ``after``, ``limit``, ``since`` or ``until`` is not
                valid, or a window is given for pending events or those awaiting
                confirmation (which have no time they reached their state).
        """
        self._check_inspectable()
        self._check_stored_target(target_id)
        try:
            state = DeliveryState(state)
        except ValueError:
            choices = ", ".join(repr(s.value) for s in DeliveryState)
            raise ConfigurationError(f"state must be a DeliveryState or one of {choices}") from None
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= self.MAX_EVENTS_PAGE
        ):
            raise ConfigurationError(
                f"limit must be an int from 1 to {self.MAX_EVENTS_PAGE}, not {limit!r}"
            )
        if after is not None and not isinstance(after, str):
            raise ConfigurationError(f"after must be a page's next (a str) or None, not {after!r}")
        try:
            parse_cursor(after)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
        _check_window(since, until)
        if (since is not None or until is not None) and not (
            state.final or state is DeliveryState.DEAD_LETTERED
        ):
            raise ConfigurationError(
                f"a time window applies to final states and dead letters, not to {state.value!r}"
            )

        async def page() -> TargetEventsPage:
            try:
                return await self._store.target_events(
                    target_id, state, after, limit, since, until, with_events
                )
            except ValueError as e:
                raise ConfigurationError(str(e)) from None

        return Deferred.fromCoroutine(page())

    def export_events(
        self,
        target_id: str,
        state: DeliveryState | str,
        write: Callable[[bytes], object],
        *,
        since: float | None = None,
        until: float | None = None,
        page_size: int = 500,
    ) -> Deferred[int]:
        """
        Write every one of a target's events in one state, oldest first, as JSON lines.

        Each line is an object with ``event_id``, ``state``, ``submitted_at``, ``at``,
        ``txn_id``, ``attempts`` and ``event`` (the event as it was submitted). The events are
        read a page at a time (each page from one snapshot, by key, live and archived events
        alike), and each page is written with one call of ``write`` before the next is read,
        so memory stays bounded however many there are. If ``write`` returns a Deferred, the
        next page waits for it.

        Args:
            target_id: The target.
            state: A :class:`relayer.DeliveryState` (or its value).
            write: Called with each page's lines, as bytes: a file's ``write``, say.
            since: As for :meth:`target_events`.
            until: As for :meth:`target_events`.
            page_size: How many events one page holds, from 1 to :attr:`MAX_EVENTS_PAGE`.

        Returns:
            A Deferred firing with the number of events written.

        Raises:
            The same as :meth:`target_events`; ``write``'s own errors fail the Deferred.
        """
        first = self.target_events(
            target_id, state, limit=page_size, since=since, until=until, with_events=True
        )
        value = DeliveryState(state).value

        async def export() -> int:
            written = 0
            page = await first
            while True:
                lines = []
                for e in page.entries:
                    head = {
                        "event_id": e.event_id,
                        "state": value,
                        "submitted_at": e.submitted_at,
                        "at": e.at,
                        "txn_id": e.txn_id,
                        "attempts": e.attempts,
                    }
                    # The event's bytes are compact JSON already: they go in as they are.
                    lines.append(
                        json.dumps(head, separators=(",", ":")).encode()[:-1]
                        + b',"event":'
                        + (e.event if e.event is not None else b"null")
                        + b"}\n"
                    )
                if lines:
                    done = write(b"".join(lines))
                    if isinstance(done, Deferred):
                        await done
                    written += len(lines)
                if page.next is None:
                    return written
                page = await self.target_events(
                    target_id,
                    state,
                    after=page.next,
                    limit=page_size,
                    since=since,
                    until=until,
                    with_events=True,
                )

        return Deferred.fromCoroutine(export())

    def _check_inspectable(self) -> None:
        if self._lifecycle not in (_Lifecycle.RUNNING, _Lifecycle.STOPPING):
            raise NotRunning(f"the scheduler is {self._lifecycle}: this needs a running one")

    def _check_stored_target(self, target_id: Any) -> None:
        """Refuse what cannot be the id of a target the store knows."""
        if not isinstance(target_id, str) or target_id not in self._configs:
            # Unregistered targets may have data stored; a malformed id cannot.
            try:
                _check_target_id(None, None, target_id)
            except InvalidTarget:
                raise UnknownTarget(f"no target {target_id!r} is registered") from None

    # -- operating ------------------------------------------------------------------------------

    def wake(self, target_id: str) -> Deferred[int | None]:
        """
        Retry a target now.

        A DOWN target's backoff is cut short and its oldest transaction sent at once; a BLOCKED
        target is unblocked and its head transaction sent again; a DISABLED one likewise, with
        its count of failures started again. If a send to the target is in
        flight, no second one starts: if that send fails, the retry follows at once. Waking an UP
        target makes it look for pending work.

        If another process delivers to the target (it holds the target's lease), or none does
        for now, the wake is recorded in the store as a command (see :class:`relayer.Command`)
        for the process that delivers to it: that process applies it at once on PostgreSQL
        (the store notifies it), or at its next sweep (``sweep_interval``), and a command
        recorded while no process delivers to the target is applied when one takes it in
        charge, after a restart too.

        Returns:
            A Deferred firing with None once the target is woken here, or with the id of the
            command recorded for another process (see :meth:`command`).

        A target that only other processes register is woken the same way, through a command,
        if the store knows it.

        Raises:
            NotRunning: The scheduler is not running.
            UnknownTarget: No target can have this id (the Deferred fails with it for an id
                that no process has registered).
        """
        self._check_running()
        self._check_stored_target(target_id)
        if target_id in self._configs and self._delivers_to(target_id):
            self._controller.wake(target_id)
            return succeed(None)

        async def record() -> int | None:
            if target_id not in self._configs:
                known = await self._store.load_targets([target_id])
                if target_id not in known:
                    raise UnknownTarget(f"no target {target_id!r} is registered or stored")
            command_id: int = await self._store.add_command(
                target_id, "wake", self._clock.seconds()
            )
            return command_id

        return Deferred.fromCoroutine(record())

    def command(self, command_id: int) -> Deferred[Command | None]:
        """
        An operator's command, as recorded by :meth:`wake` (or the ``relayer wake`` command)
        for the process that delivers to its target: whether it has been applied, when, and by
        which process.

        Returns:
            A Deferred firing with the :class:`relayer.Command`, or None for an unknown id
            (or one applied more than a day ago, and forgotten).

        Raises:
            NotRunning: The scheduler is neither running nor stopping.
            ConfigurationError: ``command_id`` is not an int >= 1.
        """
        self._check_inspectable()
        if (
            isinstance(command_id, bool)
            or not isinstance(command_id, int)
            or not 1 <= command_id < 2**63
        ):
            raise ConfigurationError(
                f"command_id must be a command id (an int >= 1), not {command_id!r}"
            )
        return self._store.command(command_id)

    #: The most :class:`TargetStatus` rows one :meth:`status` call returns.
    MAX_STATUS_PAGE = 10_000
    #: The most dead letters one :meth:`dead_letters` call returns.
    MAX_DEAD_LETTERS_PAGE = 1000

    def status(
        self, *, after: str | None = None, limit: int = 1000
    ) -> Deferred[list[TargetStatus]]:
        """
        Report targets' state and backlog, a page at a time.

        Targets are reported in order of id, registered ones and those that have stored data
        but are not registered alike. A call without arguments returns the first page; to see
        every target, call again with ``after`` set to the last id of the page before, until a
        page comes back shorter than ``limit``::

            after = None
            while True:
                page = await scheduler.status(after=after, limit=1000)
                report(page)
                if len(page) < 1000:
                    break
                after = page[-1].target_id

        Only the page's targets are looked at in the store, so memory and time stay bounded
        however many targets there are.

        Args:
            after: Report targets whose ids sort after this one; None for the first page.
            limit: The most targets to report, from 1 to :attr:`MAX_STATUS_PAGE`.

        Returns:
            A Deferred firing with a :class:`TargetStatus` per target, sorted by id.

        Raises:
            NotRunning: The scheduler is not running.
            ConfigurationError: ``after`` is not a string or None, or ``limit`` is not an int
                from 1 to :attr:`MAX_STATUS_PAGE`.
        """
        if self._lifecycle not in (_Lifecycle.RUNNING, _Lifecycle.STOPPING):
            raise NotRunning(f"the scheduler is {self._lifecycle}: status needs a running one")
        if after is not None and not isinstance(after, str):
            raise ConfigurationError(
                f"after must be a target id (a str) or None, not {type(after).__name__}"
            )
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= self.MAX_STATUS_PAGE
        ):
            raise ConfigurationError(
                f"limit must be an int from 1 to {self.MAX_STATUS_PAGE}, not {limit!r}"
            )

        async def status() -> list[TargetStatus]:
            counts = await self._store.queue_counts(after, limit)
            # The page's first ``limit`` ids are among the store's first ``limit`` and the
            # registered targets' first ``limit`` (some may not be stored yet).
            registered = sorted(t for t in self._configs if after is None or t > after)[:limit]
            ids = sorted(set(registered) | set(counts))[:limit]
            # Targets this process does not deliver to (not registered, or owned by another
            # process): their state is as stored.
            elsewhere = [i for i in ids if i not in self._controller.targets]
            records = await self._store.load_targets(elsewhere) if elsewhere else {}
            now = self._clock.seconds()
            result = []
            for target_id in ids:
                c = counts.get(target_id) or QueueCounts()
                oldest = c.oldest_pending_at
                age = max(0.0, now - oldest) if oldest is not None else None
                t = self._controller.targets.get(target_id)
                if t is not None:
                    state, failures, next_retry = t.state, t.failures, t.next_attempt_at
                    last_success, last_error = t.last_success_at, t.last_error
                    down_since = t.down_since
                else:
                    r = records.get(target_id)
                    state = r.state if r is not None else TargetState.UP
                    failures = r.failures if r is not None else 0
                    next_retry = r.next_attempt_at if r is not None else None
                    last_success = r.last_success_at if r is not None else None
                    last_error = r.last_error if r is not None else None
                    down_since = r.down_since if r is not None else None
                result.append(
                    TargetStatus(
                        target_id=target_id,
                        state=state,
                        registered=target_id in self._configs,
                        in_flight=t is not None and t.in_flight is not None,
                        pending_events=c.pending_events,
                        pending_transactions=c.pending_transactions,
                        oldest_pending_age=age,
                        last_success_at=last_success,
                        consecutive_failures=failures,
                        next_retry_at=next_retry,
                        last_error=last_error,
                        dead_letters=c.dead_letters,
                        down_since=down_since,
                    )
                )
            return result

        return Deferred.fromCoroutine(status())

    def dead_letters(
        self, target_id: str, limit: int = 100, *, after: int | None = None
    ) -> Deferred[list[DeadLetter]]:
        """
        List a target's dead letters, oldest first, a page at a time.

        To list them all, call again with ``after`` set to the last ``txn_id`` of the page
        before, until a page comes back shorter than ``limit``.

        Args:
            target_id: The target.
            limit: The most dead letters to return, from 1 to :attr:`MAX_DEAD_LETTERS_PAGE`.
            after: Return dead letters whose ``txn_id`` is above this; None for the first page.

        Raises:
            NotRunning: The scheduler is not running.
            ConfigurationError: ``limit`` is not an int from 1 to
                :attr:`MAX_DEAD_LETTERS_PAGE`, or ``after`` is not an int >= 0 or None.
            UnknownTarget: ``target_id`` is not a valid target id, so no target has it.
        """
        self._check_running()
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= self.MAX_DEAD_LETTERS_PAGE
        ):
            raise ConfigurationError(
                f"limit must be an int from 1 to {self.MAX_DEAD_LETTERS_PAGE}, not {limit!r}"
            )
        if after is not None and (
            isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < 2**63
        ):
            raise ConfigurationError(
                f"after must be a transaction id (an int >= 0) or None, not {after!r}"
            )
        self._check_stored_target(target_id)
        return self._store.dead_letters(target_id, limit, after)

    def replay(self, target_id: str, txn_id: int | None = None) -> Deferred[int]:
        """
        Queue a target's dead letters again, at the end of its queue, and deliver them; with
        ``txn_id``, only that dead letter (nothing is queued, and 0 returned, if it is not one
        of the target's dead letters).

        Replayed events are sent in new transactions, with new ids, after the events already
        queued. The dead letters present when the replay begins are moved in order, a chunk at
        a time; replays of the same target (from this process or another) run one after the
        other, so no dead letter is queued twice, and one stored during the replay stays a
        dead letter. Returns a Deferred firing with the number of events queued again.

        Raises:
            NotRunning: The scheduler is not running.
            UnknownTarget: No target has this id.
            ConfigurationError: ``txn_id`` is not a transaction id (an int >= 1) or None.
        """
        self._check_running()
        self._config(target_id)
        if txn_id is not None and (
            isinstance(txn_id, bool) or not isinstance(txn_id, int) or not 1 <= txn_id < 2**63
        ):
            raise ConfigurationError(
                f"txn_id must be a transaction id (an int >= 1) or None, not {txn_id!r}"
            )

        async def replay() -> int:
            n = await self._store.replay(target_id, self._clock.seconds(), txn_id)
            if n:
                self._controller.notify([target_id])
            return n

        return Deferred.fromCoroutine(replay())

    def discard(self, target_id: str, txn_id: int) -> Deferred[bool]:
        """
        Give up one of a target's dead letters: its events are discarded there, never to be
        sent again. A discarded event is final, and retention may purge it.

        Returns:
            A Deferred firing with True, or False if ``txn_id`` is not a dead letter of the
            target (never one, replayed, or discarded already): nothing was changed.

        Raises:
            NotRunning: The scheduler is not running.
            UnknownTarget: ``target_id`` is not a valid target id.
            ConfigurationError: ``txn_id`` is not a transaction id (an int >= 1).
        """
        self._check_running()
        self._check_stored_target(target_id)
        if isinstance(txn_id, bool) or not isinstance(txn_id, int) or not 1 <= txn_id < 2**63:
            raise ConfigurationError(
                f"txn_id must be a transaction id (an int >= 1), not {txn_id!r}"
            )
        return self._store.discard(target_id, txn_id, self._clock.seconds())

    def event_counts(
        self, target_id: str, *, since: float | None = None, until: float | None = None
    ) -> Deferred[EventCounts]:
        """
        Count a target's events in each state.

        Delivered, expired, dead-lettered and discarded events are counted by when they
        reached that state, from ``since`` (included) to ``until`` (excluded), on the
        scheduler's clock; pending events and those awaiting confirmation are the backlog
        now. The counts are read from one snapshot of the store, live and archived events
        alike, so retention archiving events never changes them.

        Raises:
            NotRunning: The scheduler is neither running nor stopping.
            UnknownTarget: ``target_id`` is not a valid target id.
            ConfigurationError: ``since`` or ``until`` is not a number or None, or ``until``
                is before ``since``.
        """
        self._check_inspectable()
        self._check_stored_target(target_id)
        _check_window(since, until)
        return self._store.event_counts(target_id, since, until)

    def _retention_rule(self) -> RetentionRule:
        """How long each target keeps its final events, under this scheduler's configuration."""
        default = self._retention.keep if self._retention is not None else None
        return RetentionRule(
            default,
            {t: c.retention for t, c in self._configs.items() if c.retention is not None},
        )

    def purge(
        self, *, dry_run: bool = False, progress: Callable[[PurgeReport], None] | None = None
    ) -> Deferred[PurgeReport]:
        """
        Run retention now: purge (or archive) the final events that have passed their
        retention, in chunks, as the scheduler does every ``retention.interval`` seconds.

        Only final events go: delivered, expired or discarded at every target they were
        submitted for, and past each target's retention since. Pending events, transactions
        in flight or awaiting confirmation, and dead letters stay, however old.

        Args:
            dry_run: Change nothing; report what would go.
            progress: Called with the totals so far after each chunk.

        Raises:
            NotRunning: The scheduler is not running.
        """
        self._check_running()
        run = self._purge(dry_run, progress)
        # stop() waits for the chunk under way; the run stops after it.
        done: Deferred[None] = Deferred()
        self._track(done)

        def finished(result: object) -> object:
            done.callback(None)
            return result

        return run.addBoth(finished)

    def _purge(
        self, dry_run: bool, progress: Callable[[PurgeReport], None] | None = None
    ) -> Deferred[PurgeReport]:
        retention = self._retention if self._retention is not None else Retention()
        return self._store.purge(
            self._retention_rule(),
            self._clock.seconds(),
            archive=retention.archive,
            dry_run=dry_run,
            chunk=retention.chunk,
            progress=progress,
            keep_going=lambda: self._lifecycle == _Lifecycle.RUNNING,
        )

    def _retention_run(self) -> Deferred[None]:
        async def run() -> None:
            if self._lifecycle != _Lifecycle.RUNNING:
                return
            report = await self._purge(dry_run=False)
            if report.events or report.transactions:
                self.log.info(
                    "Retention {action} {events} events and {transactions} transaction records "
                    "in {chunks} chunks; {kept} old events kept, not final yet",
                    relayer_event=ev.RETENTION_DONE,
                    action="archived" if report.archived else "purged",
                    events=report.events,
                    transactions=report.transactions,
                    chunks=report.chunks,
                    kept=report.not_final,
                )

        return Deferred.fromCoroutine(run())


def _check_policies(policies: Any) -> dict[str, IRetryPolicy]:
    if policies is None:
        return {}
    if not isinstance(policies, Mapping):
        raise ConfigurationError(
            f"policies must map names to retry policies, not {type(policies).__name__}"
        )
    checked = {}
    for name, policy in policies.items():
        if not isinstance(name, str) or not IRetryPolicy.providedBy(policy):
            raise ConfigurationError(
                f"policies: {name!r} must be a name mapped to an object that provides "
                f"relayer.IRetryPolicy, not {type(policy).__name__}"
            )
        checked[name] = policy
    return checked


def _check_thresholds(thresholds: Any) -> tuple[int, ...]:
    try:
        values = tuple(thresholds)
    except TypeError:
        raise ConfigurationError("failure_thresholds must be counts of failures") from None
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"failure_thresholds must be ints >= 1, not {value!r}")
    return values


def _check_formats(formats: Any) -> dict[str, IWireFormat]:
    """The scheduler's ``formats``, checked: names of targets' formats to formats."""
    if formats is None:
        return {}
    if not isinstance(formats, Mapping):
        raise ConfigurationError(
            f"formats must be a mapping of names to wire formats, not {type(formats).__name__}"
        )
    checked: dict[str, IWireFormat] = {}
    for name, wire in formats.items():
        if not isinstance(name, str):
            raise ConfigurationError(f"formats' names must be str, not {type(name).__name__}")
        if not IWireFormat.providedBy(wire):
            raise ConfigurationError(
                f"formats[{name!r}] must provide relayer.formats.IWireFormat, "
                f"not {type(wire).__name__}"
            )
        _check_max_events(f"formats[{name!r}]", wire)
        checked[name] = wire
    return checked


def _check_max_events(what: str, wire: IWireFormat) -> None:
    """Refuse a wire format whose ``max_events`` is neither None nor an int >= 1."""
    most = wire.max_events
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
        raise ConfigurationError(f"{what}.max_events must be None or an int >= 1, not {most!r}")


def _check_seconds(name: str, value: Any, positive: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (0 <= value <= sys.float_info.max)
        or (positive and value == 0)
    ):
        op = ">" if positive else ">="
        raise ConfigurationError(f"{name} must be a number {op} 0, not {value!r}")


def _check_window(since: Any, until: Any) -> None:
    for name, value in (("since", since), ("until", until)):
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigurationError(f"{name} must be a time (a number) or None, not {value!r}")
    if since is not None and until is not None and until < since:
        raise ConfigurationError(f"until ({until!r}) is before since ({since!r})")


async def _no_ids() -> list[str]:
    return []


class _Accumulator:
    """The events of one submit, gathered for the grouper: bodies once, and per target."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self.bodies: list[bytes] = []
        self.per_target: dict[str, list[int]] = {}
        self.targets: dict[int, tuple[str, ...]] = {}
        self.event_ids: dict[int, str] = {}
        self.expires_at: dict[int, float] = {}

    def add(
        self,
        targets: Any,
        event: Any,
        event_id: Any,
        expires_at: Any,
        ttl: Any,
    ) -> None:
        s = self._scheduler
        ids = _target_list(targets)
        configs = [s._config(t) for t in ids]
        if event_id is not None:
            check_event_id(event_id)
        deadline = deadline_of(s._clock.seconds(), expires_at, ttl)
        data = _encoding.encode_event(event, min(c.max_bytes for c in configs))
        index = len(self.bodies)
        self.bodies.append(data)
        for target_id in ids:
            queued = self.per_target.get(target_id)
            if queued is None:
                self.per_target[target_id] = [index]
            else:
                queued.append(index)
        if len(ids) > 1:
            self.targets[index] = ids
        if event_id is not None:
            self.event_ids[index] = event_id
        if deadline is not None:
            self.expires_at[index] = deadline

    def store(self) -> Deferred[list[str]]:
        return self._scheduler._grouper.add_grouped(
            self.bodies, self.per_target, self.targets, self.event_ids, self.expires_at
        )


#: The most targets one event may be submitted for.
MAX_FANOUT = 1000


def _target_list(targets: Any) -> tuple[str, ...]:
    """The ids of an event's targets, once each, in order."""
    if isinstance(targets, str):
        return (targets,)
    if not isinstance(targets, (list, tuple)):
        # No target has such an id: a target id is a str.
        raise UnknownTarget(
            f"no target {targets!r} is registered (targets are a target id or a list of them)"
        )
    for t in targets:
        if not isinstance(t, str):
            raise UnknownTarget(f"no target {t!r} is registered")
    ids = tuple(dict.fromkeys(targets))
    if not ids:
        raise InvalidEvent("an event needs at least one target")
    if len(ids) > MAX_FANOUT:
        raise InvalidEvent(f"an event may go to at most {MAX_FANOUT} targets, not {len(ids)}")
    return ids


async def _nothing() -> None:
    return None
