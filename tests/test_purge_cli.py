"""
Tests of ``relayer purge``: retention run by hand against a database that schedulers use.

Each test fills a database through a scheduler on a fake clock, which starts at 0: the command
measures retention to the wall clock (``time.time()``), decades later, so that every final
event is old enough for a retention of seconds or days, and none for one of a century.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _support import result_of, run_clock

from relayer.cli import main
from relayer.dbcli import engine_for
from relayer.errors import DatabaseInUse
from relayer.store import schema
from relayer.store.schema import SCHEMA_VERSION
from relayer.testing import Harness, build_scheduler

ROOT = Path(__file__).resolve().parent.parent

TARGETS = ["up", "down", "flap", "bad"]
#: The events that are final at every one of their targets.
FINAL = ["up-0", "up-1", "up-2", "bad-1", "exp", "flap-1"]
#: The events that are not: pending at the target that is down, or a dead letter.
NOT_FINAL = ["fan", "down-0", "bad-0"]
#: Where each event stands, at each of its targets.
BEFORE = {
    "up-0": {"up": "delivered"},
    "up-1": {"up": "delivered"},
    "up-2": {"up": "delivered"},
    "fan": {"up": "delivered", "down": "pending"},
    "down-0": {"down": "pending"},
    "bad-0": {"bad": "dead_lettered"},
    "bad-1": {"bad": "discarded"},
    "exp": {"flap": "expired"},
    "flap-1": {"flap": "delivered"},
}
#: What a purge of every final event reports. Each event went in a transaction of its own, and
#: the expired one had been sent (refused) in one that was then abandoned.
ALL_FINAL = {
    "events": 6,
    "transactions": 6,
    "expired": 1,
    "by_target": {"bad": 1, "flap": 2, "up": 3},
    "not_final": 3,
    "archived": False,
    "dry_run": False,
    "chunks": 1,
    "stopped": False,
}


def populate(database: Path | str) -> Harness:
    """
    A running scheduler on ``database``, whose events stand as :data:`BEFORE` says: delivered,
    pending at a target that is down, dead-lettered, discarded and expired.
    """
    h = build_scheduler(TARGETS, path=database)
    s, targets = h.scheduler, h.transport
    targets["down"].down()
    targets["flap"].down()
    targets["bad"].fail_with(400)

    def submit(to: str | list[str], event_id: str, **options: Any) -> None:
        result_of(s.submit(to, {"id": event_id}, event_id=event_id, **options))
        run_clock(h.clock, 2.0)  # each event in a transaction of its own

    for n in range(3):
        submit("up", f"up-{n}")
    submit(["up", "down"], "fan")
    submit("down", "down-0")
    submit("bad", "bad-0")
    submit("bad", "bad-1")
    submit("flap", "exp", ttl=5.0)
    run_clock(h.clock, 10.0, step=1.0)  # past the deadline of "exp", refused by "flap"
    targets["flap"].up()
    s.wake("flap")
    run_clock(h.clock, 2.0)  # "exp" is recorded as expired; "flap" is up again
    submit("flap", "flap-1")
    dead = result_of(s.event_status("bad-1")).deliveries["bad"].txn_id
    assert result_of(s.discard("bad", dead))
    assert statuses(h) == BEFORE
    return h


def statuses(h: Harness) -> dict[str, dict[str, str] | None]:
    """Where each event stands at each target, as the harness's scheduler reports it."""
    found: dict[str, dict[str, str] | None] = {}
    for event_id in BEFORE:
        status = result_of(h.scheduler.event_status(event_id))
        found[event_id] = (
            None if status is None else {t: d.state.value for t, d in status.deliveries.items()}
        )
    return found


def statuses_after_restart(h: Harness) -> dict[str, dict[str, str] | None]:
    """The statuses, from a new scheduler on the same database (the harness's is stopped)."""
    again = h.restart()
    try:
        return statuses(again)
    finally:
        result_of(again.scheduler.stop())


@pytest.fixture
def populated(db_path: Path | str) -> Harness:
    """A database filled by :func:`populate`, whose scheduler has stopped."""
    h = populate(db_path)
    result_of(h.scheduler.stop())
    return h


def purge(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``relayer purge`` in this process: the exit status, stdout and stderr."""
    status = main(["purge", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


# -- what it purges ------------------------------------------------------------------------------


def test_a_dry_run_reports_what_would_go_and_changes_nothing(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = purge(
        capsys, "--database", str(populated.path), "--keep", "60s", "--dry-run"
    )
    assert status == 0, err
    assert out.splitlines() == [
        f"{populated.path}: dry run, nothing changed: would purge 6 events, "
        "6 transaction records and 1 expiry record, in 1 chunk",
        "  bad   1 event",
        "  flap  2 events",
        "  up    3 events",
        "kept 3 events old enough to go but not final at every target yet "
        "(pending, awaiting confirmation or dead-lettered)",
    ]
    assert "chunk 1: would purge 6 events so far" in err
    assert statuses_after_restart(populated) == BEFORE


@pytest.mark.sqlite_only
def test_a_dry_run_never_waits_for_a_writers_lock(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # A scheduler in the middle of a write holds SQLite's write lock: a dry run only reads.
    writer = sqlite3.connect(populated.path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        status, out, err = purge(
            capsys, "--database", str(populated.path), "--keep", "60s", "--dry-run"
        )
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert status == 0, err
    assert "would purge 6 events" in out


def test_a_purge_deletes_the_final_events_and_keeps_the_others(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = purge(capsys, "--database", str(populated.path), "--keep", "60s")
    assert status == 0, err
    assert out.splitlines()[0] == (
        f"{populated.path}: purged 6 events, 6 transaction records and 1 expiry record, in 1 chunk"
    )
    assert "chunk 1: purged 6 events so far, 6 transaction records, 1 expiry record" in err
    after = statuses_after_restart(populated)
    assert after == {e: None if e in FINAL else BEFORE[e] for e in BEFORE}
    # A second run finds nothing more to do.
    status, out, err = purge(capsys, "--database", str(populated.path), "--keep", "60s")
    assert status == 0, err
    assert "purged 0 events, 0 transaction records and 0 expiry records" in out


def test_an_archive_keeps_the_events_readable(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    database = str(populated.path)
    status, out, err = purge(capsys, "--database", database, "--keep", "1h", "--archive")
    assert status == 0, err
    assert out.startswith(f"{database}: archived 6 events, 6 transaction records")
    assert statuses_after_restart(populated) == BEFORE
    # Purging (deleting) afterwards leaves the archived events as they are.
    status, out, err = purge(capsys, "--database", database, "--keep", "1h")
    assert status == 0, err
    assert statuses_after_restart(populated) == BEFORE


def test_json_prints_the_report(populated: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    database = str(populated.path)
    status, out, err = purge(capsys, "--database", database, "--keep", "90", "--json", "--dry-run")
    assert status == 0, err
    assert json.loads(out) == {**ALL_FINAL, "dry_run": True}
    assert "chunk 1" in err  # progress stays on stderr
    status, out, err = purge(capsys, "--database", database, "--keep", "90", "--json")
    assert status == 0, err
    assert json.loads(out) == ALL_FINAL


@pytest.mark.parametrize(
    ("options", "gone"),
    [
        # Only the events for "up" alone go; "fan" is pending at "down".
        (["--keep", "forever", "--target-keep", "up=1m"], {"up": 3}),
        (["--keep", "1d", "--target-keep", "flap=forever"], {"bad": 1, "up": 3}),
        (["--keep", "2w", "--target-keep", "up=36500d"], {"bad": 1, "flap": 2}),
        # A century: the fake clock's events, at 1970, are final for less than that.
        (["--keep", "36500d"], {}),
    ],
)
def test_each_target_keeps_its_own_retention(
    populated: Harness,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    gone: dict[str, int],
) -> None:
    status, out, err = purge(capsys, "--database", str(populated.path), *options, "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["by_target"] == gone
    went = [e for e in FINAL if set(BEFORE[e]) <= set(gone)]
    assert report["events"] == len(went)
    after = statuses_after_restart(populated)
    assert after == {e: None if e in went else BEFORE[e] for e in BEFORE}


def test_progress_is_shown_a_chunk_at_a_time(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = purge(
        capsys, "--database", str(populated.path), "--keep", "60", "--chunk", "1", "--json"
    )
    assert status == 0, err
    report = json.loads(out)
    assert {**report, "chunks": 1} == ALL_FINAL
    # A chunk of one event number: a line for each, the last with the totals.
    lines = [line for line in err.splitlines() if ": chunk " in line]
    assert len(lines) == report["chunks"] > 1
    assert lines[-1].endswith(
        f"chunk {report['chunks']}: purged 6 events so far, 6 transaction records, 1 expiry record"
    )


def test_the_database_may_come_from_the_environment(
    populated: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = populated.path
    url = path if isinstance(path, str) else f"sqlite:///{path}"
    monkeypatch.setenv("RELAYER_DATABASE_URL", url)
    status, out, err = purge(capsys, "--keep", "60", "--json")
    assert status == 0, err
    assert json.loads(out) == ALL_FINAL


# -- beside a running scheduler ------------------------------------------------------------------


def test_it_runs_beside_a_scheduler_that_holds_the_process_lock(
    db_path: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    h = populate(db_path)
    try:
        # The scheduler holds the lock: another scheduler is refused...
        with pytest.raises(DatabaseInUse):
            build_scheduler(TARGETS, path=db_path)
        # ...and the command is not.
        status, out, err = purge(capsys, "--database", str(db_path), "--keep", "60", "--json")
        assert status == 0, err
        assert json.loads(out) == ALL_FINAL
        # The running scheduler sees the result, and goes on delivering.
        assert statuses(h) == {e: None if e in FINAL else BEFORE[e] for e in BEFORE}
        result_of(h.scheduler.submit("up", {"id": "after"}, event_id="after"))
        run_clock(h.clock, 2.0)
        assert {"id": "after"} in h.transport["up"].events
    finally:
        result_of(h.scheduler.stop())


#: A scheduler in a process of its own: it fills the database, says "ready", and holds it
#: (with its process lock) until told to report its events' statuses and stop.
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
from test_purge_cli import populate, statuses
from _support import result_of
h = populate(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(statuses(h)), flush=True)
result_of(h.scheduler.stop())
"""


def test_it_runs_in_a_process_of_its_own_beside_a_scheduler_in_another(
    db_path: Path | str,
) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db_path), str(ROOT / "tests")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "ready\n"
        done = subprocess.run(
            [sys.executable, "-m", "relayer", "purge", "--database", str(db_path)]
            + ["--keep", "1w", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == ALL_FINAL
        out, _ = child.communicate("report\n", timeout=120)
        assert child.returncode == 0
        assert json.loads(out) == {e: None if e in FINAL else BEFORE[e] for e in BEFORE}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# -- what it refuses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["--keep", "0"],
        ["--keep=-1d"],
        ["--keep", "10x"],
        ["--keep", "1d2"],
        ["--keep", "nan"],
        ["--keep", "36601d"],
        ["--keep", "1d", "--target-keep", "up"],
        ["--keep", "1d", "--target-keep", "=1d"],
        ["--keep", "1d", "--target-keep", "up=soon"],
        ["--keep", "1d", "--chunk", "0"],
        ["--keep", "1d", "--chunk", "many"],
        ["--keep", "1d", "--frobnicate"],
        [],
    ],
)
def test_bad_options_are_refused(options: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["purge", "--database", "unused.db", *options])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert (options[-1].split("=")[-1] if options else "--keep") in err


def test_keeping_everything_for_ever_is_nothing_to_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = ["--keep", "forever", "--target-keep", "up=forever"]
    status, out, err = purge(capsys, "--database", "unused.db", *options)
    assert status == 2
    assert "nothing to do: every target keeps its final events for ever" in err
    assert out == ""


def test_a_target_the_database_does_not_know_is_refused(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo would give the target the default retention instead of its own.
    options = ["--keep", "1h", "--target-keep", "upp=90d", "--target-keep", "down=1d"]
    status, out, err = purge(capsys, "--database", str(populated.path), *options)
    assert status == 2
    assert "does not know: upp (its targets: bad, down, flap, up)" in err
    options = ["--keep", "1h", "--target-keep", "up=1d", "--target-keep", "up=2d"]
    status, out, err = purge(capsys, "--database", str(populated.path), *options)
    assert status == 2
    assert "--target-keep up= is given twice" in err
    assert statuses_after_restart(populated) == BEFORE


def test_without_a_database_it_says_how_to_give_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RELAYER_DATABASE_URL", raising=False)
    status, out, err = purge(capsys, "--keep", "1d")
    assert status == 2
    assert "--database" in err and "RELAYER_DATABASE_URL" in err


@pytest.mark.sqlite_only
def test_a_missing_sqlite_file_is_refused_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.db"
    for database in (str(path), f"sqlite:///{path}"):
        status, out, err = purge(capsys, "--database", database, "--keep", "1d")
        assert status == 1
        assert err.strip().splitlines() == [
            f"relayer purge: {database}: no such file (purge never creates a database)"
        ]
    assert list(tmp_path.iterdir()) == []


def test_an_empty_database_is_refused(
    db_path: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    if isinstance(db_path, Path):
        db_path.touch()  # an empty SQLite file; on PostgreSQL, an empty schema
    status, out, err = purge(capsys, "--database", str(db_path), "--keep", "1d")
    assert status == 1
    assert "holds no relayer tables (schema version 0)" in err


def test_an_older_schema_is_refused_and_not_upgraded(
    db_path: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = engine_for(str(db_path))
    try:
        with engine.begin() as conn:
            schema.upgrade(conn, to_version=SCHEMA_VERSION - 1)
        status, out, err = purge(capsys, "--database", str(db_path), "--keep", "1d")
        assert status == 1
        assert (
            f"has relayer schema version {SCHEMA_VERSION - 1}, older than this relayer's "
            f"{SCHEMA_VERSION}: run `relayer db upgrade` first"
        ) in err
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
        status, out, err = purge(capsys, "--database", str(populated.path), "--keep", "1d")
        assert status == 1
        assert f"has relayer schema version {SCHEMA_VERSION + 1}" in err
        assert "use a newer relayer" in err
    finally:
        engine.dispose()


def test_a_url_of_another_kind_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    options = ["--database", "mysql://root:hunter2@localhost/relayer", "--keep", "1d"]
    status, out, err = purge(capsys, *options)
    assert status == 1
    assert "unsupported database URL" in err
    assert "hunter2" not in out + err


@pytest.mark.postgres_only
def test_no_password_is_ever_printed(
    populated: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sa.make_url(str(populated.path)).set(password="pg-pass-w0rd")
    secret = url.render_as_string(hide_password=False)
    outputs = []
    status, out, err = purge(capsys, "--database", secret, "--keep", "1h", "--dry-run")
    assert status == 0, err
    outputs.append(out + err)
    monkeypatch.setenv("RELAYER_DATABASE_URL", secret)
    status, out, err = purge(capsys, "--keep", "1h")
    assert status == 0, err
    assert "purged 6 events" in out
    outputs.append(out + err)
    # Nothing listens on port 1: the server cannot be reached.
    monkeypatch.setenv("RELAYER_DATABASE_URL", url.set(port=1).render_as_string(False))
    status, out, err = purge(capsys, "--keep", "1h")
    assert status == 1
    assert err.startswith("relayer purge: cannot use postgresql://") and "port 1" in err
    outputs.append(out + err)
    for output in outputs:
        assert "pg-pass-w0rd" not in output
        assert ":***@" in output


@pytest.mark.postgres_only
def test_it_stops_and_says_so_while_another_process_purges(
    populated: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    from relayer.store.postgres import _TRY_RETENTION_LOCK

    database = str(populated.path)
    other = sa.create_engine(sa.make_url(database).set(drivername="postgresql+psycopg"))
    try:
        with other.connect() as conn:
            # Another process's retention chunk holds the lock to the end of its transaction.
            assert conn.execute(sa.text(_TRY_RETENTION_LOCK)).scalar()
            status, out, err = purge(capsys, "--database", database, "--keep", "1h", "--json")
            assert status == 3
            assert json.loads(out)["stopped"] is True
            assert "another process's retention run is under way; run again later" in err
    finally:
        other.dispose()
    assert statuses_after_restart(populated) == BEFORE


def test_an_interrupt_reports_the_chunks_done(
    populated: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from relayer.store.sql import SQLStore

    real = SQLStore.purge

    def interrupted(self: SQLStore, *args: Any, progress: Any = None, **kwargs: Any) -> Any:
        # Ctrl-C once the first chunk is done.
        def second(report: Any) -> None:
            progress(report)
            if report.chunks == 1:
                raise KeyboardInterrupt

        return real(self, *args, progress=second, **kwargs)

    monkeypatch.setattr(SQLStore, "purge", interrupted)
    options = ["--keep", "60", "--chunk", "1"]
    status, out, err = purge(capsys, "--database", str(populated.path), *options)
    assert status == 130
    assert "interrupted: the chunks above are done" in err
    assert "purged 1 event, 1 transaction record and 0 expiry records, in 1 chunk" in err
    assert out == ""
    after = statuses_after_restart(populated)
    assert after == {e: None if e == "up-0" else BEFORE[e] for e in BEFORE}
