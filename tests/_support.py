"""Helpers shared by the tests that run on the real reactor."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.task import deferLater

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
