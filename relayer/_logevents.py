"""
The names of relayer's log events.

Every event that relayer logs carries a field ``relayer_event`` with one of these names, and
the fields that ``docs/operations.md`` (section "Logs") lists for it, so that a log pipeline can
select and count events without parsing their messages. The names are stable: a name is never
reused for another meaning, and a field, once documented, is not removed from its event.

The fields keep one meaning wherever they appear: ``target`` is a target's id, ``txn`` a
transaction's id, ``events`` how many events, ``targets`` how many targets, ``outcome`` the kind
of an attempt's outcome (a :class:`relayer.OutcomeKind` value), ``failure_class`` its failure
class (a :class:`relayer.FailureClass` value; not ``failure``, which Twisted's legacy observers
take for a :class:`~twisted.python.failure.Failure`), ``reason`` why an attempt failed (scrubbed
of the target's token and secrets), ``error`` the message of an error of the store or of a
connection, ``attempts`` how many times a transaction was sent, ``failures`` a target's failures
in a row, and ``delay`` and ``interval`` durations in seconds. Values are strings, numbers or
None, so that every event can be written as JSON.
"""

from __future__ import annotations

# -- the scheduler ------------------------------------------------------------------------------

#: The scheduler started.
SCHEDULER_STARTED = "scheduler.started"
#: The scheduler stopped.
SCHEDULER_STOPPED = "scheduler.stopped"
#: Registering a target or taking over targets failed on the store; it is retried.
SCHEDULER_RETRYING = "scheduler.retrying"
#: An operator's command was applied.
COMMAND_APPLIED = "command.applied"
#: Applying operators' commands failed unexpectedly.
COMMAND_FAILED = "command.failed"

# -- targets ------------------------------------------------------------------------------------

#: A target went DOWN: an attempt failed in a way that may pass.
TARGET_DOWN = "target.down"
#: A target is UP again: its backlog is delivered.
TARGET_UP = "target.up"
#: A target is BLOCKED by a permanent refusal.
TARGET_BLOCKED = "target.blocked"
#: A target is DISABLED by its retry policy.
TARGET_DISABLED = "target.disabled"
#: A DOWN target had no retry scheduled; it is retried now.
TARGET_REVIVED = "target.revived"
#: The store holds undelivered events for a target that is not registered.
TARGET_UNREGISTERED = "target.unregistered"

# -- transactions -------------------------------------------------------------------------------

#: A transaction was delivered.
TXN_DELIVERED = "txn.delivered"
#: A transaction was accepted, its confirmation to come.
TXN_ACCEPTED = "txn.accepted"
#: A retry of a DOWN target's transaction failed.
TXN_RETRY_FAILED = "txn.retry_failed"
#: A transaction refused as too large is split.
TXN_SPLIT = "txn.split"
#: A transaction is dead-lettered.
TXN_DEAD_LETTERED = "txn.dead_lettered"

# -- a target's delivery ------------------------------------------------------------------------

#: Delivery to a target paused because the store is unavailable.
DELIVERY_PAUSED = "delivery.paused"
#: Delivery to a target stopped on an unexpected error; it starts again by itself.
DELIVERY_ERROR = "delivery.error"
#: Cancelling a send failed.
DELIVERY_CANCEL_FAILED = "delivery.cancel_failed"
#: A target's retry policy raised.
POLICY_FAILED = "policy.failed"
#: A target's retry policy answered something that is not a valid decision.
POLICY_INVALID = "policy.invalid"
#: An observer raised, or its Deferred failed.
OBSERVER_FAILED = "observer.failed"
#: An HTTP response was received.
HTTP_RESPONSE = "http.response"

# -- metrics ------------------------------------------------------------------------------------

#: The metrics could not read the scheduler's status: it is not running.
METRICS_NOT_RUNNING = "metrics.not_running"
#: The metrics could not read the scheduler's status.
METRICS_REFRESH_FAILED = "metrics.refresh_failed"

# -- the admin API ------------------------------------------------------------------------------

#: The admin API failed unexpectedly on a request; it was answered 500, if at all.
ADMIN_FAILED = "admin.failed"

# -- submitting ---------------------------------------------------------------------------------

#: Storing submitted events failed on an unavailable store; it is retried.
SUBMIT_RETRYING = "submit.retrying"
#: Storing submitted events failed for good: their submits fail.
SUBMIT_FAILED = "submit.failed"
#: Handing stored events over to delivery failed.
SUBMIT_HANDOVER_FAILED = "submit.handover_failed"
#: The event grouper failed unexpectedly.
GROUPER_FAILED = "grouper.failed"

# -- the store ----------------------------------------------------------------------------------

#: The database schema was upgraded.
SCHEMA_UPGRADED = "schema.upgraded"
#: The listener told of expired events raised.
STORE_EXPIRY_LISTENER_FAILED = "store.expiry_listener_failed"
#: Listening for notifications of new events (PostgreSQL) failed; it is retried.
LISTEN_FAILED = "listen.failed"
#: Listening for notifications of new events works again.
LISTEN_RESTORED = "listen.restored"

# -- sweeps and retention -----------------------------------------------------------------------

#: A sweep found pending work for idle targets.
SWEEP_STRANDED = "sweep.stranded"
#: A sweep for stranded work failed.
SWEEP_FAILED = "sweep.failed"
#: A retention run purged or archived events.
RETENTION_DONE = "retention.done"
#: A retention run failed.
RETENTION_FAILED = "retention.failed"

# -- leases -------------------------------------------------------------------------------------

#: This process took the leases of targets.
LEASE_ACQUIRED = "lease.acquired"
#: This process lost the leases of targets.
LEASE_LOST = "lease.lost"
#: This process gives targets up to other processes.
LEASE_SHED = "lease.shed"
#: Giving targets up failed.
LEASE_SHED_FAILED = "lease.shed_failed"
#: Renewing the leases failed; it is retried.
LEASE_RENEW_FAILED = "lease.renew_failed"
#: Acting on a renewal of the leases failed.
LEASE_APPLY_FAILED = "lease.apply_failed"
#: Releasing the leases after a failed start failed.
LEASE_RELEASE_FAILED = "lease.release_failed"
