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


def encode_event(event: Any, max_bytes: int) -> bytes:
    """
    Encode one event as compact JSON.

    Args:
        event: Any JSON-serialisable value; normally a dict.
        max_bytes: The target's cap on a transaction's wire size. An event whose transaction,
            holding that event alone, would be larger than this is refused.

    Returns:
        The UTF-8 bytes of the encoded event.

    Raises:
        InvalidEvent: The event is not JSON-serialisable.
        EventTooLarge: The event alone would exceed ``max_bytes``.
    """
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
    size = len(data) + ENVELOPE_BYTES
    if size > max_bytes:
        raise EventTooLarge(
            f"the encoded event is {len(data)} bytes; with the transaction envelope that is "
            f"{size} bytes, over the target's max_bytes of {max_bytes}"
        )
    return data


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
