"""
An admin HTTP API and status page for a running :class:`~relayer.Scheduler`.

:class:`AdminResource` is a :class:`twisted.web.resource.Resource` that an application mounts
wherever it likes, on a :class:`twisted.web.server.Site` of its own or beside its other
resources. Nothing is served unless the application mounts it. It answers:

- ``GET /`` (the resource's own root): a status page, one HTML document with no data in it,
  whose script calls the API below with the token the operator gives it;
- ``/api/...``: a JSON API for what the ``relayer`` operator commands do (status, wake, replay,
  discard, dead letters, a target's events, an event's status, a command's outcome), through
  the scheduler's public methods;
- ``GET /metrics``: the metrics, when the resource is given an object that renders them.

Every route except the page needs ``Authorization: Bearer TOKEN``, the token the resource was
built with; it is compared in constant time and never logged. Requests are answered through
Deferreds, and never block the reactor.

Example::

    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from relayer.admin import AdminResource

    root = Resource()
    root.putChild(b"relayer", AdminResource(scheduler, token=os.environ["RELAYER_ADMIN_TOKEN"]))
    reactor.listenTCP(8008, Site(root), interface="127.0.0.1")

See :doc:`operations` for every route, with examples.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any, Protocol
from urllib.parse import quote

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayer import _logevents as ev
from relayer.errors import (
    ConfigurationError,
    InvalidEvent,
    NotRunning,
    StoreUnavailable,
    UnknownTarget,
)
from relayer.scheduler import Scheduler, TargetStatus
from relayer.store.base import DeadLetter, DeliveryState

#: The shortest token :class:`AdminResource` accepts.
MIN_TOKEN_LENGTH = 16

#: The most targets one ``GET /api/targets`` returns (``limit``); 100 by default.
MAX_TARGETS_PAGE = 1000
#: The most dead letters one ``GET /api/targets/{id}/dead-letters`` returns; 20 by default.
MAX_DEAD_LETTERS_PAGE = 100
#: The most events one ``GET /api/targets/{id}/events`` returns; 100 by default.
MAX_EVENTS_PAGE = 1000
#: The most events one ``GET /api/targets/{id}/events?with_events=true`` returns, with their
#: bodies.
MAX_EVENTS_PAGE_WITH_BODIES = 100
#: The most event ids a dead letter shows; ``n_events`` says how many it holds.
MAX_DEAD_LETTER_EVENT_IDS = 100

# A token is sent in an HTTP header: printable ASCII, without spaces.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")

# The greatest character a target id may hold, and the ranges it may not (see
# relayer.config): used to find the id just before a given one.
_MAX_CHAR = "\U0010ffff"
_MAX_TARGET_ID = 255
# How many targets after it one target's lookup reads, when the store's order is not that of
# the code points.
_LOOKUP_PAGE = 100


class IMetricsExposition(Protocol):
    """
    What :class:`AdminResource` needs of its ``metrics``: one method that renders them.

    :class:`relayer.metrics.PrometheusMetrics` provides it.
    """

    def exposition(self, accept: str) -> tuple[bytes, str] | Deferred[tuple[bytes, str]]:
        """
        The metrics, in the format that the scraper's ``Accept`` header asks for.

        Args:
            accept: The request's ``Accept`` header, or ``""`` when it has none.

        Returns:
            The body and its content type (or a Deferred firing with them).
        """


class _HTTPError(Exception):
    """An answer other than 200, with a JSON body that says why."""

    def __init__(
        self,
        code: int,
        error: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.error = error
        self.message = message
        self.headers = dict(headers or {})


@attrs.frozen
class _Answer:
    """What a route answers: a status code, a content type and a body."""

    body: bytes
    content_type: str = "application/json"
    code: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)


def _json(document: Any, code: int = 200) -> _Answer:
    body = json.dumps(document, ensure_ascii=True, allow_nan=False, indent=None)
    return _Answer((body + "\n").encode("ascii"), code=code)


def _load_page() -> tuple[bytes, str]:
    """The status page, and the Content-Security-Policy that allows its inline script and style."""
    text = resources.files("relayer").joinpath("admin_page.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
        return " ".join(
            "'sha256-{}'".format(
                base64.b64encode(hashlib.sha256(part.encode("utf-8")).digest()).decode("ascii")
            )
            for part in found
        )

    policy = (
        "default-src 'none'; "
        f"script-src {hashes('script')}; "
        f"style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return text.encode("utf-8"), policy


_page: tuple[bytes, str] | None = None


def _the_page() -> tuple[bytes, str]:
    global _page
    if _page is None:
        _page = _load_page()
    return _page


def _plain(value: Any) -> Any:
    """An attrs record, as JSON: enums as their values, bytes left out."""
    if attrs.has(type(value)):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in attrs.fields(type(value))
            if not isinstance(getattr(value, f.name), bytes)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _target_json(status: TargetStatus) -> dict[str, Any]:
    document: dict[str, Any] = _plain(status)
    return document


def _dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "txn_id": letter.txn_id,
        "attempts": letter.attempts,
        "reason": letter.reason,
        "dead_at": letter.dead_at,
        "n_events": letter.n_events,
        "event_ids": list(letter.event_ids[:MAX_DEAD_LETTER_EVENT_IDS]),
    }


def _predecessor(target_id: str) -> str:
    """
    The greatest string that sorts before ``target_id`` among possible target ids (1 to 255
    characters, none a control character or a surrogate), by code point: the ``after`` of a
    :meth:`Scheduler.status` page whose first target is ``target_id`` if it exists.
    """
    head, last = target_id[:-1], ord(target_id[-1])
    if last <= 0x20:
        # No character a target id may hold sorts before a space.
        return head
    below = last - 1
    if 0xD800 <= below <= 0xDFFF:
        below = 0xD7FF
    elif 0x7F <= below <= 0x9F:
        below = 0x7E
    return head + chr(below) + _MAX_CHAR * (_MAX_TARGET_ID - len(target_id))


class _Query:
    """A request's query parameters, each given at most once, all of them known."""

    def __init__(self, request: Request, known: tuple[str, ...]) -> None:
        self._values: dict[str, str] = {}
        for raw_name, raw_values in (request.args or {}).items():
            name = _text(raw_name, "a parameter's name")
            if name not in known:
                allowed = ", ".join(known) if known else "none"
                raise _HTTPError(
                    400, "bad_parameter", f"unknown parameter {name!r} (allowed: {allowed})"
                )
            if len(raw_values) != 1:
                raise _HTTPError(
                    400, "bad_parameter", f"parameter {name!r} is given more than once"
                )
            self._values[name] = _text(raw_values[0], f"parameter {name!r}")

    def text(self, name: str) -> str | None:
        return self._values.get(name)

    def integer(self, name: str, default: int | None, lowest: int, highest: int) -> int | None:
        value = self._values.get(name)
        if value is None or value == "":
            return default
        if not re.fullmatch(r"[0-9]{1,19}", value) or not lowest <= int(value) <= highest:
            raise _HTTPError(
                400,
                "bad_parameter",
                f"{name} must be a whole number from {lowest} to {highest}, not {value!r}",
            )
        return int(value)

    def number(self, name: str) -> float | None:
        value = self._values.get(name)
        if value is None or value == "":
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise _HTTPError(400, "bad_parameter", f"{name} must be a number, not {value!r}")
        return number

    def flag(self, name: str) -> bool:
        value = self._values.get(name)
        if value is None or value in ("", "0", "false", "no"):
            return False
        if value in ("1", "true", "yes"):
            return True
        raise _HTTPError(400, "bad_parameter", f"{name} must be true or false, not {value!r}")


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _HTTPError(400, "bad_request", f"{what} is not valid UTF-8") from None


def _shown_method(request: Request) -> str:
    """The request's method, for a log line."""
    return bytes(request.method or b"")[:16].decode("ascii", "replace")


def _shown_path(request: Request) -> str:
    """The request's path below the resource, for a log line: it never holds the token."""
    return "/" + b"/".join(request.postpath or []).decode("utf-8", "replace")[:200]


def _txn_id(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", text) or not 1 <= int(text) < 2**63:
        raise _HTTPError(
            400, "bad_parameter", f"a transaction id is a whole number >= 1, not {text!r}"
        )
    return int(text)


def check_token(token: Any) -> None:
    """
    Refuse a token that :class:`AdminResource` would not accept.

    Raises:
        ConfigurationError: The token is not a str, is shorter than :data:`MIN_TOKEN_LENGTH`
            characters, or holds something other than printable ASCII without spaces. The
            message never shows the token.
    """
    if not isinstance(token, str):
        raise ConfigurationError(f"token must be a str, not {type(token).__name__}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"token must be at least {MIN_TOKEN_LENGTH} characters long, not {len(token)}; "
            "make one with secrets.token_urlsafe(32)"
        )
    if not _TOKEN_CHARS.fullmatch(token):
        raise ConfigurationError(
            "token must be printable ASCII without spaces; make one with secrets.token_urlsafe(32)"
        )


_Handler = Callable[[Request, _Query, list[str]], Awaitable[_Answer]]


@attrs.frozen
class _Route:
    """One route: its method, its path pattern (``{}`` for a variable segment), its handler."""

    method: str
    pattern: tuple[str | None, ...]
    params: tuple[str, ...]
    handler: _Handler

    def match(self, segments: list[str]) -> list[str] | None:
        if len(segments) != len(self.pattern):
            return None
        variables = []
        for want, got in zip(self.pattern, segments, strict=True):
            if want is None:
                variables.append(got)
            elif want != got:
                return None
        return variables


class AdminResource(Resource):
    """
    The admin API and status page of a scheduler, as a :class:`twisted.web.resource.Resource`.

    Mount it where the application serves its own administration (see :doc:`operations`):
    behind TLS, or on a loopback interface. Every route but the status page needs the header
    ``Authorization: Bearer TOKEN``; without it, or with another token, the answer is 401.

    Args:
        scheduler: The scheduler whose targets are shown and acted on. It need not be running
            yet: the API answers 503 until it is.
        token: The bearer token that callers must present: printable ASCII, without spaces,
            at least :data:`MIN_TOKEN_LENGTH` characters (``secrets.token_urlsafe(32)`` makes
            one). It is never logged, shown or echoed.
        metrics: An object with an ``exposition(accept) -> (body, content_type)`` method, such
            as :class:`relayer.metrics.PrometheusMetrics`, served at ``GET /metrics``; None
            (the default) serves no metrics.

    Raises:
        ConfigurationError: The token is missing, too short or not printable ASCII, or
            ``metrics`` has no ``exposition`` method.
    """

    isLeaf = True
    log = Logger(namespace="relayer.admin")

    def __init__(
        self, scheduler: Scheduler, token: str, *, metrics: IMetricsExposition | None = None
    ) -> None:
        super().__init__()
        check_token(token)
        if metrics is not None and not callable(getattr(metrics, "exposition", None)):
            raise ConfigurationError(
                "metrics must have an exposition(accept) method, such as "
                "relayer.metrics.PrometheusMetrics"
            )
        # The page is read once, here, rather than on the reactor at its first request.
        _the_page()
        self._scheduler = scheduler
        self._expected = b"Bearer " + token.encode("ascii")
        self._metrics = metrics
        get, post = "GET", "POST"
        target = ("api", "targets", None)
        self._routes = [
            _Route(get, ("api", "targets"), ("after", "limit"), self._targets),
            _Route(get, target, ("since", "until"), self._target),
            _Route(post, (*target, "wake"), (), self._wake),
            _Route(post, (*target, "replay"), ("txn",), self._replay),
            _Route(get, (*target, "dead-letters"), ("after", "limit"), self._dead_letters),
            _Route(post, (*target, "dead-letters", None, "discard"), (), self._discard),
            _Route(
                get,
                (*target, "events"),
                ("state", "after", "limit", "since", "until", "with_events"),
                self._events,
            ),
            _Route(get, ("api", "events", None), (), self._event),
            _Route(get, ("api", "commands", None), (), self._command),
            _Route(get, ("metrics",), (), self._metrics_route),
        ]

    # -- twisted.web ----------------------------------------------------------------------------

    def render(self, request: Request) -> int | bytes:
        """Answer a request; the answer is written once the scheduler has answered."""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = Deferred.fromCoroutine(self._answer(request))

        def write(answer: _Answer) -> None:
            if gone:
                # The client went away: there is nobody to answer.
                return
            request.setResponseCode(answer.code)
            request.setHeader(b"Content-Type", answer.content_type.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
            request.setHeader(b"Referrer-Policy", b"no-referrer")
            for name, value in answer.headers.items():
                request.setHeader(name.encode("ascii"), value.encode("utf-8"))
            request.setHeader(b"Content-Length", str(len(answer.body)).encode("ascii"))
            if request.method != b"HEAD":
                request.write(answer.body)
            request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure(
                "The admin API failed to answer {method} {path}",
                failure,
                relayer_event=ev.ADMIN_FAILED,
                method=_shown_method(request),
                path=_shown_path(request),
            )

        d.addCallback(write).addErrback(failed)
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> _Answer:
        try:
            return await self._route(request)
        except _HTTPError as e:
            answer = _json({"error": e.error, "message": e.message}, e.code)
            return attrs.evolve(answer, headers=e.headers)
        except NotRunning as e:
            return _json({"error": "not_running", "message": str(e)}, 503)
        except UnknownTarget as e:
            return _json({"error": "unknown_target", "message": str(e)}, 404)
        except (ConfigurationError, InvalidEvent) as e:
            return _json({"error": "bad_parameter", "message": str(e)}, 400)
        except StoreUnavailable:
            return attrs.evolve(
                _json({"error": "store_unavailable", "message": "the store is unavailable"}, 503),
                headers={"Retry-After": "5"},
            )
        except Exception:
            self.log.failure(
                "The admin API failed on {method} {path}",
                relayer_event=ev.ADMIN_FAILED,
                method=_shown_method(request),
                path=_shown_path(request),
            )
            return _json({"error": "internal_error", "message": "see the server's log"}, 500)

    async def _route(self, request: Request) -> _Answer:
        raw = list(request.postpath or [])
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        if not raw:
            # Mounted as a child and asked without a trailing slash: the page's relative
            # links need one.
            last = (request.prepath or [b""])[-1]
            return _Answer(
                b"",
                "text/plain",
                301,
                {"Location": quote(last.decode("utf-8", "replace"), safe="") + "/"},
            )
        segments = [_text(s, "the path") for s in raw]
        if segments == [""]:
            if method != "GET":
                raise _HTTPError(405, "method_not_allowed", "use GET", {"Allow": "GET, HEAD"})
            page, policy = _the_page()
            return _Answer(
                page,
                "text/html; charset=utf-8",
                headers={"Content-Security-Policy": policy, "X-Frame-Options": "DENY"},
            )
        self._authorize(request)
        matched = [(r, v) for r in self._routes if (v := r.match(segments)) is not None]
        if not matched:
            raise _HTTPError(404, "not_found", "no such route; see the documentation")
        for route, variables in matched:
            if route.method == method:
                return await route.handler(request, _Query(request, route.params), variables)
        allowed = sorted({r.method for r, _ in matched})
        if "GET" in allowed:
            allowed.append("HEAD")
        raise _HTTPError(
            405,
            "method_not_allowed",
            f"use {' or '.join(allowed)}",
            {"Allow": ", ".join(allowed)},
        )

    def _authorize(self, request: Request) -> None:
        given = request.getHeader(b"authorization")
        if given is None:
            raise _HTTPError(
                401,
                "unauthorized",
                "send the header Authorization: Bearer TOKEN",
                {"WWW-Authenticate": 'Bearer realm="relayer"'},
            )
        raw = given.encode("latin-1", "replace") if isinstance(given, str) else bytes(given)
        # The scheme is case-insensitive; the token is compared in constant time.
        scheme, _, credentials = raw.partition(b" ")
        candidate = b"Bearer " + credentials.strip()
        if scheme.lower() != b"bearer" or not hmac.compare_digest(candidate, self._expected):
            raise _HTTPError(
                401,
                "unauthorized",
                "the token is not valid",
                {"WWW-Authenticate": 'Bearer realm="relayer", error="invalid_token"'},
            )

    # -- targets --------------------------------------------------------------------------------

    async def _lookup(self, target_id: str) -> TargetStatus | None:
        """One target's status, or None if the scheduler neither has it nor has data for it."""
        after = _predecessor(target_id)
        page = await self._scheduler.status(after=after, limit=1)
        if page and page[0].target_id == target_id:
            return page[0]
        if page and page[0].target_id < target_id:
            # The store sorts ids otherwise than by code point (a PostgreSQL database of
            # another collation than C): look a little further.
            for status in await self._scheduler.status(after=after, limit=_LOOKUP_PAGE):
                if status.target_id == target_id:
                    return status
        return None

    async def _known(self, target_id: str) -> None:
        """Refuse, with 404, a target that is neither registered nor stored."""
        if target_id in self._scheduler.targets:
            return
        if await self._lookup(target_id) is None:
            raise UnknownTarget(f"no target {target_id!r} is registered or stored")

    async def _targets(self, request: Request, query: _Query, _: list[str]) -> _Answer:
        limit = query.integer("limit", 100, 1, MAX_TARGETS_PAGE)
        assert limit is not None
        after = query.text("after") or None
        page = await self._scheduler.status(after=after, limit=limit)
        return _json(
            {
                "targets": [_target_json(s) for s in page],
                "next": page[-1].target_id if len(page) == limit else None,
            }
        )

    async def _target(self, request: Request, query: _Query, variables: list[str]) -> _Answer:
        (target_id,) = variables
        since, until = query.number("since"), query.number("until")
        status = await self._lookup(target_id)
        if status is None:
            raise UnknownTarget(f"no target {target_id!r} is registered or stored")
        counts = await self._scheduler.event_counts(target_id, since=since, until=until)
        document = _target_json(status)
        document["events"] = _plain(counts)
        return _json({"target": document})

    async def _wake(self, request: Request, query: _Query, variables: list[str]) -> _Answer:
        (target_id,) = variables
        wake: Callable[[str], Any] = self._scheduler.wake
        command_id = await maybeDeferred(wake, target_id)
        if isinstance(command_id, int):
            # Another process delivers to the target: it applies the command.
            return _json({"target_id": target_id, "woken": False, "command_id": command_id}, 202)
        return _json({"target_id": target_id, "woken": True, "command_id": None})

    async def _replay(self, request: Request, query: _Query, variables: list[str]) -> _Answer:
        (target_id,) = variables
        txn = query.text("txn")
        if txn:
            txn_id = _txn_id(txn)
            replayed = await self._scheduler.replay(target_id, txn_id)
            if not replayed:
                raise _HTTPError(
                    404,
                    "unknown_transaction",
                    f"transaction {txn_id} is not a dead letter of target {target_id!r}",
                )
            return _json({"target_id": target_id, "txn_id": txn_id, "replayed": replayed})
        replayed = await self._scheduler.replay(target_id)
        return _json({"target_id": target_id, "txn_id": None, "replayed": replayed})

    async def _dead_letters(self, request: Request, query: _Query, variables: list[str]) -> _Answer:
        (target_id,) = variables
        limit = query.integer("limit", 20, 1, MAX_DEAD_LETTERS_PAGE)
        after = query.integer("after", None, 0, 2**63 - 1)
        assert limit is not None
        await self._known(target_id)
        letters = await self._scheduler.dead_letters(target_id, limit, after=after)
        return _json(
            {
                "target_id": target_id,
                "dead_letters": [_dead_letter_json(d) for d in letters],
                "next": letters[-1].txn_id if len(letters) == limit else None,
            }
        )

    async def _discard(self, request: Request, query: _Query, variables: list[str]) -> _Answer:
        target_id, txn = variables
        txn_id = _txn_id(txn)
        if not await self._scheduler.discard(target_id, txn_id):
            raise _HTTPError(
                404,
                "unknown_transaction",
                f"transaction {txn_id} is not a dead letter of target {target_id!r}",
            )
        return _json({"target_id": target_id, "txn_id": txn_id, "discarded": True})

    async def _events(self, request: Request, query: _Query, variables: list[str]) -> _Answer:
        (target_id,) = variables
        state = query.text("state") or DeliveryState.PENDING.value
        try:
            DeliveryState(state)
        except ValueError:
            choices = ", ".join(s.value for s in DeliveryState)
            raise _HTTPError(
                400, "bad_parameter", f"state must be one of {choices}, not {state!r}"
            ) from None
        with_events = query.flag("with_events")
        most = MAX_EVENTS_PAGE_WITH_BODIES if with_events else MAX_EVENTS_PAGE
        limit = query.integer("limit", 100, 1, most)
        assert limit is not None
        await self._known(target_id)
        page = await self._scheduler.target_events(
            target_id,
            state,
            after=query.text("after") or None,
            limit=limit,
            since=query.number("since"),
            until=query.number("until"),
            with_events=with_events,
        )
        entries = []
        for entry in page.entries:
            document = _plain(entry)
            document.pop("event", None)
            if with_events:
                document["event"] = json.loads(entry.event) if entry.event is not None else None
            entries.append(document)
        return _json({"target_id": target_id, "state": state, "events": entries, "next": page.next})

    # -- events and commands --------------------------------------------------------------------

    async def _event(self, request: Request, query: _Query, variables: list[str]) -> _Answer:
        (event_id,) = variables
        status = await self._scheduler.event_status(event_id)
        if status is None:
            raise _HTTPError(404, "unknown_event", f"the store holds no event {event_id!r}")
        return _json({"event": _plain(status)})

    async def _command(self, request: Request, query: _Query, variables: list[str]) -> _Answer:
        (text,) = variables
        if not re.fullmatch(r"[0-9]{1,19}", text) or not 1 <= int(text) < 2**63:
            raise _HTTPError(
                400, "bad_parameter", f"a command id is a whole number >= 1, not {text!r}"
            )
        command = await self._scheduler.command(int(text))
        if command is None:
            raise _HTTPError(404, "unknown_command", f"the store holds no command {text}")
        return _json({"command": _plain(command)})

    # -- metrics --------------------------------------------------------------------------------

    async def _metrics_route(self, request: Request, query: _Query, _: list[str]) -> _Answer:
        if self._metrics is None:
            raise _HTTPError(404, "not_found", "this admin resource serves no metrics")
        accept = request.getHeader(b"accept")
        text = accept.decode("latin-1") if isinstance(accept, bytes) else (accept or "")
        exposition: Callable[[str], Any] = self._metrics.exposition
        body, content_type = await maybeDeferred(exposition, text)
        return _Answer(bytes(body), str(content_type))


__all__ = ["MIN_TOKEN_LENGTH", "AdminResource", "IMetricsExposition", "check_token"]
