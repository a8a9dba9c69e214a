"""
Durable storage of targets' queues, transactions and delivery state.

:class:`IStore` is the interface; :class:`SQLiteStore` is the embedded default.
"""

from relayer.store._retention import RetentionRule
from relayer.store.base import (
    Awaiting,
    Claim,
    Command,
    DeadLetter,
    Drained,
    EventBatch,
    EventCounts,
    ILeaseStore,
    IStore,
    LeaseRound,
    PurgeReport,
    QueueCounts,
    TargetRecord,
    TargetState,
    Transaction,
)
from relayer.store.sql import SQLStore
from relayer.store.sqlite import SQLiteStore, sqlite_engine

__all__ = [
    "Awaiting",
    "Claim",
    "Command",
    "DeadLetter",
    "Drained",
    "EventBatch",
    "EventCounts",
    "ILeaseStore",
    "IStore",
    "LeaseRound",
    "PurgeReport",
    "QueueCounts",
    "RetentionRule",
    "SQLStore",
    "SQLiteStore",
    "TargetRecord",
    "TargetState",
    "Transaction",
    "sqlite_engine",
]
