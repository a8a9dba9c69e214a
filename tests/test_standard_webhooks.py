"""
Wire formats: Standard Webhooks 1.0 next to the Matrix format.

The signatures are checked against the specification's published example and against an
independent receiver built on the reference ``standardwebhooks`` package, over real HTTP.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from _support import eventually, reactor_
from standardwebhooks import webhooks as reference
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relayer import (
    MATRIX,
    STANDARD_WEBHOOKS,
    BackoffPolicy,
    ConfigurationError,
    HTTPTransport,
    InvalidSignature,
    InvalidTarget,
    IRequestTransport,
    ITransport,
    IWireFormat,
    Scheduler,
    SendOutcome,
    TargetConfig,
    TargetState,
    WireRequest,
)
from relayer.formats import sign, verify, webhook_id
from relayer.store.base import Transaction
from relayer.testing import FakeTransport, Receiver, build_scheduler, listen_receiver, open_store

# The specification's example (standard-webhooks spec.md, "Signature scheme").
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OLD = "whsec_" + "b2xkLXNlY3JldC1rZXktb2YtMzItYnl0ZXMhISEhISE="  # 32 bytes
NEW = "whsec_" + "bmV3LXNlY3JldC1rZXktb2YtMzItYnl0ZXMhISEhISE="  # 32 bytes

#: A late epoch time for the fake clocks, so that timestamps look like real ones.
T0 = 1_700_000_000.0


def webhook_target(target_id: str = "hook", **settings: Any) -> TargetConfig:
    settings.setdefault("base_url", f"http://{target_id}.example.invalid/hooks/in")
    settings.setdefault("secrets", (NEW,))
    return TargetConfig(target_id, format="standard-webhooks", **settings)


def txn(events: list[bytes], seqs: list[int] | None = None) -> Transaction:
    seqs = seqs if seqs is not None else list(range(1, len(events) + 1))
    return Transaction("hook", 7, tuple(events), tuple(seqs), 1, 0.0, None)


# -- the signature --------------------------------------------------------------------------------


def test_the_specification_example_signs_as_published() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    # The reference package agrees.
    when = datetime.fromtimestamp(SPEC_TIMESTAMP, tz=timezone.utc)
    assert reference.Webhook(SPEC_SECRET).sign(SPEC_ID, when, SPEC_BODY.decode()) == SPEC_SIGNATURE
    verify([SPEC_SECRET], SPEC_ID, str(SPEC_TIMESTAMP), SPEC_BODY, SPEC_SIGNATURE)
    verify(
        [SPEC_SECRET], SPEC_ID, str(SPEC_TIMESTAMP), SPEC_BODY, SPEC_SIGNATURE, now=SPEC_TIMESTAMP
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"body": b'{"test": 2432232315}'}, "no signature"),
        ({"msg_id": "msg_other"}, "no signature"),
        ({"timestamp": str(SPEC_TIMESTAMP + 1)}, "no signature"),
        ({"signature": "v2," + SPEC_SIGNATURE[3:]}, "no signature"),
        ({"signature": None}, "needs the webhook-id"),
        ({"timestamp": "1614265330.5"}, "whole number"),
        ({"now": SPEC_TIMESTAMP + 301}, "too old"),
        ({"now": SPEC_TIMESTAMP - 301}, "too new"),
        ({"secrets": [NEW]}, "no signature"),
    ],
)
def test_verify_refuses_what_does_not_match(change: dict[str, Any], error: str) -> None:
    args: dict[str, Any] = {
        "secrets": [SPEC_SECRET],
        "msg_id": SPEC_ID,
        "timestamp": str(SPEC_TIMESTAMP),
        "body": SPEC_BODY,
        "signature": SPEC_SIGNATURE,
    }
    now = change.pop("now", None)
    args.update(change)
    with pytest.raises(InvalidSignature, match=error):
        verify(**args, now=now)


def test_verify_takes_any_of_several_signatures_and_secrets() -> None:
    header = f"v1,bm90IGl0 {SPEC_SIGNATURE}"
    verify([NEW, SPEC_SECRET], SPEC_ID, str(SPEC_TIMESTAMP), SPEC_BODY, header)


# -- the request ----------------------------------------------------------------------------------


def test_the_webhook_request_is_a_signed_post_of_the_stored_event() -> None:
    config = webhook_target(secrets=[OLD, NEW])
    event = b'{"n":1,"text":"h\xc3\xa9"}'
    request = STANDARD_WEBHOOKS.request(config, txn([event], [42]), T0 + 0.9)
    assert request.method == "POST"
    assert request.url == "http://hook.example.invalid/hooks/in"  # exactly, no path added
    assert request.body == event
    assert request.header("content-type") == "application/json"
    assert request.header(
        "user-agent",
    ).startswith("relayer/")  # type: ignore[union-attr]
    assert request.header("webhook-id") == "relayer-42"
    assert request.header("webhook-timestamp") == str(int(T0))
    assert request.header("authorization") is None
    signatures = request.header("webhook-signature")
    assert signatures == " ".join(sign(s, "relayer-42", int(T0), event) for s in (OLD, NEW))
    # Each secret alone verifies it, as the reference package sees it.
    headers = dict(request.headers)
    fixed = datetime.fromtimestamp(T0, tz=timezone.utc)
    for secret in (OLD, NEW):
        wh = reference.Webhook(secret)
        assert wh.sign("relayer-42", fixed, event.decode()) in (signatures or "")
    # Neither the signature nor a secret shows in its repr.
    shown = repr(request)
    assert "webhook-signature" in shown
    assert signatures not in shown and OLD not in shown
    assert headers["webhook-signature"] == signatures


def test_the_webhook_request_sends_the_token_only_if_the_target_has_one() -> None:
    config = webhook_target(token="tok-123")
    request = STANDARD_WEBHOOKS.request(config, txn([b"{}"]), T0)
    assert request.header("authorization") == "Bearer tok-123"
    assert "tok-123" not in repr(request)


def test_the_webhook_id_is_the_applications_event_id() -> None:
    request = STANDARD_WEBHOOKS.request(webhook_target(), txn([b"{}"], [5]), T0)
    assert request.header("webhook-id") == "relayer-5"
    t = Transaction("hook", 1, (b"{}",), (5,), 1, 0.0, None, {5: "evt_abc-1"})
    assert STANDARD_WEBHOOKS.request(webhook_target(), t, T0).header("webhook-id") == "evt_abc-1"


@pytest.mark.parametrize(
    ("event_id", "sent"),
    [
        ("evt_1", "evt_1"),
        ("a%b", "a%25b"),
        ("a b,c", "a%20b%2Cc"),
        ("caf\u00e9%", "caf%C3%A9%25"),
    ],
)
def test_a_webhook_id_that_is_not_printable_ascii_is_percent_encoded(
    event_id: str, sent: str
) -> None:
    assert webhook_id(event_id) == sent


def test_two_events_never_share_a_webhook_id() -> None:
    """An id that reads like another's encoding is encoded too: receivers drop repeats by id."""
    assert webhook_id("a b") != webhook_id("a%20b")
    assert webhook_id("a%20b") == "a%2520b"
    assert webhook_id("100%") == "100%25"


def test_a_webhook_id_too_long_once_encoded_is_a_digest() -> None:
    long_id = "\u00e9" * 100
    sent = webhook_id(long_id)
    assert sent.startswith("relayer-sha256-") and len(sent) <= 255
    assert webhook_id(long_id) == sent


def test_the_formats_provide_iwireformat() -> None:
    assert verifyObject(IWireFormat, MATRIX)
    assert verifyObject(IWireFormat, STANDARD_WEBHOOKS)
    assert STANDARD_WEBHOOKS.max_events == 1 and MATRIX.max_events is None


def test_transports_provide_irequesttransport() -> None:
    from twisted.internet.testing import MemoryReactorClock

    for transport in (FakeTransport(), HTTPTransport(MemoryReactorClock())):
        assert verifyObject(IRequestTransport, transport)
        assert verifyObject(ITransport, transport)


def test_a_401_from_a_webhook_target_says_to_check_the_secrets() -> None:
    outcome = STANDARD_WEBHOOKS.classify(401, None, 0.0)
    assert outcome.kind.value == "retry"
    assert "secrets" in outcome.reason


# -- configuration ---------------------------------------------------------------------------------


def test_target_config_takes_secrets_and_hides_them() -> None:
    config = webhook_target(secrets=NEW)
    assert config.secrets == (NEW,)
    assert webhook_target(secrets=[OLD, NEW]).secrets == (OLD, NEW)
    assert NEW not in repr(config) and NEW[6:] not in repr(config)
    assert config.token == ""
    # Positional use as before, with the Matrix format by default.
    matrix = TargetConfig("m", "https://m.example", "tok")
    assert matrix.format == "matrix" and matrix.secrets == ()


@pytest.mark.parametrize(
    ("secrets", "says"),
    [
        ("not-a-secret-value-at-all", "start with 'whsec_'"),
        ("whsec_" + "!" * 32, "standard base64"),
        ("whsec_" + "c2hvcnQ=", "24 to 64 bytes, not 5"),
        ("whsec_" + "QUFB" * 30, "24 to 64 bytes, not 90"),
        ([NEW, NEW], "same secret twice"),
        ([NEW, 3], "must be a str"),
        (b"whsec_bytes", "list or tuple"),
    ],
)
def test_bad_secrets_are_refused_without_showing_them(secrets: Any, says: str) -> None:
    with pytest.raises(InvalidTarget, match=says) as info:
        webhook_target(secrets=secrets)
    shown = str(info.value)
    for secret in secrets if isinstance(secrets, list) else [secrets]:
        if isinstance(secret, str):
            assert secret not in shown
            assert secret[6:] not in shown


@pytest.mark.parametrize("bad", ["", "Matrix", "a b", "x" * 65, 5])
def test_a_bad_format_name_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidTarget, match="format must be"):
        TargetConfig("t", "https://t.example", "tok", format=bad)


def test_a_matrix_target_still_needs_its_token() -> None:
    with pytest.raises(InvalidTarget, match="token must not be empty"):
        TargetConfig("t", "https://t.example")


def test_an_unknown_format_is_refused_at_registration(tmp_path: Path) -> None:
    config = TargetConfig("t", "https://t.example", "tok", format="carrier-pigeon")
    with pytest.raises(InvalidTarget, match="unknown wire format 'carrier-pigeon'; known: "):
        build_scheduler([config], path=tmp_path / "r.db")


def test_a_webhook_target_without_secrets_is_refused_at_registration(tmp_path: Path) -> None:
    config = TargetConfig("t", "https://t.example", format="standard-webhooks")
    with pytest.raises(InvalidTarget, match="needs at least one secret"):
        build_scheduler([config], path=tmp_path / "r.db")


@implementer(ITransport)
class MatrixOnlyTransport:
    def __repr__(self) -> str:
        return "<MatrixOnlyTransport>"

    def send(self, target: TargetConfig, txn_id: int, body: bytes) -> Deferred[SendOutcome]:
        return succeed(SendOutcome.delivered())


def test_a_webhook_target_needs_a_request_transport(tmp_path: Path) -> None:
    clock = Clock()
    store = open_store(clock, tmp_path / "r.db")
    matrix = TargetConfig("m", "https://m.example", "tok")
    scheduler = Scheduler(clock, store, MatrixOnlyTransport(), [matrix])  # Matrix alone is fine
    with pytest.raises(ConfigurationError, match="needs a transport that provides") as info:
        scheduler.add_target(webhook_target())
    assert "<MatrixOnlyTransport> does not" in str(info.value)
    assert NEW not in str(info.value)
    assert list(scheduler.targets) == ["m"]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (CancelledError(), "the request was cancelled"),
        (ValueError("no signing key"), "ValueError: no signing key"),
    ],
)
def test_a_format_that_fails_to_frame_a_request_is_a_transient_failure(
    tmp_path: Path, error: Exception, reason: str
) -> None:
    @implementer(IWireFormat)
    class Failing:
        name = "failing"
        max_events = None

        def check(self, target: TargetConfig) -> None:
            pass

        def request(self, target: TargetConfig, t: Transaction, now: float) -> WireRequest:
            raise error

        def classify(self, status: int, retry_after: str | None, now: float) -> SendOutcome:
            return SendOutcome.delivered()

    clock = Clock()
    transport = FakeTransport(clock)
    store = open_store(clock, tmp_path / "r.db")
    config = TargetConfig("t", "https://t.example", format="failing")
    scheduler = Scheduler(clock, store, transport, [config], formats={"failing": Failing()})
    assert scheduler.start().called
    scheduler.submit("t", {"n": 0})
    clock.advance(0)
    [status] = scheduler.status().result
    assert (status.state, status.last_error) == (TargetState.DOWN, reason)
    assert transport["t"].wire_requests == []


def test_the_scheduler_takes_formats_of_its_own(tmp_path: Path) -> None:
    @implementer(IWireFormat)
    class Tagged:
        name = "tagged"
        max_events = 2

        def check(self, target: TargetConfig) -> None:
            pass

        def request(self, target: TargetConfig, t: Transaction, now: float) -> WireRequest:
            body = json.dumps([json.loads(e) for e in t.events]).encode()
            return WireRequest("POST", target.base_url, (), body, t.txn_id)

        def classify(self, status: int, retry_after: str | None, now: float) -> SendOutcome:
            return SendOutcome.delivered()

    clock = Clock()
    transport = FakeTransport(clock)
    store = open_store(clock, tmp_path / "r.db")
    config = TargetConfig("t", "https://t.example", format="tagged", max_events=50)
    scheduler = Scheduler(clock, store, transport, [config], formats={"tagged": Tagged()})
    assert scheduler.start().called
    scheduler.submit_many([("t", {"n": i}) for i in range(5)])
    clock.advance(0)
    # The format's max_events (2) caps the target's (50): three requests.
    assert [r.events for r in transport["t"].received] == [
        [[{"n": 0}, {"n": 1}]],
        [[{"n": 2}, {"n": 3}]],
        [[{"n": 4}]],
    ]
    with pytest.raises(ConfigurationError, match="must provide relayer.formats.IWireFormat"):
        Scheduler(clock, store, transport, formats={"x": object()})  # type: ignore[dict-item]


# -- delivery through the fake transport -----------------------------------------------------------


def test_webhooks_go_one_event_a_request_with_ids_stable_across_retries_and_restarts(
    tmp_path: Path,
) -> None:
    clock = Clock()
    clock.advance(T0)
    config = webhook_target(backoff=BackoffPolicy.constant(600.0))
    h = build_scheduler([config], path=tmp_path / "r.db", clock=clock)
    target = h.transport["hook"]
    target.respond(503)
    h.scheduler.submit("hook", {"n": 0}, event_id="evt-0")
    h.scheduler.submit_many([("hook", {"n": 1}), ("hook", {"n": 2})])
    clock.advance(0)
    first = target.wire_requests[0]
    assert first.header("webhook-timestamp") == str(int(T0))
    # Restarted before the retry: the id stays, the timestamp is the retry's.
    h = h.restart()
    clock.advance(600)
    target = h.transport["hook"]
    ids = [r.header("webhook-id") for r in target.wire_requests]
    assert ids[:2] == ["evt-0", "evt-0"]
    retry = target.wire_requests[1]
    assert int(retry.header("webhook-timestamp") or 0) >= int(T0) + 600
    assert retry.body == first.body == b'{"n":0}'
    assert target.events == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [len(r.events) for r in target.received] == [1, 1, 1]
    for received in target.received:
        verify(
            [NEW],
            received.headers["webhook-id"],
            received.headers["webhook-timestamp"],
            received.body,
            received.headers["webhook-signature"],
        )
    assert target.violations == [] and target.max_in_flight == 1


def test_a_matrix_target_and_a_webhook_target_on_one_scheduler(tmp_path: Path) -> None:
    matrix = TargetConfig("m", "https://m.example", "tok", max_events=100)
    hook = webhook_target("w", max_events=100)
    h = build_scheduler([matrix, hook], path=tmp_path / "r.db")
    for i in range(10):
        h.scheduler.submit(["m", "w"], {"n": i})
    h.clock.advance(0)
    expected = [{"n": i} for i in range(10)]
    assert h.transport["m"].events == expected
    assert h.transport["w"].events == expected
    assert all(len(r.events) == 1 for r in h.transport["w"].received)
    assert len(h.transport["w"].received) == 10
    assert h.transport["m"].received[0].headers == {}
    assert h.transport["m"].violations == h.transport["w"].violations == []


def test_a_transaction_formed_before_a_target_became_a_webhook_is_split(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    matrix = TargetConfig("t", "https://t.example", "tok")
    h = build_scheduler([matrix], path=path)
    h.transport["t"].down()
    h.scheduler.submit_many([("t", {"n": i}) for i in range(3)])
    h.clock.advance(0)
    assert h.transport["t"].requests  # one transaction of three events was formed and failed
    h.scheduler.stop()
    h.transport["t"].up()
    h2 = build_scheduler(
        [webhook_target("t", base_url="https://t.example")],
        path=path,
        clock=h.clock,
        transport=h.transport,
    )
    h2.clock.advance(3600)
    assert h2.transport["t"].events == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [len(r.events) for r in h2.transport["t"].received] == [1, 1, 1]


# -- the reference package as the receiver, over real HTTP -----------------------------------------


class _ClockedDatetime(datetime):
    """What standardwebhooks.webhooks takes the current time from, on a fake clock."""

    clock: Clock

    @classmethod
    def now(cls, tz: Any = None) -> Any:  # type: ignore[override]
        return datetime.fromtimestamp(cls.clock.seconds(), tz=tz)


@pytest.fixture
def reference_now(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A fake clock that the reference package's verification takes as now."""
    clock = Clock()
    clock.advance(T0)
    clocked = type("ClockedDatetime", (_ClockedDatetime,), {"clock": clock})
    monkeypatch.setattr(reference, "datetime", clocked)
    return clock


class ReferenceReceiver(Resource):
    """A webhook endpoint that verifies every request with the reference package alone."""

    isLeaf = True

    def __init__(self, *secrets: str, answer_later: bool = False) -> None:
        super().__init__()
        self.hooks = [reference.Webhook(s) for s in secrets]
        self.statuses: list[int] = []  # scripted answers, first to last; then 200
        self.attempts: list[dict[str, str]] = []
        self.bodies: list[bytes] = []
        self.failures: list[str] = []
        self.accepted: dict[str, Any] = {}
        self.order: list[Any] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.answer_later = answer_later

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        headers = {
            k.decode("latin-1").lower(): v[0].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.attempts.append(headers)
        self.bodies.append(body)
        for i, hook in enumerate(self.hooks):
            try:
                event = hook.verify(body, headers)
            except reference.WebhookVerificationError as e:
                self.failures.append(f"secret {i}: {e}")
                request.setResponseCode(401)
                return b""
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            msg_id = headers["webhook-id"]
            if msg_id not in self.accepted:
                self.accepted[msg_id] = event
                self.order.append(event)
        request.setResponseCode(status)
        if not self.answer_later:
            return b""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def answer() -> None:
            self.in_flight -= 1
            request.finish()

        reactor_().callLater(0.002, answer)
        return NOT_DONE_YET


class ReferenceStack:
    def __init__(self, tmp_path: Path, clock: Clock, resource: ReferenceReceiver) -> None:
        self.reactor = reactor_()
        self.clock = clock
        site = Site(resource)
        site.noisy = False
        self.port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/webhooks"
        # HTTP on the real reactor; the scheduler (timing, timestamps) on the fake clock.
        self.transport = HTTPTransport(self.reactor)
        self.store = open_store(clock, tmp_path / "r.db")
        self.scheduler: Scheduler | None = None

    def start(self, *configs: TargetConfig) -> Scheduler:
        self.scheduler = Scheduler(self.clock, self.store, self.transport, configs)
        assert self.scheduler.start().called
        return self.scheduler

    async def close(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            stopping = self.scheduler.stop()
            self.clock.advance(60)
            await stopping
        await self.transport.close()
        await self.port.stopListening()


async def retry_scheduled(scheduler: Scheduler) -> bool:
    (status,) = await scheduler.status()
    return status.next_retry_at is not None and not status.in_flight


@pytest_twisted.ensureDeferred
async def test_every_attempt_verifies_with_the_reference_package_and_retries_are_fresh(
    tmp_path: Path, reference_now: Clock
) -> None:
    clock = reference_now
    resource = ReferenceReceiver(NEW)
    resource.statuses = [503, 503]
    stack = ReferenceStack(tmp_path, clock, resource)
    try:
        backoff = BackoffPolicy.constant(400.0)  # each retry more than five minutes later
        scheduler = stack.start(webhook_target(base_url=stack.url, backoff=backoff))
        scheduler.submit("hook", {"order": 1}, event_id="evt_1")
        for n in (1, 2, 3):
            if n > 1:
                await eventually(lambda: retry_scheduled(scheduler), "the retry to be scheduled")
                clock.advance(400.0)
            await eventually(lambda n=n: len(resource.attempts) >= n, f"attempt {n}")
        await eventually(lambda: resource.accepted, "the webhook to be accepted")
        assert resource.failures == []  # every attempt verified, the retries too
        ids = [a["webhook-id"] for a in resource.attempts]
        assert ids == ["evt_1"] * 3
        stamps = [int(a["webhook-timestamp"]) for a in resource.attempts]
        assert stamps == [int(T0), int(T0) + 400, int(T0) + 800]
        assert resource.bodies == [b'{"order":1}'] * 3
        assert resource.accepted == {"evt_1": {"order": 1}}
        # The first attempt's headers, replayed at the last one's time, are refused: the
        # timestamp (and the signature over it) belongs to each attempt.
        with pytest.raises(reference.WebhookVerificationError, match="too old"):
            reference.Webhook(NEW).verify(resource.bodies[0], resource.attempts[0])
        assert (
            resource.attempts[2]["webhook-signature"] != resource.attempts[0]["webhook-signature"]
        )
    finally:
        await stack.close()


@pytest_twisted.ensureDeferred
async def test_during_a_rotation_either_secret_alone_verifies(
    tmp_path: Path, reference_now: Clock
) -> None:
    # The receiver checks each request with the old secret alone and the new one alone.
    resource = ReferenceReceiver(OLD, NEW)
    stack = ReferenceStack(tmp_path, reference_now, resource)
    try:
        scheduler = stack.start(webhook_target(base_url=stack.url, secrets=[OLD, NEW]))
        scheduler.submit_many([("hook", {"n": 0}), ("hook", {"n": 1})])
        await eventually(lambda: len(resource.accepted) == 2, "two webhooks")
        assert resource.failures == []
        assert all(len(a["webhook-signature"].split(" ")) == 2 for a in resource.attempts)
    finally:
        await stack.close()


@pytest_twisted.ensureDeferred
async def test_many_webhooks_in_order_one_request_in_flight(
    tmp_path: Path, reference_now: Clock
) -> None:
    resource = ReferenceReceiver(NEW, answer_later=True)
    stack = ReferenceStack(tmp_path, reference_now, resource)
    try:
        scheduler = stack.start(webhook_target(base_url=stack.url))
        events = [{"n": i} for i in range(40)]
        for i in range(0, 40, 8):
            scheduler.submit_many([("hook", e) for e in events[i : i + 8]])
        await eventually(lambda: len(resource.order) == 40, "forty webhooks", timeout=20)
        assert resource.order == events
        assert resource.failures == []
        assert resource.max_in_flight == 1
        assert len({a["webhook-id"] for a in resource.attempts}) == 40
    finally:
        await stack.close()


# -- relayer.testing.Receiver as a webhook receiver, next to a Matrix one ------------------------


@pytest_twisted.ensureDeferred
async def test_one_scheduler_delivers_to_a_matrix_and_a_webhook_receiver(tmp_path: Path) -> None:
    reactor = reactor_()
    matrix = Receiver("tok-m", order_key="n")
    hooks = Receiver(order_key="n", webhook_secrets=[NEW], clock=reactor)
    servers = [listen_receiver(reactor, matrix), listen_receiver(reactor, hooks, prefix="in")]
    transport = HTTPTransport(reactor)
    from relayer import SQLiteStore

    fast = BackoffPolicy(initial=0.05, maximum=0.2)
    configs = [
        TargetConfig("m", servers[0].base_url, "tok-m", backoff=fast),
        webhook_target("w", base_url=servers[1].base_url, backoff=fast),
    ]
    scheduler = Scheduler(
        reactor, SQLiteStore.open_path(reactor, tmp_path / "r.db"), transport, configs
    )
    await scheduler.start()
    try:
        hooks.fail_next(2, 503)
        events = [{"n": i} for i in range(20)]
        for event in events:
            await scheduler.submit(["m", "w"], event)
        await eventually(lambda: len(matrix.events) == len(hooks.events) == 20, "both targets")
        assert matrix.verify(events).ok and hooks.verify(events).ok
        assert matrix.violations == [] and hooks.violations == []
        assert len(hooks.webhooks) == 20 and hooks.failed == 2
        assert [w.event for w in hooks.webhooks] == events
    finally:
        await scheduler.stop()
        await transport.close()
        for server in servers:
            await server.stop()


@pytest_twisted.ensureDeferred
async def test_the_webhook_receiver_refuses_a_bad_signature_and_drops_repeats() -> None:
    reactor = reactor_()
    hooks = Receiver(webhook_secrets=[SPEC_SECRET])
    server = listen_receiver(reactor, hooks)
    try:
        good = {
            "webhook-id": SPEC_ID,
            "webhook-timestamp": str(SPEC_TIMESTAMP),
            "webhook-signature": SPEC_SIGNATURE,
            "content-type": "application/json",
        }
        for _ in range(2):
            response = await treq.post(server.base_url, SPEC_BODY, headers=good, reactor=reactor)
            assert response.code == 200
            await response.content()
        bad = dict(good, **{"webhook-signature": "v1," + "A" * 44})
        response = await treq.post(server.base_url, SPEC_BODY, headers=bad, reactor=reactor)
        assert response.code == 401
        await response.content()
        assert hooks.events == [{"test": 2432232314}]
        assert hooks.duplicates == 1 and hooks.bad_signatures == 1
        assert len(hooks.violations) == 1 and "does not verify" in hooks.violations[0]
    finally:
        await server.stop()


class EchoingResource(Resource):
    """Answers 500 with the request's headers in the body, as a careless server might."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        request.setResponseCode(500)
        return b" ".join(v for _, vs in request.requestHeaders.getAllRawHeaders() for v in vs)


@pytest_twisted.ensureDeferred
async def test_http_transport_keeps_secrets_out_of_reasons_and_errors() -> None:
    reactor = reactor_()
    site = Site(EchoingResource())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    transport = HTTPTransport(reactor)
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/in"
        config = webhook_target(base_url=url, secrets=[OLD, NEW], token="tok-secret-1")
        request = STANDARD_WEBHOOKS.request(config, txn([b"{}"]), T0)
        outcome = await transport.send_request(config, request, STANDARD_WEBHOOKS)
        assert outcome.kind.value == "retry" and outcome.reason.startswith("HTTP 500: ")
        for hidden in ("tok-secret-1", OLD, NEW, OLD[6:], NEW[6:]):
            assert hidden not in outcome.reason
        assert "[REDACTED]" in outcome.reason
    finally:
        await transport.close()
        await port.stopListening()
    # Nothing listens any more: the error names the request's method.
    from relayer import HTTPSendError

    try:
        await transport.send_request(config, request, STANDARD_WEBHOOKS)
    except HTTPSendError as e:
        assert str(e).startswith(f"POST {url} failed: connection refused")
        assert e.method == "POST"
    else:
        pytest.fail("the request to a closed port did not fail")
