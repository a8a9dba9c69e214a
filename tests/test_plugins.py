"""
Plugins through entry points: a small distribution in tests/plugin_dist (a retry policy, a wire
format, and two broken entry points) is installed with pip into a folder put on the path, as an
application's environment would have it, and used.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site

from relayer import HTTPTransport, Scheduler, SQLiteStore, TargetConfig, TargetState, plugins
from relayer.errors import InvalidTarget
from relayer.testing import build_scheduler, step, target
from tests._support import result_of

result = result_of

PLUGIN = Path(__file__).resolve().parent / "plugin_dist"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example plugin, installed with pip into a folder on sys.path."""
    where = tmp_path_factory.mktemp("plugins")
    build = tmp_path_factory.mktemp("plugin-build")
    # Built from a copy, so that the build leaves nothing in the checkout.
    source = build / "plugin_dist"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(where),
            str(source),
        ],
        capture_output=True,
        text=True,
        cwd=build,
        env={"PIP_NO_CACHE_DIR": "1", "PATH": "/usr/bin:/bin", "HOME": str(build)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (where / "relayer_example_plugin-1.0.dist-info" / "entry_points.txt").exists()
    sys.path.insert(0, str(where))
    importlib.invalidate_caches()
    plugins.forget()
    try:
        yield where
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m.startswith("relayer_example_plugin")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        plugins.forget()


def test_without_the_plugin_its_name_is_unknown(db_path: Any) -> None:
    # This runs before the module's fixture installs the plugin.
    plugins.forget()
    assert "patient" not in plugins.available(plugins.POLICIES_GROUP)
    h = build_scheduler(["other"], path=db_path)
    with pytest.raises(InvalidTarget, match="unknown retry policy 'patient'"):
        h.scheduler.add_target(target("t", retry_policy="patient"))


def test_the_installed_plugin_s_policies_are_listed(installed: Path) -> None:
    found = plugins.available(plugins.POLICIES_GROUP)
    assert found["patient"] == (
        "relayer-example-plugin: relayer_example_plugin.policies:PatientPolicy"
    )


def test_a_target_uses_a_policy_from_a_plugin(installed: Path, db_path: Any) -> None:
    h = build_scheduler([target("t", retry_policy="patient")], path=db_path)
    h.transport["t"].fail_with(500)
    h.scheduler.submit("t", {"n": 0})
    step(h.clock, 60)
    # The plugin's policy: a retry every 7 seconds, disabled at the third failure.
    assert h.transport["t"].times == [0.0, 7.0, 14.0]
    [status] = result(h.scheduler.status())
    assert status.state is TargetState.DISABLED
    assert status.last_error == "patient: 3 failures in a row (HTTP 500)"
    h.transport["t"].up()
    h.scheduler.wake("t")
    step(h.clock, 0)
    assert h.transport["t"].events == [{"n": 0}]
    # Loaded once, and kept.
    from relayer_example_plugin.policies import PatientPolicy  # type: ignore[import-not-found]

    assert isinstance(plugins.retry_policy("patient"), PatientPolicy)
    assert plugins.retry_policy("patient") is plugins.retry_policy("patient")


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "broken",
            "the retry policy 'broken' of the plugin relayer-example-plugin "
            "(relayer_example_plugin.missing:Nothing) failed to load: ModuleNotFoundError",
        ),
        (
            "not-a-policy",
            "the retry policy 'not-a-policy' of the plugin relayer-example-plugin "
            "(relayer_example_plugin.policies:NOT_A_POLICY) does not provide "
            "relayer.policy.IRetryPolicy",
        ),
        ("absent", "unknown retry policy 'absent': no plugin provides one by that name"),
    ],
)
def test_a_plugin_that_is_broken_or_absent_is_refused_with_a_message(
    installed: Path, db_path: Any, name: str, message: str
) -> None:
    h = build_scheduler(["other"], path=db_path)
    with pytest.raises(InvalidTarget) as caught:
        h.scheduler.add_target(target("t", retry_policy=name))
    assert message in str(caught.value)
    assert "t" not in h.scheduler.targets


class _Endpoint(Resource):
    """A receiver of the example format: records each POST, answers 410 to one event."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[str | None, bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        event_id = request.getHeader("x-example-event")
        self.received.append((event_id, request.content.read()))
        request.setResponseCode(410 if event_id == "gone" else 200)
        return b""


def test_the_installed_plugin_s_format_is_listed(installed: Path) -> None:
    found = plugins.available(plugins.FORMATS_GROUP)
    assert found["example-json"] == (
        "relayer-example-plugin: relayer_example_plugin.formats:ExampleJSON"
    )


@pytest_twisted.ensureDeferred
async def test_a_target_uses_a_wire_format_from_a_plugin_over_http(
    installed: Path, tmp_path: Path
) -> None:
    from twisted.internet import reactor

    endpoint = _Endpoint()
    site = Site(endpoint)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/in"
    transport = HTTPTransport(reactor)
    scheduler = Scheduler(
        reactor,
        SQLiteStore.open_path(reactor, tmp_path / "relayer.db"),
        transport,
        [TargetConfig("crm", url, "tok", format="example-json")],
    )
    await scheduler.start()
    try:
        for event_id in ("a", "gone", "b"):
            await scheduler.submit("crm", {"id": event_id}, event_id=event_id)
        deadline = time.monotonic() + 20
        while len(endpoint.received) < 3 or (await scheduler.status())[0].pending_events:
            assert time.monotonic() < deadline, endpoint.received
            await deferLater(reactor, 0.02, lambda: None)
        # One POST per event, in order, each with its id in the format's header.
        assert endpoint.received == [
            ("a", b'{"id":"a"}'),
            ("gone", b'{"id":"gone"}'),
            ("b", b'{"id":"b"}'),
        ]
        # The format's own reading of 410: a refusal for good, dead-lettered.
        [letter] = await scheduler.dead_letters("crm")
        assert (letter.event_ids, letter.reason) == (("gone",), "HTTP 410 (gone)")
    finally:
        await scheduler.stop()
        await transport.close()
        await port.stopListening()


def test_a_plugin_format_is_checked_against_its_target(installed: Path, db_path: Any) -> None:
    h = build_scheduler(["other"], path=db_path)
    with pytest.raises(InvalidTarget, match="of example-json needs a token"):
        h.scheduler.add_target(target("t", format="example-json", token=""))
    with pytest.raises(InvalidTarget, match="unknown wire format 'nowhere'; known: .*example-json"):
        h.scheduler.add_target(target("u", format="nowhere"))


def test_a_plugin_format_whose_max_events_is_not_valid_is_refused(
    db_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zope.interface import implementer

    from relayer.errors import ConfigurationError
    from relayer.formats import MATRIX, IWireFormat

    @implementer(IWireFormat)
    class NoEvents:
        name = "no-events"
        max_events = 0  # a plugin's bug: the scheduler's formats= refuses it too

        def check(self, target: Any) -> None:
            pass

        def request(self, target: Any, txn: Any, now: float) -> Any:
            return MATRIX.request(target, txn, now)

        def classify(self, status: int, retry_after: Any, now: float) -> Any:
            return MATRIX.classify(status, retry_after, now)

    # As the entry point's object, once loaded.
    monkeypatch.setitem(plugins._loaded, (plugins.FORMATS_GROUP, "no-events"), NoEvents())
    h = build_scheduler(["other"], path=db_path)
    with pytest.raises(ConfigurationError, match="max_events must be None or an int >= 1"):
        h.scheduler.add_target(target("t", format="no-events"))
    assert "t" not in h.scheduler.targets
