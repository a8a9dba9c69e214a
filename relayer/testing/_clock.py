"""
Moving a fake clock the way time passes: from one timer to the next.
"""

from __future__ import annotations

import math
from numbers import Real

from twisted.internet.task import Clock

#: The most timers :func:`step` runs in one call before it decides that they form a busy loop.
MAX_TIMERS = 1_000_000


def step(clock: Clock, seconds: float, *, max_timers: int = MAX_TIMERS) -> int:
    """
    Advance ``clock`` by ``seconds``, stopping at each timer that falls due on the way.

    ``clock.advance(seconds)`` moves in one jump and runs every timer due by the new time *at*
    the new time. ``step`` runs each timer at its own time instead, in the order
    ``clock.advance`` would (by time, then in the order they were scheduled), and also runs the
    timers that those timers schedule, as long as they fall due within the window: a timer
    scheduled for the current time (``callLater(0, ...)``) runs before the clock moves on. When
    it returns, the clock is exactly ``seconds`` later than it was.

    An exception raised by a timer propagates, as it does from ``clock.advance``; the clock is
    then left at that timer's time.

    Args:
        clock: The :class:`~twisted.internet.task.Clock` to move.
        seconds: How far to move it, a finite number, 0 or more. With 0, the timers due now
            run.
        max_timers: The most timers to run; more means a busy loop, such as a timer that
            schedules itself again with no delay.

    Returns:
        How many timers ran.

    Raises:
        TypeError: ``seconds`` is not a number.
        ValueError: ``seconds`` is negative, infinite or NaN, or the clock would go past the
            largest float.
        RuntimeError: More than ``max_timers`` timers fell due within the window; the clock is
            left at the time of the last one that ran.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, Real):
        raise TypeError(f"step() takes a number of seconds, not {seconds!r}")
    if max_timers < 0:
        raise ValueError(f"max_timers must be 0 or more, not {max_timers!r}")
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"step() moves the clock forward by a finite time, not {seconds!r}")
    end = clock.seconds() + seconds
    if not math.isfinite(end):
        raise ValueError(f"the clock cannot move {seconds!r} s past {clock.seconds()!r}")
    ran = 0
    while True:
        # Clock keeps its pending calls in the list ``calls`` (what getDelayedCalls returns),
        # in the order advance() runs them once sorted; a cancelled call leaves it. The first
        # of the earliest is the one advance() would run next.
        if not clock.calls:
            break
        call = min(clock.calls, key=lambda c: c.getTime())
        due = call.getTime()
        if due > end:
            break
        if ran >= max_timers:
            raise RuntimeError(
                f"step() ran {ran} timers and more are due by {end!r} (now {clock.seconds()!r}):"
                " a busy loop? A timer may keep scheduling another with no delay."
            )
        # Run this one call, as Clock.advance() does, and no other: a timer that schedules
        # another for the same time must not keep us inside advance() forever.
        clock.rightNow = max(clock.rightNow, due)
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)
        ran += 1
    clock.rightNow = max(clock.rightNow, end)
    return ran
