"""Encoding of events and transaction bodies."""

from __future__ import annotations

import enum
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayer import EventTooLarge, InvalidEvent
from relayer._encoding import (
    BODY_PREFIX,
    BODY_SUFFIX,
    ENVELOPE_BYTES,
    SEPARATOR,
    encode_event,
    events_of_body,
    join_events,
    split_events,
    transaction_body,
    transaction_size,
)

BIG = 1024 * 1024 * 1024

deterministic = settings(derandomize=True, max_examples=150, deadline=None, database=None)


def test_separator_and_envelope() -> None:
    assert SEPARATOR == b",\n"
    assert ENVELOPE_BYTES == len(b'{"events":[]}')
    assert transaction_body(b"") == BODY_PREFIX + BODY_SUFFIX == b'{"events":[]}'


def test_events_are_encoded_as_compact_utf8_json() -> None:
    event = {"type": "m.room.message", "content": {"body": "héllo ☃\n", "n": [1, 2.5, None]}}
    data = encode_event(event, BIG)
    assert (
        data
        == ('{"type":"m.room.message","content":{"body":"héllo ☃\\n","n":[1,2.5,null]}}').encode()
    )
    assert json.loads(data) == event
    # No space after separators, and non-ASCII is sent as UTF-8 rather than \\u escapes.
    assert b" " not in data.replace("héllo ☃".encode(), b"")
    assert "☃".encode() in data


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"v": None}, b'{"v":null}'),
        ({"v": True}, b'{"v":true}'),
        ({"v": 0}, b'{"v":0}'),
        ({"v": -1.5}, b'{"v":-1.5}'),
        ({"v": ""}, b'{"v":""}'),
        ({"v": []}, b'{"v":[]}'),
        ({}, b"{}"),
        ({"v": (1, 2)}, b'{"v":[1,2]}'),
    ],
    ids=repr,
)
def test_plain_json_values_are_accepted(event: Any, expected: bytes) -> None:
    assert encode_event(event, BIG) == expected


class _Event(dict):  # type: ignore[type-arg]
    """A dict subclass, as an application may use for its events."""


def test_a_dict_subclass_is_an_object() -> None:
    assert encode_event(_Event(type="m.x"), BIG) == b'{"type":"m.x"}'


@pytest.mark.parametrize(
    ("event", "kind"),
    [(None, "None"), ([1], "list"), ("text", "str"), (0, "int"), (True, "bool"), ((1,), "tuple")],
    ids=repr,
)
def test_an_event_that_is_not_an_object_is_refused(event: Any, kind: str) -> None:
    with pytest.raises(InvalidEvent, match=f"JSON object.*not {kind}") as excinfo:
        encode_event(event, BIG)
    assert not isinstance(excinfo.value, EventTooLarge)


SAFE = 2**53 - 1


class Count(enum.IntEnum):
    SMALL = 3
    HUGE = 2**60


@pytest.mark.parametrize(
    "event",
    [
        {"n": SAFE},
        {"n": -SAFE},
        {"n": [SAFE, -SAFE, 0]},
        {"n": Count.SMALL},
        {"s": "1" * 100},  # digits inside a string
        {"s": "-" * 40, "t": "2024-01-01-1234-5678-9012"},
        {"1st": 1, "-1": 2, "true": 3, "false": 4, "null": 5},  # keys that only look coerced
        {"a": {"1st": {"x": [{"2nd": True}]}}},
        {"f": 1.2345678901234567e300, "g": 12345678901234567.0},  # floats are not ints
        {"b": True, "c": False, "d": None},
        {"q": 'a,"1', "r": '{"true"'},  # the key pattern inside strings
    ],
    ids=repr,
)
def test_the_gate_accepts_what_the_wire_carries(event: Any) -> None:
    assert json.loads(encode_event(event, BIG)) == json.loads(json.dumps(event))


@pytest.mark.parametrize(
    ("event", "where"),
    [
        ({"n": SAFE + 1}, "n"),
        ({"n": -SAFE - 1}, "n"),
        ({"content": {"count": 10**400}}, r"content\.count"),
        ({"a": [1, [2, {"b": [3, 2**64]}]]}, r"a\[1\]\[1\]\.b\[1\]"),
        ({"a": {"b": {"c": {"d": -(2**80)}}}}, r"a\.b\.c\.d"),
        ({"n": Count.HUGE}, "n"),
        ({"t": (1, 2**53)}, r"t\[1\]"),
    ],
    ids=repr,
)
def test_an_integer_out_of_range_is_refused_with_its_path(event: Any, where: str) -> None:
    with pytest.raises(InvalidEvent, match=f"integer at {where} is out of range"):
        encode_event(event, BIG)


@pytest.mark.parametrize(
    ("event", "key", "where"),
    [
        ({1: "a", "1": "b"}, "1", "the top level"),
        ({"a": {-2: 0}}, "-2", "a"),
        ({"a": [{"b": {2.5: 0}}]}, "2.5", r"a\[0\]\.b"),
        ({"a": {"b": {"c": {"d": {True: 0}}}}}, "True", r"a\.b\.c\.d"),
        ({"a": {"b": [[{False: 0}]]}}, "False", r"a\.b\[0\]\[0\]"),
        ({"x": {None: 0}}, "None", "x"),
        ({"x": {Count.SMALL: 0}}, "Count.SMALL", "x"),
    ],
    ids=repr,
)
def test_a_key_that_is_not_a_string_is_refused_with_its_path(
    event: Any, key: str, where: str
) -> None:
    with pytest.raises(InvalidEvent, match=f"not a string at {where}: .*{key}"):
        encode_event(event, BIG)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"]
)
@pytest.mark.parametrize(
    "wrap",
    [lambda v: {"x": v}, lambda v: {"x": [1, [2, v]]}, lambda v: {"x": {v: 1}}],
    ids=["value", "nested", "key"],
)
def test_non_finite_floats_are_refused(value: float, wrap: Any) -> None:
    with pytest.raises(InvalidEvent) as excinfo:
        encode_event(wrap(value), BIG)
    assert not isinstance(excinfo.value, EventTooLarge)


@pytest.mark.parametrize(
    "event",
    [{"x": "\ud800"}, {"body": "a\udfffb"}, {"k\ud83d": 1}, {"x": ["ok", "\udc80"]}],
    ids=["bare", "value", "key", "list"],
)
def test_lone_surrogates_are_refused(event: Any) -> None:
    with pytest.raises(InvalidEvent, match="surrogate"):
        encode_event(event, BIG)


def test_a_valid_surrogate_pair_character_is_accepted() -> None:
    assert encode_event({"e": "\U0001f600"}, BIG) == '{"e":"\U0001f600"}'.encode()


def _circular() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


@pytest.mark.parametrize(
    "event",
    [
        object(),
        {"x": object()},
        {1, 2},
        b"bytes",
        bytearray(b"x"),
        {"when": pytest},
        {(1, 2): "tuple key"},
        {"f": lambda: None},
        {"n": 10**5000},
        _circular(),
    ],
    ids=[
        "object",
        "nested-object",
        "set",
        "bytes",
        "bytearray",
        "module",
        "tuple-key",
        "function",
        "huge-int",
        "circular",
    ],
)
def test_values_that_are_not_json_are_refused(event: Any) -> None:
    with pytest.raises(InvalidEvent):
        encode_event(event, BIG)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_deep_nesting_is_refused_as_an_invalid_event(kind: str) -> None:
    event: Any = {}
    for _ in range(100_000):
        event = {"a": [event]} if kind == "list" else {"a": event}
    with pytest.raises(InvalidEvent, match="nested"):
        encode_event(event, BIG)
    # The interpreter is fine afterwards: ordinary events still encode.
    assert encode_event({"ok": [[[1]]]}, BIG) == b'{"ok":[[[1]]]}'


def test_moderate_nesting_is_accepted() -> None:
    event: Any = 0
    for _ in range(200):
        event = [event]
    assert encode_event({"v": event}, BIG) == b'{"v":' + b"[" * 200 + b"0" + b"]" * 200 + b"}"


def test_event_too_large_at_the_exact_byte_boundary() -> None:
    # Multi-byte characters: the cap counts bytes, not characters.
    event = {"s": "é" * 100}
    size = len(json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode())
    assert size == len('{"s":""}') + 200
    exact = size + ENVELOPE_BYTES
    assert len(encode_event(event, exact)) == size
    assert len(transaction_body(encode_event(event, exact))) == exact
    with pytest.raises(EventTooLarge) as excinfo:
        encode_event(event, exact - 1)
    assert isinstance(excinfo.value, InvalidEvent)
    message = str(excinfo.value)
    assert str(exact - 1) in message and str(size) in message


def test_an_event_larger_than_any_cap_is_too_large_not_invalid_json() -> None:
    with pytest.raises(EventTooLarge):
        encode_event({"s": "x" * 1000}, 64)


@pytest.mark.parametrize(
    "events",
    [
        [],
        [b"{}"],
        [b'{"a":1}', b"[1,2]", b'"x,\\ny"', b"null"],
        [b'{"n":%d}' % n for n in range(100)],
    ],
    ids=["none", "one", "mixed", "hundred"],
)
def test_body_round_trip(events: list[bytes]) -> None:
    run = join_events(events)
    assert split_events(run) == events
    body = transaction_body(run)
    assert events_of_body(body) == events
    assert len(body) == transaction_size([len(e) for e in events])
    assert json.loads(body) == {"events": [json.loads(e) for e in events]}


@pytest.mark.parametrize(
    "body", [b"", b"{}", b'{"events":[1]', b'"events":[1]}', b'{"events": [1]}', b"[1]"]
)
def test_events_of_body_refuses_other_documents(body: bytes) -> None:
    with pytest.raises(ValueError):
        events_of_body(body)


# -- properties -------------------------------------------------------------------------------

# Text rich in the characters that matter here: the separator's, quotes, escapes, control
# characters, line and paragraph separators, and characters outside the BMP.
tricky_text = st.text(
    alphabet=st.one_of(
        st.sampled_from([",", "\n", "\r", '"', "\\", "\x00", "\x1f", "\u2028", "\u2029", "é"]),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=40,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-SAFE, max_value=SAFE)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(tricky_text, children, max_size=5)
    ),
    max_leaves=30,
)


@deterministic
@given(json_values)
def test_encoded_events_never_contain_the_separator(event: Any) -> None:
    data = encode_event({"v": event}, BIG)
    assert SEPARATOR not in data
    assert b"\n" not in data
    assert json.loads(data) == {"v": event}


def _carried(value: Any) -> bool:
    """Whether the wire format carries a value: every key a str, every int in range."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _carried(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(map(_carried, value))
    if isinstance(value, int) and not isinstance(value, bool):
        return -SAFE <= value <= SAFE
    return True


# Values near the gate's edges: big ints, keys of every kind json coerces, digit strings.
edgy_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([SAFE, SAFE + 1, -SAFE, -SAFE - 1, 10**15, 10**16])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='0123456789-,{"tfn', max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(alphabet='0123456789-tfn"', max_size=6)
            | st.integers(min_value=-(2**60), max_value=2**60)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.sampled_from([True, False, None, "true", "false", "null", "1st"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(deterministic, max_examples=400)
@given(edgy_values)
def test_the_gate_refuses_exactly_what_the_wire_cannot_carry(value: Any) -> None:
    event = {"v": value}
    try:
        encode_event(event, BIG)
    except InvalidEvent:
        refused = True
    else:
        refused = False
    assert refused == (not _carried(event))


@settings(deterministic, max_examples=40)
@given(st.lists(json_values, max_size=8))
def test_any_events_survive_a_body_round_trip(values: list[Any]) -> None:
    events = [{"v": v} for v in values]
    encoded = [encode_event(e, BIG) for e in events]
    body = transaction_body(join_events(encoded))
    assert events_of_body(body) == encoded
    assert json.loads(body) == {"events": events}
    assert len(body) == transaction_size([len(e) for e in encoded])
