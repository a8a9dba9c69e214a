"""
Operators and deliveries at the same time, on PostgreSQL, with real threads.

Two schedulers share one database and its targets through leases, each with its own store (its
own database threads and connections), as two processes would. While they deliver, an operator
replays dead letters through a third store and through a scheduler, wakes targets and adds
targets, thousands of times in all; the targets refuse some transactions for good (so that there
are dead letters to replay) and fail others for a while. At the end nothing is lost, nothing is
delivered under two transaction ids, and each target's order held.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from _support import RememberingTransport, reactor_
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from zope.interface import provider

from relayer import BackoffPolicy, Scheduler, SendOutcome
from relayer._encoding import events_of_body
from relayer.config import TargetConfig
from relayer.lease import LeaseSettings
from relayer.store.postgres import PostgresStore
from relayer.testing import target
from relayer.transport.base import OutcomeKind

pytestmark = pytest.mark.postgres_only

FIRST = [f"t{n}" for n in range(4)]
ADDED = [f"n{n}" for n in range(3)]
#: Submits (each of one to a dozen events) and operator actions.
SUBMITS = 500
OPERATIONS = 1500
#: How long the drain at the end may take before the test fails.
DRAIN_DEADLINE = 25.0


def config(target_id: str) -> TargetConfig:
    return target(
        target_id,
        max_events=4,
        request_timeout=1.0,
        backoff=BackoffPolicy(initial=0.01, multiplier=2.0, maximum=0.1, jitter=0.5),
    )


class ChaosTransport(RememberingTransport):
    """
    The targets of both schedulers: refuses or fails transactions when told, and records, in
    one sequence with the acknowledgements, when each event was last refused for good.
    """

    def __init__(self, clock: Any, tick: Callable[[], int]) -> None:
        super().__init__(clock)
        self.tick = tick
        self.refused: dict[tuple[str, str], int] = {}
        self.sends = 0

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        self.sends += 1

        def record(outcome: SendOutcome) -> SendOutcome:
            if outcome.kind in (OutcomeKind.PERMANENT, OutcomeKind.TOO_LARGE):
                at = self.tick()
                for e in events_of_body(body):
                    self.refused[(target.target_id, json.loads(e)["id"])] = at
            return outcome

        return super().send(target, txn_id, body).addCallback(record)


@provider(ILogObserver)
class ErrorLog:
    """Collects the log events that report errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("log_level") in (
            LogLevel.error,
            LogLevel.critical,
        ):
            failure = event.get("log_failure")
            self.errors.append(f"{event.get('log_format')}: {failure!r}")


@pytest_twisted.ensureDeferred
async def test_replay_wake_and_add_target_while_another_scheduler_delivers(db_path: str) -> None:
    reactor = reactor_()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"seed {seed}")
    counter = iter(range(10**9))

    def tick() -> int:
        return next(counter)

    errors = ErrorLog()
    globalLogPublisher.addObserver(errors)
    transport = ChaosTransport(reactor, tick)
    lease = {"timeout": 5.0, "renew_interval": 0.25}
    stores = [PostgresStore.open_url(reactor, db_path, pool_size=3) for _ in range(2)]
    a, b = (
        Scheduler(
            reactor,
            store,
            transport,
            [config(t) for t in FIRST],
            random=rng.random,
            leases=LeaseSettings(node_id=name, **lease),  # type: ignore[arg-type]
        )
        for name, store in zip("ab", stores, strict=True)
    )
    operator = PostgresStore.open_url(reactor, db_path, pool_size=2)
    registered = list(FIRST)
    #: Each acknowledged event's id by target, in acknowledgement order, and when.
    acked: dict[str, list[str]] = {}
    acked_at: dict[tuple[str, str], int] = {}
    replays = 0
    replayed = 0
    wakes = 0
    try:
        await a.start()
        await b.start()
        await operator.open()

        async def submitter() -> None:
            for i in range(SUBMITS):
                batch = []
                for _ in range(rng.randint(1, 12)):
                    t = rng.choice(registered)
                    pad = "x" * rng.randint(0, 40)
                    batch.append((t, {"id": f"{t}-{i}-{len(batch)}", "pad": pad}))
                await (a if i % 2 else b).submit_many(batch)
                at = tick()
                for t, event in batch:
                    acked.setdefault(t, []).append(event["id"])
                    acked_at[(t, event["id"])] = at
                if rng.random() < 0.3:
                    await deferLater(reactor, 0, lambda: None)

        async def operate() -> None:
            nonlocal replays, replayed, wakes
            running: list[Deferred[Any]] = []
            add_at = {OPERATIONS * (k + 1) // (len(ADDED) + 1) for k in range(len(ADDED))}
            for i in range(OPERATIONS):
                t = rng.choice(registered)
                roll = rng.random()
                if i in add_at:
                    new = ADDED[len(registered) - len(FIRST)]
                    # The application adds it to every process's configuration.
                    a.add_target(config(new))
                    b.add_target(config(new))
                    registered.append(new)
                elif roll < 0.25:
                    # From another process: straight on the database.
                    d = operator.replay(t, reactor.seconds())
                    running.append(d)
                    replays += 1
                elif roll < 0.35:
                    d = b.replay(t)
                    running.append(d)
                    replays += 1
                elif roll < 0.6:
                    (a if roll < 0.5 else b).wake(t)
                    wakes += 1
                elif roll < 0.75:
                    transport[t].respond(rng.choice([400, 422]))
                elif roll < 0.85:
                    transport[t].respond(rng.choice([500, 503, 429]))
                if len(running) >= 4 or rng.random() < 0.2:
                    for n in await DeferredList(running, fireOnOneErrback=True, consumeErrors=True):
                        replayed += n[1]
                    running = []
                await deferLater(reactor, rng.choice([0, 0, 0.001, 0.003]), lambda: None)
            for n in await DeferredList(running, fireOnOneErrback=True, consumeErrors=True):
                replayed += n[1]

        await DeferredList(
            [Deferred.fromCoroutine(submitter()), Deferred.fromCoroutine(operate())],
            fireOnOneErrback=True,
            consumeErrors=True,
        )

        # Drain: the last replays went through the operator's store, which nobody was told
        # of, so every target is woken once; then everything goes out by itself.
        for t in registered:
            for scheduler in (a, b):
                scheduler.wake(t)
        deadline = reactor.seconds() + DRAIN_DEADLINE
        while True:
            counts = await operator.queue_counts()
            busy = [t for t, c in counts.items() if c.pending_events]
            in_flight = [t for t in registered if transport[t].in_flight]
            if not busy and not in_flight:
                break
            if reactor.seconds() > deadline:
                statuses = await a.status()
                pytest.fail(
                    f"not drained after {DRAIN_DEADLINE:g}s (seed {seed}): pending {busy}, "
                    f"in flight {in_flight}; a owns {sorted(a.owned_targets)}, b owns "
                    f"{sorted(b.owned_targets)}; {statuses}"
                )
            await deferLater(reactor, 0.05, lambda: None)

        dead_letters = {t: await operator.dead_letters(t, 10**9) for t in registered}
    finally:
        for scheduler in (a, b):
            if scheduler.running:
                await scheduler.stop()
        await operator.close()
        globalLogPublisher.removeObserver(errors)

    assert errors.errors == [], f"seed {seed}"
    assert sum(len(v) for v in acked.values()) >= 2000
    assert replayed > 0 and wakes > 0 and len(registered) == len(FIRST) + len(ADDED)
    for t in registered:
        fake = transport[t]
        where = f"{t} (seed {seed})"
        # One request in flight at a time across both processes; a resend has the same bytes.
        assert fake.violations == [], where
        assert fake.max_in_flight <= 1, where
        # Deduplicated by transaction id, no event arrived twice (under a new id).
        txn_of: dict[str, int] = {}
        order: list[str] = []
        for txn in fake.received:
            for event in txn.events:
                first = txn_of.setdefault(event["id"], txn.txn_id)
                assert first == txn.txn_id, (
                    f"{where}: {event['id']} delivered in transactions {first} and "
                    f"{txn.txn_id}; last refused at {transport.refused.get((t, event['id']))}, "
                    f"acknowledged at {acked_at.get((t, event['id']))}"
                )
                order.append(event["id"])
        dead = [json.loads(e)["id"] for d in dead_letters[t] for e in events_of_body(d.body)]
        mine = acked.get(t, [])
        # Every acknowledged event was delivered once, or is still a dead letter; nothing else.
        assert not set(order) & set(dead), where
        assert len(dead) == len(set(dead)), f"{where}: an event is dead-lettered twice"
        lost = sorted(set(mine) - set(order) - set(dead))
        unknown = sorted(set(order + dead) - set(mine))
        assert not lost, f"{where}: lost {lost}; last refused at " + str(
            [transport.refused.get((t, e)) for e in lost]
        )
        assert not unknown, f"{where}: delivered or dead-lettered, never acknowledged: {unknown}"
        assert len(order) + len(dead) == len(mine), where
        # Order: the events never refused arrived in submit order...
        position = {e: i for i, e in enumerate(mine)}
        plain = [e for e in order if (t, e) not in transport.refused]
        assert plain == sorted(plain, key=position.__getitem__), f"{where} out of order"
        # ...and a replayed event after every event acknowledged before it was refused.
        delivered_at = {e: i for i, e in enumerate(order)}
        for e in order:
            refused_at = transport.refused.get((t, e))
            if refused_at is None:
                continue
            for earlier in plain:
                if acked_at[(t, earlier)] < refused_at:
                    assert delivered_at[earlier] < delivered_at[e], (
                        f"{where}: replayed {e} arrived before {earlier}, queued before it"
                    )
    print(
        f"seed {seed}: {sum(len(v) for v in acked.values())} events, {transport.sends} sends, "
        f"{replays} replays ({replayed} events), {wakes} wakes, {len(ADDED)} targets added, "
        f"{sum(len(d) for d in dead_letters.values())} dead letters left"
    )
