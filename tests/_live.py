"""
The test side of a scheduler in another process (``tests/live_node.py``).

:class:`Receivers` serves one :class:`relayer.testing.Receiver` per target, at
``{base_url}/{target}``, in the test process (under pytest-twisted's reactor), so that a test can
make a target fail and recover, and wait for deliveries. :func:`start_node` starts a child
process that delivers to them, and waits for it to be ready; :class:`LiveNode` talks to it and
stops it. Use them with a fixture that kills what is left at teardown::

    @pytest.fixture
    def nodes() -> Iterator[LiveNodes]:
        started = LiveNodes()
        yield started
        started.kill_all()

    @pytest_twisted.ensureDeferred
    async def test_something(db_path, nodes):
        receivers = Receivers.listen(reactor, ["a", "b"])
        node = await nodes.start(db_path, receivers, sweep_interval=0.5)
        ids = await node.submit("a", 3)
        await receivers["a"].wait_for_events(3)
        await node.stop()

Commands are run with :func:`run_command`, in a thread, so that the reactor goes on serving the
receivers while they run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort, IProcessTransport, IReactorTCP
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from relayer.testing import Receiver

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "tests" / "live_node.py"
#: The token of the targets of a live node.
TOKEN = "live-token"
#: How long a test waits for what must happen soon, before it fails rather than hang.
PATIENCE = 60.0


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's, with this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class _Site(Site):
    def log(self, request: Any) -> None:
        pass


class Receivers:
    """One receiver per target, served on one port; the whole server can go down and up."""

    def __init__(
        self, reactor: IReactorTCP, target_ids: Iterable[str], order_key: str | None = None
    ) -> None:
        self._reactor = reactor
        self.receivers = {t: Receiver(token=TOKEN, order_key=order_key) for t in target_ids}
        root = Resource()
        for target_id, receiver in self.receivers.items():
            root.putChild(target_id.encode("utf-8"), receiver)
        site = _Site(root)
        site.displayTracebacks = False
        site.noisy = False
        self._factory = WrappingFactory(site)
        self._factory.noisy = False
        self._port: IListeningPort | None = reactor.listenTCP(
            0, cast(Any, self._factory), interface="127.0.0.1"
        )
        self.port_number: int = cast(Any, self._port.getHost()).port
        self.base_url = f"http://127.0.0.1:{self.port_number}"

    @classmethod
    def listen(
        cls, reactor: IReactorTCP, target_ids: Iterable[str], order_key: str | None = None
    ) -> Receivers:
        """Serve a receiver for each of ``target_ids`` (checking ``order_key`` if given)."""
        return cls(reactor, target_ids, order_key)

    def __getitem__(self, target_id: str) -> Receiver:
        return self.receivers[target_id]

    async def down(self) -> None:
        """Stop listening and cut open connections: connecting is refused."""
        port, self._port = self._port, None
        for p in list(self._factory.protocols):
            if p.transport is not None:
                p.transport.abortConnection()
        for receiver in self.receivers.values():
            receiver.cancel_pending()
        if port is not None:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped

    def up(self) -> None:
        """Listen again, on the same port."""
        if self._port is None:
            self._port = self._reactor.listenTCP(
                self.port_number, cast(Any, self._factory), interface="127.0.0.1"
            )

    async def stop(self) -> None:
        """Stop for good."""
        await self.down()


class _NodeProtocol(protocol.ProcessProtocol):
    """Collects the JSON lines of a live node; fires ``ended`` with its exit status."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._buffer = b""
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], Deferred[dict[str, Any]]]] = []
        self._seen = 0
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                document = json.loads(line)
            except ValueError:
                document = {"text": line.decode("utf-8", "replace")}
            self.lines.append(document)
            for waiter in list(self._waiters):
                matches, d = waiter
                if matches(document):
                    self._waiters.remove(waiter)
                    d.callback(document)

    def next_line(self, matches: Callable[[dict[str, Any]], bool]) -> Deferred[dict[str, Any]]:
        """The next line (from now on) for which ``matches`` is true."""
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiters.append((matches, d))
        return d

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        for _, d in self._waiters:
            d.errback(RuntimeError(f"the live node ended (exit status {code})"))
        self._waiters = []
        self.ended.callback(code)


@attrs.define
class LiveNode:
    """
    A running ``tests/live_node.py``.

    Attributes:
        argv: Its command line.
        log: The file its stderr (its log) goes to.
        ready: Its ready line.
    """

    argv: list[str]
    log: Path
    _reactor: Any
    _protocol: _NodeProtocol
    _process: IProcessTransport
    ready: dict[str, Any] = attrs.field(factory=dict)

    @property
    def running(self) -> bool:
        """Whether the process has not ended yet."""
        return not self._protocol.ended.called

    async def _ask(self, line: str, key: str) -> dict[str, Any]:
        answer = self._protocol.next_line(lambda d: key in d or "error" in d)
        self._process.write(line.encode("utf-8") + b"\n")
        document = await _within(self._reactor, answer, f"{line!r} to the live node")
        if "error" in document:
            raise RuntimeError(f"the live node refused {line!r}: {document['error']}")
        return document

    async def submit(self, targets: str | Sequence[str], n: int) -> list[str]:
        """Submit ``n`` events for the targets; their ids, once they are stored."""
        to = targets if isinstance(targets, str) else ",".join(targets)
        document = await self._ask(f"submit {to} {n}", "submitted")
        return cast(list[str], document["submitted"])

    async def wake(self, target_id: str) -> None:
        """Call the child's ``Scheduler.wake``."""
        await self._ask(f"wake {target_id}", "woken")

    async def ping(self) -> None:
        """Wait until the child answers."""
        await self._ask("ping", "pong")

    async def stop(self) -> int | None:
        """Stop it gracefully (SIGTERM); its exit status."""
        if self.running:
            try:
                self._process.signalProcess("TERM")
            except ProcessExitedAlready:
                pass
        return await _within(self._reactor, self._protocol.ended, "the live node to stop")

    def kill(self) -> None:
        """Kill it (SIGKILL), if it is still running."""
        if self.running:
            try:
                self._process.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def read_log(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def _within(reactor: Any, d: Deferred[Any], what: str, timeout: float = PATIENCE) -> Any:
    """The result of ``d``; fails, rather than hang, if it takes longer than ``timeout``."""
    d.addTimeout(timeout, reactor)
    try:
        return await d
    except Exception as e:
        raise AssertionError(f"waiting for {what}: {e!r}") from e


class LiveNodes:
    """The live nodes a test started: :meth:`kill_all` at teardown kills what is left."""

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.started: list[LiveNode] = []

    async def start(
        self,
        database: str | os.PathLike[str],
        receivers: Receivers | str,
        targets: Sequence[str] | None = None,
        *,
        sweep_interval: float = 0.5,
        backoff: tuple[float, float] = (0.2, 2.0),
        options: Sequence[str] = (),
        log: Path | None = None,
    ) -> LiveNode:
        """
        Start a live node on ``database`` delivering to ``receivers`` (or to a base URL), and
        wait until it is ready.

        Args:
            database: The database (a SQLite file, or a PostgreSQL URL).
            receivers: Where its targets are.
            targets: Its target ids; by default those of ``receivers``.
            sweep_interval: The scheduler's sweep interval.
            backoff: Each target's backoff, initial and maximum.
            options: More options of ``tests/live_node.py`` (``--leases``, ``--admin-port``...).
            log: The file its stderr goes to; by default a temporary file.
        """
        if isinstance(receivers, Receivers):
            base_url = receivers.base_url
            ids = list(targets) if targets is not None else list(receivers.receivers)
        else:
            base_url = receivers
            if targets is None:
                raise ValueError("give the target ids with a base URL")
            ids = list(targets)
        where = os.fspath(database)
        if "://" not in where:
            where = os.path.abspath(where)  # the child runs in the checkout's root
        argv = [sys.executable, str(NODE), "--database", where]
        argv += ["--receiver", base_url, "--targets", ",".join(ids)]
        argv += ["--sweep-interval", str(sweep_interval)]
        argv += ["--backoff-initial", str(backoff[0]), "--backoff-maximum", str(backoff[1])]
        argv += list(options)
        if log is None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="live-node-", suffix=".log")
            os.close(fd)
            log = Path(name)
        proto = _NodeProtocol()
        ready = proto.next_line(lambda d: "ready" in d)
        with open(log, "ab") as err:
            process = self.reactor.spawnProcess(
                proto,
                sys.executable,
                argv,
                env=child_env(),
                path=str(ROOT),
                childFDs={0: "w", 1: "r", 2: err.fileno()},
            )
        node = LiveNode(argv, log, self.reactor, proto, process)
        self.started.append(node)
        try:
            node.ready = await _within(self.reactor, ready, "the live node to be ready")
        except AssertionError as e:
            node.kill()
            raise AssertionError(f"{e}\nits log:\n{node.read_log()}") from e
        return node

    def kill_all(self) -> None:
        """Kill every node still running."""
        for node in self.started:
            node.kill()


@attrs.frozen
class Ran:
    """A command that ran: its exit status and what it printed."""

    status: int
    out: str
    err: str


def run_command(*args: str, env: dict[str, str] | None = None) -> Deferred[Ran]:
    """
    Run ``python -m relayer ARGS...``, in this process's directory, in a thread (the reactor
    goes on meanwhile).
    """

    def run() -> Ran:
        done = subprocess.run(
            [sys.executable, "-m", "relayer", *args],
            capture_output=True,
            text=True,
            timeout=PATIENCE * 2,
            env=env if env is not None else child_env(),
        )
        return Ran(done.returncode, done.stdout, done.stderr)

    return deferToThread(run)


async def wait_until(
    reactor: Any, what: str, condition: Callable[[], bool], timeout: float = PATIENCE
) -> None:
    """Wait, without blocking the reactor, until ``condition()`` is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


async def wait_for(
    reactor: Any,
    what: str,
    check: Callable[[], Deferred[Any]],
    accept: Callable[[Any], bool],
    timeout: float = PATIENCE,
) -> Any:
    """Call ``check()`` (a Deferred, e.g. :func:`run_command`) until ``accept`` takes its result."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if accept(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {result!r}")
        await deferLater(reactor, 0.1, lambda: None)
