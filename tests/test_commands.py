"""
Operators' commands recorded in the store, for the process that delivers to a target.

A wake for a target that another process delivers to (or that none does for now) is a row of
``relayer_commands``: its owner applies it at its next sweep, or at once on PostgreSQL, where
the store notifies it; a command recorded while no process runs is applied at the next start.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from _support import database_engine, result_of
from twisted.internet.task import Clock, deferLater

from relayer import BackoffPolicy, Command, Scheduler, TargetState
from relayer.errors import ConfigurationError, UnknownTarget
from relayer.lease import LeaseSettings
from relayer.store import schema
from relayer.testing import FakeTransport, open_store, target

SWEEP = 5.0
LEASES = {"timeout": 10.0, "renew_interval": 2.5}


def make(
    db_path: Path | str,
    targets: list[str],
    *,
    clock: Clock | None = None,
    transport: FakeTransport | None = None,
    node: str | None = None,
    sweep: float = SWEEP,
) -> tuple[Scheduler, FakeTransport, Clock]:
    clock = clock if clock is not None else Clock()
    transport = transport if transport is not None else FakeTransport(clock)
    # A backoff of an hour: only a wake retries the target within a test.
    configs = [
        target(t, request_timeout=1.0, backoff=BackoffPolicy.constant(3600.0)) for t in targets
    ]
    leases = LeaseSettings(node_id=node, **LEASES) if node is not None else None  # type: ignore[arg-type]
    scheduler = Scheduler(
        clock,
        open_store(clock, db_path),
        transport,
        configs,
        random=lambda: 0.0,
        sweep_interval=sweep,
        leases=leases,
    )
    return scheduler, transport, clock


def down_with_one_event(scheduler: Scheduler, transport: FakeTransport, t: str) -> None:
    transport[t].down()
    result_of(scheduler.submit(t, {"n": 1}))
    assert result_of(scheduler.status())[0].state is TargetState.DOWN
    transport[t].up()


def test_a_command_from_another_process_is_applied_at_the_next_sweep(
    db_path: Path | str,
) -> None:
    scheduler, transport, clock = make(db_path, ["t"])
    assert scheduler.start().called
    down_with_one_event(scheduler, transport, "t")
    # The command line's store: another connection to the database, on the wall clock.
    other = open_store(Clock(), db_path)
    command_id = result_of(other.add_command("t", "wake", 1000.0))
    assert result_of(other.command(command_id)) == Command(command_id, "t", "wake", None, 1000.0)
    assert transport["t"].events == []
    # The first sweep comes at a random point of the first interval, then one each interval.
    clock.advance(SWEEP * 1.01)
    assert transport["t"].events == [{"n": 1}]
    done = result_of(other.command(command_id))
    assert done.done and done.done_by == "local" and done.result == "woken"
    assert done.done_at == clock.seconds()
    assert result_of(other.pending_commands(10)) == []
    result_of(other.close())
    result_of(scheduler.stop())


def test_a_command_recorded_while_no_scheduler_runs_is_applied_at_start(
    db_path: Path | str,
) -> None:
    first, transport, clock = make(db_path, ["t"])
    assert first.start().called
    down_with_one_event(first, transport, "t")
    result_of(first.stop())
    other = open_store(Clock(), db_path)
    command_id = result_of(other.add_command("t", "wake", 1000.0))
    # The owner's restart: its stored retry is an hour away, but the wake waits for it.
    again, transport, clock = make(db_path, ["t"], clock=clock, transport=transport)
    assert again.start().called
    assert transport["t"].events == [{"n": 1}]
    assert result_of(other.command(command_id)).result == "woken"
    result_of(other.close())
    result_of(again.stop())


def test_wake_records_a_command_for_the_process_that_owns_the_target(
    db_path: Path | str,
) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    a, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="a")
    started = [a.start()]
    b, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="b")
    started.append(b.start())
    for d in started:
        result_of(d)
    owner, other = (a, b) if "t" in a.owned_targets else (b, a)
    assert "t" not in other.owned_targets
    down_with_one_event(owner, transport, "t")
    command_id = result_of(other.wake("t"))
    assert isinstance(command_id, int)
    assert not result_of(other.command(command_id)).done
    clock.advance(SWEEP * 1.01)
    assert transport["t"].events == [{"n": 1}]
    done = result_of(owner.command(command_id))
    assert done.done_by == owner.node_id and done.result == "woken"
    # Woken where it is delivered, a wake is no command.
    assert result_of(owner.wake("t")) is None
    result_of(a.stop())
    result_of(b.stop())


def test_a_process_that_takes_a_target_over_applies_its_commands_at_once(
    db_path: Path | str,
) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    # No sweep within the test: only the takeover can bring the command.
    a, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="a", sweep=3600.0)
    result_of(a.start())
    assert "t" in a.owned_targets
    b, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="b", sweep=3600.0)
    result_of(b.start())
    down_with_one_event(a, transport, "t")
    result_of(a.stop())
    command_id = result_of(b.wake("t"))
    assert isinstance(command_id, int)
    clock.advance(LEASES["renew_interval"] * 1.01)
    assert "t" in b.owned_targets
    assert transport["t"].events == [{"n": 1}]
    assert result_of(b.command(command_id)).done_by == "b"
    result_of(b.stop())


def test_commands_for_targets_delivered_elsewhere_wait_for_their_owner(
    db_path: Path | str,
) -> None:
    scheduler, transport, clock = make(db_path, ["t"])
    assert scheduler.start().called
    other = open_store(Clock(), db_path)
    # "gone" is a target this scheduler does not register: its command stays pending.
    waiting = result_of(other.add_command("gone", "wake", 1.0))
    woken = result_of(other.add_command("t", "wake", 2.0))
    clock.advance(SWEEP * 1.01)
    assert [c.command_id for c in result_of(other.pending_commands(10))] == [waiting]
    assert result_of(other.command(woken)).done
    assert result_of(other.pending_commands(10, after=waiting)) == []
    result_of(other.close())
    result_of(scheduler.stop())


def test_applied_commands_are_forgotten_after_a_day(db_path: Path | str) -> None:
    scheduler, transport, clock = make(db_path, ["t"])
    assert scheduler.start().called
    other = open_store(Clock(), db_path)
    first = result_of(other.add_command("t", "wake", 0.0))
    clock.advance(SWEEP * 1.01)
    assert result_of(other.command(first)).done
    clock.advance(86400.0)
    second = result_of(other.add_command("t", "wake", 0.0))
    clock.advance(SWEEP * 1.01)
    assert result_of(other.command(second)).done
    assert result_of(other.command(first)) is None
    result_of(other.close())
    result_of(scheduler.stop())


def test_an_unknown_action_is_refused(db_path: Path | str) -> None:
    store = open_store(Clock(), db_path)
    result_of(store.open())
    with pytest.raises(ValueError, match="unknown command 'reboot'"):
        store.add_command("t", "reboot", 0.0)
    result_of(store.close())


def test_command_ids_are_checked(db_path: Path | str) -> None:
    scheduler, _, _ = make(db_path, ["t"])
    assert scheduler.start().called
    for bad in (0, -1, True, "1", 2**63):
        with pytest.raises(ConfigurationError, match="command_id must be"):
            scheduler.command(bad)  # type: ignore[arg-type]
    assert result_of(scheduler.command(12345)) is None
    result_of(scheduler.stop())


def test_replay_of_one_dead_letter_leaves_the_others(db_path: Path | str) -> None:
    scheduler, transport, clock = make(db_path, ["t"])
    assert scheduler.start().called
    transport["t"].fail_with(400)
    for n in range(3):
        result_of(scheduler.submit("t", {"n": n}))
    dead = result_of(scheduler.dead_letters("t"))
    assert len(dead) == 3
    transport["t"].up()
    assert result_of(scheduler.replay("t", dead[1].txn_id)) == 1
    assert transport["t"].events == [{"n": 1}]
    assert [d.txn_id for d in result_of(scheduler.dead_letters("t"))] == [
        dead[0].txn_id,
        dead[2].txn_id,
    ]
    # Not a dead letter (any more): nothing is queued.
    assert result_of(scheduler.replay("t", dead[1].txn_id)) == 0
    assert result_of(scheduler.replay("t", 999)) == 0
    with pytest.raises(ConfigurationError, match="txn_id must be"):
        scheduler.replay("t", 0)
    assert result_of(scheduler.replay("t")) == 2
    assert transport["t"].events == [{"n": 1}, {"n": 0}, {"n": 2}]
    result_of(scheduler.stop())


def test_an_upgrade_from_version_6_adds_the_commands_table(db_path: Path | str) -> None:
    engine = database_engine(db_path)
    try:
        with engine.begin() as conn:
            schema.upgrade(conn, to_version=6)
        scheduler, transport, clock = make(db_path, ["t"])
        assert scheduler.start().called
        with engine.connect() as conn:
            assert schema.read_version(conn) == schema.SCHEMA_VERSION == 7
        command_id = result_of(open_store(Clock(), db_path).add_command("t", "wake", 0.0))
        clock.advance(SWEEP * 1.01)
        assert result_of(scheduler.command(command_id)).done
        result_of(scheduler.stop())
    finally:
        engine.dispose()


@pytest.mark.postgres_only
@pytest_twisted.ensureDeferred
async def test_on_postgresql_the_owner_applies_a_command_at_once(db_path: str) -> None:
    from twisted.internet import reactor

    from relayer.store.postgres import PostgresStore

    transport = FakeTransport(reactor)
    scheduler = Scheduler(
        reactor,
        PostgresStore.open_url(reactor, db_path, pool_size=2),
        transport,
        [target("t", backoff=BackoffPolicy.constant(3600.0))],
        # No sweep within the test: only the notification can bring the command.
        sweep_interval=3600.0,
    )
    await scheduler.start()
    other: Any = PostgresStore.open_url(reactor, db_path, pool_size=1)
    await other.open()
    try:
        transport["t"].down()
        await scheduler.submit("t", {"n": 1})
        transport["t"].up()
        command_id = await other.add_command("t", "wake", time.time())
        deadline = time.monotonic() + 30
        while transport["t"].events != [{"n": 1}]:
            assert time.monotonic() < deadline, "the command was not applied"
            await deferLater(reactor, 0.05, lambda: None)
        while not (await other.command(command_id)).done:
            assert time.monotonic() < deadline, "the command was not marked done"
            await deferLater(reactor, 0.05, lambda: None)
    finally:
        await other.close()
        await scheduler.stop()


def _expire_leases_of(scheduler: Scheduler, clock: Clock) -> None:
    """Make the scheduler's lease renewals fail until its leases have run out."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise Exception("database unreachable")

    scheduler._store.lease_round = broken  # type: ignore[attr-defined]
    clock.advance(LEASES["timeout"] * 1.01)


def test_a_process_whose_lease_ran_out_records_a_wake_for_the_new_owner(
    db_path: Path | str,
) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    a, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="a", sweep=3600.0)
    result_of(a.start())
    assert "t" in a.owned_targets
    down_with_one_event(a, transport, "t")
    _expire_leases_of(a, clock)
    assert "t" not in a.owned_targets
    b, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="b", sweep=3600.0)
    result_of(b.start())
    assert "t" in b.owned_targets
    # a may no longer send to t: woken there, the wake would be lost.
    command_id = result_of(a.wake("t"))
    assert isinstance(command_id, int)
    result_of(b.stop())
    result_of(a.stop())


def test_a_process_whose_lease_ran_out_leaves_the_commands_to_the_new_owner(
    db_path: Path | str,
) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    a, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="a", sweep=SWEEP)
    result_of(a.start())
    down_with_one_event(a, transport, "t")
    _expire_leases_of(a, clock)
    b, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="b", sweep=10 * SWEEP)
    result_of(b.start())
    assert "t" in b.owned_targets and "t" not in a.owned_targets
    other = open_store(Clock(), db_path)
    command_id = result_of(other.add_command("t", "wake", 0.0))
    # a sweeps first: the command is not its own to apply.
    clock.advance(SWEEP * 1.01)
    assert not result_of(other.command(command_id)).done
    clock.advance(10 * SWEEP * 1.01)
    done = result_of(other.command(command_id))
    assert done.done and done.done_by == "b"
    assert transport["t"].events == [{"n": 1}]
    result_of(other.close())
    result_of(b.stop())
    result_of(a.stop())


def test_a_target_only_another_process_registers_is_woken_through_a_command(
    db_path: Path | str,
) -> None:
    clock = Clock()
    transport = FakeTransport(clock)
    owner, _, _ = make(db_path, ["t"], clock=clock, transport=transport, node="a")
    result_of(owner.start())
    # This process registers another target only: "t" is known to it through the store.
    other, _, _ = make(db_path, ["u"], clock=clock, transport=transport, node="b")
    result_of(other.start())
    down_with_one_event(owner, transport, "t")
    command_id = result_of(other.wake("t"))
    assert isinstance(command_id, int)
    clock.advance(SWEEP * 1.01)
    assert transport["t"].events == [{"n": 1}]
    assert result_of(other.command(command_id)).done_by == "a"
    # A target that no process registered is unknown; an id no target can have is refused
    # at the call.
    failures: list[Any] = []
    other.wake("nobody").addErrback(failures.append)
    assert failures and failures[0].check(UnknownTarget)
    with pytest.raises(UnknownTarget):
        other.wake("")
    result_of(owner.stop())
    result_of(other.stop())
