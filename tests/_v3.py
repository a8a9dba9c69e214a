"""
A database at schema version 3, as relayer 3 leaves it, for the upgrade tests.

The database is written by hand, from the version 3 table definitions
(:func:`relayer.store.schema.define_tables` with version 3) and direct inserts, so that it stays
the same whatever the current code stores: nothing here uses relayer's encoding or its store.
The version 3 formats it writes:

- ``relayer_queue.events``: a run of encoded events (compact UTF-8 JSON) joined with ``b",\\n"``;
  runs are ordered by ``(pos, id)``, and a split puts a run back at the head of its target's
  queue with a ``pos`` below every other run of the target (and an ``id`` above them);
- ``relayer_transactions.body`` and ``relayer_dead_letters.body``: the wire body,
  ``b'{"events":['`` + the joined events + ``b"]}"``;
- ``relayer_targets``: ``state`` is ``up``, ``down`` or ``blocked``; ``last_txn_id`` is the last
  transaction id the target gave out;
- ``relayer_meta``: ``schema_version`` is ``"3"``.
"""

from __future__ import annotations

import json
from os import PathLike
from typing import Any

import attrs
import sqlalchemy as sa

from relayer.store.schema import define_tables

#: The clock time around which the database's times are set.
T0 = 1_700_000_000.0

SEPARATOR = b",\n"
BODY_PREFIX = b'{"events":['
BODY_SUFFIX = b"]}"

#: The columns of each table at version 3.
V3_COLUMNS = {
    "relayer_meta": ["name", "value"],
    "relayer_targets": [
        "target_id",
        "state",
        "failures",
        "next_attempt_at",
        "last_success_at",
        "last_txn_id",
        "last_error",
    ],
    "relayer_queue": ["id", "target_id", "pos", "n_events", "events", "oldest_at"],
    "relayer_transactions": [
        "target_id",
        "txn_id",
        "n_events",
        "body",
        "oldest_at",
        "created_at",
        "attempts",
        "last_attempt_at",
    ],
    "relayer_dead_letters": [
        "target_id",
        "txn_id",
        "n_events",
        "body",
        "oldest_at",
        "attempts",
        "reason",
        "dead_at",
    ],
    "relayer_nodes": ["node_id", "expires_at"],
    "relayer_leases": ["target_id", "owner", "expires_at"],
}


def v3_tables() -> sa.MetaData:
    """The version 3 tables; fails if ``define_tables`` no longer describes version 3 so."""
    m = define_tables(sa.MetaData(), 3)
    found = {name: [c.name for c in table.columns] for name, table in m.tables.items()}
    assert found == V3_COLUMNS, f"define_tables(..., 3) changed: {found}"
    return m


def encode(event: dict[str, Any]) -> bytes:
    """An event as relayer 3 encoded it: compact JSON, non-ASCII characters as UTF-8."""
    return json.dumps(event, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def join(events: list[bytes]) -> bytes:
    """The stored form of a run of encoded events."""
    return SEPARATOR.join(events)


def body_of(events: list[bytes]) -> bytes:
    """The wire body of a transaction of these encoded events."""
    return BODY_PREFIX + join(events) + BODY_SUFFIX


def events_of(body: bytes) -> list[bytes]:
    """The encoded events of a wire body."""
    assert body.startswith(BODY_PREFIX) and body.endswith(BODY_SUFFIX), body[:40]
    inner = body[len(BODY_PREFIX) : len(body) - len(BODY_SUFFIX)]
    return inner.split(SEPARATOR) if inner else []


@attrs.frozen
class Target:
    target_id: str
    state: str = "up"
    failures: int = 0
    next_attempt_at: float | None = None
    last_success_at: float | None = None
    last_txn_id: int = 0
    last_error: str | None = None


@attrs.frozen
class Run:
    """A row of ``relayer_queue``."""

    target_id: str
    pos: int
    events: list[bytes]
    oldest_at: float


@attrs.frozen
class Txn:
    """A row of ``relayer_transactions``: a transaction formed and not yet delivered."""

    target_id: str
    txn_id: int
    events: list[bytes]
    oldest_at: float
    created_at: float
    attempts: int
    last_attempt_at: float | None

    @property
    def body(self) -> bytes:
        return body_of(self.events)


@attrs.frozen
class Dead:
    """A row of ``relayer_dead_letters``."""

    target_id: str
    txn_id: int
    events: list[bytes]
    oldest_at: float
    attempts: int
    reason: str
    dead_at: float

    @property
    def body(self) -> bytes:
        return body_of(self.events)


@attrs.define
class Contents:
    """What a version 3 database holds; runs are inserted in list order, so ids follow it."""

    targets: list[Target] = attrs.field(factory=list)
    runs: list[Run] = attrs.field(factory=list)
    txns: list[Txn] = attrs.field(factory=list)
    dead: list[Dead] = attrs.field(factory=list)
    nodes: list[tuple[str, float]] = attrs.field(factory=list)
    leases: list[tuple[str, str | None, float]] = attrs.field(factory=list)

    def target(self, target_id: str) -> Target:
        return next(t for t in self.targets if t.target_id == target_id)

    def txns_of(self, target_id: str) -> list[Txn]:
        return sorted((x for x in self.txns if x.target_id == target_id), key=lambda x: x.txn_id)

    def queued(self, target_id: str) -> list[bytes]:
        """A target's queued events, in the order of its runs: by ``(pos, id)``."""
        runs = [(r.pos, i, r) for i, r in enumerate(self.runs) if r.target_id == target_id]
        return [e for _, _, r in sorted(runs, key=lambda x: x[:2]) for e in r.events]

    def pending(self, target_id: str) -> list[bytes]:
        """A target's undelivered events, in submit order: its transactions', then its queue."""
        formed = [e for x in self.txns_of(target_id) for e in x.events]
        return formed + self.queued(target_id)

    def dead_of(self, target_id: str) -> list[Dead]:
        return sorted((d for d in self.dead if d.target_id == target_id), key=lambda d: d.txn_id)


def _events(target_id: str, numbers: range | list[int]) -> list[bytes]:
    # Text that JSON escapes, and text that it does not, so that the bytes matter.
    return [
        encode({"type": "m.test", "target": target_id, "n": n, "text": 'é\n\u2028"ü"'})
        for n in numbers
    ]


def standard_contents() -> Contents:
    """
    A version 3 database in the middle of its work.

    - ``backlog``: UP, with queued events only, in several runs: two of them put back at the
      head by splits (``pos`` -1, then -2, each inserted after the runs it goes before);
    - ``inflight``: UP, a transaction in flight (sent twice so far) and, behind it, the second
      half of the split that made it (``pos`` -1) and runs queued before and after the split;
    - ``dead``: two dead letters, with their reasons, and events queued after them;
    - ``down``: DOWN after six failures, its next retry at ``T0 + 60``, with its head
      transaction (sent six times) and queued events behind it;
    - ``blocked``: BLOCKED on a refused transaction, with an event queued behind it;
    - ``empty``: registered, with five transactions delivered and nothing pending;
    - a node and two leases, long expired.
    """
    b = _events("backlog", range(8))
    i = _events("inflight", range(6))
    d = _events("dead", range(6))
    w = _events("down", range(4))
    k = _events("blocked", range(3))
    down_error = "ConnectionRefusedError: Connection was refused by other side: connection refused."
    return Contents(
        targets=[
            Target("backlog", last_txn_id=7, last_success_at=T0 - 50),
            Target("inflight", last_txn_id=4, last_success_at=T0 - 30),
            # Its last transaction was delivered, which cleared its last error.
            Target("dead", last_txn_id=3, last_success_at=T0 - 20),
            # Six failures: the next retry is 64 seconds after the last.
            Target(
                "down",
                state="down",
                failures=6,
                next_attempt_at=T0 + 60,
                last_success_at=T0 - 1000,
                last_txn_id=1,
                last_error=down_error,
            ),
            Target("blocked", state="blocked", last_txn_id=2, last_error="HTTP 400"),
            Target("empty", last_txn_id=5, last_success_at=T0 - 5),
        ],
        runs=[
            Run("backlog", 0, b[2:4], T0 - 40),
            Run("inflight", 0, i[3:5], T0 - 24),
            Run("backlog", 0, b[4:5], T0 - 39),
            Run("down", 0, w[1:2], T0 - 90),
            Run("backlog", -1, b[1:2], T0 - 45),
            Run("inflight", -1, i[2:3], T0 - 25),
            Run("backlog", 0, b[5:8], T0 - 30),
            Run("dead", 0, d[4:6], T0 - 15),
            Run("down", 0, w[2:4], T0 - 80),
            Run("inflight", 0, i[5:6], T0 - 12),
            Run("backlog", -2, b[0:1], T0 - 45),
            Run("blocked", 0, k[2:3], T0 - 8),
        ],
        txns=[
            Txn("inflight", 4, i[0:2], T0 - 25, T0 - 20, 2, T0 - 10),
            Txn("down", 1, w[0:1], T0 - 100, T0 - 100, 6, T0 - 4),
            Txn("blocked", 2, k[0:2], T0 - 9, T0 - 9, 1, T0 - 9),
        ],
        dead=[
            Dead("dead", 1, d[0:1], T0 - 60, 1, "HTTP 400", T0 - 59),
            # d[3] went out in transaction 3, delivered.
            Dead("dead", 2, d[1:3], T0 - 58, 2, "HTTP 422", T0 - 21),
        ],
        nodes=[("node-a", T0 - 500)],
        leases=[("backlog", "node-a", T0 - 500), ("down", None, 0.0)],
    )


def engine_for(database: str | PathLike[str]) -> sa.Engine:
    """An engine on a test database: a SQLite file's path, or a ``postgresql://`` URL."""
    if isinstance(database, str) and "://" in database:
        url = sa.make_url(database)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        return sa.create_engine(url, poolclass=sa.pool.NullPool)
    return sa.create_engine(f"sqlite:///{database}", poolclass=sa.pool.NullPool)


def write_v3(database: str | PathLike[str], contents: Contents | None = None) -> None:
    """Create a version 3 database holding ``contents`` (nothing but the schema by default)."""
    contents = contents if contents is not None else Contents()
    m = v3_tables()
    t = m.tables
    engine = engine_for(database)
    try:
        with engine.begin() as conn:
            m.create_all(conn)
            conn.execute(sa.insert(t["relayer_meta"]), [{"name": "schema_version", "value": "3"}])
            for target in contents.targets:
                conn.execute(sa.insert(t["relayer_targets"]).values(**attrs.asdict(target)))
            # One at a time, so that ids are given in list order, by the database: a
            # PostgreSQL sequence must know them.
            for run in contents.runs:
                conn.execute(
                    sa.insert(t["relayer_queue"]).values(
                        target_id=run.target_id,
                        pos=run.pos,
                        n_events=len(run.events),
                        events=join(run.events),
                        oldest_at=run.oldest_at,
                    )
                )
            for x in contents.txns:
                conn.execute(
                    sa.insert(t["relayer_transactions"]).values(
                        target_id=x.target_id,
                        txn_id=x.txn_id,
                        n_events=len(x.events),
                        body=x.body,
                        oldest_at=x.oldest_at,
                        created_at=x.created_at,
                        attempts=x.attempts,
                        last_attempt_at=x.last_attempt_at,
                    )
                )
            for dl in contents.dead:
                conn.execute(
                    sa.insert(t["relayer_dead_letters"]).values(
                        target_id=dl.target_id,
                        txn_id=dl.txn_id,
                        n_events=len(dl.events),
                        body=dl.body,
                        oldest_at=dl.oldest_at,
                        attempts=dl.attempts,
                        reason=dl.reason,
                        dead_at=dl.dead_at,
                    )
                )
            for node_id, expires_at in contents.nodes:
                conn.execute(
                    sa.insert(t["relayer_nodes"]).values(node_id=node_id, expires_at=expires_at)
                )
            for target_id, owner, expires_at in contents.leases:
                conn.execute(
                    sa.insert(t["relayer_leases"]).values(
                        target_id=target_id, owner=owner, expires_at=expires_at
                    )
                )
    finally:
        engine.dispose()


def dump(database: str | PathLike[str]) -> dict[str, Any]:
    """Every relayer table of a database: its columns, indexes and rows (sorted)."""
    engine = engine_for(database)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            result: dict[str, Any] = {}
            for name in sorted(inspector.get_table_names()):
                if not name.startswith("relayer_"):
                    continue
                columns = [
                    (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)
                ]
                indexes = sorted(
                    (i["name"] or "", tuple(i["column_names"]), bool(i.get("unique")))
                    for i in inspector.get_indexes(name)
                )
                rows = sorted(
                    (
                        tuple(_plain(v) for v in row)
                        for row in conn.execute(sa.text(f"SELECT * FROM {name}"))
                    ),
                    key=repr,
                )
                result[name] = {"columns": columns, "indexes": indexes, "rows": rows}
            return result
    finally:
        engine.dispose()


def schema_version(database: str | PathLike[str]) -> str | None:
    """The ``schema_version`` in ``relayer_meta``."""
    engine = engine_for(database)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT value FROM relayer_meta WHERE name = 'schema_version'")
            ).scalar_one_or_none()
    finally:
        engine.dispose()


def rows(database: str | PathLike[str], table: str) -> list[tuple[Any, ...]]:
    """A table's rows, sorted."""
    engine = engine_for(database)
    try:
        with engine.connect() as conn:
            found = conn.execute(sa.text(f"SELECT * FROM {table}"))
            return sorted((tuple(_plain(v) for v in row) for row in found), key=repr)
    finally:
        engine.dispose()


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, (memoryview, bytearray)) else value
