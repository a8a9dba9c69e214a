"""
Transports: how a transaction is sent to a target.

:class:`ITransport` and :class:`IRequestTransport` are the interfaces; :class:`HTTPTransport` is
the default, which sends the requests of every wire format (:mod:`relayer.formats`), the Matrix
application-service API (``PUT .../_matrix/app/v1/transactions/{txn_id}``) by default.
"""

from relayer.transport.base import (
    IRequestTransport,
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
    "IRequestTransport",
    "ITransport",
    "OutcomeKind",
    "SendOutcome",
    "classify_status",
    "matrix_body",
    "parse_retry_after",
]
