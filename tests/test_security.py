"""
Security: the token never leaks; only http(s) targets; ids are safe in URLs; event content never
reaches SQL as anything but a parameter.

TLS certificates are verified by default: see
``tests/test_network_faults.py::test_a_self_signed_certificate_is_refused``.
"""

from __future__ import annotations

import ast
import json
import os
import sqlite3
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from _support import DEADLINE, eventually, reactor_
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer, provider

import relayer
from relayer import (
    BackoffPolicy,
    FailurePolicy,
    HTTPTransport,
    InvalidTarget,
    ITransport,
    Scheduler,
    SendOutcome,
    SQLiteStore,
    TargetConfig,
    TargetState,
)
from relayer._encoding import events_of_body
from relayer.testing import Receiver, build_scheduler, listen_receiver, open_store, target
from relayer.transport.http import transaction_url

TOKEN = "s3cr3t-T0KEN-xyz"
FAST = BackoffPolicy(initial=0.05, maximum=0.2)
ROOT = Path(__file__).resolve().parent.parent


@provider(ILogObserver)
class Everything:
    """Keeps every log event as text: its formatted message, its fields and any traceback."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        self.texts.append(formatEvent(event) or "")
        self.texts.append(repr(event))
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            self.texts.append(failure.getTraceback())


@pytest.fixture
def logs() -> Any:
    everything = Everything()
    globalLogPublisher.addObserver(everything)
    try:
        yield everything
    finally:
        globalLogPublisher.removeObserver(everything)


def assert_no_token(texts: list[str]) -> None:
    for text in texts:
        assert TOKEN not in text, text
        # Not even a good part of it.
        assert TOKEN[:8] not in text, text


# -- servers that echo what they were sent ---------------------------------------------------------


class Echo(Resource):
    """Answers every request with ``status`` and a body that repeats its headers."""

    isLeaf = True

    def __init__(self, status: int, padding: int = 0, location: str | None = None) -> None:
        super().__init__()
        self.status = status
        self.padding = padding
        self.location = location
        self.requests = 0

    def render(self, request: Request) -> bytes:
        self.requests += 1
        request.setResponseCode(self.status)
        if self.location is not None:
            request.setHeader(b"Location", self.location.encode())
        auth = (request.getHeader(b"Authorization") or b"").decode()
        echoed = {
            "error": "x" * self.padding + "you sent " + auth,
            "headers": {
                k.decode(): [v.decode() for v in vs]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
        }
        return json.dumps(echoed).encode()


class Silent(Resource):
    isLeaf = True

    def render(self, request: Request) -> int:
        return NOT_DONE_YET


def listen(resource: Resource) -> tuple[Any, str]:
    site = Site(resource)
    site.noisy = False
    port = reactor_().listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


async def outcome_text(d: Deferred[Any]) -> list[str]:
    """Everything a send's result shows: the outcome's reason, or the error and traceback."""
    try:
        result = await d.addTimeout(DEADLINE, reactor_())
    except Exception:
        f = Failure()
        return [str(f.value), repr(f.value), f.getTraceback(), f.getErrorMessage()]
    return [repr(result), result.reason]


# -- the token -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_token_never_appears(tmp_path: Path, logs: Everything) -> None:
    reactor = reactor_()
    resources = {
        "echo400": Echo(400),
        "echo401": Echo(401),
        "echo500": Echo(500),
        "echo503": Echo(503),
        "echo413": Echo(413),
        "hang": Silent(),
    }
    elsewhere = Echo(200)
    elsewhere_port, elsewhere_url = listen(elsewhere)
    resources["redirect"] = Echo(307, location=elsewhere_url + "/_matrix/app/v1/transactions/1")
    ports = {}
    urls = {}
    for name, resource in resources.items():
        ports[name], urls[name] = listen(resource)
    closed_port, urls["refused"] = listen(Resource())
    await closed_port.stopListening()
    receiver = Receiver(TOKEN, order_key="n")
    ok = listen_receiver(reactor, receiver, prefix="hooks")
    urls["ok"] = ok.base_url

    configs = [
        TargetConfig(name, url, TOKEN, backoff=FAST, request_timeout=0.3)
        for name, url in sorted(urls.items())
    ]
    configs.append(
        TargetConfig(
            "blocked",
            # Another registration with the same receiver: one target is one registration.
            urls["echo400"] + "/blocked",
            TOKEN,
            backoff=FAST,
            failure_policy=FailurePolicy.BLOCK,
        )
    )
    transport = HTTPTransport(reactor)
    store = SQLiteStore.open_path(reactor, tmp_path / "relayer.db")
    scheduler = Scheduler(reactor, store, transport, configs)
    texts: list[str] = []
    try:
        # Each fault, straight through the transport: reasons, errors and tracebacks.
        for config in configs:
            if config.target_id != "ok":
                texts += await outcome_text(transport.send(config, 1, b'{"events":[]}'))

        await scheduler.start()
        for config in configs:
            await scheduler.submit_many([(config.target_id, {"n": n}) for n in range(3)])

        async def settled() -> bool:
            states = {s.target_id: s for s in await scheduler.status()}
            return (
                states["ok"].pending_events == 0
                and states["echo400"].dead_letters >= 1
                and states["blocked"].state is TargetState.BLOCKED
                and all(
                    states[t].state is TargetState.DOWN and states[t].consecutive_failures >= 2
                    for t in ("echo500", "echo503", "hang", "refused", "redirect")
                )
            )

        await eventually(settled, "every target to settle")
        statuses = await scheduler.status()
        texts += [repr(s) for s in statuses]
        texts += [repr(await scheduler.dead_letters(t)) for t in ("echo400", "echo401", "echo413")]
        texts += [d.reason for t in ("echo400", "echo401") for d in await scheduler.dead_letters(t)]
        texts += [repr(c) for c in configs] + [str(c) for c in configs]
        texts += [repr(scheduler), repr(store), repr(transport), repr(scheduler.targets)]

        # The servers did echo the token back; it was scrubbed from what relayer kept.
        by_id = {s.target_id: s for s in statuses}
        assert by_id["echo500"].last_error is not None
        assert "[REDACTED]" in by_id["echo500"].last_error
        assert resources["echo500"].requests >= 2  # type: ignore[attr-defined]
        # A redirect is an answer, not followed: the token never went elsewhere.
        assert elsewhere.requests == 0
        assert receiver.verify([{"n": n} for n in range(3)]).ok
    finally:
        if scheduler.running:
            await scheduler.stop()
        await transport.close()
        for port in [*ports.values(), elsewhere_port]:
            await port.stopListening()
        await ok.stop()
    assert_no_token(texts)
    assert_no_token(logs.texts)
    assert any("echo500" in t for t in logs.texts)  # the log did see the failures


@pytest_twisted.ensureDeferred
async def test_a_token_cut_at_the_snippet_limit_leaks_no_part_of_it() -> None:
    # The first 200 bytes of an error body are kept for the reason. Pad the echo so that the
    # token straddles that limit, at every offset.
    transport = HTTPTransport(reactor_())
    texts: list[str] = []
    ports = []
    try:
        for padding in range(150, 200):
            port, url = listen(Echo(500, padding=padding))
            ports.append(port)
            texts += await outcome_text(transport.send(TargetConfig("t", url, TOKEN), 1, b"{}"))
    finally:
        await transport.close()
        for port in ports:
            await port.stopListening()
    assert_no_token(texts)
    for n in range(6, len(TOKEN)):
        assert not any(t.endswith(TOKEN[:n] + "...") or TOKEN[:n] + "..." in t for t in texts)


def test_configuration_errors_never_echo_the_token() -> None:
    attempts: list[Callable[[], Any]] = [
        lambda: TargetConfig("t", f"http://user:{TOKEN}@h.example", TOKEN),
        lambda: TargetConfig("t", f"http://{TOKEN}@h.example", TOKEN),
        lambda: TargetConfig("t", f"http://h.example/?access_token={TOKEN}", TOKEN),
        lambda: TargetConfig("t", f"http://h.example/#{TOKEN}", TOKEN),
        lambda: TargetConfig("t", "http://h.example", TOKEN + " "),
        lambda: TargetConfig("t", "http://h.example", TOKEN + "\u00e9"),
        lambda: TargetConfig("t", "http://h.example", TOKEN, max_events=0),
        lambda: TargetConfig("t", "ftp://h.example", TOKEN),
    ]
    texts = []
    for attempt in attempts:
        with pytest.raises(InvalidTarget) as caught:
            attempt()
        texts += [
            str(caught.value),
            repr(caught.value),
            "".join(traceback.format_exception(caught.value)),
        ]
    assert_no_token(texts)


def test_reprs_never_show_the_token(tmp_path: Path) -> None:
    config = target("t", token=TOKEN)
    h = build_scheduler([config], path=tmp_path / "relayer.db")
    h.scheduler.submit("t", {"n": 1})
    texts = [
        repr(config),
        str(config),
        repr(h.scheduler),
        repr(h.transport),
        repr(h.transport["t"]),
    ]
    texts += [repr(h.scheduler.targets), repr(h)]
    assert_no_token(texts)


def test_the_demo_never_prints_a_token(tmp_path: Path) -> None:
    # The demo makes random tokens; fix them to a known one, to look for it in the output.
    program = (
        "import secrets, sys\n"
        f"secrets.token_urlsafe = lambda n=None: {TOKEN!r}\n"
        "from relayer.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            program,
            "demo",
            "--events",
            "200",
            "--outage",
            "0.5",
            "--log",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "VERIFIED" in output
    assert "is DOWN" in output  # the log was on, and saw the outage
    assert_no_token([output])


# -- URLs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h.example",
        "file:///etc/passwd",
        "gopher://h.example",
        "javascript:alert(1)",
        "data:text/plain,hi",
        "ws://h.example",
        "wss://h.example",
        "http+unix://%2Fvar%2Frun%2Fsock",
        "//h.example/no-scheme",
        "h.example",
        "",
    ],
)
def test_only_http_and_https_targets(url: str) -> None:
    with pytest.raises(InvalidTarget):
        TargetConfig("t", url, TOKEN)


@pytest.mark.parametrize(
    "url", ["http://h.example", "https://h.example:8448/p", "HTTPS://H.example"]
)
def test_http_and_https_targets_are_accepted(url: str) -> None:
    assert TargetConfig("t", url, TOKEN).base_url == url


def test_transaction_ids_are_safe_in_the_path() -> None:
    assert (
        transaction_url("https://h.example/prefix/", 42)
        == "https://h.example/prefix/_matrix/app/v1/transactions/42"
    )
    assert (
        transaction_url("https://h.example", 1) == "https://h.example/_matrix/app/v1/transactions/1"
    )
    # Whatever it is given, what follows "transactions/" is one encoded path segment.
    for odd in ("../../admin", "1?x=y", "1#f", "a/b", "%2e%2e"):
        url = transaction_url("https://h.example/p", odd)  # type: ignore[arg-type]
        tail = url.split("/transactions/", 1)[1]
        assert "/" not in tail and "?" not in tail and "#" not in tail
    # The transport sends only int ids.
    transport = HTTPTransport(reactor_())
    with pytest.raises(TypeError):
        transport.send(target("t"), "1/../2", b"{}")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        transport.send(target("t"), True, b"{}")


@pytest_twisted.ensureDeferred
async def test_target_ids_never_reach_the_url_and_a_path_prefix_is_kept(tmp_path: Path) -> None:
    reactor = reactor_()
    receiver = Receiver(TOKEN, order_key="n")
    server = listen_receiver(reactor, receiver, prefix="hooks")
    assert server.base_url.endswith("/hooks")
    odd_id = "../../x?y=1#z %2F'; DROP TABLE relayer_queue; --"
    transport = HTTPTransport(reactor)
    store = SQLiteStore.open_path(reactor, tmp_path / "relayer.db")
    scheduler = Scheduler(
        reactor, store, transport, [TargetConfig(odd_id, server.base_url + "/", TOKEN)]
    )
    paths: list[bytes] = []
    original = receiver.render_PUT

    def record(request: Request) -> Any:
        paths.append(request.uri)
        return original(request)

    receiver.render_PUT = record  # type: ignore[method-assign]
    try:
        await scheduler.start()
        await scheduler.submit_many([(odd_id, {"n": n}) for n in range(3)])
        await eventually(lambda: len(receiver.events) == 3, "the events to arrive")
        assert receiver.violations == [] and receiver.rejected == 0
        assert paths and all(p.startswith(b"/hooks/_matrix/app/v1/transactions/") for p in paths), (
            paths
        )
        assert all(p.rsplit(b"/", 1)[1].isdigit() for p in paths)
    finally:
        if scheduler.running:
            await scheduler.stop()
        await transport.close()
        await server.stop()


# -- SQL -------------------------------------------------------------------------------------------

NASTY = [
    "'; DROP TABLE relayer_queue; --",
    '" OR 1=1 --',
    "Robert'); DELETE FROM relayer_transactions WHERE ('1'='1",
    "\x00nul\x00 in the middle\x00",
    "back\\slash \\' \\\" \\x00",
    "%s %(x)s ? :name $1 {0}",
    "\u202e right-to-left \ufeff bom \U0001f600",
    "line\nbreak\r\n,\n",  # the store's own separator, inside a string
    "],\n[",
]


def test_event_content_round_trips_byte_exactly(db_path: Path) -> None:
    ids = ["t'; DROP TABLE relayer_targets; --", 'quote"target', "%s?:x"]
    h = build_scheduler(
        [target(t, base_url=f"http://h.example/{n}", max_events=3) for n, t in enumerate(ids)],
        path=db_path,
    )
    events = {
        t: [
            {"s": s, n: s, "n": i}
            for i, (s, n) in enumerate(zip(NASTY, NASTY[1:] + NASTY[:1], strict=True))
        ]
        for t in ids
    }
    for t in ids:
        h.transport[t].down()  # keep them in the store, then restart
    h.scheduler.submit_many([(t, e) for t in ids for e in events[t]])
    h = h.restart(stop=False)
    for t in ids:
        h.transport[t].up()
        h.scheduler.wake(t)
    h.clock.advance(1000)
    for t in ids:
        fake = h.transport[t]
        assert fake.events == events[t]
        # Byte for byte: each event's bytes are its compact JSON encoding, unchanged.
        sent = [e for r in fake.received for e in events_of_body(r.body)]
        expected = [
            json.dumps(e, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            for e in events[t]
        ]
        assert sent == expected
    statuses = {s.target_id: s for s in h.scheduler.status().result}  # type: ignore[attr-defined]
    assert set(statuses) == set(ids)
    assert all(s.pending_events == 0 and s.state is TargetState.UP for s in statuses.values())
    if not isinstance(db_path, Path):
        return  # PostgreSQL: the status above read every table back
    # The database is intact: every table is there, and its integrity check passes.
    with sqlite3.connect(h.path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {
            "relayer_meta",
            "relayer_targets",
            "relayer_events",
            "relayer_runs",
            "relayer_txns",
        } <= tables
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert {r[0] for r in db.execute("SELECT target_id FROM relayer_targets")} == set(ids)


def test_dead_letter_reasons_and_bodies_round_trip(db_path: Path) -> None:
    h = build_scheduler(["t"], path=db_path, max_events=100)
    h.transport["t"].respond(400)
    h.scheduler.submit_many([("t", {"s": s}) for s in NASTY])
    letters = h.scheduler.dead_letters("t").result  # type: ignore[attr-defined]
    assert len(letters) == 1
    assert [json.loads(e)["s"] for e in events_of_body(letters[0].body)] == NASTY
    assert h.scheduler.replay("t").result == len(NASTY)  # type: ignore[attr-defined]
    assert [e["s"] for e in h.transport["t"].events] == NASTY


def _sql_calls(path: Path) -> list[tuple[str, int, str]]:
    """Every call that hands a SQL string to the database, whose string is not a literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in ("text", "execute", "exec_driver_sql", "executescript"):
            continue
        sql = node.args[0]
        if isinstance(sql, ast.Constant) and isinstance(sql.value, str):
            continue
        if isinstance(sql, ast.Call) and (
            getattr(sql.func, "attr", None) == "text" or getattr(sql.func, "id", None) == "text"
        ):
            continue  # text(...) is checked as a call of its own
        if isinstance(sql, (ast.JoinedStr, ast.BinOp)) or (
            isinstance(sql, ast.Call) and getattr(sql.func, "attr", None) == "format"
        ):
            found.append((path.name, node.lineno, ast.unparse(sql)))
    return found


def test_no_sql_is_built_from_strings() -> None:
    # Statements are built with SQLAlchemy Core, which binds every value as a parameter. The only
    # SQL written as strings is fixed DDL and settings, and the few statements that interpolate
    # a value interpolate one that was checked against a strict pattern first.
    found = [
        call
        for folder in (ROOT / "relayer" / "store", ROOT / "relayer")
        for path in sorted(folder.glob("*.py"))
        for call in _sql_calls(path)
    ]
    allowed = {
        # An int, checked by sqlite_engine.
        ("sqlite.py", "f'PRAGMA busy_timeout = {busy_timeout_ms}'"),
        # One of FULL, NORMAL and EXTRA, checked by sqlite_engine.
        ("sqlite.py", "f'PRAGMA synchronous = {synchronous.upper()}'"),
        # A plain identifier, checked against a strict pattern.
        ("postgres.py", "f'CREATE SCHEMA IF NOT EXISTS \"{self._schema}\"'"),
        ("postgres.py", "f'LISTEN \"{self._channel}\"'"),
        ("postgres.py", "f'LISTEN \"{self._command_channel}\"'"),
        # Fixed DDL: relayer's own table, view and column names, from schema.ARCHIVED and the
        # table definitions.
        (
            "schema.py",
            "f'CREATE VIEW {view} AS SELECT {columns} FROM {live} UNION ALL SELECT {columns} "
            "FROM {archived}'",
        ),
    }
    assert {(name, sql) for name, _, sql in found} <= allowed, found


@pytest.mark.parametrize(
    "setting", [{"synchronous": "FULL; DROP TABLE x"}, {"busy_timeout_ms": "1; DROP TABLE x"}]
)
def test_interpolated_sqlite_settings_are_checked(tmp_path: Path, setting: dict[str, Any]) -> None:
    from relayer.store.sqlite import sqlite_engine

    with pytest.raises(relayer.ConfigurationError):
        sqlite_engine(str(tmp_path / "x.db"), **setting)


@pytest.mark.parametrize("schema", ['x"; DROP TABLE y; --', "a b", "ok\n", "", "1abc"])
def test_a_postgres_schema_name_is_a_plain_identifier(schema: str) -> None:
    from relayer.dbpool import ThreadedDatabasePool
    from relayer.store.postgres import PostgresStore, postgres_engine

    with pytest.raises(relayer.ConfigurationError):
        postgres_engine("postgresql://u@localhost/db", schema=schema)
    engine = postgres_engine("postgresql://u@localhost/db")
    try:
        with pytest.raises(relayer.ConfigurationError):
            PostgresStore(engine, ThreadedDatabasePool(reactor_()), schema=schema)
    finally:
        engine.dispose()


@implementer(ITransport)
class LeakyTransport:
    """A plugin transport whose exceptions and reasons repeat the token, as careless ones do."""

    def __init__(self) -> None:
        self.answers: list[Any] = []

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        answer = self.answers.pop(0) if self.answers else SendOutcome.delivered()
        if isinstance(answer, BaseException):
            return fail(answer)
        return succeed(answer)


@pytest.mark.parametrize("policy", [FailurePolicy.DEAD_LETTER, FailurePolicy.BLOCK])
def test_a_plugin_transport_cannot_leak_the_token(
    db_path: Path, logs: Everything, policy: FailurePolicy
) -> None:
    clock = Clock()
    transport = LeakyTransport()
    store = open_store(clock, db_path)
    config = TargetConfig("t", "http://t.example", TOKEN, backoff=FAST, failure_policy=policy)
    scheduler = Scheduler(clock, store, transport, [config], random=lambda: 0.0)
    assert scheduler.start().called
    texts: list[str] = []

    def last_error() -> str:
        d = scheduler.status()
        assert d.called
        error = d.result[0].last_error
        assert error is not None
        texts.append(error)
        return error

    transport.answers = [
        RuntimeError(f"could not authenticate with token {TOKEN}"),
        SendOutcome.retry(f"the target said: bad token {TOKEN}, try again"),
        SendOutcome.permanent(f"refused for {TOKEN}" + " padding" * 100),
    ]
    assert scheduler.submit("t", {"n": 1}).called
    assert "could not authenticate" in last_error() and "[REDACTED]" in last_error()
    clock.advance(0.05)
    assert "the target said" in last_error() and "[REDACTED]" in last_error()
    clock.advance(0.1)
    assert "refused for [REDACTED]" in last_error() and len(last_error()) <= 300
    dead = scheduler.dead_letters("t")
    assert dead.called
    texts += [d.reason for d in dead.result] + [repr(d) for d in dead.result]
    assert (len(dead.result) == 1) is (policy is FailurePolicy.DEAD_LETTER)
    assert any("padding" in t for t in logs.texts)  # the log did see the failures
    assert_no_token(texts)
    assert_no_token(logs.texts)
