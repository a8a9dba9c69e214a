"""
Tests of the operator commands: ``relayer status``, ``wake``, ``replay``, ``discard``,
``dead-letters``, ``events`` and ``event``.

Most run each command in a process of its own, against a scheduler running in another
(``tests/live_node.py``) that delivers to receivers served here. The refusals, and the paging,
are checked in this process, on a database filled by a scheduler on a fake clock.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from _live import LiveNode, LiveNodes, Ran, Receivers, child_env, run_command, wait_for
from _support import reactor_, result_of, run_clock
from conftest import POSTGRES
from test_purge_cli import populate

from relayer import opscli
from relayer.cli import main
from relayer.dbcli import engine_for
from relayer.store import schema
from relayer.store.schema import SCHEMA_VERSION
from relayer.testing import Harness

# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def nodes() -> Iterator[LiveNodes]:
    """The live nodes of a test, killed at teardown if they are still running."""
    started = LiveNodes(reactor_())
    yield started
    started.kill_all()


@pytest_twisted.async_yield_fixture
async def receivers() -> AsyncIterator[Receivers]:
    """Receivers for the targets ``a`` and ``b``, stopped at teardown."""
    served = Receivers.listen(reactor_(), ["a", "b"], order_key="n")
    yield served
    await served.stop()


def relayer(database: Path | str, *args: str) -> Any:
    """Run ``relayer ARGS... --database DATABASE`` in a process of its own (a Deferred[Ran])."""
    return run_command(*args, "--database", str(database))


async def ok(database: Path | str, *args: str) -> str:
    """Run a command that must succeed; its stdout."""
    ran: Ran = await relayer(database, *args)
    assert ran.status == 0, f"relayer {' '.join(args)}: exit {ran.status}: {ran.err}"
    return ran.out


async def json_lines(database: Path | str, *args: str) -> list[Any]:
    """Run a command with ``--json``; the JSON lines it printed."""
    out = await ok(database, *args, "--json")
    return [json.loads(line) for line in out.splitlines()]


async def target_status(database: Path | str, target_id: str) -> dict[str, Any]:
    """``relayer status --target T --json``."""
    (line,) = await json_lines(database, "status", "--target", target_id)
    assert isinstance(line, dict)
    return line


async def wait_status(
    database: Path | str, target_id: str, what: str, accept: Any
) -> dict[str, Any]:
    """Run ``relayer status --target T --json`` until ``accept`` takes what it says."""
    found: dict[str, Any] = await wait_for(
        reactor_(), what, lambda: target_status(database, target_id), accept
    )
    return found


def row_of(out: str, target_id: str) -> dict[str, str]:
    """The row of a target in the table ``relayer status`` prints, by column."""
    lines = out.splitlines()
    header = lines[0]
    columns = opscli.STATUS_COLUMNS
    starts = [header.index(name) for name in columns]
    for line in lines[1:]:
        if line.split(" ", 1)[0] == target_id:
            ends = [*starts[1:], None]
            return {c: line[s:e].strip() for c, s, e in zip(columns, starts, ends, strict=True)}
    raise AssertionError(f"no row for {target_id} in:\n{out}")


async def dead_letter_count(database: Path | str, target_id: str, n: int) -> None:
    """Wait until the target has ``n`` dead letters."""
    await wait_status(
        database, target_id, f"{n} dead letters at {target_id}", lambda s: s["dead_letters"] == n
    )


# -- a live scheduler in another process ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_live_node_delivers_and_stops(
    db_path: Path | str, nodes: LiveNodes, receivers: Receivers
) -> None:
    node = await nodes.start(db_path, receivers)
    ids = await node.submit("a", 3)
    assert ids == ["a-0", "a-1", "a-2"]
    await receivers["a"].wait_for_events(3)
    assert receivers["a"].events == [{"target": "a", "n": k} for k in range(3)]
    assert await node.stop() == 0


@pytest_twisted.ensureDeferred
async def test_status_shows_a_down_target_and_its_recovery(
    db_path: Path | str, nodes: LiveNodes, receivers: Receivers
) -> None:
    receivers["a"].fail_with(503)
    node = await nodes.start(db_path, receivers)
    await node.submit("a", 2)
    await node.submit("b", 1)
    await receivers["b"].wait_for_events(1)
    down = await wait_status(db_path, "a", "a DOWN", lambda s: s["state"] == "down")
    assert down["pending_events"] == 2
    assert down["pending_transactions"] >= 1
    assert down["down_since"] is not None and down["down_for"] >= 0
    assert down["next_attempt_at"] is not None
    assert down["oldest_pending_at"] is not None and down["oldest_pending_age"] >= 0
    assert "503" in down["last_error"]
    assert down["dead_letters"] == 0

    out = await ok(db_path, "status")
    a, b = row_of(out, "a"), row_of(out, "b")
    assert a["STATE"] == "DOWN"
    assert a["EVENTS"] == "2"
    assert re.fullmatch(r"[0-9.dhms]+ ago", a["DOWN SINCE"]), a
    assert re.fullmatch(r"in [0-9.dhms]+|due", a["NEXT RETRY"]), a
    assert re.fullmatch(r"[0-9.dhms]+", a["OLDEST"]), a
    assert "503" in a["LAST ERROR"]
    assert b == {
        "TARGET": "b",
        "STATE": "UP",
        "EVENTS": "0",
        "TXNS": "0",
        "OLDEST": "-",
        "DOWN SINCE": "-",
        "NEXT RETRY": "-",
        "DEAD": "0",
        "LAST ERROR": "-",
    }
    assert out.splitlines()[-1] == "2 targets (1 UP, 1 DOWN), 2 pending events, 0 dead letters"

    # One target, and JSON lines for all.
    one = (await ok(db_path, "status", "--target", "a")).splitlines()
    assert len(one) == 2 and one[1].startswith("a ") and "DOWN" in one[1]
    assert [s["target"] for s in await json_lines(db_path, "status")] == ["a", "b"]

    receivers["a"].healthy()
    await receivers["a"].wait_for_events(2)
    up = await wait_status(db_path, "a", "a UP", lambda s: s["state"] == "up")
    assert up["pending_events"] == 0 and up["down_since"] is None
    assert await node.stop() == 0


@pytest_twisted.ensureDeferred
async def test_dead_letters_are_listed_replayed_and_discarded(
    db_path: Path | str, nodes: LiveNodes, receivers: Receivers
) -> None:
    receivers["a"].fail_with(400)
    node = await nodes.start(db_path, receivers, sweep_interval=SWEEP)
    for n in range(3):
        # One transaction each: the next is submitted once the one before is a dead letter.
        await node.submit("a", 1)
        await dead_letter_count(db_path, "a", n + 1)
    dead = await json_lines(db_path, "dead-letters", "a")
    assert [d["event_ids"] for d in dead] == [["a-0"], ["a-1"], ["a-2"]]
    assert all(d["reason"].startswith("HTTP 400") and d["attempts"] == 1 for d in dead)
    txn = {d["event_ids"][0]: d["txn_id"] for d in dead}
    lines = (await ok(db_path, "dead-letters", "a")).splitlines()
    assert lines[0].startswith(f"txn {txn['a-0']}: 1 event (a-0), 1 attempt, dead-lettered ")
    assert lines[0].endswith(" ago: " + dead[0]["reason"])
    assert lines[-1].startswith("a: 3 dead letters, 3 events")
    status = json.loads(await ok(db_path, "event", "a-1", "--json"))
    assert status["deliveries"]["a"]["state"] == "dead_lettered"
    assert status["deliveries"]["a"]["txn_id"] == txn["a-1"]

    # Replay one dead letter: the receiver gets it, and only it.
    receivers["a"].healthy()
    out = await ok(db_path, "replay", "a", "--txn", str(txn["a-1"]))
    assert out.strip() == (
        f"replayed dead letter {txn['a-1']} at a: 1 event queued again, at the end of its queue"
    )
    await receivers["a"].wait_for_events(1)
    assert receivers["a"].events == [{"target": "a", "n": 1}]
    await wait_for(
        reactor_(),
        "a-1 delivered",
        lambda: json_lines(db_path, "event", "a-1"),
        lambda found: found[0]["deliveries"]["a"]["state"] == "delivered",
    )

    # Discard another: it is never sent, and is listed as discarded.
    out = await ok(db_path, "discard", "a", "--txn", str(txn["a-0"]))
    assert out.strip().startswith(f"discarded dead letter {txn['a-0']} at a")
    (found,) = await json_lines(db_path, "event", "a-0")
    assert found["deliveries"]["a"]["state"] == "discarded"
    listed = await json_lines(db_path, "events", "--target", "a", "--state", "discarded")
    assert [e["event_id"] for e in listed] == ["a-0"]
    assert listed[0]["txn_id"] == txn["a-0"] and listed[0]["at"] is not None
    # Neither is a dead letter any more.
    for txn_id in (txn["a-0"], txn["a-1"]):
        for command in (["replay", "a", "--txn"], ["discard", "a", "--txn"]):
            ran = await relayer(db_path, *command, str(txn_id))
            assert ran.status == 2, ran
            assert ran.err.strip() == (
                f"relayer {command[0]}: transaction {txn_id} is not a dead letter of a"
            )

    # Replay the rest: the last one.
    out = await ok(db_path, "replay", "a")
    assert (
        out.strip()
        == "replayed its dead letters at a: 1 event queued again, at the end of its queue"
    )
    await receivers["a"].wait_for_events(2)
    assert receivers["a"].events == [{"target": "a", "n": 1}, {"target": "a", "n": 2}]
    assert (await ok(db_path, "dead-letters", "a")).strip() == "a: 0 dead letters, 0 events"
    assert (await ok(db_path, "replay", "a")).strip() == "a has no dead letters to replay"
    delivered = await wait_for(
        reactor_(),
        "two delivered events",
        lambda: json_lines(db_path, "events", "--target", "a", "--state", "delivered"),
        lambda found: len(found) == 2,
    )
    assert [e["event_id"] for e in delivered] == ["a-1", "a-2"]
    assert receivers["a"].violations == []
    assert await node.stop() == 0


#: The live node's sweep interval in the tests of what it picks up from the database: on
#: PostgreSQL, longer than any test, so that only NOTIFY can tell it at once; on SQLite, which
#: has no NOTIFY, short.
SWEEP = 3600.0 if POSTGRES else 0.5

#: A backoff long enough that a DOWN target is not retried within a test, unless woken.
LONG_BACKOFF = (3600.0, 3600.0)


async def long_down(db_path: Path | str, node: LiveNode, receivers: Receivers) -> None:
    """Make ``a`` DOWN, with its next retry an hour away, and bring its receiver back up."""
    await receivers.down()
    await node.submit("a", 2)
    down = await wait_status(db_path, "a", "a DOWN", lambda s: s["state"] == "down")
    assert down["next_attempt_in"] > 600
    receivers.up()


@pytest_twisted.ensureDeferred
async def test_wake_retries_a_down_target_at_once(
    db_path: Path | str, nodes: LiveNodes, receivers: Receivers
) -> None:
    node = await nodes.start(db_path, receivers, backoff=LONG_BACKOFF, sweep_interval=SWEEP)
    await long_down(db_path, node, receivers)
    out = await ok(db_path, "wake", "a", "--wait", "60")
    assert re.fullmatch(r"wake a: command \d+ applied by \S+ .* ago: woken\n", out), out
    await receivers["a"].wait_for_events(2)
    assert receivers["a"].events == [{"target": "a", "n": 0}, {"target": "a", "n": 1}]
    up = await wait_status(db_path, "a", "a UP", lambda s: s["state"] == "up")
    assert up["pending_events"] == 0
    # Waking an UP target is harmless; --json says who applied it.
    woken = json.loads(await ok(db_path, "wake", "a", "--wait", "60", "--json"))
    assert woken["done"] is True and woken["done_by"] == "local"
    assert woken["result"] == "woken" and woken["done_at"] is not None
    assert await node.stop() == 0


@pytest_twisted.ensureDeferred
async def test_a_wake_while_no_scheduler_runs_is_applied_when_one_starts(
    db_path: Path | str, nodes: LiveNodes, receivers: Receivers
) -> None:
    node = await nodes.start(db_path, receivers, backoff=LONG_BACKOFF)
    await long_down(db_path, node, receivers)
    assert await node.stop() == 0

    # Nobody applies it: --wait runs out, and the command stays queued.
    ran = await relayer(db_path, "wake", "a", "--wait", "0.5")
    assert ran.status == 3, ran
    assert "was not applied within 0.5s" in ran.err and "stays queued" in ran.err
    out = await ok(db_path, "wake", "a", "--json")
    queued = json.loads(out)
    assert queued["target"] == "a" and queued["done"] is False
    out = await ok(db_path, "wake", "a")
    assert out.startswith("wake a: queued as command ")
    assert receivers["a"].events == []

    # The next scheduler on the database, with the same hour of backoff, applies them.
    again = await nodes.start(db_path, receivers, backoff=LONG_BACKOFF)
    await receivers["a"].wait_for_events(2)
    assert receivers["a"].events == [{"target": "a", "n": 0}, {"target": "a", "n": 1}]
    assert await again.stop() == 0


@pytest_twisted.ensureDeferred
async def test_events_and_event_show_a_live_backlog(
    db_path: Path | str, nodes: LiveNodes, receivers: Receivers
) -> None:
    node = await nodes.start(db_path, receivers)
    await node.submit(["a", "b"], 2)
    for target_id in ("a", "b"):
        # Delivered, as the scheduler knows: it has the receiver's answers.
        await wait_status(db_path, target_id, "delivered", lambda s: s["pending_events"] == 0)
    await receivers.down()
    await node.submit("a", 5)
    await wait_status(db_path, "a", "a DOWN", lambda s: s["state"] == "down")

    pending = await json_lines(db_path, "events", "--target", "a", "--state", "pending")
    assert [e["event_id"] for e in pending] == [f"a-{k}" for k in range(5)]
    first = await json_lines(
        db_path, "events", "--target", "a", "--state", "pending", "--limit", "2"
    )
    assert [e["event_id"] for e in first] == ["a-0", "a-1"]
    lines = (await ok(db_path, "events", "--target", "a", "--state", "pending")).splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [f"a-{k}" for k in range(5)]
    assert lines[-1] == "a: 5 pending events"
    delivered = await ok(db_path, "events", "--target", "b", "--state", "delivered")
    assert [line.split()[0] for line in delivered.splitlines()] == ["a+b-0", "a+b-1", "b:"]
    assert " delivered " in delivered.splitlines()[0]
    # A window: everything was delivered within the last hour, nothing before.
    args = ["events", "--target", "b", "--state", "delivered"]
    assert len(await json_lines(db_path, *args, "--since", "1h")) == 2
    assert await json_lines(db_path, *args, "--until", "1h") == []

    out = await ok(db_path, "event", "a+b-1")
    head, table = out.splitlines()[0], out.splitlines()[1:]
    assert re.fullmatch(r"a\+b-1: submitted \S+ ago \(\d{4}-\d\d-\d\dT[\d:]+Z\), no deadline", head)
    assert table[0].split() == ["TARGET", "STATE", "TXN", "ATTEMPTS", "DETAIL"]
    assert [row.split()[:2] for row in table[1:]] == [["a", "delivered"], ["b", "delivered"]]
    out = await ok(db_path, "event", "a-0")
    assert out.splitlines()[2].split()[:2] == ["a", "pending"]
    assert "next retry" in out
    receivers.up()
    await receivers["a"].wait_for_events(7)
    assert await node.stop() == 0


@pytest_twisted.ensureDeferred
async def test_the_database_may_come_from_the_environment_in_another_process(
    db_path: Path | str, nodes: LiveNodes, receivers: Receivers
) -> None:
    node = await nodes.start(db_path, receivers)
    await node.submit("a", 1)
    await receivers["a"].wait_for_events(1)
    url = db_path if isinstance(db_path, str) else f"sqlite:///{db_path}"
    ran = await run_command("status", "--json", env=child_env(RELAYER_DATABASE_URL=url))
    assert ran.status == 0, ran.err
    assert [json.loads(line)["target"] for line in ran.out.splitlines()] == ["a", "b"]
    assert await node.stop() == 0


# -- in this process: output, refusals, paging ---------------------------------------------------


@pytest.fixture
def populated(db_path: Path | str) -> Harness:
    """A database whose targets are up, down (pending events), flap and bad (a dead letter)."""
    h = populate(db_path)
    result_of(h.scheduler.stop())
    return h


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``relayer ARGS...`` in this process: the exit status, stdout and stderr."""
    status = main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


#: Every command, as a target or an event it names would be given.
COMMANDS = [
    ["status"],
    ["status", "--target", "up"],
    ["wake", "up"],
    ["replay", "up"],
    ["discard", "up", "--txn", "1"],
    ["dead-letters", "up"],
    ["events", "--target", "up", "--state", "delivered"],
    ["event", "up-0"],
]
NAMED_TARGETS = [c for c in COMMANDS if "up" in c]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_without_a_database_each_says_how_to_give_one(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RELAYER_DATABASE_URL", raising=False)
    status, out, err = cli(capsys, *command)
    assert status == 2
    assert err.startswith(f"relayer {command[0]}: no database given: pass --database URL")
    assert "RELAYER_DATABASE_URL" in err and out == ""


@pytest.mark.sqlite_only
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_missing_sqlite_file_is_refused_not_created(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.db"
    status, out, err = cli(capsys, *command, "--database", str(path))
    assert status == 1
    assert err.splitlines() == [
        f"relayer {command[0]}: {path}: no such file ({command[0]} never creates a database)"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_an_empty_database_is_refused(
    command: list[str], db_path: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    if isinstance(db_path, Path):
        db_path.touch()
    status, out, err = cli(capsys, *command, "--database", str(db_path))
    assert status == 1
    assert "holds no relayer tables (schema version 0)" in err
    assert len(err.splitlines()) == 1 and out == ""


@pytest.mark.parametrize("command", [COMMANDS[0], COMMANDS[2]], ids=lambda c: c[0])
def test_an_older_schema_is_refused_and_not_upgraded(
    command: list[str], db_path: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = engine_for(str(db_path))
    try:
        with engine.begin() as conn:
            schema.upgrade(conn, to_version=SCHEMA_VERSION - 1)
        status, out, err = cli(capsys, *command, "--database", str(db_path))
        assert status == 1
        assert err.strip() == (
            f"relayer {command[0]}: {db_path}: has relayer schema version {SCHEMA_VERSION - 1}, "
            f"older than this relayer's {SCHEMA_VERSION}: run `relayer db upgrade` first "
            f"({command[0]} never upgrades; nothing was changed)"
        )
        with engine.connect() as conn:
            assert schema.read_version(conn) == SCHEMA_VERSION - 1
    finally:
        engine.dispose()


def test_a_newer_schema_is_refused(populated: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    engine = engine_for(str(populated.path))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(schema.meta)
                .where(schema.meta.c.name == "schema_version")
                .values(value=str(SCHEMA_VERSION + 1))
            )
        for command in COMMANDS:
            status, out, err = cli(capsys, *command, "--database", str(populated.path))
            assert status == 1
            assert f"has relayer schema version {SCHEMA_VERSION + 1}" in err
            assert "use a newer relayer" in err
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", NAMED_TARGETS, ids=lambda c: c[0])
def test_an_unknown_target_is_refused(
    command: list[str], populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = [("upp" if word == "up" else word) for word in command]
    status, out, err = cli(capsys, *typo, "--database", str(populated.path))
    assert status == 2
    assert err.splitlines() == [
        f"relayer {command[0]}: {populated.path} has no target 'upp' "
        "(its targets: bad, down, flap, up)"
    ]
    assert out == ""


def test_an_unknown_event_is_refused(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    for event_id in ("nope", "relayer-999999", "relayer-x"):
        status, out, err = cli(capsys, "event", event_id, "--database", str(populated.path))
        assert status == 2
        assert err.splitlines() == [f"relayer event: {populated.path} has no event {event_id!r}"]


def test_a_transaction_that_is_not_a_dead_letter_is_refused(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    database = str(populated.path)
    # "up" has delivered transactions 1 to 4, and no dead letter.
    for command in ("discard", "replay"):
        status, out, err = cli(capsys, command, "up", "--txn", "1", "--database", database)
        assert status == 2
        assert err.splitlines() == [f"relayer {command}: transaction 1 is not a dead letter of up"]


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (["events", "--target", "up", "--state", "sent"], "is not a state"),
        (["events", "--target", "up"], "--state"),
        (["events", "--state", "pending"], "--target"),
        (["events", "--target", "up", "--state", "pending", "--limit", "0"], "from 1 up"),
        (["discard", "up"], "--txn"),
        (["discard", "up", "--txn", "x"], "is not a transaction id"),
        (["replay", "up", "--txn", "-1"], "is not a transaction id"),
        (["wake", "up", "--wait", "0"], "above 0"),
        (["wake"], "TARGET"),
        (["event"], "ID"),
    ],
)
def test_bad_options_are_refused(
    options: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([*options, "--database", "unused.db"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and complaint in err


def test_a_window_is_refused_for_pending_events_and_a_bad_time(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    database = str(populated.path)
    status, out, err = cli(
        capsys,
        "events",
        "--target",
        "down",
        "--state",
        "pending",
        "--since",
        "1h",
        "--database",
        database,
    )
    assert status == 2
    assert "--since and --until are for the events that reached their state" in err
    status, out, err = cli(
        capsys,
        "events",
        "--target",
        "up",
        "--state",
        "delivered",
        "--since",
        "yesterday",
        "--database",
        database,
    )
    assert status == 2
    assert "'yesterday' is not a time" in err


def test_times_are_read_as_durations_ago_iso_or_unix() -> None:
    now = 1_714_564_800.0  # 2024-05-01T12:00:00Z
    assert opscli.parse_time("90m", now) == now - 5400
    assert opscli.parse_time("1d12h", now) == now - 1.5 * 86400
    assert opscli.parse_time("2024-05-01T12:00:00Z", now) == now
    assert opscli.parse_time("2024-05-01T14:00:00+02:00", now) == now
    assert opscli.parse_time("2024-05-01", now) == now - 12 * 3600
    assert opscli.parse_time("1714564800", now) == now
    with pytest.raises(ValueError, match="is not a time"):
        opscli.parse_time("soon", now)


def test_spans_and_ages_are_short() -> None:
    assert [opscli.span(s) for s in (0.42, 12, 185, 7800, 3 * 86400 + 4 * 3600)] == [
        "0.4s",
        "12s",
        "3m05s",
        "2h10m",
        "3d04h",
    ]
    assert opscli.ago(90.0, 100.0) == "10s ago"
    assert opscli.due(103.0, 100.0) == "in 3.0s"
    assert opscli.due(99.0, 100.0) == "due"
    assert opscli.ago(None, 100.0) == opscli.due(None, 100.0) == "-"


def test_status_of_a_database_on_a_fake_clock(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = cli(capsys, "status", "--database", str(populated.path))
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "TARGET",
        "STATE",
        "EVENTS",
        "TXNS",
        "OLDEST",
        "DOWN",
        "SINCE",
        "NEXT",
        "RETRY",
        "DEAD",
        "LAST",
        "ERROR",
    ]
    assert [line.split()[:2] for line in lines[1:-1]] == [
        ["bad", "UP"],
        ["down", "DOWN"],
        ["flap", "UP"],
        ["up", "UP"],
    ]
    # The columns line up.
    column = lines[0].index("DEAD")
    assert {line[column] for line in lines[1:-1]} == {"0", "1"}
    assert row_of(out, "bad")["LAST ERROR"] == "HTTP 400"
    assert lines[-1] == "4 targets (3 UP, 1 DOWN), 2 pending events, 1 dead letter"


# -- bounded memory: pages -----------------------------------------------------------------------


class _Spy:
    """Records the store's paged calls, and how many lines were printed before each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
        self.calls: list[tuple[str, Any, int, int]] = []
        real = opscli.dbcli.open_store
        spy = self

        def open_store(database: str) -> Any:
            store = real(database)
            for name in ("queue_counts", "dead_letters", "target_events"):
                spy._wrap(store, name)
            return store

        monkeypatch.setattr(opscli.dbcli, "open_store", open_store)
        self._stdout = lambda: sys.stdout

    def _wrap(self, store: Any, name: str) -> None:
        method = getattr(store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "queue_counts":
                after, limit = kwargs.get("after"), kwargs.get("limit")
            elif name == "dead_letters":
                limit, after = args[1], kwargs.get("after")
            else:
                after, limit = args[2], args[3]
            printed = self._stdout().getvalue().count("\n")
            self.calls.append((name, after, limit, printed))
            return method(*args, **kwargs)

        setattr(store, name, call)


def test_status_reads_and_prints_a_page_of_targets_at_a_time(
    populated: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spy = _Spy(monkeypatch, capsys)
    monkeypatch.setattr(opscli, "STATUS_PAGE", 2)
    status, out, err = cli(capsys, "status", "--database", str(populated.path))
    assert status == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ["bad", "down", "flap", "up"]
    # Never all at once: a page of two, then the next after the last id of the one before,
    # printed before the next is read.
    assert [c[:3] for c in spy.calls] == [
        ("queue_counts", None, 2),
        ("queue_counts", "down", 2),
        ("queue_counts", "up", 2),
    ]
    # The header and the first page were printed before the second page was read.
    assert [c[3] for c in spy.calls] == [0, 3, 5]
    spy.calls.clear()
    status, out, err = cli(capsys, "status", "--json", "--database", str(populated.path))
    assert [json.loads(line)["target"] for line in out.splitlines()] == [
        "bad",
        "down",
        "flap",
        "up",
    ]
    assert [(c[1], c[2], c[3]) for c in spy.calls] == [(None, 2, 0), ("down", 2, 2), ("up", 2, 4)]


def test_events_and_dead_letters_are_read_a_page_at_a_time(
    populated: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = str(populated.path)
    spy = _Spy(monkeypatch, capsys)
    monkeypatch.setattr(opscli, "EVENTS_PAGE", 1)
    status, out, err = cli(
        capsys, "events", "--target", "up", "--state", "delivered", "--json", "--database", database
    )
    assert status == 0, err
    assert [json.loads(line)["event_id"] for line in out.splitlines()] == [
        "up-0",
        "up-1",
        "up-2",
        "fan",
    ]
    assert [c[2] for c in spy.calls] == [1] * len(spy.calls)
    assert [c[3] for c in spy.calls] == list(range(len(spy.calls)))
    assert len(spy.calls) >= 4 and spy.calls[0][1] is None
    spy.calls.clear()
    status, out, err = cli(
        capsys,
        "events",
        "--target",
        "up",
        "--state",
        "delivered",
        "--limit",
        "2",
        "--database",
        database,
    )
    assert [line.split()[0] for line in out.splitlines()] == ["up-0", "up-1", "up:"]
    assert out.splitlines()[-1] == "up: 2 delivered events (--limit reached; there may be more)"
    assert len(spy.calls) == 2

    # A second dead letter at "bad", to list two pages of one.
    again = populated.restart()
    result_of(again.scheduler.submit("bad", {"id": "bad-2"}, event_id="bad-2"))
    run_clock(again.clock, 2.0)
    result_of(again.scheduler.stop())
    spy.calls.clear()
    monkeypatch.setattr(opscli, "DEAD_LETTERS_PAGE", 1)
    status, out, err = cli(capsys, "dead-letters", "bad", "--json", "--database", database)
    assert status == 0, err
    dead = [json.loads(line) for line in out.splitlines()]
    assert [d["event_ids"] for d in dead] == [["bad-0"], ["bad-2"]]
    assert [(c[1], c[2], c[3]) for c in spy.calls] == [
        (None, 1, 0),
        (dead[0]["txn_id"], 1, 1),
        (dead[1]["txn_id"], 1, 2),
    ]


@pytest.mark.postgres_only
def test_no_password_is_ever_printed(
    populated: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sa.make_url(str(populated.path)).set(password="pg-pass-w0rd")
    secret = url.render_as_string(hide_password=False)
    outputs = []
    for command in [*COMMANDS, ["status", "--target", "upp"], ["event", "nope"]]:
        status, out, err = cli(capsys, *command, "--database", secret)
        outputs.append(out + err)
    monkeypatch.setenv("RELAYER_DATABASE_URL", secret)
    status, out, err = cli(capsys, "event", "nope")
    assert status == 2 and ":***@" in err
    outputs.append(out + err)
    monkeypatch.setenv("RELAYER_DATABASE_URL", url.set(port=1).render_as_string(False))
    status, out, err = cli(capsys, "status")
    assert status == 1
    assert err.startswith("relayer status: cannot use postgresql://") and "port 1" in err
    outputs.append(out + err)
    for output in outputs:
        assert "pg-pass-w0rd" not in output


def test_the_database_may_come_from_the_environment(
    populated: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = populated.path
    monkeypatch.setenv(
        "RELAYER_DATABASE_URL", path if isinstance(path, str) else f"sqlite:///{path}"
    )
    status, out, err = cli(capsys, "dead-letters", "bad", "--json")
    assert status == 0, err
    assert [json.loads(line)["event_ids"] for line in out.splitlines()] == [["bad-0"]]
    # --database wins.
    status, out, err = cli(capsys, "status", "--database", str(Path("/nonexistent/x.db")))
    assert status == 1
