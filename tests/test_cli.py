"""
Tests of the ``relayer`` command, of ``relayer demo``, and of the delivery verification the
demo relies on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from relayer.cli import build_parser, main
from relayer.store.schema import SCHEMA_VERSION
from relayer.testing._receiver import verify_delivery

ROOT = Path(__file__).resolve().parent.parent


def run_relayer(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "relayer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


# -- verification --------------------------------------------------------------------------------


EXPECTED = [{"seq": i} for i in range(5)]


def test_verify_accepts_exactly_once_in_order() -> None:
    report = verify_delivery(EXPECTED, list(EXPECTED))
    assert report.ok
    assert report.expected == report.received == 5
    assert "all exactly once, in order" in report.summary()


def test_verify_finds_a_missing_event() -> None:
    report = verify_delivery(EXPECTED, [EXPECTED[0], EXPECTED[1], EXPECTED[3], EXPECTED[4]])
    assert not report.ok
    assert report.missing == [{"seq": 2}]
    assert report.duplicated == report.out_of_order == report.unexpected == []
    assert "1 missing" in report.summary()


def test_verify_finds_a_duplicated_event() -> None:
    report = verify_delivery(EXPECTED, EXPECTED[:3] + [EXPECTED[2]] + EXPECTED[3:])
    assert not report.ok
    assert report.duplicated == [{"seq": 2}]
    assert report.missing == report.out_of_order == []
    assert "1 duplicated" in report.summary()


def test_verify_finds_a_reordered_event() -> None:
    received = [EXPECTED[0], EXPECTED[2], EXPECTED[1], EXPECTED[3], EXPECTED[4]]
    report = verify_delivery(EXPECTED, received)
    assert not report.ok
    assert report.out_of_order == [{"seq": 1}]
    assert report.missing == report.duplicated == []
    assert "out of order" in report.summary()


def test_verify_finds_an_unexpected_event() -> None:
    report = verify_delivery(EXPECTED, EXPECTED + [{"seq": 99}])
    assert not report.ok
    assert report.unexpected == [{"seq": 99}]


def test_verify_compares_events_by_value() -> None:
    # Key order does not matter, as after a JSON round trip.
    assert verify_delivery([{"a": 1, "b": 2}], [{"b": 2, "a": 1}]).ok


def test_summary_lists_a_few_examples() -> None:
    report = verify_delivery([{"seq": i} for i in range(10)], [])
    assert report.summary(limit=2) == ('0/10 received; 10 missing (e.g. {"seq":0}, {"seq":1}, ...)')


# -- the command ---------------------------------------------------------------------------------


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("relayer ")


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--events", "0"],
        ["demo", "--events", "many"],
        ["demo", "--timeout", "-1"],
        ["demo", "--failure-rate", "1"],
        ["nonsense"],
    ],
)
def test_bad_arguments_are_refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_demo_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert args.events == 10_000
    assert args.seed is None


@pytest.fixture(scope="module")
def demo_run() -> subprocess.CompletedProcess[str]:
    """One run of ``relayer demo``, shared by the tests that read its output."""
    return run_relayer("demo", "--events", "2000", "--seed", "7")


@pytest.mark.integration
def test_demo_delivers_and_verifies(demo_run: subprocess.CompletedProcess[str]) -> None:
    result = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "VERIFIED: every target received all 2000 events exactly once, in order" in out
    for name in ("healthy", "flaky", "outage"):
        assert re.search(rf"^{name} +2000/2000 .* OK$", out, re.MULTILINE), out
    assert "events/s" in out
    # The targets' tokens are random and never printed: no Authorization value at all.
    assert "Bearer" not in out + result.stderr
    assert "token" not in (out + result.stderr).lower()


@pytest.mark.integration
def test_demo_shows_a_fan_out_event_per_target(
    demo_run: subprocess.CompletedProcess[str],
) -> None:
    # One event for all three targets, with a ttl shorter than the outage: delivered where the
    # target was up, expired where it was down, and each state agrees with what the target got.
    assert demo_run.returncode == 0, demo_run.stdout + demo_run.stderr
    out = demo_run.stdout
    assert "event demo-fan-out stored for all 3 targets, with a ttl of 2.5s; outage is down" in out
    header = re.search(
        r"^event demo-fan-out, submitted at ([\d.]+)s for every target, expires at ([\d.]+)s:$",
        out,
        re.MULTILINE,
    )
    assert header, out
    expires = float(header[2])
    assert re.search(r"^target +state +at +txn +attempts +received$", out, re.MULTILINE), out
    for name in ("healthy", "flaky"):
        assert re.search(rf"^{name} +delivered +[\d.]+s +\d+ +\d+ +yes$", out, re.MULTILINE), out
    # Sent (and refused) before its deadline, in a transaction that was then abandoned: the
    # table shows that transaction and its attempts, or dashes if it was never sent.
    expired = re.search(r"^outage +expired +([\d.]+)s +(?:\d+ +\d+|- +-) +no$", out, re.MULTILINE)
    assert expired, out
    assert float(expired[1]) >= expires
    # The target where it expired goes on with the events submitted after it.
    later = re.search(
        r"^  outage went on with its later events: the first delivered at ([\d.]+)s "
        r"in transaction (\d+), 2000/2000 in all$",
        out,
        re.MULTILINE,
    )
    assert later, out
    assert float(later[1]) >= float(expired[1])
    assert "(does not match)" not in out
    assert re.search(r", and event demo-fan-out as its status says$", out, re.MULTILINE), out


@pytest.mark.integration
def test_demo_times_out_with_status_2() -> None:
    # The outage outlasts the timeout: the demo gives up, and says so.
    result = run_relayer("demo", "--events", "10", "--outage", "60", "--timeout", "1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "TIMED OUT" in result.stdout


def test_db_takes_the_database_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "relayer.db"
    monkeypatch.setenv("RELAYER_DATABASE_URL", f"sqlite:///{path}")
    assert main(["db", "upgrade"]) == 0
    assert path.exists()
    assert main(["db", "version"]) == 0
    assert f"schema version {SCHEMA_VERSION}" in capsys.readouterr().out


def test_db_option_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAYER_DATABASE_URL", f"sqlite:///{tmp_path / 'not-this.db'}")
    assert main(["db", "upgrade", "--database", str(tmp_path / "this.db")]) == 0
    assert (tmp_path / "this.db").exists() and not (tmp_path / "not-this.db").exists()


def test_db_without_a_database_says_how_to_give_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RELAYER_DATABASE_URL", raising=False)
    assert main(["db", "version"]) == 2
    err = capsys.readouterr().err
    assert "--database" in err and "RELAYER_DATABASE_URL" in err


@pytest.mark.postgres_only
def test_db_never_prints_the_password_from_the_environment(
    db_path: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sa.make_url(db_path).set(password="pg-pass-w0rd")
    monkeypatch.setenv("RELAYER_DATABASE_URL", url.render_as_string(hide_password=False))
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "version"]) == 0
    bad = url.set(port=1).render_as_string(hide_password=False)  # nothing listens there
    monkeypatch.setenv("RELAYER_DATABASE_URL", bad)
    assert main(["db", "version"]) == 1
    out = capsys.readouterr()
    assert "pg-pass-w0rd" not in out.out + out.err
    assert "schema version" in out.out
