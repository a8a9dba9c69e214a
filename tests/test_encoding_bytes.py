"""Events submitted already encoded, as the bytes of their JSON: checked, and sent as given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relayer import Event, EventTooLarge, InvalidEvent
from relayer._encoding import ENVELOPE_BYTES, encode_event, events_of_body
from relayer.testing import Harness, build_scheduler

T = TypeVar("T")
BIG = 1 << 30


def result_of(d: Deferred[T]) -> T:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return build_scheduler(["t", "u"], path=tmp_path / "relayer.db", max_bytes=4096)


def sent(h: Harness, target_id: str) -> list[bytes]:
    """The events' bytes as the target received them, in order."""
    return [e for r in h.transport[target_id].received for e in events_of_body(r.body)]


# -- accepted, byte for byte ----------------------------------------------------------------------

ACCEPTED = [
    b"{}",
    b'{"type":"m.room.message","content":{"body":"hi","n":[1,2.5,null,true,false]}}',
    b'{ "spaced" : [ 1 , 2 ] }',
    b' \t\r{"a":1}\r\t ',
    '{"é":"😀 \\u2028 \\n \\ud83d\\ude00"}'.encode(),
    b'{"a":1,"a":2}',
    b'{"n":9007199254740991,"m":-9007199254740991}',
    b'{"s":"12345678901234567890123"}',
    b'{"f":0.30000000000000004,"g":1.2345678901234567e300,"h":12345678901234567.5}',
    b'{"big":1E308,"small":-1e-400}',
    b'{"s":"+49 12345678901234567890","t":"1e+30"}',
    b'{"d":' + b"[" * 300 + b"1" + b"]" * 300 + b"}",
]


@pytest.mark.parametrize("data", ACCEPTED, ids=repr)
def test_valid_json_bytes_are_kept_as_they_are(data: bytes) -> None:
    assert encode_event(data, BIG) is data
    assert encode_event(bytearray(data), BIG) == data
    assert encode_event(memoryview(data), BIG) == data
    assert type(encode_event(bytearray(data), BIG)) is bytes


def test_a_bytearray_is_copied_at_the_call() -> None:
    buffer = bytearray(b'{"a":1}')
    data = encode_event(buffer, BIG)
    buffer[5:6] = b"2"
    assert data == b'{"a":1}'


def test_the_size_cap_counts_the_bytes_as_given() -> None:
    data = b'{"a": 1}'
    encode_event(data, len(data) + ENVELOPE_BYTES)
    with pytest.raises(EventTooLarge, match="max_bytes"):
        encode_event(data, len(data) + ENVELOPE_BYTES - 1)


# -- refused, each with its reason ----------------------------------------------------------------

REFUSED = [
    (b"", "not valid JSON"),
    (b"raw", "not valid JSON"),
    (b'{"a":1', "not valid JSON"),
    (b'{"a":1}x', "not valid JSON"),
    (b'{"a":1} {"b":2}', "not valid JSON"),
    (b'{"a":"\xff"}', "not valid JSON in UTF-8"),
    (b'{"a":"\xed\xa0\x80"}', "not valid JSON in UTF-8"),
    (b'{"a":"\\ud800"}', "not valid JSON"),
    (b'\xef\xbb\xbf{"a":1}', "not valid JSON"),
    (b'{"a":NaN}', "not valid JSON"),
    (b'{"a":-Infinity}', "not valid JSON"),
    (b'{"a":1e400}', "too large for a double"),
    (b'{"a":"x\x01"}', "not valid JSON"),
    (b"[1,2]", "must be a JSON object, not an array"),
    (b'"text"', "must be a JSON object, not a string"),
    (b"12", "must be a JSON object, not a number"),
    (b"true", "must be a JSON object, not a boolean"),
    (b"null", "must be a JSON object, not null"),
    (b'{"a":1,\n"b":2}', "raw newline.*compactly"),
    (b'{\n  "a": 1\n}', "raw newline.*compactly"),
    (b'{"a":1}\n', "raw newline"),
    (b'{"n":9007199254740992}', r"integer at n is out of range"),
    (b'{"n":-9007199254740992}', r"integer at n is out of range"),
    (b'{"c":{"l":[1,18446744073709551616]}}', r"integer at c\.l\[1\] is out of range"),
    (b'{"n":9223372036854775808}', r"integer at n is out of range"),
    (b'{"n":-9223372036854775809}', r"integer at n is out of range"),
    (b'{"d":' + b"[" * 300 + b"9007199254740992" + b"]" * 300 + b"}", "out of range"),
    (b'{"n":' + b"9" * 5000 + b"}", "too large for a double"),
    (b'{"n":' + b"9" * 300 + b"}", r"integer at n is out of range"),
]


@pytest.mark.parametrize(("data", "reason"), REFUSED, ids=[repr(d[:40]) for d, _ in REFUSED])
def test_bytes_that_are_not_one_compact_json_object_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason) as excinfo:
        encode_event(data, BIG)
    assert not isinstance(excinfo.value, EventTooLarge)
    with pytest.raises(InvalidEvent, match=reason):
        encode_event(bytearray(data), BIG)


def test_a_released_memoryview_is_refused() -> None:
    view = memoryview(b'{"a":1}')
    view.release()
    with pytest.raises(InvalidEvent, match="cannot be read"):
        encode_event(view, BIG)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=6), st.booleans())
@settings(derandomize=True, max_examples=300, deadline=None, database=None)
def test_what_relayer_encodes_it_accepts_as_bytes(event: dict[str, Any], spaced: bool) -> None:
    data = encode_event(event, BIG)
    assert encode_event(data, BIG) == data
    if spaced:
        spacious = json.dumps(event, ensure_ascii=True, separators=(", ", ": ")).encode()
        assert encode_event(spacious, BIG) == spacious


@given(st.integers())
@settings(derandomize=True, max_examples=300, deadline=None, database=None)
def test_integers_in_bytes_are_checked_as_in_dicts(n: int) -> None:
    data = b'{"n":[' + str(n).encode() + b"]}"
    if abs(n) <= 2**53 - 1:
        assert encode_event(data, BIG) == data
    else:
        with pytest.raises(InvalidEvent, match="out of range|too large"):
            encode_event(data, BIG)


# -- through the scheduler ------------------------------------------------------------------------


def test_submit_sends_the_bytes_as_given(h: Harness) -> None:
    data = b'{ "type": "m.x",  "n": 1 }'
    result_of(h.scheduler.submit("t", data))
    assert sent(h, "t") == [data]
    result_of(h.scheduler.submit(["t", "u"], Event(data, event_id="mine")))
    assert sent(h, "t") == [data, data]
    assert sent(h, "u") == [data]


def test_submit_many_mixes_bytes_and_dicts(h: Harness) -> None:
    pairs = [
        ("t", b'{"i":0}'),
        ("t", {"i": 1}),
        ("u", bytearray(b'{"i":2}')),
        ("t", Event(b'{"i":3}', ttl=60)),
        (["t", "u"], b'{"i":4}'),
        ("u", memoryview(b'{"i": 5}')),
    ]
    ids = result_of(h.scheduler.submit_many(pairs))
    assert len(ids) == 6
    assert sent(h, "t") == [b'{"i":0}', b'{"i":1}', b'{"i":3}', b'{"i":4}']
    assert sent(h, "u") == [b'{"i":2}', b'{"i":4}', b'{"i": 5}']


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (b'{"a":\n1}', "raw newline"),
        (b"[1]", "JSON object"),
        (b'{"n":9007199254740992}', "out of range"),
        (b"{oops}", "not valid JSON"),
        (orjson.dumps({"s": "x" * 5000}), None),
    ],
    ids=["newline", "array", "integer", "invalid", "too-large"],
)
def test_a_bad_event_in_bytes_is_refused_and_nothing_is_stored(
    h: Harness, event: bytes, reason: str | None
) -> None:
    error = InvalidEvent if reason else EventTooLarge
    with pytest.raises(error, match=reason or "max_bytes"):
        h.scheduler.submit("t", event)
    with pytest.raises(error, match=reason or "max_bytes"):
        h.scheduler.submit_many([("t", b'{"ok":1}'), ("t", event)])
    with pytest.raises(error, match=reason or "max_bytes"):
        h.scheduler.submit_many([("t", Event(event, event_id="e1"))])
    status = {s.target_id: s.pending_events for s in result_of(h.scheduler.status())}
    assert status == {"t": 0, "u": 0}
    assert sent(h, "t") == []
