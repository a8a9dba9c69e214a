"""The default HTTP transport's connection pool keeps connections for targets that share a host."""

from __future__ import annotations

from typing import Any

import pytest
from treq.client import HTTPClient
from twisted.internet.task import Clock
from twisted.web.client import Agent

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


@pytest.mark.parametrize("value", [-1, 0, 1.5, "10", True])
def test_a_bad_pool_size_is_refused(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_persistent_per_host must be an int >= 1"):
        HTTPTransport(Clock(), max_persistent_per_host=value)


def test_a_pool_size_with_a_client_of_ones_own_is_refused() -> None:
    client = HTTPClient(Agent(Clock()))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cannot be given with client"):
        HTTPTransport(Clock(), client=client, max_persistent_per_host=10)  # type: ignore[arg-type]
