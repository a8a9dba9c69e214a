"""
A bounded soak: 1,000 targets, a fifth of them flapping, 200,000 events over loopback HTTP.

The scheduler runs in a child process (``tests/soak/soak_child.py``: the real reactor, a SQLite
file on the threaded database pool, the HTTP transport), so that its resident set size (RSS) is its
own. One twisted.web server in this process plays every target, by path prefix. Every fifth
target flaps: its answers go 500, accept, hang up without an answer, accept, and over again, so
it keeps going DOWN and coming back for the whole run.

The test checks that every target received each of its 200 events exactly once (after
deduplicating by transaction id) and in order; that no transaction id was sent with two
different bodies; and that the child's RSS, sampled as it runs, stays under a ceiling relative
to its RSS once it is warmed up, rather than growing with the number of events. The RSS samples
are printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

# The soak runs on a SQLite file; the PostgreSQL pass skips it.
pytestmark = [pytest.mark.integration, pytest.mark.sqlite_only]

CHILD = Path(__file__).parent / "soak" / "soak_child.py"
TARGETS = 1000
#: Every FLAP_EVERY-th target flaps: 20% of them.
FLAP_EVERY = 5
EVENTS_PER_TARGET = 200
CHUNKS = 10
TOKEN = "soak-token"
#: A bound on the run, so that a hang shows as a failure rather than a stuck suite.
DEADLINE = 300.0
#: The RSS ceilings: no sample after warm-up may exceed the warmed-up RSS by more than this
#: share of it, plus a constant for allocator noise.
RSS_GROWTH_SHARE = 0.5
RSS_GROWTH_KIB = 32 * 1024


def reactor_() -> Any:
    from twisted.internet import reactor

    return reactor


# -- the targets -----------------------------------------------------------------------------


@attrs.define
class TargetLog:
    """What one target received, checked as it arrives."""

    target_id: str
    flapping: bool
    next_n: int = 0
    requests: int = 0
    failed: int = 0
    duplicates: int = 0
    accepted: dict[int, bytes] = attrs.field(factory=dict)
    attempts: dict[int, bytes] = attrs.field(factory=dict)
    highest_txn: int = 0
    violations: list[str] = attrs.field(factory=list)


class SoakTarget(Resource):
    isLeaf = True

    def __init__(self, log: TargetLog) -> None:
        super().__init__()
        self.log = log

    def render_PUT(self, request: Request) -> bytes | int:
        log = self.log
        log.requests += 1
        path = request.postpath or []
        if request.getHeader(b"authorization") != f"Bearer {TOKEN}".encode():
            log.violations.append("a request without the right token")
        if len(path) != 5 or not path[4].isdigit():
            log.violations.append(f"a request to {path!r}")
            request.setResponseCode(404)
            return b"{}"
        txn_id = int(path[4])
        assert request.content is not None
        body = request.content.read()
        digest = hashlib.sha256(body).digest()
        if log.attempts.setdefault(txn_id, digest) != digest:
            log.violations.append(f"transaction {txn_id} was sent with different bytes")
        if log.flapping and log.requests % 2 == 1:
            # Fail every other request: 500 or hanging up, by turns.
            log.failed += 1
            if log.requests % 4 == 1:
                request.setResponseCode(500)
                return b'{"errcode":"M_UNKNOWN"}'
            assert request.transport is not None
            request.transport.abortConnection()  # type: ignore[attr-defined]
            return NOT_DONE_YET
        if txn_id in log.accepted:
            log.duplicates += 1
            return b"{}"
        if txn_id <= log.highest_txn:
            log.violations.append(f"transaction {txn_id} came after {log.highest_txn}")
        log.highest_txn = max(log.highest_txn, txn_id)
        log.accepted[txn_id] = digest
        for event in json.loads(body)["events"]:
            if event.get("t") != log.target_id or event.get("n") != log.next_n:
                log.violations.append(
                    f"transaction {txn_id}: got {event!r} where n={log.next_n} was next"
                )
            log.next_n = max(log.next_n, event.get("n", -1) + 1)
        return b"{}"


class SoakRoot(Resource):
    def __init__(self, logs: dict[str, TargetLog]) -> None:
        super().__init__()
        self.targets = {t.encode(): SoakTarget(log) for t, log in logs.items()}

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self.targets.get(path) or NoResource()


class _QuietSite(Site):
    def log(self, request: http.Request) -> None:
        pass


# -- the child -------------------------------------------------------------------------------


class Child(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        self.ended.callback(code)


def rss_samples(out: str) -> list[tuple[str, int, int, int]]:
    """The child's ``rss LABEL KIB SUBMITTED PENDING`` lines."""
    samples = []
    for line in out.splitlines():
        words = line.split()
        if words[:1] == ["rss"]:
            samples.append((words[1], int(words[2]), int(words[3]), int(words[4])))
    return samples


@pytest_twisted.ensureDeferred
async def test_soak_1000_targets_200k_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reactor = reactor_()
    ids = [f"t{i:04d}" for i in range(TARGETS)]
    logs = {t: TargetLog(t, flapping=i % FLAP_EVERY == 0) for i, t in enumerate(ids)}
    site = _QuietSite(SoakRoot(logs))
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=1024)
    log_path = tmp_path / "relayer.log"
    config = {
        "db": str(tmp_path / "relayer.db"),
        "base_url": f"http://127.0.0.1:{port.getHost().port}",
        "token": TOKEN,
        "targets": TARGETS,
        "events": EVENTS_PER_TARGET,
        "chunks": CHUNKS,
        "backoff": {"initial": 0.05, "maximum": 0.5},
        "seed": 1,
        "log": str(log_path),
        "max_persistent": TARGETS,
    }
    child = Child()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")]
    )
    process = reactor.spawnProcess(
        child, sys.executable, [sys.executable, str(CHILD), json.dumps(config)], env=env
    )
    hung = []

    def watchdog() -> None:
        hung.append(True)
        process.signalProcess("KILL")

    timer = reactor.callLater(DEADLINE, watchdog)
    try:
        code = await child.ended
    finally:
        if timer.active():
            timer.cancel()
        await port.stopListening()

    out = child.out.decode()
    log_tail = log_path.read_text()[-3000:] if log_path.exists() else ""
    diagnostics = f"stdout:\n{out[-2000:]}\nstderr:\n{child.err.decode()[-2000:]}\nlog:\n{log_tail}"
    assert not hung, f"the soak did not finish within {DEADLINE:g}s\n{diagnostics}"
    assert code == 0, f"the soak child exited with {code}\n{diagnostics}"

    # Nothing lost, nothing reordered, nothing duplicated, no bytes changed.
    violations = [f"{t}: {v}" for t, log in logs.items() for v in log.violations]
    assert violations == [], "\n".join(violations[:20])
    short = {t: log.next_n for t, log in logs.items() if log.next_n != EVENTS_PER_TARGET}
    assert short == {}, f"targets that did not get all {EVENTS_PER_TARGET} events: {short}"
    delivered = sum(log.next_n for log in logs.values())
    assert delivered == TARGETS * EVENTS_PER_TARGET == 200_000
    flapping = [log for log in logs.values() if log.flapping]
    assert len(flapping) == TARGETS // FLAP_EVERY == 200
    assert all(log.failed > 0 for log in flapping)
    assert all(log.failed == 0 for log in logs.values() if not log.flapping)

    # Memory: the samples after warm-up stay under a ceiling relative to the warmed-up RSS.
    samples = rss_samples(out)
    assert samples and samples[0][0] == "start" and samples[-1][0] == "end", out[-2000:]
    warm = next(s for s in samples if s[2] >= TARGETS * EVENTS_PER_TARGET // 4)
    ceiling = warm[1] * (1 + RSS_GROWTH_SHARE) + RSS_GROWTH_KIB
    later = samples[samples.index(warm) :]
    peak = max(later, key=lambda s: s[1])
    requests = sum(log.requests for log in logs.values())
    with capsys.disabled():
        print(
            f"\nsoak: {delivered} events to {TARGETS} targets ({len(flapping)} flapping) in "
            f"{requests} requests ({sum(log.failed for log in flapping)} failed, "
            f"{sum(log.duplicates for log in logs.values())} duplicates)"
        )
        print(
            f"soak: child RSS at start {samples[0][1] / 1024:.1f} MiB, warmed up "
            f"{warm[1] / 1024:.1f} MiB, peak after {peak[1] / 1024:.1f} MiB ({peak[0]}), "
            f"at end {samples[-1][1] / 1024:.1f} MiB; ceiling {ceiling / 1024:.1f} MiB"
        )
        print(
            "soak: RSS samples (MiB): "
            + " ".join(f"{label}={kib / 1024:.0f}" for label, kib, _, _ in samples)
        )
    assert peak[1] <= ceiling, f"RSS grew from {warm} to {peak}: {samples}"
