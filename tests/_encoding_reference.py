"""
The event encoder as it was before the orjson fast path: the reference that the fast path is
tested against (tests/test_encoding_fast.py). Every event must encode to these bytes, or be
refused with this exception, message included. Do not change it to follow the library.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from relayer.errors import EventTooLarge, InvalidEvent

ENVELOPE_BYTES = len(b'{"events":[') + len(b"]}")
MAX_SAFE_INTEGER = 2**53 - 1

_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":")
)


def encode_event(event: Any, max_bytes: int) -> bytes:
    if type(event) is not dict and not isinstance(event, dict):
        raise InvalidEvent(
            f"an event must be a JSON object (a dict), not {_kind(event)}; "
            'wrap other values in one, such as {"content": ...}'
        )
    try:
        text = _encoder.encode(event)
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
        raise InvalidEvent(
            f"the event could not be encoded as JSON: {type(e).__name__}: {e}"
        ) from e
    try:
        orjson.dumps(event, option=orjson.OPT_STRICT_INTEGER)
    except Exception:  # noqa: BLE001
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
