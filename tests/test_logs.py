"""
relayer's log events: each has a stable name (``relayer_event``) and the fields that
docs/operations.md lists for it; they can be written as JSON lines; and the HTTP transport's
connections do not flood the log with Twisted's ``Starting factory`` lines.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    eventsFromJSONLogFile,
    formatEvent,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import provider

from relayer import (
    BackoffPolicy,
    FailurePolicy,
    GiveUp,
    RetryPolicy,
    _logevents,
)
from relayer.config import TargetConfig
from relayer.errors import StoreUnavailable
from relayer.reconciler import Reconciler
from relayer.scheduler import Scheduler
from relayer.testing import FakeTransport, build_scheduler, open_store, step, target
from relayer.transport import HTTPTransport, OutcomeKind
from tests._support import GatedStore, reactor_, result_of

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
RELAYER = ROOT / "relayer"

#: The logger methods, and the level each logs at.
METHOD_LEVELS = {
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "error": "error",
    "critical": "critical",
    "failure": "critical",
}
LEVELS = {level.name for level in LogLevel.iterconstants()}


# -- the catalogue in docs/operations.md -------------------------------------------------------


@attrs.frozen
class Documented:
    """One row of the catalogue: an event's name, its levels and its fields."""

    name: str
    levels: frozenset[str]
    fields: frozenset[str]


def logs_section() -> str:
    text = OPERATIONS.read_text()
    start = text.index("\n## Logs\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def subsection(title: str) -> str:
    section = logs_section()
    start = section.index(f"\n### {title}\n")
    end = section.find("\n### ", start + 1)
    return section[start : end if end != -1 else len(section)]


def catalogue() -> dict[str, Documented]:
    rows: dict[str, Documented] = {}
    for line in logs_section().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"a row of the catalogue has {len(cells)} cells: {line}"
        name = cells[0].strip("`")
        assert name not in rows, f"{name} is listed twice"
        levels = frozenset(level.strip() for level in cells[1].split(","))
        assert levels <= LEVELS, f"{name}: unknown levels {levels - LEVELS}"
        fields = frozenset(re.findall(r"`([^`]+)`", cells[2]))
        assert cells[2] == ", ".join(f"`{f}`" for f in re.findall(r"`([^`]+)`", cells[2]))
        rows[name] = Documented(name, levels, fields)
    return rows


CATALOGUE = catalogue()
NAMES = {
    value for key, value in vars(_logevents).items() if key.isupper() and isinstance(value, str)
}


# -- the log calls in relayer's code ------------------------------------------------------------


@attrs.frozen
class LogCall:
    """A call of a logger in relayer's code, as far as it can be read without running it."""

    where: str
    #: The event names it may log; None if ``relayer_event`` is not a constant of _logevents.
    names: frozenset[str] | None
    levels: frozenset[str]
    fields: frozenset[str]
    event: ast.expr | None


def _is_logger(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "log") or (
        isinstance(node, ast.Name) and node.id == "log"
    )


def _event_names(node: ast.expr) -> frozenset[str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.value.id == "ev":
            return frozenset({getattr(_logevents, node.attr)})
    if isinstance(node, ast.IfExp):
        body, orelse = _event_names(node.body), _event_names(node.orelse)
        if body is not None and orelse is not None:
            return body | orelse
    return None


def _levels(node: ast.expr) -> frozenset[str]:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        assert node.value.id == "LogLevel", ast.unparse(node)
        return frozenset({node.attr})
    assert isinstance(node, ast.IfExp), ast.unparse(node)
    return _levels(node.body) | _levels(node.orelse)


def log_calls() -> list[LogCall]:
    calls = []
    for path in sorted(RELAYER.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and _is_logger(node.func.value)
            ):
                continue
            method = node.func.attr
            assert method in METHOD_LEVELS or method == "emit", ast.unparse(node)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            assert None not in keywords, f"{where}: fields given as **kwargs"
            if method == "emit":
                levels = _levels(node.args[0])
            elif "level" in keywords:
                levels = _levels(keywords.pop("level"))
            else:
                levels = frozenset({METHOD_LEVELS[method]})
            event = keywords.pop("relayer_event", None)
            names = _event_names(event) if event is not None else None
            fields = frozenset(k for k in keywords if k is not None)
            calls.append(LogCall(where, names, levels, fields, event))
    return calls


LOG_CALLS = log_calls()


def reconciler_event_names() -> frozenset[str]:
    """The names a Reconciler logs its failed sweeps under: its default, and those it is given."""
    names = {inspect.signature(Reconciler).parameters["event"].default}
    for path in RELAYER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Reconciler"
            ):
                given = [k.value for k in node.keywords if k.arg == "event"] + node.args[5:6]
                for value in given:
                    resolved = _event_names(value)
                    assert resolved is not None, ast.unparse(node)
                    names |= resolved
    return frozenset(names)


def resolved_calls() -> list[tuple[LogCall, frozenset[str]]]:
    resolved = []
    for call in LOG_CALLS:
        names = call.names
        if names is None:
            # The reconciler logs under the name it was made with.
            assert call.where.startswith("relayer/reconciler.py"), call.where
            assert call.event is not None and ast.unparse(call.event) == "self._event"
            names = reconciler_event_names()
        resolved.append((call, names))
    return resolved


def test_there_are_log_calls_to_check() -> None:
    assert len(LOG_CALLS) > 40
    assert len(CATALOGUE) > 30


def test_every_log_call_names_its_event() -> None:
    unnamed = [call.where for call in LOG_CALLS if call.event is None]
    assert unnamed == []
    dynamic = [call.where for call in LOG_CALLS if call.names is None]
    assert all(where.startswith("relayer/reconciler.py") for where in dynamic), dynamic


def test_the_catalogue_lists_every_name_and_no_other() -> None:
    assert set(CATALOGUE) == NAMES


def test_every_documented_name_is_emitted_somewhere() -> None:
    emitted: set[str] = set()
    for _, names in resolved_calls():
        emitted |= names
    assert set(CATALOGUE) - emitted == set()
    assert emitted - set(CATALOGUE) == set()


def test_the_names_follow_one_scheme() -> None:
    for name in CATALOGUE:
        assert re.fullmatch(r"[a-z]+\.[a-z_]+", name), name
    for key, value in vars(_logevents).items():
        if key.isupper():
            assert key == value.upper().replace(".", "_"), (key, value)


def test_each_log_call_has_the_documented_fields_and_level() -> None:
    levels: dict[str, set[str]] = {}
    for call, names in resolved_calls():
        for name in names:
            documented = CATALOGUE[name]
            assert call.fields == documented.fields, (
                f"{call.where} logs {name} with {sorted(call.fields)}, "
                f"documented with {sorted(documented.fields)}"
            )
            assert call.levels <= documented.levels, (call.where, name, call.levels)
            levels.setdefault(name, set()).update(call.levels)
    for name, documented in CATALOGUE.items():
        assert levels[name] == documented.levels, (name, levels[name], documented.levels)


def test_every_documented_field_is_explained() -> None:
    explained = subsection("Event names and fields").split("| Event |", 1)[0]
    # The terms of the definition list: lines of names alone, such as "`delay`, `interval`".
    terms: set[str] = set()
    for line in re.findall(r"^`[^\n]+`$", explained, re.M):
        terms |= set(re.findall(r"`([^`]+)`", line))
    common = {"target", "txn", "events", "targets", "transactions", "outcome", "failure_class"}
    common |= {"reason", "error", "attempts", "failures", "delay", "interval", "latency"}
    common |= {"waited", "remaining", "what"}
    assert common <= terms
    used = set().union(*(d.fields for d in CATALOGUE.values()))
    assert common <= used
    # No field takes a name that Twisted gives a meaning: log_*, or "failure" (a legacy
    # observer's Failure), "format", "message", "isError", "why", "time", "system".
    reserved = {"failure", "format", "message", "isError", "why", "time", "system"}
    assert not {f for f in used if f.startswith("log_") or f in reserved}


# -- capturing log events -----------------------------------------------------------------------


@provider(ILogObserver)
class Captured:
    """Keeps the log events of relayer's namespaces."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if str(event.get("log_namespace", "")).startswith("relayer."):
            self.events.append(event)

    def named(self, name: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("relayer_event") == name]

    def names(self) -> list[str]:
        return [str(e.get("relayer_event")) for e in self.events]

    def at(self, level: LogLevel) -> list[LogEvent]:
        return [e for e in self.events if e["log_level"] is level]

    def check_all(self) -> None:
        """Every event has a documented name, with exactly its documented fields."""
        assert self.events
        for event in self.events:
            assert_documented(event)


def fields_of(event: LogEvent) -> dict[str, Any]:
    return {k: v for k, v in event.items() if not k.startswith("log_") and k != "relayer_event"}


def assert_documented(event: LogEvent) -> None:
    name = event.get("relayer_event")
    assert name in CATALOGUE, f"an event without a documented name: {event.get('log_format')}"
    documented = CATALOGUE[name]
    fields = fields_of(event)
    assert set(fields) == documented.fields, (name, sorted(fields))
    assert event["log_level"].name in documented.levels, (name, event["log_level"])
    for key, value in fields.items():
        assert value is None or isinstance(value, (str, int, float)), (name, key, value)
    # The message reads as it did: every field it names is there.
    assert "{" not in formatEvent(event).replace("{{", ""), formatEvent(event)


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured()
    globalLogPublisher.addObserver(captured)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured)


def stop(h: Any) -> None:
    result_of(h.scheduler.stop())


# -- key scenarios ------------------------------------------------------------------------------


def test_a_delivery_is_logged_at_debug(logs: Captured, db_path: Any) -> None:
    h = build_scheduler(["bridge"], path=db_path)
    try:
        h.scheduler.submit("bridge", {"body": "hello"})
        step(h.clock, 1)
        [received] = h.transport["bridge"].received
        [delivered] = logs.named("txn.delivered")
        assert delivered["log_level"] is LogLevel.debug
        assert fields_of(delivered) == {
            "target": "bridge",
            "txn": received.txn_id,
            "events": 1,
            "attempts": 1,
            "outcome": "delivered",
            "latency": delivered["latency"],
        }
        assert delivered["latency"] >= 0
        assert formatEvent(delivered) == (
            f"Transaction {received.txn_id} of 1 events to bridge: delivered (attempt 1)"
        )
        [started] = logs.named("scheduler.started")
        assert started["targets"] == 1
        # Nothing above info for a healthy delivery.
        assert [e for e in logs.events if e["log_level"] > LogLevel.info] == []
    finally:
        stop(h)
    assert logs.named("scheduler.stopped")
    logs.check_all()


def test_an_accepted_transaction_is_logged_as_such(logs: Captured, db_path: Any) -> None:
    h = build_scheduler(["bridge"], path=db_path)
    try:
        h.transport["bridge"].never_confirm()
        h.scheduler.submit("bridge", {"body": "hello"})
        step(h.clock, 1)
        [accepted] = logs.named("txn.accepted")
        assert accepted["outcome"] == OutcomeKind.ACCEPTED.value
        assert accepted["target"] == "bridge"
        assert logs.named("txn.delivered") == []
    finally:
        stop(h)
    logs.check_all()


def test_an_outage_logs_down_once_then_retries_at_info_then_up(
    logs: Captured, db_path: Any
) -> None:
    h = build_scheduler(["bridge"], path=db_path)
    try:
        h.transport["bridge"].down()
        h.scheduler.submit("bridge", {"body": "hello"})
        step(h.clock, 120)
        [down] = logs.named("target.down")
        txn_id = down["txn"]
        assert isinstance(txn_id, int)
        assert down["log_level"] is LogLevel.warn
        assert fields_of(down) == {
            "target": "bridge",
            "txn": txn_id,
            "events": 1,
            "outcome": "retry",
            "failure_class": "connection",
            "reason": down["reason"],
            "attempts": 1,
            "failures": 1,
            "delay": 2.0,
        }
        assert "refused" in down["reason"]
        assert formatEvent(down) == (
            f"bridge is DOWN: transaction {txn_id} failed ({down['reason']}); retrying in 2.0s"
        )
        retries = logs.named("txn.retry_failed")
        assert len(retries) >= 4
        assert all(e["log_level"] is LogLevel.info for e in retries)
        assert [e["failures"] for e in retries] == list(range(2, len(retries) + 2))
        assert [e["attempts"] for e in retries] == list(range(2, len(retries) + 2))
        assert [e["delay"] for e in retries[:3]] == [4.0, 8.0, 16.0]
        assert {e["txn"] for e in retries} == {txn_id}
        # However long the outage, one line at warn.
        assert [e["relayer_event"] for e in logs.events if e["log_level"] >= LogLevel.warn] == [
            "target.down"
        ]

        h.transport["bridge"].up()
        step(h.clock, 600)
        assert h.transport["bridge"].events == [{"body": "hello"}]
        [up] = logs.named("target.up")
        assert up["log_level"] is LogLevel.info
        assert fields_of(up) == {"target": "bridge"}
        assert formatEvent(up) == "bridge is UP: its backlog is delivered"
        [delivered] = logs.named("txn.delivered")
        assert delivered["txn"] == txn_id
        assert delivered["attempts"] == len(retries) + 2
        assert logs.names().index("txn.delivered") < logs.names().index("target.up")
    finally:
        stop(h)
    logs.check_all()


def test_a_refused_transaction_is_logged_as_a_dead_letter(logs: Captured, db_path: Any) -> None:
    h = build_scheduler(["bridge"], path=db_path, max_events=1)
    try:
        h.transport["bridge"].respond(400)
        h.scheduler.submit("bridge", {"n": 0})
        h.scheduler.submit("bridge", {"n": 1})
        step(h.clock, 10)
        assert h.transport["bridge"].events == [{"n": 1}]
        [dead] = logs.named("txn.dead_lettered")
        assert dead["log_level"] is LogLevel.warn
        assert fields_of(dead) == {
            "target": "bridge",
            "txn": dead["txn"],
            "events": 1,
            "outcome": "permanent",
            "failure_class": "rejected",
            "reason": "HTTP 400",
            "attempts": 1,
            "failures": 1,
        }
        dead_letters = result_of(h.scheduler.dead_letters("bridge"))
        assert [d.txn_id for d in dead_letters] == [dead["txn"]]
        assert logs.named("target.down") == []
    finally:
        stop(h)
    logs.check_all()


def test_a_block_and_a_disable_are_logged(logs: Captured, db_path: Any) -> None:
    give_up = RetryPolicy(
        backoff=BackoffPolicy.constant(5.0), give_up=(GiveUp(attempts=2, then="disable"),)
    )
    h = build_scheduler(
        [
            target("blk", failure_policy=FailurePolicy.BLOCK),
            target("off", retry_policy=give_up),
        ],
        path=db_path,
    )
    try:
        h.transport["blk"].respond(422)
        h.transport["off"].fail_with(500)
        h.scheduler.submit("blk", {"n": 0})
        h.scheduler.submit("off", {"n": 0})
        step(h.clock, 60)
        [blocked] = logs.named("target.blocked")
        assert blocked["log_level"] is LogLevel.warn
        assert fields_of(blocked) == {
            "target": "blk",
            "txn": blocked["txn"],
            "events": 1,
            "outcome": "permanent",
            "failure_class": "rejected",
            "reason": "HTTP 422",
            "attempts": 1,
            "failures": 1,
        }
        assert "BLOCKED" in formatEvent(blocked)
        [disabled] = logs.named("target.disabled")
        assert disabled["log_level"] is LogLevel.warn
        assert disabled["target"] == "off"
        assert disabled["failure_class"] == "server_error"
        assert disabled["failures"] == 2
        assert "HTTP 500" in disabled["reason"]
        [down] = logs.named("target.down")
        assert down["target"] == "off"
        assert down["txn"] == disabled["txn"]
        states = {s.target_id: s.state.name for s in result_of(h.scheduler.status())}
        assert states == {"blk": "BLOCKED", "off": "DISABLED"}
    finally:
        stop(h)
    logs.check_all()


def test_a_split_is_logged(logs: Captured, db_path: Any) -> None:
    h = build_scheduler(["bridge"], path=db_path)
    try:
        h.transport["bridge"].respond(413)
        result_of(h.scheduler.submit_many([("bridge", {"n": 0}), ("bridge", {"n": 1})]))
        step(h.clock, 10)
        assert h.transport["bridge"].events == [{"n": 0}, {"n": 1}]
        [split] = logs.named("txn.split")
        assert split["log_level"] is LogLevel.info
        assert split["events"] == 2
        assert split["outcome"] == "too_large"
        assert split["failure_class"] == "too_large"
    finally:
        stop(h)
    logs.check_all()


def test_a_store_outage_is_logged_at_warn_once_per_target(logs: Captured, db_path: Any) -> None:
    clock = Clock()
    store = GatedStore(open_store(clock, db_path))
    scheduler = Scheduler(clock, store, FakeTransport(clock), [target("a"), target("b")])
    assert scheduler.start().called
    try:
        unavailable = StoreUnavailable("the database is unavailable: gone")
        # The first write also claims the idle targets' first transactions; the retries
        # store the events alone.
        store.fail_calls("add_events_claiming", unavailable, 1)
        store.fail_calls("add_events", unavailable, 1)
        store.fail_calls("claim", unavailable, 8)
        submitted = scheduler.submit_many([("a", {"n": 0}), ("b", {"n": 0})])
        step(clock, 120)
        assert len(result_of(submitted)) == 2
        retrying = logs.named("submit.retrying")
        assert [(e["log_level"], e["events"], e["error"]) for e in retrying] == [
            (LogLevel.warn, 2, "the database is unavailable: gone")
        ] * 2
        paused = logs.named("delivery.paused")
        assert len(paused) == 8
        for name in ("a", "b"):
            levels = [e["log_level"] for e in paused if e["target"] == name]
            assert levels[0] is LogLevel.warn
            assert set(levels[1:]) == {LogLevel.info}
        assert sorted(e["target"] for e in logs.named("txn.delivered")) == ["a", "b"]
    finally:
        result_of(scheduler.stop())
    logs.check_all()


# -- JSON ---------------------------------------------------------------------------------------


def test_events_are_written_as_json_lines(logs: Captured, db_path: Any) -> None:
    out = io.StringIO()
    json_lines = jsonFileLogObserver(out, recordSeparator="")
    globalLogPublisher.addObserver(json_lines)
    try:
        h = build_scheduler(["bridge"], path=db_path)
        try:
            h.transport["bridge"].down()
            h.scheduler.submit("bridge", {"body": "hello"})
            step(h.clock, 10)
            h.transport["bridge"].up()
            step(h.clock, 60)
        finally:
            stop(h)
    finally:
        globalLogPublisher.removeObserver(json_lines)
    lines = out.getvalue().splitlines()
    objects = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) for o in objects)
    ours = [o for o in objects if str(o.get("log_namespace", "")).startswith("relayer.")]
    assert [o.get("relayer_event") for o in ours] == logs.names()
    [down] = [o for o in ours if o["relayer_event"] == "target.down"]
    assert down["target"] == "bridge"
    assert isinstance(down["txn"], int)
    assert down["failure_class"] == "connection"
    delivered = [o for o in ours if o["relayer_event"] == "txn.delivered"]
    assert [(o["target"], o["txn"]) for o in delivered] == [("bridge", down["txn"])]
    # Read back, each event gives its message again.
    read_back = list(eventsFromJSONLogFile(io.StringIO(out.getvalue()), recordSeparator=""))
    ours_back = [e for e in read_back if str(e.get("log_namespace", "")).startswith("relayer.")]
    assert [formatEvent(e) for e in ours_back] == [formatEvent(e) for e in logs.events]
    logs.check_all()


def test_each_event_is_one_json_object_on_one_line(logs: Captured, db_path: Any) -> None:
    h = build_scheduler(["bridge", "dl"], path=db_path)
    try:
        h.transport["bridge"].down()
        h.transport["dl"].respond(400)
        h.scheduler.submit("bridge", {"body": "line\nbreak"})
        h.scheduler.submit("dl", {"body": "x"})
        step(h.clock, 1)
        h.scheduler.submit("dl", {"body": "y"})
        step(h.clock, 30)
        assert h.transport["dl"].events == [{"body": "y"}]
    finally:
        stop(h)
    for event in logs.events:
        text = eventAsJSON(event)
        assert "\n" not in text
        loaded = json.loads(text)
        assert loaded["relayer_event"] == event["relayer_event"]
        assert fields_of(loaded) == fields_of(event)
        if "txn" in CATALOGUE[event["relayer_event"]].fields:
            assert loaded["target"] in ("bridge", "dl")
            assert isinstance(loaded["txn"], int)
        assert formatEvent(eventFromJSON(text)) == formatEvent(event)
    assert {"target.down", "txn.dead_lettered", "txn.delivered"} <= set(logs.names())
    logs.check_all()


def _python_block(section: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.M | re.S)
    assert len(blocks) == 1, f"expected one python example, found {len(blocks)}"
    return str(blocks[0])


def _run(source: str, cwd: Path) -> str:
    script = cwd / "example.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RELAYER_TEST_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_json_recipe_runs_as_documented(tmp_path: Path) -> None:
    section = subsection("JSON logs")
    out = _run(_python_block(section), tmp_path)
    documented = re.search(r"It prints\n\n```text\n(.*?)```", section, re.S)
    assert documented is not None
    assert out == documented.group(1)
    lines = (tmp_path / "relayer-log.json").read_text().splitlines()
    objects = [json.loads(line) for line in lines]
    [down] = [o for o in objects if o.get("relayer_event") == "target.down"]
    assert (down["target"], down["txn"], down["log_level"]["name"]) == ("bridge", 1, "warn")
    # Filtered at info: no debug line.
    assert not [o for o in objects if o["log_level"]["name"] == "debug"]
    # The sample line in the docs is what the file holds, but for the time.
    sample = json.loads(re.findall(r"^```json\n(.*?)\n```$", section, re.M | re.S)[0])
    for key in ("log_time", "log_flattened", "log_logger", "log_source"):
        sample.pop(key, None)
        down.pop(key, None)
    assert sample == down


def test_the_stdlib_recipe_carries_the_names_and_fields(tmp_path: Path) -> None:
    recipe = _python_block(subsection("To the standard library's logging"))
    check = """
import json

from relayer.testing import build_scheduler


class Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


keep = Keep()
logging.getLogger("relayer").addHandler(keep)
h = build_scheduler(["bridge"])
h.transport["bridge"].fail_with(503)
h.scheduler.submit("bridge", {"body": "hello"})
h.clock.pump([1.0] * 10)
for record in keep.records:
    print(json.dumps([record.levelname, record.name, record.relayer_event,
                      record.relayer_fields.get("txn"), record.getMessage()]))
"""
    out = _run(recipe + check, tmp_path)
    records = [json.loads(line) for line in out.splitlines()]
    down = [r for r in records if r[2] == "target.down"]
    assert down == [
        [
            "WARNING",
            "relayer.controller.TransactionController",
            "target.down",
            1,
            "bridge is DOWN: transaction 1 failed (HTTP 503); retrying in 2.0s",
        ]
    ]
    assert {r[2] for r in records} >= {"scheduler.started", "target.down", "txn.retry_failed"}


# -- the HTTP client's factories ------------------------------------------------------------------


@provider(ILogObserver)
class Everything:
    """Keeps every log event, formatted."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)
        self.texts.append(formatEvent(event) or "")


class Answer(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def render(self, request: Request) -> bytes:
        self.requests += 1
        # Every other answer closes its connection, so that the pool opens new ones.
        if self.requests % 2:
            request.setHeader(b"Connection", b"close")
        return b"{}"


@pytest_twisted.ensureDeferred
async def test_http_sends_do_not_log_starting_factory() -> None:
    reactor = reactor_()
    everything = Everything()
    globalLogPublisher.addObserver(everything)
    resource = Answer()
    site = Site(resource)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    transport = HTTPTransport(reactor)
    try:
        config = TargetConfig(
            "t1", base_url=f"http://127.0.0.1:{port.getHost().port}", token="a-token"
        )
        for txn_id in range(1, 7):
            d: Deferred[Any] = transport.send(config, txn_id, b'{"events":[]}')
            outcome = await d.addTimeout(30, reactor)
            assert outcome.kind is OutcomeKind.DELIVERED
        await transport.close()
    finally:
        await port.stopListening()
        globalLogPublisher.removeObserver(everything)
    assert resource.requests == 6
    factory_lines = [t for t in everything.texts if "factory" in t.lower()]
    assert factory_lines == []
    responses = [e for e in everything.events if e.get("relayer_event") == "http.response"]
    assert [e["status"] for e in responses] == [200] * 6
    for event in responses:
        assert_documented(event)
        assert event["log_level"] is LogLevel.debug
        assert event["target"] == "t1"
        assert "a-token" not in json.dumps(fields_of(event))
