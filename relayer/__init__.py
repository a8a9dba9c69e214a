"""
relayer: reliable, ordered, per-target delivery of events to remote targets, on Twisted.

An application submits events for targets; relayer stores each one before acknowledging it,
batches each target's events into transactions, sends them in order, one at a time per target,
and retries a failing target with backoff until it is back, without holding up the others.
"""

from relayer._slots import SendSlotsStatus
from relayer._version import __version__
from relayer.config import BackoffPolicy, DelaySchedule, FailurePolicy, Retention, TargetConfig
from relayer.controller import TransactionController
from relayer.dbpool import DatabasePool, ThreadedDatabasePool
from relayer.errors import (
    Backpressure,
    ConfigurationError,
    DatabaseInUse,
    DuplicateTarget,
    EventTooLarge,
    InvalidEvent,
    InvalidSignature,
    InvalidTarget,
    LeaseLost,
    NotRunning,
    RelayerError,
    SchemaVersionError,
    StoreError,
    StoreUnavailable,
    UnknownTarget,
)
from relayer.event import Event
from relayer.formats import (
    MATRIX,
    STANDARD_WEBHOOKS,
    IWireFormat,
    MatrixFormat,
    StandardWebhooksFormat,
    WireRequest,
)
from relayer.grouper import EventGrouper
from relayer.lease import LeaseSettings
from relayer.observer import DeliveryObserver, IDeliveryObserver
from relayer.policy import Action, Decision, FailureInfo, GiveUp, IRetryPolicy, RetryPolicy
from relayer.recoverer import Recoverer
from relayer.scheduler import Scheduler, TargetStatus
from relayer.store import Command, DeadLetter, IStore, SQLiteStore, TargetState
from relayer.store.base import (
    Delivery,
    DeliveryState,
    EventCounts,
    EventEntry,
    EventStatus,
    PurgeReport,
    TargetEventsPage,
)
from relayer.store.postgres import PostgresStore
from relayer.transport.base import (
    FailureClass,
    IRequestTransport,
    ITransport,
    OutcomeKind,
    SendOutcome,
)
from relayer.transport.http import HTTPSendError, HTTPTransport

__all__ = [
    "Action",
    "BackoffPolicy",
    "Backpressure",
    "Command",
    "ConfigurationError",
    "DatabaseInUse",
    "DatabasePool",
    "DeadLetter",
    "Decision",
    "DelaySchedule",
    "Delivery",
    "DeliveryObserver",
    "DeliveryState",
    "DuplicateTarget",
    "Event",
    "EventCounts",
    "EventEntry",
    "EventGrouper",
    "EventStatus",
    "EventTooLarge",
    "FailureClass",
    "FailureInfo",
    "FailurePolicy",
    "GiveUp",
    "HTTPSendError",
    "HTTPTransport",
    "IDeliveryObserver",
    "IRequestTransport",
    "IRetryPolicy",
    "IStore",
    "ITransport",
    "IWireFormat",
    "InvalidEvent",
    "InvalidSignature",
    "InvalidTarget",
    "LeaseLost",
    "LeaseSettings",
    "MATRIX",
    "MatrixFormat",
    "NotRunning",
    "OutcomeKind",
    "PostgresStore",
    "PurgeReport",
    "Recoverer",
    "RelayerError",
    "Retention",
    "RetryPolicy",
    "SQLiteStore",
    "STANDARD_WEBHOOKS",
    "Scheduler",
    "SchemaVersionError",
    "SendOutcome",
    "SendSlotsStatus",
    "StandardWebhooksFormat",
    "StoreError",
    "StoreUnavailable",
    "TargetConfig",
    "TargetEventsPage",
    "TargetState",
    "TargetStatus",
    "ThreadedDatabasePool",
    "TransactionController",
    "UnknownTarget",
    "WireRequest",
    "__version__",
]
