"""The default HTTP transport's connection pool keeps connections for targets that share a host."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from relayer import ConfigurationError, HTTPTransport
from relayer.transport.http import DEFAULT_PERSISTENT_PER_HOST


def test_the_default_pool_keeps_connections_for_many_targets_per_host() -> None:
    transport = HTTPTransport(Clock())  # type: ignore[arg-type]
    assert transport._pool is not None
    assert transport._pool.persistent
    assert transport._pool.maxPersistentPerHost == DEFAULT_PERSISTENT_PER_HOST == 100


def test_the_pool_size_per_host_can_be_set() -> None:
    transport = HTTPTransport(Clock(), max_persistent_per_host=10_000)  # type: ignore[arg-type]
    assert transport._pool is not None
    assert transport._pool.maxPersistentPerHost == 10_000


@pytest.mark.parametrize("value", [-1, 1.5, "10", True, None])
def test_a_bad_pool_size_is_refused(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_persistent_per_host"):
        HTTPTransport(Clock(), max_persistent_per_host=value)  # type: ignore[arg-type]
