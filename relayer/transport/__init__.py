"""
Transports: how a transaction is sent to a target.

:class:`ITransport` is the interface; :class:`HTTPTransport` is the default, which speaks the
Matrix application-service API (``PUT .../_matrix/app/v1/transactions/{txn_id}``).
"""

from relayer.transport.base import (
    ITransport,
    OutcomeKind,
    SendOutcome,
    classify_status,
    matrix_body,
    parse_retry_after,
)
from relayer.transport.http import HTTPSendError, HTTPTransport

__all__ = [
    "HTTPSendError",
    "HTTPTransport",
    "ITransport",
    "OutcomeKind",
    "SendOutcome",
    "classify_status",
    "matrix_body",
    "parse_retry_after",
]
