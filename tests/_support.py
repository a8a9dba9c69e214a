"""Helpers shared by the tests that run on the real reactor."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.task import deferLater

from relayer.testing import FakeTarget, FakeTransport
from relayer.testing._fakes import _Held

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
