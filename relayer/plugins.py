"""
Plugins: wire formats and retry policies from other distributions.
"""

from __future__ import annotations

from relayer.errors import InvalidTarget
from relayer.policy import IRetryPolicy


def retry_policy(name: str) -> IRetryPolicy:
    """
    The retry policy that a plugin provides under ``name``.

    Raises:
        InvalidTarget: No plugin provides one by that name.
    """
    raise InvalidTarget(f"unknown retry policy {name!r}: no policy of that name was given")
