"""
A wire format: each event POSTed alone to the target's URL, with the event's id in a header,
and 410 Gone taken as a refusal for good.
"""

from __future__ import annotations

from zope.interface import implementer

from relayer import FailureClass, IWireFormat, OutcomeKind, SendOutcome, WireRequest
from relayer.config import TargetConfig
from relayer.errors import InvalidTarget
from relayer.store import Transaction
from relayer.transport import classify_status


@implementer(IWireFormat)
class ExampleJSON:
    name = "example-json"
    max_events = 1

    def check(self, target: TargetConfig) -> None:
        if not target.token:
            raise InvalidTarget(f"target {target.target_id!r} of example-json needs a token")

    def request(self, target: TargetConfig, txn: Transaction, now: float) -> WireRequest:
        return WireRequest(
            method="POST",
            url=target.base_url,
            headers=(
                ("Authorization", f"Bearer {target.token}"),
                ("Content-Type", "application/json"),
                ("X-Example-Event", txn.event_ids[0]),
                ("X-Example-Time", str(int(now))),
            ),
            body=txn.events[0],
            txn_id=txn.txn_id,
        )

    def classify(self, status: int, retry_after: str | None, now: float) -> SendOutcome:
        if status == 410:
            return SendOutcome(
                OutcomeKind.PERMANENT, "HTTP 410 (gone)", failure=FailureClass.REJECTED
            )
        return classify_status(status, retry_after, now)
