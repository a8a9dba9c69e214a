"""Helpers shared by the tests that run on the real reactor."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from twisted.internet.task import deferLater
from zope.interface import implementer

from relayer.testing import FakeTarget, FakeTransport
from relayer.testing._fakes import _Held
from relayer.transport.base import ITransport

#: How long a real-reactor test waits for something before it fails.
DEADLINE = 30.0


def reactor_() -> Any:
    """The global reactor, which pytest-twisted runs; imported late, as pytest-twisted wants."""
    from twisted.internet import reactor

    return reactor


async def eventually(
    check: Callable[[], Any], what: str, timeout: float = DEADLINE, interval: float = 0.02
) -> Any:
    """Poll ``check`` (which may return an awaitable) until it is truthy; fail at the deadline."""
    reactor = reactor_()
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if reactor.seconds() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)


def delivery_timers(clock: Any) -> list[Any]:
    """The clock's pending calls, less the scheduler's periodic sweep for stranded work."""
    return [
        call
        for call in clock.getDelayedCalls()
        if getattr(call.func, "__qualname__", "") != "Reconciler._fire"
    ]


class GatedStore:
    """
    A store that passes every call to a real one, except those it is told to hold or fail.

    ``hold_calls(name)`` makes the next calls of the method ``name`` wait, unstarted, until
    ``release()``; ``fail_calls(name, error, times)`` makes its next ``times`` calls fail with
    ``error``. It lets a test on the inline pool put a scheduler in the middle of a store call.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._hold: set[str] = set()
        self._fail: dict[str, list[BaseException]] = {}
        self.held: list[tuple[str, Any]] = []
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if not callable(real):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            from twisted.internet.defer import Deferred, fail

            self.calls.append(name)
            errors = self._fail.get(name)
            if errors:
                return fail(errors.pop(0))
            if name in self._hold:
                waiting: Deferred[Any] = Deferred()
                self.held.append((name, lambda: real(*args, **kwargs).chainDeferred(waiting)))
                return waiting
            return real(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in ("held", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._store, name, value)

    def hold_calls(self, name: str) -> None:
        self._hold.add(name)

    def fail_calls(self, name: str, error: BaseException, times: int = 1) -> None:
        self._fail.setdefault(name, []).extend([error] * times)

    def release(self) -> int:
        """Run the held calls, in order; stop holding. Returns how many there were."""
        self._hold.clear()
        held, self.held = self.held, []
        for _, run in held:
            run()
        return len(held)


class RememberingTarget(FakeTarget):
    """
    A FakeTarget that answers a transaction it accepted before with 200, whatever it is scripted
    to answer next, as a receiver that checks transaction ids before content does.

    A transaction is resent after it was accepted when recording its delivery failed (the store
    was unavailable, or the lease was lost); refusing the resend would make the receiver both
    accept and refuse the same transaction.
    """

    def _answer(self, held: _Held) -> None:
        if not self._refuse and held.txn_id in self._bodies:
            self.in_flight -= 1
            held.result.callback(self._accept(held.txn_id, held.body))
            return
        super()._answer(held)


class RememberingTransport(FakeTransport):
    """A FakeTransport whose targets are :class:`RememberingTarget` s."""

    def __getitem__(self, target_id: str) -> FakeTarget:
        if target_id not in self._targets:
            self._targets[target_id] = RememberingTarget(target_id, self)
        return self._targets[target_id]


# -- helpers for the tests of events with identity ---------------------------------------------


def result_of(d: Any) -> Any:
    """
    The result of a Deferred that has fired already (database work runs inline in these
    tests); its failure is raised.
    """
    from twisted.python.failure import Failure

    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def database_engine(db_path: Any) -> Any:
    """An engine of its own on a test's database (a SQLite file or a PostgreSQL URL)."""
    import sqlalchemy as sa

    from relayer.store.postgres import postgres_url

    if isinstance(db_path, str) and "://" in db_path:
        return sa.create_engine(postgres_url(db_path), poolclass=sa.pool.NullPool)
    return sa.create_engine(f"sqlite:///{db_path}", poolclass=sa.pool.NullPool)


def count_rows(db_path: Any, table: str) -> int:
    """How many rows a table of the test's database holds, read over a connection of its own."""
    import sqlalchemy as sa

    engine = database_engine(db_path)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def count_events(db_path: Any) -> int:
    """How many events the test's database holds (they are stored in blocks)."""
    import sqlalchemy as sa

    engine = database_engine(db_path)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT coalesce(sum(n_events), 0) FROM relayer_events")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def cells_holding(db_path: Any, needle: bytes) -> list[tuple[str, str]]:
    """
    Every cell of every table of the test's database whose value holds ``needle``, as
    ``(table, column)``, once per cell: where some bytes are stored, and how many times.
    """
    import sqlalchemy as sa

    engine = database_engine(db_path)
    found = []
    try:
        with engine.connect() as conn:
            for table_name in sa.inspect(conn).get_table_names():
                table = sa.Table(table_name, sa.MetaData(), autoload_with=conn)
                for row in conn.execute(sa.select(table)):
                    for column, value in row._mapping.items():
                        if isinstance(value, memoryview):
                            value = value.tobytes()
                        if isinstance(value, str):
                            value = value.encode("utf-8")
                        if isinstance(value, bytes) and needle in value:
                            found.append((table_name, str(column)))
    finally:
        engine.dispose()
    return found


@attrs.define
class Sent:
    """
    One request a :class:`ConfirmingTarget` was sent.

    Attributes:
        txn_id: The transaction's id.
        body: Its bytes.
        at: The clock time of the request.
    """

    txn_id: int
    body: bytes
    at: float

    @property
    def events(self) -> list[Any]:
        """The transaction's events, decoded."""
        return list(json.loads(self.body)["events"])


class ConfirmingTarget:
    """
    A target that accepts each transaction and confirms it later, through another channel:
    it answers :meth:`relayer.SendOutcome.accepted`, unless told to answer otherwise.

    Attributes:
        requests: Every request, duplicates included, in order.
        answer: What the next requests get: a :class:`relayer.SendOutcome`, or an exception
            to fail with (a refused connection, say).
        holding: Whether requests stay in flight until :meth:`release`.
        in_flight: How many requests are in flight now.
        max_in_flight: The most ever in flight at once.
    """

    def __init__(self, transport: ConfirmingTransport) -> None:
        from relayer import SendOutcome

        self._transport = transport
        self.requests: list[Sent] = []
        self.answer: Any = SendOutcome.accepted("HTTP 202")
        self.holding = False
        self.in_flight = 0
        self.max_in_flight = 0
        self._held: list[Any] = []

    @property
    def txn_ids(self) -> list[int]:
        """The ids of the requests, in order, repeats included."""
        return [r.txn_id for r in self.requests]

    @property
    def held(self) -> int:
        """How many requests are held."""
        return len(self._held)

    def send(self, txn_id: int, body: bytes) -> Any:
        from twisted.internet.defer import Deferred

        self.requests.append(Sent(txn_id, body, self._transport.clock.seconds()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def cancelled(_: Any) -> None:
            if d in self._held:
                self._held.remove(d)
            self.in_flight -= 1

        d: Deferred[Any] = Deferred(cancelled)
        if self.holding:
            self._held.append(d)
        else:
            self._answer(d, self.answer)
        return d

    def drop(self) -> int:
        """Forget the held requests unanswered, as when the sending process dies."""
        held, self._held = self._held, []
        self.in_flight -= len(held)
        return len(held)

    def release(self) -> int:
        """Answer the held requests with what :attr:`answer` is now; stop holding."""
        self.holding = False
        held, self._held = self._held, []
        for d in held:
            self._answer(d, self.answer)
        return len(held)

    def _answer(self, d: Any, answer: Any) -> None:
        self.in_flight -= 1
        if isinstance(answer, BaseException):
            d.errback(answer)
        else:
            d.callback(answer)


@implementer(ITransport)
class ConfirmingTransport:
    """
    A transport whose targets are :class:`ConfirmingTarget` s: ``transport[target_id]``.

    Attributes:
        clock: The clock that requests are timed by; a harness's restart may replace it.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._targets: dict[str, ConfirmingTarget] = {}

    def __getitem__(self, target_id: str) -> ConfirmingTarget:
        if target_id not in self._targets:
            self._targets[target_id] = ConfirmingTarget(self)
        return self._targets[target_id]

    def send(self, target: Any, txn_id: int, body: bytes) -> Any:
        return self[target.target_id].send(txn_id, body)


def run_clock(clock: Any, seconds: float, step: float = 0.5) -> None:
    """
    Advance a fake clock by ``seconds``, a ``step`` at a time, so that what is scheduled in
    between (retries, timeouts) runs at its own time rather than all at the end.
    """
    end = clock.seconds() + seconds
    while clock.seconds() < end:
        clock.advance(min(step, end - clock.seconds()))
