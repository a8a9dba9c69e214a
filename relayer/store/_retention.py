"""
Retention: purging or archiving final events, a chunk of event numbers at a time.

An event can go once it is final at every target it was submitted for (delivered, expired or
discarded there) and each target's retention has passed since it became final there. A chunk
is a run of blocks in number order; for each target of its events, the chunk reads the target's
queued runs, transactions and expiries that may hold them (by number, through the indexes that
start with the target's id), decides where each event stands, and removes the blocks all of
whose events can go, with their expiry records, and the transaction records all of whose
events are gone. The event bytes are never read.

A transaction record goes only with the last of its events, so that the history of an event
still stored is whole: the status of an event never depends on how far retention has got.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import sqlalchemy as sa

from relayer.store import _seqs, schema

_e = schema.events
_ei = schema.event_ids
_s = schema.target_sets
_r = schema.runs
_x = schema.txns
_xp = schema.expired
_t = schema.targets

#: The states of a transaction that make its events final at its target.
_FINAL_TXN = (schema.TXN_DELIVERED, schema.TXN_DISCARDED)
#: The states of a transaction that is done with: its record may go with its last event.
_DONE_TXN = (*_FINAL_TXN, schema.TXN_REPLAYED, schema.TXN_ABANDONED)


@attrs.frozen
class RetentionRule:
    """
    How long each target keeps its final events.

    Attributes:
        default: Seconds, for targets without their own; None for ever.
        per_target: Targets' own retention, in seconds; None for ever, whatever the default.
    """

    default: float | None
    per_target: Mapping[str, float | None] = attrs.field(factory=dict)

    def keep(self, target_id: str) -> float | None:
        """Seconds ``target_id`` keeps a final event; None for ever."""
        return self.per_target.get(target_id, self.default)

    def shortest(self) -> float | None:
        """The shortest time any target keeps a final event; None if every one keeps them."""
        found = [k for k in (self.default, *self.per_target.values()) if k is not None]
        return min(found) if found else None


@attrs.define
class ChunkResult:
    """What one chunk did, and where the next begins (None: the run is over)."""

    next_after: int | None
    events: int = 0
    transactions: int = 0
    expired: int = 0
    not_final: int = 0
    by_target: dict[str, int] = attrs.field(factory=dict)


def purge_chunk(
    conn: sa.Connection,
    rule: RetentionRule,
    now: float,
    after: int,
    chunk: int,
    archive: bool,
    dry_run: bool,
) -> ChunkResult:
    """
    Purge (or archive) what can go among the blocks after number ``after``, about ``chunk``
    event numbers of them, inside the caller's database transaction.
    """
    shortest = rule.shortest()
    if shortest is None:
        return ChunkResult(None)
    # Nothing submitted after this can be final for long enough at any target.
    cut = now - shortest
    rows = conn.execute(
        sa.select(
            _e.c.first_seq,
            _e.c.last_seq,
            _e.c.seqs,
            _e.c.n_events,
            _e.c.set_id,
            _e.c.submitted_at,
            _e.c.ids,
        )
        .where(_e.c.first_seq > after)
        .order_by(_e.c.first_seq)
        .limit(chunk)
    ).all()
    blocks = []
    numbers = 0
    newer = False
    for row in rows:
        if row.submitted_at > cut:
            # Blocks are stored in time order (near enough, across processes): the rest are
            # newer still, for a later run.
            newer = True
            break
        blocks.append(row)
        numbers += row.last_seq - row.first_seq + 1
        if numbers >= chunk:
            break
    if not blocks:
        return ChunkResult(None)
    at_end = newer or (len(blocks) == len(rows) and len(rows) < chunk)
    result = ChunkResult(None if at_end else blocks[-1].first_seq)
    low, high = blocks[0].first_seq, max(b.last_seq for b in blocks)
    targets_of = {
        set_id: tuple(t for t in text.split("\n") if t)
        for set_id, text in conn.execute(
            sa.select(_s.c.set_id, _s.c.targets).where(
                _s.c.set_id.in_(sorted({b.set_id for b in blocks}))
            )
        )
    }
    targets = sorted({t for b in blocks for t in targets_of[b.set_id]})
    spans = (
        dict(
            conn.execute(
                sa.select(_t.c.target_id, _t.c.max_span).where(_t.c.target_id.in_(targets))
            ).all()
        )
        if targets
        else {}
    )
    # Where each event stands at each target: (final, since when).
    standing: dict[str, dict[int, float | None]] = {}
    expired_rows: dict[str, dict[int, float]] = {}
    done_txns: dict[str, list[Any]] = {}
    for target_id in targets:
        found: dict[int, float | None] = {}
        expired_at = dict(
            conn.execute(
                sa.select(_xp.c.seq, _xp.c.expired_at).where(
                    _xp.c.target_id == target_id, _xp.c.seq >= low, _xp.c.seq <= high
                )
            ).all()
        )
        expired_rows[target_id] = expired_at
        span = int(spans.get(target_id) or 0)
        txns = conn.execute(
            sa.select(_x.c.txn_id, _x.c.state, _x.c.seqs, _x.c.done_at)
            .where(
                _x.c.target_id == target_id,
                _x.c.first_seq >= low - span,
                _x.c.first_seq <= high,
                _x.c.last_seq >= low,
            )
            .order_by(_x.c.txn_id)
        ).all()
        for txn in txns:
            if txn.state == schema.TXN_ABANDONED:
                continue
            # A later transaction of the same event says where it stands now.
            at = txn.done_at if txn.state in _FINAL_TXN else None
            for a, b in _seqs.ranges(txn.seqs):
                for seq in range(max(a, low), min(b, high) + 1):
                    found[seq] = at
        done_txns[target_id] = [t for t in txns if t.state in _DONE_TXN]
        for (run_seqs,) in conn.execute(
            sa.select(_r.c.seqs).where(
                _r.c.target_id == target_id, _r.c.first_seq <= high, _r.c.last_seq >= low
            )
        ):
            for a, b in _seqs.ranges(run_seqs):
                for seq in range(max(a, low), min(b, high) + 1):
                    found[seq] = None
        found.update(expired_at)
        standing[target_id] = found
    going: list[Any] = []
    for block in blocks:
        block_targets = targets_of[block.set_id]
        block_seqs = _seqs.decode(block.seqs)
        final = True
        due = True
        for target_id in block_targets:
            keep = rule.keep(target_id)
            where = standing[target_id]
            for seq in block_seqs:
                at = where.get(seq)
                if at is None:
                    final = False
                    break
                if keep is None or at + keep > now:
                    due = False
            if not final:
                break
        if not final:
            result.not_final += block.n_events
        elif due:
            going.append(block)
    if not going:
        return result
    gone = {b.first_seq for b in going}
    gone_seqs = {seq for b in going for seq in _seqs.decode(b.seqs)}
    result.events = sum(b.n_events for b in going)
    for b in going:
        for target_id in targets_of[b.set_id]:
            result.by_target[target_id] = result.by_target.get(target_id, 0) + b.n_events
    # Expiry records of the events that go.
    expiries = [
        {"p_target": t, "p_seq": seq}
        for t, rows_ in expired_rows.items()
        for seq in rows_
        if seq in gone_seqs
    ]
    result.expired = len(expiries)
    # Transaction records all of whose events go now or went before. A purge keeps, in the
    # archive, the record of one whose other events were archived before (by a run with
    # archiving on): they still need it.
    leaving: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    shrunk: list[dict[str, Any]] = []
    for target_id, txns in done_txns.items():
        for txn in txns:
            key = {"p_target": target_id, "p_txn": txn.txn_id}
            if not archive and txn.state in _FINAL_TXN:
                # Its count of events is of those still kept, live or archived.
                n = sum(1 for seq in _seqs.decode(txn.seqs) if seq in gone_seqs)
                if n:
                    shrunk.append({**key, "p_n": n})
            if _all_gone(conn, _e, txn.seqs, gone):
                if archive or _all_gone(conn, schema.archived_events, txn.seqs, set()):
                    leaving.append(key)
                else:
                    kept.append(key)
    result.transactions = len(leaving)
    if dry_run:
        return result
    _remove(conn, going, expiries, leaving, kept, shrunk, archive)
    return result


def _all_gone(conn: sa.Connection, table: sa.Table, seqs: str, going: set[int]) -> bool:
    """
    Whether no block of ``table`` holds any of these events but those in ``going`` (by first
    number).
    """
    c = table.c
    for low, high in _seqs.ranges(seqs):
        start = conn.execute(sa.select(sa.func.max(c.first_seq)).where(c.first_seq <= low)).scalar()
        query = sa.select(c.first_seq, c.last_seq).where(c.first_seq <= high)
        query = query.where(c.first_seq >= (start if start is not None else low))
        for first, last in conn.execute(query):
            if last >= low and first not in going:
                return False
    return True


def _remove(
    conn: sa.Connection,
    going: list[Any],
    expiries: list[dict[str, Any]],
    leaving: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    shrunk: list[dict[str, Any]],
    archive: bool,
) -> None:
    firsts = [b.first_seq for b in going]
    in_blocks = _e.c.first_seq.in_(sa.bindparam("p_firsts", expanding=True))
    expiry_key = sa.and_(
        _xp.c.target_id == sa.bindparam("p_target"), _xp.c.seq == sa.bindparam("p_seq")
    )
    txn_key = sa.and_(
        _x.c.target_id == sa.bindparam("p_target"), _x.c.txn_id == sa.bindparam("p_txn")
    )
    for start in range(0, len(firsts), 500):
        part = {"p_firsts": firsts[start : start + 500]}
        if archive:
            conn.execute(
                sa.insert(schema.archived_events).from_select(
                    [c.name for c in _e.columns], sa.select(_e).where(in_blocks)
                ),
                part,
            )
        conn.execute(sa.delete(_e).where(in_blocks), part)
    if not archive:
        # The application's ids go with their events: the same id may then be submitted as a
        # new event. Archived events keep theirs, so that a repeat is still recognised.
        named = [i for b in going if b.ids for i in json.loads(b.ids) if i is not None]
        for start in range(0, len(named), 500):
            conn.execute(sa.delete(_ei).where(_ei.c.event_id.in_(named[start : start + 500])))
    if shrunk:
        conn.execute(
            sa.update(_x).where(txn_key).values(n_events=_x.c.n_events - sa.bindparam("p_n")),
            shrunk,
        )
    for rows, live, archived, key, move in (
        (expiries, _xp, schema.archived_expired, expiry_key, archive),
        (leaving, _x, schema.archived_txns, txn_key, archive),
        (kept, _x, schema.archived_txns, txn_key, True),
    ):
        if not rows:
            continue
        if move:
            insert = sa.insert(archived).from_select(
                [c.name for c in live.columns], sa.select(live).where(key)
            )
            for row in rows:
                conn.execute(insert, row)
        conn.execute(sa.delete(live).where(key), rows)
