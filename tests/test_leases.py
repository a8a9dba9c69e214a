"""Several schedulers on one database: leases, fair shares, takeover and fencing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock

from relayer import BackoffPolicy, ConfigurationError, Scheduler, TargetState
from relayer.lease import LeaseSettings
from relayer.testing import FakeTransport, open_store, release_process_lock, target

TIMEOUT = 10.0
INTERVAL = 2.5


@attrs.define
class Node:
    name: str
    clock: Clock
    scheduler: Scheduler
    alive: bool = True

    @property
    def owned(self) -> frozenset[str]:
        return self.scheduler.owned_targets

    def status(self) -> dict[str, Any]:
        d = self.scheduler.status()
        assert d.called
        return {s.target_id: s for s in d.result}


@attrs.define
class Cluster:
    path: Path | str
    transport: FakeTransport
    target_ids: list[str]
    nodes: list[Node] = attrs.Factory(list)
    now: float = 0.0

    def start(self, name: str, **settings: Any) -> Node:
        clock = Clock()
        clock.advance(self.now)
        store = open_store(clock, self.path)
        configs = [
            target(
                t, request_timeout=1.0, backoff=BackoffPolicy(initial=1.0, maximum=4.0, jitter=0)
            )
            for t in self.target_ids
        ]
        scheduler = Scheduler(
            clock,
            store,
            self.transport,
            configs,
            random=lambda: 0.0,
            leases=LeaseSettings(
                node_id=name, timeout=TIMEOUT, renew_interval=INTERVAL, **settings
            ),
        )
        assert scheduler.start().called
        node = Node(name, clock, scheduler)
        self.nodes.append(node)
        return node

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """Advance every live node's clock together."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for node in self.nodes:
                if node.alive:
                    node.clock.advance(self.now - node.clock.seconds())

    def kill(self, node: Node) -> None:
        """The node's process dies: its clock stops, its requests in flight are dropped."""
        node.alive = False
        release_process_lock(node.scheduler)
        for t in self.target_ids:
            if t in node.owned:
                self.transport[t].drop()


@pytest.fixture
def cluster(db_path: Path) -> Cluster:
    ids = [f"t{n:02d}" for n in range(12)]
    return Cluster(db_path, FakeTransport(), ids)


def test_one_node_owns_every_target(cluster: Cluster) -> None:
    a = cluster.start("a")
    assert a.owned == frozenset(cluster.target_ids)
    assert a.scheduler.node_id == "a"


def test_targets_are_shared_fairly_and_never_twice(cluster: Cluster) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    c = cluster.start("c")
    cluster.advance(3 * INTERVAL)
    owned = [n.owned for n in (a, b, c)]
    assert [len(o) for o in owned] == [4, 4, 4]
    assert frozenset().union(*owned) == frozenset(cluster.target_ids)
    assert sum(len(o) for o in owned) == len(cluster.target_ids)


def test_submits_from_any_node_are_delivered_once_in_order(cluster: Cluster) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    cluster.advance(3 * INTERVAL)
    for n in range(10):
        sender = a if n % 2 else b
        sender.scheduler.submit_many([(t, {"n": n}) for t in cluster.target_ids])
        # Without LISTEN/NOTIFY (SQLite), the owner learns of another node's events when it is
        # told; PostgreSQL wakes it through NOTIFY.
        for node in (a, b):
            node.scheduler._notified(None)
    for t in cluster.target_ids:
        fake = cluster.transport[t]
        assert fake.events == [{"n": n} for n in range(10)]
        assert fake.violations == []
        assert fake.max_in_flight == 1


def test_a_dead_nodes_targets_are_taken_over_with_their_state(cluster: Cluster) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    cluster.advance(3 * INTERVAL)
    a_targets = sorted(a.owned)
    down = a_targets[0]
    cluster.transport[down].down()
    a.scheduler.submit_many([(t, {"n": 1}) for t in a_targets])
    assert a.status()[down].state is TargetState.DOWN
    failures = a.status()[down].consecutive_failures
    for t in a_targets[1:]:
        cluster.transport[t].hold()
    a.scheduler.submit_many([(t, {"n": 2}) for t in a_targets[1:]])
    died_at = cluster.now
    cluster.kill(a)
    for t in a_targets[1:]:
        cluster.transport[t].up()
    # Not before the lease expires...
    cluster.advance(TIMEOUT - 0.5)
    assert not (b.owned & set(a_targets))
    # ...but as soon as it has.
    cluster.advance(1.0)
    assert b.owned == frozenset(cluster.target_ids)
    takeover = cluster.now - died_at
    assert takeover <= TIMEOUT + 0.5
    # The DOWN target's backoff came along.
    st = b.status()[down]
    assert st.state is TargetState.DOWN
    assert st.consecutive_failures >= failures
    cluster.transport[down].up()
    cluster.advance(10)
    for t in a_targets:
        assert cluster.transport[t].events[-1] == {"n": 2} or t == down
        assert cluster.transport[t].violations == []
    assert cluster.transport[down].events == [{"n": 1}]


def test_a_node_whose_lease_expired_stops_sending(cluster: Cluster) -> None:
    a = cluster.start("a")
    t = cluster.target_ids[0]
    # a cannot renew (its store fails), so its leases run out.
    store = a.scheduler._store
    failing = Exception("database unreachable")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise failing

    store.lease_round = broken  # type: ignore[method-assign]
    cluster.advance(TIMEOUT - 1.0)  # less than request_timeout left: no new sends
    a.scheduler.submit(t, {"n": 1})
    assert cluster.transport[t].requests == []
    cluster.advance(1.5)
    assert t not in a.owned
    # Another node takes over once the lease has expired, and delivers.
    b = cluster.start("b")
    cluster.advance(2.0)
    assert t in b.owned
    b.scheduler._notified(None)
    assert cluster.transport[t].events == [{"n": 1}]


def test_stop_hands_targets_over_at_once(cluster: Cluster) -> None:
    a = cluster.start("a")
    b = cluster.start("b")
    cluster.advance(3 * INTERVAL)
    assert len(b.owned) == 6
    a.scheduler.stop()
    cluster.nodes.remove(a)
    cluster.advance(INTERVAL)
    assert b.owned == frozenset(cluster.target_ids)


def test_lease_timeout_must_outlast_requests(db_path: Path) -> None:
    clock = Clock()
    store = open_store(clock, db_path)
    scheduler = Scheduler(
        clock,
        store,
        FakeTransport(),
        [target("t", request_timeout=30.0)],
        leases=LeaseSettings(node_id="a", timeout=20.0),
    )
    failures: list[Any] = []
    scheduler.start().addErrback(failures.append)
    assert failures and failures[0].check(ConfigurationError)
    assert "request_timeout" in failures[0].getErrorMessage()


def test_a_process_with_no_targets_takes_no_share(db_path: Path) -> None:
    """A process that only submits (it registers no target) must not halve the others' share."""
    clock = Clock()
    transport = FakeTransport(clock)
    ids = [f"t{i}" for i in range(4)]

    def node(name: str, targets: list[str]) -> Scheduler:
        scheduler = Scheduler(
            clock,
            open_store(clock, db_path),
            transport,
            [target(t, request_timeout=1.0) for t in targets],
            random=lambda: 0.0,
            leases=LeaseSettings(node_id=name, timeout=TIMEOUT, renew_interval=INTERVAL),
        )
        assert scheduler.start().called
        return scheduler

    a = node("a", ids)
    submitter = node("submitter", [])
    for _ in range(40):
        clock.advance(0.25)
    assert a.owned_targets == frozenset(ids)
    assert submitter.owned_targets == frozenset()
    a.submit_many([(t, {"n": 1}) for t in ids])
    assert all(transport[t].events == [{"n": 1}] for t in ids)
