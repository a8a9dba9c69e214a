"""
The TransactionController: forms, stores and sends each target's transactions.

For each target the controller runs at most one *delivery loop* at a time, so at most one
transaction is ever in flight per target, and transactions go out in id order, which is submit
order. A loop claims the target's next transaction from the store (the oldest stored one, or a
new one formed from the queue, with the next id and the attempt counted durably), sends it, and
records the outcome:

- delivered: the transaction is deleted and the next one claimed, in one database transaction;
- a transient failure: the target is marked DOWN with its backoff state, and its
  :class:`~relayer.recoverer.Recoverer` schedules the retry;
- too large (413): a transaction of several events is split in two and the first half sent;
- a permanent failure: the target's :class:`~relayer.config.FailurePolicy` applies.

When a claim finds nothing left, the store marks the target UP in the same database transaction,
so the DOWN to UP transition cannot strand an event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayer import _faults
from relayer._scrub import scrub
from relayer.config import FailurePolicy, TargetConfig
from relayer.errors import LeaseLost, StoreUnavailable
from relayer.recoverer import Recoverer
from relayer.store.base import IStore, TargetRecord, TargetState, Transaction
from relayer.transport.base import ITransport, OutcomeKind, SendOutcome

#: After an unexpected error in a delivery loop (for example the database being unavailable),
#: the loop is restarted after this many seconds, doubling up to :data:`LOOP_RETRY_MAX`.
LOOP_RETRY_INITIAL = 1.0
LOOP_RETRY_MAX = 60.0


@attrs.define(eq=False)
class TargetRuntime:
    """
    A target's delivery state in memory.

    Attributes:
        config: The target's configuration.
        state: UP, DOWN or BLOCKED, as last stored.
        last_success_at: When a transaction was last delivered.
        last_error: A short description of the last failure.
        recoverer: The target's Recoverer while it is DOWN.
        running: Whether a delivery loop is active.
        in_flight: The send in progress, if any.
        dirty: New events were stored since the running loop last looked.
        wake_requested: The target was woken while its loop was running.
    """

    config: TargetConfig
    state: TargetState = TargetState.UP
    last_success_at: float | None = None
    last_error: str | None = None
    recoverer: Recoverer | None = None
    running: bool = False
    in_flight: Deferred[SendOutcome] | None = None
    dirty: bool = False
    wake_requested: bool = False
    removed: bool = False
    loop_errors: int = 0
    loop_retry: IDelayedCall | None = None

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success."""
        return self.recoverer.failures if self.recoverer is not None else 0

    @property
    def next_attempt_at(self) -> float | None:
        """When the target is next retried: by its Recoverer, or after a store error."""
        # While the loop runs, a failure is being recorded (the retry is scheduled once it is
        # stored) or a retry is under way: either way the Recoverer's time is the one to show.
        if self.recoverer is not None and (self.recoverer.scheduled or self.running):
            return self.recoverer.next_attempt_at
        if self.loop_retry is not None and self.loop_retry.active():
            return float(self.loop_retry.getTime())
        return None


class TransactionController:
    """
    Sends each target's transactions, one at a time per target, and handles their outcomes.

    Args:
        clock: The clock for timestamps and retries.
        store: The durable store.
        transport: Sends transactions.
        random: The jitter source for backoff, returning floats in ``[0, 1)``.
        may_send: Says whether this process may send to a target now; by default always. With
            leases, only while it holds the target's lease with enough time left. A delivery
            loop that may not go on stops, and is resumed by :meth:`resume_paused`.
    """

    log = Logger(namespace="relayer.controller")

    def __init__(
        self,
        clock: IReactorTime,
        store: IStore,
        transport: ITransport,
        random: Callable[[], float],
        may_send: Callable[[TargetRuntime], bool] | None = None,
    ) -> None:
        self._clock = clock
        self._may_send = may_send if may_send is not None else (lambda t: True)
        self._paused: set[str] = set()
        self._store = store
        self._transport = transport
        self._random = random
        self.targets: dict[str, TargetRuntime] = {}
        self._loops: dict[str, Deferred[None]] = {}
        self._stopping = False

    # -- targets --------------------------------------------------------------------------------

    def add(self, config: TargetConfig, record: TargetRecord) -> TargetRuntime:
        """Take charge of a target, in the state the store holds for it, and resume its work."""
        t = TargetRuntime(
            config=config,
            state=record.state,
            last_success_at=record.last_success_at,
            last_error=record.last_error,
        )
        self.targets[config.target_id] = t
        if record.state is TargetState.DOWN:
            t.recoverer = self._recoverer(t, record.failures)
            # Resume the persisted backoff; an overdue retry happens at once.
            t.recoverer.schedule(record.next_attempt_at)
        elif record.state is TargetState.UP and record.has_pending:
            self._kick(t)
        return t

    def remove(self, target_ids: Iterable[str], cancel: bool = False) -> Deferred[None]:
        """
        Stop delivering to targets and forget them.

        Their delivery loops stop before their next send; what they were sending stays
        pending in the store. With ``cancel``, sends in flight are abandoned at once.

        Returns:
            A Deferred that fires once no loop of these targets runs any more.
        """
        loops = []
        for target_id in target_ids:
            t = self.targets.pop(target_id, None)
            self._paused.discard(target_id)
            if t is None:
                continue
            t.removed = True
            if t.recoverer is not None:
                t.recoverer.cancel()
            if t.loop_retry is not None and t.loop_retry.active():
                t.loop_retry.cancel()
            if cancel and t.in_flight is not None:
                t.in_flight.cancel()
            loop = self._loops.get(target_id)
            if loop is not None:
                loops.append(loop)
        return Deferred.fromCoroutine(_wait_all(loops))

    def resume_paused(self) -> None:
        """Restart the delivery loops that stopped because this process could not send."""
        paused, self._paused = self._paused, set()
        for target_id in paused:
            t = self.targets.get(target_id)
            if t is None:
                continue
            if t.recoverer is not None and t.recoverer.scheduled:
                continue
            if t.state is not TargetState.BLOCKED:
                self._kick(t)

    def _recoverer(self, t: TargetRuntime, failures: int) -> Recoverer:
        return Recoverer(
            self._clock,
            t.config.target_id,
            t.config.backoff,
            self._random,
            lambda: self._kick(t),
            failures=failures,
        )

    def notify(self, target_ids: Iterable[str]) -> None:
        """Events were stored for these targets: deliver them if the target is UP."""
        for target_id in target_ids:
            t = self.targets.get(target_id)
            if t is None:
                continue
            t.dirty = True
            if t.state is TargetState.UP and not t.running:
                self._kick(t)

    def wake(self, target_id: str) -> None:
        """Retry a target now: a DOWN target's backoff is cut short, a BLOCKED one unblocked."""
        t = self.targets[target_id]
        if t.running:
            # A send may be in flight: never start a second one. If it fails, the retry comes
            # at once instead of after the backoff.
            t.wake_requested = True
            return
        if t.recoverer is not None:
            t.recoverer.wake()
        else:
            self._kick(t)

    # -- the delivery loop ----------------------------------------------------------------------

    def _kick(self, t: TargetRuntime) -> None:
        if t.running or self._stopping or t.removed:
            return
        if t.loop_retry is not None and t.loop_retry.active():
            t.loop_retry.cancel()
        t.loop_retry = None
        t.running = True
        t.dirty = False
        target_id = t.config.target_id
        d = Deferred.fromCoroutine(self._deliver(t))
        self._loops[target_id] = d

        def finished(result: object) -> None:
            t.running = False
            t.in_flight = None
            if self._loops.get(target_id) is d:
                del self._loops[target_id]
            if isinstance(result, Failure):
                if result.check(LeaseLost):
                    # The lease manager hears of it too, and takes the target away.
                    self._paused.add(target_id)
                    return
                self._loop_failed(t, result)
            else:
                t.loop_errors = 0
                # Events stored while the loop was finishing: look again.
                if t.dirty and t.state is TargetState.UP:
                    self._kick(t)

        d.addBoth(finished)

    def _loop_failed(self, t: TargetRuntime, failure: Failure) -> None:
        if self._stopping or t.removed:
            return
        t.loop_errors += 1
        delay = min(LOOP_RETRY_INITIAL * 2 ** min(t.loop_errors - 1, 16), LOOP_RETRY_MAX)
        if failure.check(StoreUnavailable):
            self.log.warn(
                "Delivery to {target_id} paused: {error}; retrying in {delay:.1f}s",
                target_id=t.config.target_id,
                error=failure.getErrorMessage(),
                delay=delay,
            )
        else:
            self.log.failure(
                "Delivery to {target_id} stopped on an unexpected error; retrying in "
                "{delay:.1f}s",
                failure,
                target_id=t.config.target_id,
                delay=delay,
            )
        t.loop_retry = self._clock.callLater(delay, self._kick, t)

    async def _deliver(self, t: TargetRuntime) -> None:
        config = t.config
        target_id = config.target_id
        store = self._store
        if not self._may_send(t):
            self._paused.add(target_id)
            return
        txn = await store.claim(
            target_id, config.max_events, config.max_bytes, self._clock.seconds()
        )
        while True:
            if txn is None:
                if t.dirty and not self._stopping:
                    t.dirty = False
                    txn = await store.claim(
                        target_id, config.max_events, config.max_bytes, self._clock.seconds()
                    )
                    continue
                self._now_up(t)
                return
            if self._stopping or t.removed:
                # The claimed transaction stays pending, with its id and bytes, for next time.
                return
            if not self._may_send(t):
                self._paused.add(target_id)
                return
            _faults.checkpoint("txn.stored")
            outcome = await self._send(t, txn)
            now = self._clock.seconds()
            if outcome is None:
                return
            if outcome.kind is OutcomeKind.DELIVERED:
                _faults.checkpoint("send.accepted")
                t.last_success_at = now
                t.last_error = None
                t.wake_requested = False
                if t.recoverer is not None:
                    t.recoverer.failures = 0
                if t.state is TargetState.BLOCKED:
                    # Unblocked: the rest of the backlog drains as after an outage.
                    self._set_state(t, TargetState.DOWN)
                txn = await store.complete(
                    target_id, txn.txn_id, config.max_events, config.max_bytes, now
                )
            elif outcome.kind is OutcomeKind.TOO_LARGE and txn.n_events > 1:
                self.log.info(
                    "{target_id} refused transaction {txn_id} of {n} events as too large "
                    "({reason}); splitting it",
                    target_id=target_id,
                    txn_id=txn.txn_id,
                    n=txn.n_events,
                    reason=outcome.reason,
                )
                txn = await store.split(target_id, txn.txn_id, now)
                if txn is None:
                    txn = await store.claim(target_id, config.max_events, config.max_bytes, now)
            elif outcome.kind in (OutcomeKind.PERMANENT, OutcomeKind.TOO_LARGE):
                t.last_error = outcome.reason
                if config.failure_policy is FailurePolicy.BLOCK:
                    self.log.warn(
                        "{target_id} refused transaction {txn_id} permanently ({reason}); "
                        "the target is BLOCKED until it is woken",
                        target_id=target_id,
                        txn_id=txn.txn_id,
                        reason=outcome.reason,
                    )
                    await store.block(target_id, txn.txn_id, outcome.reason, now)
                    self._set_state(t, TargetState.BLOCKED)
                    t.wake_requested = False
                    return
                self.log.warn(
                    "{target_id} refused transaction {txn_id} of {n} events permanently "
                    "({reason}); it is dead-lettered",
                    target_id=target_id,
                    txn_id=txn.txn_id,
                    n=txn.n_events,
                    reason=outcome.reason,
                )
                txn = await store.dead_letter(
                    target_id, txn.txn_id, outcome.reason, config.max_events, config.max_bytes, now
                )
            else:
                await self._failed(t, txn, outcome, now)
                return

    async def _send(self, t: TargetRuntime, txn: Transaction) -> SendOutcome | None:
        """Send a transaction; None if the send was abandoned because the scheduler stops."""
        try:
            sending = self._transport.send(t.config, txn.txn_id, txn.body)
            t.in_flight = sending
            _faults.checkpoint("send.started")
            try:
                outcome = await sending
            finally:
                t.in_flight = None
            # A plugin transport's reason is not under our control: keep the token out of it.
            reason = scrub(outcome.reason, t.config.token)
            return outcome if reason == outcome.reason else attrs.evolve(outcome, reason=reason)
        except CancelledError:
            if self._stopping or t.removed:
                return None
            return SendOutcome.retry("the request was cancelled")
        except Exception as e:  # noqa: BLE001 - every send error is a transient failure
            return SendOutcome.retry(_describe(e, t.config))

    async def _failed(
        self, t: TargetRuntime, txn: Transaction, outcome: SendOutcome, now: float
    ) -> None:
        if t.recoverer is None:
            t.recoverer = self._recoverer(t, 0)
        recoverer = t.recoverer
        next_at = recoverer.failed(outcome.retry_after)
        if t.wake_requested:
            t.wake_requested = False
            next_at = recoverer.next_attempt_at = now
        t.last_error = outcome.reason
        was = t.state
        self._set_state(t, TargetState.DOWN)
        if was is not TargetState.DOWN:
            self.log.warn(
                "{target_id} is DOWN: transaction {txn_id} failed ({reason}); "
                "retrying in {delay:.1f}s",
                target_id=t.config.target_id,
                txn_id=txn.txn_id,
                reason=outcome.reason,
                delay=next_at - now,
            )
        else:
            self.log.info(
                "{target_id}: retry of transaction {txn_id} failed ({reason}), failure "
                "{failures}; next retry in {delay:.1f}s",
                target_id=t.config.target_id,
                txn_id=txn.txn_id,
                reason=outcome.reason,
                failures=recoverer.failures,
                delay=next_at - now,
            )
        await self._store.fail(
            t.config.target_id, txn.txn_id, recoverer.failures, next_at, outcome.reason, now
        )
        if not (self._stopping or t.removed):
            recoverer.schedule(next_at)

    def _now_up(self, t: TargetRuntime) -> None:
        if t.state is not TargetState.UP:
            self.log.info(
                "{target_id} is UP: its backlog is delivered", target_id=t.config.target_id
            )
        self._set_state(t, TargetState.UP)
        if t.recoverer is not None:
            t.recoverer.cancel()
            t.recoverer = None
        t.wake_requested = False

    def _set_state(self, t: TargetRuntime, state: TargetState) -> None:
        t.state = state

    # -- stopping -------------------------------------------------------------------------------

    def stop_timers(self) -> None:
        """Stop starting work: cancel every scheduled retry."""
        self._stopping = True
        for t in self.targets.values():
            if t.recoverer is not None:
                t.recoverer.cancel()
            if t.loop_retry is not None and t.loop_retry.active():
                t.loop_retry.cancel()
            t.loop_retry = None

    def running_loops(self) -> list[Deferred[None]]:
        """The delivery loops still running."""
        return list(self._loops.values())

    def cancel_sends(self) -> None:
        """Abandon every send in flight; their transactions stay pending, unchanged."""
        for t in self.targets.values():
            if t.in_flight is not None:
                t.in_flight.cancel()


async def _wait_all(loops: list[Deferred[None]]) -> None:
    for loop in loops:
        try:
            await loop
        except Exception:
            pass  # the loop's own error handling has logged it


def _describe(e: BaseException, config: TargetConfig) -> str:
    """A short description of a send error, for status and logs, without the target's token."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    name = type(e).__name__
    return scrub(f"{name}: {text}" if text else name, config.token, 200)
