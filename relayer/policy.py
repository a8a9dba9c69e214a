"""
Retry policies: what each failed attempt to send a transaction leads to.

After every failed attempt the controller asks the target's policy for a :class:`Decision`,
given a :class:`FailureInfo` (the failure's class, the transaction's attempts and age, the
target's consecutive failures and how long it has been failing), and does what it says:

============  =================================================================================
Action        What happens
============  =================================================================================
RETRY         The target is DOWN; the transaction is sent again after ``delay`` seconds.
SPLIT         The transaction is split in two and its first half sent (too large); a
              transaction of one event cannot be split, and is dead-lettered instead.
DEAD_LETTER   The transaction moves to the dead letters. After a permanent failure delivery goes
              on at once with the next transaction; after a transient one (a give-up rule) the
              target is DOWN, and the next transaction waits for the backoff.
BLOCK         The target is BLOCKED: nothing is sent until it is woken, and the transaction is
              sent again first.
DISABLE       The target is DISABLED: it keeps accepting and storing events, nothing is sent
              until it is woken, and the transaction is sent again first.
============  =================================================================================

Every decision is stored before it takes effect, so a restart goes on from it. A policy is a
plain object: :class:`RetryPolicy` covers backoff (exponential or a fixed schedule), what each
failure class does, and give-up rules; a policy of one's own provides :class:`IRetryPolicy`.
"""

from __future__ import annotations

import enum
import math
import types
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from zope.interface import Attribute, Interface, implementer

from relayer.config import (
    _MAX_SECONDS,
    Backoff,
    BackoffPolicy,
    DelaySchedule,
    FailurePolicy,
    _number,
    _to_policy,
)
from relayer.errors import ConfigurationError
from relayer.transport.base import FailureClass


class Action(enum.Enum):
    """What a failed attempt leads to; see :mod:`relayer.policy`."""

    RETRY = "retry"
    SPLIT = "split"
    DEAD_LETTER = "dead_letter"
    BLOCK = "block"
    DISABLE = "disable"


@attrs.frozen
class FailureInfo:
    """
    One failed attempt, as a policy sees it.

    Attributes:
        target_id: The target.
        txn_id: The transaction that failed.
        failure: The failure's class.
        reason: What the target answered, or why there was no answer.
        retry_after: The delay the target asked for (``Retry-After``), in seconds, or None.
        attempts: How many times the transaction has been sent, this attempt included.
        failures: The target's consecutive failed attempts, this one included.
        n_events: How many events the transaction holds.
        oldest_at: When the transaction's oldest event was submitted (clock seconds).
        down_since: When the target's current run of failures began (clock seconds): the time
            of this attempt if it is the first.
        now: The time of this attempt's outcome (clock seconds).
    """

    target_id: str
    txn_id: int
    failure: FailureClass
    reason: str
    retry_after: float | None
    attempts: int
    failures: int
    n_events: int
    oldest_at: float
    down_since: float
    now: float


@attrs.frozen
class Decision:
    """
    What a failed attempt leads to. Build one with its named constructors.

    Attributes:
        action: What to do.
        delay: For RETRY, the seconds until the next attempt (0.01 seconds to 7 days).
        reason: For a give-up, why; it is stored as the dead letter's reason or the target's
            last error, and shown by status.
    """

    action: Action
    delay: float | None = None
    reason: str = ""

    @classmethod
    def retry(cls, delay: float) -> Decision:
        """Retry after ``delay`` seconds."""
        return cls(Action.RETRY, delay)

    @classmethod
    def split(cls) -> Decision:
        """Split the transaction (it was too large)."""
        return cls(Action.SPLIT)

    @classmethod
    def dead_letter(cls, reason: str = "") -> Decision:
        """Move the transaction to the dead letters."""
        return cls(Action.DEAD_LETTER, reason=reason)

    @classmethod
    def block(cls, reason: str = "") -> Decision:
        """Block the target until it is woken."""
        return cls(Action.BLOCK, reason=reason)

    @classmethod
    def disable(cls, reason: str = "") -> Decision:
        """Disable the target until it is woken."""
        return cls(Action.DISABLE, reason=reason)


class IRetryPolicy(Interface):
    """
    Decides what a failed attempt leads to.

    A policy is called on the reactor thread, after every failed attempt, and must answer at
    once, without I/O. It must not keep state of its own between calls: what it needs is in the
    :class:`FailureInfo`, which the store restores after a restart. An exception, or an answer
    that is not a :class:`Decision`, is logged, and the attempt is retried after
    :meth:`backoff_delay`; a RETRY's delay is kept within 0.01 seconds and 7 days.
    """

    name = Attribute("A short name for logs, such as 'exponential'.")

    def decide(failure: FailureInfo, random: Callable[[], float]) -> Decision:
        """
        Decide what the failed attempt leads to.

        Args:
            failure: The attempt.
            random: The scheduler's jitter source, returning floats in ``[0, 1)``.
        """

    def backoff_delay(failures: int, random: Callable[[], float]) -> float:
        """
        The delay, in seconds, before the next attempt after ``failures`` consecutive failures.

        It is also used where no decision gives a delay: the next transaction's wait after a
        transaction was given up on (dead-lettered after a transient failure), a retry after
        :meth:`decide` failed, a retry that found nothing to send, and the spread of overdue
        retries after a restart.
        """


def _to_action(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return Action(value)
        except ValueError:
            pass
    return value


def _check_then(instance: Any, attribute: Any, value: Any) -> None:
    if value not in (Action.DEAD_LETTER, Action.DISABLE):
        raise ConfigurationError(
            f"a give-up rule's then must be 'dead_letter' or 'disable', not {value!r}"
        )


def _check_limit_attempts(instance: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ConfigurationError(
            f"a give-up rule's attempts must be from 1 to 1000000, not {value!r}"
        )


def _check_limit_age(instance: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    v = _number(ConfigurationError, "a give-up rule's age", value)
    if not 0 < v <= 100 * 366 * 86400.0:
        raise ConfigurationError(f"a give-up rule's age must be more than 0 seconds, not {v!r}")


@attrs.frozen
class GiveUp:
    """
    When to stop retrying: after a number of attempts, or an age, whichever comes first.

    With ``then="dead_letter"`` (the default) the rule is about the transaction: ``attempts``
    counts its attempts, and ``age`` is the time since its oldest event was submitted. The
    transaction is dead-lettered, and the target, which is still failing, waits for its backoff
    before it sends the next one.

    With ``then="disable"`` the rule is about the target: ``attempts`` counts its consecutive
    failed attempts, and ``age`` is the time since it began failing. The target is disabled:
    it keeps accepting and storing events, sends nothing, and resumes when woken.

    Example: dead-letter a transaction after 8 attempts, disable a target failing for 5 days::

        RetryPolicy(
            backoff=DelaySchedule((5, 300, 1800, 7200, 18000, 36000)),
            give_up=(GiveUp(attempts=8), GiveUp(age=5 * 86400, then="disable")),
        )

    Attributes:
        attempts: The number of attempts, or None.
        age: The age in seconds, or None.
        then: ``"dead_letter"`` or ``"disable"``.
    """

    attempts: int | None = attrs.field(default=None, validator=_check_limit_attempts)
    age: float | None = attrs.field(default=None, validator=_check_limit_age)
    then: Action = attrs.field(
        default=Action.DEAD_LETTER, converter=_to_action, validator=_check_then
    )

    def __attrs_post_init__(self) -> None:
        if self.attempts is None and self.age is None:
            raise ConfigurationError("a give-up rule needs attempts, an age, or both")

    def reached(self, failure: FailureInfo) -> str | None:
        """Why the rule applies to this failed attempt, or None if it does not."""
        if self.then is Action.DEAD_LETTER:
            count, since, what = failure.attempts, failure.oldest_at, "attempts"
        else:
            count, since, what = failure.failures, failure.down_since, "consecutive failures"
        if self.attempts is not None and count >= self.attempts:
            return f"gave up after {count} {what}"
        if self.age is not None and failure.now - since >= self.age:
            if self.then is Action.DEAD_LETTER:
                return f"gave up on events older than {self.age:g}s"
            return f"gave up after failing for {failure.now - since:.0f}s"
        return None


def _check_policy_backoff(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, (BackoffPolicy, DelaySchedule)):
        raise ConfigurationError(
            f"backoff must be a BackoffPolicy or a DelaySchedule, not {type(value).__name__}"
        )


def _check_permanent(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, FailurePolicy):
        raise ConfigurationError(
            f"on_permanent must be a FailurePolicy, 'dead_letter' or 'block', not {value!r}"
        )


def _to_rules(value: Any) -> Any:
    if isinstance(value, GiveUp):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def _check_rules(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(r, GiveUp) for r in value):
        raise ConfigurationError(f"give_up must be GiveUp rules, not {value!r}")


def _to_actions(value: Any) -> Any:
    if isinstance(value, Mapping):
        converted = {}
        for key, action in value.items():
            if isinstance(key, str):
                try:
                    key = FailureClass(key)
                except ValueError:
                    pass
            converted[key] = _to_action(action)
        return types.MappingProxyType(converted)
    return value


def _check_actions(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"actions must be a mapping, not {type(value).__name__}")
    for key, action in value.items():
        if not isinstance(key, FailureClass):
            choices = ", ".join(c.value for c in FailureClass)
            raise ConfigurationError(f"actions: {key!r} is not a failure class ({choices})")
        if not isinstance(action, Action):
            raise ConfigurationError(f"actions: {action!r} is not an Action")


@implementer(IRetryPolicy)
@attrs.frozen
class RetryPolicy:
    """
    The built-in retry policy.

    A failure leads to what ``actions`` says for its class, else to:

    - TOO_LARGE: SPLIT, for a transaction of several events; else as a permanent failure;
    - REJECTED and PERMANENT: what ``on_permanent`` says (a dead letter, by default);
    - every other class: RETRY, after ``backoff`` (or after ``Retry-After``, within the
      backoff's shortest and longest delays).

    A RETRY then meets the ``give_up`` rules, in order: the first that applies dead-letters the
    transaction or disables the target instead.

    Attributes:
        backoff: The delays between retries: exponential (:class:`relayer.BackoffPolicy`) or
            a fixed schedule (:class:`relayer.DelaySchedule`).
        on_permanent: What a permanent failure does: dead-letter the transaction, or block the
            target (a :class:`relayer.FailurePolicy`).
        give_up: :class:`GiveUp` rules; none by default (retry for ever, as Synapse does).
        actions: What a failure class leads to, for the classes whose default is not wanted:
            for example ``{FailureClass.NOT_FOUND: Action.DISABLE}``.
    """

    backoff: Backoff = attrs.field(factory=BackoffPolicy, validator=_check_policy_backoff)
    on_permanent: FailurePolicy = attrs.field(
        default=FailurePolicy.DEAD_LETTER, converter=_to_policy, validator=_check_permanent
    )
    give_up: tuple[GiveUp, ...] = attrs.field(
        default=(), converter=_to_rules, validator=_check_rules
    )
    actions: Mapping[FailureClass, Action] = attrs.field(
        factory=dict, converter=_to_actions, validator=_check_actions, hash=False
    )

    @property
    def name(self) -> str:
        """``exponential`` or ``schedule``, after the backoff."""
        return "schedule" if isinstance(self.backoff, DelaySchedule) else "exponential"

    def backoff_delay(self, failures: int, random: Callable[[], float]) -> float:
        """See :meth:`IRetryPolicy.backoff_delay`."""
        return self.backoff.delay(max(1, failures), random)

    def decide(self, failure: FailureInfo, random: Callable[[], float]) -> Decision:
        """See :meth:`IRetryPolicy.decide`."""
        action = self.actions.get(failure.failure)
        if action is None:
            action = self._default_action(failure)
        if action is Action.SPLIT and failure.n_events < 2:
            action = self._permanent()
        if action is Action.RETRY:
            for rule in self.give_up:
                why = rule.reached(failure)
                if why is not None:
                    return Decision(rule.then, reason=why)
            return Decision.retry(self._delay(failure, random))
        return Decision(action)

    def _default_action(self, failure: FailureInfo) -> Action:
        if failure.failure is FailureClass.TOO_LARGE:
            return Action.SPLIT
        if failure.failure in (FailureClass.REJECTED, FailureClass.PERMANENT):
            return self._permanent()
        return Action.RETRY

    def _permanent(self) -> Action:
        return Action.BLOCK if self.on_permanent is FailurePolicy.BLOCK else Action.DEAD_LETTER

    def _delay(self, failure: FailureInfo, random: Callable[[], float]) -> float:
        if failure.retry_after is not None:
            # At least the shortest delay, so that Retry-After: 0 cannot make a busy loop.
            return min(max(failure.retry_after, self.backoff.initial), self.backoff.maximum)
        return self.backoff.delay(max(1, failure.failures), random)


def checked_decision(decision: Any) -> Decision | None:
    """The decision if it is a valid one; None if it is not (it is then logged and ignored)."""
    if not isinstance(decision, Decision) or not isinstance(decision.action, Action):
        return None
    if decision.action is Action.RETRY:
        delay = decision.delay
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            return None
        if not math.isfinite(delay):
            return None
        return attrs.evolve(decision, delay=min(max(float(delay), MIN_RETRY_DELAY), _MAX_SECONDS))
    return decision


#: The shortest delay of a retry: a policy or a schedule that answers 0 (or a target that
#: answers ``Retry-After: 0`` under a schedule that starts at 0) must not make a busy loop.
MIN_RETRY_DELAY = 0.01


__all__ = [
    "Action",
    "Decision",
    "FailureInfo",
    "GiveUp",
    "IRetryPolicy",
    "RetryPolicy",
]
