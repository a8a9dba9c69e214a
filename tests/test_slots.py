"""Send slots: the bound on sends in flight, first attempts before retries, no starvation."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred

from relayer import _slots
from relayer._slots import RETRY_TURN, SendClass, SendSlots

FIRST, RETRY = SendClass.FIRST, SendClass.RETRY


class Granted:
    """Records the order in which waiters get their slot."""

    def __init__(self, slots: SendSlots) -> None:
        self.slots = slots
        self.order: list[str] = []
        self.failures: list[Any] = []

    def ask(self, name: str, kind: SendClass) -> Deferred[None]:
        d = self.slots.acquire(kind)
        d.addCallbacks(lambda _: self.order.append(name), self.failures.append)
        return d


def test_no_more_than_the_limit_are_granted_and_a_release_hands_the_slot_on() -> None:
    slots = SendSlots(3)
    g = Granted(slots)
    for i in range(5):
        g.ask(f"s{i}", FIRST)
    assert g.order == ["s0", "s1", "s2"]
    assert (slots.status().in_flight, slots.status().waiting) == (3, 2)
    slots.release(FIRST)
    assert g.order == ["s0", "s1", "s2", "s3"]
    assert slots.status().in_flight == 3


def test_a_waiting_first_attempt_goes_before_a_retry_that_waited_longer() -> None:
    slots = SendSlots(2)
    g = Granted(slots)
    g.ask("busy1", FIRST)
    g.ask("busy2", FIRST)
    g.ask("retry", RETRY)
    g.ask("first", FIRST)
    slots.release(FIRST)
    assert g.order[2:] == ["first"]
    slots.release(FIRST)
    assert g.order[2:] == ["first", "retry"]


def test_retries_hold_at_most_half_of_the_slots_even_when_more_are_free() -> None:
    slots = SendSlots(4)
    g = Granted(slots)
    for i in range(4):
        g.ask(f"r{i}", RETRY)
    assert g.order == ["r0", "r1"]
    assert slots.status().retries_waiting == 2
    # The other half is there for first attempts, at once.
    g.ask("f0", FIRST)
    g.ask("f1", FIRST)
    assert g.order == ["r0", "r1", "f0", "f1"]
    slots.release(RETRY)
    assert g.order[-1] == "r2"


def test_a_limit_of_one_still_lets_a_retry_go() -> None:
    slots = SendSlots(1)
    g = Granted(slots)
    g.ask("r", RETRY)
    assert g.order == ["r"]


def test_a_retry_is_not_starved_by_first_attempts_that_keep_coming() -> None:
    slots = SendSlots(2)
    g = Granted(slots)
    g.ask("f-a", FIRST)
    g.ask("f-b", FIRST)
    g.ask("retry", RETRY)
    for i in range(3 * RETRY_TURN):
        # There is always a first attempt waiting when a slot comes free.
        g.ask(f"f{i}", FIRST)
        g.ask(f"f{i}'", FIRST)
        slots.release(FIRST)
        if "retry" in g.order:
            break
    assert "retry" in g.order
    # ... but only after first attempts had their turns.
    assert g.order.index("retry") == 2 + RETRY_TURN


def test_a_retry_at_its_share_does_not_count_as_passed_over() -> None:
    slots = SendSlots(2)
    g = Granted(slots)
    g.ask("r0", RETRY)  # retries hold their share: 1 of 2
    g.ask("f0", FIRST)
    g.ask("r1", RETRY)
    for i in range(RETRY_TURN + 2):
        g.ask(f"f{i + 1}", FIRST)
        slots.release(FIRST)
    assert "r1" not in g.order
    g.ask("f-last", FIRST)
    slots.release(RETRY)
    # Now it may go, but it has not been passed over yet: the first attempt goes first.
    assert g.order[-1] == "f-last"


def test_a_cancelled_waiter_is_withdrawn_and_holds_no_slot() -> None:
    slots = SendSlots(1)
    g = Granted(slots)
    g.ask("busy", FIRST)
    waiting = g.ask("gone", FIRST)
    g.ask("next", FIRST)
    waiting.cancel()
    assert g.failures and g.failures[0].check(CancelledError)
    assert slots.status().waiting == 1
    slots.release(FIRST)
    assert g.order == ["busy", "next"]
    assert slots.status().in_flight == 1


def test_cancel_all_withdraws_every_waiter() -> None:
    slots = SendSlots(1)
    g = Granted(slots)
    g.ask("busy", FIRST)
    g.ask("a", FIRST)
    g.ask("b", RETRY)
    slots.cancel_all()
    assert len(g.failures) == 2
    assert slots.status().waiting == 0
    slots.release(FIRST)
    assert g.order == ["busy"]
    assert slots.status().in_flight == 0


def test_a_waiter_that_releases_at_once_does_not_recurse() -> None:
    # Waiters that send and end at once (a transport that answers synchronously) hand their
    # slot on from a loop, not from inside each other's callbacks.
    slots = SendSlots(1)
    busy = slots.acquire(FIRST)
    assert busy.called
    done = []
    for i in range(5000):
        d = slots.acquire(FIRST)
        d.addCallback(lambda _, i=i: (done.append(i), slots.release(FIRST)))
    slots.release(FIRST)
    assert done == list(range(5000))
    assert slots.status().in_flight == 0


def test_without_a_limit_every_slot_is_granted_and_counted() -> None:
    slots = SendSlots(None)
    ds = [slots.acquire(RETRY) for _ in range(10)]
    assert all(d.called for d in ds)
    status = slots.status()
    assert (status.limit, status.in_flight, status.retries_in_flight) == (None, 10, 10)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_a_bad_limit_is_refused(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        SendSlots(bad)


def test_the_retry_share_is_half() -> None:
    assert _slots.RETRY_SHARE == 0.5
    assert SendSlots(1000).retry_limit == 500
    assert SendSlots(3).retry_limit == 1
