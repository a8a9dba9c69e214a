"""
The orjson fast path of encode_event: every event encodes to the bytes that the json encoder
writes (tests/_encoding_reference.py, the encoder before the fast path), or is refused with the
same exception and message, whichever path it takes.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import json
import math
import pickle
import struct
import sys
import threading
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relayer import _encoding
from relayer._encoding import encode_event
from tests import _encoding_reference as reference

BIG = 1 << 30

differential = settings(
    derandomize=True,
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def outcome(encode: Any, event: Any, max_bytes: int = BIG) -> tuple[Any, Any]:
    try:
        return ("bytes", encode(event, max_bytes))
    except Exception as e:
        return (type(e), str(e))


def assert_same(event: Any, max_bytes: int = BIG) -> None:
    assert outcome(encode_event, event, max_bytes) == outcome(
        reference.encode_event, event, max_bytes
    )


def took_fast_path(event: Any, monkeypatch: pytest.MonkeyPatch) -> bool:
    slow: list[Any] = []
    real = _encoding._encode_with_json

    def spy(e: Any) -> bytes:
        slow.append(e)
        return real(e)

    with monkeypatch.context() as m:
        m.setattr(_encoding, "_encode_with_json", spy)
        try:
            encode_event(event, BIG)
        except _encoding.InvalidEvent:
            pass
    return not slow


# -- the values -----------------------------------------------------------------------------------


class Colour(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 1
    HUGE = 2**60


class Mode(str, enum.Enum):
    FAST = "fast"


class Raw(bytes, enum.Enum):
    """A bytes-backed Enum whose value orjson can write (a pickle would write its bytes)."""

    def __new__(cls, value: int) -> Raw:
        member = bytes.__new__(cls, b"raw")
        member._value_ = value
        return member

    ONE = 1

    def __repr__(self) -> str:
        return f"Raw.{self.name}"


class Text(str):
    pass


class Number(int):
    pass


class Real(float):
    pass


class Mapping(dict):  # type: ignore[type-arg]
    pass


class Items(list):  # type: ignore[type-arg]
    pass


Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Record:
    n: int = 1


#: Objects that are not plain JSON values: each encoder treats them its own way.
EXOTIC: list[Any] = [
    Colour.RED,
    Level.LOW,
    Level.HUGE,
    Mode.FAST,
    Raw.ONE,
    uuid.UUID(int=0x12345678123456781234567812345678),
    orjson.Fragment(b"1"),
    orjson.Fragment(b'{"a":\n1}'),
    orjson.Fragment(b"not json"),
    Text("sub"),
    Number(7),
    Number(2**60),
    Real(1.5),
    Real(1e-7),
    Mapping(a=1),
    Items([1, 2]),
    Point(1, 2),
    Record(),
    datetime.datetime(2024, 1, 2, 3, 4, 5),
    datetime.date(2024, 1, 2),
    datetime.time(3, 4),
    decimal.Decimal("1.5"),
    b"bytes",
    bytearray(b"x"),
    memoryview(b"x"),
    {1, 2},
    frozenset(),
    1j,
    object(),
    Ellipsis,
    len,
    pickle.PickleBuffer(b"x"),
]

INTS = [
    0,
    1,
    -1,
    2**31,
    2**32,
    2**53 - 1,
    -(2**53 - 1),
    2**53,
    -(2**53),
    2**63 - 1,
    2**63,
    -(2**63),
    2**64,
    10**30,
    1700000000000,
]

FLOATS = [
    0.0,
    -0.0,
    1.0,
    -1.5,
    0.1,
    1e-4,
    math.nextafter(1e-4, 0),
    1e-5,
    math.nextafter(1e-5, 0),
    1e-9,
    math.nextafter(1e-9, 0),
    1e-10,
    1.5e-7,
    -2.5e-6,
    5e-324,
    2.2250738585072014e-308,
    1e15,
    1e16,
    math.nextafter(1e16, 0),
    1e17,
    1.7976931348623157e308,
    2.0**53,
    float("nan"),
    float("inf"),
    -float("inf"),
    struct.unpack(">d", b"\xff\xf8\x00\x00\x00\x00\x00\x01")[0],
]

STRINGS = [
    "",
    "plain",
    '"\\\n\r\t\b\f\x00\x1f\x7f\u2028\u2029é😀',
    "\ud800",
    "\udfff",
    "\ud83d\ude00",
    "G",
    "0.00001",
    "1e-7",
    "e-5",
    "null",
    "NaN",
]

floats = st.one_of(
    st.floats(),
    st.floats(min_value=1e-11, max_value=1e-3),
    st.floats(min_value=-1e-3, max_value=-1e-11),
    st.floats(min_value=1e14, max_value=1e18),
    st.floats(max_value=1e-300, min_value=-1e-300),
    st.sampled_from(FLOATS),
)
ints = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.integers(),
    st.sampled_from(INTS),
    st.booleans(),
)
texts = st.one_of(
    st.text(),
    st.text(st.characters(blacklist_categories=())),  # surrogates and controls too
    st.text(st.characters(max_codepoint=0x7F)),
    st.sampled_from(STRINGS),
)
keys = st.one_of(
    texts,
    st.sampled_from([0, 1.5, True, None, (1, 2), Text("k"), Mode.FAST, Colour.RED, b"k"]),
)
scalars = st.one_of(st.none(), ints, floats, texts)
plain_values = st.recursive(
    st.one_of(st.none(), ints, floats, st.text()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(st.text(max_size=8), inner, max_size=5),
    ),
    max_leaves=30,
)
values = st.recursive(
    st.one_of(scalars, st.sampled_from(EXOTIC)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(texts, inner, max_size=5),
        st.dictionaries(keys, inner, max_size=3),
        st.dictionaries(texts, inner, max_size=3).map(Mapping),
    ),
    max_leaves=30,
)
events = st.one_of(
    st.dictionaries(texts, values, max_size=6),
    st.dictionaries(keys, values, max_size=4),
    st.dictionaries(st.text(max_size=8), plain_values, max_size=8),
    values,
)


@differential
@given(events)
@example({"a": uuid.UUID(int=1)})
@example({"a": uuid.UUID(int=1), "b": None})
@example({"a": Colour.RED, "b": 1e-7})
@example({"a": Raw.ONE})
@example({"a": orjson.Fragment(b"[1,\n2]")})
@example({"a": [float("nan"), None]})
@example({"a": 1e-05, "b": "x"})
@example({"k": Level.HUGE})
@example({Mode.FAST: 1})
@example({Text("k"): 1})
def test_the_same_bytes_or_the_same_refusal_as_before(event: Any) -> None:
    assert_same(event)


@differential
@given(st.dictionaries(st.text(max_size=8), plain_values, max_size=8))
def test_plain_events_encode_as_before(event: Any) -> None:
    assert_same(event)


@given(floats)
@settings(derandomize=True, max_examples=3000, deadline=None, database=None)
def test_every_float_encodes_as_before(value: float) -> None:
    assert_same({"f": value})
    assert_same({"f": [value, None], "s": "text"})


@pytest.mark.parametrize("value", FLOATS + INTS + STRINGS, ids=repr)
def test_boundary_values_encode_as_before(value: Any) -> None:
    assert_same({"v": value})
    assert_same({"v": value, "n": None, "G": [value]})


@pytest.mark.parametrize("value", EXOTIC, ids=lambda v: type(v).__name__)
def test_objects_that_are_not_plain_json_are_treated_as_before(value: Any) -> None:
    # Whatever else the event holds: alone, beside a null, beside a float orjson writes
    # differently, nested.
    for event in (
        {"a": value},
        {"a": value, "b": None},
        {"a": value, "b": 1e-7},
        {"a": {"b": [1, (value,)]}},
        {"a": 1.5, "z": value},
    ):
        assert_same(event)


@pytest.mark.parametrize(
    "value",
    [uuid.UUID(int=1), Colour.RED, orjson.Fragment(b"1"), Raw.ONE],
    ids=lambda v: type(v).__name__,
)
def test_enums_uuids_and_fragments_stay_refused_on_every_path(value: Any) -> None:
    for event in ({"a": value}, {"a": value, "b": None}, {"a": value, "b": 1e-5}):
        with pytest.raises(_encoding.InvalidEvent, match="not JSON-serialisable"):
            encode_event(event, BIG)


def test_every_code_point_is_escaped_as_json_escapes_it() -> None:
    # The fast path writes strings as orjson does: checked here against json for all of them.
    for start in range(0, sys.maxunicode + 1, 4096):
        chunk = "".join(
            chr(c)
            for c in range(start, min(start + 4096, sys.maxunicode + 1))
            if not 0xD800 <= c <= 0xDFFF
        )
        event = {chunk: chunk}
        assert encode_event(event, BIG) == reference.encode_event(event, BIG)


def test_plain_events_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = [
        {"type": "m.room.message", "content": {"body": "hi", "n": [1, 2.5, None, True]}},
        {"t": (1, 2), "f": 1e100, "g": -0.0, "h": 1e-4, "i": 123.456},
        {"n": 2**53 - 1, "m": -(2**53 - 1), "s": "é\n😀"},
    ]
    for event in fast:
        assert took_fast_path(event, monkeypatch), event
    slow = [
        {"f": 1e-5},
        {"f": 1.5e-7},
        {"f": float("nan"), "n": None},
        {"u": uuid.UUID(int=1)},
        {"e": Colour.RED},
        {"s": Text("x")},
        {"n": 2**53},
        {1: "int key"},
        Mapping(a=1),
    ]
    for event in slow:
        assert not took_fast_path(event, monkeypatch), event


def test_deep_and_self_containing_events_are_refused_as_before() -> None:
    deep: Any = 0
    for _ in range(300):  # deeper than orjson goes
        deep = [deep]
    assert_same({"d": deep})
    looped: dict[str, Any] = {}
    looped["self"] = looped
    assert_same(looped)
    listed: list[Any] = []
    listed.append(listed)
    assert_same({"l": listed})


def test_a_failed_pickle_leaves_the_next_event_unharmed() -> None:
    deep: Any = Colour.RED
    for _ in range(100):  # past the pickler's fast-mode nesting limit
        deep = {"a": [deep]}
    for _ in range(200):
        assert_same({"d": deep})
    assert encode_event({"ok": [1.5, None]}, BIG) == b'{"ok":[1.5,null]}'


def test_the_size_cap_is_applied_to_the_fast_path_bytes() -> None:
    event = {"s": "x" * 100}
    size = len(json.dumps(event, separators=(",", ":"))) + _encoding.ENVELOPE_BYTES
    assert_same(event, size)
    assert_same(event, size - 1)
    with pytest.raises(_encoding.EventTooLarge):
        encode_event(event, size - 1)


def test_the_pickle_writes_floats_as_the_check_expects() -> None:
    # BINFLOAT, then the float big-endian: what the non-finite pattern looks for.
    chunks: list[bytes] = []
    pickler = _encoding._Refuser(_encoding._Sink(chunks.append), protocol=2)
    for value in (float("nan"), float("inf"), -float("inf"), FLOATS[-1]):
        chunks.clear()
        pickler.dump([value])
        data = b"".join(chunks)
        assert pickle.BINFLOAT + struct.pack(">d", value) in data
        assert _encoding._NON_FINITE.search(data)
    for value in (1.5, -1.5, 1e308, -1e308, 5e-324):
        chunks.clear()
        pickler.dump([value])
        assert not _encoding._NON_FINITE.search(b"".join(chunks))


def test_threads_encode_alike() -> None:
    # Each thread has a pickler of its own: events encoded at once in several threads come
    # out as they do alone.
    cases = [
        {"i": i, "f": [1.5, 1e-7, None][i % 3], "s": "x" * (i % 50), "d": {"n": [i] * (i % 7)}}
        for i in range(300)
    ]
    expected = [reference.encode_event(e, BIG) for e in cases]
    failures: list[Any] = []

    def work() -> None:
        for _ in range(20):
            for e, want in zip(cases, expected, strict=True):
                got = encode_event(e, BIG)
                if got != want:
                    failures.append((e, got))

    threads = [threading.Thread(target=work) for _ in range(4)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not failures


@pytest.mark.parametrize("extra", [1e-7, 1e-5, float("nan"), float("inf"), 1.5, None, Colour.RED])
def test_large_strings_are_pickled_in_pieces_and_checked_whole(extra: Any) -> None:
    # The pickler writes a large string to its file directly, apart from what comes before
    # and after it: the check looks at every piece.
    big = "x" * 200_000
    for event in (
        {"a": big, "f": extra},
        {"a": [big, "y" * 70_000, extra]},
        {"f": extra, "a": big},
    ):
        assert_same(event)


def test_the_bytes_of_an_event_take_about_their_own_size_in_memory() -> None:
    """
    Events wait in memory until they are stored: the bytes kept of each must not hold a much
    larger buffer (orjson writes into one of 4 KiB at least, and its bytes keep it).
    """
    import tracemalloc

    event = {"type": "m.room.message", "content": {"body": "x" * 200}, "n": [1, 2.5, None]}
    size = len(encode_event(event, 10_000))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [encode_event(event, 10_000) for _ in range(1000)]
        per_event = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_event < 2 * size + 64, (per_event, size)
