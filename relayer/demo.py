"""
``relayer demo``: relayer delivering to three local HTTP targets, end to end.

The demo runs a real scheduler on a SQLite file in a temporary folder (with its dedicated
database thread) and the default HTTP transport, and three real HTTP targets on 127.0.0.1:

- ``healthy`` answers every transaction;
- ``flaky`` answers a random share of requests (30% by default, seeded) with HTTP 500;
- ``outage`` is down at first (its port is closed: connection refused), and comes back after
  a few seconds, when the demo wakes it with :meth:`relayer.Scheduler.wake`.

First, while ``outage`` is down, it submits one event for all three targets with a short
time to live (five sixths of the outage: 2.5 s by default), so that its deadline passes before
``outage`` is back. Then it submits the same number of events to each target, each event
carrying a sequence number, and shows each target's progress twice a second.

It ends with a summary checked by the targets themselves: every event received exactly once
(after de-duplication by transaction id) and in order. Then it shows where the first event
stands at each target, from :meth:`relayer.Scheduler.event_status`: delivered (when, in which
transaction) at the targets that were up, expired (when) at ``outage``, which went on with its
later events; each state is checked against what the target received. It exits with 0 if
everything checks, 1 if not, and 2 if it did not finish within ``--timeout``.

With ``--admin PORT``, it also serves the admin API and status page
(:class:`relayer.admin.AdminResource`) on ``127.0.0.1:PORT`` (0 picks a free port), with the
token from the environment variable ``RELAYER_ADMIN_TOKEN`` or a random one, and prints the
page's address, token included, once. After the summary it keeps the scheduler, the targets and
the page running until it is interrupted (Ctrl-C, or SIGTERM), then stops them and exits with
the summary's status. Without ``--admin`` it serves nothing more, and exits after the summary.

The demo is a program, not library code: it runs on the global reactor, through
:func:`twisted.internet.task.react`.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater, react
from twisted.web.server import Site

from relayer.admin import AdminResource, check_token
from relayer.config import BackoffPolicy, TargetConfig
from relayer.errors import ConfigurationError
from relayer.scheduler import Scheduler, TargetStatus
from relayer.store.base import DeliveryState, EventEntry, EventStatus
from relayer.store.sqlite import SQLiteStore
from relayer.testing._receiver import (
    DeliveryReport,
    Receiver,
    ReceiverServer,
    listen_receiver,
    verify_delivery,
)
from relayer.transport.http import HTTPTransport

#: The exit status when every target received every event exactly once, in order.
EXIT_OK = 0
#: The exit status when a target's deliveries did not verify, or the demo failed.
EXIT_FAILED = 1
#: The exit status when the demo did not finish in time.
EXIT_TIMEOUT = 2

HEALTHY = "healthy"
FLAKY = "flaky"
OUTAGE = "outage"

#: The id of the event submitted for every target with a short time to live.
FAN_OUT_ID = "demo-fan-out"

#: The environment variable that gives ``--admin`` its token.
ADMIN_TOKEN_VARIABLE = "RELAYER_ADMIN_TOKEN"


@attrs.frozen
class DemoOptions:
    """
    The demo's settings, from the command line.

    Attributes:
        events: How many events to submit to each target.
        seed: The seed of every random choice (failures, jitter); None picks one.
        timeout: Seconds the demo may run before it gives up.
        outage: Seconds the ``outage`` target stays down.
        failure_rate: The share of requests the ``flaky`` target fails.
        progress_interval: Seconds between two progress lines.
        admin_port: Serve the admin API and status page on this port of 127.0.0.1 (0: any free
            port), and keep running after the summary until interrupted; None serves nothing.
        admin_token: The admin API's token; None makes a random one.
    """

    events: int = 10_000
    seed: int | None = None
    timeout: float = 300.0
    outage: float = 3.0
    failure_rate: float = 0.3
    progress_interval: float = 0.5
    admin_port: int | None = None
    admin_token: str | None = attrs.field(default=None, repr=False)

    @property
    def fan_out_ttl(self) -> float:
        """
        The time to live of the event submitted for every target: five sixths of the outage,
        so that its deadline passes while the ``outage`` target is down.
        """
        return self.outage * 5 / 6


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 7 * 24 * 3600:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 seconds and under a week, not {text}"
        )
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to below 1, not {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, not {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to its sub-command's parser."""
    defaults = DemoOptions()
    parser.add_argument(
        "--events",
        type=_positive_int,
        default=defaults.events,
        metavar="N",
        help=f"events to submit to each target (default {defaults.events})",
    )
    parser.add_argument(
        "--seed", type=int, default=None, metavar="S", help="seed of the random failures and jitter"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=defaults.timeout,
        metavar="SECONDS",
        help=f"give up (exit status 2) after this long (default {defaults.timeout:g})",
    )
    parser.add_argument(
        "--outage",
        type=_seconds,
        default=defaults.outage,
        metavar="SECONDS",
        help=(
            f"how long the 'outage' target is down (default {defaults.outage:g}); the event "
            "for every target lives five sixths of it"
        ),
    )
    parser.add_argument(
        "--failure-rate",
        type=_rate,
        default=defaults.failure_rate,
        metavar="RATE",
        help=f"share of requests the 'flaky' target fails (default {defaults.failure_rate:g})",
    )
    parser.add_argument(
        "--log", action="store_true", help="also show relayer's log on standard error"
    )
    parser.add_argument(
        "--admin",
        type=_port,
        default=None,
        metavar="PORT",
        help=(
            "also serve the admin API and status page on 127.0.0.1:PORT (0: any free port), "
            f"with the token in ${ADMIN_TOKEN_VARIABLE} or a random one, and keep running "
            "after the summary until Ctrl-C"
        ),
    )
    parser.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo with parsed command-line arguments; return the exit status."""
    token = None
    if args.admin is not None:
        token = os.environ.get(ADMIN_TOKEN_VARIABLE) or None
        if token is not None:
            try:
                check_token(token)
            except ConfigurationError as e:
                sys.stderr.write(f"relayer demo: ${ADMIN_TOKEN_VARIABLE}: {e}\n")
                return EXIT_FAILED
    options = DemoOptions(
        events=args.events,
        seed=args.seed,
        timeout=args.timeout,
        outage=args.outage,
        failure_rate=args.failure_rate,
        admin_port=args.admin,
        admin_token=token,
    )
    if args.log:
        from twisted.logger import (
            FilteringLogObserver,
            LogLevel,
            LogLevelFilterPredicate,
            globalLogBeginner,
            textFileLogObserver,
        )

        observer = FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
        )
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return run(options)


def run(options: DemoOptions, out: TextIO | None = None) -> int:
    """
    Run the demo on the global reactor, and return its exit status.

    Args:
        options: The demo's settings.
        out: Where to write the progress and the summary; standard output by default.
    """
    stream = out if out is not None else sys.stdout

    def write(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    async def main(reactor: Any) -> None:
        code = await _Demo(reactor, options, write).run()
        raise SystemExit(code)

    try:
        react(main)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED
    return EXIT_FAILED  # react always exits; this is not reached


@attrs.define
class _Target:
    name: str
    description: str
    receiver: Receiver
    server: ReceiverServer
    config: TargetConfig
    expected: list[dict[str, Any]] = attrs.field(factory=list)


class _Demo:
    """One run of the demo."""

    def __init__(self, reactor: Any, options: DemoOptions, write: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.options = options
        self.write = write
        self.seed = (
            options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
        )
        self.targets: list[_Target] = []
        self.started_at = 0.0
        self.status: dict[str, TargetStatus] = {}
        self._reporting = False
        #: Fired once run() has stopped everything, after an interruption (``--admin``).
        self._stopped: Deferred[None] | None = None
        self.fan_out: dict[str, Any] = {
            "seq": -1,  # before every other event: the targets check the order by "seq"
            "target": "all",
            "text": "one event for every target",
        }

    async def run(self) -> int:
        options = self.options
        rng = random.Random(self.seed)
        folder = tempfile.TemporaryDirectory(prefix="relayer-demo-")
        servers: list[ReceiverServer] = []
        transport = HTTPTransport(self.reactor)
        scheduler: Scheduler | None = None
        progress: LoopingCall | None = None
        comeback = None
        admin_port: Any = None
        try:
            backoff = BackoffPolicy(initial=0.2, maximum=2.0)
            for name, description in (
                (HEALTHY, "answers every request"),
                (FLAKY, f"fails {options.failure_rate:.0%} of requests with HTTP 500"),
                (OUTAGE, f"refuses connections for the first {options.outage:g}s"),
            ):
                token = secrets.token_urlsafe(24)
                receiver = Receiver(token, order_key="seq")
                server = listen_receiver(self.reactor, receiver)
                servers.append(server)
                config = TargetConfig(name, server.base_url, token, backoff=backoff)
                self.targets.append(_Target(name, description, receiver, server, config))
            flaky = self._target(FLAKY)
            flaky.receiver.fail_randomly(
                options.failure_rate, 500, random=random.Random(rng.random()).random
            )
            outage = self._target(OUTAGE)
            # Keep the port, but close it: until it listens again, connecting is refused.
            await outage.server.down()

            path = Path(folder.name) / "relayer.db"
            store = SQLiteStore.open_path(self.reactor, path)
            scheduler = Scheduler(
                self.reactor,
                store,
                transport,
                [t.config for t in self.targets],
                random=random.Random(rng.random()).random,
            )
            self.write(
                f"relayer demo: {options.events} events to each of {len(self.targets)} targets, "
                f"seed {self.seed}"
            )
            self.write(f"  store: SQLite in {path}")
            for t in self.targets:
                self.write(f"  target {t.name:<8} {t.config.base_url:<24} {t.description}")
            if options.admin_port is not None:
                admin_port = self._serve_admin(scheduler)
            await scheduler.start()
            self.started_at = self.reactor.seconds()
            # Submitted first, so that it heads every target's queue. Its deadline is before
            # the outage ends, as the outage is scheduled once it is stored.
            ttl = options.fan_out_ttl
            fan_out_expires = self.reactor.seconds() + ttl
            await scheduler.submit(
                [t.name for t in self.targets], self.fan_out, event_id=FAN_OUT_ID, ttl=ttl
            )
            self.write(
                f"[{self._elapsed():6.1f}s] event {FAN_OUT_ID} stored for all "
                f"{len(self.targets)} targets, with a ttl of {ttl:.3g}s; {OUTAGE} is down"
            )

            def come_back() -> None:
                assert scheduler is not None
                outage.server.up()
                self.write(f"[{self._elapsed():6.1f}s] {OUTAGE} is back up: waking it")
                if scheduler.running:
                    scheduler.wake(OUTAGE)

            comeback = self.reactor.callLater(options.outage, come_back)
            progress = LoopingCall(self._report, scheduler)
            progress.clock = self.reactor
            progress.start(options.progress_interval, now=False)
            await self._fan_out_to_live(fan_out_expires)

            deadline = self.started_at + options.timeout
            finished = await self._deliver(scheduler, deadline)
            if progress.running:
                progress.stop()
            await self._report(scheduler)
            if not finished:
                self.write(f"TIMED OUT after {options.timeout:g}s: not every event was delivered")
                code = EXIT_TIMEOUT
            else:
                status = await scheduler.event_status(FAN_OUT_ID)
                later: dict[str, EventEntry | None] = {}
                if status is not None:
                    for name, delivery in status.deliveries.items():
                        if delivery.state is DeliveryState.EXPIRED:
                            page = await scheduler.target_events(
                                name, DeliveryState.DELIVERED, limit=1
                            )
                            later[name] = page.entries[0] if page.entries else None
                code = self._summary(status, later)
            if admin_port is not None:
                await self._until_interrupted()
            return code
        except Exception as e:
            self.write(f"relayer demo failed: {type(e).__name__}: {e}")
            return EXIT_FAILED
        finally:
            if progress is not None and progress.running:
                progress.stop()
            if comeback is not None and comeback.active():
                comeback.cancel()
            try:
                if admin_port is not None:
                    await admin_port.stopListening()
                if scheduler is not None and scheduler.running:
                    await scheduler.stop()
                await transport.close()
                for server in servers:
                    await server.stop()
                folder.cleanup()
            finally:
                if self._stopped is not None:
                    self._stopped.callback(None)

    def _serve_admin(self, scheduler: Scheduler) -> Any:
        """Serve the admin API and status page on 127.0.0.1; print its address, once."""
        options = self.options
        assert options.admin_port is not None
        token = options.admin_token or secrets.token_urlsafe(24)
        site = Site(AdminResource(scheduler, token))
        site.noisy = False
        port = self.reactor.listenTCP(options.admin_port, site, interface="127.0.0.1")
        number = port.getHost().port
        self.write(f"  admin: http://127.0.0.1:{number}/#token={token}")
        self.write(
            f"         the status page, and the API at http://127.0.0.1:{number}/api/ "
            "(header Authorization: Bearer TOKEN)"
        )
        return port

    async def _until_interrupted(self) -> None:
        """
        Keep everything running until the reactor is asked to stop (Ctrl-C, SIGTERM); the
        shutdown then waits for the demo to stop its scheduler and servers.
        """
        interrupted: Deferred[None] = Deferred()
        stopped: Deferred[None] = Deferred()
        self._stopped = stopped

        def shutting_down() -> Deferred[None]:
            interrupted.callback(None)
            # The shutdown goes on once run() has stopped everything (see its finally).
            return stopped

        self.write("the scheduler, the targets and the admin page keep running: Ctrl-C stops them")
        self.reactor.addSystemEventTrigger("before", "shutdown", shutting_down)
        await interrupted

    async def _fan_out_to_live(self, expires_at: float) -> None:
        """
        Wait until the targets that are up have the event for every target, or until its
        deadline: the other events, submitted next, then do not compete with it.
        """
        live = [t for t in self.targets if t.server.is_up]
        waits = [t.receiver.wait_for_events(1) for t in live]
        remaining = max(expires_at - self.reactor.seconds(), 0.0)
        try:
            await DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addTimeout(
                remaining, self.reactor
            )
        except defer.TimeoutError:
            pass
        got = [t.name for t in live if self.fan_out in t.receiver.events]
        missing = [t.name for t in live if t.name not in got]
        line = (
            f"[{self._elapsed():6.1f}s] event {FAN_OUT_ID} received by {', '.join(got) or 'none'}"
        )
        if missing:
            line += f", not by {', '.join(missing)} before its deadline"
        self.write(line + "; submitting the other events")

    def _target(self, name: str) -> _Target:
        return next(t for t in self.targets if t.name == name)

    def _elapsed(self) -> float:
        return float(self.reactor.seconds() - self.started_at)

    async def _deliver(self, scheduler: Scheduler, deadline: float) -> bool:
        """Submit the events, then wait until every target has them; False on timeout."""
        n = self.options.events
        chunk = 1000
        for start in range(0, n, chunk):
            batch = []
            for seq in range(start, min(start + chunk, n)):
                for t in self.targets:
                    event = {"seq": seq, "target": t.name, "text": f"event {seq} for {t.name}"}
                    t.expected.append(event)
                    batch.append((t.name, event))
            await scheduler.submit_many(batch)
        self.write(
            f"[{self._elapsed():6.1f}s] all {n * len(self.targets)} events stored; delivering"
        )

        received: Deferred[Any] = DeferredList(
            [t.receiver.wait_for_events(n) for t in self.targets], fireOnOneErrback=True
        )
        remaining = deadline - self.reactor.seconds()
        if remaining <= 0:
            return False
        try:
            await received.addTimeout(remaining, self.reactor)
        except Exception:
            return False
        # The targets have everything; let the scheduler record the last completions.
        while self.reactor.seconds() < deadline:
            statuses = await scheduler.status()
            if all(s.pending_events == 0 and s.pending_transactions == 0 for s in statuses):
                return True
            await deferLater(self.reactor, 0.05, lambda: None)
        return False

    async def _report(self, scheduler: Scheduler) -> None:
        if self._reporting or not scheduler.running:
            return
        self._reporting = True
        try:
            statuses = {s.target_id: s for s in await scheduler.status()}
        finally:
            self._reporting = False
        parts = []
        for t in self.targets:
            s = statuses.get(t.name)
            state = s.state.name if s is not None else "?"
            pending = s.pending_events if s is not None else 0
            delivered = self._received(t)
            width = len(str(self.options.events))
            parts.append(
                f"{t.name} {delivered:>{width}}/{self.options.events} {state:<4} "
                f"pending {pending:>{width}}"
            )
        self.write(f"[{self._elapsed():6.1f}s] " + " | ".join(parts))

    def _received(self, t: _Target) -> int:
        """How many of the events submitted for this target only it received."""
        events = t.receiver.events
        return len(events) - events.count(self.fan_out)

    def _summary(self, status: EventStatus | None, later: dict[str, EventEntry | None]) -> int:
        elapsed = self._elapsed()
        n = self.options.events
        total = n * len(self.targets)
        ok = True
        self.write("")
        self.write(
            f"{'target':<8} {'events':>13} {'txns':>6} {'dup txns':>8} {'failed':>7} "
            f"{'violations':>10}  result"
        )
        reports: list[tuple[_Target, DeliveryReport]] = []
        for t in self.targets:
            r = t.receiver
            report = verify_delivery(t.expected, [e for e in r.events if e != self.fan_out])
            reports.append((t, report))
            good = report.ok and not r.violations
            ok = ok and good
            delivered = f"{self._received(t)}/{n}"
            self.write(
                f"{t.name:<8} {delivered:>13} {len(r.transactions):>6} "
                f"{r.duplicates:>8} {r.failed:>7} {len(r.violations):>10}  "
                f"{'OK' if good else 'FAILED'}"
            )
        self.write("")
        for t, report in reports:
            if not report.ok:
                self.write(f"  {t.name}: {report.summary()}")
            for violation in t.receiver.violations[:5]:
                self.write(f"  {t.name}: {violation}")
        ok = self._fan_out_summary(status, later) and ok
        rate = total / elapsed if elapsed > 0 else float("inf")
        if ok:
            self.write(
                f"VERIFIED: every target received all {n} events exactly once, in order "
                f"({total} events in {elapsed:.2f}s, {rate:,.0f} events/s), and event "
                f"{FAN_OUT_ID} as its status says"
            )
            return EXIT_OK
        self.write(f"FAILED: delivery did not verify ({elapsed:.2f}s)")
        return EXIT_FAILED

    def _fan_out_summary(
        self, status: EventStatus | None, later: dict[str, EventEntry | None]
    ) -> bool:
        """
        Show where the event for every target stands at each, and check that each target
        received it if and only if its status says it was delivered there.

        Args:
            status: The event's status, from the scheduler.
            later: For each target where it expired, the first event delivered there, or
                None if none was.

        Returns:
            Whether every state is final and agrees with what the target received.
        """
        if status is None:
            self.write(f"  the store holds no event {FAN_OUT_ID}")
            return False
        ok = True
        at = self._since_start
        self.write(
            f"event {FAN_OUT_ID}, submitted at {at(status.submitted_at)} for every target, "
            f"expires at {at(status.expires_at)}:"
        )
        self.write(f"{'target':<8} {'state':<13} {'at':>6} {'txn':>5} {'attempts':>8}  received")
        for t in self.targets:
            d = status.deliveries.get(t.name)
            copies = t.receiver.events.count(self.fan_out)
            received = {0: "no", 1: "yes"}.get(copies, f"{copies} times")
            if d is None:
                self.write(f"{t.name:<8} {'-':<13} {'-':>6} {'-':>5} {'-':>8}  {received}")
                ok = False
                continue
            # Delivered means received once; expired, never received. Nothing else is final.
            if d.state is DeliveryState.DELIVERED:
                when, good = d.delivered_at, copies == 1
            else:
                when, good = d.expired_at, d.state is DeliveryState.EXPIRED and copies == 0
            ok = ok and good
            txn = str(d.txn_id) if d.txn_id is not None else "-"
            attempts = str(d.attempts) if d.txn_id is not None else "-"
            self.write(
                f"{t.name:<8} {d.state.value.replace('_', ' '):<13} {at(when):>6} {txn:>5} "
                f"{attempts:>8}  {received}{'' if good else '  (does not match)'}"
            )
        for t in self.targets:
            if t.name not in later:
                continue
            entry = later[t.name]
            if entry is None:
                self.write(f"  {t.name} delivered nothing after it")
                ok = False
                continue
            self.write(
                f"  {t.name} went on with its later events: the first delivered at "
                f"{at(entry.at)} in transaction {entry.txn_id}, "
                f"{self._received(t)}/{self.options.events} in all"
            )
        self.write("")
        return ok

    def _since_start(self, when: float | None) -> str:
        """A clock time as seconds since the scheduler started, or "-" for None."""
        return "-" if when is None else f"{when - self.started_at:.1f}s"


__all__ = ["DemoOptions", "configure_parser", "run", "run_from_args"]
