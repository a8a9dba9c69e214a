"""
The store interface and the records it returns.

A store holds events and each target's queue durably:

- *events*: each event's encoded bytes, written once whatever the number of its targets, with
  its id (the application's, or ``relayer-<n>``), the time it was submitted and its deadline;
- *queued events*: for each target, the events that were acknowledged to the submitter but are
  not yet part of a transaction, in submit order, as runs of event numbers;
- *transactions*: batches with an allocated id, naming their events, formed when a batch is
  about to be sent. Once formed, a transaction's events never change, so it is always resent
  the same; it is kept once done (delivered, dead-lettered, replayed or abandoned), as its
  events' history;
- *dead letters*: transactions that failed permanently under the dead-letter policy;
- *expired events*: the events that passed their deadline at a target before they were sent;
- each target's *delivery state*: UP, DOWN, BLOCKED or DISABLED, its consecutive failures, since
  when it has been failing, the time of its next attempt, and the last transaction id it
  allocated.

The store knows nothing of any wire format: the transport frames a transaction's events.

Every method runs one database transaction and returns a Deferred; time is passed in by the
caller, so that a store never reads a clock of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class TargetState(enum.Enum):
    """A target's delivery state."""

    #: Deliveries go out as soon as events are stored.
    UP = "up"
    #: The last attempt failed; the target's Recoverer retries it with backoff.
    DOWN = "down"
    #: A transaction failed permanently under :attr:`relayer.FailurePolicy.BLOCK`; nothing is
    #: sent until the target is woken.
    BLOCKED = "blocked"
    #: The target's retry policy gave up on it (:class:`relayer.GiveUp` with ``then="disable"``):
    #: its events are still accepted and stored, and nothing is sent until it is woken.
    DISABLED = "disabled"


def _framed(events: Sequence[bytes]) -> bytes:
    from relayer._encoding import transaction_body

    return transaction_body(b",\n".join(events))


@attrs.frozen
class Transaction:
    """
    A stored transaction, as claimed for sending.

    The store keeps a transaction's events, never its wire bytes: the wire format frames them
    (the Matrix format as ``{"events": [...]}``), the same way on every retry, so that a retry
    carries the same bytes.

    Attributes:
        target_id: The target it is for.
        txn_id: Its id: per target, strictly increasing and never reused.
        events: Its events' encoded bytes, in order.
        seqs: Their sequence numbers in the store, in the same order: one for each event.
        attempts: How many times it has been claimed for sending, this time included.
        oldest_at: When its oldest event was submitted.
        deadline: The earliest deadline of its events, or None: no send of it may start at or
            after this time.
        named: The application's ids of those of its events that have one, by sequence number.
    """

    target_id: str
    txn_id: int
    events: tuple[bytes, ...] = attrs.field(repr=lambda e: f"<{len(e)} events>")
    seqs: tuple[int, ...] = attrs.field(repr=False)
    attempts: int
    oldest_at: float
    deadline: float | None = None
    named: Mapping[int, str] = attrs.field(factory=dict, repr=False)

    @property
    def event_ids(self) -> tuple[str, ...]:
        """Its events' ids, in order."""
        named = self.named
        return tuple(named.get(s) or f"relayer-{s}" for s in self.seqs)

    @property
    def n_events(self) -> int:
        """How many events it holds (one number each: it stays once the bytes are let go)."""
        return len(self.seqs)

    @property
    def body(self) -> bytes:
        """The Matrix application-service framing of its events, ``{"events": [...]}``."""
        return _framed(self.events)


@attrs.frozen
class Awaiting:
    """
    The answer of a claim while the target's head transaction awaits its confirmation.

    Nothing is sent to the target until it is confirmed, or until ``confirm_by``, when it is
    sent again.

    Attributes:
        target_id: The target.
        txn_id: The transaction awaiting confirmation.
        confirm_by: When it is sent again unless it is confirmed first (clock seconds).
    """

    target_id: str
    txn_id: int
    confirm_by: float


@attrs.frozen
class Drained:
    """
    The answer of a claim that found nothing left to send to a DOWN target (what it had left
    expired, unsent, for example): the target stays DOWN, with its backoff, since it has not
    answered; the events stored meanwhile wait for its next retry.

    Attributes:
        target_id: The target.
    """

    target_id: str


#: What a claim returns: a transaction to send, the transaction awaiting confirmation, a
#: drained DOWN target, or None when nothing is pending (the target is UP).
Claim = Union[Transaction, Awaiting, Drained, None]  # noqa: UP007 - a runtime alias


@attrs.frozen
class EventBatch:
    """
    Events to store together, in one database transaction: see :meth:`IStore.add_events`.

    Attributes:
        bodies: Each event's encoded bytes, once, whatever the number of its targets.
        runs: ``(target_id, indices)``: each target's events, as indices into ``bodies``, in
            submit order, cut into runs that each fit one transaction of the target.
        targets: For an event submitted for several targets (by index), their ids; an event
            not in here was submitted for its run's target only.
        event_ids: The application's ids of the events that have one, by index.
        expires_at: The deadlines of the events that have one, by index (clock seconds).
    """

    bodies: Sequence[bytes]
    runs: Sequence[tuple[str, Sequence[int]]]
    targets: Mapping[int, tuple[str, ...]] = attrs.field(factory=dict)
    event_ids: Mapping[int, str] = attrs.field(factory=dict)
    expires_at: Mapping[int, float] = attrs.field(factory=dict)

    @classmethod
    def of_runs(cls, runs: Sequence[tuple[str, Sequence[bytes]]]) -> EventBatch:
        """A batch of plain events: each run's events, for its target only."""
        bodies: list[bytes] = []
        indexed = []
        for target_id, events in runs:
            start = len(bodies)
            bodies.extend(events)
            indexed.append((target_id, range(start, len(bodies))))
        return cls(bodies, indexed)


class DeliveryState(enum.Enum):
    """Where an event stands at one of its targets."""

    #: Not yet accepted: queued, or in a transaction that is being sent or retried.
    PENDING = "pending"
    #: Accepted by the target, which has not confirmed it yet; sent again if it does not in
    #: time.
    AWAITING_CONFIRMATION = "awaiting_confirmation"
    #: Delivered: the target accepted (and, if asked, confirmed) its transaction.
    DELIVERED = "delivered"
    #: Its deadline passed before it was sent: it never will be.
    EXPIRED = "expired"
    #: Its transaction failed permanently and was set aside, until it is replayed or
    #: discarded.
    DEAD_LETTERED = "dead_lettered"
    #: Its transaction was a dead letter that was given up (:meth:`relayer.Scheduler.discard`):
    #: it is never sent again.
    DISCARDED = "discarded"

    @property
    def final(self) -> bool:
        """Whether an event in this state stays in it (delivered, expired or discarded)."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({DeliveryState.DELIVERED, DeliveryState.EXPIRED, DeliveryState.DISCARDED})


@attrs.frozen
class Delivery:
    """
    One event at one of its targets, as :meth:`relayer.Scheduler.event_status` reports it.

    Attributes:
        target_id: The target.
        state: Where the event stands there.
        txn_id: The transaction that carries it there, or None while it is only queued (and for
            an expired event).
        attempts: How many times that transaction has been sent (0 while only queued).
        last_attempt_at: When it was last sent, or None.
        next_attempt_at: For a pending event at a DOWN target, when the target is retried next;
            else None.
        delivered_at: When it was delivered, or None.
        expired_at: When it was recorded as expired, or None.
        reason: Why it was dead-lettered (or, discarded, why it had been), or None.
        confirm_by: For an event awaiting confirmation, when its transaction is sent again
            unless it is confirmed first; else None.
        discarded_at: When its dead letter was discarded, or None.
    """

    target_id: str
    state: DeliveryState
    txn_id: int | None = None
    attempts: int = 0
    last_attempt_at: float | None = None
    next_attempt_at: float | None = None
    delivered_at: float | None = None
    expired_at: float | None = None
    reason: str | None = None
    confirm_by: float | None = None
    discarded_at: float | None = None


@attrs.frozen
class EventStatus:
    """
    An event and where it stands at each of its targets.

    Attributes:
        event_id: Its id.
        submitted_at: When it was stored (clock seconds).
        expires_at: The deadline it was submitted with, or None (a target's ``default_ttl``
            may still give it one there).
        deliveries: By target id, for every target it was submitted for.
    """

    event_id: str
    submitted_at: float
    expires_at: float | None
    deliveries: Mapping[str, Delivery]


@attrs.frozen
class EventEntry:
    """
    One event of a target, as :meth:`relayer.Scheduler.target_events` lists it.

    Attributes:
        event_id: Its id.
        submitted_at: When it was stored.
        txn_id: The transaction that carries it to the target, or None.
        attempts: How many times that transaction has been sent.
        last_attempt_at: When it was last sent, or None.
        at: When it reached its state: delivered, expired, dead-lettered or discarded; None
            otherwise.
        event: The event's encoded bytes, when they were asked for (``with_events``); else
            None.
    """

    event_id: str
    submitted_at: float
    txn_id: int | None
    attempts: int
    last_attempt_at: float | None
    at: float | None
    event: bytes | None = attrs.field(default=None, repr=False)


@attrs.frozen
class TargetEventsPage:
    """
    A page of a target's events in one state, oldest first.

    Attributes:
        entries: The events.
        next: Pass this as ``after`` for the next page; None when this is the last.
    """

    entries: list[EventEntry]
    next: str | None


@attrs.frozen
class EventCounts:
    """
    How many of a target's events are in each state, as :meth:`relayer.Scheduler.event_counts`
    reports them.

    The counts of the final states and of dead letters are of the events that reached their
    state within the window asked for (all of them, without one); ``pending`` and
    ``awaiting_confirmation`` are the backlog now. They count live and archived events alike,
    so they do not change when retention archives events; purged events are no longer
    counted.

    Attributes:
        pending: Events queued or in a transaction not yet accepted.
        awaiting_confirmation: Events in a transaction awaiting its confirmation.
        delivered: Events delivered.
        expired: Events that expired before they were sent.
        dead_lettered: Events in dead letters.
        discarded: Events in discarded dead letters.
    """

    pending: int = 0
    awaiting_confirmation: int = 0
    delivered: int = 0
    expired: int = 0
    dead_lettered: int = 0
    discarded: int = 0

    def of(self, state: DeliveryState) -> int:
        """The count of one state."""
        return int(getattr(self, state.value))


@attrs.frozen
class PurgeReport:
    """
    What one retention run purged or archived (or, in a dry run, would have).

    Attributes:
        events: Events that went (each once, whatever the number of its targets).
        transactions: Transaction records that went: those all of whose events went.
        expired: Records of an event expired at a target that went.
        by_target: Per target, how many of the events that went were for it.
        not_final: Events old enough to go but kept, because they are not final at one of
            their targets yet (pending, awaiting confirmation, or dead-lettered).
        archived: Whether they were archived rather than deleted.
        dry_run: Whether nothing was changed.
        chunks: How many chunks (database transactions) the run took.
        stopped: Whether the run stopped before it had looked at every event: ``keep_going``
            answered False, or (on PostgreSQL) another process's run held the retention lock.
            A later run goes on where it stopped.
    """

    events: int = 0
    transactions: int = 0
    expired: int = 0
    by_target: Mapping[str, int] = attrs.field(factory=dict)
    not_final: int = 0
    archived: bool = False
    dry_run: bool = False
    chunks: int = 0
    stopped: bool = False


@attrs.frozen
class TargetRecord:
    """
    A target's stored delivery state.

    Attributes:
        target_id: The target's id.
        state: UP, DOWN, BLOCKED or DISABLED.
        failures: Consecutive failed attempts since the last success.
        next_attempt_at: When a DOWN target is next retried, or None.
        last_success_at: When a transaction was last delivered, or None.
        last_txn_id: The highest transaction id allocated so far (0 for none).
        last_error: A short description of the last failure, or None.
        has_pending: Whether the target has queued events or transactions.
        down_since: When the target's current run of failures began, or None.
    """

    target_id: str
    state: TargetState
    failures: int
    next_attempt_at: float | None
    last_success_at: float | None
    last_txn_id: int
    last_error: str | None
    has_pending: bool
    down_since: float | None = None


@attrs.frozen
class QueueCounts:
    """
    How much a target has waiting in the store.

    Attributes:
        pending_events: Events not yet delivered, in transactions or queued.
        pending_transactions: Transactions formed and not yet delivered.
        oldest_pending_at: When the oldest pending event was submitted, or None.
        dead_letters: Transactions dead-lettered and not replayed.
    """

    pending_events: int = 0
    pending_transactions: int = 0
    oldest_pending_at: float | None = None
    dead_letters: int = 0


@attrs.frozen
class DeadLetter:
    """
    A transaction that failed permanently and was set aside.

    Attributes:
        target_id: The target it was for.
        txn_id: The id it was sent with.
        attempts: How many times it was sent.
        reason: Why it failed, for example ``HTTP 400``.
        dead_at: When it was dead-lettered.
        events: Its events' encoded bytes, in order.
        event_ids: Their ids.
    """

    target_id: str
    txn_id: int
    attempts: int
    reason: str
    dead_at: float
    events: tuple[bytes, ...] = attrs.field(repr=lambda e: f"<{len(e)} events>")
    event_ids: tuple[str, ...] = attrs.field(repr=False)

    @property
    def n_events(self) -> int:
        """How many events it holds."""
        return len(self.events)

    @property
    def body(self) -> bytes:
        """The Matrix application-service framing of its events, as it was sent."""
        return _framed(self.events)


@attrs.frozen
class Command:
    """
    An operator's command for the process that delivers to a target, as the store keeps it.

    Any process may record one (the ``relayer`` command line, an admin API, a scheduler that
    does not own the target); the scheduler that delivers to the target applies it, at once
    on PostgreSQL (the store notifies it) or at its next sweep, and marks it done. It is kept
    until then, so that it survives that process's restart.

    Attributes:
        command_id: Its id, increasing in the order commands were recorded.
        target_id: The target it is for.
        action: What to do: ``"wake"``.
        txn_id: The transaction it names, for an action that names one; else None.
        created_at: When it was recorded (the recording process's clock seconds).
        done_at: When it was applied (the applying scheduler's clock seconds), or None while
            it waits.
        done_by: The node id of the scheduler that applied it (``"local"`` for a scheduler
            without leases), or None.
        result: What applying it did, for example ``"woken"``, or None.
    """

    command_id: int
    target_id: str
    action: str
    txn_id: int | None
    created_at: float
    done_at: float | None = None
    done_by: str | None = None
    result: str | None = None

    @property
    def done(self) -> bool:
        """Whether it has been applied."""
        return self.done_at is not None


#: The actions a :class:`Command` may carry.
COMMAND_ACTIONS = frozenset({"wake"})


@attrs.frozen
class LeaseRound:
    """
    The result of one lease round of a process: see :meth:`ILeaseStore.lease_round`.

    Attributes:
        owned: The targets the process owns now (renewed or newly taken).
        acquired: The targets among them that it took in this round.
        live_nodes: How many processes have a live heartbeat, this one included.
        fair_share: How many targets each process should own.
        next_expiry: The earliest time another process's lease on one of the targets expires,
            or None; a process that owns less than its share tries again then.
        taken_over: For each acquired target whose lease another process held until it
            expired (rather than released), the time it expired. That process may still have
            a request open to the target; see :class:`relayer.lease.LeaseManager`.
    """

    owned: frozenset[str]
    acquired: frozenset[str]
    live_nodes: int
    fair_share: int
    next_expiry: float | None
    taken_over: Mapping[str, float] = attrs.field(factory=dict)


class IStore(Interface):
    """
    Durable storage of targets' queues, transactions and delivery state.

    Implementations must make each method atomic: it either happens entirely or not at all.
    """

    schema_version = Attribute("The schema version this store writes, an int.")

    def open() -> Deferred[None]:
        """
        Connect, and create or upgrade the schema.

        Fails with :class:`relayer.errors.SchemaVersionError` if the database's schema is newer
        than this code.
        """

    def close() -> Deferred[None]:
        """Finish pending work and release connections and threads, and the process lock."""

    def hold_process_lock(shared: bool) -> Deferred[None]:
        """
        Hold the database's process lock until :meth:`close`, called once after :meth:`open`.

        Schedulers that claim work without leases take no lock on the rows they claim, so two
        of them on one database would form transactions from the same rows. The lock keeps a
        scheduler without leases alone on its database (``shared=False``: exclusive) and lets
        schedulers with leases share it (``shared=True``). The lock belongs to the process
        and goes when it dies. A store that cannot be shared may do nothing.

        Args:
            shared: Whether the lock is shared, for a scheduler with leases.

        Returns:
            A Deferred that fires once the lock is held, or fails with
            :class:`relayer.errors.DatabaseInUse` if another process holds it in a way that
            excludes this one.
        """

    def register_targets(target_ids: Sequence[str]) -> Deferred[dict[str, TargetRecord]]:
        """
        Make sure each target has a state row; return every target's stored state.

        Targets that have a state row already are only read, without waiting for writers; a
        write happens only when some are missing.
        """

    def load_targets(target_ids: Sequence[str]) -> Deferred[dict[str, TargetRecord]]:
        """Return the stored state of the given targets (those the store knows); only reads."""

    def pending_targets(target_ids: Sequence[str]) -> Deferred[set[str]]:
        """
        Return those of the given targets that have queued events or stored transactions.

        It probes each target by index, so its cost grows with the number of targets asked
        about, not with the size of their backlogs.
        """

    def add_events(
        batch: EventBatch | Sequence[tuple[str, Sequence[bytes]]], now: float
    ) -> Deferred[list[str]]:
        """
        Store events, each once, and append each to its targets' queues, in one transaction.

        ``batch`` is an :class:`EventBatch`, or runs of plain events for one target each. An
        event whose application id the store holds already (or that an earlier event of the
        batch has) is not stored again, and is queued for no target.

        Returns:
            A Deferred that fires with the events' ids, in the order of ``batch.bodies``, once
            every event is durable.
        """

    def claim(
        target_id: str,
        max_events: int,
        max_bytes: int,
        now: float,
        *,
        default_ttl: float | None = None,
    ) -> Deferred[Claim]:
        """
        Return the target's next transaction to send, counting the attempt durably.

        That is its oldest open transaction; or, if it has none, a new one formed from the
        oldest queued events, up to ``max_events`` events and ``max_bytes`` bytes (always at
        least one event), with the next transaction id.

        - If the oldest open transaction awaits its confirmation, and its ``confirm_by`` has
          not come, an :class:`Awaiting` is returned and nothing else changes.
        - An event whose deadline (its own, or its submit time plus ``default_ttl``) is at or
          before ``now`` is never put in a transaction: it is recorded as expired at the
          target. An open transaction that holds one is abandoned (never sent again under its
          id), and its live events are formed into a new one, at the head of the queue.
        - If the target has nothing pending, it is marked UP in the same database transaction,
          and None is returned; unless it is DOWN with failures (it has not answered since):
          then it stays DOWN, and a :class:`Drained` is returned. (:meth:`complete`,
          :meth:`accepted` and :meth:`dead_letter`, which follow an answer, mark it UP.)
        """

    def complete(
        target_id: str,
        txn_id: int,
        max_events: int,
        max_bytes: int,
        now: float,
        *,
        default_ttl: float | None = None,
    ) -> Deferred[Claim]:
        """
        Record that a transaction was delivered, reset the target's failures, and then claim
        the next one as :meth:`claim` does, all in one database transaction.
        """

    def accepted(
        target_id: str,
        txn_id: int,
        confirm_by: float,
        max_events: int,
        max_bytes: int,
        now: float,
        *,
        default_ttl: float | None = None,
    ) -> Deferred[Claim]:
        """
        Record that the target accepted a transaction and will confirm it later: it awaits its
        confirmation until ``confirm_by``, and an :class:`Awaiting` is returned. If it was
        confirmed already (the confirmation came before the answer), the next one is claimed
        as :meth:`claim` does.
        """

    def confirm(target_id: str, txn_id: int, now: float) -> Deferred[bool]:
        """
        Record a transaction's confirmation: it is delivered. Only a transaction that the
        target accepted may be confirmed: one awaiting its confirmation, or one being sent
        again after its confirmation timeout. Returns True if it is delivered now (or was
        before), False otherwise (unknown, abandoned, or never accepted). Needs no lease: any
        process may record it; the owner is told as of new events.
        """

    def event_status(event_id: str) -> Deferred[EventStatus | None]:
        """Where an event stands at each of its targets; None for an unknown id. Only reads."""

    def target_events(
        target_id: str,
        state: DeliveryState,
        after: str | None,
        limit: int,
        since: float | None = None,
        until: float | None = None,
        with_events: bool = False,
    ) -> Deferred[TargetEventsPage]:
        """
        A page of up to ``limit`` of a target's events in ``state``, oldest first, after the
        cursor ``after`` (a page's ``next``); for a final state or dead letters, only those
        that reached it from ``since`` (included) to ``until`` (excluded), either None for no
        bound; with ``with_events``, with each event's bytes. Fails with ValueError for a
        cursor it did not write. Only reads, from one snapshot; archived events are read too.
        """

    def event_counts(
        target_id: str, since: float | None, until: float | None
    ) -> Deferred[EventCounts]:
        """
        How many of a target's events are in each state; the final states and dead letters
        counted by when they reached their state, from ``since`` (included) to ``until``
        (excluded), either None for no bound. Only reads, from one snapshot.
        """

    def purge(
        rule: Any,
        now: float,
        *,
        archive: bool = False,
        dry_run: bool = False,
        chunk: int = 2000,
        progress: Callable[[PurgeReport], None] | None = None,
        keep_going: Callable[[], bool] | None = None,
    ) -> Deferred[PurgeReport]:
        """
        Purge, or archive, the final events past their retention under ``rule`` (a
        :class:`relayer.store.RetentionRule`), a chunk at a time, each chunk a short database
        transaction of its own; see :meth:`relayer.store.SQLStore.purge`.
        """

    def discard(target_id: str, txn_id: int, now: float) -> Deferred[bool]:
        """
        Give up a dead letter: its events become discarded, final. True if ``txn_id`` was a
        dead letter of the target; False (nothing changed) otherwise.
        """

    def fail(
        target_id: str,
        txn_id: int,
        failures: int,
        next_attempt_at: float,
        error: str,
        now: float,
        *,
        down_since: float | None = None,
        dead_letter: str | None = None,
    ) -> Deferred[None]:
        """
        Record a failed attempt: the target is DOWN, with its backoff state.

        Args:
            down_since: When the target's run of failures began (``now`` if None).
            dead_letter: If given, the transaction is moved to the dead letters with this
                reason, in the same database transaction (a retry policy gave up on it).
        """

    def block(target_id: str, txn_id: int, error: str, now: float) -> Deferred[None]:
        """Record a permanent failure under the block policy: the target is BLOCKED."""

    def disable(
        target_id: str, txn_id: int, error: str, failures: int, down_since: float, now: float
    ) -> Deferred[None]:
        """
        Record that the target's retry policy gave up on it: the target is DISABLED, its
        transaction stays at the head of its queue, and new events are still stored.
        """

    def dead_letter(
        target_id: str,
        txn_id: int,
        reason: str,
        max_events: int,
        max_bytes: int,
        now: float,
        *,
        default_ttl: float | None = None,
    ) -> Deferred[Claim]:
        """Move a transaction to the dead letters, then claim the next as :meth:`claim` does."""

    def split(
        target_id: str, txn_id: int, now: float, *, default_ttl: float | None = None
    ) -> Deferred[Transaction | None]:
        """
        Split a transaction that the target refused as too large.

        It is abandoned; its first half becomes a new transaction with the next id, which is
        returned; its second half goes back to the head of the queue. Returns None if it holds a
        single event.
        """

    def queue_counts(
        after: str | None = None, limit: int | None = None
    ) -> Deferred[dict[str, QueueCounts]]:
        """
        Return how much targets have pending and dead-lettered, by target id.

        The targets are those with a state row, in order of id: the first ``limit`` of them
        (all of them if ``limit`` is None) whose ids sort after ``after`` (from the first if
        ``after`` is None). Each target's counts are looked up by index, for that page's
        targets only; a target with nothing stored has zero counts. Only reads.
        """

    def dead_letters(
        target_id: str, limit: int, after: int | None = None
    ) -> Deferred[list[DeadLetter]]:
        """
        Return up to ``limit`` of a target's dead letters, oldest (lowest ``txn_id``) first,
        with ``txn_id`` above ``after`` (from the first if ``after`` is None). Only reads.
        """

    def replay(target_id: str, now: float, txn_id: int | None = None) -> Deferred[int]:
        """
        Queue a target's dead letters again, at the end of its queue; return how many events
        were queued. With ``txn_id``, only that dead letter is queued again (0 if it is not a
        dead letter of the target: nothing changes).

        The dead letters present when the replay begins are moved, in ``txn_id`` order, a
        chunk at a time (each chunk one database transaction that appends their events to the
        queue and marks exactly them replayed), so memory stays bounded however many there are.
        Replays of one target are serialised under a lock on the target's row: none is queued
        twice or skipped, and a dead letter stored meanwhile stays a dead letter. If a replay
        fails part-way, the chunks done stay done and the rest stay dead letters. Other
        processes are told of the queued events as by :meth:`add_events`.
        """

    def add_command(
        target_id: str, action: str, now: float, txn_id: int | None = None
    ) -> Deferred[int]:
        """
        Record an operator's command for the process that delivers to ``target_id``; return
        its id. Other processes are told as of new events (``NOTIFY`` on PostgreSQL). Needs no
        lease. Fails with ValueError for an action not in :data:`COMMAND_ACTIONS`.
        """

    def command(command_id: int) -> Deferred[Command | None]:
        """The command with this id, done or not; None if there is none. Only reads."""

    def pending_commands(limit: int, after: int | None = None) -> Deferred[list[Command]]:
        """
        Up to ``limit`` commands not yet applied, oldest first, with ids above ``after`` (from
        the first if it is None). Only reads.
        """

    def finish_command(command_id: int, now: float, done_by: str, result: str) -> Deferred[bool]:
        """
        Mark a command applied; False if it was already (or is unknown). Commands applied
        more than a day before ``now`` are forgotten at the same time.
        """


#: Maps a target id to its stored record.
TargetRecords = Mapping[str, TargetRecord]


class ILeaseStore(IStore):
    """
    A store that several processes can share: each target is owned by one process at a time,
    through a lease with an expiry.

    Once a store's ``lease_owner`` is set to a process's node id, every operation that changes a
    target's queue or state first checks, under a row lock, that this process holds the target's
    unexpired lease, and fails with :class:`relayer.errors.LeaseLost` if it does not.
    """

    lease_owner = Attribute("The node id whose leases this store's operations require, or None.")

    def lease_round(
        node_id: str, target_ids: Sequence[str], timeout: float, now: float
    ) -> Deferred[LeaseRound]:
        """
        Heartbeat, renew this node's leases and take free or expired ones up to a fair share,
        in one database transaction.
        """

    def release_leases(node_id: str, target_ids: Sequence[str] | None) -> Deferred[None]:
        """Give up leases (all of them if ``target_ids`` is None) so others can take them."""
