"""
The benchmark's sink: one twisted.web server, in a process of its own, that plays every target.

Run as ``python -m benchmarks.sink --token TOKEN``. It listens on 127.0.0.1 on a free port and
prints one line, ``READY {"port": ..., "flap_port": ...}``, once it accepts requests.

Target ``NAME`` has the base URL ``http://127.0.0.1:{port}/t/NAME``. Every transaction
(``PUT .../t/NAME/_matrix/app/v1/transactions/{txn_id}``) is checked and decoded in full:

- the ``Authorization: Bearer`` token;
- transaction ids: per target they strictly increase; a repeated id (a retry whose answer was
  lost) must carry the same bytes, and is acknowledged without being counted again;
- the body is decoded as JSON ``{"events": [...]}``, and every event must be an object whose
  ``"s"`` is the target's next sequence number (0, 1, 2, ...): nothing lost, nothing repeated,
  nothing out of order. An event that carries ``"ts"`` (a ``time.monotonic()`` reading taken at
  submit) adds a latency sample: the time between that reading and now.

Targets that should be down point at ``flap_port`` instead, which is kept closed (connecting is
refused) until ``POST /_control/up`` opens it; ``POST /_control/down`` closes it again.
``GET /_control/report`` answers with what was received, per target, as JSON.

``POST /_control/flaky?prefix=P&down=D&up=U`` makes the targets whose names start with ``P``
fail and recover, over and over: for ``D`` seconds each of them answers HTTP 500 or closes the
connection without an answer (half of the targets one way, half the other), then for ``U``
seconds it accepts transactions again; ``down=0`` ends it. With ``hang=S``, each refusal comes
only after ``S`` seconds, as from a receiver that hangs. The refusals are counted in the
report's ``flaky_refused``.

``time.monotonic()`` reads ``CLOCK_MONOTONIC``, which every process on the machine shares, so the
sink's timestamps can be compared with the relayer process's.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
import zlib
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web import http, server
from twisted.web.resource import Resource

_TRANSACTIONS = [b"_matrix", b"app", b"v1", b"transactions"]
#: At most this many violations are described in the report (all are counted).
MAX_VIOLATIONS_SHOWN = 20


class _TargetState:
    """What one target has received."""

    __slots__ = (
        "count",
        "next_seq",
        "last_txn",
        "last_sig",
        "txns",
        "duplicates",
        "first_at",
        "last_at",
    )

    def __init__(self) -> None:
        self.count = 0
        self.next_seq = 0
        self.last_txn = 0
        self.last_sig: tuple[int, int] | None = None
        self.txns = 0
        self.duplicates = 0
        self.first_at: float | None = None
        self.last_at: float | None = None


class _Request(server.Request):
    """A request that keeps its body in memory, however large (twisted.web spills large bodies
    to a temporary file, which would make the sink measure the disk)."""

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()


class _QuietSite(server.Site):
    def log(self, request: http.Request) -> None:
        pass


class Sink(Resource):
    """Every target's receiving end, and the control endpoints."""

    isLeaf = True

    def __init__(self, token: str) -> None:
        super().__init__()
        self._auth = b"Bearer " + token.encode("ascii")
        self.targets: dict[bytes, _TargetState] = {}
        self.violations: list[str] = []
        self.n_violations = 0
        self.latencies: list[float] = []
        self.requests = 0
        self.total_events = 0
        self.flap_port = 0
        self.site: server.Site | None = None
        self._flap: IListeningPort | None = None
        # The flaky targets: their name prefix, when the cycles began, and the phases' lengths.
        self._flaky: tuple[bytes, float, float, float] | None = None
        self._hang = 0.0
        self.flaky_refused = 0

    def _violation(self, text: str) -> None:
        self.n_violations += 1
        if len(self.violations) < MAX_VIOLATIONS_SHOWN:
            self.violations.append(text)

    # -- transactions --------------------------------------------------------------------------

    def render_PUT(self, request: server.Request) -> bytes:
        now = time.monotonic()
        self.requests += 1
        path = request.postpath or []
        if len(path) != 7 or path[0] != b"t" or path[2:6] != _TRANSACTIONS:
            self._violation(f"unexpected path {request.path!r}")
            request.setResponseCode(404)
            return b"{}"
        if request.getHeader(b"authorization") != self._auth:
            self._violation("a request without the right Authorization header")
            request.setResponseCode(403)
            return b"{}"
        name = path[1]
        if self._flaky is not None and self._refuses(name, now):
            self.flaky_refused += 1
            if not self._hang:
                return self._refuse(request, name)
            reactor.callLater(self._hang, self._refuse_later, request, name)
            return cast(bytes, server.NOT_DONE_YET)
        try:
            txn_id = int(path[6])
        except ValueError:
            self._violation(f"transaction id {path[6]!r} is not a number")
            request.setResponseCode(400)
            return b"{}"
        assert request.content is not None
        body = request.content.read()
        sig = (len(body), zlib.crc32(body))
        state = self.targets.get(name)
        if state is None:
            state = self.targets[name] = _TargetState()
        if txn_id <= state.last_txn:
            if txn_id == state.last_txn and sig == state.last_sig:
                state.duplicates += 1
            else:
                self._violation(
                    f"{name.decode()}: transaction {txn_id} after {state.last_txn}"
                    + (" with different bytes" if txn_id == state.last_txn else "")
                )
            return b"{}"
        try:
            events = json.loads(body)["events"]
        except (ValueError, KeyError, TypeError):
            self._violation(f"{name.decode()}: transaction {txn_id} is not {{'events': [...]}}")
            request.setResponseCode(400)
            return b"{}"
        state.last_txn = txn_id
        state.last_sig = sig
        state.txns += 1
        expected = state.next_seq
        try:
            seqs = [event["s"] for event in events]
        except (TypeError, KeyError):
            seqs = [event.get("s") if isinstance(event, dict) else None for event in events]
        if seqs == list(range(expected, expected + len(seqs))):
            expected += len(seqs)
        else:
            for seq in seqs:
                if seq != expected:
                    self._violation(
                        f"{name.decode()}: transaction {txn_id} holds event s={seq!r} where "
                        f"s={expected} was due"
                    )
                    expected = seq if isinstance(seq, int) else expected
                expected += 1
        if events and isinstance(events[0], dict) and "ts" in events[0]:
            self.latencies.extend(now - event["ts"] for event in events)
        state.next_seq = expected
        state.count += len(events)
        self.total_events += len(events)
        if state.first_at is None:
            state.first_at = now
        state.last_at = now
        return b"{}"

    def _refuse(self, request: server.Request, name: bytes) -> bytes:
        """A flaky target's refusal: HTTP 500, or the connection closed without an answer."""
        if zlib.crc32(name) % 2:
            request.setResponseCode(500)
            return b"{}"
        assert request.channel is not None
        request.channel.transport.loseConnection()
        return cast(bytes, server.NOT_DONE_YET)

    def _refuse_later(self, request: server.Request, name: bytes) -> None:
        if request.finished or request._disconnected or request.channel is None:
            return  # the client gave up
        body = self._refuse(request, name)
        if body is not server.NOT_DONE_YET:
            request.write(body)
            request.finish()

    def _refuses(self, name: bytes, now: float) -> bool:
        """Whether a flaky target is in the failing phase of its cycle."""
        assert self._flaky is not None
        prefix, since, down, up = self._flaky
        return name.startswith(prefix) and (now - since) % (down + up) < down

    # -- control -------------------------------------------------------------------------------

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/_control/report":
            return self._report()
        request.setResponseCode(404)
        return b"{}"

    def render_POST(self, request: server.Request) -> bytes:
        if request.path == b"/_control/up":
            if self._flap is None:
                assert self.site is not None
                self._flap = reactor.listenTCP(
                    self.flap_port, cast(Any, self.site), interface="127.0.0.1"
                )
            return b"{}"
        if request.path == b"/_control/flaky":
            args = request.args or {}
            down = float(args.get(b"down", [b"0"])[0])
            up = float(args.get(b"up", [b"1"])[0])
            prefix = args.get(b"prefix", [b""])[0]
            self._hang = float(args.get(b"hang", [b"0"])[0])
            self._flaky = (prefix, time.monotonic(), down, up) if down > 0 else None
            return b"{}"
        if request.path == b"/_control/down":
            flap, self._flap = self._flap, None
            if flap is not None:
                flap.stopListening()
            return b"{}"
        request.setResponseCode(404)
        return b"{}"

    def _report(self) -> bytes:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return json.dumps(
            {
                "requests": self.requests,
                "total_events": self.total_events,
                "n_violations": self.n_violations,
                "violations": self.violations,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "targets": {
                    name.decode(): [
                        s.count,
                        s.next_seq,
                        s.txns,
                        s.duplicates,
                        s.first_at,
                        s.last_at,
                    ]
                    for name, s in self.targets.items()
                },
                "latencies": self.latencies,
                "flaky_refused": self.flaky_refused,
            }
        ).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sink")
    parser.add_argument("--token", required=True)
    args = parser.parse_args(argv)
    sink = Sink(args.token)
    site = _QuietSite(sink)
    site.requestFactory = _Request
    site.noisy = False
    site.displayTracebacks = False
    sink.site = site
    port = reactor.listenTCP(0, cast(Any, site), backlog=4096, interface="127.0.0.1")
    # Reserve a port number for the targets that start down: listen, note it, close it.
    flap = reactor.listenTCP(0, cast(Any, site), interface="127.0.0.1")
    sink.flap_port = cast(Any, flap.getHost()).port
    flap.stopListening()
    ready = {"port": cast(Any, port.getHost()).port, "flap_port": sink.flap_port}
    sys.stdout.write("READY " + json.dumps(ready) + "\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
