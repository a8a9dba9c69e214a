"""
The store interface and the records it returns.

A store holds each target's queue durably:

- *queued events*: events that were acknowledged to the submitter but are not yet part of a
  transaction, kept in submit order as runs of encoded events;
- *transactions*: batches with an allocated id and their exact wire bytes, formed when a batch is
  about to be sent. Once formed, a transaction is always resent unchanged;
- *dead letters*: transactions that failed permanently under the dead-letter policy;
- each target's *delivery state*: UP, DOWN or BLOCKED, its consecutive failures, the time of its
  next attempt, and the last transaction id it allocated.

Every method runs one database transaction and returns a Deferred; time is passed in by the
caller, so that a store never reads a clock of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

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


@attrs.frozen
class Transaction:
    """
    A stored transaction, as claimed for sending.

    Attributes:
        target_id: The target it is for.
        txn_id: Its id: per target, strictly increasing and never reused.
        body: Its exact wire bytes, the JSON document ``{"events": [...]}``.
        n_events: How many events it holds.
        attempts: How many times it has been claimed for sending, this time included.
        oldest_at: When its oldest event was submitted.
    """

    target_id: str
    txn_id: int
    body: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    n_events: int
    attempts: int
    oldest_at: float


@attrs.frozen
class TargetRecord:
    """
    A target's stored delivery state.

    Attributes:
        target_id: The target's id.
        state: UP, DOWN or BLOCKED.
        failures: Consecutive failed attempts since the last success.
        next_attempt_at: When a DOWN target is next retried, or None.
        last_success_at: When a transaction was last delivered, or None.
        last_txn_id: The highest transaction id allocated so far (0 for none).
        last_error: A short description of the last failure, or None.
        has_pending: Whether the target has queued events or transactions.
    """

    target_id: str
    state: TargetState
    failures: int
    next_attempt_at: float | None
    last_success_at: float | None
    last_txn_id: int
    last_error: str | None
    has_pending: bool


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
        n_events: How many events it holds.
        attempts: How many times it was sent.
        reason: Why it failed, for example ``HTTP 400``.
        dead_at: When it was dead-lettered.
        body: Its wire bytes.
    """

    target_id: str
    txn_id: int
    n_events: int
    attempts: int
    reason: str
    dead_at: float
    body: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


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

    def add_events(runs: Sequence[tuple[str, Sequence[bytes]]], now: float) -> Deferred[None]:
        """
        Store runs of encoded events, each appended to its target's queue, in one transaction.

        When this fires, every event in ``runs`` is durable.
        """

    def claim(
        target_id: str, max_events: int, max_bytes: int, now: float
    ) -> Deferred[Transaction | None]:
        """
        Return the target's next transaction to send, counting the attempt durably.

        That is its oldest stored transaction; or, if it has none, a new one formed from the
        oldest queued events, up to ``max_events`` events and ``max_bytes`` bytes (always at
        least one event), with the next transaction id. If the target has nothing pending, it is
        marked UP in the same database transaction, and None is returned.
        """

    def complete(
        target_id: str, txn_id: int, max_events: int, max_bytes: int, now: float
    ) -> Deferred[Transaction | None]:
        """
        Record that a transaction was delivered: delete it, reset the target's failures, and
        then claim the next one as :meth:`claim` does, all in one database transaction.
        """

    def fail(
        target_id: str, txn_id: int, failures: int, next_attempt_at: float, error: str, now: float
    ) -> Deferred[None]:
        """Record a failed attempt: the target is DOWN, with its backoff state."""

    def block(target_id: str, txn_id: int, error: str, now: float) -> Deferred[None]:
        """Record a permanent failure under the block policy: the target is BLOCKED."""

    def dead_letter(
        target_id: str, txn_id: int, reason: str, max_events: int, max_bytes: int, now: float
    ) -> Deferred[Transaction | None]:
        """Move a transaction to the dead letters, then claim the next as :meth:`claim` does."""

    def split(target_id: str, txn_id: int, now: float) -> Deferred[Transaction | None]:
        """
        Split a transaction that the target refused as too large.

        Its first half becomes a new transaction with the next id, which is returned; its second
        half goes back to the head of the queue. Returns None if it holds a single event.
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

    def replay(target_id: str, now: float) -> Deferred[int]:
        """
        Queue a target's dead letters again, at the end of its queue; return how many events
        were queued.

        The dead letters present when the replay begins are moved, in ``txn_id`` order, a
        chunk at a time (each chunk one database transaction that appends its dead letters to
        the queue and deletes exactly them), so memory stays bounded however many there are.
        Replays of one target are serialised under a lock on the target's row: none is queued
        twice or skipped, and a dead letter stored meanwhile stays a dead letter. If a replay
        fails part-way, the chunks done stay done and the rest stay dead letters. Other
        processes are told of the queued events as by :meth:`add_events`.
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
