"""
The Scheduler: relayer's public entry point.

It wires the :class:`~relayer.grouper.EventGrouper`, the
:class:`~relayer.controller.TransactionController` and the per-target
:class:`~relayer.recoverer.Recoverer` together over a store and a transport, all passed in.
"""

from __future__ import annotations

import random as _random
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger

from relayer import _encoding
from relayer.config import TargetConfig, _check_target_id
from relayer.controller import TargetRuntime, TransactionController
from relayer.errors import (
    Backpressure,
    ConfigurationError,
    DuplicateTarget,
    InvalidEvent,
    InvalidTarget,
    NotRunning,
    UnknownTarget,
)
from relayer.grouper import DEFAULT_STORE_RETRY_TIMEOUT, EventGrouper
from relayer.lease import LeaseManager, LeaseSettings
from relayer.store.base import DeadLetter, ILeaseStore, IStore, QueueCounts, TargetState
from relayer.transport.base import ITransport

#: How long :meth:`Scheduler.stop` lets sends in flight finish before it abandons them.
DEFAULT_STOP_TIMEOUT = 10.0
#: How many submitted events may wait to be stored, by default, before submits are refused.
DEFAULT_MAX_WAITING_EVENTS = 100_000


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
        state: UP, DOWN or BLOCKED.
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
        max_waiting_events: How many submitted events may wait to be stored (while the store
            is slow or unavailable) before :meth:`submit` and :meth:`submit_many` refuse more
            at once with :class:`relayer.errors.Backpressure`, rather than hold them in
            memory. An int >= 1; default 100 000. A single ``submit_many`` larger than this
            is accepted when nothing else waits.

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
        max_waiting_events: int = DEFAULT_MAX_WAITING_EVENTS,
    ) -> None:
        if (
            isinstance(stop_timeout, bool)
            or not isinstance(stop_timeout, (int, float))
            or not (0 <= stop_timeout <= sys.float_info.max)
        ):
            raise ConfigurationError(f"stop_timeout must be a number >= 0, not {stop_timeout!r}")
        if (
            isinstance(store_retry_timeout, bool)
            or not isinstance(store_retry_timeout, (int, float))
            or not (0 <= store_retry_timeout <= sys.float_info.max)
        ):
            raise ConfigurationError(
                f"store_retry_timeout must be a number >= 0, not {store_retry_timeout!r}"
            )
        if (
            isinstance(max_waiting_events, bool)
            or not isinstance(max_waiting_events, int)
            or max_waiting_events < 1
        ):
            raise ConfigurationError(
                f"max_waiting_events must be an int >= 1, not {max_waiting_events!r}"
            )
        self._max_waiting = max_waiting_events
        if not callable(random):
            raise ConfigurationError("random must be a callable returning floats in [0, 1)")
        if leases is not None and not isinstance(leases, LeaseSettings):
            raise ConfigurationError(f"leases must be LeaseSettings, not {type(leases).__name__}")
        if leases is not None and not ILeaseStore.providedBy(store):
            raise ConfigurationError("leases need a store that supports them (ILeaseStore)")
        self._clock = clock
        self._store = store
        self._stop_timeout = float(stop_timeout)
        self._configs: dict[str, TargetConfig] = {}
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
        self._controller = TransactionController(
            clock,
            store,
            transport,
            random,
            may_send=self._may_send if self._leases is not None else None,
        )
        self._grouper = EventGrouper(
            clock,
            store,
            self._limits,
            self._controller.notify,
            retry_timeout=float(store_retry_timeout),
            random=random,
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

    def _may_send(self, t: TargetRuntime) -> bool:
        assert self._leases is not None
        leases = self._leases
        return leases.owns(t.config.target_id) and leases.remaining() > t.config.request_timeout

    def _leases_acquired(self, target_ids: list[str]) -> None:
        async def take() -> None:
            records = await self._store.load_targets(target_ids)
            for target_id in target_ids:
                config = self._configs.get(target_id)
                record = records.get(target_id)
                if config is None or record is None or target_id in self._controller.targets:
                    continue
                if self._leases is not None and not self._leases.owns(target_id):
                    continue
                self._controller.add(config, record)
                # It may have events that arrived while another process owned it.
                self._controller.notify([target_id])

        self._track(Deferred.fromCoroutine(take())).addErrback(
            lambda f: self.log.failure("Taking over {n} targets failed", f, n=len(target_ids))
        )

    def _track(self, d: Deferred[None]) -> Deferred[None]:
        """Keep a background task in view, so that stop() waits for it."""
        self._registering.add(d)

        def done(result: object) -> object:
            self._registering.discard(d)
            return result

        return d.addBoth(done)

    def _leases_lost(self, target_ids: list[str]) -> None:
        self._controller.remove(target_ids, cancel=True)

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
            InvalidTarget: ``config`` is not a :class:`TargetConfig`.
            DuplicateTarget: A target with the same id is registered already, or one with the
                same base URL and token: one target is one registration with its receiver,
                since the receiver tells transactions apart by id alone.
        """
        if not isinstance(config, TargetConfig):
            raise InvalidTarget(f"add_target takes a TargetConfig, not {type(config).__name__}")
        if config.target_id in self._configs:
            raise DuplicateTarget(f"target {config.target_id!r} is registered already")
        receiver = _receiver_key(config)
        for other in self._configs.values():
            if _receiver_key(other) == receiver:
                # The token is never shown; the URL holds no secret (no query, no credentials).
                raise DuplicateTarget(
                    f"target {config.target_id!r} has the same base URL "
                    f"({config.base_url!r}) and token as target {other.target_id!r}: a receiver "
                    "tells transactions apart by id alone, and each target numbers its own, so "
                    "the receiver would drop events as repeats. One target is one "
                    "registration: send every event for it through one target"
                )
        self._configs[config.target_id] = config
        if self._lifecycle == _Lifecycle.RUNNING:
            self._track(Deferred.fromCoroutine(self._register([config]))).addErrback(
                lambda f: self.log.failure(
                    "Registering target {target_id} failed", f, target_id=config.target_id
                )
            )

    @property
    def targets(self) -> dict[str, TargetConfig]:
        """The registered targets' configurations, by id."""
        return dict(self._configs)

    def _limits(self, target_id: str) -> tuple[int, int]:
        config = self._configs[target_id]
        return config.max_events, config.max_bytes

    async def _register(self, configs: Sequence[TargetConfig]) -> None:
        records = await self._store.register_targets([c.target_id for c in configs])
        if self._leases is not None:
            # Which of them this process delivers to is up to its leases.
            return
        for config in configs:
            if self._lifecycle != _Lifecycle.RUNNING and self._lifecycle != _Lifecycle.STARTING:
                return
            self._controller.add(config, records[config.target_id])
        if self._lifecycle == _Lifecycle.RUNNING:
            # Events may have been stored for these targets while they were registering.
            self._controller.notify(c.target_id for c in configs)
        for target_id, record in records.items():
            if record.has_pending and target_id not in self._configs:
                self.log.warn(
                    "The store holds undelivered events for target {target_id}, which is not "
                    "registered; they wait until it is",
                    target_id=target_id,
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
                # Alone on the database without leases; shared only among those with leases.
                await self._store.hold_process_lock(self._leases is not None)
                await self._register(list(self._configs.values()))
                if self._leases is not None:
                    self._leases.settings.check(c.request_timeout for c in self._configs.values())
                    self._store.lease_owner = self._leases.node_id  # type: ignore[attr-defined]
                    await self._leases.start()
                    listen = getattr(self._store, "listen", None)
                    # A fake clock has no threads to hear notifications on: tests tell it.
                    if listen is not None and IReactorFromThreads.providedBy(self._clock):
                        self._unlisten = listen(self._notified)
            except BaseException:
                self._lifecycle = _Lifecycle.STOPPED
                await self._store.close()
                raise
            self._lifecycle = _Lifecycle.RUNNING
            self.log.info("relayer scheduler started with {n} targets", n=len(self._configs))

        return Deferred.fromCoroutine(start())

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
        self._lifecycle = _Lifecycle.STOPPING

        async def stop() -> None:
            await self._grouper.flushed()
            self._controller.stop_timers()
            loops = self._controller.running_loops() + list(self._registering)
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
            self.log.info("relayer scheduler stopped")

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

    def submit(self, target_id: str, event: Any) -> Deferred[None]:
        """
        Submit one event for delivery to one target.

        The event is encoded as JSON at once, and stored before the returned Deferred fires.
        From then on it is delivered, in submit order, even across crashes and restarts.

        Args:
            target_id: A registered target's id.
            event: A JSON object, as Matrix events are: a dict whose keys are strings at every
                depth, with integers within +-(2**53 - 1), Matrix's canonical JSON range.

        Returns:
            A Deferred that fires once the event is durably stored.

        Raises:
            NotRunning: The scheduler is not started, or is stopping.
            UnknownTarget: No target has this id.
            InvalidEvent: The event is not a dict, cannot be encoded as JSON, has a key that is
                not a string or an integer out of range; the message says where.
            EventTooLarge: The encoded event exceeds the target's ``max_bytes``.
            Backpressure: ``max_waiting_events`` submitted events wait to be stored already;
                nothing was stored.
        """
        self._check_running()
        config = self._config(target_id)
        data = _encoding.encode_event(event, config.max_bytes)
        self._check_room(1)
        return self._grouper.add_grouped({target_id: [data]}, 1)

    def _check_room(self, count: int) -> None:
        """Refuse ``count`` more events if they would take the unstored ones past the bound."""
        unstored = self._grouper.unstored
        if unstored and unstored + count > self._max_waiting:
            raise Backpressure(
                f"{unstored} submitted events wait to be stored (the store is slow or "
                f"unavailable), and {count} more would exceed max_waiting_events of "
                f"{self._max_waiting}; nothing of this submit was stored: submit again later"
            )

    def submit_many(self, events: Iterable[tuple[str, Any]]) -> Deferred[None]:
        """
        Submit many events at once, stored together in one database transaction.

        Args:
            events: ``(target_id, event)`` pairs, in submit order.

        Returns:
            A Deferred that fires once all of the events are durably stored.

        Raises:
            NotRunning: The scheduler is not started, or is stopping.
            UnknownTarget: A pair names no registered target.
            InvalidEvent: A pair's event is refused as :meth:`submit` refuses it, a pair is not
                a pair, or
                ``events`` is a string or a mapping (pass a mapping's ``items()``).
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
        # Each target's events are collected in their own list as they are encoded, so that
        # the grouper need not sort them again; this loop runs once for every event.
        per_target: dict[str, list[bytes]] = {}
        found: dict[str, tuple[Callable[[bytes], None], int]] = {}
        encode = _encoding.encode_event
        count = 0
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
                append, max_bytes = found[target_id]
            except (KeyError, TypeError):
                config = self._config(target_id)
                queued: list[bytes] = []
                per_target[target_id] = queued
                append, max_bytes = found[target_id] = (queued.append, config.max_bytes)
            append(encode(event, max_bytes))
            count += 1
        if not count:
            return Deferred.fromCoroutine(_nothing())
        self._check_room(count)
        return self._grouper.add_grouped(per_target, count)

    # -- operating ------------------------------------------------------------------------------

    def wake(self, target_id: str) -> None:
        """
        Retry a target now.

        A DOWN target's backoff is cut short and its oldest transaction sent at once; a BLOCKED
        target is unblocked and its head transaction sent again. If a send to the target is in
        flight, no second one starts: if that send fails, the retry follows at once. Waking an UP
        target makes it look for pending work.

        Raises:
            NotRunning: The scheduler is not running.
            UnknownTarget: No target has this id.
        """
        self._check_running()
        self._config(target_id)
        if target_id in self._controller.targets:
            self._controller.wake(target_id)

    def status(self) -> Deferred[list[TargetStatus]]:
        """
        Report every target's state and backlog.

        Returns:
            A Deferred firing with a :class:`TargetStatus` per target, sorted by id; this
            includes targets that have stored data but are not registered.
        """
        if self._lifecycle not in (_Lifecycle.RUNNING, _Lifecycle.STOPPING):
            raise NotRunning(f"the scheduler is {self._lifecycle}: status needs a running one")

        async def status() -> list[TargetStatus]:
            counts = await self._store.queue_counts()
            ids = sorted(set(self._configs) | set(counts))
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
                else:
                    r = records.get(target_id)
                    state = r.state if r is not None else TargetState.UP
                    failures = r.failures if r is not None else 0
                    next_retry = r.next_attempt_at if r is not None else None
                    last_success = r.last_success_at if r is not None else None
                    last_error = r.last_error if r is not None else None
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
                    )
                )
            return result

        return Deferred.fromCoroutine(status())

    def dead_letters(self, target_id: str, limit: int = 100) -> Deferred[list[DeadLetter]]:
        """
        List a target's dead letters, oldest first.

        Raises:
            NotRunning: The scheduler is not running.
            ConfigurationError: ``limit`` is not an int >= 1.
            UnknownTarget: ``target_id`` is not a valid target id, so no target has it.
        """
        self._check_running()
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit must be an int >= 1, not {limit!r}")
        if not isinstance(target_id, str) or target_id not in self._configs:
            # Unregistered targets may have dead letters stored; a malformed id cannot.
            try:
                _check_target_id(None, None, target_id)
            except InvalidTarget:
                raise UnknownTarget(f"no target {target_id!r} is registered") from None
        # A limit past what the database can hold means "all of them".
        return self._store.dead_letters(target_id, min(limit, 2**63 - 1))

    def replay(self, target_id: str) -> Deferred[int]:
        """
        Queue a target's dead letters again, at the end of its queue, and deliver them.

        Replayed events are sent in new transactions, with new ids, after the events already
        queued. Returns a Deferred firing with the number of events queued again.

        Raises:
            NotRunning: The scheduler is not running.
            UnknownTarget: No target has this id.
        """
        self._check_running()
        self._config(target_id)

        async def replay() -> int:
            n = await self._store.replay(target_id, self._clock.seconds())
            if n:
                self._controller.notify([target_id])
            return n

        return Deferred.fromCoroutine(replay())


async def _nothing() -> None:
    return None
