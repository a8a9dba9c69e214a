"""
The TransactionController: forms, stores and sends each target's transactions.

For each target the controller runs at most one *delivery loop* at a time, so at most one
transaction is ever in flight per target, and transactions go out in id order, which is submit
order. A loop claims the target's next transaction from the store (the oldest stored one, or a
new one formed from the queue, with the next id and the attempt counted durably), sends it, and
records the outcome:

- delivered: the transaction is deleted and the next one claimed, in one database transaction;
- a failure: the target's retry policy (:class:`relayer.IRetryPolicy`) decides what it leads
  to (see :mod:`relayer.policy`): a retry, with the target marked DOWN with its backoff state
  and its :class:`~relayer.recoverer.Recoverer` scheduling the retry; a split, for a
  transaction too large; a dead letter; the target blocked, or disabled.

When a claim finds nothing left, the store marks the target UP in the same database transaction,
so the DOWN to UP transition cannot strand an event.

Every send also holds one of the scheduler's send slots (:mod:`relayer._slots`) while its
request is open, so that the sends in flight across all targets stay bounded; first attempts of
healthy targets take a free slot before retries do. A send that waits for its slot has not
started: its request timeout starts once it has the slot, and whether it may still go (the
scheduler stopping, the target removed, its lease) is looked at again after the wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from relayer import _faults
from relayer import _logevents as ev
from relayer._scrub import scrub_target
from relayer._slots import RECOVERY_PROBATION, SendClass, SendSlots
from relayer.config import BackoffPolicy, TargetConfig, _draw
from relayer.errors import ConfigurationError, LeaseLost, StoreUnavailable
from relayer.formats import MATRIX, IWireFormat, claim_limits
from relayer.observer import Observers
from relayer.policy import (
    Action,
    Decision,
    FailureInfo,
    IRetryPolicy,
    RetryPolicy,
    checked_decision,
)
from relayer.recoverer import Recoverer
from relayer.store.base import (
    Awaiting,
    Claim,
    Drained,
    IStore,
    TargetRecord,
    TargetState,
    Transaction,
)
from relayer.transport.base import (
    FailureClass,
    IRequestTransport,
    ITransport,
    OutcomeKind,
    SendOutcome,
    matrix_body,
)

#: After an unexpected error in a delivery loop (for example the database being unavailable),
#: the loop is restarted after this many seconds, doubling up to :data:`LOOP_RETRY_MAX`.
LOOP_RETRY_INITIAL = 1.0
LOOP_RETRY_MAX = 60.0

#: The default window over which overdue retries of DOWN targets are spread when many are
#: taken in charge at once (at start-up, or in a lease takeover), as Synapse spreads its
#: application-service recoveries over 30 s.
DEFAULT_RECOVERY_SPREAD = 30.0


def default_policy(config: TargetConfig) -> IRetryPolicy:
    """The retry policy of a target that names none: its backoff and failure policy."""
    if config.retry_policy is not None and not isinstance(config.retry_policy, str):
        policy: IRetryPolicy = config.retry_policy
        return policy
    return RetryPolicy(backoff=config.backoff, on_permanent=config.failure_policy)


@attrs.frozen
class _Unrecorded:
    """
    A failed attempt's outcome that is not stored yet, because the store was unavailable.

    Attributes:
        state: DOWN for a failure retried at ``next_attempt_at``; BLOCKED or DISABLED for a
            target held until it is woken.
        txn_id: The transaction that failed.
        failures: The target's consecutive failures, this one included.
        next_attempt_at: When the transaction is retried (DOWN).
        reason: What the target answered.
        down_since: When the target's run of failures began.
        dead_letter: For DOWN, the reason the transaction is dead-lettered with (a policy gave
            up on it), or None.
        n_events: How many events the transaction holds.
        went_down: Whether the target was not DOWN before this failure.
    """

    state: TargetState
    txn_id: int
    failures: int
    next_attempt_at: float
    reason: str
    down_since: float | None = None
    dead_letter: str | None = None
    n_events: int = 0
    went_down: bool = False

    @property
    def held(self) -> bool:
        """Whether the target is held (BLOCKED or DISABLED) until it is woken."""
        return self.state is not TargetState.DOWN


@attrs.define(eq=False)
class TargetRuntime:
    """
    A target's delivery state in memory.

    Attributes:
        config: The target's configuration.
        state: UP, DOWN, BLOCKED or DISABLED, as last stored.
        last_success_at: When a transaction was last delivered.
        last_error: A short description of the last failure.
        recoverer: The target's Recoverer while it is DOWN.
        running: Whether a delivery loop is active.
        in_flight: The send in progress, if any.
        slot_wait: The wait for a send slot, while the loop waits for one.
        dirty: New events were stored since the running loop last looked.
        wake_requested: The target was woken while its loop was running.
        removed: The controller no longer delivers to the target.
        loop_errors: Consecutive delivery loops that ended on an error.
        loop_retry: The restart of a loop that ended on an error, if one is scheduled.
        unrecorded: An outcome that could not be stored yet; it is stored before anything
            else is sent to the target.
        not_before: No send to the target starts before this time (clock seconds): after a
            takeover, the previous owner's last request must have ended.
        fence: The delayed call that resumes the target at ``not_before``.
        awaiting: The transaction awaiting its confirmation, if any: nothing else is sent
            until it is confirmed or its confirmation timeout passes.
        confirm_timer: The delayed call that resends it when its confirmation timeout passes.
        policy: The target's retry policy.
        down_since: When the target's current run of failures began, or None.
        unheld: The target was BLOCKED or DISABLED, and woken: it shows DOWN, but a failure
            of its resend is its first failure since, and is observed as it going DOWN.
        observed_down: Observers were told the target went DOWN (or was blocked or disabled),
            or it was stored so, and have not been told it is UP again since: they are, once
            the store holds it UP.
        wire: The target's wire format.
        failed_at: When an attempt of the target last failed (in this process), or None.
        first_claim: While the loop waits for the claim made with the events being stored
            (see :meth:`TransactionController.reserve_first_claims`), the Deferred it waits on.
    """

    config: TargetConfig
    state: TargetState = TargetState.UP
    last_success_at: float | None = None
    last_error: str | None = None
    recoverer: Recoverer | None = None
    running: bool = False
    in_flight: Deferred[SendOutcome] | None = None
    slot_wait: Deferred[None] | None = None
    dirty: bool = False
    wake_requested: bool = False
    removed: bool = False
    loop_errors: int = 0
    loop_retry: IDelayedCall | None = None
    unrecorded: _Unrecorded | None = None
    not_before: float = float("-inf")
    fence: IDelayedCall | None = None
    awaiting: int | None = None
    confirm_timer: IDelayedCall | None = None
    policy: IRetryPolicy = attrs.field(factory=RetryPolicy)
    down_since: float | None = None
    unheld: bool = False
    observed_down: bool = False
    wire: IWireFormat = MATRIX
    failed_at: float | None = None
    first_claim: Deferred[Any] | None = None

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
            restart = float(self.loop_retry.getTime())
            if self.unrecorded is not None and not self.unrecorded.held:
                # The restart stores the failure; the retry itself waits for its backoff.
                return max(restart, self.unrecorded.next_attempt_at)
            return restart
        if self.fence is not None and self.fence.active():
            return float(self.fence.getTime())
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
        recovery_spread: The most seconds by which the overdue retries of DOWN targets taken
            in charge together (at start-up, or in a lease takeover) are spread, so that they
            do not all fire at once; each target's share is at most its backoff's maximum.
        policy_for: Gives a target's retry policy; by default, its ``retry_policy`` object or
            one built from its backoff and failure policy (see :func:`default_policy`).
        observers: Told of deliveries, failures and changes of state.
        failure_thresholds: Counts of consecutive failures at which observers are told (see
            :meth:`relayer.IDeliveryObserver.failures_crossed`).
        slots: The bound on sends in flight across targets; by default, none.
    """

    log = Logger(namespace="relayer.controller")

    def __init__(
        self,
        clock: IReactorTime,
        store: IStore,
        transport: ITransport,
        random: Callable[[], float],
        may_send: Callable[[TargetRuntime], bool] | None = None,
        recovery_spread: float = DEFAULT_RECOVERY_SPREAD,
        policy_for: Callable[[TargetConfig], IRetryPolicy] | None = None,
        observers: Observers | None = None,
        failure_thresholds: Sequence[int] = (),
        slots: SendSlots | None = None,
    ) -> None:
        self.slots = slots if slots is not None else SendSlots(None)
        self._policy_for = policy_for if policy_for is not None else default_policy
        self._observers = observers if observers is not None else Observers()
        self._thresholds = frozenset(failure_thresholds)
        self._clock = clock
        self._may_send = may_send if may_send is not None else (lambda t: True)
        self._paused: set[str] = set()
        self._store = store
        self._transport = transport
        self._random = random
        self._recovery_spread = recovery_spread
        self.targets: dict[str, TargetRuntime] = {}
        self._loops: dict[str, Deferred[None]] = {}
        self._stopping = False

    # -- targets --------------------------------------------------------------------------------

    def add(
        self,
        config: TargetConfig,
        record: TargetRecord,
        not_before: float | None = None,
        wire: IWireFormat = MATRIX,
    ) -> TargetRuntime | None:
        """
        Take charge of a target, in the state the store holds for it, and resume its work.

        Args:
            config: The target's configuration.
            record: Its stored state.
            not_before: No send to it starts before this time (after a lease takeover).
            wire: Its wire format, resolved from ``config.format``; the Matrix format by
                default.

        Returns:
            The target's runtime state; None if the controller is stopping (nothing is
            resumed then) or already has the target (it is left as it is).
        """
        if self._stopping or config.target_id in self.targets:
            return None
        t = TargetRuntime(
            config=config,
            state=record.state,
            last_success_at=record.last_success_at,
            last_error=record.last_error,
            policy=self._policy_for(config),
            down_since=record.down_since,
            wire=wire,
            observed_down=record.state is not TargetState.UP,
        )
        if not_before is not None:
            t.not_before = not_before
        self.targets[config.target_id] = t
        if t.down_since is None and record.state in (TargetState.DOWN, TargetState.DISABLED):
            # Stored before the time was kept (an upgraded database): count from now.
            t.down_since = self._clock.seconds()
        if record.state is TargetState.DOWN:
            t.recoverer = self._recoverer(t, record.failures)
            now = self._clock.seconds()
            when = record.next_attempt_at
            if when is None or when <= now:
                # Overdue (after a restart or a takeover): spread such retries over a window,
                # so that many targets that went down together are not retried as a herd.
                window = min(self._recovery_spread, self._longest_delay(t))
                when = now + window * _draw(self._random)
            t.recoverer.schedule(when)
        elif record.state is TargetState.UP and record.has_pending:
            self._kick(t)
        elif record.state is TargetState.DISABLED:
            # Held until woken; its count of failures is kept for status.
            t.recoverer = self._recoverer(t, record.failures)
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
            _cancel_timers(t)
            if t.slot_wait is not None:
                # Not sent yet: the loop stops here, and the transaction stays pending.
                t.slot_wait.cancel()
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
            if t.state not in _HELD or t.unrecorded is not None:
                self._kick(t)

    def _recoverer(self, t: TargetRuntime, failures: int) -> Recoverer:
        return Recoverer(self._clock, t.config.target_id, lambda: self._kick(t), failures=failures)

    def _backoff(self, t: TargetRuntime, failures: int) -> float:
        """The policy's delay after ``failures`` failures; a safe one if the policy fails."""
        try:
            delay = t.policy.backoff_delay(failures, self._random)
            checked = checked_decision(Decision.retry(delay))
        except Exception:
            self.log.failure(
                "The retry policy of {target} failed",
                relayer_event=ev.POLICY_FAILED,
                target=t.config.target_id,
                method="backoff_delay",
            )
            checked = None
        if checked is None or checked.delay is None:
            return _FALLBACK.delay(max(1, failures), self._random)
        return checked.delay

    def _longest_delay(self, t: TargetRuntime) -> float:
        try:
            delay = t.policy.backoff_delay(1_000_000, lambda: 0.0)
            return float(delay) if 0 <= delay < float("inf") else _FALLBACK.maximum
        except Exception:
            return _FALLBACK.maximum

    def notify(self, target_ids: Iterable[str]) -> None:
        """Events were stored for these targets: deliver them if the target is UP."""
        for target_id in target_ids:
            t = self.targets.get(target_id)
            if t is None:
                continue
            t.dirty = True
            if t.state is TargetState.UP and not t.running:
                self._kick(t)

    def reserve_first_claims(
        self, target_ids: Iterable[str], most: int
    ) -> dict[str, tuple[int, int, float | None]]:
        """
        Start the loops of up to ``most`` of these targets that are idle, each to send its
        first transaction as claimed with the events being stored for it.

        Events are about to be stored for ``target_ids``. A target that is UP and has nothing
        under way would claim its first transaction once they are stored, in a database
        transaction of its own; the store can claim it in the one that stores the events
        instead, which spares the new events a second wait for the database. Each loop started
        here waits for :meth:`first_claims`, and nothing else starts one for the target
        meanwhile, so the claim made with the events is the loop's own.

        Returns:
            Each reserved target's ``(max_events, max_bytes, default_ttl)``, for the claim.
        """
        reserved: dict[str, tuple[int, int, float | None]] = {}
        if self._stopping:
            return reserved
        now = self._clock.seconds()
        for target_id in target_ids:
            if len(reserved) >= most:
                break
            t = self.targets.get(target_id)
            if t is None or not self._idle(t, now):
                continue
            first: Deferred[Any] = Deferred()
            t.first_claim = first
            self._kick(t, first)
            if t.running and t.first_claim is first:
                # The loop waits for it (it ends at once if the target may not send now).
                config = t.config
                reserved[target_id] = (*claim_limits(config, t.wire), config.default_ttl)
            else:
                t.first_claim = None
        return reserved

    def first_claims(self, target_ids: Iterable[str], claimed: Mapping[str, Claim]) -> None:
        """
        Hand the reserved loops of ``target_ids`` their first claims: each target's entry in
        ``claimed``, once durable. A target that has none there (the events were not stored
        with it) claims for itself, as any loop does.
        """
        for target_id in target_ids:
            t = self.targets.get(target_id)
            if t is None or t.first_claim is None:
                continue
            first, t.first_claim = t.first_claim, None
            first.callback(claimed.get(target_id, _UNCLAIMED))

    def _idle(self, t: TargetRuntime, now: float) -> bool:
        """Whether the target is UP with nothing under way, so that a send may start now."""
        return (
            t.state is TargetState.UP
            and not t.running
            and not t.removed
            and not t.wake_requested
            and t.unrecorded is None
            and t.awaiting is None
            and now >= t.not_before
            and t.config.target_id not in self._paused
            and not _scheduled(t.loop_retry)
            and not _scheduled(t.fence)
            and not _scheduled(t.confirm_timer)
        )

    def confirmed(self, target_id: str) -> None:
        """A transaction of the target was confirmed: go on with the next ones."""
        t = self.targets.get(target_id)
        if t is None:
            return
        t.dirty = True
        if t.confirm_timer is not None and t.confirm_timer.active():
            t.confirm_timer.cancel()
        t.confirm_timer = None
        t.awaiting = None
        if t.state is TargetState.UP and not t.running:
            self._kick(t)

    def wake(self, target_id: str) -> None:
        """Retry a target now: a DOWN target's backoff is cut short, a BLOCKED one unblocked."""
        t = self.targets[target_id]
        if t.running:
            # A send may be in flight, or its outcome being stored: never start a second
            # send. The loop honours the wake when it ends (see _finished).
            t.wake_requested = True
            return
        self._wake(t)

    def _wake(self, t: TargetRuntime) -> None:
        t.wake_requested = False
        pending = t.unrecorded
        if pending is not None:
            if pending.held:
                # The block was never stored: the target is unblocked before it is, and its
                # head transaction is sent again.
                t.unrecorded = None
                if pending.state is TargetState.DISABLED:
                    self._restart_failures(t)
                self._set_state(t, TargetState.DOWN)
                t.unheld = True
            else:
                # The failure is still stored (it is true), with the retry due now.
                t.unrecorded = attrs.evolve(pending, next_attempt_at=self._clock.seconds())
            self._kick(t)
            return
        if t.state in _HELD:
            # Unblocked now, also in what status() shows, even if its resend has to wait (for
            # a takeover's fence): it is retried like a DOWN target, and blocked again only
            # if the resend is refused again. A disabled target starts its count of failures
            # again, so that its policy does not disable it at the first one.
            if t.state is TargetState.DISABLED:
                self._restart_failures(t)
            self._set_state(t, TargetState.DOWN)
            t.unheld = True
        if t.recoverer is not None:
            t.recoverer.wake()
        else:
            self._kick(t)

    @staticmethod
    def _restart_failures(t: TargetRuntime) -> None:
        t.down_since = None
        if t.recoverer is not None:
            t.recoverer.failures = 0

    def idle_targets(self) -> list[str]:
        """
        The targets that nothing is under way for: UP, no loop running, no retry scheduled.

        A sweep asks the store which of them have pending work (see
        :meth:`relayer.Scheduler`), in case a notification of new events was missed.
        """
        return [
            target_id
            for target_id, t in self.targets.items()
            if t.state is TargetState.UP
            and not t.running
            and target_id not in self._paused
            and not _scheduled(t.loop_retry)
            and not _scheduled(t.fence)
            and not _scheduled(t.confirm_timer)
        ]

    def recheck_awaiting(self) -> list[str]:
        """
        Look again at every target whose head transaction awaits its confirmation.

        A confirmation recorded by another process reaches this one through a notification
        (PostgreSQL) that may be missed, or not at all (SQLite): a sweep calls this, so that
        such a target goes on within a sweep interval rather than at its confirmation timeout.
        Returns the ids looked at.
        """
        ids = []
        for target_id, t in list(self.targets.items()):
            if t.awaiting is None or t.running or target_id in self._paused:
                continue
            ids.append(target_id)
            self._kick(t)
        return ids

    def revive_stalled(self) -> list[str]:
        """
        Give a retry to every DOWN or draining target that has nothing under way.

        Every path that leaves a target DOWN schedules its retry; this repairs the state should
        one ever not, so that no backlog waits for a restart. Returns the ids revived.
        """
        revived = []
        for target_id, t in list(self.targets.items()):
            if t.state is not TargetState.DOWN or t.running or target_id in self._paused:
                continue
            if _scheduled(t.loop_retry) or _scheduled(t.fence):
                continue
            if t.recoverer is not None and t.recoverer.scheduled:
                continue
            self.log.warn(
                "{target} was DOWN with no retry scheduled; retrying it now",
                relayer_event=ev.TARGET_REVIVED,
                target=target_id,
            )
            revived.append(target_id)
            self._kick(t)
        return revived

    # -- the delivery loop ----------------------------------------------------------------------

    def _kick(self, t: TargetRuntime, first: Deferred[Any] | None = None) -> None:
        if t.running or self._stopping or t.removed:
            return
        now = self._clock.seconds()
        if now < t.not_before:
            # After a takeover: the previous owner's last request may still be open.
            if not _scheduled(t.fence):
                t.fence = self._clock.callLater(t.not_before - now, self._kick, t)
            return
        if t.loop_retry is not None and t.loop_retry.active():
            t.loop_retry.cancel()
        t.loop_retry = None
        t.running = True
        t.dirty = False
        target_id = t.config.target_id
        d = Deferred.fromCoroutine(self._deliver(t, first))
        self._loops[target_id] = d
        d.addBoth(self._finished, t, d)

    def _finished(self, result: object, t: TargetRuntime, d: Deferred[None]) -> None:
        target_id = t.config.target_id
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
        if self._stopping or t.removed:
            return
        if t.wake_requested:
            # Woken while the loop ran (while a send was in flight, or its outcome was being
            # stored): the retry happens now, not after the backoff.
            self._wake(t)
        elif t.dirty and t.state is TargetState.UP and not isinstance(result, Failure):
            # Events stored while the loop was finishing: look again.
            self._kick(t)

    def _loop_failed(self, t: TargetRuntime, failure: Failure) -> None:
        if self._stopping or t.removed:
            return
        t.loop_errors += 1
        delay = min(LOOP_RETRY_INITIAL * 2 ** min(t.loop_errors - 1, 16), LOOP_RETRY_MAX)
        if failure.check(StoreUnavailable):
            # Said once at warn; while the store stays unavailable, every target's retries
            # would flood the log at that level.
            self.log.emit(
                LogLevel.warn if t.loop_errors == 1 else LogLevel.info,
                "Delivery to {target} paused: {error}; retrying in {delay:.1f}s",
                relayer_event=ev.DELIVERY_PAUSED,
                target=t.config.target_id,
                error=failure.getErrorMessage(),
                delay=delay,
            )
        else:
            self.log.failure(
                "Delivery to {target} stopped on an unexpected error; retrying in {delay:.1f}s",
                failure,
                relayer_event=ev.DELIVERY_ERROR,
                target=t.config.target_id,
                delay=delay,
            )
        t.loop_retry = self._clock.callLater(delay, self._kick, t)

    async def _deliver(self, t: TargetRuntime, first: Deferred[Any] | None = None) -> None:
        config = t.config
        target_id = config.target_id
        store = self._store
        limits = claim_limits(config, t.wire)
        ttl = config.default_ttl
        if not self._may_send(t):
            t.first_claim = None
            self._paused.add(target_id)
            return
        if t.unrecorded is not None:
            # An outcome that the store could not take: store it before anything else, and
            # resume as it says (a retry after its backoff, or blocked).
            await self._record(t)
            return
        txn: Claim
        found: object = _UNCLAIMED if first is None else await first
        if found is _UNCLAIMED:
            txn = await store.claim(target_id, *limits, self._clock.seconds(), default_ttl=ttl)
        else:
            txn = cast(Claim, found)
        # Nothing but ``txn`` holds the claimed transaction (see _released).
        first = found = None
        while True:
            if isinstance(txn, Awaiting):
                # The head transaction awaits its confirmation: nothing else goes out until it
                # comes, or until its timeout, when the transaction is sent again.
                self._await_confirmation(t, txn)
                return
            if isinstance(txn, Drained):
                # What the DOWN target had left expired before it answered: it stays DOWN,
                # and events stored meanwhile wait for its next retry.
                self._still_down(t)
                return
            t.awaiting = None
            if txn is None:
                if t.dirty and not self._stopping:
                    t.dirty = False
                    txn = await store.claim(
                        target_id, *limits, self._clock.seconds(), default_ttl=ttl
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
            if txn.deadline is not None and self._clock.seconds() >= txn.deadline:
                # An event's deadline passed since the claim: no send may start now. Claiming
                # again abandons the transaction and forms its live events anew.
                txn = await store.claim(target_id, *limits, self._clock.seconds(), default_ttl=ttl)
                continue
            kind = _send_class(t, txn, self._clock.seconds())
            waited = await self._take_slot(t, kind)
            if waited is None:
                # The wait was withdrawn: the scheduler stops, or the target was removed.
                return
            reclaim = False
            try:
                if waited:
                    # Time passed while waiting: look again at whether the send may go.
                    if self._stopping or t.removed:
                        return
                    if not self._may_send(t):
                        self._paused.add(target_id)
                        return
                    reclaim = txn.deadline is not None and self._clock.seconds() >= txn.deadline
                if not reclaim:
                    _faults.checkpoint("txn.stored")
                    # What the loop keeps of the transaction while it is sent: what it needs to
                    # record the outcome (its events' bytes go with the request).
                    released = _released(txn)
                    sending = self._attempt(t, txn)
                    txn = released
                    outcome = await sending
            finally:
                self.slots.release(kind)
            if reclaim:
                txn = await store.claim(target_id, *limits, self._clock.seconds(), default_ttl=ttl)
                continue
            now = self._clock.seconds()
            if outcome is None:
                return
            if outcome.kind in (OutcomeKind.DELIVERED, OutcomeKind.ACCEPTED):
                _faults.checkpoint("send.accepted")
                t.last_success_at = now
                t.last_error = None
                t.wake_requested = False
                t.down_since = None
                t.unheld = False
                if t.recoverer is not None:
                    t.recoverer.failures = 0
                if t.state in _HELD:
                    # Unblocked: the rest of the backlog drains as after an outage.
                    self._set_state(t, TargetState.DOWN)
                sent = txn
                if outcome.kind is OutcomeKind.ACCEPTED:
                    txn = await store.accepted(
                        target_id,
                        txn.txn_id,
                        now + config.confirmation_timeout,
                        *limits,
                        now,
                        default_ttl=ttl,
                    )
                else:
                    txn = await store.complete(target_id, txn.txn_id, *limits, now, default_ttl=ttl)
                self.log.debug(
                    "Transaction {txn} of {events} events to {target}: {outcome} "
                    "(attempt {attempts})",
                    relayer_event=ev.TXN_ACCEPTED
                    if outcome.kind is OutcomeKind.ACCEPTED
                    else ev.TXN_DELIVERED,
                    target=target_id,
                    txn=sent.txn_id,
                    events=sent.n_events,
                    attempts=sent.attempts,
                    outcome=outcome.kind.value,
                    latency=now - sent.oldest_at,
                )
                if self._observers:
                    self._observers.delivered(
                        target_id, sent.txn_id, sent.n_events, sent.attempts, now - sent.oldest_at
                    )
                continue
            info, decision = self._decide(t, txn, outcome, now)
            if self._observers:
                self._observers.failed(
                    target_id, txn.txn_id, info.failure, outcome.reason, info.failures
                )
            action = decision.action
            if action is Action.SPLIT and txn.n_events > 1:
                self.log.info(
                    "{target} refused transaction {txn} of {events} events as too large "
                    "({reason}); splitting it",
                    relayer_event=ev.TXN_SPLIT,
                    target=target_id,
                    txn=txn.txn_id,
                    events=txn.n_events,
                    outcome=outcome.kind.value,
                    failure_class=info.failure.value,
                    reason=outcome.reason,
                    attempts=txn.attempts,
                    failures=info.failures,
                )
                split = await store.split(target_id, txn.txn_id, now, default_ttl=ttl)
                if split is None:
                    txn = await store.claim(target_id, *limits, now, default_ttl=ttl)
                else:
                    # Held by ``txn`` alone, so that its events go with its request.
                    txn, split = split, None
                continue
            if action is Action.SPLIT:
                action = Action.DEAD_LETTER
            reason = f"{decision.reason} ({outcome.reason})" if decision.reason else outcome.reason
            if action is Action.BLOCK:
                t.last_error = reason
                self.log.warn(
                    "{target} refused transaction {txn} permanently ({reason}); "
                    "the target is BLOCKED until it is woken",
                    relayer_event=ev.TARGET_BLOCKED,
                    target=target_id,
                    txn=txn.txn_id,
                    events=txn.n_events,
                    outcome=outcome.kind.value,
                    failure_class=info.failure.value,
                    reason=reason,
                    attempts=txn.attempts,
                    failures=info.failures,
                )
                self._set_state(t, TargetState.BLOCKED)
                t.unrecorded = _Unrecorded(
                    TargetState.BLOCKED, txn.txn_id, t.failures, now, reason, t.down_since
                )
                await self._record(t)
                return
            if action is Action.DISABLE:
                t.last_error = reason
                if t.down_since is None:
                    t.down_since = now
                self.log.warn(
                    "{target} is DISABLED by its retry policy: {reason}; its events are "
                    "kept, and nothing is sent until it is woken",
                    relayer_event=ev.TARGET_DISABLED,
                    target=target_id,
                    txn=txn.txn_id,
                    events=txn.n_events,
                    outcome=outcome.kind.value,
                    failure_class=info.failure.value,
                    reason=reason,
                    attempts=txn.attempts,
                    failures=info.failures,
                )
                self._set_state(t, TargetState.DISABLED)
                if t.recoverer is None:
                    t.recoverer = self._recoverer(t, info.failures)
                t.recoverer.cancel()
                t.recoverer.failures = info.failures
                t.unrecorded = _Unrecorded(
                    TargetState.DISABLED, txn.txn_id, info.failures, now, reason, t.down_since
                )
                await self._record(t)
                return
            if action is Action.DEAD_LETTER and outcome.kind is not OutcomeKind.RETRY:
                # The target answered about the content: go on at once with the next one.
                self.log.warn(
                    "{target} refused transaction {txn} of {events} events permanently "
                    "({reason}); it is dead-lettered",
                    relayer_event=ev.TXN_DEAD_LETTERED,
                    target=target_id,
                    txn=txn.txn_id,
                    events=txn.n_events,
                    outcome=outcome.kind.value,
                    failure_class=info.failure.value,
                    reason=reason,
                    attempts=txn.attempts,
                    failures=info.failures,
                )
                t.last_error = reason
                dead = txn
                txn = await store.dead_letter(
                    target_id, txn.txn_id, reason, *limits, now, default_ttl=ttl
                )
                if self._observers:
                    self._observers.dead_lettered(target_id, dead.txn_id, dead.n_events, reason)
                continue
            if action is Action.DEAD_LETTER:
                # A policy gave up on a transaction that the target did not answer: it is
                # dead-lettered, and the target, still failing, waits for its backoff.
                self.log.warn(
                    "{target}: transaction {txn} of {events} events is dead-lettered: {reason}",
                    relayer_event=ev.TXN_DEAD_LETTERED,
                    target=target_id,
                    txn=txn.txn_id,
                    events=txn.n_events,
                    outcome=outcome.kind.value,
                    failure_class=info.failure.value,
                    reason=reason,
                    attempts=txn.attempts,
                    failures=info.failures,
                )
                delay = self._backoff(t, info.failures)
                self._failed(t, txn, outcome, delay, now, dead_letter=reason)
            else:
                assert decision.delay is not None
                self._failed(t, txn, outcome, decision.delay, now)
            await self._record(t)
            return

    async def _take_slot(self, t: TargetRuntime, kind: SendClass) -> bool | None:
        """
        Take a send slot: False if one was free at once, True once one came after a wait, and
        None if the wait was withdrawn (the scheduler stops, or the target was removed).
        """
        waiter = self.slots.acquire(kind)
        if waiter.called:
            return False
        t.slot_wait = waiter
        try:
            await waiter
        except CancelledError:
            return None
        finally:
            t.slot_wait = None
        return True

    def _decide(
        self, t: TargetRuntime, txn: Transaction, outcome: SendOutcome, now: float
    ) -> tuple[FailureInfo, Decision]:
        """Ask the target's policy what a failed attempt leads to; retry if it cannot say."""
        info = FailureInfo(
            target_id=t.config.target_id,
            txn_id=txn.txn_id,
            failure=outcome.failure_class or FailureClass.TRANSIENT,
            reason=outcome.reason,
            retry_after=outcome.retry_after,
            attempts=txn.attempts,
            failures=t.failures + 1,
            n_events=txn.n_events,
            oldest_at=txn.oldest_at,
            down_since=t.down_since if t.down_since is not None else now,
            now=now,
        )
        try:
            answer = t.policy.decide(info, self._random)
        except Exception:
            self.log.failure(
                "The retry policy of {target} failed; the transaction is retried",
                relayer_event=ev.POLICY_FAILED,
                target=info.target_id,
                method="decide",
            )
            answer = None
        decision = checked_decision(answer)
        if decision is None:
            if answer is not None:
                self.log.error(
                    "The retry policy of {target} answered {answer}, not a valid Decision; "
                    "the transaction is retried",
                    relayer_event=ev.POLICY_INVALID,
                    target=info.target_id,
                    answer=repr(answer),
                )
            decision = Decision.retry(self._backoff(t, info.failures))
        return info, decision

    def _still_down(self, t: TargetRuntime) -> None:
        """Keep a DOWN target DOWN, and schedule its next retry after its current backoff."""
        if t.state is not TargetState.DOWN:
            self._set_state(t, TargetState.DOWN)
        if t.recoverer is None:
            t.recoverer = self._recoverer(t, 1)
        failures = max(1, t.recoverer.failures)
        t.recoverer.schedule(self._clock.seconds() + self._backoff(t, failures))

    def _await_confirmation(self, t: TargetRuntime, awaiting: Awaiting) -> None:
        """Hold the target until its head transaction is confirmed, or its timeout passes."""
        if t.recoverer is not None:
            t.recoverer.cancel()
            t.recoverer = None
        if t.state is not TargetState.UP:
            # UP here, since the target answered; the store holds it UP, and observers hear
            # of it, once its backlog is delivered.
            t.down_since = None
            self._set_state(t, TargetState.UP)
        t.awaiting = awaiting.txn_id
        if t.confirm_timer is not None and t.confirm_timer.active():
            t.confirm_timer.cancel()
        delay = max(0.0, awaiting.confirm_by - self._clock.seconds())
        t.confirm_timer = self._clock.callLater(delay, self._confirmation_due, t)

    def _confirmation_due(self, t: TargetRuntime) -> None:
        t.confirm_timer = None
        self._kick(t)

    def _request(
        self, t: TargetRuntime, txn: Transaction
    ) -> Callable[[], Deferred[SendOutcome]] | SendOutcome:
        """
        Frame a transaction in the target's wire format: what starts its send, or the outcome
        of an attempt that cannot be made (the transaction is too large for the format, or
        framing it failed).
        """
        config = t.config
        wire = t.wire
        if wire.max_events is not None and txn.n_events > wire.max_events:
            # Formed before the target took this format: split until each part fits.
            return SendOutcome.too_large(
                f"{txn.n_events} events are more than one request of the {wire.name!r} wire "
                f"format carries ({wire.max_events})"
            )
        transport = self._transport
        try:
            if IRequestTransport.providedBy(transport):
                request = wire.request(config, txn, self._clock.seconds())
                return lambda: transport.send_request(config, request, wire)
            if wire is MATRIX:
                txn_id, body = txn.txn_id, matrix_body(txn.events)
                return lambda: transport.send(config, txn_id, body)
            raise ConfigurationError(
                f"the wire format {wire.name!r} needs a transport that provides IRequestTransport"
            )
        except CancelledError:
            return SendOutcome.retry("the request was cancelled")
        except Exception as e:  # noqa: BLE001 - every send error is a transient failure
            return SendOutcome(OutcomeKind.RETRY, _describe(e, config), failure=_failure_class(e))

    def _attempt(self, t: TargetRuntime, txn: Transaction) -> Deferred[SendOutcome | None]:
        """
        Frame a transaction and send it (see :meth:`_send`); what the returned Deferred holds
        meanwhile is its request, not the transaction's events.
        """
        start = self._request(t, txn)
        if isinstance(start, SendOutcome):
            return succeed(start)
        return Deferred.fromCoroutine(self._send(t, start))

    async def _send(
        self, t: TargetRuntime, start: Callable[[], Deferred[SendOutcome]]
    ) -> SendOutcome | None:
        """
        Send a transaction, framed by :meth:`_request`; None if the send was abandoned because
        the scheduler stops.

        The target's ``request_timeout`` is enforced here, whatever the transport does: at the
        deadline the send is abandoned and counts as a transient failure, so no send outlives
        the time it was allowed (with leases, the lease it was sent under). The loop waits on a
        Deferred of its own, so that a transport whose Deferred never fires, or whose canceller
        fails, cannot hold it.
        """
        config = t.config
        timeout = config.request_timeout
        expired = False

        def cancel_send(_: object) -> None:
            try:
                sending.cancel()
            except Exception:
                self.log.failure(
                    "Cancelling a send to {target} failed",
                    relayer_event=ev.DELIVERY_CANCEL_FAILED,
                    target=config.target_id,
                )

        def forward(result: Any) -> None:
            if not waiting.called:
                waiting.callback(result)  # a Failure errbacks

        def expire() -> None:
            nonlocal expired
            expired = True
            waiting.cancel()

        waiting: Deferred[SendOutcome] = Deferred(cancel_send)
        try:
            sending = start()
            sending.addBoth(forward)
            deadline = self._clock.callLater(timeout, expire)
            t.in_flight = waiting
            _faults.checkpoint("send.started")
            try:
                outcome = await waiting
            finally:
                t.in_flight = None
                if deadline.active():
                    deadline.cancel()
        except CancelledError:
            if expired:
                return SendOutcome(
                    OutcomeKind.RETRY,
                    f"no response within the request timeout of {timeout:g}s",
                    failure=FailureClass.TIMEOUT,
                )
            if self._stopping or t.removed:
                return None
            return SendOutcome.retry("the request was cancelled")
        except Exception as e:  # noqa: BLE001 - every send error is a transient failure
            return SendOutcome(OutcomeKind.RETRY, _describe(e, config), failure=_failure_class(e))
        if not isinstance(outcome, SendOutcome):
            return SendOutcome.retry(
                f"the transport answered {type(outcome).__name__}, not a SendOutcome"
            )
        # A plugin transport's reason is not under our control: keep the secrets out of it.
        reason = scrub_target(str(outcome.reason), config)
        return outcome if reason == outcome.reason else attrs.evolve(outcome, reason=reason)

    def _failed(
        self,
        t: TargetRuntime,
        txn: Transaction,
        outcome: SendOutcome,
        delay: float,
        now: float,
        dead_letter: str | None = None,
    ) -> None:
        """Count a failure in memory, retried after ``delay``; :meth:`_record` stores it."""
        t.failed_at = now
        if t.recoverer is None:
            t.recoverer = self._recoverer(t, 0)
        recoverer = t.recoverer
        next_at = recoverer.failed(delay)
        if t.wake_requested:
            t.wake_requested = False
            next_at = recoverer.next_attempt_at = now
        t.last_error = dead_letter if dead_letter is not None else outcome.reason
        if t.down_since is None:
            t.down_since = now
        went_down = t.state is not TargetState.DOWN or t.unheld
        t.unheld = False
        self._set_state(t, TargetState.DOWN)
        if went_down:
            self.log.warn(
                "{target} is DOWN: transaction {txn} failed ({reason}); retrying in {delay:.1f}s",
                relayer_event=ev.TARGET_DOWN,
                target=t.config.target_id,
                txn=txn.txn_id,
                events=txn.n_events,
                outcome=outcome.kind.value,
                failure_class=(outcome.failure_class or FailureClass.TRANSIENT).value,
                reason=outcome.reason,
                attempts=txn.attempts,
                failures=recoverer.failures,
                delay=next_at - now,
            )
        else:
            self.log.info(
                "{target}: retry of transaction {txn} failed ({reason}), failure "
                "{failures}; next retry in {delay:.1f}s",
                relayer_event=ev.TXN_RETRY_FAILED,
                target=t.config.target_id,
                txn=txn.txn_id,
                events=txn.n_events,
                outcome=outcome.kind.value,
                failure_class=(outcome.failure_class or FailureClass.TRANSIENT).value,
                reason=outcome.reason,
                attempts=txn.attempts,
                failures=recoverer.failures,
                delay=next_at - now,
            )
        t.unrecorded = _Unrecorded(
            TargetState.DOWN,
            txn.txn_id,
            recoverer.failures,
            next_at,
            t.last_error,
            t.down_since,
            dead_letter,
            txn.n_events,
            went_down,
        )

    async def _record(self, t: TargetRuntime) -> None:
        """
        Store the target's unrecorded outcome, then act on it.

        If the store fails, the outcome stays unrecorded and the loop ends on the error: it is
        restarted after the loop-error delay and stores the outcome first, without sending.
        The in-memory failure count therefore never runs ahead of the stored one by more than
        the outcome in hand, and a retry never comes earlier than its backoff. Observers are
        told once it is stored.
        """
        pending = t.unrecorded
        assert pending is not None
        target_id = t.config.target_id
        now = self._clock.seconds()
        since = pending.down_since if pending.down_since is not None else now
        if pending.state is TargetState.BLOCKED:
            await self._store.block(target_id, pending.txn_id, pending.reason, now)
        elif pending.state is TargetState.DISABLED:
            await self._store.disable(
                target_id, pending.txn_id, pending.reason, pending.failures, since, now
            )
        else:
            await self._store.fail(
                target_id,
                pending.txn_id,
                pending.failures,
                pending.next_attempt_at,
                pending.reason,
                now,
                down_since=since,
                dead_letter=pending.dead_letter,
            )
        if t.unrecorded is pending:
            t.unrecorded = None
        if self._observers:
            self._observed(pending, t)
        if self._stopping or t.removed or pending.held:
            return
        if t.recoverer is None:
            t.recoverer = self._recoverer(t, pending.failures)
        t.recoverer.schedule(pending.next_attempt_at)

    def _observed(self, pending: _Unrecorded, t: TargetRuntime) -> None:
        """Tell the observers of a stored failure's consequences."""
        target_id = t.config.target_id
        if pending.held or pending.went_down:
            t.observed_down = True
        observers = self._observers
        if pending.state is TargetState.BLOCKED:
            observers.target_blocked(target_id, pending.txn_id, pending.reason)
            return
        if pending.dead_letter is not None:
            observers.dead_lettered(
                target_id, pending.txn_id, pending.n_events, pending.dead_letter
            )
        if pending.state is TargetState.DISABLED:
            observers.target_disabled(target_id, pending.reason)
        elif pending.went_down:
            observers.target_down(target_id, pending.reason)
        if pending.failures in self._thresholds:
            observers.failures_crossed(target_id, pending.failures, pending.failures)

    def _now_up(self, t: TargetRuntime) -> None:
        # The claim that found nothing left stored the target UP.
        t.down_since = None
        if t.state is not TargetState.UP:
            self.log.info(
                "{target} is UP: its backlog is delivered",
                relayer_event=ev.TARGET_UP,
                target=t.config.target_id,
            )
        if t.observed_down:
            t.observed_down = False
            if self._observers:
                self._observers.target_up(t.config.target_id)
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
            _cancel_timers(t)
        # Sends waiting for a slot have not started: they do not start now.
        self.slots.cancel_all()

    def running_loops(self) -> list[Deferred[None]]:
        """The delivery loops still running."""
        return list(self._loops.values())

    def cancel_sends(self) -> None:
        """Abandon every send in flight; their transactions stay pending, unchanged."""
        for t in self.targets.values():
            if t.in_flight is not None:
                t.in_flight.cancel()


#: The states of a target held until it is woken.
_HELD = (TargetState.BLOCKED, TargetState.DISABLED)

#: What a loop reserved for a first claim is handed when the claim was not made with the
#: events: it claims for itself.
_UNCLAIMED = object()

#: The backoff used when a target's policy cannot give one.
_FALLBACK = BackoffPolicy()


def _released(txn: Transaction) -> Transaction:
    """
    The transaction without its events' bytes, for the rest of an attempt once its request
    holds them: its id, its number of events, its attempts and times stay.
    """
    return attrs.evolve(txn, events=())


def _send_class(t: TargetRuntime, txn: Transaction, now: float) -> SendClass:
    """
    A first attempt: the transaction's first send, to a target that is UP and has not failed
    for :data:`~relayer._slots.RECOVERY_PROBATION` seconds; else a retry.
    """
    if (
        t.state is TargetState.UP
        and txn.attempts <= 1
        and (t.failed_at is None or now - t.failed_at >= RECOVERY_PROBATION)
    ):
        return SendClass.FIRST
    return SendClass.RETRY


def _scheduled(call: IDelayedCall | None) -> bool:
    return call is not None and call.active()


def _cancel_timers(t: TargetRuntime) -> None:
    """Cancel every timer of a target: its retry, a loop restart, a takeover fence."""
    if t.recoverer is not None:
        t.recoverer.cancel()
    for call in (t.loop_retry, t.fence, t.confirm_timer):
        if call is not None and call.active():
            call.cancel()
    t.loop_retry = None
    t.fence = None
    t.confirm_timer = None


async def _wait_all(loops: list[Deferred[None]]) -> None:
    for loop in loops:
        try:
            await loop
        except Exception:
            pass  # the loop's own error handling has logged it


def _failure_class(e: BaseException) -> FailureClass:
    """The class of a send that failed with an exception: a timeout, or no connection."""
    timed_out = getattr(e, "timed_out", None)  # relayer.HTTPSendError says which it was
    if timed_out is True or isinstance(e, (ierror.TimeoutError, ierror.TCPTimedOutError)):
        return FailureClass.TIMEOUT
    if timed_out is False or isinstance(
        e, (ierror.ConnectError, ierror.ConnectionLost, ierror.DNSLookupError)
    ):
        return FailureClass.CONNECTION
    return FailureClass.TRANSIENT


def _describe(e: BaseException, config: TargetConfig) -> str:
    """A short description of a send error, for status and logs, without the target's secrets."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    name = type(e).__name__
    return scrub_target(f"{name}: {text}" if text else name, config, 200)
