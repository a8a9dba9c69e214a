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
