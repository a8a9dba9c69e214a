"""
The child process of the crash tests: a real scheduler that may be killed with SIGKILL.

One *run* starts a :class:`relayer.Scheduler` on the global reactor, with a SQLite file on a
:class:`relayer.ThreadedDatabasePool` (or a PostgreSQL database, shared through leases with other
runs going on at the same time) and the HTTP transport, submits events to its targets (Matrix
application services and Standard Webhooks endpoints, each target in its wire format), waits
until the store has nothing pending, stops, and exits with 0. While it waits it wakes each
BLOCKED target it delivers to, once per blockage; at a chosen moment it replays the dead letters
of the dead-letter targets. It is configured by one JSON object (see :func:`run`); if that says
so, it kills itself with ``SIGKILL``:

- ``{"point": NAME, "at": N}``: at the Nth pass of the checkpoint NAME (``"*"`` counts every
  checkpoint), through the hook of :mod:`relayer._faults`;
- ``{"after": SECONDS}``: after that many seconds on the reactor's clock.

Every event whose submit Deferred fired is appended to the ``acks`` file (``"{target} {n}
{event_id}"`` a line, one for each target of the event) at once, with an unbuffered ``write``: a
line in that file means the scheduler acknowledged the event for that target. Before each replay
it appends ``replay {target} {time.monotonic()}``. The file survives the process's death: the
page cache is the kernel's, and SIGKILL does not drop it (only a power loss would, which these
tests do not simulate). Runs that go on at the same time append to the same file; each ``write``
of an ``O_APPEND`` file lands whole, in the order of the writes.

Just before each send, the transport appends ``"{target} {txn_id} {clock time} {n,n,...}"`` to
the ``sends`` file, the same way: the test checks that no event was sent at or after its
deadline. The transport provides :class:`relayer.transport.IRequestTransport`, so every request
comes through it as its target's wire format built it (a Matrix transaction's events, or a
webhook's one event, with the id of the transaction it is an attempt of), and goes on to the
real :meth:`relayer.HTTPTransport.send_request`.

Events are ``{"n": N, "t": TARGETS, "r": RUN, "p": PADDING}``; ``n`` goes from ``first`` to
``first + events - 1``, in submit order, for every target (a target with ``every`` takes only
the multiples of it), and ``r`` is the run's index. Every third chunk of events, the first one
included, is fanned out: each ``n`` is one event for a random set of at least two targets (``t``
is their list; for every other ``n``, at least one Matrix and one webhook target, if the
webhook targets take that ``n``), and one event for each other target.
Some events carry a deadline (see :func:`deadline`): a time to live, or a time already past, so
that they expire.

Two ways to start it:

- ``python crash_child.py CONFIG_JSON``: one run in this process.
- ``python crash_child.py --zygote``: a fork server. It imports everything once, then reads one
  config a line on standard input; for each it forks a child that does the run (with its standard
  output and error sent to the config's ``log`` file) and writes ``pid PID`` and, once the child
  is gone, ``exit PID STATUS`` (the raw wait status) on standard output. Several runs may go on
  at once; ``pid`` lines come in the order of the configs. No reactor is made before the fork:
  each child makes its own. This spares each run the second or so of imports.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from zope.interface import implementer

from relayer import DeliveryState, Event, _faults
from relayer.config import BackoffPolicy, FailurePolicy, Retention, TargetConfig
from relayer.formats import IWireFormat, WireRequest
from relayer.lease import LeaseSettings
from relayer.scheduler import Scheduler
from relayer.store.base import IStore, TargetState
from relayer.store.postgres import PostgresStore
from relayer.store.sqlite import SQLiteStore
from relayer.transport.base import IRequestTransport, ITransport, SendOutcome
from relayer.transport.http import HTTPTransport

EXIT_OK = 0
EXIT_ERROR = 3


def install_kill(kill: dict[str, Any] | None) -> None:
    """Install the checkpoint hook that kills this process, as ``kill`` says."""
    if not kill or "point" not in kill:
        return
    point: str = kill["point"]
    at: int = kill["at"]
    lock = threading.Lock()
    passes = [0]

    def hook(name: str) -> None:
        if point != "*" and name != point:
            return
        with lock:
            passes[0] += 1
            n = passes[0]
        if n == at:
            os.kill(os.getpid(), signal.SIGKILL)

    _faults.install(hook)


def event(rng: random.Random, targets: str | list[str], n: int, run: int) -> dict[str, Any]:
    return {"n": n, "t": targets, "r": run, "p": "x" * rng.randrange(0, 60)}


def deadline(rng: random.Random, config: dict[str, Any], now: float) -> dict[str, float]:
    """
    The deadline of an event, as ``submit`` options: none, a time to live from
    ``config["ttls"]`` (``ttl_percent`` of the events), or ``expires_at`` a second ago
    (``expired_percent``): expired when a claim reaches it, never sent.
    """
    roll = rng.randrange(100)
    if roll < config.get("expired_percent", 0):
        return {"expires_at": now - 1.0}
    if roll < config.get("expired_percent", 0) + config.get("ttl_percent", 0):
        return {"ttl": rng.choice(config["ttls"])}
    return {}


def numbers_of(body: bytes) -> str:
    """The ``n`` of each event of a request's body: a Matrix transaction's, or a webhook's one."""
    document = json.loads(body)
    if "events" in document:
        return ",".join(str(e["n"]) for e in document["events"])
    return str(document["n"])


@implementer(ITransport, IRequestTransport)
class LoggingTransport:
    """A transport that appends each send's start to a file, then hands it to another."""

    def __init__(self, clock: Any, transport: HTTPTransport, fd: int) -> None:
        self._clock = clock
        self._transport = transport
        self._fd = fd

    def _log(self, target: TargetConfig, txn_id: int | None, body: bytes) -> None:
        line = f"{target.target_id} {txn_id} {self._clock.seconds()!r} {numbers_of(body)}\n"
        os.write(self._fd, line.encode())

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        self._log(target, txn_id, body)
        return self._transport.send(target, txn_id, body)

    def send_request(
        self, target: TargetConfig, request: WireRequest, wire_format: IWireFormat
    ) -> Deferred[SendOutcome]:
        self._log(target, request.txn_id, request.body)
        return self._transport.send_request(target, request, wire_format)

    def close(self) -> Deferred[None]:
        return self._transport.close()


def open_store(reactor: Any, config: dict[str, Any]) -> IStore:
    if config.get("store", "sqlite") == "postgres":
        return PostgresStore.open_url(reactor, config["db"], pool_size=2)
    return SQLiteStore.open_path(reactor, config["db"])


async def main(reactor: Any, config: dict[str, Any]) -> int:
    kill = config.get("kill") or {}
    if "after" in kill:
        reactor.callLater(kill["after"], os.kill, os.getpid(), signal.SIGKILL)
    install_kill(kill)
    rng = random.Random(config["seed"])
    backoff = BackoffPolicy(**config["backoff"])
    targets = [
        TargetConfig(
            t["id"],
            t["base_url"],
            t["token"],
            max_events=config["max_events"],
            backoff=backoff,
            request_timeout=config.get("request_timeout", 10.0),
            failure_policy=FailurePolicy(t.get("policy", "dead_letter")),
            format=t.get("format", "matrix"),
            secrets=t.get("secrets", ()),
        )
        for t in config["targets"]
    ]
    replayed = [t["id"] for t in config["targets"] if t.get("replay")]
    acks = os.open(config["acks"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sends = os.open(config["sends"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    store = open_store(reactor, config)
    transport = LoggingTransport(reactor, HTTPTransport(reactor), sends)
    leases = config.get("leases")
    scheduler = Scheduler(
        reactor,
        store,
        transport,
        targets,
        random=random.Random(rng.random()).random,
        leases=LeaseSettings(**leases) if leases else None,
        # Retention archives final events as the run goes, so that kills meet it too.
        retention=Retention(**config["retention"]) if config.get("retention") else None,
    )

    def acked(ids: str | list[str], targets: list[list[str]], numbers: list[int]) -> None:
        # One line for each target of each event, in submit order.
        ids = [ids] if isinstance(ids, str) else ids
        lines = "".join(
            f"{t} {n} {i}\n" for i, ts, n in zip(ids, targets, numbers, strict=True) for t in ts
        )
        os.write(acks, lines.encode())

    async def replay() -> None:
        for t in replayed:
            os.write(acks, f"replay {t} {time.monotonic()!r}\n".encode())
            await scheduler.replay(t)

    await scheduler.start()
    first, events, chunk = config["first"], config["events"], config["chunk"]
    run_index = config.get("run", 0)
    every = {t["id"]: t.get("every", 1) for t in config["targets"]}
    matrix = [t.target_id for t in targets if t.format == "matrix"]
    webhooks = [t.target_id for t in targets if t.format != "matrix"]

    def ids_of(n: int) -> list[str]:
        """The targets that take the events numbered ``n``: each ``every``th number's."""
        return [t.target_id for t in targets if n % every[t.target_id] == 0]

    # A shorter run (a restarted one) replays sooner, so that every run that submits replays.
    chunks = -(-events // chunk) if chunk else 0
    replay_at = first + chunk * min(config.get("replay_after_chunks", 3), max(0, chunks - 1))
    for start in range(first, first + events, chunk):
        if start == replay_at:
            await replay()
        numbers = range(start, min(start + chunk, first + events))
        pending: list[Deferred[Any]] = []
        mode = (start // chunk) % 3
        if mode == 2:
            # Plain events, one per target and number, in one submit_many.
            pairs = [(t, event(rng, t, n, run_index)) for n in numbers for t in ids_of(n)]
            d = scheduler.submit_many(pairs)
            d.addCallback(acked, [[t] for t, _ in pairs], [e["n"] for _, e in pairs])
            pending.append(d)
        elif mode == 0:
            # Fanned out: one event for several targets, and one for each of the others, each
            # an Event (a submit_many that mixes plain events with Events or lists of targets
            # for the same target loses events; the state machine's tests show it).
            items: list[tuple[str | list[str], Event]] = []
            for n in numbers:
                ids = ids_of(n)
                fan = rng.sample(ids, rng.randint(2, len(ids)))
                if n % 2 == 0 and set(webhooks) & set(ids):
                    # Every other one goes to targets of both wire formats, at least one of each.
                    for kind in (matrix, [t for t in webhooks if t in ids]):
                        if not set(kind) & set(fan):
                            fan.append(rng.choice(kind))
                fan = sorted(fan, key=ids.index)
                groups = [fan] + [[t] for t in ids if t not in fan]
                for group in groups:
                    options = deadline(rng, config, reactor.seconds())
                    targets_of: str | list[str] = group if len(group) > 1 else group[0]
                    body = event(rng, targets_of, n, run_index)
                    items.append((targets_of, Event(body, **options)))
            d = scheduler.submit_many(items)
            groups_of = [[t] if isinstance(t, str) else t for t, _ in items]
            pending.append(d.addCallback(acked, groups_of, [e.body["n"] for _, e in items]))
        else:
            for n in numbers:
                for t in ids_of(n):
                    options = deadline(rng, config, reactor.seconds())
                    d = scheduler.submit(t, event(rng, t, n, run_index), **options)
                    pending.append(d.addCallback(acked, [[t]], [n]))
        await DeferredList(pending, fireOnOneErrback=True, consumeErrors=True)
    if not events:
        # A run that submits nothing still replays, while the store drains.
        await replay()

    # Each blockage is woken once, a moment after it is seen: a wake that did not take leaves
    # the target blocked, and the run hangs (the test's deadline turns that into a failure).
    # A blockage is told apart from the next one by the target's last success, and by the
    # transaction it is blocked on (a woken target may abandon that one, an event of it having
    # expired, and be blocked at once on the transaction of its live events).
    wake_after = config.get("wake_after", 0.2)
    blocked_since: dict[str, tuple[Any, float]] = {}
    woken: dict[str, Any] = {}
    while True:
        statuses = await scheduler.status()
        if all(
            s.pending_events == 0 and s.pending_transactions == 0 and not s.in_flight
            for s in statuses
        ):
            break
        now = reactor.seconds()
        owned = scheduler.owned_targets
        for s in statuses:
            if s.state != TargetState.BLOCKED or s.target_id not in owned:
                # Blocked again later, or here again after another process had it: a new
                # blockage.
                blocked_since.pop(s.target_id, None)
                woken.pop(s.target_id, None)
                continue
            head = await scheduler.target_events(s.target_id, DeliveryState.PENDING, limit=1)
            key = (s.last_success_at, head.entries[0].txn_id if head.entries else None)
            seen = blocked_since.setdefault(s.target_id, (key, now))
            if seen[0] != key:
                blocked_since[s.target_id] = seen = (key, now)
            if now - seen[1] >= wake_after and woken.get(s.target_id, object()) != key:
                woken[s.target_id] = key
                print(f"waking {s.target_id}", file=sys.stderr, flush=True)
                scheduler.wake(s.target_id)
        await deferLater(reactor, config.get("poll", 0.02), lambda: None)
    await scheduler.stop()
    await transport.close()
    os.close(acks)
    os.close(sends)
    return EXIT_OK


def run(config: dict[str, Any]) -> int:
    """
    Do one run on the global reactor; return the exit status.

    ``config`` holds: ``store`` (``"sqlite"``, the default, or ``"postgres"``), ``db`` (the
    SQLite file or the PostgreSQL URL), ``leases`` (:class:`relayer.lease.LeaseSettings`
    arguments, or null to deliver to every target), ``targets`` (``id``, ``base_url``, ``token``
    each, and optionally ``policy``, a :class:`relayer.FailurePolicy` value, ``replay``,
    true to replay its dead letters, ``format`` and ``secrets``, its wire format and the
    secrets a webhook target signs with, and ``every``: the target takes only the events whose
    ``n`` is a multiple of it), ``max_events``, ``backoff`` (:class:`relayer.BackoffPolicy`
    arguments), ``request_timeout``, ``first``, ``events`` and ``chunk`` (the events to submit,
    per target, and how many per target are submitted at once), ``run`` (the run's index),
    ``replay_after_chunks`` (when to replay: after that many chunks, or at once in a run that
    submits nothing), ``wake_after`` (how long a target stays BLOCKED before it is woken),
    ``poll`` (how often the store is checked for pending work), ``acks`` (the acknowledgement
    file), ``sends`` (the file of sends), ``ttls``, ``ttl_percent`` and ``expired_percent`` (the
    deadlines of events, see :func:`deadline`), ``seed``, ``log`` (relayer's log) and ``kill``
    (see the module's docstring; null for none).
    """
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    log = open(config["log"], "a", buffering=1)  # noqa: SIM115 - open for the process's life
    observer = FilteringLogObserver(
        textFileLogObserver(log), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    result: list[int] = []

    async def go() -> None:
        try:
            result.append(await main(reactor, config))
        except BaseException as e:  # noqa: BLE001 - reported, and the exit status says so
            print(f"crash child failed: {type(e).__name__}: {e}", file=log)
            import traceback

            traceback.print_exc(file=log)
            result.append(EXIT_ERROR)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(go()))
    reactor.run()
    log.flush()
    return result[0] if result else EXIT_ERROR


def redirect(config: dict[str, Any]) -> None:
    """Read standard input from nowhere, and write standard output and error to the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    out = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def zygote() -> int:
    """Serve runs: fork a child for each config line on standard input; reap them as they end."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    stdin = sys.stdin.fileno()
    buffer = b""
    children: set[int] = set()
    reading = True
    while reading or children:
        ready, _, _ = select.select([stdin, wake_r] if reading else [wake_r], [], [])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
        if stdin in ready:
            data = os.read(stdin, 65536)
            reading = bool(data)
            buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            config = json.loads(line)
            pid = os.fork()
            if pid == 0:
                code = EXIT_ERROR
                try:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_r)
                    os.close(wake_w)
                    redirect(config)
                    code = run(config)
                finally:
                    os._exit(code)
            children.add(pid)
            print(f"pid {pid}", flush=True)
        for child in list(children):
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                children.discard(child)
                print(f"exit {child} {status}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        sys.exit(zygote())
    config = json.loads(sys.argv[1])
    redirect(config)
    sys.exit(run(config))
