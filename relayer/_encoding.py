"""
Encoding of events and transaction bodies.

An event is encoded once, when it is submitted, as compact UTF-8 JSON. Compact JSON never
contains a raw newline (newlines inside strings are escaped), so the stored form of a run of
events, and the transaction body sent on the wire, join events with ``b",\\n"``. That keeps
batching, re-batching and splitting free of any parsing: a transaction body is built by
concatenation, and taken apart again by splitting on the separator.

The wire body of a transaction is the JSON document ``{"events":[e1,\\ne2,\\n...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from relayer.errors import EventTooLarge, InvalidEvent

SEPARATOR = b",\n"
BODY_PREFIX = b'{"events":['
BODY_SUFFIX = b"]}"
ENVELOPE_BYTES = len(BODY_PREFIX) + len(BODY_SUFFIX)

_encoder = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    # No bookkeeping of the containers being encoded (about 15% of the encoding time): an
    # event that contains itself recurses until RecursionError, refused as nested too deeply.
    check_circular=False,
    separators=(",", ":"),
)


def _reused_encoder(
    encoder: json.JSONEncoder, make: Callable[..., Any] | None = None
) -> Callable[[Any], str]:
    """
    ``encoder.encode``, without building the C encoder again for every value.

    ``json.JSONEncoder.encode`` builds its C encoder (``c_make_encoder``) afresh on each call,
    which is about a third of the time it takes to encode a typical event. Without circular
    reference checks that encoder keeps no state between calls, so one is built here, once,
    with the encoder's own settings; if that is not possible, or it does not encode a sample
    as ``encoder`` does, ``encoder.encode`` is used as it is.
    """
    if make is None:
        make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or encoder.check_circular or encoder.indent is not None:
        return encoder.encode
    if encoder.ensure_ascii:
        strings = json.encoder.encode_basestring_ascii
    else:
        strings = json.encoder.encode_basestring
    try:
        iterencode = make(
            None,
            encoder.default,
            strings,
            encoder.indent,
            encoder.key_separator,
            encoder.item_separator,
            encoder.sort_keys,
            encoder.skipkeys,
            encoder.allow_nan,
        )
    except TypeError:  # another signature, in another Python
        return encoder.encode

    def encode(value: Any) -> str:
        return "".join(iterencode(value, 0))

    sample = {"t": "m.x", "n": [1, -2.5, 1e100, True, None], "s": 'é\n\u2028"\\', "o": {"1": {}}}
    try:
        same = encode(sample) == encoder.encode(sample) and encode("x") == encoder.encode("x")
    except Exception:
        same = False
    # The settings that only show on bad input: NaN, and keys that are not JSON keys.
    for bad in (float("nan"), {(1, 2): 0}):
        same = same and _outcome(encode, bad) == _outcome(encoder.encode, bad)
    return encode if same else encoder.encode


def _outcome(encode: Callable[[Any], str], value: Any) -> tuple[Any, str]:
    try:
        return (None, encode(value))
    except Exception as e:
        return (type(e), str(e))


_encode = _reused_encoder(_encoder)
_gate = orjson.dumps


#: The largest integer Matrix's canonical JSON allows, and the smallest is its negation.
MAX_SAFE_INTEGER = 2**53 - 1

# The gate: a fast test that passes every event the wire format can carry, and most events, at
# a fraction of the cost of walking them in Python. orjson, told to enforce Matrix's integer
# range (OPT_STRICT_INTEGER), refuses every key that is not a str and every int (int
# subclasses included) outside +-(2**53 - 1), at any depth, in dicts, lists and tuples alike: so
# an event it accepts has neither, and needs no walk. It also refuses a few things that relayer
# accepts (a key of a str subclass, nesting deeper than 254 levels): an event it refuses is
# walked in Python (_find_problem), and the walk decides. Its output is thrown away: the event
# is sent as the standard json encoder wrote it above, byte for byte. (A dict or list subclass
# that overrides its iteration, so that json and orjson see different items, is not covered:
# orjson reads the underlying storage.)
_GATE_OPTION = orjson.OPT_STRICT_INTEGER


def encode_event(event: Any, max_bytes: int) -> bytes:
    """
    Encode one event as compact JSON.

    Args:
        event: A JSON object: a dict whose keys are all strings, at every depth, and whose
            integers are within +-(2**53 - 1), as Matrix's canonical JSON requires.
        max_bytes: The target's cap on a transaction's wire size. An event whose transaction,
            holding that event alone, would be larger than this is refused.

    Returns:
        The UTF-8 bytes of the encoded event.

    Raises:
        InvalidEvent: The event is not a dict, is not JSON-serialisable, has a key that is not a
            string, or has an integer out of range; the message says where.
        EventTooLarge: The event alone would exceed ``max_bytes``.
    """
    if type(event) is not dict and not isinstance(event, dict):
        raise InvalidEvent(
            f"an event must be a JSON object (a dict), not {_kind(event)}; "
            'wrap other values in one, such as {"content": ...}'
        )
    try:
        text = _encode(event)
        data = text.encode("utf-8")
    except RecursionError:
        raise InvalidEvent(
            "the event is nested too deeply, or contains itself, to be encoded as JSON"
        ) from None
    except UnicodeEncodeError as e:
        raise InvalidEvent(
            f"the event holds a string that is not valid Unicode ({e.reason}); "
            "lone surrogates cannot be encoded as UTF-8"
        ) from None
    except (TypeError, ValueError) as e:
        raise InvalidEvent(f"the event is not JSON-serialisable: {e}") from None
    except Exception as e:
        # An object in the event failed while it was read (a mapping whose items() raises).
        raise InvalidEvent(
            f"the event could not be encoded as JSON: {type(e).__name__}: {e}"
        ) from e
    try:
        _gate(event, option=_GATE_OPTION)
    except Exception:  # noqa: BLE001 - a refusal is not a verdict: the walk decides
        problem = _find_problem(event)
        if problem is not None:
            raise InvalidEvent(problem) from None
    size = len(data) + ENVELOPE_BYTES
    if size > max_bytes:
        raise EventTooLarge(
            f"the encoded event is {len(data)} bytes; with the transaction envelope that is "
            f"{size} bytes, over the target's max_bytes of {max_bytes}"
        )
    return data


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    return type(value).__name__


def _find_problem(event: dict[Any, Any]) -> str | None:
    """
    What in an encoded event the wire format cannot carry, or None if nothing.

    The walk is iterative, so that an event nested as deeply as the encoder allows is walked
    too. Paths are written as ``content.items[2].count``.
    """
    stack: list[tuple[str, Any]] = [("", event)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            children = []
            for key, child in value.items():
                if not isinstance(key, str):
                    where = f"at {path}" if path else "at the top level"
                    return (
                        f"the event has a key that is not a string {where}: {key!r} "
                        f"({_kind(key)}); JSON object keys are strings, and json would turn it "
                        "into one, possibly equal to another key"
                    )
                children.append((f"{path}.{key}" if path else key, child))
            stack.extend(reversed(children))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{path}[{i}]", child) for i, child in reversed(list(enumerate(value))))
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
        ):
            return (
                f"the event's integer at {path} is out of range: Matrix allows integers from "
                f"-(2**53 - 1) to 2**53 - 1; send a larger number as a string"
            )
    return None


def transaction_size(event_sizes: Sequence[int]) -> int:
    """The wire size of a transaction holding events of the given encoded sizes."""
    if not event_sizes:
        return ENVELOPE_BYTES
    return ENVELOPE_BYTES + sum(event_sizes) + len(SEPARATOR) * (len(event_sizes) - 1)


def join_events(events: Sequence[bytes]) -> bytes:
    """Join encoded events into the stored form of a run of events."""
    return SEPARATOR.join(events)


def split_events(run: bytes) -> list[bytes]:
    """Split the stored form of a run of events back into encoded events."""
    if not run:
        return []
    return run.split(SEPARATOR)


def transaction_body(run: bytes) -> bytes:
    """The wire body of a transaction whose events are the stored run ``run``."""
    return BODY_PREFIX + run + BODY_SUFFIX


def events_of_body(body: bytes) -> list[bytes]:
    """The encoded events of a transaction body made by :func:`transaction_body`."""
    if not (body.startswith(BODY_PREFIX) and body.endswith(BODY_SUFFIX)):
        raise ValueError("not a relayer transaction body")
    return split_events(body[len(BODY_PREFIX) : len(body) - len(BODY_SUFFIX)])
