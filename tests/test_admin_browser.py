"""
The status page in a real browser: headless Chromium, from Debian's ``chromium`` and
``chromium-driver`` packages, driven through the W3C WebDriver protocol.

An operator opens the page of a scheduler running in another process, sees a target DOWN,
makes its receiver healthy, presses wake, and sees it deliver; looks an event up; and discards
a dead letter. Without the browser the test is skipped, except when ``CI`` is set (as
``.ci/run`` does), where it fails instead: CI never skips it silently.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from _live import PATIENCE, LiveNodes, Receivers, wait_for
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-token-0123456789"
#: A target id full of markup: the page must show it as text.
MARKUP = '<b>bold</b>&amp;"<i>'
#: The key of an element reference in WebDriver's answers.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    message = (
        f"the status page test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
        "not found): apt-get install -y chromium chromium-driver"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


class WebDriverError(Exception):
    """An error answered by the WebDriver server."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error


class WebDriver:
    """A small client of the W3C WebDriver protocol, over HTTP; its calls block (use threads)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session: str | None = None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        try:
            with urllib.request.urlopen(request, timeout=PATIENCE) as response:
                document = json.load(response)
        except urllib.error.HTTPError as e:
            try:
                value = json.load(e)["value"]
            except ValueError:
                raise WebDriverError("unknown error", f"HTTP {e.code}") from None
            raise WebDriverError(value.get("error", "?"), value.get("message", "")) from None
        return document["value"]

    def ready(self) -> bool:
        try:
            return bool(self.call("GET", "/status").get("ready"))
        except (OSError, WebDriverError):
            return False

    def start(self) -> None:
        options = {
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1400,1000",
            ],
        }
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        value = self.call("POST", "/session", {"capabilities": capabilities})
        self.session = value["sessionId"]

    def stop(self) -> None:
        if self.session is not None:
            self.call("DELETE", f"/session/{self.session}")
            self.session = None

    def _s(self, path: str) -> str:
        assert self.session is not None
        return f"/session/{self.session}{path}"

    def go(self, url: str) -> None:
        self.call("POST", self._s("/url"), {"url": url})

    def current_url(self) -> str:
        return str(self.call("GET", self._s("/url")))

    def find(self, selector: str) -> str:
        value = self.call("POST", self._s("/element"), {"using": "css selector", "value": selector})
        return str(value[ELEMENT])

    def find_all(self, selector: str) -> list[str]:
        value = self.call(
            "POST", self._s("/elements"), {"using": "css selector", "value": selector}
        )
        return [str(v[ELEMENT]) for v in value]

    def text(self, element: str) -> str:
        return str(self.call("GET", self._s(f"/element/{element}/text")))

    def click(self, element: str) -> None:
        self.call("POST", self._s(f"/element/{element}/click"), {})

    def type(self, element: str, text: str) -> None:
        self.call("POST", self._s(f"/element/{element}/value"), {"text": text})

    def accept_alert(self) -> str:
        text = str(self.call("GET", self._s("/alert/text")))
        self.call("POST", self._s("/alert/accept"), {})
        return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """A headless Chromium session, through a chromedriver of this test's own."""
    _require_browser()
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="chromedriver-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    driver = WebDriver(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + PATIENCE
        while not driver.ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"chromedriver did not start: {Path(log.name).read_text(errors='replace')}"
                )
            time.sleep(0.05)
        driver.start()
        yield driver
    finally:
        try:
            driver.stop()
        except (OSError, WebDriverError):
            pass
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.unlink(log.name)


@pytest.fixture
def nodes() -> Iterator[LiveNodes]:
    started = LiveNodes(reactor)
    yield started
    started.kill_all()


class Page:
    """The operator's view: reads and clicks on the page, without blocking the reactor."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThread(f, *args)

    async def read(self, selector: str) -> str | None:
        """The text of the element, or None while there is none (the page refreshes)."""

        def read() -> str | None:
            try:
                return self.driver.text(self.driver.find(selector))
            except WebDriverError as e:
                if e.error in ("no such element", "stale element reference"):
                    return None
                raise

        text: str | None = await self.run(read)
        return text

    async def until(self, what: str, selector: str, accept: Callable[[str], bool]) -> str:
        """Wait until the element's text is accepted; its text."""
        found: str = await wait_for(
            reactor,
            what,
            lambda: Deferred.fromCoroutine(self.read(selector)),
            lambda text: text is not None and accept(text),
        )
        return found

    async def click(self, selector: str) -> None:
        """Click the element, again if the page replaced it meanwhile."""
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                await self.run(lambda: self.driver.click(self.driver.find(selector)))
                return
            except WebDriverError as e:
                if e.error not in ("no such element", "stale element reference"):
                    raise
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not click {selector}: {e}") from e
            await deferLater(reactor, 0.1, lambda: None)


def row(target_id: str, field: str) -> str:
    return f'#targets-body tr[data-target-id="{target_id}"] td[data-field="{field}"]'


@pytest_twisted.ensureDeferred
async def test_an_operator_wakes_a_down_target_from_the_status_page(
    db_path: Path | str, nodes: LiveNodes, browser: WebDriver
) -> None:
    receivers = Receivers.listen(reactor, ["alpha", "beta"], order_key="n")
    try:
        receivers["alpha"].fail_with(503)
        receivers["beta"].fail_with(400)
        # A long backoff: alpha stays DOWN until someone wakes it.
        node = await nodes.start(
            db_path,
            receivers,
            ["alpha", "beta", MARKUP],
            backoff=(600.0, 1200.0),
            options=["--admin-port", "0", "--admin-token", TOKEN],
        )
        await node.submit("alpha", 3)
        await node.submit("beta", 1)
        page = Page(browser)
        base = f"http://127.0.0.1:{node.ready['admin_port']}/admin/"
        await page.run(browser.go, f"{base}#token={TOKEN}")

        # The operator sees alpha DOWN, with its backlog and why.
        state = await page.until("alpha DOWN", row("alpha", "state"), lambda t: t.lower() == "down")
        assert state == "DOWN"  # as shown: upper case
        await page.until("alpha's backlog", row("alpha", "pending_events"), lambda t: t == "3")
        error = await page.read(row("alpha", "last_error"))
        assert error is not None and "503" in error
        # The token left the address bar; it is kept for the tab.
        assert TOKEN not in await page.run(browser.current_url)
        # A target id full of markup is shown as it is, as text.
        cells = await page.run(browser.find_all, "#targets-body td[data-field=target_id]")
        names = [await page.run(browser.text, c) for c in cells]
        assert MARKUP in names
        assert await page.run(browser.find_all, "#targets-body b") == []

        # Its receiver is back: the operator presses wake, and sees it deliver.
        receivers["alpha"].healthy()
        await page.click('#targets-body button[data-action="wake"][data-target-id="alpha"]')
        await page.until("alpha UP", row("alpha", "state"), lambda t: t.lower() == "up")
        await page.until("alpha's backlog gone", row("alpha", "pending_events"), lambda t: t == "0")
        message = await page.read("#message")
        assert message is not None and "Woke alpha" in message
        await receivers["alpha"].wait_for_events(3)
        assert receivers["alpha"].events == [{"target": "alpha", "n": k} for k in range(3)]

        # An event's status, found by its id.
        await page.run(lambda: browser.type(browser.find("#event-id"), "alpha-0"))
        await page.click("#event-search")
        delivered = await page.until(
            "alpha-0 delivered",
            '#event-deliveries tr[data-target-id="alpha"] td[data-field="state"]',
            lambda t: t.lower() == "delivered",
        )
        assert delivered == "DELIVERED"

        # beta refused its event: a dead letter, which the operator discards.
        await page.until("beta's dead letter", row("beta", "dead_letters"), lambda t: t == "1")
        await page.click('#targets-body button[data-action="dead-letters"][data-target-id="beta"]')
        ids = await page.until(
            "beta's dead letter listed",
            '#dead-letters-body tr td[data-field="event_ids"]',
            lambda t: t == "beta-0",
        )
        assert ids == "beta-0"
        reason = await page.read('#dead-letters-body tr td[data-field="reason"]')
        assert reason is not None and reason.startswith("HTTP 400")
        await page.click('#dead-letters-body button[data-action="discard"]')
        question = await page.run(browser.accept_alert)
        assert "Discard transaction" in question
        await page.until("beta's dead letter gone", row("beta", "dead_letters"), lambda t: t == "0")
        status = await wait_for(
            reactor,
            "beta-0 discarded",
            lambda: Deferred.fromCoroutine(page.read("#dead-letters-empty")),
            lambda text: text == "No dead letters.",
        )
        assert status == "No dead letters."
        assert receivers["beta"].events == []
        assert await node.stop() == 0
    finally:
        await receivers.stop()
