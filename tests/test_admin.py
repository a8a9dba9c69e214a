"""
Tests of the admin HTTP API (:mod:`relayer.admin`).

The first part drives :class:`relayer.admin.AdminResource` in this process, on a fake clock:
the token, the errors, paging, a client that goes away. The second part calls every route over
HTTP on a scheduler running in another process (``tests/live_node.py --admin-port 0``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

import attrs
import pytest
import pytest_twisted
import treq
from _live import (
    PATIENCE,
    ROOT,
    LiveNode,
    LiveNodes,
    Receivers,
    child_env,
    wait_for,
    wait_until,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from relayer import (
    ConfigurationError,
    NotRunning,
    Scheduler,
    StoreUnavailable,
    TargetConfig,
    TargetState,
)
from relayer.admin import AdminResource, _predecessor
from relayer.testing import FakeTransport, build_scheduler, target

TOKEN = "admin-token-0123456789"


@attrs.frozen
class Answer:
    code: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(
    resource: AdminResource,
    method: str,
    path: str,
    *,
    token: str | None = TOKEN,
    authorization: str | None = None,
    headers: dict[str, str] | None = None,
    prepath: list[bytes] | None = None,
) -> Answer:
    """Render a request for ``path`` (under the resource), as twisted.web would route it."""
    raw, _, query = path.partition("?")
    segments = [unquote_to_bytes(s) for s in raw.encode("utf-8").split(b"/")[1:]] if raw else []
    request = DummyRequest(segments)
    request.prepath = prepath or []
    request.method = method.encode("ascii")
    request.args = parse_qs(query.encode("utf-8"), keep_blank_values=True)
    if authorization is None and token is not None:
        authorization = f"Bearer {token}"
    if authorization is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization.encode("utf-8")])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name.encode("ascii"), [value.encode("utf-8")])
    assert resource.render(request) is NOT_DONE_YET
    assert request.finished == 1, "the request was not answered at once"
    answer_headers = {
        k.decode("ascii").lower(): v[-1].decode("utf-8")
        for k, v in request.responseHeaders.getAllRawHeaders()
    }
    return Answer(request.responseCode or 200, answer_headers, b"".join(request.written))


@pytest.fixture
def harness(db_path: Path | str) -> Iterator[Any]:
    h = build_scheduler(["a", "b", "c"], path=db_path)
    yield h
    if h.scheduler.running:
        h.scheduler.stop()


@pytest.fixture
def admin(harness: Any) -> AdminResource:
    return AdminResource(harness.scheduler, TOKEN)


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["", "short", "x" * 15, "has a space in it!!", "tab\there-xxxxxxxxx"]
)
def test_a_missing_short_or_unprintable_token_is_refused(token: str) -> None:
    scheduler = Scheduler(reactor, object(), FakeTransport())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError) as e:
        AdminResource(scheduler, token)
    assert "token" in str(e.value)
    if token:
        assert token not in str(e.value)


def test_a_token_that_is_not_a_str_is_refused() -> None:
    scheduler = Scheduler(reactor, object(), FakeTransport())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="must be a str"):
        AdminResource(scheduler, b"0123456789abcdefghij")  # type: ignore[arg-type]


def test_metrics_without_an_exposition_method_are_refused(harness: Any) -> None:
    with pytest.raises(ConfigurationError, match="exposition"):
        AdminResource(harness.scheduler, TOKEN, metrics=object())  # type: ignore[arg-type]


# -- the token -------------------------------------------------------------------------------


def test_the_api_needs_the_token(admin: AdminResource) -> None:
    missing = call(admin, "GET", "/api/targets", token=None)
    assert missing.code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="relayer"'
    assert missing.json["error"] == "unauthorized"
    for authorization in (
        "Bearer not-the-token-at-all",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer",
        f"Bearer {TOKEN[:-1]}",
    ):
        wrong = call(admin, "GET", "/api/targets", authorization=authorization)
        assert wrong.code == 401, authorization
        assert wrong.headers["www-authenticate"].startswith("Bearer ")
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert TOKEN not in wrong.body.decode()
    assert call(admin, "GET", "/api/targets", authorization=f"bearer {TOKEN}").code == 200
    assert call(admin, "GET", "/api/targets").code == 200


def test_every_route_but_the_page_needs_the_token(admin: AdminResource) -> None:
    for method, path in [
        ("GET", "/api/targets/a"),
        ("POST", "/api/targets/a/wake"),
        ("POST", "/api/targets/a/replay"),
        ("GET", "/api/targets/a/dead-letters"),
        ("POST", "/api/targets/a/dead-letters/1/discard"),
        ("GET", "/api/targets/a/events"),
        ("GET", "/api/events/x"),
        ("GET", "/api/commands/1"),
        ("GET", "/metrics"),
        ("GET", "/no/such/route"),
    ]:
        assert call(admin, method, path, token=None).code == 401, path


def test_the_token_is_never_logged(harness: Any) -> None:
    class Broken:
        def exposition(self, accept: str) -> tuple[bytes, str]:
            raise RuntimeError("the metrics broke")

    admin = AdminResource(harness.scheduler, TOKEN, metrics=Broken())
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert call(admin, "GET", "/api/targets", authorization="Bearer wrong-token").code == 401
        answer = call(admin, "GET", "/metrics")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert answer.code == 500
    assert answer.json == {"error": "internal_error", "message": "see the server's log"}
    assert events, "the failure was not logged"
    logged = " ".join(formatEvent(e) + repr(e) for e in events)
    assert "the metrics broke" in logged
    assert TOKEN not in logged
    assert "wrong-token" not in logged


# -- the page --------------------------------------------------------------------------------


def test_the_page_is_served_without_the_token_and_holds_no_data(admin: AdminResource) -> None:
    answer = call(admin, "GET", "/", token=None)
    assert answer.code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    page = answer.body.decode("utf-8")
    assert "<title>relayer status</title>" in page
    for element in ('id="targets"', 'id="dead-letters"', 'id="event-form"', 'id="token-form"'):
        assert element in page
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy
    assert answer.headers["x-frame-options"] == "DENY"
    assert TOKEN not in page
    # Data is only ever set as text.
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert unsafe not in page
    # Nothing is downloaded from elsewhere.
    assert "http://" not in page and "https://" not in page
    head = call(admin, "HEAD", "/", token=None)
    assert head.code == 200 and head.body == b""
    assert call(admin, "POST", "/", token=None).code == 405


def test_the_page_asked_without_a_trailing_slash_redirects_to_it(admin: AdminResource) -> None:
    answer = call(admin, "GET", "", token=None, prepath=[b"ops", b"relayer admin"])
    assert answer.code == 301
    assert answer.headers["location"] == "relayer%20admin/"


# -- errors ----------------------------------------------------------------------------------


def test_an_unknown_route_is_404_and_a_wrong_method_405(admin: AdminResource) -> None:
    for path in ("/api", "/api/targets/a/nothing", "/api/targets/a/dead-letters/1", "/x"):
        answer = call(admin, "GET", path)
        assert answer.code == 404, path
        assert answer.json["error"] == "not_found"
    wrong = call(admin, "GET", "/api/targets/a/wake")
    assert wrong.code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json["error"] == "method_not_allowed"
    wrong = call(admin, "DELETE", "/api/targets/a")
    assert wrong.code == 405
    assert wrong.headers["allow"] == "GET, HEAD"
    assert call(admin, "HEAD", "/api/targets").code == 200


def test_bad_parameters_are_400(admin: AdminResource) -> None:
    for path in (
        "/api/targets?limit=0",
        "/api/targets?limit=1001",
        "/api/targets?limit=ten",
        "/api/targets?limit=1&limit=2",
        "/api/targets?page=2",
        "/api/targets/a/dead-letters?limit=101",
        "/api/targets/a/dead-letters?after=-1",
        "/api/targets/a/events?state=lost",
        "/api/targets/a/events?limit=1001",
        "/api/targets/a/events?with_events=true&limit=101",
        "/api/targets/a/events?with_events=maybe",
        "/api/targets/a/events?after=not-a-cursor",
        "/api/targets/a/events?since=yesterday",
        "/api/targets/a/events?state=pending&since=5",
        "/api/targets/a?since=nan",
        "/api/targets/a?since=10&until=5",
        "/api/commands/x",
        "/api/commands/0",
    ):
        answer = call(admin, "GET", path)
        assert answer.code == 400, path
        assert answer.json["error"] == "bad_parameter", path
        assert answer.json["message"], path
    for path in (
        "/api/targets/a/dead-letters/0/discard",
        "/api/targets/a/dead-letters/x/discard",
        "/api/targets/a/replay?txn=x",
        "/api/targets/a/wake?now=1",
    ):
        assert call(admin, "POST", path).code == 400, path


def test_unknown_targets_events_and_transactions_are_404(harness: Any) -> None:
    admin = AdminResource(harness.scheduler, TOKEN)
    for method, path in [
        ("GET", "/api/targets/zz"),
        ("POST", "/api/targets/zz/wake"),
        ("POST", "/api/targets/zz/replay"),
        ("GET", "/api/targets/zz/dead-letters"),
        ("GET", "/api/targets/zz/events"),
    ]:
        answer = call(admin, method, path)
        assert answer.code == 404, path
        assert answer.json["error"] == "unknown_target", path
        assert "zz" in answer.json["message"]
    answer = call(admin, "POST", "/api/targets/a/dead-letters/5/discard")
    assert answer.code == 404
    assert answer.json["error"] == "unknown_transaction"
    answer = call(admin, "GET", "/api/events/nothing-of-the-kind")
    assert answer.code == 404
    assert answer.json["error"] == "unknown_event"
    answer = call(admin, "GET", "/api/commands/99")
    assert answer.code == 404
    assert answer.json["error"] == "unknown_command"


def test_a_scheduler_that_is_not_running_is_503(db_path: Path | str) -> None:
    h = build_scheduler(["a"], path=db_path)
    h.scheduler.stop()
    admin = AdminResource(h.scheduler, TOKEN)
    for method, path in [
        ("GET", "/api/targets"),
        ("GET", "/api/targets/a"),
        ("POST", "/api/targets/a/wake"),
        ("POST", "/api/targets/a/replay"),
        ("GET", "/api/targets/a/dead-letters"),
        ("POST", "/api/targets/a/dead-letters/1/discard"),
        ("GET", "/api/targets/a/events"),
        ("GET", "/api/events/x"),
    ]:
        answer = call(admin, method, path)
        assert answer.code == 503, path
        assert answer.json["error"] == "not_running", path
    # The page is still served.
    assert call(admin, "GET", "/", token=None).code == 200


@attrs.define
class StubScheduler:
    """Stands for a scheduler whose answers a test controls."""

    answer: Any = None
    targets: dict[str, Any] = attrs.field(factory=dict)
    running: bool = True
    calls: list[tuple[str, Any]] = attrs.field(factory=list)

    def status(self, *, after: str | None = None, limit: int = 1000) -> Any:
        self.calls.append(("status", after))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def wake(self, target_id: str) -> Any:
        self.calls.append(("wake", target_id))
        return self.answer


def stub_admin(stub: StubScheduler) -> AdminResource:
    return AdminResource(stub, TOKEN)  # type: ignore[arg-type]


def test_an_unavailable_store_is_503_with_retry_after() -> None:
    admin = stub_admin(StubScheduler(answer=StoreUnavailable("database is locked")))
    answer = call(admin, "GET", "/api/targets")
    assert answer.code == 503
    assert answer.headers["retry-after"] == "5"
    assert answer.json["error"] == "store_unavailable"
    admin = stub_admin(StubScheduler(answer=NotRunning("the scheduler is stopped")))
    assert call(admin, "GET", "/api/targets").code == 503


def test_a_wake_recorded_for_another_process_is_202_with_its_command_id() -> None:
    stub = StubScheduler(answer=succeed(7))
    answer = call(stub_admin(stub), "POST", "/api/targets/a/wake")
    assert answer.code == 202
    assert answer.json == {"target_id": "a", "woken": False, "command_id": 7}
    stub = StubScheduler(answer=succeed(None))
    answer = call(stub_admin(stub), "POST", "/api/targets/a/wake")
    assert answer.code == 200
    assert answer.json == {"target_id": "a", "woken": True, "command_id": None}


def test_a_client_that_goes_away_is_not_answered() -> None:
    pending: Deferred[list[Any]] = Deferred()
    admin = stub_admin(StubScheduler(answer=pending))
    request = DummyRequest([b"api", b"targets"])
    request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {TOKEN}".encode()])
    assert admin.render(request) is NOT_DONE_YET
    assert request.finished == 0
    request.processingFailed(Failure(ConnectionDone()))
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        pending.callback([])
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert request.finished == 0
    assert request.written == []
    assert not [e for e in events if e.get("log_failure") is not None]


# -- routes, in this process -----------------------------------------------------------------


def test_targets_are_listed_a_page_at_a_time(db_path: Path | str) -> None:
    ids = [f"t{n:02}" for n in range(7)]
    h = build_scheduler(ids, path=db_path)
    admin = AdminResource(h.scheduler, TOKEN)
    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        answer = call(admin, "GET", f"/api/targets?limit=3&after={after}")
        assert answer.code == 200
        page = answer.json
        pages += 1
        seen += [t["target_id"] for t in page["targets"]]
        if page["next"] is None:
            break
        assert page["next"] == page["targets"][-1]["target_id"]
        after = page["next"]
    assert seen == ids
    assert pages == 3
    first = call(admin, "GET", "/api/targets").json["targets"][0]
    assert first == {
        "target_id": "t00",
        "state": "up",
        "registered": True,
        "in_flight": False,
        "pending_events": 0,
        "pending_transactions": 0,
        "oldest_pending_age": None,
        "last_success_at": None,
        "consecutive_failures": 0,
        "next_retry_at": None,
        "last_error": None,
        "dead_letters": 0,
        "down_since": None,
    }
    h.scheduler.stop()


def test_one_target_is_found_among_ids_that_sort_next_to_it(db_path: Path | str) -> None:
    ids = [
        "a",
        "a ",
        "a !",
        "a!",
        "a~",
        "a\xa0",
        "ab",
        "a\ud7ff",
        "a\ue000",
        "a\U0010ffff",
        "b",
        " ",
    ]
    configs = [
        TargetConfig(t, f"http://target-{n}.example.invalid", "token") for n, t in enumerate(ids)
    ]
    h = build_scheduler(configs, path=db_path)
    admin = AdminResource(h.scheduler, TOKEN)
    for target_id in ids:
        encoded = "".join(f"%{b:02X}" for b in target_id.encode("utf-8"))
        answer = call(admin, "GET", f"/api/targets/{encoded}")
        assert answer.code == 200, target_id
        assert answer.json["target"]["target_id"] == target_id
    assert call(admin, "GET", "/api/targets/a%20%20").code == 404
    for target_id in ids:
        assert _predecessor(target_id) < target_id
    h.scheduler.stop()


def test_a_target_shows_its_state_backlog_and_counts(harness: Any, admin: AdminResource) -> None:
    harness.transport["a"].down()
    harness.scheduler.submit("a", {"n": 1}, event_id="e-1")
    harness.scheduler.submit("a", {"n": 2}, event_id="e-2")
    harness.clock.advance(0)
    answer = call(admin, "GET", "/api/targets/a")
    assert answer.code == 200
    t = answer.json["target"]
    assert t["state"] == "down"
    assert t["pending_events"] == 2
    assert t["consecutive_failures"] >= 1
    assert t["last_error"]
    assert t["events"]["pending"] == 2
    assert t["events"]["delivered"] == 0
    harness.transport["a"].up()
    woken = call(admin, "POST", "/api/targets/a/wake")
    assert woken.code == 200
    assert woken.json == {"target_id": "a", "woken": True, "command_id": None}
    harness.clock.advance(0)
    t = call(admin, "GET", "/api/targets/a").json["target"]
    assert t["state"] == "up"
    assert t["pending_events"] == 0
    assert t["events"]["delivered"] == 2
    assert [e["n"] for e in harness.transport["a"].events] == [1, 2]
    window = call(admin, "GET", "/api/targets/a?since=1e12").json["target"]["events"]
    assert window["delivered"] == 0


def test_dead_letters_are_listed_paged_discarded_and_replayed(
    harness: Any, admin: AdminResource
) -> None:
    harness.transport["a"].fail_with(400)
    for n in range(3):
        harness.scheduler.submit("a", {"n": n}, event_id=f"dl-{n}")
        harness.clock.advance(0)
    assert harness.scheduler.status().result[0].dead_letters == 3
    first = call(admin, "GET", "/api/targets/a/dead-letters?limit=2").json
    assert [d["event_ids"] for d in first["dead_letters"]] == [["dl-0"], ["dl-1"]]
    letter = first["dead_letters"][0]
    assert letter["n_events"] == 1 and letter["attempts"] == 1
    assert letter["reason"].startswith("HTTP 400")
    assert first["next"] == first["dead_letters"][-1]["txn_id"]
    rest = call(admin, "GET", f"/api/targets/a/dead-letters?limit=2&after={first['next']}").json
    assert [d["event_ids"] for d in rest["dead_letters"]] == [["dl-2"]]
    assert rest["next"] is None
    txn = letter["txn_id"]
    discarded = call(admin, "POST", f"/api/targets/a/dead-letters/{txn}/discard")
    assert discarded.code == 200
    assert discarded.json == {"target_id": "a", "txn_id": txn, "discarded": True}
    again = call(admin, "POST", f"/api/targets/a/dead-letters/{txn}/discard")
    assert again.code == 404
    harness.transport["a"].up()
    replayed = call(admin, "POST", "/api/targets/a/replay")
    assert replayed.code == 200
    assert replayed.json == {"target_id": "a", "txn_id": None, "replayed": 2}
    harness.clock.advance(0)
    assert [e["n"] for e in harness.transport["a"].events] == [1, 2]
    assert call(admin, "GET", "/api/targets/a/dead-letters").json["dead_letters"] == []
    status = call(admin, "GET", "/api/events/dl-0").json["event"]
    assert status["deliveries"]["a"]["state"] == "discarded"


def test_a_targets_events_are_listed_by_state_a_page_at_a_time(
    harness: Any, admin: AdminResource
) -> None:
    harness.scheduler.submit_many([("b", {"n": n}) for n in range(5)])
    harness.clock.advance(0)
    pages = []
    after = ""
    while True:
        answer = call(admin, "GET", f"/api/targets/b/events?state=delivered&limit=2&after={after}")
        assert answer.code == 200
        pages.append(answer.json["events"])
        if answer.json["next"] is None:
            break
        after = answer.json["next"]
    entries = [e for page in pages for e in page]
    assert len(entries) == 5
    assert all(e["txn_id"] is not None and e["at"] is not None for e in entries)
    assert "event" not in entries[0]
    bodies = call(admin, "GET", "/api/targets/b/events?state=delivered&with_events=true").json
    assert [e["event"] for e in bodies["events"]] == [{"n": n} for n in range(5)]
    assert call(admin, "GET", "/api/targets/b/events").json["events"] == []


def test_an_events_status_is_shown_at_each_of_its_targets(
    harness: Any, admin: AdminResource
) -> None:
    harness.transport["c"].down()
    harness.scheduler.submit(["a", "c"], {"hello": "world"}, event_id="evt/1 ü")
    harness.clock.advance(0)
    answer = call(admin, "GET", "/api/events/evt%2F1%20%C3%BC")
    assert answer.code == 200
    event = answer.json["event"]
    assert event["event_id"] == "evt/1 ü"
    assert event["deliveries"]["a"]["state"] == "delivered"
    assert event["deliveries"]["c"]["state"] == "pending"
    assert event["deliveries"]["c"]["next_attempt_at"] is not None


def test_metrics_are_served_in_the_format_asked_for(harness: Any) -> None:
    asked: list[str] = []

    class Metrics:
        def exposition(self, accept: str) -> tuple[bytes, str]:
            asked.append(accept)
            return b"relayer_targets 3\n", "text/plain; version=0.0.4; charset=utf-8"

    admin = AdminResource(harness.scheduler, TOKEN, metrics=Metrics())
    answer = call(admin, "GET", "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert answer.code == 200
    assert answer.body == b"relayer_targets 3\n"
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    call(admin, "GET", "/metrics")
    assert asked == ["application/openmetrics-text", ""]
    plain = AdminResource(harness.scheduler, TOKEN)
    assert call(plain, "GET", "/metrics").code == 404


# -- over HTTP, on a scheduler in another process --------------------------------------------


@pytest.fixture
def nodes() -> Iterator[LiveNodes]:
    started = LiveNodes(reactor)
    yield started
    started.kill_all()


class Client:
    """Calls a live node's admin API."""

    def __init__(self, node: LiveNode) -> None:
        self.base = f"http://127.0.0.1:{node.ready['admin_port']}/admin"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def call(
        self, method: str, path: str, token: str | None = TOKEN, expect: int | None = 200
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        response = await treq.request(
            method, self.base + path, headers=headers, pool=self.pool, timeout=PATIENCE
        )
        body = await response.content()
        if expect is not None:
            assert response.code == expect, (method, path, response.code, body)
        try:
            document = json.loads(body)
        except ValueError:
            document = body
        return response.code, document

    async def get(self, path: str, expect: int | None = 200) -> Any:
        return (await self.call("GET", path, expect=expect))[1]

    async def post(self, path: str, expect: int | None = 200) -> Any:
        return (await self.call("POST", path, expect=expect))[1]

    async def target(self, target_id: str) -> dict[str, Any]:
        document = await self.get(f"/api/targets/{target_id}")
        return document["target"]  # type: ignore[no-any-return]

    async def until(self, what: str, target_id: str, accept: Any) -> dict[str, Any]:
        found: dict[str, Any] = await wait_for(
            reactor, what, lambda: Deferred.fromCoroutine(self.target(target_id)), accept
        )
        return found


async def start_admin_node(
    nodes: LiveNodes,
    db_path: Path | str,
    receivers: Receivers,
    options_more: list[str] | None = None,
    **options: Any,
) -> tuple[LiveNode, Client]:
    node = await nodes.start(
        db_path,
        receivers,
        options=["--admin-port", "0", "--admin-token", TOKEN, *(options_more or [])],
        **options,
    )
    assert isinstance(node.ready["admin_port"], int)
    return node, Client(node)


@pytest_twisted.ensureDeferred
async def test_live_targets_target_and_wake(db_path: Path | str, nodes: LiveNodes) -> None:
    receivers = Receivers.listen(reactor, ["a", "b", "c/d"], order_key="n")
    try:
        receivers["a"].fail_with(503)
        # A long backoff: the target stays DOWN until it is woken.
        node, api = await start_admin_node(nodes, db_path, receivers, backoff=(60.0, 120.0))
        code, page = await api.call("GET", "/", token=None)
        assert code == 200 and b'id="targets"' in page
        assert (await api.call("GET", "/api/targets", token=None, expect=401))[0] == 401
        assert (await api.call("GET", "/api/targets", token="x" * 20, expect=401))[0] == 401

        await node.submit("a", 3)
        down = await api.until("a DOWN", "a", lambda t: t["state"] == "down")
        assert down["pending_events"] == 3
        assert down["consecutive_failures"] >= 1
        assert "503" in down["last_error"]
        assert down["next_retry_at"] is not None
        assert down["events"]["pending"] == 3

        first = await api.get("/api/targets?limit=2")
        assert [t["target_id"] for t in first["targets"]] == ["a", "b"]
        assert first["next"] == "b"
        rest = await api.get("/api/targets?limit=2&after=b")
        assert [t["target_id"] for t in rest["targets"]] == ["c/d"]
        assert rest["next"] is None
        assert (await api.target("c%2Fd"))["target_id"] == "c/d"
        assert (await api.get("/api/targets/nope", expect=404))["error"] == "unknown_target"

        receivers["a"].healthy()
        woken = await api.post("/api/targets/a/wake")
        assert woken == {"target_id": "a", "woken": True, "command_id": None}
        await receivers["a"].wait_for_events(3)
        up = await api.until("a UP", "a", lambda t: t["state"] == "up" and t["pending_events"] == 0)
        assert up["events"]["delivered"] == 3
        assert receivers["a"].events == [{"target": "a", "n": k} for k in range(3)]
        assert (await api.post("/api/targets/nope/wake", expect=404))["error"] == "unknown_target"
        assert await node.stop() == 0
    finally:
        await receivers.stop()


@pytest_twisted.ensureDeferred
async def test_live_dead_letters_discard_and_replay(db_path: Path | str, nodes: LiveNodes) -> None:
    receivers = Receivers.listen(reactor, ["a"], order_key="n")
    try:
        receivers["a"].fail_with(400)
        node, api = await start_admin_node(nodes, db_path, receivers)
        for k in range(3):
            await node.submit("a", 1)
            await api.until(f"{k + 1} dead letters", "a", lambda t, k=k: t["dead_letters"] == k + 1)
        first = await api.get("/api/targets/a/dead-letters?limit=2")
        assert [d["event_ids"] for d in first["dead_letters"]] == [["a-0"], ["a-1"]]
        assert first["dead_letters"][0]["reason"].startswith("HTTP 400")
        rest = await api.get(f"/api/targets/a/dead-letters?limit=2&after={first['next']}")
        assert [d["event_ids"] for d in rest["dead_letters"]] == [["a-2"]]
        assert rest["next"] is None

        txn = first["dead_letters"][0]["txn_id"]
        discarded = await api.post(f"/api/targets/a/dead-letters/{txn}/discard")
        assert discarded == {"target_id": "a", "txn_id": txn, "discarded": True}
        again = await api.post(f"/api/targets/a/dead-letters/{txn}/discard", expect=404)
        assert again["error"] == "unknown_transaction"
        listed = await api.get("/api/targets/a/events?state=discarded")
        assert [e["event_id"] for e in listed["events"]] == ["a-0"]
        dead = await api.get("/api/targets/a/events?state=dead_lettered&with_events=1")
        assert [e["event"] for e in dead["events"]] == [
            {"target": "a", "n": 1},
            {"target": "a", "n": 2},
        ]

        receivers["a"].healthy()
        last = rest["dead_letters"][0]["txn_id"]
        one = await api.post(f"/api/targets/a/replay?txn={last}")
        assert one == {"target_id": "a", "txn_id": last, "replayed": 1}
        await receivers["a"].wait_for_events(1)
        assert receivers["a"].events == [{"target": "a", "n": 2}]
        again = await api.post(f"/api/targets/a/replay?txn={last}", expect=404)
        assert again["error"] == "unknown_transaction"
        replayed = await api.post("/api/targets/a/replay")
        assert replayed == {"target_id": "a", "txn_id": None, "replayed": 1}
        await receivers["a"].wait_for_events(2)
        assert receivers["a"].events == [{"target": "a", "n": 2}, {"target": "a", "n": 1}]
        delivered = await wait_for(
            reactor,
            "the replayed events delivered",
            lambda: Deferred.fromCoroutine(api.get("/api/targets/a/events?state=delivered")),
            lambda page: len(page["events"]) == 2,
        )
        assert [e["event_id"] for e in delivered["events"]] == ["a-2", "a-1"]
        assert (await api.post("/api/targets/nope/replay", expect=404))["error"] == "unknown_target"
        assert (await api.get("/api/targets/a/dead-letters"))["dead_letters"] == []
        assert await node.stop() == 0
    finally:
        await receivers.stop()


@pytest_twisted.ensureDeferred
async def test_live_events_and_event_status(db_path: Path | str, nodes: LiveNodes) -> None:
    receivers = Receivers.listen(reactor, ["a", "b"], order_key="n")
    try:
        receivers["b"].fail_with(503)
        node, api = await start_admin_node(nodes, db_path, receivers, backoff=(60.0, 120.0))
        await node.submit("a,b", 4)
        await receivers["a"].wait_for_events(4)
        await api.until("b DOWN", "b", lambda t: t["state"] == "down")
        status = await wait_for(
            reactor,
            "a-0 delivered at a",
            lambda: Deferred.fromCoroutine(api.get("/api/events/a+b-0")),
            lambda s: s["event"]["deliveries"]["a"]["state"] == "delivered",
        )
        event = status["event"]
        assert event["event_id"] == "a+b-0"
        assert event["deliveries"]["b"]["state"] == "pending"
        assert event["deliveries"]["b"]["attempts"] >= 1
        assert (await api.get("/api/events/no-such-event", expect=404))["error"] == "unknown_event"

        pending = await api.get("/api/targets/b/events?state=pending&limit=3")
        assert [e["event_id"] for e in pending["events"]] == ["a+b-0", "a+b-1", "a+b-2"]
        assert pending["next"] is not None
        rest = await api.get(f"/api/targets/b/events?state=pending&limit=3&after={pending['next']}")
        assert [e["event_id"] for e in rest["events"]] == ["a+b-3"]
        assert rest["next"] is None
        assert (await api.get("/api/targets/zz/events", expect=404))["error"] == "unknown_target"
        assert (await api.get("/api/commands/1", expect=404))["error"] == "unknown_command"
        assert (await api.get("/api/commands/x", expect=400))["error"] == "bad_parameter"
        assert await node.stop() == 0
    finally:
        await receivers.stop()


@pytest_twisted.ensureDeferred
async def test_live_a_wake_for_a_target_another_process_delivers_to_is_a_command(
    db_path: Path | str, nodes: LiveNodes
) -> None:
    receivers = Receivers.listen(reactor, ["a"], order_key="n")
    try:
        receivers["a"].fail_with(503)
        owner = await nodes.start(
            db_path, receivers, backoff=(60.0, 120.0), options=["--leases", "owner"]
        )
        await owner.submit("a", 2)
        # The other process shares the database, and serves the admin API; "a" is the
        # owner's.
        other, api = await start_admin_node(
            nodes, db_path, receivers, backoff=(60.0, 120.0), options_more=["--leases", "other"]
        )
        await api.until("a DOWN", "a", lambda t: t["state"] == "down")
        receivers["a"].healthy()
        code, woken = await api.call("POST", "/api/targets/a/wake", expect=202)
        assert woken["woken"] is False
        command_id = woken["command_id"]
        assert isinstance(command_id, int)
        await receivers["a"].wait_for_events(2)
        assert receivers["a"].events == [{"target": "a", "n": k} for k in range(2)]
        done = await wait_for(
            reactor,
            "the command applied",
            lambda: Deferred.fromCoroutine(api.get(f"/api/commands/{command_id}")),
            lambda d: d["command"]["done_at"] is not None,
        )
        command = done["command"]
        assert command["command_id"] == command_id
        assert command["target_id"] == "a"
        assert command["action"] == "wake"
        assert command["done_by"] == "owner"
        assert command["result"] == "woken"
        assert command["created_at"] <= command["done_at"]
        assert await other.stop() == 0
        assert await owner.stop() == 0
    finally:
        await receivers.stop()


def _require_metrics() -> None:
    pytest.importorskip("prometheus_client")
    if importlib.util.find_spec("relayer.metrics") is None:
        pytest.skip("relayer.metrics is not part of this checkout")


@pytest_twisted.ensureDeferred
async def test_live_metrics(db_path: Path | str, nodes: LiveNodes) -> None:
    _require_metrics()
    receivers = Receivers.listen(reactor, ["a", "b"], order_key="n")
    try:
        receivers["b"].fail_with(503)
        node, api = await start_admin_node(
            nodes, db_path, receivers, backoff=(60.0, 120.0), options_more=["--admin-metrics"]
        )
        await node.submit("a", 3)
        await node.submit("b", 2)
        await receivers["a"].wait_for_events(3)
        assert (await api.call("GET", "/metrics", token=None, expect=401))[0] == 401

        def scrape() -> Deferred[Any]:
            return Deferred.fromCoroutine(api.call("GET", "/metrics"))

        code, body = await wait_for(
            reactor,
            "b's backlog in the metrics",
            scrape,
            lambda answer: b'relayer_backlog_events{target="b"} 2.0' in answer[1],
        )
        text = body.decode()
        assert 'relayer_attempts_total{outcome="delivered",target="a"}' in text
        assert 'relayer_backlog_events{target="a"} 0.0' in text
        assert 'relayer_target_state{target="b"} 1.0' in text
        response = await treq.get(
            api.base + "/metrics",
            headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/openmetrics-text"},
            pool=api.pool,
        )
        assert response.code == 200
        content_type = response.headers.getRawHeaders("content-type")[0]
        assert content_type.startswith("application/openmetrics-text")
        assert (await response.content()).endswith(b"# EOF\n")
        assert await node.stop() == 0
    finally:
        await receivers.stop()


@pytest_twisted.ensureDeferred
async def test_a_real_site_decodes_target_ids_in_paths(db_path: Path | str) -> None:
    configs = [
        TargetConfig("x/y z", "http://one.example.invalid", "token"),
        TargetConfig("é&<b>", "http://two.example.invalid", "token"),
    ]
    h = build_scheduler(configs, path=db_path, clock=reactor)  # type: ignore[arg-type]
    root = Resource()
    root.putChild(b"admin", AdminResource(h.scheduler, TOKEN))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        base = f"http://127.0.0.1:{port.getHost().port}/admin"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for target_id, path in [("x/y z", "x%2Fy%20z"), ("é&<b>", "%C3%A9%26%3Cb%3E")]:
            response = await treq.get(f"{base}/api/targets/{path}", headers=headers, pool=pool)
            assert response.code == 200
            assert (await response.json())["target"]["target_id"] == target_id
        response = await treq.get(base, pool=pool, allow_redirects=False)
        assert response.code == 301
        assert response.headers.getRawHeaders("location") == ["admin/"]
        response = await treq.get(base + "/", pool=pool)
        assert response.code == 200
    finally:
        await port.stopListening()
        await h.scheduler.stop()


def test_state_values_are_those_of_the_scheduler() -> None:
    # The page colours states by their values; they must stay what the API sends.
    assert [s.value for s in TargetState] == ["up", "down", "blocked", "disabled"]


def test_a_target_config_is_never_shown(harness: Any, admin: AdminResource) -> None:
    config = target("secretive", token="very-secret-target-token")
    harness.scheduler.add_target(config)
    for path in ("/api/targets", "/api/targets/secretive"):
        body = call(admin, "GET", path).body.decode()
        assert "secretive" in body
        assert "very-secret-target-token" not in body
        assert config.base_url not in body


# -- relayer demo --admin ----------------------------------------------------------------------


class _Demo(ProcessProtocol):
    """Collects ``relayer demo``'s output lines; fires ``ended`` with its exit status."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))

    def text(self) -> str:
        return self.out.decode("utf-8", "replace")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_demo_serves_the_admin_page_until_interrupted() -> None:
    token = "demo-admin-token-0123456789"
    demo = _Demo()
    process = reactor.spawnProcess(
        demo,
        sys.executable,
        [
            sys.executable,
            "-m",
            "relayer",
            "demo",
            "--events",
            "50",
            "--outage",
            "1",
            "--admin",
            "0",
        ],
        env=child_env(RELAYER_ADMIN_TOKEN=token),
        path=str(ROOT),
    )
    try:
        await wait_until(reactor, "the summary", lambda: "keep running" in demo.text())
        out = demo.text()
        found = re.search(r"admin: (http://127\.0\.0\.1:(\d+)/)#token=(\S+)$", out, re.MULTILINE)
        assert found is not None, out
        assert found.group(3) == token
        assert out.count(token) == 1
        assert "VERIFIED" in out
        base = found.group(1)
        pool = HTTPConnectionPool(reactor, persistent=False)
        headers = {"Authorization": f"Bearer {token}"}
        response = await treq.get(base + "api/targets", headers=headers, pool=pool)
        assert response.code == 200
        targets = (await response.json())["targets"]
        assert [(t["target_id"], t["state"], t["pending_events"]) for t in targets] == [
            ("flaky", "up", 0),
            ("healthy", "up", 0),
            ("outage", "up", 0),
        ]
        response = await treq.get(base + "api/events/demo-fan-out", headers=headers, pool=pool)
        deliveries = (await response.json())["event"]["deliveries"]
        assert deliveries["outage"]["state"] == "expired"
        response = await treq.get(base, pool=pool)
        assert response.code == 200
        assert b'id="targets"' in await response.content()
        process.signalProcess("INT")
        assert await demo.ended == 0, demo.err.decode()
    finally:
        if not demo.ended.called:
            process.signalProcess("KILL")


def test_the_demo_refuses_a_short_admin_token() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relayer", "demo", "--events", "1", "--admin", "0"],
        capture_output=True,
        text=True,
        env=child_env(RELAYER_ADMIN_TOKEN="shorty"),
        cwd=ROOT,
        timeout=PATIENCE,
    )
    assert done.returncode == 1
    assert "RELAYER_ADMIN_TOKEN" in done.stderr
    assert "at least 16 characters" in done.stderr
    assert "shorty" not in done.stderr + done.stdout


@pytest_twisted.ensureDeferred
async def test_the_operations_guide_example_serves_the_admin_resource(
    db_path: Path | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    section = guide.split("## Admin API and status page", 1)[1].split("\n## ", 1)[0]
    (source,) = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "serve_admin" in b]
    namespace: dict[str, Any] = {}
    exec(compile(source, "<operations.md>", "exec"), namespace)
    monkeypatch.setenv("RELAYER_ADMIN_TOKEN", TOKEN)
    h = build_scheduler(["bridge"], path=db_path, clock=reactor)  # type: ignore[arg-type]
    port = namespace["serve_admin"](reactor, h.scheduler, port=0)
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        base = f"http://127.0.0.1:{port.getHost().port}/relayer/"
        response = await treq.get(base, pool=pool)
        assert response.code == 200
        assert b'id="targets"' in await response.content()
        response = await treq.get(
            base + "api/targets", headers={"Authorization": f"Bearer {TOKEN}"}, pool=pool
        )
        assert [t["target_id"] for t in (await response.json())["targets"]] == ["bridge"]
    finally:
        await port.stopListening()
        await h.scheduler.stop()
