"""
Encoding of events and transaction bodies.

An event is encoded once, when it is submitted, as compact UTF-8 JSON. Compact JSON never
contains a raw newline (newlines inside strings are escaped), so the stored form of a run of
events, and the transaction body sent on the wire, join events with ``b",\\n"``. That keeps
batching, re-batching and splitting free of any parsing: a transaction body is built by
concatenation, and taken apart again by splitting on the separator.

An event submitted already encoded, as bytes, is checked instead (:func:`check_encoded`), and
stored and sent exactly as given.

The wire body of a transaction is the JSON document ``{"events":[e1,\\ne2,\\n...]}``.
"""

from __future__ import annotations

import json
import pickle
import re
import threading
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
_dumps = orjson.dumps
_join = b"".join
_loads = orjson.loads


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

# The fast path. Most events are made of plain dicts, lists, tuples, strs, ints, floats, bools
# and None only; for those, orjson writes the bytes that the json encoder above writes, byte for
# byte, with two exceptions, both of floats: it writes NaN and the infinities as null (json
# refuses them), and floats that repr() writes with an exponent of -05 to -09 differently
# (1e-05 as 0.00001, 1.5e-07 as 1.5e-7). Strings are escaped alike (checked for every code
# point), and ints, bools, None, separators and key order are written alike. So an event is
# encoded by orjson, and its bytes are kept if all of these hold; else the event takes the path
# of json and the gate, as if the fast path did not exist, to the same bytes or the same error:
#
# - orjson accepts it with OPT_STRICT_INTEGER (no key but a str, no int out of range, nesting
#   254 levels deep at most, no cycle), with subclasses, dates and dataclasses passed to a
#   ``default`` that refuses them (so that orjson gives up on them at once; the next check
#   would refuse them anyway);
# - every object in it is of one of those plain types exactly: a pickler that refuses every
#   other object (_Refuser) pickles it. (orjson writes a few other types natively, which json
#   refuses: Enum members, uuid.UUID, orjson.Fragment. They are refused here, wherever they are.)
# - if the pickle holds a float (it then holds the byte of the BINFLOAT opcode, b"G"; a G in a
#   string or a length just costs the checks), orjson's bytes hold neither "0.0000" nor "e-"
#   followed by one digit alone, and the pickle no non-finite float (BINFLOAT writes the float
#   big-endian: NaN and the infinities start with 0x7f or 0xff, then a byte of 0xf0 or more).
_FAST_OPTION = (
    orjson.OPT_STRICT_INTEGER
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_SHORT_EXPONENT = re.compile(rb"e-[0-9](?![0-9])")
#: The BINFLOAT opcode, as an int: ``int in bytes`` is a memchr, ``bytes in bytes`` is not.
_BINFLOAT = pickle.BINFLOAT[0]
_NON_FINITE = re.compile(rb"G[\x7f\xff][\xf0-\xff]", re.DOTALL)


def _not_native(value: Any) -> Any:
    """orjson's ``default``: what orjson does not write natively goes the json encoder's way."""
    raise TypeError


class _Refuser(pickle.Pickler):
    """
    A pickler of exact dicts, lists, tuples, strs, ints, floats, bools and None (and of sets,
    frozensets, bytes and bytearrays, which orjson refuses) that refuses every other object.

    The C pickler writes objects of those types exactly by itself; for any other object it
    calls ``reducer_override`` first, and raising there refuses the object.
    """

    def reducer_override(self, obj: Any) -> Any:
        raise TypeError(f"not a plain JSON type: {type(obj).__name__}")


class _Sink:
    """The file a :class:`_Refuser` writes to: ``write`` appends to a list."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self.write = write


class _Pickling(threading.local):
    """For each thread: a :class:`_Refuser` (``dump``) and the list it writes to (``chunks``)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        pickler = _Refuser(_Sink(self.chunks.append), protocol=2)
        # No memo: an event orjson accepted holds no cycle, and this pickle is never loaded.
        pickler.fast = True
        self.dump = pickler.dump


_pickling = _Pickling()


def encode_event(event: Any, max_bytes: int) -> bytes:
    """
    Encode one event as compact JSON, or check one that is JSON already.

    Args:
        event: A JSON object: a dict whose keys are all strings, at every depth, and whose
            integers are within +-(2**53 - 1), as Matrix's canonical JSON requires. Or the
            bytes of one, as :func:`check_encoded` takes them.
        max_bytes: The target's cap on a transaction's wire size. An event whose transaction,
            holding that event alone, would be larger than this is refused.

    Returns:
        The UTF-8 bytes of the encoded event.

    Raises:
        InvalidEvent: The event is not a dict, is not JSON-serialisable, has a key that is not a
            string, or has an integer out of range; the message says where.
        EventTooLarge: The event alone would exceed ``max_bytes``.
    """
    if type(event) is dict:
        try:
            data = _dumps(event, _not_native, _FAST_OPTION)
            pickling = _pickling
            chunks = pickling.chunks
            chunks.clear()
            try:
                pickling.dump(event)
                pickled = b"".join(chunks)
            finally:
                # Not kept until the next event: the pickle is as large as the event.
                chunks.clear()
            if _BINFLOAT in pickled and (
                data.find(b"0.0000") >= 0
                or _SHORT_EXPONENT.search(data) is not None
                or _NON_FINITE.search(pickled) is not None
            ):
                data = _encode_with_json(event)
            else:
                # orjson's bytes keep the buffer they were written in (4 KiB at least, whatever
                # their length) and events wait in memory until stored: keep a copy of their
                # own size.
                data = _join((data, b""))
        except Exception:  # noqa: BLE001 - a refusal is not a verdict: json decides
            data = _encode_with_json(event)
    elif isinstance(event, (bytes, bytearray, memoryview)):
        return check_encoded(event, max_bytes)
    elif isinstance(event, dict):
        data = _encode_with_json(event)
    else:
        raise InvalidEvent(
            f"an event must be a JSON object (a dict), not {_kind(event)}; "
            'wrap other values in one, such as {"content": ...}'
        )
    size = len(data) + ENVELOPE_BYTES
    if size > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def _too_large(length: int, max_bytes: int) -> EventTooLarge:
    return EventTooLarge(
        f"the encoded event is {length} bytes; with the transaction envelope that is "
        f"{length + ENVELOPE_BYTES} bytes, over the target's max_bytes of {max_bytes}"
    )


def _encode_with_json(event: dict[Any, Any]) -> bytes:
    """The event's bytes as the json encoder writes them, checked by the gate; else raise."""
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
    return data


#: Bytes, as ints: ``int in bytes`` is a memchr, ``bytes in bytes`` is not.
_NEWLINE = ord("\n")
_PLUS = ord("+")
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


def check_encoded(event: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
    """
    Check an event submitted as the bytes of its JSON; return them as bytes, unchanged.

    They must be one JSON object, in UTF-8, without a raw newline byte (events are joined with
    ``b",\\n"``; a newline inside a string is written ``\\n``, so only whitespace between
    tokens can be one), and with no integer outside +-(2**53 - 1). Whitespace elsewhere is
    kept, as are repeated keys: relayer sends the bytes as they are. A bytearray or a
    memoryview is copied, as it is at the call.

    Raises:
        InvalidEvent: One of these does not hold; the message says which.
        EventTooLarge: The event alone would exceed ``max_bytes``.
    """
    if type(event) is bytes:
        data = event
    else:
        try:
            data = bytes(event)
        except (TypeError, ValueError) as e:  # a released memoryview
            raise InvalidEvent(f"the event's bytes cannot be read: {e}") from None
    if len(data) + ENVELOPE_BYTES > max_bytes:
        raise _too_large(len(data), max_bytes)
    try:
        value = _loads(data)
    except orjson.JSONDecodeError as e:
        if "infinity" in str(e):
            raise InvalidEvent(
                f"the event's bytes hold a number too large for a double: {e}"
            ) from None
        raise InvalidEvent(f"the event's bytes are not valid JSON in UTF-8: {e}") from None
    if type(value) is not dict:
        kind = _JSON_KINDS.get(type(value), "null" if value is None else "a boolean")
        raise InvalidEvent(
            f"an event given as bytes must be a JSON object, not {kind}; "
            'wrap other values in one, such as {"content": ...}'
        )
    if _NEWLINE in data:
        raise InvalidEvent(
            "the event's bytes hold a raw newline, which relayer uses to separate events: "
            "encode the event compactly, without newlines between its tokens, as "
            "json.dumps(event, separators=(',', ':')) or orjson.dumps(event) do"
        )
    # The integers: orjson reads those of up to 64 bits as ints, which the gate checks, and
    # larger ones as floats of 1.8e19 and more, which it writes with an exponent, "e+". So
    # bytes whose value passes the gate and is written without a "+" hold no integer out of
    # range; others are read again by json, which reads every integer as an int, and walked.
    try:
        rewritten = _gate(value, None, _GATE_OPTION)
    except Exception:  # noqa: BLE001 - a refusal is not a verdict: the walk decides
        rewritten = None
    if rewritten is None or _PLUS in rewritten:
        problem = _integer_problem(data)
        if problem is not None:
            raise InvalidEvent(problem)
    return data


def _integer_problem(data: bytes) -> str | None:
    """An integer out of range in valid JSON bytes, as :func:`_find_problem` words it."""
    try:
        # orjson reads the largest integers as floats: json reads every integer as an int.
        value = json.loads(data)
    except RecursionError:
        return "the event is nested too deeply to be checked"
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return (
            "the event holds an integer out of range: Matrix allows integers from "
            "-(2**53 - 1) to 2**53 - 1; send a larger number as a string"
        )
    return _find_problem(value)


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
