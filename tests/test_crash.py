"""
Crash tests: nothing acknowledged is lost when the process dies with SIGKILL.

A scheduler runs in a child process (``tests/crash/crash_child.py``: the real reactor, a SQLite
file on the threaded database pool, the HTTP transport) and delivers to receivers served by this
process over loopback HTTP: Matrix application services and Standard Webhooks endpoints at
once. The child kills itself with SIGKILL at a chosen checkpoint of
:mod:`relayer._faults` (or after a delay, or this process kills it when a receiver accepts a
transaction, before the answer goes out). It is then started again on the same database, and
again, until a run drains the store and exits with 0. Then:

- every acknowledged event (its submit Deferred fired: the child logged it) reached each of its
  targets, or expired there (the store lists it as expired, at or after its deadline), as the
  store's ``target_events`` and, for events fanned out to several targets, ``event_status``
  report it too;
- no send of an event started at or after its deadline (the child logs each send as it starts);
- no event arrived twice, once the receiver deduplicated by transaction id, unless the first
  transaction that brought it was abandoned (an event of it expired before the target's answer
  was recorded) and its live events were sent again in a new one;
- each target got its events in submit order (counting each event where it first arrived), and
  transaction ids that only grow;
- no transaction id was ever sent with two different bodies (failed attempts included);
- no event arrived that was not submitted, and the store is empty.

Every run archives final events as it goes (a retention of 0.05 s, run every 0.25 s, in
small chunks), so that kills meet retention runs too; the checks read live and archived rows
alike, through the views.

Every third chunk of a run's events is fanned out: one event for a random set of targets, stored
once. Some events carry a time to live, and a few a deadline already past when they are
submitted: those expire whenever a claim reaches them, so every run passes the
``event.expired`` checkpoint, which the kills use too.

Two more targets answer HTTP 400 to some transactions: ``d0`` (dead-letter policy) to the same
transactions every time it is sent them (the answer depends on the body only), and ``b0``
(BLOCK policy) to some transactions the first time it sees them. The child replays ``d0``'s
dead letters during each run, and wakes ``b0`` a moment after it blocks. For them:

- every acknowledged event was delivered or is dead-lettered at the end, and no
  event is both; only ``d0`` has dead letters, and only of events it refused;
- no event reached its target in two transactions with different ids;
- the events delivered without a refusal came in submit order; a refused event was delivered
  only after a replay that followed its refusal, and after every event of the first submission
  acknowledged before that replay.

The same runs on PostgreSQL, with three child processes at once sharing the targets through
short leases; one of them is killed (at each checkpoint, ``lease.acquired`` included, or at
random) and started again, as a supervisor would, until the store drains. There the events of
each run come in that run's submit order.

The receivers live in this process, so what they recorded survives the child's death. They are
scripted so that every run meets the DOWN paths: one target fails its first requests, one fails
at random, one loses an answer after accepting, and one answers 413 to large bodies.

Two targets, ``w0`` and ``w1``, use the Standard Webhooks format (one ``POST`` per event,
signed): ``w0`` signs with two secrets, as during a rotation, and its receiver knows only the
second; ``w1`` sends a token too. They take every fifth event number (a request per event would
make each run much longer), and every other event fanned out goes to targets of both formats.
``w0`` loses an answer each run, and ``w1`` fails its first two requests in one run, a quarter
of them at random in the next. Every webhook is
verified twice: by :class:`relayer.testing.Receiver` with relayer's own code, and by the
reference ``standardwebhooks`` package once with each secret the target signs with, on the wall
clock (the child's real reactor signs with it); one that does not verify fails the test. A
webhook carries no transaction id: the receiver deduplicates by ``webhook-id``, and the checks
find each webhook's transaction in the store. What Standard Webhooks promises is checked as
stated: delivery at least once (every acknowledged event arrived, or expired), one event per
request and in one transaction, the same ``webhook-id`` (the event's id) and the same bytes on
every request of an event, retries and restarts included, a repeat only as a retry of its
transaction (the child logged that many sends of it), and each target's events in submit order,
counting each where it first arrived. The checks above hold for the webhook targets as they do
for the Matrix ones, each webhook standing for a transaction of one event.

The child runs are forked from a "zygote" that has imported relayer once (see the child's
docstring); each run is still its own process with its own reactor, database connections and
threads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import pytest_twisted
import sqlalchemy as sa
from standardwebhooks import webhooks as reference
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from relayer import DeliveryState
from relayer._faults import POINTS
from relayer.formats import webhook_id
from relayer.store import _seqs, schema
from relayer.testing import Receiver, open_store

# Each test is for SQLite (one process on a file) or for PostgreSQL (processes sharing leases).
pytestmark = [pytest.mark.integration]

CHILD = Path(__file__).parent / "crash" / "crash_child.py"
#: The dead-letter target and the BLOCK target, which refuse some transactions with HTTP 400.
DEAD_LETTER = "d0"
BLOCK = "b0"
#: The Standard Webhooks targets, and the secrets each signs with: ``w0`` with two, as in a
#: rotation (its receiver knows only the second), ``w1`` with one, and a token.
WEBHOOKS = {
    "w0": (
        "whsec_" + base64.b64encode(b"crash-suite-old-secret-of-32-byte").decode(),
        "whsec_" + base64.b64encode(b"crash-suite-new-secret-of-32-byte").decode(),
    ),
    "w1": ("whsec_" + base64.b64encode(b"crash-suite-w1-secret-of-32-bytes").decode(),),
}
#: The secrets each webhook target's receiver accepts, and the token it expects ("" for none).
WEBHOOK_RECEIVER = {"w0": (WEBHOOKS["w0"][1:], ""), "w1": (WEBHOOKS["w1"], "token-w1")}
TARGETS = ("t0", "t1", "t2", "t3", "t4", DEAD_LETTER, BLOCK, *WEBHOOKS)
#: A webhook target takes the events whose number is a multiple of this: it sends a request
#: per event, and so many requests would make each run much longer.
WEBHOOK_EVERY = 5
#: The share (in percent) of transaction bodies that each of them refuses.
REFUSE_PERCENT = {DEAD_LETTER: 15, BLOCK: 20}
#: The checkpoint of a claim that records expired events, inside its database transaction.
#: Listed here until relayer._faults.POINTS names it.
EXPIRY_POINT = "event.expired"
ALL_POINTS = POINTS if EXPIRY_POINT in POINTS else (*POINTS, EXPIRY_POINT)
#: The points a single process without leases passes.
SQLITE_POINTS = tuple(p for p in ALL_POINTS if p != "lease.acquired")
#: Events' deadlines: the times to live, the share of events given one, and the share of events
#: given a deadline already past.
TTLS = (0.3, 1.0, 3.0)
TTL_PERCENT = 20
EXPIRED_PERCENT = 5
#: A send is logged just after the scheduler's own check of its deadline: by this much later,
#: at most, it still started before its deadline.
SEND_CLOCK_SLACK = 0.1
#: The processes that share a PostgreSQL database, and their lease settings: short, so that a
#: dead process's targets are taken over quickly. Requests must end well within a lease.
NODES = ("a", "b", "c")
LEASES = {"timeout": 1.5, "renew_interval": 0.3}
SHARED_REQUEST_TIMEOUT = 1.0
#: Events each shared run submits per target, and each restarted run.
SHARED_EVENTS = 40
RESTART_EVENTS = 20
#: Events submitted to each target in one run, and how many per target at once.
EVENTS_PER_RUN = 60
CHUNK = 10
MAX_EVENTS = 8
BACKOFF = {"initial": 0.02, "maximum": 0.1}
#: Every run archives its final events as it goes, in small chunks: kills meet retention
#: runs too, and the checks read live and archived rows alike.
RETENTION = {"keep": 0.05, "archive": True, "interval": 0.25, "chunk": 16}
#: A bound on one run, so that a hang shows as a failure rather than a stuck suite.
RUN_DEADLINE = 60.0
#: The same for a run sharing PostgreSQL (such a run takes a few seconds).
SHARED_RUN_DEADLINE = 30.0
#: The random rounds: sequences (each on its own database), and the kills in each.
SEQUENCES = 10
KILLS_PER_SEQUENCE = 6
MAX_RUNS_PER_SEQUENCE = 20
RECEIVER_KILL = "receiver.accepted"
#: The states an event ends in at a target.
FINAL = {DeliveryState.DELIVERED, DeliveryState.EXPIRED, DeliveryState.DEAD_LETTERED}
#: The seed of the random rounds; set RELAYER_CRASH_SEED to try others.
SEED = int(os.environ.get("RELAYER_CRASH_SEED", "20240601"))


def reactor_() -> Any:
    from twisted.internet import reactor

    return reactor


def done(d: Deferred[Any]) -> Any:
    """The result of a Deferred of a store on the inline pool, which has fired already."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the store's Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


# -- the child processes ---------------------------------------------------------------------


@attrs.define
class RunResult:
    """How a child run ended."""

    status: int
    hung: bool = False

    @property
    def killed(self) -> bool:
        return os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGKILL

    @property
    def code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")]
    )
    return env


class Launcher(typing.Protocol):
    async def start(self, config: dict[str, Any]) -> tuple[int, Deferred[int]]:
        """Start a run; return its pid, and a Deferred firing with its wait status."""


class _Run(ProcessProtocol):
    def __init__(self) -> None:
        self.stderr = b""
        self.ended: Deferred[int] = Deferred()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        # ProcessDone has status 0; ProcessTerminated has the raw wait status.
        self.ended.callback(getattr(reason.value, "status", None) or 0)


class Direct:
    """Each run is a new ``python crash_child.py CONFIG``, imports and all."""

    async def start(self, config: dict[str, Any]) -> tuple[int, Deferred[int]]:
        run = _Run()
        process = reactor_().spawnProcess(
            run,
            sys.executable,
            [sys.executable, str(CHILD), json.dumps(config)],
            env=child_env(),
        )
        return process.pid, run.ended


class Zygote(ProcessProtocol):
    """The fork server of ``crash_child.py --zygote``: any number of runs at once."""

    def __init__(self) -> None:
        self._buffer = b""
        self.stderr = b""
        self._pids: list[Deferred[int]] = []
        self._exits: dict[int, Deferred[int]] = {}
        self.ended: Deferred[None] = Deferred()

    @classmethod
    def spawn(cls) -> Zygote:
        z = cls()
        reactor_().spawnProcess(
            z, sys.executable, [sys.executable, str(CHILD), "--zygote"], env=child_env()
        )
        return z

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            words = line.split()
            if words[:1] == [b"pid"] and self._pids:
                pid = int(words[1])
                # Registered before the start returns, so that no exit line can come first.
                self._exits[pid] = Deferred()
                self._pids.pop(0).callback(pid)
            elif words[:1] == [b"exit"] and int(words[1]) in self._exits:
                self._exits.pop(int(words[1])).callback(int(words[2]))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        waiting = self._pids + list(self._exits.values())
        self._pids, self._exits = [], {}
        for d in waiting:
            d.errback(RuntimeError(f"the zygote died: {self.stderr.decode()[-2000:]}"))
        if reason.check(ProcessDone):
            self.ended.callback(None)
        else:
            self.ended.errback(reason)

    async def start(self, config: dict[str, Any]) -> tuple[int, Deferred[int]]:
        """Start a run; return its pid, and a Deferred firing with its wait status."""
        pid: Deferred[int] = Deferred()
        self._pids.append(pid)
        assert self.transport is not None
        self.transport.write(json.dumps(config).encode() + b"\n")
        number = await pid
        return number, self._exits[number]

    def close(self) -> Deferred[None]:
        """Let the zygote finish its runs and exit; kill it if it takes longer than a run may."""
        transport = self.transport
        assert transport is not None
        transport.closeStdin()
        timer = reactor_().callLater(RUN_DEADLINE, transport.signalProcess, "KILL")

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return self.ended.addBoth(done)


@pytest.fixture(scope="module")
def zygotes() -> Iterator[list[Zygote]]:
    """Two fork servers, so that two sequences can run side by side."""
    pool = [Zygote.spawn(), Zygote.spawn()]
    yield pool
    for z in pool:
        pytest_twisted.blockon(z.close())


# -- the receivers ---------------------------------------------------------------------------


def refuses(target_id: str, body: bytes) -> bool:
    """Whether ``target_id`` refuses a transaction with this body (the same answer every time)."""
    digest = hashlib.sha256(target_id.encode() + b"\0" + body).digest()
    return int.from_bytes(digest[:4], "big") % 100 < REFUSE_PERCENT.get(target_id, 0)


@attrs.frozen
class Refusal:
    """A transaction a target answered with HTTP 400."""

    at: float
    txn_id: int
    numbers: tuple[int, ...]


@attrs.frozen
class Accepted:
    """
    What a target accepted, each counted once: a Matrix transaction, or a webhook (one event).

    A webhook does not carry its transaction's id: ``txn_id`` is None until the check finds it
    in the store (a webhook target's event is in one transaction, see :meth:`Sequence.check`).
    """

    txn_id: int | None
    events: list[Any]
    at: float


class Recorder(Resource):
    """
    One target: a :class:`Receiver`, plus a ledger of every request's body digest by
    transaction id (failed attempts included), and a hook called when a transaction is accepted.

    ``d0`` answers 400 to the bodies :func:`refuses` picks, and to the first body it is sent,
    every time; ``b0`` answers 400 to those the first time only, so that a woken target goes on.

    A webhook target's recorder takes ``POST`` requests: before its receiver (which verifies
    them with relayer's own code), it verifies each with the reference ``standardwebhooks``
    package, once with each secret the target signs with (each must verify on its own: the
    sender signs with all of them), on the wall clock that the child's real reactor signs with;
    its ledger is by ``webhook-id``, and it counts the requests each id came in.
    """

    isLeaf = True

    def __init__(self, target_id: str, receiver: Receiver) -> None:
        super().__init__()
        self.target_id = target_id
        self.receiver = receiver
        self.ledger: dict[int, bytes] = {}
        self.violations: list[str] = []
        self.on_accept: Callable[[], None] | None = None
        self.refusals: list[Refusal] = []
        #: When each accepted transaction was first accepted, in order.
        self.accepted_at: list[float] = []
        self._verdicts: dict[bytes, bool] = {}
        #: A webhook target's secrets; None for a Matrix target.
        self.secrets = WEBHOOKS.get(target_id)
        #: Per webhook-id: the digest of the body it first came with.
        self.webhook_ledger: dict[str, bytes] = {}
        #: Per webhook-id: how many requests carried it (failed attempts included).
        self.webhook_requests: dict[str, int] = {}
        #: Per event number: the webhook-ids it came with (one, if they were stable).
        self.webhook_ids: dict[int, set[str]] = {}

    def accepted(self) -> list[Accepted]:
        """What the target accepted, each transaction or webhook once, in order."""
        receiver = self.receiver
        if self.secrets is None:
            return [
                Accepted(x.txn_id, x.events, at)
                for x, at in zip(receiver.transactions, self.accepted_at, strict=True)
            ]
        return [
            Accepted(None, [w.event], at)
            for w, at in zip(receiver.webhooks, self.accepted_at, strict=True)
        ]

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None and self.secrets is not None
        body = request.content.read()
        request.content.seek(0)
        headers = {
            name.decode("latin-1"): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        msg_id = request.getHeader(b"webhook-id")
        shown = msg_id.decode("latin-1") if msg_id is not None else None
        for i, secret in enumerate(self.secrets):
            try:
                reference.Webhook(secret).verify(body, headers, json_parse=False)
            except reference.WebhookVerificationError as e:
                self.violations.append(
                    f"{self.target_id}: webhook {shown!r} does not verify with secret #{i} by "
                    f"the standardwebhooks package: {e}"
                )
        if shown is not None:
            self.webhook_requests[shown] = self.webhook_requests.get(shown, 0) + 1
            digest = hashlib.sha256(body).digest()
            if self.webhook_ledger.setdefault(shown, digest) != digest:
                self.violations.append(
                    f"{self.target_id}: webhook {shown!r} was sent with different bytes"
                )
            try:
                event = json.loads(body)
            except ValueError:
                event = None
            if not isinstance(event, dict) or not isinstance(event.get("n"), int):
                self.violations.append(
                    f"{self.target_id}: webhook {shown!r} is not one event: {body[:80]!r}"
                )
            else:
                self.webhook_ids.setdefault(event["n"], set()).add(shown)
        before = len(self.receiver.webhooks)
        answer = self.receiver.render_POST(request)
        if len(self.receiver.webhooks) > before:
            self._accepted()
        return answer

    def _accepted(self) -> None:
        self.accepted_at.append(time.monotonic())
        if self.on_accept is not None:
            # Before the answer goes out: the target has the transaction, the sender never
            # learns it.
            self.on_accept()

    def _refuse(self, digest: bytes, body: bytes) -> bool:
        if self.target_id not in REFUSE_PERCENT:
            return False
        verdict = self._verdicts.get(digest)
        if verdict is None:
            verdict = not self._verdicts or refuses(self.target_id, body)
            self._verdicts[digest] = verdict
            return verdict
        # The dead-letter target refuses a body every time; the BLOCK target only at first.
        return verdict and self.target_id == DEAD_LETTER

    def render_PUT(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        request.content.seek(0)
        path = request.postpath or []
        digest = hashlib.sha256(body).digest()
        if path and path[-1].isdigit():
            txn_id = int(path[-1])
            seen = self.ledger.setdefault(txn_id, digest)
            if seen != digest:
                self.violations.append(
                    f"{self.target_id}: transaction {txn_id} was sent with different bytes"
                )
            if self._refuse(digest, body):
                numbers = tuple(e["n"] for e in json.loads(body)["events"])
                self.refusals.append(Refusal(time.monotonic(), txn_id, numbers))
                request.setResponseCode(400)
                request.setHeader(b"content-type", b"application/json")
                return b'{"errcode": "M_BAD_JSON", "error": "refused by the test"}'
        before = len(self.receiver.transactions)
        answer = self.receiver.render_PUT(request)
        if len(self.receiver.transactions) > before:
            self._accepted()
        return answer


class _QuietSite(Site):
    def log(self, request: http.Request) -> None:
        pass


def postgres_engine(url: str) -> sa.Engine:
    return sa.create_engine(
        sa.make_url(url).set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool
    )


@attrs.define
class Acks:
    """The acknowledgement file: acknowledged events, and replays, in the order they happened."""

    #: Per target: (line number, n) of each acknowledged event.
    events: dict[str, list[tuple[int, int]]]
    #: Per target: (line number, monotonic time) of each replay.
    replays: dict[str, list[tuple[int, float]]]
    #: Per target: the id of each acknowledged event, by n.
    ids: dict[str, dict[int, str]]

    @classmethod
    def read(cls, path: Path) -> Acks:
        events: dict[str, list[tuple[int, int]]] = {t: [] for t in TARGETS}
        replays: dict[str, list[tuple[int, float]]] = {t: [] for t in TARGETS}
        ids: dict[str, dict[int, str]] = {t: {} for t in TARGETS}
        if path.exists():
            for i, line in enumerate(path.read_text().splitlines()):
                words = line.split()
                if words[0] == "replay":
                    replays[words[1]].append((i, float(words[2])))
                else:
                    events[words[0]].append((i, int(words[1])))
                    ids[words[0]][int(words[1])] = words[2]
        return cls(events, replays, ids)

    def targets_of(self) -> dict[str, set[str]]:
        """The targets each acknowledged event was acknowledged for, by id."""
        found: dict[str, set[str]] = {}
        for t, by_n in self.ids.items():
            for event_id in by_n.values():
                found.setdefault(event_id, set()).add(t)
        return found


@attrs.frozen
class Send:
    """A send, as the child logged it when it started."""

    target_id: str
    txn_id: int
    at: float
    numbers: tuple[int, ...]

    @classmethod
    def read(cls, path: Path) -> list[Send]:
        sends = []
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split()
                if len(words) != 4:
                    # The child died in the middle of the write (it never does: a write of an
                    # O_APPEND file lands whole), or before its end.
                    continue
                numbers = tuple(int(n) for n in words[3].split(","))
                sends.append(cls(words[0], int(words[1]), float(words[2]), numbers))
        return sends


@attrs.define
class Sequence:
    """
    Runs of the child on one database, until it drains; and what they did.

    On SQLite one run goes at a time; on PostgreSQL (``url`` given) the runs of the nodes go on
    at the same time, sharing the targets through leases.
    """

    folder: Path
    name: str
    seed: int
    recorders: dict[str, Recorder]
    port: IListeningPort
    url: str | None = None
    planned: dict[str, set[int]] = attrs.field(factory=dict)
    runs: list[RunResult] = attrs.field(factory=list)
    kills: list[Any] = attrs.field(factory=list)
    launched: int = 0
    #: How many events the runs archived, as the check found.
    archived: int = 0

    @classmethod
    def make(cls, folder: Path, name: str, seed: int, url: str | None = None) -> Sequence:
        root = Resource()
        recorders = {}
        for t in TARGETS:
            # Replayed events come after later ones, the runs of several processes interleave,
            # and the live events of an abandoned transaction come again: the check looks at
            # the order itself.
            if t in WEBHOOKS:
                # The timestamps are checked against the wall clock, which the child's real
                # reactor signs with.
                secrets, token = WEBHOOK_RECEIVER[t]
                receiver = Receiver(token, webhook_secrets=secrets, clock=reactor_())
            else:
                receiver = Receiver(f"token-{t}")
            recorder = Recorder(t, receiver)
            recorders[t] = recorder
            root.putChild(t.encode(), recorder)
        site = _QuietSite(root)
        site.noisy = False
        port = reactor_().listenTCP(0, site, interface="127.0.0.1")
        if url is not None:
            # Once, ahead of the processes, as an operator would.
            engine = postgres_engine(url)
            with engine.begin() as conn:
                schema.upgrade(conn)
            engine.dispose()
        return cls(folder, name, seed, recorders, port, url, {t: set() for t in TARGETS})

    @property
    def db(self) -> Path:
        return self.folder / f"{self.name}.db"

    @property
    def acks(self) -> Path:
        return self.folder / f"{self.name}.acks"

    @property
    def sends(self) -> Path:
        return self.folder / f"{self.name}.sends"

    def script_receivers(self, rng: random.Random, index: int) -> None:
        """Make run ``index`` meet the DOWN paths: failures, a lost answer and 413s."""
        r = {t: rec.receiver for t, rec in self.recorders.items()}
        r["t0"].fail_next(2, 500)
        r["t1"].fail_randomly(0.25, 503, random=random.Random(rng.random()).random)
        r["t2"].lose_responses(1)
        r["t3"].limit_body(400)
        r["w0"].lose_responses(1)
        if index % 2:
            r["w1"].fail_randomly(0.25, 500, random=random.Random(rng.random()).random)
        else:
            # The first run fails for sure, however few requests it sends.
            r["w1"].fail_next(2, 503)

    async def run(
        self,
        launcher: Launcher,
        kill: dict[str, Any] | None,
        events: int = EVENTS_PER_RUN,
        node: str | None = None,
    ) -> RunResult:
        """
        One run of the child, with ``kill`` (a child kill spec, a receiver kill, or None),
        submitting ``events`` new events to each target; on PostgreSQL, as ``node``.
        """
        index = self.launched
        self.launched += 1
        rng = random.Random(f"{self.seed}/{index}")
        first = index * 1000
        for t in TARGETS:
            every = WEBHOOK_EVERY if t in WEBHOOKS else 1
            self.planned[t].update(n for n in range(first, first + events) if n % every == 0)
        self.script_receivers(rng, index)
        port = self.port.getHost().port  # type: ignore[attr-defined]
        child_kill = kill if kill is not None and "receiver" not in kill else None
        targets: list[dict[str, Any]] = [
            {"id": t, "base_url": f"http://127.0.0.1:{port}/{t}", "token": f"token-{t}"}
            for t in TARGETS
        ]
        for t in targets:
            if t["id"] in WEBHOOKS:
                t.update(
                    format="standard-webhooks",
                    secrets=list(WEBHOOKS[t["id"]]),
                    token=WEBHOOK_RECEIVER[t["id"]][1],
                    every=WEBHOOK_EVERY,
                )
            elif t["id"] == DEAD_LETTER:
                t["replay"] = True
            elif t["id"] == BLOCK:
                t["policy"] = "block"
        config: dict[str, Any] = {
            "db": str(self.db),
            "targets": targets,
            "max_events": MAX_EVENTS,
            "backoff": BACKOFF,
            "first": first,
            "events": events,
            "chunk": CHUNK,
            "run": index,
            "acks": str(self.acks),
            "sends": str(self.sends),
            "ttls": TTLS,
            "ttl_percent": TTL_PERCENT,
            "expired_percent": EXPIRED_PERCENT,
            "seed": rng.random(),
            "log": str(self.run_log(index)),
            "kill": child_kill,
            "retention": RETENTION,
        }
        if self.url is not None:
            config.update(
                store="postgres",
                db=self.url,
                leases=dict(LEASES, node_id=f"{node}{index}"),
                request_timeout=SHARED_REQUEST_TIMEOUT,
                poll=0.05,
            )
        with open(self.run_log(index), "a") as f:
            f.write(f"\n==== run {index} of {self.name} (node {node}): kill {kill!r}\n")
        pid, ended = await launcher.start(config)
        accepted = [0]
        if kill is not None and "receiver" in kill:

            def on_accept() -> None:
                accepted[0] += 1
                if accepted[0] == kill["receiver"] and not ended.called:
                    os.kill(pid, signal.SIGKILL)

            for recorder in self.recorders.values():
                recorder.on_accept = on_accept
        hung = []

        def watchdog() -> None:
            hung.append(True)
            os.kill(pid, signal.SIGKILL)

        deadline = RUN_DEADLINE if self.url is None else SHARED_RUN_DEADLINE
        timer = reactor_().callLater(deadline, watchdog)
        try:
            status = await ended
        finally:
            if timer.active():
                timer.cancel()
            if kill is not None and "receiver" in kill:
                for recorder in self.recorders.values():
                    recorder.on_accept = None
        result = RunResult(status, hung=bool(hung))
        self.runs.append(result)
        if result.killed and not result.hung:
            self.kills.append(kill)
        assert not result.hung, (
            f"run {index} of {self.name} hung; the store: {self.snapshot()}\n{self.log_tail(index)}"
        )
        assert result.killed or result.code == 0, (
            f"run {index} of {self.name} failed: {result}\n{self.log_tail(index)}"
        )
        return result

    async def drain(self, launcher: Launcher) -> None:
        """
        Run the child without a kill: it must drain the store and exit with 0.

        It submits nothing: what the kills left pending must go out without new traffic.
        """
        result = await self.run(launcher, None, events=0)
        assert result.code == 0, f"{self.name}: the clean run ended with {result}"

    async def shared(
        self,
        launcher: Launcher,
        kills: dict[str, list[dict[str, Any]]],
        first_alone: bool = False,
    ) -> None:
        """
        Run every node at once; start again each one that is killed (taking its next kill from
        ``kills``, or none), until each has had a run that drained the store and exited with 0.

        With ``first_alone``, the other nodes start once the first node's first run holds its
        leases (or has ended): that run owns every target at first, and sheds the others' shares
        as they come, so that it passes each point as a run owning all the targets does. (Started
        together, the first node may come last to the leases and get one target, whose events
        the node before it has mostly sent: too few passes of a point to reach the one armed.)
        """
        first_leased: Deferred[None] = Deferred()

        async def node(name: str) -> None:
            if first_alone and name != NODES[0]:
                await first_leased
            left = list(kills.get(name, []))
            events = SHARED_EVENTS
            while True:
                node_id = f"{name}{self.launched}"
                run = Deferred.fromCoroutine(
                    self.run(launcher, left.pop(0) if left else None, events, name)
                )
                if first_alone and name == NODES[0] and not first_leased.called:
                    try:
                        await self._until_leased(node_id, run)
                    finally:
                        first_leased.callback(None)
                result = await run
                if result.code == 0:
                    return
                assert len(self.runs) < MAX_RUNS_PER_SEQUENCE, f"{self.name}: too many runs"
                events = RESTART_EVENTS

        await gather([Deferred.fromCoroutine(node(n)) for n in NODES])

    async def _until_leased(self, node_id: str, run: Deferred[RunResult]) -> None:
        """Wait until the run of ``node_id`` holds a lease, or has ended."""
        owned = f"SELECT count(*) FROM relayer_leases WHERE owner = '{node_id}'"
        while not run.called:
            [(leases,)] = await deferToThread(self.query, owned)
            if leases:
                return
            await deferLater(reactor_(), 0.02, lambda: None)

    def run_log(self, index: int) -> Path:
        return self.folder / f"{self.name}.run{index}.log"

    def log_tail(self, index: int | None = None, lines: int = 60) -> str:
        """The end of a run's log (the last run's by default)."""
        try:
            path = self.run_log(self.launched - 1 if index is None else index)
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def snapshot(self) -> dict[str, Any]:
        """The targets' states, queues and leases in the store, to show why a run hung."""
        leases = []
        if self.url is not None:
            leases = self.query("SELECT target_id, owner, expires_at FROM relayer_leases")
        return {
            "states": self.states(),
            "queue": self.query("SELECT target_id, count(*) FROM relayer_runs GROUP BY target_id"),
            "transactions": self.query(
                "SELECT target_id, count(*) FROM relayer_txns"
                " WHERE state IN ('pending', 'awaiting') GROUP BY target_id"
            ),
            "leases": leases,
            "now": time.time(),
        }

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a query on the store (once no run goes on)."""
        if self.url is None:
            with sqlite3.connect(self.db) as conn:
                rows = conn.execute(sql).fetchall()
            conn.close()
            return rows
        engine = postgres_engine(self.url)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(sql)).all()]
        finally:
            engine.dispose()

    def states(self) -> dict[str, str]:
        """The targets' states in the store."""
        return {t: state for t, state in self.query("SELECT target_id, state FROM relayer_targets")}

    def acknowledged(self) -> dict[str, list[int]]:
        return {t: [n for _, n in a] for t, a in Acks.read(self.acks).events.items()}

    def stored_events(self) -> dict[tuple[str, int], tuple[int, float | None]]:
        """
        Each stored event's sequence number and deadline, by (target, n), for each of its
        targets. Events are stored in blocks: their numbers as ranges, their bodies one a line,
        and their deadlines as a JSON list (or none at all).
        """
        found = {}
        for seqs, block, expires in self.query(
            "SELECT seqs, bodies, expires FROM relayer_all_events"
        ):
            numbers = _seqs.decode(seqs)
            deadlines = json.loads(expires) if expires else [None] * len(numbers)
            for seq, body, expires_at in zip(
                numbers, bytes(block).split(b"\n"), deadlines, strict=True
            ):
                e = json.loads(body)
                for t in [e["t"]] if isinstance(e["t"], str) else e["t"]:
                    found[(t, e["n"])] = (seq, expires_at)
        return found

    def store_view(self, acks: Acks) -> tuple[dict[str, dict[DeliveryState, list[Any]]], Any]:
        """
        What the store reports through its own reads: each target's events in each state (by
        ``target_events``), and the status of each event acknowledged for several targets.
        """
        store = open_store(Clock(), self.url if self.url is not None else self.db)
        done(store.open())
        try:
            lists: dict[str, dict[DeliveryState, list[Any]]] = {}
            for t in TARGETS:
                lists[t] = {}
                for state in DeliveryState:
                    entries: list[Any] = []
                    after = None
                    while True:
                        page = done(store.target_events(t, state, after, 1000))
                        entries.extend(page.entries)
                        after = page.next
                        if after is None:
                            break
                    lists[t][state] = entries
            statuses = {
                event_id: done(store.event_status(event_id))
                for event_id, targets in acks.targets_of().items()
                if len(targets) > 1
            }
        finally:
            done(store.close())
        return lists, statuses

    def check(self) -> None:
        """Every invariant, once the store is drained."""
        [(archived,)] = self.query("SELECT coalesce(sum(n_events), 0) FROM relayer_archived_events")
        self.archived = int(archived)
        acks = Acks.read(self.acks)
        acked = {t: {n for _, n in a} for t, a in acks.events.items()}
        problems: list[str] = []
        stored = self.stored_events()
        number = {seq: n for (_, n), (seq, _) in stored.items()}
        dead: dict[str, list[int]] = {t: [] for t in TARGETS}
        txn_states: dict[tuple[str, int], str] = {}
        # The transactions each event was in, at each target, in the order of their ids.
        txns_of: dict[tuple[str, int], list[int]] = {}
        for target_id, txn_id, state, seqs in sorted(
            self.query("SELECT target_id, txn_id, state, seqs FROM relayer_all_txns")
        ):
            txn_states[(target_id, txn_id)] = state
            for s in _seqs.decode(seqs):
                txns_of.setdefault((target_id, number[s]), []).append(txn_id)
            if state == "dead":
                dead[target_id] += [number[s] for s in _seqs.decode(seqs)]
        sends = Send.read(self.sends)
        problems += self._check_webhooks(acks, stored, txns_of, sends)
        expired: dict[str, dict[int, float]] = {t: {} for t in TARGETS}
        for target_id, seq, expired_at in self.query(
            "SELECT target_id, seq, expired_at FROM relayer_all_expired"
        ):
            n = number[seq]
            expired[target_id][n] = expired_at
            deadline = stored[(target_id, n)][1]
            if deadline is None or expired_at < deadline:
                problems.append(
                    f"{target_id}: event {n} expired at {expired_at}, its deadline is {deadline}"
                )
        # No send started at or after the deadline of an event in it.
        for send in sends:
            for n in send.numbers:
                deadline = stored[(send.target_id, n)][1]
                if deadline is not None and send.at >= deadline + SEND_CLOCK_SLACK:
                    problems.append(
                        f"{send.target_id}: transaction {send.txn_id} with event {n} was sent "
                        f"at {send.at}, after its deadline {deadline}"
                    )
        for t in TARGETS:
            recorder = self.recorders[t]
            receiver = recorder.receiver
            problems += [f"{t}: {v}" for v in receiver.violations]
            problems += recorder.violations
            # Where each event first arrived (its index among the target's first arrivals),
            # and in which transaction; and which events were refused, when last.
            arrived: dict[int, int] = {}
            txn_of: dict[int, int] = {}
            when: dict[int, float] = {}
            accepted = recorder.accepted()
            if t in WEBHOOKS:
                # A webhook's transaction is the one its event was in (there is one, as
                # _check_webhooks checks).
                accepted = [
                    attrs.evolve(a, txn_id=txns_of.get((t, a.events[0]["n"]), [None])[0])
                    for a in accepted
                ]
            for txn in accepted:
                at = txn.at
                state = txn_states.get((t, txn.txn_id)) if txn.txn_id is not None else None
                if state not in ("delivered", "abandoned"):
                    problems.append(f"{t}: transaction {txn.txn_id} was accepted, yet {state}")
                for e in txn.events:
                    n = e["n"]
                    if n in txn_of and txn_of[n] != txn.txn_id:
                        if txn_states.get((t, txn_of[n])) != "abandoned":
                            problems.append(
                                f"{t}: event {n} arrived in transactions {txn_of[n]} and "
                                f"{txn.txn_id}, and the first was not abandoned"
                            )
                        continue
                    txn_of.setdefault(n, txn.txn_id)
                    arrived.setdefault(n, len(arrived))
                    when.setdefault(n, at)
            # The refusals that dead-lettered their transaction. (A refused transaction may also
            # have been abandoned before its dead letter was stored, its process killed, and its
            # live events sent in a new one; or, at the BLOCK target, delivered once woken.)
            refused: dict[int, list[float]] = {}
            for refusal in recorder.refusals:
                if txn_states.get((t, refusal.txn_id)) not in ("dead", "replayed"):
                    continue
                for n in refusal.numbers:
                    refused.setdefault(n, []).append(refusal.at)
            delivered = set(arrived)
            # Received in a transaction that was abandoned: the target has it, and the
            # scheduler never learnt it (the answer was lost): it may have expired since, or
            # been refused in the transaction of the live events.
            unrecorded = {n for n in delivered if txn_states.get((t, txn_of[n])) == "abandoned"}
            unexpected = delivered - self.planned[t]
            if unexpected:
                problems.append(f"{t}: events never submitted arrived: {sorted(unexpected)}")
            lost = acked[t] - delivered - set(dead[t]) - set(expired[t])
            if lost:
                problems.append(f"{t}: acknowledged events were lost: {sorted(lost)}")
            both = (delivered - unrecorded) & (set(dead[t]) | set(expired[t]))
            if both:
                problems.append(f"{t}: events delivered and dead-lettered or expired: {both}")
            if set(dead[t]) & set(expired[t]):
                problems.append(f"{t}: events dead-lettered and expired: {dead[t]}")
            if len(dead[t]) != len(set(dead[t])):
                problems.append(f"{t}: events dead-lettered twice: {sorted(dead[t])}")
            if dead[t] and t != DEAD_LETTER:
                problems.append(f"{t}: {len(dead[t])} events were dead-lettered")
            if set(dead[t]) - set(refused):
                problems.append(
                    f"{t}: events dead-lettered unrefused: {set(dead[t]) - set(refused)}"
                )
            # Events delivered without a refusal, each where it first arrived: in submit order
            # (of their run, if the runs of several processes went on at once).
            streams: dict[int, list[int]] = {}
            for n in sorted(arrived, key=arrived.__getitem__):
                if n not in refused:
                    run = 0 if self.url is None else n // 1000
                    streams.setdefault(run, []).append(n)
            for stream in streams.values():
                if stream != sorted(stream):
                    problems.append(f"{t}: events out of order: {stream}")
            if t == DEAD_LETTER:
                # An event the target got in an abandoned transaction, whose answer was lost,
                # may be refused later in the transaction of the live events: it is not a
                # replay's to explain.
                kept = {n: i for n, i in arrived.items() if n not in unrecorded}
                problems += self._check_replays(t, acks, kept, when, refused)
            ids = [x.txn_id for x in accepted if x.txn_id is not None]
            if ids != sorted(set(ids)):
                problems.append(f"{t}: transaction ids did not only grow: {ids}")
        problems += self._check_store_view(acks, acked, dead, expired)
        for what, query in (
            ("queued runs", "SELECT count(*) FROM relayer_runs"),
            (
                "open transactions",
                "SELECT count(*) FROM relayer_txns WHERE state IN ('pending', 'awaiting')",
            ),
        ):
            ((rows,),) = self.query(query)
            if rows:
                problems.append(f"{rows} {what} are left")
        assert not problems, f"{self.name} (seed {self.seed}):\n" + "\n".join(problems[:20])
        # The check had something to check: acknowledged events were delivered, and the runs met
        # the failure paths they were scripted to meet.
        assert sum(len(a) for a in acked.values()) > 0
        r = {t: rec.receiver for t, rec in self.recorders.items()}
        assert r["t0"].failed > 0
        # A lost answer is followed by the same transaction again (a duplicate), unless an event
        # of it expired first: then the transaction is abandoned, and never sent again.
        for t in ("t2", "w0"):
            abandoned = any(s == "abandoned" for (u, _), s in txn_states.items() if u == t)
            assert r[t].lost > 0 and (r[t].duplicates > 0 or abandoned), t
        assert r["t3"].too_large > 0
        assert self.recorders[DEAD_LETTER].refusals and self.recorders[BLOCK].refusals
        assert r["w1"].failed > 0
        assert all(r[t].webhooks for t in WEBHOOKS)
        assert acks.replays[DEAD_LETTER]
        # Events expired, and events fanned out to several targets were delivered.
        assert any(expired.values())
        assert any(len(targets) > 1 for targets in acks.targets_of().values())
        # Some went to Matrix and webhook targets at once.
        assert any(
            targets & set(WEBHOOKS) and targets - set(WEBHOOKS)
            for targets in acks.targets_of().values()
        )

    def _check_store_view(
        self,
        acks: Acks,
        acked: dict[str, set[int]],
        dead: dict[str, list[int]],
        expired: dict[str, dict[int, float]],
    ) -> list[str]:
        """The store's own reports agree: each acknowledged event is done at each target."""
        problems = []
        lists, statuses = self.store_view(acks)
        stored = self.stored_events()
        for t in TARGETS:
            # Events stored and not acknowledged (the child died in between) are listed too.
            n_of = {f"relayer-{seq}": n for (u, n), (seq, _) in stored.items() if u == t}
            n_of.update({event_id: n for n, event_id in acks.ids[t].items()})
            listed = {
                state: [n_of.get(e.event_id, e.event_id) for e in entries]
                for state, entries in lists[t].items()
            }
            every = [n for entries in listed.values() for n in entries]
            if len(every) != len(set(every)):
                problems.append(f"{t}: the store lists an event in two states: {listed}")
            for state in (DeliveryState.PENDING, DeliveryState.AWAITING_CONFIRMATION):
                if listed[state]:
                    problems.append(f"{t}: events are still {state.value}: {listed[state]}")
            if not acked[t] <= set(every) <= self.planned[t]:
                problems.append(
                    f"{t}: the store lists {len(set(every))} events, {len(acked[t])} were "
                    f"acknowledged: {sorted(set(every) ^ acked[t], key=str)[:10]}"
                )
            if set(listed[DeliveryState.EXPIRED]) != set(expired[t]):
                problems.append(f"{t}: expired events listed: {listed[DeliveryState.EXPIRED]}")
            if set(listed[DeliveryState.DEAD_LETTERED]) != set(dead[t]):
                problems.append(f"{t}: dead letters listed: {listed[DeliveryState.DEAD_LETTERED]}")
            arrived = {e["n"] for x in self.recorders[t].accepted() for e in x.events}
            if set(listed[DeliveryState.DELIVERED]) - arrived:
                problems.append(
                    f"{t}: delivered, yet never received: "
                    f"{sorted(set(listed[DeliveryState.DELIVERED]) - arrived)}"
                )
        targets_of = acks.targets_of()
        for event_id, status in statuses.items():
            if status is None:
                problems.append(f"event {event_id} is unknown to the store")
                continue
            if set(status.deliveries) != targets_of[event_id]:
                problems.append(
                    f"event {event_id} was acknowledged for {sorted(targets_of[event_id])}, "
                    f"the store has it for {sorted(status.deliveries)}"
                )
            for t, delivery in status.deliveries.items():
                if delivery.state not in FINAL:
                    problems.append(f"event {event_id} is {delivery.state.value} at {t}")
        return problems

    def _check_webhooks(
        self,
        acks: Acks,
        stored: dict[tuple[str, int], tuple[int, float | None]],
        txns_of: dict[tuple[str, int], list[int]],
        sends: list[Send],
    ) -> list[str]:
        """
        What Standard Webhooks promises, at each webhook target: at least once (the other
        checks), one event per request, in one transaction; the same ``webhook-id`` (the
        event's id) and the same bytes on every request of an event, retries and restarts
        included; and a request repeated only as a retry of its transaction, which the child
        logged as a send each time.
        """
        problems = []
        logged: dict[tuple[str, int | None], int] = {}
        for send in sends:
            logged[(send.target_id, send.txn_id)] = logged.get((send.target_id, send.txn_id), 0) + 1
            if send.target_id in WEBHOOKS and len(send.numbers) != 1:
                problems.append(
                    f"{send.target_id}: transaction {send.txn_id} was sent with "
                    f"{len(send.numbers)} events"
                )
        for t in WEBHOOKS:
            recorder = self.recorders[t]
            for (target_id, n), txns in txns_of.items():
                if target_id == t and len(txns) != 1:
                    problems.append(f"{t}: event {n} was in transactions {txns}, not one")
            for n, ids in recorder.webhook_ids.items():
                if (t, n) not in stored:
                    continue  # the check of unexpected events reports it
                expected = webhook_id(acks.ids[t].get(n, f"relayer-{stored[(t, n)][0]}"))
                if ids != {expected}:
                    problems.append(f"{t}: event {n} came with webhook ids {ids}, not {expected}")
                    continue
                txn_id = txns_of.get((t, n), [None])[0]
                requests = recorder.webhook_requests[expected]
                if requests > logged.get((t, txn_id), 0):
                    problems.append(
                        f"{t}: webhook {expected!r} came {requests} times, its transaction "
                        f"{txn_id} was sent {logged.get((t, txn_id), 0)} times"
                    )
        return problems

    def _check_replays(
        self,
        t: str,
        acks: Acks,
        arrived: dict[int, int],
        when: dict[int, float],
        refused: dict[int, list[float]],
    ) -> list[str]:
        """
        A refused event that was delivered came after a replay that followed its refusal, and
        after each event acknowledged before that replay (and not refused itself).
        """
        problems = []
        replays = acks.replays[t]
        # For each replay, the latest arrival of an unrefused event acknowledged before it.
        latest = []
        for line, _ in replays:
            before = [
                arrived[n]
                for i, n in acks.events[t]
                if i < line and n in arrived and n not in refused
            ]
            latest.append(max(before, default=-1))
        for n, i in arrived.items():
            if n not in refused:
                continue
            last = max((at for at in refused[n] if at < when[n]), default=None)
            if last is None:
                problems.append(f"{t}: event {n} was delivered before it was refused")
                continue
            after = [k for k, (_, at) in enumerate(replays) if at > last]
            if not after:
                problems.append(f"{t}: event {n} was delivered after its refusal, unreplayed")
            elif latest[after[0]] > i:
                problems.append(
                    f"{t}: replayed event {n} arrived before events acknowledged before the replay"
                )
        return problems

    async def close(self) -> None:
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped


async def gather(ds: list[Deferred[Any]]) -> list[Any]:
    """Wait for all of ``ds``, even if one fails (so that no run goes on after the test)."""
    results = await DeferredList(ds, consumeErrors=True)
    for ok, result in results:
        if not ok:
            cast(Failure, result).raiseException()
    return [result for _, result in results]


# -- deterministic kills ---------------------------------------------------------------------

#: At which pass of each point the first run is killed; every one is reached in a run.
DETERMINISTIC = {
    "submit.stored": 3,
    "txn.stored": 12,
    "send.started": 12,
    "send.accepted": 12,
    "backoff.write": 1,
    "up.transition": 1,
    EXPIRY_POINT: 2,
    RECEIVER_KILL: 5,
}
#: The same for the processes sharing PostgreSQL: the first process is killed at the first pass
#: given, and after its restart (which has less to do) at the second. A process takes leases at
#: its start; a restarted one takes those of the processes that died or gave them up, and "c"
#: dies too in the "lease.acquired" test, so that the others take its targets over.
SHARED = {
    "submit.stored": (3, 2),
    "txn.stored": (8, 2),
    "send.started": (8, 2),
    "send.accepted": (8, 2),
    "backoff.write": (1, 1),
    "up.transition": (1, 1),
    "lease.acquired": (1, 1),
    EXPIRY_POINT: (1, 1),
}


#: Points that a restarted run passes only if its share of the targets makes it do so.
_REACHED_BY_CHANCE = {"backoff.write", "up.transition", "lease.acquired", EXPIRY_POINT}


def test_every_point_is_covered() -> None:
    assert set(DETERMINISTIC) == set(SQLITE_POINTS) | {RECEIVER_KILL}
    assert set(SHARED) == set(ALL_POINTS)


@pytest.mark.sqlite_only
@pytest.mark.parametrize("point", sorted(DETERMINISTIC))
@pytest_twisted.ensureDeferred
async def test_kill_at_point_loses_nothing(
    point: str, zygotes: list[Zygote], tmp_path: Path
) -> None:
    seq = Sequence.make(tmp_path, point.replace(".", "_"), seed=sorted(DETERMINISTIC).index(point))
    try:
        at = DETERMINISTIC[point]
        kill = {"receiver": at} if point == RECEIVER_KILL else {"point": point, "at": at}
        first = await seq.run(zygotes[0], kill)
        assert first.killed, f"the run was not killed at {point} #{at}\n{seq.log_tail()}"
        # These two points are inside their database transaction: it never committed. (So is
        # the expiry point, whose transaction's effect depends on what expired before.) The
        # BLOCK target may have been blocked before the first failure: that takes no backoff.
        if point == "backoff.write":
            states = seq.states()
            assert "down" not in states.values(), states
            assert {s for t, s in states.items() if t != BLOCK} == {"up"}, states
            assert states[BLOCK] in ("up", "blocked"), states
        elif point == "up.transition":
            assert "down" in seq.states().values()
        # Killed again, at the same point, while recovering from the first kill.
        await seq.run(zygotes[0], kill)
        await seq.drain(zygotes[0])
        seq.check()
    finally:
        await seq.close()


@pytest.mark.sqlite_only
@pytest_twisted.ensureDeferred
async def test_kill_and_restart_as_new_processes(tmp_path: Path) -> None:
    """The same without the fork server: each run is a new interpreter."""
    seq = Sequence.make(tmp_path, "direct", seed=99)
    try:
        first = await seq.run(Direct(), {"point": "send.accepted", "at": 12})
        assert first.killed, seq.log_tail()
        await seq.drain(Direct())
        seq.check()
    finally:
        await seq.close()


@pytest.mark.postgres_only
@pytest.mark.parametrize("point", sorted(SHARED))
@pytest_twisted.ensureDeferred
async def test_shared_kill_at_point_loses_nothing(
    point: str, zygotes: list[Zygote], db_path: str, tmp_path: Path
) -> None:
    """
    Three processes share the targets; the first is killed at the point, and once more after
    its restart, while the others take its targets over.
    """
    name = "shared_" + point.replace(".", "_")
    seq = Sequence.make(tmp_path, name, seed=sorted(SHARED).index(point), url=str(db_path))
    try:
        plan = {"a": [{"point": point, "at": at} for at in SHARED[point]]}
        if point in _REACHED_BY_CHANCE:
            # Only a process whose share of the targets makes it pass the point can be killed
            # there: arm the others too, so that one of them is.
            for other in NODES[1:]:
                plan[other] = [{"point": point, "at": 1}]
        if point == "lease.acquired":
            plan["c"] = [{"after": 1.0}]
        await seq.shared(zygotes[0], plan, first_alone=True)
        killed = [k for k in seq.kills if k.get("point") == point]
        # The first kill comes in the first run, which owns every target at first and is armed
        # at a pass of the point that it always reaches then. The second comes in the restarted
        # run only if it passes the point again: only if the leases give it targets, and work
        # for them, before the others have delivered everything, which a loaded machine does not
        # always do.
        least = 1
        assert len(killed) >= least, f"not killed at {point}: {seq.runs}\n{seq.log_tail()}"
        seq.check()
    finally:
        await seq.close()


# -- random kills ----------------------------------------------------------------------------


def random_kill(rng: random.Random, shared: bool = False) -> dict[str, Any]:
    """A kill at a random moment of a run: by checkpoint count, by delay, or by the receiver."""
    kind = rng.choice(
        ("any", "named", "delay") if shared else ("any", "named", "delay", "receiver")
    )
    if kind == "any":
        return {"point": "*", "at": rng.randint(1, 150)}
    if kind == "named":
        point = rng.choice(ALL_POINTS if shared else SQLITE_POINTS)
        high = {"submit.stored": 10, "backoff.write": 4, "up.transition": 3, EXPIRY_POINT: 8}
        high = high.get(point, 45)
        return {"point": point, "at": rng.randint(1, 3 if point == "lease.acquired" else high)}
    if kind == "delay":
        return {"after": round(rng.uniform(0.0, 2.0 if shared else 0.5), 3)}
    return {"receiver": rng.randint(1, 40)}


@pytest.mark.sqlite_only
@pytest_twisted.ensureDeferred
async def test_random_kills_lose_nothing(zygotes: list[Zygote], tmp_path: Path) -> None:
    master = random.Random(SEED)
    seeds = [master.randrange(2**31) for _ in range(SEQUENCES)]

    async def sequence(zygote: Launcher, seed: int) -> Sequence:
        seq = Sequence.make(tmp_path, f"seq{seed}", seed)
        rng = random.Random(seed)
        try:
            while len(seq.kills) < KILLS_PER_SEQUENCE and len(seq.runs) < MAX_RUNS_PER_SEQUENCE:
                await seq.run(zygote, random_kill(rng))
            await seq.drain(zygote)
            seq.check()
        finally:
            await seq.close()
        return seq

    async def lane(zygote: Launcher, lane_seeds: list[int]) -> list[Sequence]:
        return [await sequence(zygote, seed) for seed in lane_seeds]

    lanes = await gather(
        [Deferred.fromCoroutine(lane(z, seeds[i :: len(zygotes)])) for i, z in enumerate(zygotes)]
    )
    done = [seq for lane_result in lanes for seq in cast(list[Sequence], lane_result)]
    kills = [k for seq in done for k in seq.kills]
    kinds = {
        ("receiver" if "receiver" in k else "after" if "after" in k else "point") for k in kills
    }
    archived = sum(seq.archived for seq in done)
    print(
        f"seed {SEED}: {len(kills)} kills in {sum(len(s.runs) for s in done)} runs; "
        f"{archived} events archived"
    )
    assert len(kills) >= 50
    assert kinds == {"receiver", "after", "point"}
    # Retention ran beside the kills.
    assert archived > 0


#: The random rounds on PostgreSQL: sequences, and the kills of one process in each.
SHARED_SEQUENCES = 2
SHARED_KILLS = 3


@pytest.mark.postgres_only
@pytest.mark.parametrize("index", range(SHARED_SEQUENCES))
@pytest_twisted.ensureDeferred
async def test_shared_random_kills_lose_nothing(
    index: int, zygotes: list[Zygote], db_path: str, tmp_path: Path
) -> None:
    """Three processes share the targets; random ones are killed at random moments."""
    master = random.Random(SEED)
    seed = [master.randrange(2**31) for _ in range(SHARED_SEQUENCES)][index]
    rng = random.Random(seed)
    plan: dict[str, list[dict[str, Any]]] = {}
    for _ in range(SHARED_KILLS):
        plan.setdefault(rng.choice(NODES), []).append(random_kill(rng, shared=True))
    # A kill by count may come after its run has drained the store; this one never does, so
    # that every sequence has at least one process die.
    plan.setdefault(rng.choice(NODES), []).insert(0, {"after": round(rng.uniform(0.05, 0.5), 3)})
    seq = Sequence.make(tmp_path, f"shared{seed}", seed, url=str(db_path))
    try:
        await seq.shared(zygotes[index % len(zygotes)], plan)
        seq.check()
    finally:
        await seq.close()
    print(
        f"seed {SEED}/{seed}: plan {plan}, {len(seq.kills)} kills in {len(seq.runs)} runs; "
        f"{seq.archived} events archived"
    )
    assert seq.kills
    # Retention ran beside the kills, in the processes sharing the targets.
    assert seq.archived > 0
