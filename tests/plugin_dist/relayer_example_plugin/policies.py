"""A retry policy: a retry every 7 seconds, and the target disabled at its third failure."""

from __future__ import annotations

from collections.abc import Callable

from zope.interface import implementer

from relayer import Decision, FailureInfo, IRetryPolicy


@implementer(IRetryPolicy)
class PatientPolicy:
    name = "patient"

    def decide(self, failure: FailureInfo, random: Callable[[], float]) -> Decision:
        if failure.failures >= 3:
            return Decision.disable(f"patient: {failure.failures} failures in a row")
        return Decision.retry(self.backoff_delay(failure.failures, random))

    def backoff_delay(self, failures: int, random: Callable[[], float]) -> float:
        return 7.0


#: Not a policy: its entry point is refused.
NOT_A_POLICY = object()
