"""
The upgrade from schema version 3 to 4: events get an identity, and their bytes are written once.

Version 3 kept each target's queued events as runs of encoded bytes, and each transaction and
dead letter with its wire body. The upgrade writes every one of those events into
``relayer_events`` under a new sequence number, in each target's order (dead letters first,
then transactions, then the queue), and names them by number in the new runs and transactions:

- a queued run keeps its place in the queue (its ``pos``, and its order among the others);
- a transaction keeps its id, its attempt count and its times, and its events, so that it is
  sent again with the same id and the same bytes;
- a dead letter becomes a transaction in the ``dead`` state, with its reason, replayable.

Rows are read a few at a time, so memory stays bounded however large the backlog. It all runs
inside the upgrade's database transaction: an upgrade that fails leaves version 3 as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from relayer.store import _seqs

# Version 3's encoding of a run and of a transaction body, as it wrote them.
_SEPARATOR = b",\n"
_PREFIX = b'{"events":['
_SUFFIX = b"]}"


def _split_run(run: bytes) -> list[bytes]:
    return run.split(_SEPARATOR) if run else []


def _split_body(body: bytes) -> list[bytes]:
    if not (body.startswith(_PREFIX) and body.endswith(_SUFFIX)):
        raise ValueError("a version 3 transaction body that relayer did not write")
    return _split_run(body[len(_PREFIX) : len(body) - len(_SUFFIX)])


def _rows(conn: sa.Connection, query: Any) -> Iterator[Any]:
    result = conn.execute(query.execution_options(yield_per=64))
    try:
        yield from result
    finally:
        result.close()


def upgrade(conn: sa.Connection, define: Any) -> None:
    """
    Move a version 3 database to version 4, inside the caller's database transaction.

    Args:
        conn: The connection, in the upgrade's transaction.
        define: :func:`relayer.store.schema.define_tables`, to describe both versions.
    """
    old = define(sa.MetaData(), 3)
    new = define(sa.MetaData(), 4)
    conn.execute(
        sa.text("ALTER TABLE relayer_targets ADD COLUMN max_span BIGINT NOT NULL DEFAULT 0")
    )
    tables = [
        new.tables[name]
        for name in (
            "relayer_events",
            "relayer_event_ids",
            "relayer_target_sets",
            "relayer_runs",
            "relayer_txns",
            "relayer_expired",
            "relayer_counters",
        )
    ]
    new.create_all(conn, tables=tables)
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        conn.execute(sa.text("CREATE SEQUENCE IF NOT EXISTS relayer_event_seq"))

    o_targets = old.tables["relayer_targets"]
    o_queue = old.tables["relayer_queue"]
    o_txns = old.tables["relayer_transactions"]
    o_dead = old.tables["relayer_dead_letters"]
    n_targets = new.tables["relayer_targets"]
    n_events = new.tables["relayer_events"]
    n_sets = new.tables["relayer_target_sets"]
    n_runs = new.tables["relayer_runs"]
    n_txns = new.tables["relayer_txns"]

    seq = 0
    set_ids: dict[str, int] = {}

    def set_of(target_id: str) -> int:
        found = set_ids.get(target_id)
        if found is None:
            conn.execute(sa.insert(n_sets).values(targets=target_id))
            found = conn.execute(
                sa.select(n_sets.c.set_id).where(n_sets.c.targets == target_id)
            ).scalar_one()
            set_ids[target_id] = found
        return found

    def store_events(target_id: str, events: list[bytes], submitted_at: float) -> list[int]:
        nonlocal seq
        set_id = set_of(target_id)
        first = seq + 1
        seq += len(events)
        if events:
            # One block, as the version 3 run or transaction held them.
            conn.execute(
                sa.insert(n_events).values(
                    first_seq=first,
                    last_seq=seq,
                    seqs=_seqs.encode(range(first, seq + 1)),
                    n_events=len(events),
                    set_id=set_id,
                    submitted_at=submitted_at,
                    bodies=b"\n".join(events),
                    expires=None,
                    ids=None,
                )
            )
        return list(range(first, seq + 1))

    # Every target with anything stored, registered or not (a queue without a target row is
    # moved all the same; the store reports it).
    target_ids = set(conn.execute(sa.select(o_targets.c.target_id)).scalars())
    for table in (o_queue, o_txns, o_dead):
        target_ids.update(conn.execute(sa.select(table.c.target_id).distinct()).scalars())

    for target_id in sorted(target_ids):
        span = 0

        def txn_row(
            seqs: list[int], events: list[bytes], row: Any, **values: Any
        ) -> dict[str, Any]:
            nonlocal span
            span = max(span, max(seqs) - min(seqs))
            return {
                "target_id": row.target_id,
                "txn_id": row.txn_id,
                "seqs": _seqs.encode(seqs),
                "first_seq": min(seqs),
                "last_seq": max(seqs),
                "n_events": len(seqs),
                "size": sum(map(len, events)),
                "oldest_at": row.oldest_at,
                "attempts": row.attempts,
                "confirm_by": None,
                **values,
            }

        for row in _rows(
            conn, sa.select(o_dead).where(o_dead.c.target_id == target_id).order_by(o_dead.c.txn_id)
        ):
            events = _split_body(bytes(row.body))
            if not events:
                continue
            seqs = store_events(target_id, events, row.oldest_at)
            conn.execute(
                sa.insert(n_txns).values(
                    txn_row(
                        seqs,
                        events,
                        row,
                        state="dead",
                        created_at=row.dead_at,
                        last_attempt_at=row.dead_at,
                        done_at=row.dead_at,
                        reason=row.reason,
                    )
                )
            )
        for row in _rows(
            conn, sa.select(o_txns).where(o_txns.c.target_id == target_id).order_by(o_txns.c.txn_id)
        ):
            events = _split_body(bytes(row.body))
            if not events:
                continue
            seqs = store_events(target_id, events, row.oldest_at)
            conn.execute(
                sa.insert(n_txns).values(
                    txn_row(
                        seqs,
                        events,
                        row,
                        state="pending",
                        created_at=row.created_at,
                        last_attempt_at=row.last_attempt_at,
                        done_at=None,
                        reason=None,
                    )
                )
            )
        for row in _rows(
            conn,
            sa.select(o_queue)
            .where(o_queue.c.target_id == target_id)
            .order_by(o_queue.c.pos, o_queue.c.id),
        ):
            events = _split_run(bytes(row.events))
            if not events:
                continue
            seqs = store_events(target_id, events, row.oldest_at)
            conn.execute(
                sa.insert(n_runs).values(
                    target_id=target_id,
                    pos=row.pos,
                    n_events=len(seqs),
                    size=sum(map(len, events)),
                    seqs=_seqs.encode(seqs),
                    first_seq=seqs[0],
                    last_seq=seqs[-1],
                    oldest_at=row.oldest_at,
                )
            )
        if span:
            conn.execute(
                sa.update(n_targets).where(n_targets.c.target_id == target_id).values(max_span=span)
            )

    if postgres:
        if seq:
            conn.execute(sa.text("SELECT setval('relayer_event_seq', :v)"), {"v": seq})
    else:
        conn.execute(sa.insert(new.tables["relayer_counters"]).values(name="event_seq", value=seq))
    for table in (o_queue, o_txns, o_dead):
        table.drop(conn)
