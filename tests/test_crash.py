"""
Crash tests: nothing acknowledged is lost when the process dies with SIGKILL.

A scheduler runs in a child process (``tests/crash/crash_child.py``: the real reactor, a SQLite
file on the threaded database pool, the HTTP transport) and delivers to receivers served by this
process over loopback HTTP. The child kills itself with SIGKILL at a chosen checkpoint of
:mod:`relayer._faults` (or after a delay, or this process kills it when a receiver accepts a
transaction, before the answer goes out). It is then started again on the same database, and
again, until a run drains the store and exits with 0. Then:

- every acknowledged event (its submit Deferred fired: the child logged it) reached its target;
- no event arrived twice, once the receiver deduplicated by transaction id;
- each target got its events in submit order, and transaction ids that only grow;
- no transaction id was ever sent with two different bodies (failed attempts included);
- no event arrived that was not submitted, and the store is empty.

The receivers live in this process, so what they recorded survives the child's death. They are
scripted so that every run meets the DOWN paths: one target fails its first requests, one fails
at random, one loses an answer after accepting, and one answers 413 to large bodies.

The child runs are forked from a "zygote" that has imported relayer once (see the child's
docstring); each run is still its own process with its own reactor, database connection and
threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from relayer._faults import POINTS
from relayer.testing import Receiver

# The crash suite runs its child schedulers on SQLite files; the PostgreSQL pass skips it.
pytestmark = [pytest.mark.integration, pytest.mark.sqlite_only]

CHILD = Path(__file__).parent / "crash" / "crash_child.py"
TARGETS = ("t0", "t1", "t2", "t3", "t4")
#: Events submitted to each target in one run, and how many per target at once.
EVENTS_PER_RUN = 60
CHUNK = 10
MAX_EVENTS = 8
BACKOFF = {"initial": 0.02, "maximum": 0.1}
#: A bound on one run, so that a hang shows as a failure rather than a stuck suite.
RUN_DEADLINE = 60.0
#: The random rounds: sequences (each on its own database), and the kills in each.
SEQUENCES = 10
KILLS_PER_SEQUENCE = 6
MAX_RUNS_PER_SEQUENCE = 20
RECEIVER_KILL = "receiver.accepted"
#: The seed of the random rounds; set RELAYER_CRASH_SEED to try others.
SEED = int(os.environ.get("RELAYER_CRASH_SEED", "20240601"))


def reactor_() -> Any:
    from twisted.internet import reactor

    return reactor


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
    """The fork server of ``crash_child.py --zygote``: one run at a time."""

    def __init__(self) -> None:
        self._buffer = b""
        self.stderr = b""
        self._pid: Deferred[int] | None = None
        self._exit: Deferred[int] | None = None
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
            if words[:1] == [b"pid"] and self._pid is not None:
                d, self._pid = self._pid, None
                d.callback(int(words[1]))
            elif words[:1] == [b"exit"] and self._exit is not None:
                e, self._exit = self._exit, None
                e.callback(int(words[2]))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        for d in (self._pid, self._exit):
            if d is not None:
                d.errback(RuntimeError(f"the zygote died: {self.stderr.decode()[-2000:]}"))
        self._pid = self._exit = None
        if reason.check(ProcessDone):
            self.ended.callback(None)
        else:
            self.ended.errback(reason)

    async def start(self, config: dict[str, Any]) -> tuple[int, Deferred[int]]:
        """Start a run; return its pid, and a Deferred firing with its wait status."""
        assert self._pid is None and self._exit is None, "one run at a time"
        pid: Deferred[int] = Deferred()
        ended: Deferred[int] = Deferred()
        self._pid, self._exit = pid, ended
        assert self.transport is not None
        self.transport.write(json.dumps(config).encode() + b"\n")
        return await pid, ended

    def close(self) -> Deferred[None]:
        """Let the zygote finish its run and exit; kill it if it takes longer than a run may."""
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


class Recorder(Resource):
    """
    One target: a :class:`Receiver`, plus a ledger of every request's body digest by
    transaction id (failed attempts included), and a hook called when a transaction is accepted.
    """

    isLeaf = True

    def __init__(self, target_id: str, receiver: Receiver) -> None:
        super().__init__()
        self.target_id = target_id
        self.receiver = receiver
        self.ledger: dict[int, bytes] = {}
        self.violations: list[str] = []
        self.on_accept: Callable[[], None] | None = None

    def render_PUT(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        request.content.seek(0)
        path = request.postpath or []
        if path and path[-1].isdigit():
            txn_id = int(path[-1])
            digest = hashlib.sha256(body).digest()
            seen = self.ledger.setdefault(txn_id, digest)
            if seen != digest:
                self.violations.append(
                    f"{self.target_id}: transaction {txn_id} was sent with different bytes"
                )
        before = len(self.receiver.transactions)
        answer = self.receiver.render_PUT(request)
        if len(self.receiver.transactions) > before and self.on_accept is not None:
            # Before the answer goes out: the target has the transaction, the sender never
            # learns it.
            self.on_accept()
        return answer


class _QuietSite(Site):
    def log(self, request: http.Request) -> None:
        pass


@attrs.define
class Sequence:
    """Runs of the child on one database, until it drains; and what they did."""

    folder: Path
    name: str
    seed: int
    recorders: dict[str, Recorder]
    port: IListeningPort
    planned: dict[str, set[int]] = attrs.field(factory=dict)
    runs: list[RunResult] = attrs.field(factory=list)
    kills: list[Any] = attrs.field(factory=list)

    @classmethod
    def make(cls, folder: Path, name: str, seed: int) -> Sequence:
        root = Resource()
        recorders = {}
        for t in TARGETS:
            recorder = Recorder(t, Receiver(f"token-{t}", order_key="n"))
            recorders[t] = recorder
            root.putChild(t.encode(), recorder)
        site = _QuietSite(root)
        site.noisy = False
        port = reactor_().listenTCP(0, site, interface="127.0.0.1")
        return cls(folder, name, seed, recorders, port, {t: set() for t in TARGETS})

    @property
    def db(self) -> Path:
        return self.folder / f"{self.name}.db"

    @property
    def acks(self) -> Path:
        return self.folder / f"{self.name}.acks"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    def script_receivers(self, rng: random.Random) -> None:
        """Make this run meet the DOWN paths: failures, a lost answer and 413s."""
        r = {t: rec.receiver for t, rec in self.recorders.items()}
        r["t0"].fail_next(2, 500)
        r["t1"].fail_randomly(0.25, 503, random=random.Random(rng.random()).random)
        r["t2"].lose_responses(1)
        r["t3"].limit_body(400)

    async def run(
        self, launcher: Launcher, kill: dict[str, Any] | None, events: int = EVENTS_PER_RUN
    ) -> RunResult:
        """
        One run of the child, with ``kill`` (a child kill spec, a receiver kill, or None),
        submitting ``events`` new events to each target.
        """
        index = len(self.runs)
        rng = random.Random(f"{self.seed}/{index}")
        first = index * 1000
        for t in TARGETS:
            self.planned[t].update(range(first, first + events))
        self.script_receivers(rng)
        port = self.port.getHost().port  # type: ignore[attr-defined]
        child_kill = kill if kill is not None and "receiver" not in kill else None
        config = {
            "db": str(self.db),
            "targets": [
                {"id": t, "base_url": f"http://127.0.0.1:{port}/{t}", "token": f"token-{t}"}
                for t in TARGETS
            ],
            "max_events": MAX_EVENTS,
            "backoff": BACKOFF,
            "first": first,
            "events": events,
            "chunk": CHUNK,
            "acks": str(self.acks),
            "seed": rng.random(),
            "log": str(self.log),
            "kill": child_kill,
        }
        with open(self.log, "a") as f:
            f.write(f"\n==== run {index}: kill {kill!r}\n")
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

        timer = reactor_().callLater(RUN_DEADLINE, watchdog)
        try:
            status = await ended
        finally:
            if timer.active():
                timer.cancel()
            for recorder in self.recorders.values():
                recorder.on_accept = None
        result = RunResult(status, hung=bool(hung))
        self.runs.append(result)
        if result.killed and not result.hung:
            self.kills.append(kill)
        assert not result.hung, f"run {index} of {self.name} hung\n{self.log_tail()}"
        assert result.killed or result.code == 0, (
            f"run {index} of {self.name} failed: {result}\n{self.log_tail()}"
        )
        return result

    async def drain(self, launcher: Launcher) -> None:
        """
        Run the child without a kill: it must drain the store and exit with 0.

        It submits nothing: what the kills left pending must go out without new traffic.
        """
        result = await self.run(launcher, None, events=0)
        assert result.code == 0, f"{self.name}: the clean run ended with {result}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def states(self) -> dict[str, str]:
        """The targets' states in the store."""
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute("SELECT target_id, state FROM relayer_targets").fetchall()
        conn.close()
        return dict(rows)

    def acknowledged(self) -> dict[str, list[int]]:
        acked: dict[str, list[int]] = {t: [] for t in TARGETS}
        if self.acks.exists():
            for line in self.acks.read_text().splitlines():
                t, n = line.split()
                acked[t].append(int(n))
        return acked

    def check(self) -> None:
        """Every invariant, once the store is drained."""
        acked = self.acknowledged()
        problems: list[str] = []
        for t in TARGETS:
            recorder = self.recorders[t]
            receiver = recorder.receiver
            problems += [f"{t}: {v}" for v in receiver.violations]
            problems += recorder.violations
            delivered = [e["n"] for e in receiver.events]
            if delivered != sorted(set(delivered)):
                problems.append(f"{t}: events duplicated or out of order: {delivered}")
            unexpected = set(delivered) - self.planned[t]
            if unexpected:
                problems.append(f"{t}: events never submitted arrived: {sorted(unexpected)}")
            lost = set(acked[t]) - set(delivered)
            if lost:
                problems.append(f"{t}: acknowledged events were lost: {sorted(lost)}")
            ids = [x.txn_id for x in receiver.transactions]
            if ids != sorted(set(ids)):
                problems.append(f"{t}: transaction ids did not only grow: {ids}")
        with sqlite3.connect(self.db) as conn:
            for table in ("relayer_queue", "relayer_transactions", "relayer_dead_letters"):
                (rows,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                if rows:
                    problems.append(f"{rows} rows are left in {table}")
        conn.close()
        assert not problems, f"{self.name} (seed {self.seed}):\n" + "\n".join(problems[:20])
        # The check had something to check: acknowledged events were delivered, and the runs met
        # the failure paths they were scripted to meet.
        assert sum(len(a) for a in acked.values()) > 0
        r = {t: rec.receiver for t, rec in self.recorders.items()}
        assert r["t0"].failed > 0
        assert r["t2"].lost > 0 and r["t2"].duplicates > 0
        assert r["t3"].too_large > 0

    async def close(self) -> None:
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped


# -- deterministic kills ---------------------------------------------------------------------

#: At which pass of each point the first run is killed; every one is reached in a run.
DETERMINISTIC = {
    "submit.stored": 3,
    "txn.stored": 12,
    "send.started": 12,
    "send.accepted": 12,
    "backoff.write": 1,
    "up.transition": 1,
    RECEIVER_KILL: 5,
}


def test_every_point_is_covered() -> None:
    assert set(DETERMINISTIC) == set(POINTS) | {RECEIVER_KILL}


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
        # These two points are inside their database transaction: it never committed.
        if point == "backoff.write":
            assert set(seq.states().values()) == {"up"}
        elif point == "up.transition":
            assert "down" in seq.states().values()
        # Killed again, at the same point, while recovering from the first kill.
        await seq.run(zygotes[0], kill)
        await seq.drain(zygotes[0])
        seq.check()
    finally:
        await seq.close()


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


# -- random kills ----------------------------------------------------------------------------


def random_kill(rng: random.Random) -> dict[str, Any]:
    """A kill at a random moment of a run: by checkpoint count, by delay, or by the receiver."""
    kind = rng.choice(("any", "named", "delay", "receiver"))
    if kind == "any":
        return {"point": "*", "at": rng.randint(1, 150)}
    if kind == "named":
        point = rng.choice(POINTS)
        high = {"submit.stored": 10, "backoff.write": 4, "up.transition": 3}.get(point, 45)
        return {"point": point, "at": rng.randint(1, high)}
    if kind == "delay":
        return {"after": round(rng.uniform(0.0, 0.5), 3)}
    return {"receiver": rng.randint(1, 40)}


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

    lanes = [
        Deferred.fromCoroutine(lane(z, seeds[i :: len(zygotes)])) for i, z in enumerate(zygotes)
    ]
    # Wait for both lanes, even if one fails, so that no run goes on after the test.
    results = await DeferredList(lanes, consumeErrors=True)
    for ok, lane_result in results:
        if not ok:
            cast(Failure, lane_result).raiseException()
    done = [seq for _, lane_result in results for seq in cast(list[Sequence], lane_result)]
    kills = [k for seq in done for k in seq.kills]
    kinds = {
        ("receiver" if "receiver" in k else "after" if "after" in k else "point") for k in kills
    }
    print(f"seed {SEED}: {len(kills)} kills in {sum(len(s.runs) for s in done)} runs")
    assert len(kills) >= 50
    assert kinds == {"receiver", "after", "point"}
