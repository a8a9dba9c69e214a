"""
Leases: several scheduler processes sharing one database, each target owned by one of them.

Each process runs a :class:`LeaseManager`. Every ``renew_interval`` it runs one *lease round*
in the database (see :meth:`relayer.store.ILeaseStore.lease_round`): it refreshes its heartbeat,
renews the leases it holds, and takes free or expired leases until it owns its fair share of the
targets (their number divided by the number of live processes). A process that owns more than
its share gives the excess up, after their deliveries have stopped, so that a process that joins
gets work.

A lease lasts ``timeout`` seconds from the start of the round that renewed it. A process starts
a request to a target only while it holds the lease with more than the target's
``request_timeout`` left, and the scheduler cancels every request at its ``request_timeout``,
so a process that runs normally has ended its last request before the lease can pass to
another process. Every change to a target's queue or state checks the lease in the same
database transaction (see :class:`relayer.errors.LeaseLost`), so a process that lost a lease
records nothing for the target.

When a process dies, its leases (and its heartbeat) expire ``timeout`` seconds after its last
renewal; the others take them over right then, since every process schedules a round for the
moment the earliest lease of another process would expire. The new owner resumes each target
from its stored state, pending transactions and backoff included; but since the previous owner
may only be frozen, with a request still open, its first send to a target whose lease expired
waits until that expiry plus the target's ``request_timeout``. What a receiver can still see
when a process is frozen for longer than that is told in ``docs/scaling.md``.

Lease times are the processes' own clocks: the hosts' clocks must agree (NTP) to well within
``timeout``.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from relayer import _faults
from relayer import _logevents as ev
from relayer.errors import ConfigurationError
from relayer.store.base import ILeaseStore, LeaseRound


def default_node_id() -> str:
    """A node id unique to this process: host name, process id and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _positive(instance: Any, attribute: Any, value: Any) -> None:
    if value is None and attribute.name == "renew_interval":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
        raise ConfigurationError(
            f"lease {attribute.name} must be a number of seconds > 0, not {value!r}"
        )


def _node_id(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= 255:
        raise ConfigurationError(f"node_id must be a str of 1 to 255 characters, not {value!r}")


@attrs.frozen
class LeaseSettings:
    """
    How a scheduler shares its targets with other processes on the same database.

    Attributes:
        node_id: This process's id, unique among the processes; by default host, pid and a
            random suffix.
        timeout: How long a lease lasts without renewal, in seconds. A dead process's targets
            are taken over after at most this long. It must exceed every target's
            ``request_timeout`` plus ``renew_interval``. Default 60.
        renew_interval: How often leases are renewed; by default a quarter of ``timeout``.
    """

    node_id: str = attrs.field(factory=default_node_id, validator=_node_id)
    timeout: float = attrs.field(default=60.0, validator=_positive)
    renew_interval: float | None = attrs.field(default=None, validator=_positive)

    @property
    def interval(self) -> float:
        """The time between lease rounds."""
        return self.renew_interval if self.renew_interval is not None else self.timeout / 4

    def check(self, request_timeouts: Iterable[float]) -> None:
        """
        Check that a lease outlives every request started under it.

        Raises:
            ConfigurationError: ``timeout`` is too short for a target's ``request_timeout``.
        """
        longest = max(request_timeouts, default=0.0)
        if self.interval >= self.timeout:
            raise ConfigurationError(
                f"lease renew_interval ({self.interval:g}s) must be shorter than its timeout "
                f"({self.timeout:g}s)"
            )
        if self.timeout <= longest + self.interval:
            raise ConfigurationError(
                f"lease timeout ({self.timeout:g}s) must exceed the longest request_timeout "
                f"({longest:g}s) plus the renew interval ({self.interval:g}s), so that no "
                "request outlives the lease it was sent under"
            )


class LeaseManager:
    """
    Holds this process's leases and tells the scheduler which targets it owns.

    Args:
        clock: Times the rounds and the leases.
        store: The shared store.
        settings: The lease settings.
        targets: Gives the ids of the targets registered with this process.
        acquired: Called with targets this process now owns, and for those whose lease
            another process held until it expired, the time it expired: start delivering to
            them (see the module's docstring on what a takeover waits for).
        lost: Called with targets this process no longer owns: stop delivering to them at once.
        shed: Called with targets to give up; returns a Deferred that fires once their
            deliveries have stopped, after which their leases are released.
        renewed: Called after each round that renewed the leases.
    """

    log = Logger(namespace="relayer.lease")

    def __init__(
        self,
        clock: IReactorTime,
        store: ILeaseStore,
        settings: LeaseSettings,
        targets: Callable[[], list[str]],
        acquired: Callable[[list[str], Mapping[str, float]], None],
        lost: Callable[[list[str]], None],
        shed: Callable[[list[str]], Deferred[None]],
        renewed: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.owned: set[str] = set()
        self.valid_until = float("-inf")
        self.live_nodes = 0
        self._clock = clock
        self._store = store
        self._targets = targets
        self._acquired = acquired
        self._lost = lost
        self._shed = shed
        self._renewed = renewed
        self._call: IDelayedCall | None = None
        self._round: Deferred[None] | None = None
        self._shedding: set[str] = set()
        self._stopping = False
        self._failures = 0

    @property
    def node_id(self) -> str:
        """This process's node id."""
        return self.settings.node_id

    def owns(self, target_id: str) -> bool:
        """Whether this process holds the target's lease now."""
        return target_id in self.owned and self._clock.seconds() < self.valid_until

    def remaining(self) -> float:
        """Seconds left on this process's leases."""
        return self.valid_until - self._clock.seconds()

    def start(self) -> Deferred[None]:
        """Run the first round; the next ones are scheduled by each round."""
        return self._run_round()

    def _run_round(self) -> Deferred[None]:
        self._call = None
        d = Deferred.fromCoroutine(self._do_round())
        self._round = d
        return d

    async def _do_round(self) -> None:
        started = self._clock.seconds()
        settings = self.settings
        delay = settings.interval
        try:
            result = await self._store.lease_round(
                settings.node_id, self._targets(), settings.timeout, started
            )
        except Exception as e:
            self._failures += 1
            delay = min(settings.interval, 0.5 * 2 ** min(self._failures - 1, 10))
            self.log.warn(
                "Renewing leases failed ({error}); {remaining:.1f}s of lease left; retrying in "
                "{delay:.1f}s",
                relayer_event=ev.LEASE_RENEW_FAILED,
                error=str(e),
                remaining=max(0.0, self.remaining()),
                delay=delay,
            )
        else:
            self._failures = 0
            self.valid_until = started + settings.timeout
            self.live_nodes = result.live_nodes
            try:
                self._apply(result)
            except Exception:
                # The leases were renewed; what this process does with them failed. The next
                # round comes all the same, so renewals never stop on an error.
                self.log.failure(
                    "Acting on a lease round failed", relayer_event=ev.LEASE_APPLY_FAILED
                )
            if result.next_expiry is not None:
                # Take over a dead process's targets as soon as their leases expire (a live
                # process renews them before then, and this round finds nothing to take).
                delay = min(delay, max(0.0, result.next_expiry - self._clock.seconds()) + 0.01)
        finally:
            self._round = None
            if not self._stopping:
                self._call = self._clock.callLater(delay, self._run_round)

    def _apply(self, result: LeaseRound) -> None:
        """Act on a lease round: drop the targets lost, take those acquired, shed the excess."""
        owned = set(result.owned) - self._shedding
        lost = sorted(self.owned - owned)
        new = sorted(owned - self.owned)
        self.owned = owned
        if lost:
            self.log.warn(
                "Lost the leases of {targets} targets",
                relayer_event=ev.LEASE_LOST,
                targets=len(lost),
            )
            self._lost(lost)
        if new:
            self.log.info(
                "Took the leases of {targets} targets ({nodes} processes live)",
                relayer_event=ev.LEASE_ACQUIRED,
                targets=len(new),
                nodes=result.live_nodes,
            )
            _faults.checkpoint("lease.acquired")
            self._acquired(new, {t: result.taken_over[t] for t in new if t in result.taken_over})
        excess = len(self.owned) - result.fair_share
        if excess > 0 and result.live_nodes > 1 and not self._stopping:
            self._give_up(sorted(self.owned)[-excess:])
        self._renewed()

    def _give_up(self, target_ids: list[str]) -> None:
        self.owned.difference_update(target_ids)
        self._shedding.update(target_ids)
        self.log.info(
            "Giving up {targets} targets to other processes",
            relayer_event=ev.LEASE_SHED,
            targets=len(target_ids),
        )

        async def give_up() -> None:
            try:
                await self._shed(target_ids)
                await self._store.release_leases(self.node_id, target_ids)
            finally:
                self._shedding.difference_update(target_ids)

        Deferred.fromCoroutine(give_up()).addErrback(
            lambda f: self.log.failure(
                "Giving up the leases of {targets} targets failed",
                f,
                relayer_event=ev.LEASE_SHED_FAILED,
                targets=len(target_ids),
            )
        )

    def stop(self) -> Deferred[None]:
        """Stop renewing, and release every lease this process holds."""
        self._stopping = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

        async def stop() -> None:
            if self._round is not None:
                try:
                    await self._round
                except Exception:
                    pass
            self.owned = set()
            self.valid_until = float("-inf")
            await self._store.release_leases(self.node_id, None)

        return Deferred.fromCoroutine(stop())
